"""Universal perturbations (harmless.attacks.universal) and the robustness-category rule, on tiny
models: exact UAP semantics on a linear classifier, the ball and the box, the stopping rule,
seeded determinism, the paper's sequential algorithm against a plain per-sample loop, batch
order, ρ and fooling(v) = fooling(v⊥), bad settings, untouched inputs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import harmless
from harmless.attacks import (
    DeepFool,
    PassRecord,
    SGDUniversal,
    UniversalPerturbation,
    UniversalResult,
    fooling_rate,
    harmless_fraction,
)
from harmless.attacks.gradient import _project
from harmless.errors import InputError, TrainingModeWarning
from harmless.experiments.robustness import Settings, category, critical_radius, measure_norm

SHAPE = (1, 4, 4)
N = 16
FREE = (-50.0, 50.0)  # bounds nothing reaches: x + v is never clipped


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny(seed: int = 0, dtype: torch.dtype = torch.float64, classes: int = 3) -> nn.Module:
    """A Linear–ReLU–Linear network whose first layer (6 × 16) has a 10-dimensional harmless subspace."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Flatten(), nn.Linear(N, 6), nn.ReLU(), nn.Linear(6, classes))
    return m.to(dtype).eval()


def images(count: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.rand((count,) + SHAPE, generator=gen(seed), dtype=dtype)


def linear_two_class() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """f(x) = W x + b with 2 classes and images all predicted class 0; w = W1 − W0. The best
    universal L2 perturbation of radius ξ is ξ w/‖w‖ (w·v ≤ ξ‖w‖ for every v in the ball), which
    fools exactly the images whose distance to the boundary is below ξ."""
    m = nn.Sequential(nn.Flatten(), nn.Linear(N, 2)).double().eval()
    with torch.no_grad():
        w = torch.randn(N, generator=gen(3), dtype=torch.float64)
        m[1].weight.copy_(torch.stack([torch.zeros(N, dtype=torch.float64), w]))
        m[1].bias.zero_()
    x = images(60, 4)
    margin = x.reshape(60, -1) @ w
    # Keep the images on the class-0 side (margin < 0), spread over distances 0.07 .. 3.02.
    dist = torch.linspace(0.07, 3.02, 60, dtype=torch.float64)  # no image exactly at a tested xi
    x = x - ((margin / w.norm() + dist) / w.norm())[:, None, None, None] * w.reshape(1, *SHAPE)
    with torch.no_grad():
        assert bool((m(x).argmax(dim=1) == 0).all())
    return m, x, w


# -- exact semantics on a linear classifier -----------------------------------------------------

@pytest.mark.parametrize("xi", [0.5, 1.0, 2.0])
def test_linear_two_class_uap_is_the_best_universal_perturbation(xi: float) -> None:
    m, x, w = linear_two_class()
    dist = -(x.reshape(len(x), -1) @ w) / w.norm()
    best = float((dist < xi).double().mean())
    for attack in (UniversalPerturbation(xi, 2, target_fooling=1.0, max_passes=2, bounds=FREE),
                   SGDUniversal(xi, 2, steps=60, batch_size=16, lr=xi / 5, clamp_loss=None, bounds=FREE)):
        r = attack(m, x, generator=gen(0))
        v = r.v.reshape(-1)
        cos = float(v @ w / (v.norm() * w.norm()))
        assert cos == pytest.approx(1.0, abs=1e-12), type(attack).__name__  # along the weight difference
        assert r.v_norm == pytest.approx(xi, rel=1e-12)  # on the sphere: as far as the ball allows
        assert r.fooling_rate == best, type(attack).__name__


def test_linear_fooling_rate_monotone_in_xi() -> None:
    m, x, _ = linear_two_class()
    rates = [UniversalPerturbation(xi, 2, target_fooling=1.0, max_passes=1, bounds=FREE)(m, x, generator=gen(0))
             .fooling_rate for xi in (0.1, 0.6, 1.5, 4.0)]
    assert rates == sorted(rates) and rates[0] < rates[-1] == 1.0


# -- the ball, the box, the definition -------------------------------------------------------------

@pytest.mark.parametrize("norm", ["inf", 2])
@pytest.mark.parametrize("which", ["uap", "sgd"])
def test_v_in_ball_and_fooling_is_prediction_change_in_the_box(norm: str | int, which: str) -> None:
    m = tiny()
    xc, xh = images(40, 1), images(30, 2)
    xi = 0.3 if norm == "inf" else 1.5
    attack = (UniversalPerturbation(xi, norm, max_passes=2) if which == "uap"
              else SGDUniversal(xi, norm, steps=20, batch_size=8))
    r = attack(m, xc, xh, generator=gen(0))
    assert isinstance(r, UniversalResult) and r.v.shape == (1,) + SHAPE and r.v.dtype == torch.float64
    assert r.v_norm <= xi * (1 + 1e-12)
    assert all(isinstance(p, PassRecord) for p in r.history) and r.passes == len(r.history) >= 1
    with torch.no_grad():
        for x, fooled, rate in ((xc, r.fooled, r.fooling_rate), (xh, r.holdout_fooled, r.holdout_fooling_rate)):
            # Per image, independently: the prediction at clip(x + v) differs from the clean one.
            expect = torch.stack([m((xi_[None] + r.v).clamp(0, 1)).argmax(1)[0] != m(xi_[None]).argmax(1)[0]
                                  for xi_ in x])
            assert torch.equal(fooled, expect)
            assert rate == float(expect.double().mean())
            assert fooling_rate(m, x, r.v) == rate
    assert r.history[-1].fooling_rate == r.fooling_rate


def test_stopping_rule_target_and_max_passes() -> None:
    m = tiny()
    x = images(50, 5)
    # Easy target: stops after the first pass that reaches it, and says so.
    r = UniversalPerturbation(0.5, "inf", target_fooling=0.05, max_passes=10)(m, x, generator=gen(0))
    rates = [p.fooling_rate for p in r.history]
    assert r.converged and rates[-1] >= 0.05 and all(q < 0.05 for q in rates[:-1])
    # Unreachable target: exactly max_passes passes, not converged.
    r = UniversalPerturbation(1e-4, 2, target_fooling=1.0, max_passes=2)(m, x[:20], generator=gen(0))
    assert r.passes == 2 and not r.converged and r.fooling_rate < 1.0
    # The SGD version runs its steps: ceil(50 / 16) = 4 per pass, 10 steps = 3 passes (4, 4, 2).
    r = SGDUniversal(0.1, steps=10, batch_size=16)(m, x, generator=gen(0))
    assert [p.updates for p in r.history] == [4, 4, 2] and not r.converged


# -- determinism, the paper's sequential loop, batch order ------------------------------------------

@pytest.mark.parametrize("which", ["uap", "uap-batched", "sgd"])
def test_seeded_determinism(which: str) -> None:
    m = tiny()
    x = images(40, 6)
    make = {"uap": lambda: UniversalPerturbation(0.3, "inf", max_passes=2),
            "uap-batched": lambda: UniversalPerturbation(0.3, "inf", max_passes=2, batch_size=8),
            "sgd": lambda: SGDUniversal(0.3, "inf", steps=15, batch_size=8)}[which]
    a, b = make()(m, x, generator=gen(7)), make()(m, x, generator=gen(7))
    assert torch.equal(a.v, b.v) and a.history == b.history
    c = make()(m, x, generator=gen(8))
    assert not torch.equal(a.v, c.v)  # the order matters for these algorithms, so another seed differs


def reference_uap(model: nn.Module, x: torch.Tensor, xi: float, norm: str | int, passes: int, target: float,
                  generator: torch.Generator) -> torch.Tensor:
    """Algorithm 1 of the UAP paper written as a plain loop, one image at a time."""
    df = DeepFool(steps=10, overshoot=0.02)
    with torch.no_grad():
        y0 = model(x).argmax(1)
    v = torch.zeros((1,) + tuple(x.shape[1:]), dtype=x.dtype)
    rate, done = 0.0, 0
    while rate < target and done < passes:
        for i in torch.randperm(len(x), generator=generator).tolist():
            z = (x[i:i + 1] + v).clamp(0, 1)
            with torch.no_grad():
                if int(model(z).argmax(1)[0]) != int(y0[i]):
                    continue
            r = df(model, z, y0[i:i + 1])
            if bool(r.success[0]):
                v = _project(v + r.delta, xi, norm)
        with torch.no_grad():
            rate = float((model((x + v).clamp(0, 1)).argmax(1) != y0).double().mean())
        done += 1
    return v


@pytest.mark.parametrize("norm", ["inf", 2])
def test_batch_size_one_is_the_papers_sequential_algorithm(norm: str | int) -> None:
    m = tiny()
    x = images(50, 9)
    xi = 0.25 if norm == "inf" else 1.0
    r = UniversalPerturbation(xi, norm, target_fooling=0.9, max_passes=2)(m, x, generator=gen(1))
    assert r.history[0].attacked > r.history[0].updates > 5  # many DeepFool steps, some skipped images
    assert torch.equal(r.v, reference_uap(m, x, xi, norm, 2, 0.9, gen(1)))


def test_deepfool_steps_in_a_batch_equal_steps_one_at_a_time() -> None:
    """What the mini-batch variant relies on: DeepFool on a batch is DeepFool on each image."""
    m = tiny()
    x = images(12, 10)
    y = m(x).argmax(1)
    together = DeepFool(steps=10)(m, x, y).delta
    alone = torch.cat([DeepFool(steps=10)(m, x[i:i + 1], y[i:i + 1]).delta for i in range(12)])
    assert torch.allclose(together, alone, atol=1e-12, rtol=0)


def test_sgd_full_batch_does_not_depend_on_the_order() -> None:
    """A batch's update is a mean over its images: with one batch of all images, the shuffle only
    permutes inside it, so every seed gives the same v (L2 steps, float64: to round-off)."""
    m = tiny()
    x = images(32, 11)
    vs = [SGDUniversal(1.0, 2, steps=12, batch_size=32)(m, x, generator=gen(s)).v for s in range(3)]
    for v in vs[1:]:
        assert torch.allclose(v, vs[0], atol=1e-12, rtol=0)


def test_fooling_rate_does_not_depend_on_the_order() -> None:
    m = tiny()
    x = images(50, 12)
    v = 0.3 * torch.randn((1,) + SHAPE, generator=gen(13), dtype=torch.float64)
    perm = torch.randperm(50, generator=gen(14))
    assert fooling_rate(m, x, v) == fooling_rate(m, x[perm], v) == fooling_rate(m, x, v[0])


# -- the harmless view -----------------------------------------------------------------------------------

def test_rho_and_fooling_of_v_equals_fooling_of_v_perp_without_clipping() -> None:
    m = tiny()
    space = harmless.harmless_subspace(m, SHAPE)
    assert space.dim == 10
    x = images(60, 15)
    # Sign steps (L∞) have a harmless part; DeepFool steps with no box are input gradients, which
    # lie in the row space of the first layer: ρ = 0 to round-off.
    sgd = SGDUniversal(0.4, "inf", steps=20, batch_size=16, bounds=FREE)(m, x, generator=gen(0))
    uap = UniversalPerturbation(1.0, 2, max_passes=2, bounds=FREE)(m, x, generator=gen(0))
    rho_sgd, rho_uap = float(harmless_fraction(space, sgd.v)[0]), float(harmless_fraction(space, uap.v)[0])
    assert 0.01 < rho_sgd < 1
    assert rho_uap < 1e-20
    for r in (sgd, uap):
        harmless_part, v_perp = space.decompose(r.v)
        assert torch.allclose(harmless_part + v_perp, r.v, atol=1e-14)
        with torch.no_grad():
            assert torch.allclose(m(x + v_perp), m(x + r.v), atol=1e-12, rtol=0)
            assert torch.equal(m(x + v_perp).argmax(1), m(x + r.v).argmax(1))
        assert fooling_rate(m, x, v_perp, bounds=None) == fooling_rate(m, x, r.v, bounds=None) == r.fooling_rate


# -- a UAP in the harmful subspace only -------------------------------------------------------------------

@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), norm=st.sampled_from(["inf", 2]), which=st.sampled_from(["uap", "sgd"]),
       clip=st.booleans())
def test_harmful_only_uap_stays_in_the_harmful_subspace_and_the_ball(seed: int, norm: str | int, which: str,
                                                                    clip: bool) -> None:
    """With ``subspace=``, every update is projected onto the row space of A and into the ball: v
    keeps no harmless part (ρ ≤ 1e-20) and its norm is ≤ ξ, whatever the model, data, seed and
    norm, and whether or not x + v is clipped (the box acts on x + v, not on v)."""
    m = tiny(seed % 7)
    space = harmless.harmless_subspace(m, SHAPE)
    x = images(30, seed)
    xi = 0.3 if norm == "inf" else 1.2
    bounds = (0.0, 1.0) if clip else FREE
    attack = (UniversalPerturbation(xi, norm, max_passes=2, bounds=bounds, subspace=space) if which == "uap"
              else SGDUniversal(xi, norm, steps=12, batch_size=8, bounds=bounds, subspace=space))
    r = attack(m, x, generator=gen(seed))
    assert r.harmful_only and r.v.dtype == torch.float64
    if float(r.v.norm()) == 0:  # DeepFool found no boundary inside the box for any image: nothing to check
        assert sum(p.updates for p in r.history) == 0
        return
    assert float(harmless_fraction(space, r.v)[0]) <= 1e-20
    assert r.v_norm <= xi * (1 + 1e-12)
    # Unclipped, a harmful-only v fools exactly as its harmful part does (it is its harmful part).
    assert fooling_rate(m, x, space.decompose(r.v)[1], bounds=None) == fooling_rate(m, x, r.v, bounds=None)


def test_harmful_only_uap_in_l2_is_the_projection_of_the_standard_update() -> None:
    """L2, one SGD step from v = 0 on one full batch: the harmful-only v is the standard step's
    harmful part, rescaled into the ball (projection onto subspace ∩ ball), to round-off."""
    m = tiny()
    space = harmless.harmless_subspace(m, SHAPE)
    x = images(16, 21)
    std = SGDUniversal(1.0, 2, steps=1, batch_size=16, lr=5.0, clamp_loss=None, bounds=FREE)(m, x, generator=gen(0))
    sub = SGDUniversal(1.0, 2, steps=1, batch_size=16, lr=5.0, clamp_loss=None, bounds=FREE, subspace=space)(
        m, x, generator=gen(0))
    # No box: the gradient is A^T(...), already harmful, so the two agree.
    assert torch.allclose(sub.v, std.v, atol=1e-12, rtol=0)
    # L∞ sign steps have a harmless part: the harmful-only v differs and is scaled, not clipped.
    std_inf = SGDUniversal(0.3, "inf", steps=1, batch_size=16, bounds=FREE)(m, x, generator=gen(0))
    sub_inf = SGDUniversal(0.3, "inf", steps=1, batch_size=16, bounds=FREE, subspace=space)(m, x, generator=gen(0))
    harmful = space.decompose(std_inf.v)[1]
    assert float(harmless_fraction(space, std_inf.v)[0]) > 0.01
    assert torch.allclose(sub_inf.v, harmful * min(1.0, 0.3 / float(harmful.abs().max())), atol=1e-14, rtol=0)


def test_harmful_only_uap_float32_and_bad_subspace() -> None:
    m = tiny(dtype=torch.float32)
    space = harmless.harmless_subspace(m, SHAPE)  # float64 subspace, float32 model and images
    r = SGDUniversal(0.3, "inf", steps=5, batch_size=8, subspace=space)(m, images(20, 22, torch.float32),
                                                                       generator=gen(0))
    assert r.v.dtype == torch.float32 and float(harmless_fraction(space, r.v.double())[0]) < 1e-10
    assert "subspace=<dim 10 of 16>" in repr(SGDUniversal(0.3, subspace=space))
    with pytest.raises(InputError, match="subspace must be"):
        SGDUniversal(0.3, subspace="P")  # type: ignore[arg-type]
    other = harmless.harmless_subspace(nn.Sequential(nn.Flatten(), nn.Linear(9, 2)).double(), (1, 3, 3))
    with pytest.raises(InputError, match="subspace is of inputs"):
        UniversalPerturbation(0.3, subspace=other)(m, images(5, 23, torch.float32))


# -- dtype, untouched inputs, eval mode ----------------------------------------------------------------

def test_float32_and_inputs_unmodified() -> None:
    m = tiny(dtype=torch.float32)
    xc, xh = images(30, 16, torch.float32), images(20, 17, torch.float32)
    xc0, xh0 = xc.clone(), xh.clone()
    params = [p.detach().clone() for p in m.parameters()]
    for attack in (UniversalPerturbation(0.3, "inf", max_passes=2, batch_size=4), SGDUniversal(0.3, steps=5)):
        r = attack(m, xc, xh, generator=gen(0))
        assert r.v.dtype == torch.float32 and r.v_norm <= 0.3 * (1 + 1e-6)
    assert torch.equal(xc, xc0) and torch.equal(xh, xh0)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), params))
    assert all(p.grad is None for p in m.parameters())


def test_training_mode_model_is_evaluated_in_eval_mode_and_restored() -> None:
    m = nn.Sequential(nn.Flatten(), nn.Linear(N, 6), nn.Dropout(0.5), nn.ReLU(), nn.Linear(6, 3)).double().train()
    x = images(20, 18)
    with pytest.warns(TrainingModeWarning):
        a = SGDUniversal(0.3, steps=4, batch_size=8)(m, x, generator=gen(0))
    assert m.training and all(mod.training for mod in m.modules())
    m.eval()
    b = SGDUniversal(0.3, steps=4, batch_size=8)(m, x, generator=gen(0))
    assert torch.equal(a.v, b.v)  # dropout was off


# -- bad input ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: UniversalPerturbation(0),
    lambda: UniversalPerturbation(-0.1),
    lambda: UniversalPerturbation(math.nan),
    lambda: UniversalPerturbation(True),
    lambda: UniversalPerturbation(0.1, norm=1),
    lambda: UniversalPerturbation(0.1, norm="l1"),
    lambda: UniversalPerturbation(0.1, target_fooling=0),
    lambda: UniversalPerturbation(0.1, target_fooling=1.5),
    lambda: UniversalPerturbation(0.1, max_passes=0),
    lambda: UniversalPerturbation(0.1, overshoot=-0.1),
    lambda: UniversalPerturbation(0.1, deepfool_steps=0),
    lambda: UniversalPerturbation(0.1, batch_size=0),
    lambda: UniversalPerturbation(0.1, candidates=1),
    lambda: UniversalPerturbation(0.1, bounds=(1, 0)),
    lambda: SGDUniversal(0.1, steps=0),
    lambda: SGDUniversal(0.1, batch_size=2.5),
    lambda: SGDUniversal(0.1, lr=0),
    lambda: SGDUniversal(0.1, clamp_loss=-1),
    lambda: SGDUniversal(0.1, norm=3),
])
def test_bad_settings_raise_in_the_constructor(make) -> None:
    with pytest.raises(InputError):
        make()


def test_bad_data_raise_in_the_call() -> None:
    m = tiny()
    x = images(10, 19)
    uap = SGDUniversal(0.1, steps=2)
    with pytest.raises(InputError, match="bounds"):
        uap(m, x + 2)
    with pytest.raises(InputError, match="float32"):
        uap(m, x.float())
    with pytest.raises(InputError, match="x_holdout"):
        uap(m, x, images(3, 20)[:, :, :2])
    with pytest.raises(InputError, match="generator"):
        uap(m, x, generator=0)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="empty"):
        uap(m, x[:0])
    with pytest.raises(InputError):
        uap("model", x)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="one perturbation"):
        fooling_rate(m, x, torch.zeros((2,) + SHAPE, dtype=torch.float64))


# -- the category rule (harmless.experiments.robustness) ------------------------------------------------

def test_category_rule_and_critical_radius() -> None:
    assert category(r2=0.0, r3=0.0, r4=0.0) == 1
    assert category(r2=0.9, r3=0.1, r4=0.0) == 2
    assert category(r2=1.0, r3=0.6, r4=0.1) == 3
    assert category(r2=1.0, r3=1.0, r4=0.95) == 4
    assert category(r2=0.49, r3=0.0, r4=0.0, tau=0.5) == 1 and category(r2=0.5, r3=0.0, r4=0.0, tau=0.5) == 2
    assert critical_radius([1, 2, 3], [0.0, 0.4, 0.8], 0.6) == (2.5, "2 – 3")
    assert critical_radius([1, 2, 3], [0.7, 0.8, 0.9], 0.5) == (1.0, "≤ 1")
    assert critical_radius([1, 2, 3], [0.0, 0.1, 0.2], 0.5) == (None, "> 3")
    assert critical_radius([1, 2], [1.0, 0.0], 0.5, falling=True) == (1.5, "1 – 2")


# -- the category rule on models built to be in a category, through the measuring code -------------------

class Constant(nn.Module):
    """Always class 0, whatever the input (the input still enters the graph, with zero gradient)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = 0 * x.reshape(x.shape[0], -1).sum(dim=1, keepdim=True)
        return z + torch.tensor([1.0, 0.0, 0.0], dtype=x.dtype)


class Ripple(nn.Module):
    """logits_c = sin(K w_c·x): 10 classes whose regions are slabs of width ~π/(K‖w_c‖), far
    narrower than any ε tested, so a random perturbation of norm ε lands in an unrelated class."""

    def __init__(self, k: float = 2000.0) -> None:
        super().__init__()
        self.k = k
        self.register_buffer("w", torch.randn(N, 10, generator=gen(30), dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.k * (x.reshape(x.shape[0], -1) @ self.w.to(x.dtype)))


QUICK = Settings(eval_images=40, craft_images=30, draws=5, uap_passes=1, sgd_steps=6, sgd_batch=10, pgd_steps=5,
                 deepfool_steps=5)


@pytest.mark.parametrize("norm", ["inf", 2])
def test_measured_categories_of_a_constant_and_of_a_ripple_classifier(norm: str | int) -> None:
    """Placed by measure_norm itself (random draws, UAPs, PGD, DeepFool), not by the rule alone:
    a constant classifier is in category 1 at every ε (nothing changes its prediction, and it
    keeps its accuracy), a classifier with tiny regions in category 4 at every ε."""
    x = images(70, 31)
    grid = (0.05, 0.2) if norm == "inf" else (0.2, 1.0)
    y = torch.zeros(40, dtype=torch.long)
    res = measure_norm(Constant().double().eval(), x[:40], y, x[40:], norm, grid, QUICK, log=lambda _: None)
    for row in res.rows:
        assert (row.random_flip, row.uap_rate, row.per_sample) == (0.0, 0.0, 0.0)
        assert row.survive == 1.0 and row.category == 1
    res = measure_norm(Ripple().double().eval(), x[:40], y, x[40:], norm, grid, QUICK, log=lambda _: None)
    for row in res.rows:
        assert row.random_flip >= 0.8 and row.category == 4


def test_measure_norm_bad_input() -> None:
    m, x, y = tiny(), images(20, 32), torch.zeros(10, dtype=torch.long)
    for grid, words in (((), "non-empty"), ((0.1, 0.0), "positive"), ((-0.1,), "positive"), ((0.2, 0.1), "increasing"),
                        ("0.1", "non-empty")):
        with pytest.raises(InputError, match=words):
            measure_norm(m, x[:10], y, x[10:], "inf", grid, QUICK)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="bounds"):
        measure_norm(m, x[:10] * 3, y, x[10:], "inf", (0.1,), QUICK)
    with pytest.raises(InputError, match="x_craft"):
        measure_norm(m, x[:10], y, x[10:] - 1, "inf", (0.1,), QUICK)
    with pytest.raises(InputError):
        measure_norm(m, x[:10], y[:5], x[10:], "inf", (0.1,), QUICK)
    with pytest.raises(InputError, match="norm"):
        measure_norm(m, x[:10], y, x[10:], 1, (0.1,), QUICK)
