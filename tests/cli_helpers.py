"""Helpers shared by the command-line tests: run ``harmless.cli.main`` in-process and read
its one error line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from harmless.cli import main

#: The source of a factory module with ``wide()``: 64 inputs -> 16, a 48-dim harmless subspace
#: (tests add their own factories after it).
WIDE_FACTORY = (
    "import torch\n"
    "from torch import nn\n"
    "def wide():\n"  # 64 inputs -> 16: a 48-dim harmless subspace
    "    torch.manual_seed(0)\n"
    "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3)).eval()\n"
)


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


def factory_and_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, factory: str, prefix: str, *,
                       background: bool = False) -> tuple[str, list[str]]:
    """A fresh factory module (source ``factory``) importable for this test, and a folder data
    set of 3 classes x 4 grayscale 8x8 PNGs (``background``: the top two rows 0, on the box, as
    in MNIST); returns the module's name and the common arguments."""
    from PIL import Image

    name = f"{prefix}_{abs(hash(str(tmp_path))) % 10**8}"  # a fresh module per test
    (tmp_path / f"{name}.py").write_text(factory)
    monkeypatch.syspath_prepend(str(tmp_path))
    rng = np.random.default_rng(0)
    for c in range(3):
        (tmp_path / "data" / f"class{c}").mkdir(parents=True)
        for i in range(4):
            img = (rng.random((8, 8)) * 255).astype(np.uint8)
            if background:
                img[:2] = 0
            Image.fromarray(img, mode="L").save(tmp_path / "data" / f"class{c}" / f"img{i}.png")
    return name, ["--input-shape", "1,8,8", "--data", "folder", "--data-dir", str(tmp_path / "data")]
