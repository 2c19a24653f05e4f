import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
from scipy.optimize import minimize
from torch import nn

import harmless
from harmless.errors import InputError
from harmless.privacy import privatize_decoy, privatize_paper, project_affine_box, quantize_harmless
from harmless.privacy.audit import box_attack, tv_attack


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
    r = privatize_decoy(space, x, decoy)
    assert torch.equal(x, x0)  # input not modified
    assert float(r.x_hat.min()) >= -1e-12 and float(r.x_hat.max()) <= 1 + 1e-12
    assert float(r.harmful_residual.max()) <= 1e-12
    with torch.no_grad():
        out, out_hat = model(x), model(r.x_hat)
    assert float(((out_hat - out).abs() / out.abs().clamp_min(1e-300)).max()) < 1e-10
    assert torch.equal(out.argmax(1), out_hat.argmax(1))  # delta accuracy exactly 0
    a = model[0].weight.detach().numpy()
    t = r.info["decoy"].numpy()
    for k in range(x.shape[0]):
        xk, tk = x[k].numpy(), t[k]
        ref = minimize(lambda y: 0.5 * ((y - tk) ** 2).sum(), xk, jac=lambda y: y - tk, method="SLSQP",
                       constraints=[{"type": "eq", "fun": lambda y: a @ (y - xk), "jac": lambda y: a}],
                       bounds=[(0, 1)] * xk.size, options={"ftol": 1e-15, "maxiter": 2000})
        ours = 0.5 * ((r.x_hat[k].numpy() - tk) ** 2).sum()
        assert ours <= ref.fun + 1e-9
        assert np.abs(r.x_hat[k].numpy() - ref.x).max() < 1e-5
    assert float(r.info["projection"].rel_gap.abs().max()) < 1e-8


def test_paper_algorithm_feasible_and_harmless():
    model, space = _tiny()
    x = _x()
    r = privatize_paper(space, x, steps=100, generator=torch.Generator().manual_seed(0))
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
    r = privatize_decoy(space, x, "grey")
    q = quantize_harmless(space, r.x_hat, x)
    assert (q.improved_deviation <= q.naive_deviation + 1e-15).all()
    assert torch.allclose(q.improved * 255, torch.round(q.improved * 255), atol=1e-9)
    assert float(q.improved.min()) >= 0 and float(q.improved.max()) <= 1


def test_bad_input():
    _, space = _tiny()
    with pytest.raises(InputError, match="shape"):
        privatize_decoy(space, torch.rand(2, 31, dtype=torch.float64))
    bad = _x()
    bad[0, 0] = float("inf")
    with pytest.raises(InputError, match="non-finite"):
        privatize_decoy(space, bad)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        privatize_decoy(space, _x() + 1.0)
    with pytest.raises(InputError, match="unknown decoy"):
        privatize_decoy(space, _x(), "banana")
    img = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5)).double().eval()
    sp = harmless.harmless_subspace(img, (3, 4, 4))
    with pytest.raises(InputError, match="grayscale"):
        privatize_decoy(sp, torch.rand(2, 1, 4, 4, dtype=torch.float64))


@pytest.mark.parametrize(("call", "match"), [
    (lambda s, x: privatize_decoy(s, x, tol=0.0), "tol"),
    (lambda s, x: privatize_decoy(s, x, max_iter=0), "max_iter"),
    (lambda s, x: privatize_paper(s, x, tol=float("nan")), "tol"),
    (lambda s, x: privatize_paper(s, x, max_iter=2.5), "max_iter"),
    (lambda s, x: project_affine_box(s, x, x, max_iter=-1), "max_iter"),
    (lambda s, x: box_attack(s, x, max_iter=0), "max_iter"),
    (lambda s, x: tv_attack(s, x, steps=0), "steps"),
    (lambda s, x: tv_attack(s, x, lr=-1.0), "lr"),
    (lambda s, x: tv_attack(s, x, penalty=0), "penalty"),
    (lambda s, x: tv_attack(s, x, max_iter=True), "max_iter"),
])
def test_bad_solver_settings(call, match):
    """Every public entry point checks the settings it passes to the solver."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 5), nn.ReLU(), nn.Linear(5, 2)).double().eval()
    space = harmless.harmless_subspace(model, (1, 4, 4))
    x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.raises(InputError, match=match):
        call(space, x)


def test_audit_attacks_stay_in_the_indistinguishable_set():
    from harmless.privacy.audit import min_norm_attack

    model, space = _tiny()
    x = _x()
    r = privatize_decoy(space, x, "grey")
    mn = min_norm_attack(space, r.x_hat)
    ref = min_norm_attack(space, x)  # the harmful part of x is public: (I-P) x_hat == (I-P) x
    assert torch.allclose(mn, ref, atol=1e-12)
    rec = box_attack(space, r.x_hat)
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
    import harmless.privacy.core as core

    _, space = _tiny(seed=5, n=40, m=15)
    x = _mnist_like(5, 40, seed=6, zero_frac=0.5)
    t = torch.rand(5, 40, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 1.6 - 0.3
    x0, t0 = x.clone(), t.clone()
    y, _ = project_affine_box(space, x, t)
    assert torch.equal(x, x0) and torch.equal(t, t0)
    single = torch.cat([project_affine_box(space, x[k:k + 1], t[k:k + 1])[0] for k in range(5)])
    assert torch.allclose(y, single, atol=1e-7)
    monkeypatch.setattr(core, "_CHUNK_BYTES", 8 * 15 * 40 * 2)  # two images per chunk
    chunked, _ = project_affine_box(space, x, t)
    assert torch.allclose(y, chunked, atol=1e-7)
    again, _ = project_affine_box(space, x, t)
    assert torch.equal(chunked, again)  # deterministic


def _anisotropic_tv(img):
    return float((img[..., 1:, :] - img[..., :-1, :]).abs().sum() + (img[..., :, 1:] - img[..., :, :-1]).abs().sum())


def test_tv_lp_attack_is_the_exact_minimum_and_stays_in_the_set():
    from scipy.optimize import linprog

    from harmless.privacy.audit import _differences, tv_lp_attack

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 6 * 6, 30), nn.ReLU(), nn.Linear(30, 3)).double().eval()
    space = harmless.harmless_subspace(model, (2, 6, 6))
    x = torch.rand(3, 2, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x[:, :, :2] = 0.0
    grey, noisy = privatize_decoy(space, x, "grey"), privatize_decoy(space, x, "noise")
    x0 = grey.x_hat.clone()
    rec = tv_lp_attack(space, grey.x_hat)
    assert torch.equal(grey.x_hat, x0)  # input not modified
    assert float(rec.min()) >= -1e-12 and float(rec.max()) <= 1 + 1e-12
    with torch.no_grad():
        assert torch.allclose(model(rec), model(x), rtol=1e-10, atol=1e-12)
    other = tv_lp_attack(space, noisy.x_hat)  # the set, hence the attack, does not depend on x_hat
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
    from harmless.privacy.audit import tv_lp_attack

    _, space = _tiny()
    with pytest.raises(InputError, match="image inputs"):
        tv_lp_attack(space, _x())
