import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize
from torch import nn

import harmless
from harmless.errors import InputError
from harmless.privacy import AffineBoxProjector, DecoyPrivatizer, PaperPrivatizer, Quantizer
from harmless.privacy.audit import BoxAttack, MinNormAttack, TVAttack, TVLPAttack


def project_affine_box(space, anchor, target, **settings):
    p = AffineBoxProjector(**settings)(space, anchor, target)
    return p.y, p.info


def _tiny(seed=0, n=30, m=10):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(n, m), nn.ReLU(), nn.Linear(m, 3)).double().eval()
    return model, harmless.harmless_subspace(model, (n,))


def _x(b=4, n=30, seed=1):
    return torch.rand(b, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.8 + 0.1


@pytest.mark.parametrize(("decoy", "m"), [("grey", 10), ("noise", 10), ("shift", 10), ("grey", 22), ("noise", 22)])
def test_decoy_feasible_harmless_and_optimal(decoy, m):
    # m=10: rank < dim (row-space solves); m=22: rank > dim (null-space solves); pixels at the bound
    model, space = _tiny(m=m)
    x = _x()
    x[:, :3] = 0.0
    x[:, 3] = 1.0
    x0 = x.clone()
    r = DecoyPrivatizer(decoy=decoy)(space, x)
    assert torch.equal(x, x0)  # input not modified
    assert float(r.x_hat.min()) >= -1e-12 and float(r.x_hat.max()) <= 1 + 1e-12
    assert float(r.harmful_residual.max()) <= 1e-12
    with torch.no_grad():
        out, out_hat = model(x), model(r.x_hat)
    assert float(((out_hat - out).abs() / out.abs().clamp_min(1e-300)).max()) < 1e-10
    assert torch.equal(out.argmax(1), out_hat.argmax(1))  # delta accuracy exactly 0
    a = model[0].weight.detach().numpy()
    t = r.decoy.numpy()
    for k in range(x.shape[0]):
        xk, tk = x[k].numpy(), t[k]
        ref = minimize(lambda y: 0.5 * ((y - tk) ** 2).sum(), xk, jac=lambda y: y - tk, method="SLSQP",
                       constraints=[{"type": "eq", "fun": lambda y: a @ (y - xk), "jac": lambda y: a}],
                       bounds=[(0, 1)] * xk.size, options={"ftol": 1e-15, "maxiter": 2000})
        ours = 0.5 * ((r.x_hat[k].numpy() - tk) ** 2).sum()
        assert ours <= ref.fun + 1e-9
        assert np.abs(r.x_hat[k].numpy() - ref.x).max() < 1e-5
    assert float(r.projection.rel_gap.abs().max()) < 1e-8


def test_paper_algorithm_feasible_and_harmless():
    model, space = _tiny()
    x = _x()
    r = PaperPrivatizer(steps=100)(space, x, generator=torch.Generator().manual_seed(0))
    assert float(r.box_violation.max()) <= 1e-12
    assert float(r.harmful_residual.max()) <= 1e-12
    assert float(r.mse.min()) > 1e-3  # it does move the image
    with torch.no_grad():
        assert torch.allclose(model(r.x_hat), model(x), rtol=1e-10, atol=1e-12)


def test_projection_of_feasible_point_is_itself():
    _, space = _tiny()
    x = _x()
    y, info = project_affine_box(space, x, x)
    assert torch.allclose(y, x, atol=1e-12)


def test_quantize_improves_deviation():
    _, space = _tiny()
    x = _x()
    r = DecoyPrivatizer()(space, x)
    q = Quantizer()(space, r.x_hat, x)
    assert (q.improved_deviation <= q.naive_deviation + 1e-15).all()
    assert torch.allclose(q.improved * 255, torch.round(q.improved * 255), atol=1e-9)
    assert float(q.improved.min()) >= 0 and float(q.improved.max()) <= 1


def test_bad_input():
    _, space = _tiny()
    privatize = DecoyPrivatizer()
    with pytest.raises(InputError, match="shape"):
        privatize(space, torch.rand(2, 31, dtype=torch.float64))
    bad = _x()
    bad[0, 0] = float("inf")
    with pytest.raises(InputError, match="non-finite"):
        privatize(space, bad)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        privatize(space, _x() + 1.0)
    with pytest.raises(InputError, match=r"\[-1, 1\]"):
        DecoyPrivatizer(bounds=(-1, 1))(space, _x() - 2.0)
    with pytest.raises(InputError, match="generator"):
        privatize(space, _x(), generator=0)
    with pytest.raises(InputError, match="HarmlessSubspace"):
        privatize("space", _x())
    img = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5)).double().eval()
    sp = harmless.harmless_subspace(img, (3, 4, 4))
    with pytest.raises(InputError, match="grayscale"):
        privatize(sp, torch.rand(2, 1, 4, 4, dtype=torch.float64))


BAD_SETTINGS = [
    (DecoyPrivatizer, {"tol": 0.0}, "tol"),
    (DecoyPrivatizer, {"max_iter": 0}, "max_iter"),
    (DecoyPrivatizer, {"decoy": "banana"}, "unknown decoy"),
    (DecoyPrivatizer, {"decoy": torch.tensor([float("nan")])}, "decoy"),
    (DecoyPrivatizer, {"bounds": (1.0, 0.0)}, "bounds"),
    (PaperPrivatizer, {"tol": float("nan")}, "tol"),
    (PaperPrivatizer, {"max_iter": 2.5}, "max_iter"),
    (PaperPrivatizer, {"steps": 0}, "steps"),
    (PaperPrivatizer, {"lr": -1.0}, "lr"),
    (PaperPrivatizer, {"penalty": 0}, "penalty"),
    (PaperPrivatizer, {"init_scale": float("inf")}, "init_scale"),
    (PaperPrivatizer, {"bounds": (0.0, float("inf"))}, "bounds"),
    (AffineBoxProjector, {"max_iter": -1}, "max_iter"),
    (AffineBoxProjector, {"tol": "1e-12"}, "tol"),
    (AffineBoxProjector, {"bounds": (0.5, 0.5)}, "bounds"),
    (Quantizer, {"max_flips": 0}, "max_flips"),
    (Quantizer, {"bounds": 1.0}, "bounds"),
    (MinNormAttack, {"bounds": (0, 1, 2)}, "bounds"),
    (BoxAttack, {"max_iter": 0}, "max_iter"),
    (BoxAttack, {"tol": -1e-12}, "tol"),
    (TVAttack, {"steps": 0}, "steps"),
    (TVAttack, {"lr": -1.0}, "lr"),
    (TVAttack, {"penalty": 0}, "penalty"),
    (TVAttack, {"max_iter": True}, "max_iter"),
    (TVAttack, {"bounds": (True, 1)}, "bounds"),
    (TVLPAttack, {"progress": "yes"}, "progress"),
    (TVLPAttack, {"bounds": ("0", "1")}, "bounds"),
]


@pytest.mark.parametrize(("cls", "settings", "match"), BAD_SETTINGS,
                         ids=[f"{c.__name__}-{next(iter(s))}" for c, s, _ in BAD_SETTINGS])
def test_bad_settings_are_refused_by_the_constructor(cls, settings, match):
    """Every setting is checked once, when the object is made: one InputError per bad setting."""
    with pytest.raises(InputError, match=match):
        cls(**settings)


def test_settings_accept_numpy_scalars_and_show_in_the_repr():
    privatize = PaperPrivatizer(steps=np.int64(5), lr=np.float32(0.1), bounds=(np.float64(-1), 1))
    assert privatize.steps == 5 and isinstance(privatize.steps, int) and privatize.bounds == (-1.0, 1.0)
    assert "steps=5" in repr(privatize) and "bounds=(-1.0, 1.0)" in repr(privatize)


def test_audit_attacks_stay_in_the_indistinguishable_set():
    model, space = _tiny()
    x = _x()
    r = DecoyPrivatizer()(space, x)
    min_norm = MinNormAttack()
    mn = min_norm(space, r.x_hat).x_rec
    ref = min_norm(space, x).x_rec  # the harmful part of x is public: (I-P) x_hat == (I-P) x
    assert torch.allclose(mn, ref, atol=1e-12)
    box = BoxAttack()(space, r.x_hat)
    rec = box.x_rec
    assert box.attack == "box" and box.projection is not None and bool(box.projection.converged.all())
    assert float(box.box_violation.max()) <= 1e-12 and float(box.output_deviation.max()) <= 1e-12
    assert float(rec.min()) >= -1e-12 and float(rec.max()) <= 1 + 1e-12
    with torch.no_grad():
        assert torch.allclose(model(rec), model(x), rtol=1e-10, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(8, 40), frac=st.floats(0.2, 0.95), pinned=st.floats(0.0, 0.8), seed=st.integers(0, 10_000))
def test_projection_matches_generic_solver_on_degenerate_boxes(n, frac, pinned, seed):
    """MNIST-like anchors (many pixels exactly at 0 or 1) make the QP degenerate; the result must
    still be feasible, harmless, at least as good as SciPy's SLSQP, and within its own certified
    distance bound of SLSQP's answer."""
    m = max(1, int(frac * n))
    gen = torch.Generator().manual_seed(seed)
    model, space = _tiny(seed=seed, n=n, m=m)
    x = torch.rand(1, n, generator=gen, dtype=torch.float64)
    k = int(pinned * n)
    x[0, :k] = (torch.rand(k, generator=gen, dtype=torch.float64) > 0.8).double()
    t = torch.rand(1, n, generator=gen, dtype=torch.float64) * 1.4 - 0.2
    y, info = project_affine_box(space, x, t)
    assert float(y.min()) >= -1e-12 and float(y.max()) <= 1 + 1e-12
    a_np = model[0].weight.detach().numpy()
    # output change relative to the input's scale (y == x up to rounding is fine too)
    deviation = np.linalg.norm(a_np @ (y[0] - x[0]).numpy())
    assert deviation <= 1e-12 * np.linalg.norm(a_np, 2) * max(1.0, float(x.norm()))
    a = model[0].weight.detach().numpy()
    xk, tk = x[0].numpy(), t[0].numpy()
    ref = minimize(lambda v: 0.5 * ((v - tk) ** 2).sum(), xk, jac=lambda v: v - tk, method="SLSQP",
                   constraints=[{"type": "eq", "fun": lambda v: a @ (v - xk), "jac": lambda v: a}],
                   bounds=[(0, 1)] * n, options={"ftol": 1e-15, "maxiter": 3000})
    ours = 0.5 * ((y[0].numpy() - tk) ** 2).sum()
    ref_feasible = np.abs(a @ (ref.x - xk)).max() < 1e-8 and ref.x.min() > -1e-9 and ref.x.max() < 1 + 1e-9
    if ref_feasible:
        assert float(ours - ref.fun) <= float(info.gap[0]) + 1e-8  # the gap bounds the suboptimality
        if bool(info.converged[0]):
            assert ours <= ref.fun + 1e-8
        assert np.abs(y[0].numpy() - ref.x).max() <= float(info.distance_bound[0]) + 1e-4
    assert float(info.gap[0]) >= -1e-9


def _mnist_like(b, n, seed, zero_frac=0.75):
    """Anchors with most pixels exactly 0 (MNIST's background) and a few at 1: degenerate QPs."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(b, n, generator=gen, dtype=torch.float64)
    x[torch.rand(b, n, generator=gen) < zero_frac] = 0.0
    x[torch.rand(b, n, generator=gen) < 0.05] = 1.0
    return x


@pytest.mark.parametrize("m", [100, 200])  # rank < dim (row-space systems), rank > dim (null-space systems)
def test_degenerate_problems_converge_with_a_tight_certificate(m):
    """The dual Newton method this replaced met its tolerance on 6-26 % of MNIST images; the
    interior-point method must converge on every degenerate problem, its certificate bounding
    the distance to SciPy's answer (at m=200 the old method left one of these unconverged and its
    repair shrank the harmless part to 4 %)."""
    n = 300
    model, space = _tiny(seed=3, n=n, m=m)
    x = _mnist_like(6, n, seed=4, zero_frac=0.8)
    t = torch.full_like(x, 0.5)
    y, info = project_affine_box(space, x, t)
    assert bool(info.converged.all())
    assert float(info.distance_bound.max()) < 1e-4
    assert float(info.shrink.min()) == 1.0  # the repair had nothing to undo
    assert float(y.min()) >= -1e-12 and float(y.max()) <= 1 + 1e-12
    a = model[0].weight.detach().numpy()
    assert np.abs(a @ (y - x).numpy().T).max() <= 1e-12 * np.linalg.norm(a, 2) * float(x.norm(dim=1).max())
    for k in range(x.shape[0]):
        ref, ref_fun = _clarabel_projection(a, x[k].numpy(), t[k].numpy())
        assert 0.5 * ((y[k].numpy() - t[k].numpy()) ** 2).sum() <= ref_fun + 1e-8
        assert np.linalg.norm(y[k].numpy() - ref) <= float(info.distance_bound[k]) + 1e-6


def _clarabel_projection(a, x, t):
    """An independent oracle: Clarabel's interior-point conic solver (SLSQP hits its iteration
    limit at n = 300) on  min 1/2||y - t||^2  s.t.  a (y - x) = 0,  0 <= y <= 1."""
    import clarabel
    from scipy import sparse

    m, n = a.shape
    eye = sparse.identity(n, format="csc")
    cons = sparse.vstack([sparse.csc_matrix(a), -eye, eye]).tocsc()
    rhs = np.concatenate([a @ x, np.zeros(n), np.ones(n)])
    settings = clarabel.DefaultSettings()
    settings.verbose = False
    settings.tol_gap_abs = settings.tol_gap_rel = settings.tol_feas = 1e-12
    sol = clarabel.DefaultSolver(eye, -t, cons, rhs, [clarabel.ZeroConeT(m), clarabel.NonnegativeConeT(2 * n)],
                                 settings).solve()
    assert str(sol.status) in ("Solved", "AlmostSolved"), sol.status
    y = np.asarray(sol.x)
    return y, 0.5 * ((y - t) ** 2).sum()


def test_projection_batch_equals_per_sample_and_chunks(monkeypatch):
    import harmless.privacy.solver as solver

    _, space = _tiny(seed=5, n=40, m=15)
    x = _mnist_like(5, 40, seed=6, zero_frac=0.5)
    t = torch.rand(5, 40, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 1.6 - 0.3
    x0, t0 = x.clone(), t.clone()
    y, _ = project_affine_box(space, x, t)
    assert torch.equal(x, x0) and torch.equal(t, t0)
    single = torch.cat([project_affine_box(space, x[k:k + 1], t[k:k + 1])[0] for k in range(5)])
    assert torch.allclose(y, single, atol=1e-7)
    monkeypatch.setattr(solver, "_CHUNK_BYTES", 8 * 15 * 40 * 2)  # two images per chunk
    chunked, _ = project_affine_box(space, x, t)
    assert torch.allclose(y, chunked, atol=1e-7)
    again, _ = project_affine_box(space, x, t)
    assert torch.equal(chunked, again)  # deterministic


def _anisotropic_tv(img):
    return float((img[..., 1:, :] - img[..., :-1, :]).abs().sum() + (img[..., :, 1:] - img[..., :, :-1]).abs().sum())


def test_tv_lp_attack_is_the_exact_minimum_and_stays_in_the_set():
    from scipy.optimize import linprog

    from harmless.privacy.audit import _differences

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 6 * 6, 30), nn.ReLU(), nn.Linear(30, 3)).double().eval()
    space = harmless.harmless_subspace(model, (2, 6, 6))
    x = torch.rand(3, 2, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x[:, :, :2] = 0.0
    grey, noisy = DecoyPrivatizer(decoy="grey")(space, x), DecoyPrivatizer(decoy="noise")(space, x)
    x0 = grey.x_hat.clone()
    attack = TVLPAttack()
    rec = attack(space, grey.x_hat).x_rec
    assert torch.equal(grey.x_hat, x0)  # input not modified
    assert float(rec.min()) >= -1e-12 and float(rec.max()) <= 1 + 1e-12
    with torch.no_grad():
        assert torch.allclose(model(rec), model(x), rtol=1e-10, atol=1e-12)
    other = attack(space, noisy.x_hat).x_rec  # the set, hence the attack, does not depend on x_hat
    a = model[1].weight.detach().numpy()
    diff = _differences((2, 6, 6)).toarray()
    n, p = 72, diff.shape[0]
    for k in range(3):
        tv = _anisotropic_tv(rec[k])
        assert tv <= _anisotropic_tv(grey.x_hat[k]) + 1e-9 and tv <= _anisotropic_tv(x[k]) + 1e-9
        assert abs(tv - _anisotropic_tv(other[k])) <= 1e-7 * max(1.0, tv)
        # the oracle: the same LP by another algorithm (dual simplex), written out densely here
        xk = x[k].reshape(-1).numpy()
        ub = np.block([[diff, -np.eye(p)], [-diff, -np.eye(p)]])
        ref = linprog(np.r_[np.zeros(n), np.ones(p)], A_ub=ub, b_ub=np.zeros(2 * p),
                      A_eq=np.c_[a, np.zeros((a.shape[0], p))], b_eq=a @ xk,
                      bounds=[(0, 1)] * n + [(0, None)] * p, method="highs-ds")
        assert ref.status == 0
        assert abs(tv - ref.fun) <= 1e-7 * max(1.0, ref.fun)


def test_tv_lp_attack_needs_images():
    _, space = _tiny()
    for attack in (TVLPAttack(), TVAttack()):
        with pytest.raises(InputError, match="image inputs"):
            attack(space, _x())


# ---------------------------------------------------------------------------------------------
# Pixel bounds other than [0, 1]: images normalised to [-1, 1].


def _image_model(seed=0, shape=(2, 6, 6), m=30):
    torch.manual_seed(seed)
    n = int(np.prod(shape))
    model = nn.Sequential(nn.Flatten(), nn.Linear(n, m), nn.ReLU(), nn.Linear(m, 3)).double().eval()
    return model, harmless.harmless_subspace(model, shape)


def _in_bounds(y, lo, hi):
    return float(y.min()) >= lo - 1e-12 * (hi - lo) and float(y.max()) <= hi + 1e-12 * (hi - lo)


def _same_output(model, a, b):
    with torch.no_grad():
        return torch.allclose(model(a), model(b), rtol=1e-10, atol=1e-12)


def test_privatisers_keep_images_in_bounds_other_than_0_1():
    """Images in [-1, 1] with pixels on both bounds: every result stays in [-1, 1] and harmless,
    leaves [0, 1] (so the bounds are really used), and equals the [0, 1] answer mapped affinely
    (the feasible sets and objectives correspond under v -> 2v - 1)."""
    model, space = _image_model()
    u = torch.rand(3, 2, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    u[:, :, :2] = 0.0
    u[:, :, -1] = 1.0
    x = 2 * u - 1  # in [-1, 1], a band at -1 and one at +1
    bounds = (-1.0, 1.0)
    decoy = DecoyPrivatizer(decoy="grey", bounds=bounds)(space, x)
    paper = PaperPrivatizer(steps=60, bounds=bounds)(space, x)
    for r in (decoy, paper):
        assert r.bounds == bounds
        assert _in_bounds(r.x_hat, -1.0, 1.0) and float(r.box_violation.max()) <= 2e-12
        assert float(r.harmful_residual.max()) <= 1e-12 and _same_output(model, r.x_hat, x)
        assert float(r.x_hat.min()) < -1e-3  # below 0: not clamped to [0, 1]
        assert float(r.mse.min()) > 1e-3  # it does move the images
        assert bool(r.projection.converged.all()) and float(r.projection.distance_bound.max()) < 1e-4
    assert torch.equal(decoy.decoy, torch.zeros_like(x))  # grey is the middle of the bounds
    unit = DecoyPrivatizer(decoy="grey")(space, u)
    assert torch.allclose(decoy.x_hat, 2 * unit.x_hat - 1, atol=1e-6)
    # the certificate is in the caller's units: distances double, gaps (squared distances) quadruple
    assert torch.allclose(decoy.projection.distance_bound, 2 * unit.projection.distance_bound, rtol=1e-3, atol=1e-9)
    # 8-bit rounding: 256 levels from -1 to 1
    q = Quantizer(bounds=bounds)(space, decoy.x_hat, x)
    levels = (q.improved + 1) / 2 * 255
    assert torch.allclose(levels, torch.round(levels), atol=1e-9) and _in_bounds(q.improved, -1.0, 1.0)
    assert (q.improved_deviation <= q.naive_deviation + 1e-15).all()
    with pytest.raises(InputError, match=r"\[0, 1\]"):  # the default bounds refuse these images
        DecoyPrivatizer()(space, x)


def test_attacks_and_audit_with_bounds_other_than_0_1():
    model, space = _image_model(seed=2, shape=(1, 8, 8))  # SSIM needs 7x7 at least
    u = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    u[:, :, :2] = 0.0
    x = 2 * u - 1
    bounds = (-1.0, 1.0)
    x_hat = DecoyPrivatizer(decoy="noise", bounds=bounds)(space, x).x_hat
    for attack in (BoxAttack(bounds=bounds), TVAttack(steps=30, bounds=bounds), TVLPAttack(bounds=bounds)):
        rec = attack(space, x_hat)
        assert _in_bounds(rec.x_rec, -1.0, 1.0), attack
        assert float(rec.output_deviation.max()) <= 1e-11 and _same_output(model, rec.x_rec, x), attack
    # the exact TV attack in [-1, 1] is the one in [0, 1], mapped (TV scales by 2)
    unit = TVLPAttack()(space, (x_hat + 1) / 2).x_rec
    assert _anisotropic_tv(TVLPAttack(bounds=bounds)(space, x_hat).x_rec) == pytest.approx(
        2 * _anisotropic_tv(unit), rel=1e-6)
    from harmless.privacy.audit import Audit

    result = Audit(lpips=False, bounds=bounds)(space, x, x_hat)
    assert set(result.scores) == {"released", "min_norm", "box", "tv", "tv_lp"}
    assert set(result.reconstructions) == {"min_norm", "box", "tv", "tv_lp"}
    for score in result.scores.values():
        assert -1.0 <= score.ssim <= 1.0 and score.lpips is None
    with pytest.raises(InputError, match="bounds"):
        Audit([BoxAttack()], bounds=bounds)


def test_audit_needs_images():
    from harmless.privacy.audit import Audit

    _, space = _tiny()
    x = _x()
    with pytest.raises(InputError, match="images"):
        Audit(lpips=False)(space, x, DecoyPrivatizer()(space, x).x_hat)
    with pytest.raises(InputError, match="name"):
        Audit([BoxAttack(), BoxAttack(max_iter=5)])
    with pytest.raises(InputError, match="AuditAttack"):
        Audit([DecoyPrivatizer()])


# ---------------------------------------------------------------------------------------------
# The dense data: made once per subspace and object, or shared through a PrivacyProblem.


def _count_dense(monkeypatch, space):
    calls = []
    original = space.operator.to_dense

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(space.operator, "to_dense", counting)
    return calls


def test_a_privatiser_reuses_its_dense_data_across_calls(monkeypatch):
    _, space = _tiny(seed=4)
    calls = _count_dense(monkeypatch, space)
    privatize = DecoyPrivatizer()
    first = privatize(space, _x(seed=2))
    made = len(calls)
    assert made >= 1
    again = privatize(space, _x(seed=2))
    privatize(space, _x(b=3, seed=5))
    assert len(calls) == made  # no second dense matrix, no second factorisation
    assert torch.equal(first.x_hat, again.x_hat)
    # another subspace gets its own data; the first one's are still there
    _, other = _tiny(seed=6)
    privatize(other, _x())
    privatize(space, _x())
    assert len(calls) == made


def test_a_privacy_problem_is_shared_between_objects(monkeypatch):
    from harmless.privacy import PrivacyProblem

    model, space = _image_model(seed=5)
    problem = PrivacyProblem(space)
    calls = _count_dense(monkeypatch, space)
    x = torch.rand(2, 2, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    r = DecoyPrivatizer()(problem, x)
    rec = BoxAttack()(problem, r.x_hat)
    q = Quantizer()(problem, r.x_hat, x)
    PaperPrivatizer(steps=5)(problem, x)
    assert calls == []  # everything came from the problem made before
    assert _same_output(model, rec.x_rec, x) and q.flips.shape == (2,)
    assert torch.equal(r.x_hat, DecoyPrivatizer()(space, x).x_hat)  # the same answer as from the subspace


def test_the_cache_does_not_keep_a_subspace_alive():
    import gc
    import weakref

    privatize = DecoyPrivatizer()
    _, space = _tiny(seed=7)
    privatize(space, _x())
    ref = weakref.ref(space)
    del space
    gc.collect()
    assert ref() is None
