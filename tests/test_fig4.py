"""The harmless view of perturbations (harmless.attacks.harmless_view) and the Fig 4 experiment,
on tiny untrained models: ρ against a SciPy null-space projector, the equivalence of δ, δ⊥ and
δ + h in float64, the gradient-in-the-row-space prediction, noise, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

import harmless
from harmless.attacks import PGD, EquivalenceReport, equivalent_check, harmless_fraction
from harmless.errors import InputError

SHAPE = (1, 4, 4)
N, HIDDEN, CLASSES = 16, 6, 3
DIM = N - HIDDEN  # a generic 6 x 16 first layer has rank 6


def tiny(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Flatten(), nn.Linear(N, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))
    return m.to(dtype).eval()


def oracle_projector(model: nn.Module) -> np.ndarray:
    """P = N Nᵀ with N an orthonormal basis of the first layer's nullspace, by SciPy (independent
    of the library's rank and projection code)."""
    w = model[1].weight.detach().double().numpy()
    null = scipy.linalg.null_space(w)
    assert null.shape == (N, DIM)
    return null @ null.T


def rand(shape: tuple[int, ...], seed: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return tiny()


@pytest.fixture(scope="module")
def space(model: nn.Module) -> harmless.HarmlessSubspace:
    s = harmless.harmless_subspace(model, SHAPE)
    assert s.dim == DIM
    return s


def rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).norm(dim=1) / b.norm(dim=1)


# -- ρ ------------------------------------------------------------------------------------------

def test_rho_matches_the_scipy_oracle(model, space):
    p = oracle_projector(model)
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(32, *SHAPE, generator=g, dtype=torch.float64)
    # Mix in samples that are (almost) all harmless and all harmful, and very different sizes.
    flat = delta.reshape(32, -1).numpy()
    flat[:4] = flat[:4] @ p
    flat[4:8] = flat[4:8] - flat[4:8] @ p
    flat[8:12] *= 1e-6
    flat[12:16] *= 1e6
    delta = torch.from_numpy(flat.copy()).reshape(32, *SHAPE)
    want = np.linalg.norm(flat @ p, axis=1) ** 2 / np.linalg.norm(flat, axis=1) ** 2
    got = harmless_fraction(space, delta)
    assert got.dtype == torch.float64 and got.shape == (32,)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)
    assert float(got[:4].min()) > 1 - 1e-12 and float(got[4:8].max()) < 1e-24


def test_rho_of_an_attack_result_is_that_of_its_delta(model, space):
    x, y = rand((8, *SHAPE), 2), torch.zeros(8, dtype=torch.int64)
    r = PGD(eps=0.3, steps=5, norm="inf", random_start=False)(model, x, y)
    assert torch.equal(harmless_fraction(space, r), harmless_fraction(space, r.delta))


def test_rho_of_zero_is_nan_and_float32_is_accepted(space):
    d = torch.zeros(3, *SHAPE, dtype=torch.float32)
    d[1] = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    rho = harmless_fraction(space, d)
    assert math.isnan(rho[0]) and math.isnan(rho[2]) and 0 < float(rho[1]) < 1


def test_unclipped_pgd_l2_is_entirely_harmful(model, space):
    # Images in [0.4, 0.6] and eps 0.05: ||δ||∞ <= ||δ||₂ <= 0.05, so the box [0, 1] never clips;
    # checked below against the same attack with no box at all.
    x, y = rand((64, *SHAPE), 3, 0.4, 0.6), torch.arange(64, dtype=torch.int64) % CLASSES
    attack = PGD(eps=0.05, steps=10, norm=2, random_start=False)
    r = attack(model, x, y)
    free = attack(model, x, y, bounds=(-10.0, 10.0))
    assert torch.equal(r.delta, free.delta)
    rho = harmless_fraction(space, r)
    # Each step adds Wᵀg (the input gradient of the loss through the first layer), which lies in
    # the row space; PGD's L2 projection only rescales. In float64 each step leaves a harmless
    # residue of order eps64 · ||step|| (the product Wᵀg, the sum x + step), so ‖Pδ‖/‖δ‖ is at
    # most ~ steps · N · eps64 ≈ 4e-14 and ρ ≲ 1e-27. Measured: max ~1e-31. 1e-20 is sound with
    # room to spare, and still fails on anything but round-off (a sign step has ρ ~ 0.3).
    assert float(rho.max()) < 1e-20
    sign = PGD(eps=0.05, steps=10, norm="inf", random_start=False)(model, x, y)
    assert float(harmless_fraction(space, sign).min()) > 1e-3


def test_noise_has_rho_near_dim_over_n(space):
    # For isotropic Gaussian δ, ρ ~ Beta(dim/2, (n - dim)/2): mean dim/n = 0.625, standard
    # deviation 0.161 here, so the mean of 4000 draws has sd 0.0025; 0.0125 is 5 sd.
    d = torch.randn(4000, *SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    rho = harmless_fraction(space, d)
    assert abs(float(rho.mean()) - DIM / N) < 0.0125
    assert abs(float(rho.var()) - (5 * 3) / (8 ** 2 * 9)) < 0.003


# -- equivalence ----------------------------------------------------------------------------------

def test_delta_and_its_harmful_part_give_the_same_output(model, space):
    x = rand((16, *SHAPE), 6)
    delta = 0.3 * torch.randn(16, *SHAPE, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    rep = equivalent_check(model, space, x, delta)
    assert isinstance(rep, EquivalenceReport) and rep.dtype == torch.float64
    assert rep.max_perp_diff < 1e-12
    assert bool(rep.perp_label_kept.all())
    # independently: δ⊥ from the SciPy projector, the model evaluated here
    p = torch.from_numpy(oracle_projector(model))
    perp = (delta.reshape(16, -1) - delta.reshape(16, -1) @ p).reshape(delta.shape)
    with torch.no_grad():
        assert float(rel(model(x + perp), model(x + delta)).max()) < 1e-12


def test_huge_harmless_part_keeps_logits_and_the_adversarial_label(model, space):
    x = rand((32, *SHAPE), 8)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    r = PGD(eps=2.0, steps=20, norm=2, random_start=False)(model, x, y)
    assert r.success_rate > 0.5
    rep = equivalent_check(model, space, x, r, scales=(1e4,), y=y, generator=torch.Generator().manual_seed(1))
    # ‖h‖ = 1e4 ‖δ‖: round-off in W(x + δ + h) grows to ~ eps64 · 1e4 ‖W‖ ‖δ‖, relative ~1e-12.
    assert rep.max_harmless_diff[0] < 1e-9
    assert bool(rep.harmless_label_kept.all()) and rep.label_kept == 1.0
    assert rep.success_rates is not None
    s, sp, sh = rep.success_rates
    assert s == sp == sh[0] == pytest.approx(r.success_rate)
    assert torch.equal(rep.y_adv, r.y_pred)
    assert bool(rep.harmless_outside_box.all())  # ‖h‖ far beyond the box: fine for the linear theory
    # independently: h from the SciPy null space, of norm 1e4 ‖δ‖
    p = torch.from_numpy(oracle_projector(model))
    g = torch.randn(32, N, generator=torch.Generator().manual_seed(2), dtype=torch.float64) @ p
    h = g / g.norm(dim=1, keepdim=True) * 1e4 * r.delta.reshape(32, -1).norm(dim=1, keepdim=True)
    with torch.no_grad():
        f = model(x + r.delta + h.reshape(r.delta.shape))
        assert float(rel(f, r.logits).max()) < 1e-9
        assert torch.equal(f.argmax(dim=1), r.y_pred)


def test_float32_model_is_checked_in_float64_and_left_alone():
    m32 = tiny(dtype=torch.float32)
    space = harmless.harmless_subspace(m32, SHAPE)
    m32.train()
    x, d = rand((4, *SHAPE), 9).float(), 0.1 * rand((4, *SHAPE), 10).float()
    with pytest.warns(harmless.errors.TrainingModeWarning):
        rep = equivalent_check(m32, space, x, d, scales=(10,))
    assert rep.max_perp_diff < 1e-12 and rep.max_harmless_diff[0] < 1e-11
    assert all(p.dtype == torch.float32 for p in m32.parameters()) and m32.training
    assert rep.success_rates is None


def test_inputs_are_not_modified(model, space):
    x, y = rand((6, *SHAPE), 11), torch.tensor([0, 1, 2, 0, 1, 2])
    r = PGD(eps=0.5, steps=3, norm=2, random_start=False)(model, x, y)
    saved = [t.clone() for t in (x, y, r.delta, r.x_adv)]
    params = [p.clone() for p in model.parameters()]
    harmless_fraction(space, r)
    equivalent_check(model, space, x, r, y=y)
    equivalent_check(model, space, x, r.delta.float(), y=y)
    for a, b in zip((x, y, r.delta, r.x_adv), saved):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), params))


@pytest.mark.parametrize("call", [
    lambda m, s, x, d: harmless_fraction(s, d[:, :, :3]),                  # wrong shape
    lambda m, s, x, d: harmless_fraction(s, d.numpy()),                    # not a tensor
    lambda m, s, x, d: harmless_fraction(s, d.long()),                     # not floating
    lambda m, s, x, d: harmless_fraction(s, d * float("nan")),             # not finite
    lambda m, s, x, d: harmless_fraction(m, d),                            # not a subspace
    lambda m, s, x, d: equivalent_check("model", s, x, d),                 # not a module
    lambda m, s, x, d: equivalent_check(m, s, x[:2], d),                   # batch sizes differ
    lambda m, s, x, d: equivalent_check(m, s, x[0], d),                    # x not a batch
    lambda m, s, x, d: equivalent_check(m, s, x, d, scales=()),            # no scales
    lambda m, s, x, d: equivalent_check(m, s, x, d, scales=(1, -1)),       # negative
    lambda m, s, x, d: equivalent_check(m, s, x, d, scales=(float("inf"),)),
    lambda m, s, x, d: equivalent_check(m, s, x, d, scales="10"),
    lambda m, s, x, d: equivalent_check(m, s, x, d, scales=(True,)),
    lambda m, s, x, d: equivalent_check(m, s, x, d, y=torch.zeros(4, dtype=torch.int32)),
    lambda m, s, x, d: equivalent_check(m, s, x, d, y=torch.zeros(3, dtype=torch.int64)),
    lambda m, s, x, d: equivalent_check(m, s, x, d, y=torch.full((4,), CLASSES)),
    lambda m, s, x, d: equivalent_check(m, s, x, d, y=torch.full((4,), -1)),
    lambda m, s, x, d: equivalent_check(m, s, x, d, bounds=(1, 0)),
    lambda m, s, x, d: equivalent_check(m, s, x, d, generator=0),
])
def test_bad_input_raises_input_error(model, space, call):
    x, d = rand((4, *SHAPE), 12), rand((4, *SHAPE), 13)
    with pytest.raises(InputError):
        call(model, space, x, d)


# -- the experiment, on an injected tiny model ------------------------------------------------------

def test_fig4_runs_on_an_injected_model(tmp_path):
    from harmless.experiments.fig4 import NOISE, Case, measure, run

    x = rand((24, *SHAPE), 14)
    m = tiny(seed=3)
    with torch.no_grad():
        y = m(x).argmax(dim=1)
    case = Case("tiny", m, x, y, list(range(24)), checksum=None, note="untrained")
    files = run(tmp_path, quick=True, cases=[case])
    assert [f.name for f in files] == ["fig4.md", "fig4.png"] and all(f.stat().st_size > 0 for f in files)
    text = files[0].read_text()
    assert "Prediction" in text and "PGD L2 1.5" in text and "harmless reproduce fig4 --quick" in text
    r = measure(case)
    noise = next(a for a in r.rows if a.name == NOISE)
    assert abs(float(np.nanmean(noise.rho)) - DIM / N) < 0.15  # 24 draws of Beta(5, 3): sd 0.033
    for a in r.rows:
        assert a.report.max_perp_diff < 1e-12
        assert max(a.report.max_harmless_diff) < 1e-9
        if a.rho_free is not None and a.name in ("PGD L2 1.5", "FGSM L2 1.5", "DeepFool"):
            assert float(np.nanmax(a.rho_free)) < 1e-20  # unboxed gradient steps: row space only


def tiny_cnn(seed: int = 0) -> nn.Module:
    """A patchify CNN in miniature: a 2x2 stride-2 conv with 2 channels tiles the 4x4 image into 4
    patches of 4 pixels, each mapped to 2 outputs: rank 8 of 16, harmless dim 8 (dim/n = 0.5, as
    for the zoo's patchcnn)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Conv2d(1, 2, 2, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(8, CLASSES))
    return m.double().eval()


def test_fig4_measures_a_patchify_cnn_and_its_smallest_equivalents():
    from harmless.experiments.fig4 import CW, NOISE, Case, measure

    x = rand((40, *SHAPE), 15)
    m = tiny_cnn(seed=4)
    with torch.no_grad():
        y = m(x).argmax(dim=1)
    r = measure(Case("tiny-cnn", m, x, y, list(range(40))), cw_images=8, shrink_images=12, linf_images=3)
    assert r.dim == 8 and r.n == N
    noise = next(a for a in r.rows if a.name == NOISE)
    assert abs(float(np.nanmean(noise.rho)) - 0.5) < 0.12  # 40 draws of Beta(4, 4): sd 0.026
    assert noise.shrink is None
    for a in r.rows:
        assert a.report.max_perp_diff < 1e-12 and max(a.report.max_harmless_diff) < 1e-9
        if a.rho_free is not None and a.name in ("PGD L2 1.5", "FGSM L2 1.5", "DeepFool"):
            # the gradient of a conv prefix is Wᵀg: in the row space of the block-diagonal W
            assert float(np.nanmax(a.rho_free)) < 1e-20
        if a.name == CW:
            assert len(a.rho) == 8 and a.rho_free is None
        for norm, sh in (a.shrink or {}).items():
            assert sh.images == min(12 if norm == "L2" else 3, len(a.rho))
            assert sh.kept == sh.successes == sh.ratio.size
            assert sh.successes == int((a.report.success[: sh.images] & torch.from_numpy(a.l2[: sh.images] > 0)).sum())
            # x + δ is feasible, so the nearest equivalent is never farther; certificates are tight
            assert np.all(sh.ratio <= 1.0 + 1e-12) and sh.output_diff < 1e-10 and sh.bound < 1e-3
    fgsm2 = next(a for a in r.rows if a.name == "FGSM L2 1.5")
    assert set(fgsm2.shrink or {}) == {"L2", "L∞"}
    assert set(next(a for a in r.rows if a.name == "PGD L∞ 0.1").shrink or {}) == {"L2"}


def test_fig4_report_with_an_mlp_and_a_cnn(tmp_path):
    from harmless.experiments.fig4 import Case, run

    x = rand((16, *SHAPE), 16)
    cases = []
    for name, m in (("tiny-mlp", tiny(seed=5)), ("tiny-cnn", tiny_cnn(seed=6))):
        with torch.no_grad():
            cases.append(Case(name, m, x, m(x).argmax(dim=1), list(range(16)), checksum=None, note="untrained"))
    md, png = run(tmp_path, quick=True, cases=cases)
    text = md.read_text()
    assert "## tiny-mlp" in text and "## tiny-cnn" in text and "dim 8 of n = 16" in text
    assert "(c) The smallest equivalent adversarial example" in text and "C&W L2" in text
    assert png.stat().st_size > 0
