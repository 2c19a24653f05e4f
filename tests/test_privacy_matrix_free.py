"""The matrix-free privacy projection (harmless.privacy.matrix_free) against the dense
interior-point solver on small overlapping convolutions: same projection to the certified
distance, a certificate that is a true bound, exact feasibility, honest convergence flags."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import harmless
import harmless.privacy
from harmless.errors import TooLargeError
from harmless.privacy import AffineBoxProjector, DecoyPrivatizer, PrivacyProblem, box_violation, problem, solver
from harmless.privacy.matrix_free import MatrixFreeProblem, project
from harmless.threads import one_torch_thread

# (in channels, size, out channels, kernel, stride, padding): overlapping windows, zero padding;
# the last has corner windows that read fewer pixels than they have channels (A A^T singular)
CONFIGS = [(2, 12, 4, 3, 2, 1), (3, 10, 6, 4, 3, 1), (1, 13, 3, 5, 2, 2), (2, 11, 12, 4, 3, 2)]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():  # these problems are tiny: more threads only contend
        yield


def _space(cfg: tuple[int, ...], seed: int) -> harmless.HarmlessSubspace:
    c_in, size, c_out, k, s, p = cfg
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(c_in, c_out, k, stride=s, padding=p, bias=False),
                          nn.BatchNorm2d(c_out)).double().eval()
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2.0)
    return harmless.harmless_subspace(model, (c_in, size, size))


def _data(space: harmless.HarmlessSubspace, b: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    n = space.ambient_dim
    a = torch.rand(b, n, generator=gen, dtype=torch.float64)
    a[:, : n // 8] = 0.0  # pixels on the box's boundary, as in real images
    t = torch.rand(b, n, generator=gen, dtype=torch.float64) * 1.4 - 0.2
    return a, t


@pytest.mark.parametrize("index", [1, 3, pytest.param(0, marks=pytest.mark.slow),
                                   pytest.param(2, marks=pytest.mark.slow)])
def test_matches_the_dense_solver_within_the_certificates(index: int) -> None:
    space = _space(CONFIGS[index], index)
    dense = PrivacyProblem(space)
    mf = MatrixFreeProblem(space)
    a, t = _data(space, 2, index)
    a0, t0 = a.clone(), t.clone()
    y, info = project(mf, a, t, bounds=(0.0, 1.0), tol=1e-10, max_iter=150)
    yd, infod = solver.project(dense, a, t, bounds=(0.0, 1.0), tol=1e-12, max_iter=100)
    assert torch.equal(a, a0) and torch.equal(t, t0)  # inputs untouched
    # feasible: in the box without clipping, harmless to the projector's residual
    assert float(box_violation(y).max()) <= 1e-12
    assert float((dense.apply(y - a).norm(dim=1) / (dense.norm * a.norm(dim=1))).max()) < 1e-12
    # the same projection, to the certified distances
    dist = (y - yd).norm(dim=1)
    assert bool((dist <= info.distance_bound + infod.distance_bound + 1e-7).all()), (dist, info.distance_bound)
    # the certificate is a true lower bound: the dual value is below the dense optimum's value
    primal = 0.5 * ((y - t) ** 2).sum(1)
    dense_primal = 0.5 * ((yd - t) ** 2).sum(1)
    lower = primal - info.gap
    assert bool((lower <= dense_primal + 1e-9 * dense_primal.clamp_min(1.0)).all())
    assert bool((info.gap >= -1e-9 * primal.clamp_min(1.0)).all())
    assert info.operator_passes is not None and info.operator_passes > 0
    # where it says converged, it is close to the dense answer
    assert bool((dist[info.converged] <= 1e-3).all())


def test_singular_gram_is_handled() -> None:
    """A A^T singular (corner windows with more channels than pixels): the block pseudo-inverse
    keeps the projector's iteration in its range and the projection is exact."""
    space = _space(CONFIGS[3], 3)
    assert space.known_dim is not None and space.known_dim > space.ambient_dim - space.output_dim
    mf = MatrixFreeProblem(space)
    gen = torch.Generator().manual_seed(5)
    d = torch.randn(3, space.ambient_dim, generator=gen, dtype=torch.float64)
    harm = mf.harmful(d)
    dense = PrivacyProblem(space)
    assert torch.allclose(harm, dense.harmful(d), atol=1e-10)


def test_batch_equals_per_sample() -> None:
    space = _space(CONFIGS[1], 1)
    mf = MatrixFreeProblem(space)
    a, t = _data(space, 3, 7)
    y, info = project(mf, a, t, bounds=(0.0, 1.0), tol=1e-10, max_iter=200)
    for i in range(3):
        yi, infoi = project(mf, a[i:i + 1], t[i:i + 1], bounds=(0.0, 1.0), tol=1e-10, max_iter=200)
        assert torch.allclose(yi[0], y[i], atol=1e-12)
        assert math.isclose(float(infoi.gap[0]), float(info.gap[i]), rel_tol=1e-6, abs_tol=1e-14)


def test_max_iter_1_is_not_converged_but_feasible_and_certified() -> None:
    space = _space(CONFIGS[0], 0)
    mf = MatrixFreeProblem(space)
    dense = PrivacyProblem(space)
    a, t = _data(space, 2, 3)
    y, info = project(mf, a, t, bounds=(0.0, 1.0), tol=1e-12, max_iter=1)
    assert not bool(info.converged.any())
    assert info.iterations <= 1
    assert float(box_violation(y).max()) <= 1e-12
    yd, _ = solver.project(dense, a, t, bounds=(0.0, 1.0), tol=1e-12, max_iter=100)
    dist = (y - yd).norm(dim=1)
    assert bool((dist <= info.distance_bound + 1e-6).all())


def test_other_bounds() -> None:
    space = _space(CONFIGS[1], 1)
    mf = MatrixFreeProblem(space)
    dense = PrivacyProblem(space)
    a, t = _data(space, 1, 2)
    lo, hi = -1.0, 3.0
    y, info = project(mf, lo + (hi - lo) * a, lo + (hi - lo) * t, bounds=(lo, hi), tol=1e-10, max_iter=500)
    yd, infod = solver.project(dense, lo + (hi - lo) * a, lo + (hi - lo) * t, bounds=(lo, hi), tol=1e-12,
                               max_iter=100)
    assert float(box_violation(y, (lo, hi)).max()) <= 1e-12 * (hi - lo)
    assert float((y - yd).norm()) <= float(info.distance_bound[0] + infod.distance_bound[0]) + 1e-6


def test_privatizers_fall_back_to_the_matrix_free_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the dense data do not fit (TooLargeError), the decoy privatiser and the projector
    solve matrix-free; the paper's method, which needs a dense basis, still says it is too large."""
    space = _space(CONFIGS[1], 1)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, *space.input_shape, generator=gen, dtype=torch.float64)
    dense_result = DecoyPrivatizer(decoy="grey")(space, x)

    def too_large(*_: object) -> None:
        raise TooLargeError("too large for the test")

    monkeypatch.setattr(problem.PrivacyProblem, "__init__", too_large)
    result = DecoyPrivatizer(decoy="grey", max_iter=500, tol=1e-10, progress=False)(space, x)
    assert result.projection.operator_passes is not None
    assert float(result.box_violation.max()) <= 1e-12
    assert float((result.output_deviation / x.flatten(1).norm(dim=1)).max()) < 1e-12
    dist = (result.x_hat - dense_result.x_hat).flatten(1).norm(dim=1)
    assert bool((dist <= result.projection.distance_bound + dense_result.projection.distance_bound + 1e-7).all())
    r = AffineBoxProjector(max_iter=50, progress=False)(space, x, torch.full_like(x, 0.5))
    assert float(box_violation(r.y.flatten(1)).max()) <= 1e-12
    with pytest.raises(TooLargeError):
        harmless.privacy.PaperPrivatizer(steps=2)(space, x)
