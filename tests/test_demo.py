"""The privacy part of the main job (``harmless demo``): privatised images give the model the
same output (to float64 round-off), stay in [0, 1], the printed table parses, the figure is
written. Runs on a tiny untrained model and synthetic images: no data, no training."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import harmless
from harmless.experiments.demo import PrivacyCase, privacy_demo

ROW = re.compile(
    r"^\s+(?P<data>\S+) ×(?P<n>\d+)\s+(?P<method>paper \(Alg\. 1\)|decoy \(grey\))\s+(?P<ssim>-?\d+\.\d{3})"
    r"\s+(?P<lpips>-?\d+\.\d{3}|-)\s+(?P<box>\d\.\de[+-]\d\d)\s+(?P<outdev>\d\.\de[+-]\d\d)"
    r"\s+(?P<fdev>\d\.\de[+-]\d\d)\s+(?P<kept>\d+) of (?P<total>\d+) unchanged\s+(?P<attack>-?\d+\.\d{3})$")


def parse_privacy_table(out: str) -> list[dict[str, str]]:
    """The rows of the privacy table printed by the demo."""
    return [m.groupdict() for line in out.splitlines() if (m := ROW.match(line))]


def check_rows(rows: list[dict[str, str]]) -> None:
    for r in rows:
        assert float(r["box"]) <= 1e-12, r
        assert float(r["outdev"]) <= 1e-10, r
        assert float(r["fdev"]) <= 1e-10, r
        assert r["kept"] == r["total"] == r["n"], r
        assert -1.0 <= float(r["ssim"]) <= 1.0 and -1.0 <= float(r["attack"]) <= 1.0, r


def _images(b: int, zeros: float, seed: int) -> torch.Tensor:
    """Synthetic 28x28 images in [0, 1] with about a fraction ``zeros`` of pixels exactly 0 and a few at 1."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 1, 28, 28, generator=gen, dtype=torch.float64)
    x[torch.rand(x.shape, generator=gen, dtype=torch.float64) < zeros] = 0.0
    x[torch.rand(x.shape, generator=gen, dtype=torch.float64) < 0.05] = 1.0
    return x


def test_privacy_demo_on_a_tiny_untrained_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10)).double().eval()
    space = harmless.harmless_subspace(model, (1, 28, 28))
    assert space.dim == 784 - 64
    clothes, digits = _images(2, 0.5, seed=1), _images(2, 0.8, seed=2)
    before = (clothes.clone(), digits.clone())
    cases = [PrivacyCase("Fashion-MNIST", model, space, clothes, ("paper", "decoy")),
             PrivacyCase("MNIST", model, space, digits, ("decoy",))]
    path = tmp_path / "sub" / "privatize_fashion.png"
    rows = privacy_demo(cases, path, paper_steps=20, use_lpips=False)
    out = capsys.readouterr().out

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert f"figure: {path}" in out
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # written atomically, no temporary left
    assert torch.equal(clothes, before[0]) and torch.equal(digits, before[1])  # inputs not modified

    printed = parse_privacy_table(out)
    assert [(r["data"], r["method"]) for r in printed] == [
        ("Fashion-MNIST", "paper (Alg. 1)"), ("Fashion-MNIST", "decoy (grey)"), ("MNIST", "decoy (grey)")]
    check_rows(printed)
    assert all(r["lpips"] == "-" for r in printed)

    # the returned rows say the same, and the claims hold when checked independently
    assert len(rows) == 3
    for row, shown in zip(rows, printed):
        assert f"{float(row.ssim.mean()):.3f}" == shown["ssim"]
        assert float(row.x_hat.min()) >= -1e-12 and float(row.x_hat.max()) <= 1 + 1e-12
        with torch.no_grad():
            f, f_hat = model(row.x), model(row.x_hat)
        assert float((f_hat - f).abs().max()) <= 1e-10
        assert torch.equal(f.argmax(1), f_hat.argmax(1))
        assert float((row.x_hat - row.x).abs().max()) > 1e-3  # it does change the image
        assert row.attack.shape == row.x.shape


@pytest.mark.slow
def test_main_job_quick_privatizes_real_images(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from harmless.cli import main

    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    printed = parse_privacy_table(out)
    assert [(r["data"], r["method"], r["n"]) for r in printed] == [
        ("Fashion-MNIST", "paper (Alg. 1)", "2"), ("Fashion-MNIST", "decoy (grey)", "2"),
        ("MNIST", "decoy (grey)", "2")]
    check_rows(printed)
    assert (tmp_path / "harmless_mnist.png").stat().st_size > 10_000
    assert (tmp_path / "privatize_fashion.png").stat().st_size > 10_000
