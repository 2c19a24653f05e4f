"""harmless.attacks.SmallestEquivalent: the image nearest x among those the model cannot tell
from x_adv, checked against Clarabel (an independent interior-point QP solver) and a SciPy
null-space closed form, plus the invariants: shrink ≤ 1, the same float64 logits and labels,
the bounds, inputs untouched, bad input refused; and the L∞ version (an LP) against a dense
HiGHS LP in another formulation and method, over random configurations."""

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import harmless
from harmless.attacks import FGSM, PGD, DeepFool, LPCertificate, SmallestEquivalent, SmallestEquivalentResult
from harmless.errors import InputError


def _linear_model(seed: int = 0, n: int = 30, m: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n, m), nn.ReLU(), nn.Linear(m, 3)).double().eval()


def _conv_model(seed: int = 0) -> nn.Module:
    # 1x8x8 -> 4x3x3 = 36 outputs of 64 inputs: a 28-dim harmless subspace at least
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(36, 5)).eval()


def _images(shape: tuple[int, ...], b: int, seed: int, zero_frac: float = 0.5,
            dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Images with many pixels exactly 0 and a few at 1 (MNIST-like: the box binds)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, *shape, generator=g, dtype=torch.float64)
    x[torch.rand(b, *shape, generator=g) < zero_frac] = 0.0
    x[torch.rand(b, *shape, generator=g) < 0.05] = 1.0
    return x.to(dtype)


def _labels(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1)


def _clarabel_nearest(a: np.ndarray, x_adv: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, float]:
    """Clarabel on  min 1/2||y - x||^2  s.t.  a (y - x_adv) = 0,  0 <= y <= 1."""
    import clarabel
    from scipy import sparse

    m, n = a.shape
    eye = sparse.identity(n, format="csc")
    cons = sparse.vstack([sparse.csc_matrix(a), -eye, eye]).tocsc()
    rhs = np.concatenate([a @ x_adv, np.zeros(n), np.ones(n)])
    settings = clarabel.DefaultSettings()
    settings.verbose = False
    settings.tol_gap_abs = settings.tol_gap_rel = settings.tol_feas = 1e-12
    sol = clarabel.DefaultSolver(eye, -x, cons, rhs, [clarabel.ZeroConeT(m), clarabel.NonnegativeConeT(2 * n)],
                                 settings).solve()
    assert str(sol.status) in ("Solved", "AlmostSolved"), sol.status
    y = np.asarray(sol.x)
    return y, 0.5 * ((y - x) ** 2).sum()


def _stem_matrix(model: nn.Module, shape: tuple[int, ...]) -> np.ndarray:
    """The first layer's linear part written out from basis vectors (independent of the engine)."""
    n = int(np.prod(shape))
    eye = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    first = model[0].double() if model[0].weight.dtype != torch.float64 else model[0]
    with torch.no_grad():
        cols = first(eye) - first(torch.zeros(1, *shape, dtype=torch.float64))
    return cols.reshape(n, -1).T.numpy()


def _attacked(m: int, attack: str, seed: int):
    """A 30 -> m linear model, its subspace, 6 images and an attack's result on them."""
    model = _linear_model(n=30, m=m)
    space = harmless.harmless_subspace(model, (30,))
    x = _images((30,), 6, seed=seed)
    atk = {"pgd2": PGD(eps=1.0, steps=10, norm=2, random_start=False), "fgsm": FGSM(0.2),
           "deepfool": DeepFool()}[attack]
    return model, space, x, atk(model, x, _labels(model, x))


@pytest.mark.parametrize(("m", "attack"), [(10, "pgd2"), (22, "pgd2"), (10, "fgsm"), (22, "deepfool")])
def test_matches_clarabel_on_small_problems(m, attack):
    # m=10: rank < dim, m=22: rank > dim (the solver's two kinds of linear systems)
    model, space, x, r = _attacked(m, attack, seed=1)
    s = SmallestEquivalent()(model, space, r, x)
    assert isinstance(s, SmallestEquivalentResult)
    a = model[0].weight.detach().numpy()
    for k in range(x.shape[0]):
        ref, ref_fun = _clarabel_nearest(a, r.x_adv[k].numpy(), x[k].numpy())
        ours = s.x_small[k].numpy()
        # within the certified distance of the oracle's optimum, and no worse than it
        assert np.linalg.norm(ours - ref) <= float(s.distance_bound[k]) + 1e-6
        assert 0.5 * ((ours - x[k].numpy()) ** 2).sum() <= ref_fun + 1e-8
    # The certificate, not the KKT flag, is the guarantee: on degenerate samples (pixels on the
    # box, a tiny harmless part) the flag can stay False with a gap of 0 (measured: 3 of 6 at m=22).
    assert float(s.distance_bound.max()) <= 1e-4


def test_closed_form_when_the_box_does_not_bind():
    # Images inside [0.3, 0.7] and a small δ: x + δ⊥ stays in the box, so it is the answer
    # (the nearest point of x + δ + N(A) to x, unconstrained); δ⊥ from SciPy's null space.
    model = _linear_model(seed=2, n=30, m=12)
    space = harmless.harmless_subspace(model, (30,))
    g = torch.Generator().manual_seed(3)
    x = 0.3 + 0.4 * torch.rand(5, 30, generator=g, dtype=torch.float64)
    delta = 0.05 * torch.randn(5, 30, generator=g, dtype=torch.float64)
    x_adv = x + delta
    null = scipy.linalg.null_space(model[0].weight.detach().numpy())
    perp = delta.numpy() - (delta.numpy() @ null) @ null.T
    s = SmallestEquivalent()(model, space, x_adv, x)
    assert np.abs(s.delta_small.numpy() - perp).max() <= 1e-7
    expected = np.linalg.norm(perp, axis=1) / np.linalg.norm(delta.numpy(), axis=1)
    assert np.allclose(s.shrink_l2.numpy(), expected, atol=1e-7)
    assert s.success is None and s.success_small is None and s.success_kept is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_invariants_on_a_conv_model(dtype):
    model = _conv_model().to(dtype)
    space = harmless.harmless_subspace(model, (1, 8, 8))
    assert space.dim >= 28
    x = _images((1, 8, 8), 12, seed=4, dtype=dtype)
    y = _labels(model, x)
    smallest = SmallestEquivalent()
    for atk in (FGSM(0.15), PGD(eps=0.15, steps=10, norm="inf"), PGD(eps=1.0, steps=10, norm=2), DeepFool()):
        r = atk(model, x, y, generator=torch.Generator().manual_seed(0))
        x0, xa0 = x.clone(), r.x_adv.clone()
        s = smallest(model, space, r, x)
        assert torch.equal(x, x0) and torch.equal(r.x_adv, xa0)  # inputs untouched
        assert s.x_small.dtype == torch.float64 and s.x_small.shape == x.shape
        assert float(s.x_small.min()) >= -1e-12 and float(s.x_small.max()) <= 1 + 1e-12
        # x_adv is feasible, so the optimum is no farther from x, and x_adv is kept where the
        # solver's point is not nearer: the shrink never exceeds 1
        moved = s.delta.flatten(1).norm(dim=1) > 0
        assert bool((s.shrink_l2[moved] <= 1).all())
        assert bool(s.shrink_l2[~moved].isnan().all())
        # the same float64 logits, so the same labels and the same success
        assert s.max_output_diff <= 1e-12
        assert float(s.harmful_residual.max()) <= 1e-13
        assert bool(s.label_kept.all())
        assert torch.equal(s.success, r.success) and torch.equal(s.success_small, r.success)
        assert torch.allclose(s.delta, (r.x_adv - x).double(), atol=0)


def test_a_clipped_row_space_step_is_already_the_smallest():
    # x_adv = clip(x + s), s = Aᵀλ: x_adv − x = s + c with c ≥ 0 where x_adv sits at 0 and c ≤ 0
    # where it sits at 1, which are the QP's optimality conditions at x_adv itself (DeepFool's
    # form): nothing can be removed, the shrink is 1 (measured on MLP-5: DeepFool's median 1.000).
    model = _linear_model(seed=16, n=30, m=10)
    space = harmless.harmless_subspace(model, (30,))
    x = _images((30,), 5, seed=17)
    lam = torch.randn(5, 10, generator=torch.Generator().manual_seed(18), dtype=torch.float64)
    x_adv = (x + 0.3 * lam @ model[0].weight.detach()).clamp(0, 1)
    assert float((x_adv - x - 0.3 * lam @ model[0].weight.detach()).abs().max()) > 0.05  # the box binds
    s = SmallestEquivalent()(model, space, x_adv, x)
    assert torch.allclose(s.shrink_l2, torch.ones(5, dtype=torch.float64), atol=1e-6)
    a = model[0].weight.detach().numpy()
    for k in range(5):
        ref, _ = _clarabel_nearest(a, x_adv[k].numpy(), x[k].numpy())
        assert np.abs(ref - x_adv[k].numpy()).max() <= 1e-6


def test_with_labels_and_a_tensor_x_adv():
    model = _linear_model(seed=5)
    space = harmless.harmless_subspace(model, (30,))
    x = _images((30,), 8, seed=6)
    y = _labels(model, x)
    r = PGD(eps=1.5, steps=20, norm=2)(model, x, y, generator=torch.Generator().manual_seed(1))
    s = SmallestEquivalent()(model, space, r.x_adv, x, y=y)
    assert torch.equal(s.success, r.success) and torch.equal(s.success_small, r.success)
    assert s.success_kept == 1.0
    assert 0 < float(s.shrink_l2.nanmedian()) < 1  # the box left a harmless part to remove


def test_batch_equals_per_sample():
    model = _linear_model(seed=7)
    space = harmless.harmless_subspace(model, (30,))
    x = _images((30,), 4, seed=8)
    r = FGSM(0.2)(model, x, _labels(model, x))
    smallest = SmallestEquivalent()
    s = smallest(model, space, r, x)
    single = torch.cat([smallest(model, space, r.x_adv[k:k + 1], x[k:k + 1]).x_small for k in range(4)])
    assert torch.allclose(s.x_small, single, atol=1e-7)


def test_zero_perturbation_is_left_alone():
    model = _linear_model(seed=9)
    space = harmless.harmless_subspace(model, (30,))
    x = _images((30,), 3, seed=10)
    s = SmallestEquivalent()(model, space, x, x)
    assert torch.equal(s.x_small, x)  # x_adv = x itself, not the solver's interior point
    assert bool(s.shrink_l2.isnan().all()) and bool(s.shrink_linf.isnan().all())


def test_other_bounds():
    # images in [-1, 1]: the same problem in other coordinates
    model = _linear_model(seed=11)
    space = harmless.harmless_subspace(model, (30,))
    x01 = _images((30,), 3, seed=12)
    r = FGSM(0.2)(model, x01, _labels(model, x01))
    s01 = SmallestEquivalent()(model, space, r, x01)
    shifted = nn.Sequential(_Shift(), *model).eval()  # f'(v) = f((v + 1) / 2): the same classifier on [-1, 1]
    space_m = harmless.harmless_subspace(shifted, (30,))
    sm = SmallestEquivalent(bounds=(-1.0, 1.0))(shifted, space_m, 2 * r.x_adv - 1, 2 * x01 - 1)
    assert float(sm.x_small.min()) >= -1 - 1e-12 and float(sm.x_small.max()) <= 1 + 1e-12
    assert torch.allclose(sm.x_small, 2 * s01.x_small - 1, atol=1e-6)
    assert sm.max_output_diff <= 1e-12


class _Shift(nn.Module):
    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return (v + 1) / 2


@pytest.mark.parametrize(("settings", "words"), [
    ({"bounds": (1.0, 0.0)}, "bounds"), ({"bounds": (0.0,)}, "bounds"), ({"tol": 0.0}, "tol"),
    ({"tol": float("nan")}, "tol"), ({"max_iter": 0}, "max_iter"), ({"max_iter": 2.5}, "max_iter"),
])
def test_bad_settings(settings, words):
    with pytest.raises(InputError, match=words):
        SmallestEquivalent(**settings)


def test_bad_data():
    model = _linear_model(seed=13)
    space = harmless.harmless_subspace(model, (30,))
    x = _images((30,), 3, seed=14)
    x_adv = x.clone()
    smallest = SmallestEquivalent()
    cases = [
        ((model, space, x_adv + 2.0, x), "x_adv must have values in"),
        ((model, space, x_adv, x - 1.0), "x must have values in"),
        ((model, space, x_adv[:, :20], x), "x_adv must have shape"),
        ((model, space, x_adv, x[:2]), "x has 2 samples but x_adv has 3"),
        ((model, space, x_adv.numpy().tolist(), x), "AttackResult or a tensor"),
        (("model", space, x_adv, x), "torch.nn.Module"),
        ((model, "space", x_adv, x), "HarmlessSubspace"),
        ((model, space, torch.full_like(x, float("nan")), x), "non-finite"),
        ((model, space, x_adv.long(), x), "floating-point"),
    ]
    for args, words in cases:
        with pytest.raises(InputError, match=words):
            smallest(*args)
    for y, words in [(torch.zeros(3), "int64"), (torch.zeros(2, dtype=torch.int64), "shape"),
                     (torch.tensor([0, -1, 0]), ">= 0"), (torch.tensor([0, 3, 0]), "< 3")]:
        with pytest.raises(InputError, match=words):
            smallest(model, space, x_adv, x, y=y)


def test_injective_model_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).double().eval()
    space = harmless.harmless_subspace(model, (5,))
    x = _images((5,), 2, seed=15)
    with pytest.raises(harmless.NoHarmlessSubspaceError):
        SmallestEquivalent()(model, space, x, x)


# ---------------------------------------------------------------------------------------------
# The L∞ smallest equivalent (an LP solved by HiGHS per image).


def _dense_lp_oracle(a: np.ndarray, x_adv: np.ndarray, x: np.ndarray) -> float:
    """min ‖y − x‖∞ s.t. a (y − x_adv) = 0, 0 ≤ y ≤ 1: another formulation (variables y and t,
    the prefix's own matrix ``a``, not an orthonormal row basis) and another HiGHS method (the
    dual simplex, where ours uses the interior-point method)."""
    from scipy.optimize import linprog

    m, n = a.shape
    eye, ones = np.eye(n), np.ones((n, 1))
    a_ub = np.block([[eye, -ones], [-eye, -ones]])
    b_ub = np.concatenate([x, -x])
    a_eq = np.hstack([a, np.zeros((m, 1))])
    cost = np.zeros(n + 1)
    cost[n] = 1.0
    res = linprog(cost, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=a @ x_adv, bounds=[(0, 1)] * n + [(0, None)],
                  method="highs-ds", options={"primal_feasibility_tolerance": 1e-10,
                                              "dual_feasibility_tolerance": 1e-10})
    assert res.status == 0, res.message
    return float(res.fun)


def _check_linf(s: SmallestEquivalentResult, a: np.ndarray, x_adv: torch.Tensor, x: torch.Tensor) -> None:
    """Feasible, harmless, and L∞-optimal against the dense oracle, within its certificate."""
    b = x.shape[0]
    assert s.norm == "inf"
    assert float(s.x_small.min()) >= -1e-12 and float(s.x_small.max()) <= 1 + 1e-12
    moved = (s.x_small.reshape(b, -1) - x_adv.double().reshape(b, -1)).numpy()
    assert np.abs(moved @ a.T).max() <= 1e-10  # A(x_small − x_adv) = 0: harmless
    assert s.max_output_diff <= 1e-10 and bool(s.label_kept.all())
    cert = s.certificate
    assert float(cert.box_violation.max()) <= 1e-12
    assert float(cert.gap.min()) >= -1e-12  # weak duality, up to round-off
    assert float(s.optimality_bound.max()) <= 1e-6
    for k in range(b):
        ref = _dense_lp_oracle(a, x_adv[k].double().flatten().numpy(), x[k].double().flatten().numpy())
        ours = float(s.linf_after[k])
        assert ref - 1e-7 <= ours <= ref + float(cert.optimality_bound[k]) + 1e-7, (k, ours, ref)
        assert float(cert.lower_bound[k]) <= ref + 1e-7  # the certificate is a true lower bound
        assert ours <= float(s.linf_before[k])  # never worse than x_adv itself


@pytest.mark.parametrize(("m", "attack"), [(10, "pgd2"), (22, "pgd2"), (10, "fgsm"), (22, "deepfool")])
def test_linf_matches_a_dense_lp(m, attack):
    model, space, x, r = _attacked(m, attack, seed=21)
    s = SmallestEquivalent(norm="inf")(model, space, r, x)
    _check_linf(s, model[0].weight.detach().numpy(), r.x_adv, x)
    assert torch.equal(s.success_small, r.success)


def test_linf_on_a_conv_model_float32_batch_and_inputs():
    model = _conv_model(seed=3)
    space = harmless.harmless_subspace(model, (1, 8, 8))
    x = _images((1, 8, 8), 5, seed=22, dtype=torch.float32)
    r = PGD(eps=1.0, steps=10, norm=2)(model, x, _labels(model, x), generator=torch.Generator().manual_seed(0))
    x0, xa0 = x.clone(), r.x_adv.clone()
    smallest = SmallestEquivalent(norm="inf")
    s = smallest(model, space, r, x)
    assert torch.equal(x, x0) and torch.equal(r.x_adv, xa0)  # inputs untouched
    assert s.x_small.dtype == torch.float64 and s.x_small.shape == x.shape
    _check_linf(s, _stem_matrix(model, (1, 8, 8)), r.x_adv, x)
    assert float(s.shrink_linf.nanmedian()) < 1  # an L2 attack's δ has L∞ to spare
    single = torch.cat([smallest(model, space, r.x_adv[k:k + 1], x[k:k + 1]).x_small for k in range(5)])
    # one LP per image; only the repair's round-off (its batched projections) may differ
    assert torch.allclose(s.x_small, single, atol=1e-9, rtol=0)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10**6), m=st.integers(3, 26), zero_frac=st.floats(0.0, 0.8), scale=st.floats(0.01, 1.0))
def test_linf_property_against_the_oracle(seed, m, zero_frac, scale):
    # Any x_adv in the box (not only attacks): a random move, clipped, from images with pixels at 0.
    model = _linear_model(seed=seed % 1000, n=30, m=m)
    space = harmless.harmless_subspace(model, (30,))
    x = _images((30,), 3, seed=seed, zero_frac=zero_frac)
    g = torch.Generator().manual_seed(seed + 1)
    x_adv = (x + scale * torch.randn(3, 30, generator=g, dtype=torch.float64)).clamp(0, 1)
    s = SmallestEquivalent(norm="inf")(model, space, x_adv, x)
    _check_linf(s, model[0].weight.detach().numpy(), x_adv, x)


def test_linf_of_an_unclipped_sign_step_is_already_minimal():
    # FGSM's δ = ε sign(g) with g = Aᵀv in the row space: every d with A d = A δ has
    # ε‖g‖₁ = g·δ = g·d ≤ ‖g‖₁‖d‖∞ (Hölder), so ‖d‖∞ ≥ ε: nothing can be removed in L∞ while the
    # box does not bind (images in [0.3, 0.7], ε = 0.1), whatever the L2 shrink.
    model = _linear_model(seed=23, n=30, m=10)
    space = harmless.harmless_subspace(model, (30,))
    x = 0.3 + 0.4 * torch.rand(4, 30, generator=torch.Generator().manual_seed(24), dtype=torch.float64)
    r = FGSM(0.1)(model, x, _labels(model, x))
    s = SmallestEquivalent(norm="inf")(model, space, r, x)
    assert torch.allclose(s.shrink_linf, torch.ones(4, dtype=torch.float64), atol=1e-9)
    assert float(SmallestEquivalent()(model, space, r, x).shrink_l2.max()) < 0.99  # L2 does shrink


def test_linf_zero_perturbation_and_other_bounds():
    model = _linear_model(seed=25)
    space = harmless.harmless_subspace(model, (30,))
    x = _images((30,), 3, seed=26)
    s = SmallestEquivalent(norm="inf")(model, space, x, x)
    assert torch.equal(s.x_small, x) and bool(s.shrink_linf.isnan().all())
    assert float(s.certificate.gap.abs().max()) == 0.0
    r = FGSM(0.2)(model, x, _labels(model, x))
    s01 = SmallestEquivalent(norm="inf")(model, space, r, x)
    shifted = nn.Sequential(_Shift(), *model).eval()  # the same classifier on [-1, 1]
    sm = SmallestEquivalent(norm="inf", bounds=(-1.0, 1.0))(shifted, harmless.harmless_subspace(shifted, (30,)),
                                                            2 * r.x_adv - 1, 2 * x - 1)
    assert torch.allclose(sm.linf_after, 2 * s01.linf_after, atol=1e-7)  # the same LP, scaled by 2
    assert sm.max_output_diff <= 1e-10


def test_norm_setting_and_certificates():
    assert SmallestEquivalent(norm="inf").norm == "inf" and SmallestEquivalent(norm=float("inf")).norm == "inf"
    assert SmallestEquivalent(norm="2").norm == 2 and SmallestEquivalent().norm == 2
    assert "norm='inf'" in repr(SmallestEquivalent(norm="inf"))
    for bad in (1, 3, "l1", None, "infinity"):
        with pytest.raises(InputError, match="norm must be 'inf' or 2"):
            SmallestEquivalent(norm=bad)
    for settings_, words in [({"tol": 1e-12}, "tol must be >= 1e-10"), ({"tol": -1.0}, "tol"),
                             ({"max_iter": 0}, "max_iter"), ({"bounds": (1.0, 0.0)}, "bounds")]:
        with pytest.raises(InputError, match=words):
            SmallestEquivalent(norm="inf", **settings_)
    model = _linear_model(seed=27)
    space = harmless.harmless_subspace(model, (30,))
    x = _images((30,), 2, seed=28)
    r = FGSM(0.2)(model, x, _labels(model, x))
    s_inf = SmallestEquivalent(norm="inf")(model, space, r, x)
    assert isinstance(s_inf.certificate, LPCertificate)
    with pytest.raises(InputError, match="no distance bound"):
        _ = s_inf.distance_bound  # an LP's optimum need not be unique
    s2 = SmallestEquivalent()(model, space, r, x)
    assert torch.equal(s2.optimality_bound, s2.distance_bound) and s2.norm == 2


def test_linf_polish_puts_the_active_set_on_the_box_and_keeps_the_equalities() -> None:
    """_polish: pixels within atol of a bound land exactly on it, and the equalities hold to
    round-off afterwards (so the repair needs no shrink, which on a patchify CNN had cost an
    L∞ gap of 3e-2)."""
    from harmless.attacks.smallest import _polish

    gen = np.random.default_rng(0)
    n, r = 40, 12
    row = np.linalg.qr(gen.standard_normal((n, r)))[0].T  # orthonormal rows
    x_adv = gen.uniform(0.3, 0.7, n)
    x_adv[:10] = 0.0  # pixels on the box, as MNIST's black ones
    # a harmless step that keeps those pixels at 0 (an LP optimum with them active)
    free_null = scipy.linalg.null_space(row[:, 10:])
    h = np.zeros(n)
    h[10:] = free_null @ gen.standard_normal(free_null.shape[1])
    z = x_adv + 0.2 * h / np.abs(h).max()
    z[:10] = gen.uniform(-1e-9, 1e-9, 10)  # a solver's point: off the box by its tolerance
    z[10:] += 1e-10 * gen.standard_normal(n - 10)
    out = _polish(row, x_adv, z, 0.0, 1.0)
    assert np.all(out[:10][np.abs(z[:10]) <= 1e-7] == 0.0)
    assert np.abs(row @ (out - x_adv)).max() < 1e-14
    assert out.min() >= 0.0 and out.max() <= 1.0
