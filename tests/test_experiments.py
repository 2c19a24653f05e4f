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
def test_main_job_quick(capsys: pytest.CaptureFixture[str], tmp_path) -> None:  # noqa: ANN001
    from harmless.cli import main

    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "harmless subspace: dim 528 of 784" in out
    assert "0 of 1000 predictions changed" in out
    assert (tmp_path / "harmless_mnist.png").stat().st_size > 10_000
