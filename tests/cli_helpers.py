"""Helpers shared by the command-line tests: run ``harmless.cli.main`` in-process and read
its one error line."""

from __future__ import annotations

import pytest

from harmless.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    """The single error line (warnings, one line each, may precede it); no traceback."""
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert all(ln.startswith(("harmless: error: ", "harmless: warning: ")) for ln in lines), err
    errors = [ln for ln in lines if ln.startswith("harmless: error: ")]
    assert len(errors) == 1, f"expected one error line on stderr, got: {err!r}"
    return errors[0]
