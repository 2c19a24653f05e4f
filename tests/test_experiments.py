"""The experiment helpers (fast, untrained models, no data) and, marked slow, the main job."""

from __future__ import annotations

import pytest
import torch

from harmless.errors import InputError
from harmless.experiments import run_experiment
from harmless.experiments.common import (
    gaussian,
    harmless_perturbation,
    least_harmful_perturbation,
    output_rmse,
    rms_scale,
)
from harmless.experiments.fig2 import brute_force_rank
from harmless.linalg.subspace import harmless_subspace
from harmless.models import build_model, first_layer

F64 = torch.float64


def test_unknown_experiment() -> None:
    with pytest.raises(InputError, match="fig99"):
        run_experiment("fig99", out_dir=None)  # type: ignore[arg-type]


def test_rms_scale_gives_the_requested_rms_per_sample() -> None:
    d = torch.randn(5, 1, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    out = rms_scale(d, 0.3)
    rms = out.reshape(5, -1).pow(2).mean(dim=1).sqrt()
    assert torch.allclose(rms, torch.full((5,), 0.3, dtype=F64), rtol=1e-12)
    # direction kept
    cos = torch.nn.functional.cosine_similarity(out.reshape(5, -1), d.reshape(5, -1))
    assert torch.allclose(cos, torch.ones(5, dtype=F64))


@pytest.fixture(scope="module")
def mlp() -> torch.nn.Module:
    torch.set_num_threads(1)
    return build_model("mlp5:mnist", seed=0).double().eval()


def test_table1_rows_on_an_untrained_mlp(mlp: torch.nn.Module) -> None:
    """The Table 1 pipeline on random weights: harmless rows at round-off at every
    magnitude, Gaussian and least harmful rows clearly not, least harmful far below Gaussian."""
    x = torch.rand(16, 1, 28, 28, dtype=F64, generator=torch.Generator().manual_seed(1))
    space = harmless_subspace(mlp, (1, 28, 28))
    harmless = harmless_perturbation(space)
    least, gain = least_harmful_perturbation(mlp, (1, 28, 28), k=1)
    gen = torch.Generator().manual_seed(0)
    for rms in (0.1, 3.2, 100.0):
        h = output_rmse(mlp, x, harmless(x, rms, gen))
        g = output_rmse(mlp, x, gaussian(x, rms, gen))
        lh = output_rmse(mlp, x, least(x, rms, gen))
        assert h <= 1e-13 * max(1.0, rms), (rms, h)
        assert g > 1e-4 * rms and lh > 1e-8 * rms
        assert lh < g
    assert gain > 0


def test_brute_force_rank_oracle_matches_numpy_on_a_known_rank() -> None:
    lin = torch.nn.Linear(7, 5, bias=True)
    with torch.no_grad():  # small integers: the dependent row stays exactly dependent
        lin.weight.copy_(torch.randint(-3, 4, (5, 7), generator=torch.Generator().manual_seed(0)))
        lin.weight[4] = 2 * lin.weight[0] - lin.weight[1]
    assert brute_force_rank(lin, (7,)) == 4
    assert brute_force_rank(first_layer(build_model("mlp5:mnist", seed=0)), (784,)) == 256


@pytest.mark.slow
def test_main_job_quick(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    from harmless.cli import main

    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "harmless subspace: dim 528 of 784" in out
    assert "0 of 1000 predictions changed" in out
    assert (tmp_path / "harmless_mnist.png").stat().st_size > 10_000


def test_table2_rows_on_a_tiny_untrained_model() -> None:
    """Every harmless row keeps the model's decisions (Δacc exactly 0), stays in the box, and
    reports a solver certificate; the Gaussian row is the only one that may change accuracy."""
    from harmless.experiments.table2 import _run_setting

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 24), torch.nn.ReLU(),
                                torch.nn.Linear(24, 3)).double().eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 8, 8, generator=gen, dtype=torch.float64)
    x[:, :, :2] = 0.0  # a black band, as on MNIST
    with torch.no_grad():
        y = model(x).argmax(1)
    x0 = x.clone()
    rows, audit, images = _run_setting("tiny", model, x, y, tv_steps=5, paper_steps=20, tv_lp_images=2)
    assert torch.equal(x, x0)
    assert len(rows) == 4 and all(len(r) == 11 for r in rows)
    for row in rows[:3]:
        assert row[4] == "0.00% (0 changed)"  # Δacc of the float outputs, no prediction changed
        assert float(row[6]) <= 1e-12 and float(row[7]) <= 1e-12  # box violation, ‖A(x̂−x)‖
        assert float(row[8]) <= 1e-12  # |f(x̂) − f(x)|
        assert 0.0 <= float(row[2]) <= 1.0
        converged, bound = row[10].split(" / ")
        assert float(converged.rstrip("%")) == 100.0  # the interior-point method converges here
        assert float(bound) <= 1e-4
    assert rows[3][1].startswith("Gaussian")
    attacks = [r[1] for r in audit]
    assert any(a.startswith("TV, exact") for a in attacks) and any(a.startswith("min-norm") for a in attacks)
    for row in audit:
        assert -1.0 <= float(row[3]) <= 1.0  # SSIM of the reconstruction to the original
    for key, img in images.items():
        assert img.shape[1:] == x.shape[1:] and img.shape[0] == (2 if key.startswith("attack: TV, exact") else 6), key
        if "min-norm" not in key:  # (I-P)x_hat may leave the box; everything else is in it
            assert float(img.min()) >= -1e-12 and float(img.max()) <= 1 + 1e-12, key


def test_table2_rows_tile_by_tile() -> None:
    """The ImageNet path: a patchify stem, solved tile by tile, keeps every decision and the box."""
    from harmless.experiments.table2 import _run_setting
    from harmless.privacy.tiles import tiling

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 40, 7, stride=7, bias=False), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(40, 3)).double().eval()
    x = torch.rand(3, 3, 14, 21, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    tiles = tiling(model, (3, 14, 21), 7)
    rows, _, images = _run_setting("tiny-tiles", model, x, y, tv_steps=5, paper_steps=20, tiles=tiles)
    for row in rows[:3]:
        assert row[4] == "0.00% (0 changed)"
        assert float(row[6]) <= 1e-12 and float(row[7]) <= 1e-12 and float(row[8]) <= 1e-12
    for key, img in images.items():
        assert img.shape == x.shape, key
