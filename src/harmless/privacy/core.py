"""Privacy protection with harmless perturbations (Chen et al., AAAI 2025, Algorithm 1).

A sensitive image ``x`` is replaced by ``x_hat = x + delta`` with ``delta`` in the harmless
subspace ``N(A)`` of the model's linear prefix ``A``: the model's output on ``x_hat`` equals
its output on ``x`` exactly, while ``x_hat`` should look unlike ``x``.

Everything here works in float64 with a dense factorisation of ``A`` (inputs of a few
thousand pixels: MNIST, CIFAR-10). The feasible set of a privatised image is

    C(x) = {x + U c} ∩ [0, 1]^n,   U an orthonormal basis of N(A),

an affine subspace intersected with the pixel box. :func:`project_affine_box` computes the
Euclidean projection of a target onto ``C(x)`` (a strictly convex QP) by a primal-dual
interior-point method, batched over images, and always returns a point that is feasible up to
float64 rounding (alternating projections, then a shrink towards ``x``; never clipping). The
duality gap of that point is its certificate: ``sqrt(2 gap)`` bounds its distance to the exact
projection.
"""

from __future__ import annotations

import dataclasses
import math
import numpy as np
import torch

from harmless.errors import InputError, NoHarmlessSubspaceError
from harmless.linalg.subspace import HarmlessSubspace

__all__ = [
    "Projector", "ProjectionInfo", "Result", "projector", "project_affine_box", "privatize_paper",
    "privatize_decoy", "make_decoy", "quantize_harmless", "QuantizeResult", "box_violation",
]


# ---------------------------------------------------------------------------------------------
# The dense factorisation of the linear prefix.


class Projector:
    """Dense orthonormal bases of ``N(A)`` (``null``, ``(d, n)``) and of its complement, the row
    space (``row``, ``(r, n)``), plus ``A`` itself (``(m, n)``), all float64 on the CPU.

    ``harmful(v)`` = ``(I - P) v`` and ``harmless(v)`` = ``P v`` for flat batches ``(B, n)``;
    whichever basis is smaller is used.
    """

    def __init__(self, space: HarmlessSubspace) -> None:
        if not isinstance(space, HarmlessSubspace):
            raise InputError(f"space must be a HarmlessSubspace, got {type(space).__name__}")
        self.space = space
        self.input_shape: tuple[int, ...] = tuple(space.input_shape)
        self.n = int(space.ambient_dim)
        dense = space.operator.to_dense()
        a = torch.as_tensor(dense).detach().to(dtype=torch.float64, device="cpu").reshape(-1, self.n)
        self.matrix = a
        rank = int(space.rank)
        if rank >= self.n:
            if space.dim_is_lower_bound:
                raise NoHarmlessSubspaceError(
                    f"no harmless subspace found (rank {rank} of {self.n} inputs), but the linear run stopped early "
                    "(see space.run), so this does not show that the model is injective: nothing can be hidden "
                    "with what the analysis found")
            raise NoHarmlessSubspaceError(
                f"the linear prefix is injective (rank {rank} of {self.n} inputs): nothing can be hidden")
        fact = space.factorization  # the subspace's own dense SVD, when it made one: reuse it
        if fact is not None and fact.row_basis is not None and fact.null_basis is not None \
                and fact.row_basis.shape[0] == rank:
            self.row = torch.as_tensor(fact.row_basis, dtype=torch.float64).reshape(rank, self.n).contiguous()
            self.null = torch.as_tensor(fact.null_basis, dtype=torch.float64).reshape(-1, self.n).contiguous()
            sv = torch.as_tensor(fact.singular_values, dtype=torch.float64)
        else:
            _, sv, vt = torch.linalg.svd(a, full_matrices=True)
            self.row = vt[:rank].contiguous()
            self.null = vt[rank:].contiguous()
        self.rank = rank
        self.dim = self.n - rank
        self.norm = float(sv[0]) if sv.numel() else 0.0  # ||A||_2 from the SVD at hand, not a second one

    def harmful(self, v: torch.Tensor) -> torch.Tensor:
        """``(I - P) v`` for ``v`` of shape ``(B, n)``."""
        if self.rank <= self.dim:
            return (v @ self.row.T) @ self.row
        return v - (v @ self.null.T) @ self.null

    def harmless(self, v: torch.Tensor) -> torch.Tensor:
        """``P v`` for ``v`` of shape ``(B, n)``."""
        if self.dim <= self.rank:
            return (v @ self.null.T) @ self.null
        return v - (v @ self.row.T) @ self.row

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """``A v`` for ``v`` of shape ``(B, n)`` (the output change of the linear prefix)."""
        return v @ self.matrix.T


_PROJECTORS: dict[int, tuple[HarmlessSubspace, Projector]] = {}


def projector(space: HarmlessSubspace | Projector) -> Projector:
    """The (cached per subspace object) :class:`Projector` of ``space``."""
    if isinstance(space, Projector):
        return space
    hit = _PROJECTORS.get(id(space))
    if hit is not None and hit[0] is space:
        return hit[1]
    proj = Projector(space)
    if len(_PROJECTORS) > 8:
        _PROJECTORS.clear()
    _PROJECTORS[id(space)] = (space, proj)
    return proj


# ---------------------------------------------------------------------------------------------
# Validation.

#: How far outside [0, 1] a pixel may be (round-off of the exact projections).
_EPS_BOX = 1e-12


def _images(proj: Projector, x: object, what: str = "x", *, box: bool = True) -> torch.Tensor:
    """A validated float64 copy of a batch ``(B, *input_shape)`` (a single image is accepted)."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.asarray(x))
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise InputError(f"{what} must be a floating-point tensor in [0, 1], got {x.dtype}")
    shape = proj.input_shape
    if tuple(x.shape) == shape:
        x = x.unsqueeze(0)
    if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape:
        hint = ""
        if len(shape) == 3 and x.ndim == 4 and tuple(x.shape[2:]) == shape[1:] and x.shape[1] != shape[0]:
            kinds = {1: "grayscale", 3: "RGB"}
            hint = (f" ({kinds.get(int(x.shape[1]), f'{x.shape[1]}-channel')} images for a model that takes "
                    f"{kinds.get(shape[0], f'{shape[0]}-channel')} input)")
        raise InputError(f"{what} must have shape (B, {', '.join(map(str, shape))}), got {tuple(x.shape)}{hint}")
    if x.shape[0] == 0:
        raise InputError(f"{what} is an empty batch")
    if not bool(torch.isfinite(x).all()):
        raise InputError(f"{what} contains non-finite values (nan or inf)")
    out = x.detach().to(dtype=torch.float64, device="cpu").clone()
    if box and (float(out.min()) < -_EPS_BOX or float(out.max()) > 1.0 + _EPS_BOX):
        raise InputError(f"{what} must have values in [0, 1] (got range [{float(out.min()):.4g}, "
                         f"{float(out.max()):.4g}])")
    return out


def box_violation(y: torch.Tensor) -> torch.Tensor:
    """Per sample ``max(0, -y, y - 1)`` over pixels."""
    flat = y.reshape(y.shape[0], -1)
    return torch.clamp(torch.maximum(-flat, flat - 1.0), min=0.0).amax(dim=1)


# ---------------------------------------------------------------------------------------------
# Projection onto {anchor + N(A)} ∩ [0, 1]^n.


@dataclasses.dataclass
class ProjectionInfo:
    """Per-sample diagnostics of :func:`project_affine_box`.

    ``gap``: primal objective ``1/2 ||y - t||^2`` of the returned feasible ``y`` minus the dual
    objective of the last multiplier (>= 0 up to rounding: an upper bound on the suboptimality);
    ``rel_gap``: gap / max(primal, 1e-30); ``infeasibility``: ``||(I-P)(z - anchor)||`` of the
    interior-point iterate before repair, relative to ``max(1, ||anchor||)``; ``shrink``: the factor
    the final repair scaled the harmless part by (1: none needed); ``iterations``: interior-point
    iterations run (the most over the batch); ``converged``: per sample, did every relative KKT
    residual reach the tolerance;
    ``distance_bound``: ``sqrt(2 max(gap, 0))``, a certified bound on the distance from the
    returned point to the exact projection (the objective is 1-strongly convex).
    """

    gap: torch.Tensor
    rel_gap: torch.Tensor
    infeasibility: torch.Tensor
    shrink: torch.Tensor
    iterations: int
    converged: torch.Tensor

    @property
    def distance_bound(self) -> torch.Tensor:
        return torch.sqrt(2.0 * self.gap.clamp_min(0.0))


def _repair(proj: Projector, anchor: torch.Tensor, y: torch.Tensor,
            rounds: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Make ``y`` feasible without clipping: alternate projections onto ``anchor + N(A)`` and the
    box (they move ``y`` by about its infeasibility, and converge linearly for polyhedra), then
    shrink the harmless part towards ``anchor`` (which is in the box) by the largest
    ``theta <= 1`` that keeps every pixel in ``[-1e-12/2, 1 + 1e-12/2]``; half the allowance is
    left for the rounding of ``anchor + theta d``. The result is harmless up to round-off.
    Shrinking alone would do, but with ``anchor`` on the box boundary (MNIST's black pixels) a
    violation of 1e-12 could cost most of the harmless part; the alternating projections avoid
    that. When the solver has converged nothing moves and ``theta`` is 1."""
    margin = 0.5 * _EPS_BOX
    d = proj.harmless(y - anchor)
    for _ in range(rounds):
        out = anchor + d
        if float(box_violation(out).max()) <= margin:
            break
        d = proj.harmless(out.clamp(0.0, 1.0) - anchor)
    inf = torch.full_like(d, math.inf)
    up = torch.where(d > 0, (1.0 + margin - anchor) / d, inf)
    lo = torch.where(d < 0, (-margin - anchor) / d, inf)
    theta = torch.minimum(up.amin(dim=1), lo.amin(dim=1)).clamp(0.0, 1.0)
    return anchor + theta[:, None] * d, theta


def project_affine_box(space: HarmlessSubspace | Projector, anchor: torch.Tensor, target: torch.Tensor, *,
                       tol: float = 1e-12, max_iter: int = 100) -> tuple[torch.Tensor, ProjectionInfo]:
    """The nearest point to ``target`` in ``{anchor + N(A)} ∩ [0, 1]^n``, per sample.

    ``anchor`` must lie in ``[0, 1]^n`` (so the set is non-empty). Solved by an interior-point
    method (see :func:`_ipm`) until the relative primal and dual residuals and the mean
    complementarity are below ``tol``, for at most ``max_iter`` iterations. The result is in
    ``[0, 1]`` and harmless up to round-off (see :func:`_repair`); ``info.gap`` bounds its
    suboptimality and ``info.converged`` says which samples met ``tol``.
    Returns images shaped ``(B, *input_shape)`` and a :class:`ProjectionInfo`.
    """
    proj = projector(space)
    a = _images(proj, anchor, "anchor").reshape(-1, proj.n)
    t = _images(proj, target, "target", box=False).reshape(-1, proj.n)
    if t.shape[0] != a.shape[0]:
        raise InputError(f"target has {t.shape[0]} samples but anchor has {a.shape[0]}")
    _check_solver(tol, max_iter)
    y, info = _project_flat(proj, a, t, tol=tol, max_iter=max_iter)
    return y.reshape(-1, *proj.input_shape), info


def _dual_value(y: torch.Tensor, t: torch.Tensor, mu: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((y - t) ** 2).sum(1) + (mu * (y - a)).sum(1)


#: Bytes of one batched normal matrix build, ``chunk * s * n`` float64 numbers (images are solved
#: in chunks of this size; the matrices of a whole test set would not fit in memory).
_CHUNK_BYTES = 2 ** 28


def _project_flat(proj: Projector, a: torch.Tensor, t: torch.Tensor, *, tol: float = 1e-12,
                  max_iter: int = 100) -> tuple[torch.Tensor, ProjectionInfo]:
    """Projection of flat targets ``t`` onto ``{a + N(A)} ∩ [0, 1]^n``, all samples at once, by a
    primal-dual interior-point method (:func:`_ipm`) in chunks, then :func:`_repair` for exact
    feasibility. The certificate is the duality gap of the repaired point against the
    Lagrangian dual ``q(mu) = min_{0<=y<=1} 1/2||y - t||^2 + mu.(y - a)`` at the multiplier
    ``mu = (I - P)(t - z + lam - nu)`` the interior-point method ends with: ``q(mu)`` is a lower
    bound on the optimum for every ``mu`` in the row space, whatever the solver did."""
    s = min(proj.rank, proj.dim)
    chunk = max(1, _CHUNK_BYTES // (8 * max(1, s) * proj.n))
    parts = [_ipm(proj, a[i:i + chunk], t[i:i + chunk], tol=tol, max_iter=max_iter)
             for i in range(0, a.shape[0], chunk)]
    z, lam, nu, converged = (torch.cat([p[k] for p in parts]) for k in range(4))
    iterations = max(p[4] for p in parts)
    scale = a.norm(dim=1).clamp_min(1.0)
    infeasibility = proj.harmful(z - a).norm(dim=1) / scale
    mu = proj.harmful(t - z + lam - nu)
    q = _dual_value((t - mu).clamp(0.0, 1.0), t, mu, a)
    y, theta = _repair(proj, a, z.clamp(0.0, 1.0))
    primal = 0.5 * ((y - t) ** 2).sum(1)
    gap = primal - q
    return y, ProjectionInfo(gap=gap, rel_gap=gap / primal.clamp_min(1e-30), infeasibility=infeasibility,
                             shrink=theta, iterations=iterations, converged=converged)


def _ipm(proj: Projector, a: torch.Tensor, t: torch.Tensor, *, tol: float,
         max_iter: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Mehrotra's predictor-corrector interior-point method for the batch of QPs
    ``min 1/2||z - t||^2  s.t.  (I - P)(z - a) = 0,  0 <= z <= 1``.

    Written here rather than taken from a library because no QP solver in reach batches
    thousands of problems that share one constraint matrix, and the shared orthonormal bases
    make each Newton system small: with ``h = 1 + lam/z + nu/(1-z)`` the step needs
    ``R diag(1/h) R^T`` (row space, ``r x r``) or ``U diag(h) U^T`` (null space, ``d x d``),
    whichever is smaller, one batched Cholesky factorisation per iteration for both the
    predictor and the corrector. An interior-point method does not mind that the problem is
    degenerate (MNIST: ~600 pixels pinned at 0 against 256 constraints, where a semismooth
    Newton method on the dual met its tolerance on 6-26 % of the images) and converges in a
    few dozen iterations on every image.

    Per sample it stops once the relative primal residual ``||(I-P)(z-a)|| / max(1, ||a||)``,
    the relative dual residual ``||P(z - t - lam + nu)|| / max(1, ||t||, ||lam||, ||nu||)`` and
    the mean complementarity are all below ``tol``, or when round-off stops its progress (15
    iterations without a better iterate); it returns the best iterate (strictly inside the box),
    the bound multipliers ``lam``, ``nu``, the per-sample converged flags and the iterations
    run. The null-space systems are the worse conditioned near the end (``h`` grows like 1/mu
    on pinned pixels): on CIFAR-size problems they stall at a relative residual of ~1e-9, which
    the certificate then reports (a distance bound of ~1e-3 in the 3072-pixel L2 norm)."""
    b, n = t.shape
    use_range = proj.rank <= proj.dim
    basis = proj.row if use_range else proj.null  # (s, n), orthonormal rows
    z = a.clamp(0.1, 0.9)
    w = 1.0 - z  # the upper slack is its own variable: 1 - z would round to 0 next to the bound
    lam = torch.ones_like(z)
    nu = torch.ones_like(z)
    scale_p = a.norm(dim=1).clamp_min(1.0)
    converged = torch.zeros(b, dtype=torch.bool)
    active = torch.ones(b, dtype=torch.bool)
    # the best iterate so far by the largest relative KKT residual: near the end, round-off in the
    # Newton systems (whose condition grows like 1/mu) can make the iterates worse, not better
    best = [z.clone(), lam.clone(), nu.clone()]
    best_merit = torch.full((b,), math.inf, dtype=t.dtype)
    stale = torch.zeros(b, dtype=torch.int64)
    it = 0
    for it in range(1, max_iter + 1):
        live = torch.nonzero(active).flatten()
        zl, wl, ll, nl, al, tl = z[live], w[live], lam[live], nu[live], a[live], t[live]
        rp = proj.harmful(zl - al)
        rd = proj.harmless(zl - tl - ll + nl)  # its row-space part is absorbed by the equality multiplier
        mu = ((ll * zl).sum(1) + (nl * wl).sum(1)) / (2 * n)
        # the dual residual is relative to the multipliers too: its round-off grows with them
        scale_d = torch.stack([tl.norm(dim=1), ll.norm(dim=1), nl.norm(dim=1)]).amax(0).clamp_min(1.0)
        merit = torch.stack([rp.norm(dim=1) / scale_p[live], rd.norm(dim=1) / scale_d, mu]).amax(0)
        better = merit < best_merit[live]
        for saved, value in zip(best, (zl, ll, nl)):
            saved[live[better]] = value[better]
        stale[live] = torch.where(better, 0, stale[live] + 1)
        best_merit[live] = torch.minimum(best_merit[live], merit)
        met = merit <= tol
        converged[live[met]] = True
        # stop a sample that has not improved for 15 iterations or got 100x worse than its best (the
        # merit is not monotone on the way: 2 of 300 MNIST images went 5 iterations without a
        # better one at merit 1e-5, then converged)
        active[live[met | (stale[live] >= 15) | (merit > 100 * best_merit[live])]] = False
        keep = active[live]
        if not bool(keep.any()):
            it -= 1
            break
        live, zl, wl, ll, nl, al, tl, rp, rd, mu = (v[keep] for v in (live, zl, wl, ll, nl, al, tl, rp, rd, mu))
        h = 1.0 + ll / zl + nl / wl
        mat = (basis * (1.0 / h if use_range else h)[:, None, :]) @ basis.T
        chol, bad = torch.linalg.cholesky_ex(mat)
        if bool((bad != 0).any()):  # round-off at the very end; a relative jitter of 1e-14 is harmless
            jitter = 1e-14 * mat.diagonal(dim1=1, dim2=2).amax(1)[:, None, None]
            chol, _ = torch.linalg.cholesky_ex(mat + jitter * torch.eye(mat.shape[-1], dtype=mat.dtype))

        def newton(cl: torch.Tensor, cu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            # the KKT system, reduced to h dz - R^T dw = g with (I - P) dz = -rp
            g = -rd + cl / zl - cu / wl
            if use_range:
                rhs = -(rp + g / h) @ basis.T
                dw = torch.cholesky_solve(rhs[:, :, None], chol)[:, :, 0]
                dz = (g + dw @ basis) / h
            else:
                v = torch.cholesky_solve(((g + h * rp) @ basis.T)[:, :, None], chol)[:, :, 0]
                dz = -rp + v @ basis
            return dz, (cl - ll * dz) / zl, (cu + nl * dz) / wl

        def longest(dz: torch.Tensor, dl: torch.Tensor, dn: torch.Tensor) -> torch.Tensor:
            inf = torch.full_like(dz, math.inf)
            s = torch.minimum(torch.where(dz < 0, zl / -dz, inf), torch.where(dz > 0, wl / dz, inf))
            s = torch.minimum(s, torch.where(dl < 0, ll / -dl, inf))
            return torch.minimum(s, torch.where(dn < 0, nl / -dn, inf)).amin(1).clamp(max=1.0)[:, None]

        dz_a, dl_a, dn_a = newton(-ll * zl, -nl * wl)  # predictor: the affine-scaling step
        s_a = longest(dz_a, dl_a, dn_a)
        mu_a = (((ll + s_a * dl_a) * (zl + s_a * dz_a)).sum(1) + ((nl + s_a * dn_a) * (wl - s_a * dz_a)).sum(1)) / (2 * n)
        target = (mu * (mu_a / mu).clamp(0.0, 1.0) ** 3)[:, None]  # Mehrotra's centring sigma * mu
        dz, dl, dn = newton(target - ll * zl - dl_a * dz_a, target - nl * wl + dn_a * dz_a)
        step = 0.995 * longest(dz, dl, dn)
        new = [zl + step * dz, wl - step * dz, ll + step * dl, nl + step * dn]
        # a sample whose step is not finite or leaves the interior has reached the end of float64:
        # it keeps its last iterate, unconverged, and its certificate says how good that is
        sane = torch.stack([torch.isfinite(v).all(1) & (v > 0).all(1) for v in new]).all(0)
        for state, value in zip((z, w, lam, nu), new):
            state[live[sane]] = value[sane]
        active[live[~sane]] = False
    z, lam, nu = best
    return z, lam, nu, converged, it


# ---------------------------------------------------------------------------------------------
# Privatisation.


@dataclasses.dataclass
class Result:
    """A privatised batch.

    ``x_hat`` (float64, ``(B, *input_shape)``, in ``[0, 1]``), ``delta = x_hat - x`` (harmless);
    per sample: ``box_violation`` ``max(0, -x_hat, x_hat - 1)``, ``output_deviation``
    ``||A (x_hat - x)||`` of the linear prefix, ``harmful_residual`` ``||A delta|| / (||A|| ||delta||)``,
    ``mse`` ``mean((x_hat - x)^2)``; ``method`` and solver diagnostics in ``info``.
    """

    x_hat: torch.Tensor
    delta: torch.Tensor
    box_violation: torch.Tensor
    output_deviation: torch.Tensor
    harmful_residual: torch.Tensor
    mse: torch.Tensor
    method: str
    info: dict[str, object]


def _result(proj: Projector, x: torch.Tensor, x_hat: torch.Tensor, method: str, info: dict[str, object]) -> Result:
    b = x.shape[0]
    x_hat = x_hat.reshape(b, -1)
    d = x_hat - x.reshape(b, -1)
    out = proj.apply(d).norm(dim=1)
    res = out / (proj.norm * d.norm(dim=1)).clamp_min(1e-300)
    return Result(x_hat=x_hat.reshape(b, *proj.input_shape), delta=d.reshape(b, *proj.input_shape),
                  box_violation=box_violation(x_hat), output_deviation=out, harmful_residual=res,
                  mse=(d ** 2).mean(dim=1), method=method, info=info)


def _check_positive(value: object, name: str, *, integer: bool = False) -> None:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if ok and integer:
        ok = isinstance(value, (int, np.integer))
    if not ok or not math.isfinite(float(value)) or float(value) <= 0:  # type: ignore[arg-type]
        raise InputError(f"{name} must be a positive {'int' if integer else 'number'}, got {value!r}")


def _check_solver(tol: object, max_iter: object) -> None:
    """The settings of :func:`_project_flat`, checked by every public function that passes them."""
    _check_positive(tol, "tol")
    _check_positive(max_iter, "max_iter", integer=True)


def privatize_paper(space: HarmlessSubspace | Projector, x: torch.Tensor, *, steps: int = 300, lr: float = 0.05,
                    penalty: float = 10.0, generator: torch.Generator | None = None,
                    init_scale: float = 0.1, tol: float = 1e-12, max_iter: int = 100) -> Result:
    """Algorithm 1 of the paper: maximise ``MSE(x_hat, x) - penalty * mean(box violation^2)`` over
    the harmless coefficients ``c`` (``x_hat = x + U c``) with Adam from a random start (the
    objective is flat at ``c = 0``), then restore feasibility inside the affine set: ``x_hat`` is
    replaced by its projection onto ``{x + U c} ∩ [0, 1]^n`` (not clipped, which would break
    harmlessness). ``x`` is not modified.
    """
    proj = projector(space)
    xs = _images(proj, x, "x")
    _check_positive(steps, "steps", integer=True)
    _check_positive(lr, "lr")
    _check_positive(penalty, "penalty")
    _check_solver(tol, max_iter)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    b = xs.shape[0]
    flat = xs.reshape(b, -1)
    u = proj.null  # (d, n)
    c0 = torch.randn(b, proj.dim, generator=gen, dtype=torch.float64)
    c0 = c0 * (init_scale * math.sqrt(proj.n) / c0.norm(dim=1, keepdim=True))
    c = c0.clone().requires_grad_(True)
    opt = torch.optim.Adam([c], lr=lr)
    history = []
    for step in range(int(steps)):
        opt.zero_grad()
        y = flat + c @ u
        mse = ((y - flat) ** 2).mean(dim=1)
        viol = (torch.relu(-y) ** 2 + torch.relu(y - 1.0) ** 2).mean(dim=1)
        loss = -(mse - penalty * viol).sum()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            history.append(float((mse - penalty * viol).mean().detach()))
    with torch.no_grad():
        y = flat + c.detach() @ u
        raw_violation = box_violation(y)
        x_hat, pinfo = _project_flat(proj, flat, y, tol=tol, max_iter=max_iter)
    info: dict[str, object] = {"raw_box_violation": raw_violation, "projection": pinfo, "objective": history,
                               "steps": steps, "lr": lr, "penalty": penalty}
    return _result(proj, xs, x_hat, "paper", info)


def make_decoy(kind: str | torch.Tensor, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """A decoy batch shaped like ``x``: ``"grey"`` (0.5 everywhere), ``"noise"`` (uniform [0, 1]),
    ``"shift"`` (the batch rolled by one: every image's decoy is another image of the batch), or a
    tensor (one image broadcast to the batch, or a batch)."""
    if isinstance(kind, torch.Tensor):
        d = kind.detach().to(torch.float64)
        if tuple(d.shape) == tuple(x.shape[1:]):
            d = d.unsqueeze(0).expand_as(x)
        if tuple(d.shape) != tuple(x.shape):
            raise InputError(f"decoy must have shape {tuple(x.shape[1:])} or {tuple(x.shape)}, got {tuple(d.shape)}")
        if not bool(torch.isfinite(d).all()):
            raise InputError("decoy contains non-finite values (nan or inf)")
        return d.clone()
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    if kind in ("grey", "gray"):
        return torch.full(x.shape, 0.5, dtype=torch.float64)
    if kind == "noise":
        return torch.rand(x.shape, generator=gen, dtype=torch.float64)
    if kind in ("shift", "other"):
        if x.shape[0] < 2:
            raise InputError("decoy 'shift' needs a batch of at least 2 images")
        return torch.roll(x.detach().to(torch.float64), 1, dims=0)
    raise InputError(f"unknown decoy {kind!r}: use 'grey', 'noise', 'shift' or an image tensor")


def privatize_decoy(space: HarmlessSubspace | Projector, x: torch.Tensor, decoy: str | torch.Tensor = "grey", *,
                    generator: torch.Generator | None = None, tol: float = 1e-12, max_iter: int = 100) -> Result:
    """Our convex formulation: ``min ||x_hat - t||^2  s.t.  A x_hat = A x, 0 <= x_hat <= 1``, with
    ``t`` the decoy (see :func:`make_decoy`): the projection of ``t`` onto
    ``{x + N(A)} ∩ [0, 1]^n`` (:func:`project_affine_box`), to ``tol`` within ``max_iter``
    interior-point iterations. ``info["projection"]`` certifies it per sample (``converged``, ``gap``,
    ``distance_bound``). ``x`` is not modified."""
    proj = projector(space)
    xs = _images(proj, x, "x")
    _check_solver(tol, max_iter)
    t = make_decoy(decoy, xs, generator=generator)
    t = _images(proj, t, "decoy", box=False)
    b = xs.shape[0]
    x_hat, pinfo = _project_flat(proj, xs.reshape(b, -1), t.reshape(b, -1), tol=tol, max_iter=max_iter)
    name = decoy if isinstance(decoy, str) else "image"
    return _result(proj, xs, x_hat, f"decoy-{name}", {"projection": pinfo, "decoy": t})


# ---------------------------------------------------------------------------------------------
# 8-bit output.


@dataclasses.dataclass
class QuantizeResult:
    """``naive``: ``round(255 x_hat) / 255``; ``improved``: after greedy single-pixel +-1/255 flips
    that reduce ``||A (q - x)||``. Per sample ``*_deviation`` is ``||A (q - x)||``; ``flips`` how
    many pixels the greedy pass changed."""

    naive: torch.Tensor
    improved: torch.Tensor
    naive_deviation: torch.Tensor
    improved_deviation: torch.Tensor
    flips: torch.Tensor


def quantize_harmless(space: HarmlessSubspace | Projector, x_hat: torch.Tensor, x: torch.Tensor, *,
                      max_flips: int = 5000) -> QuantizeResult:
    """Round a privatised batch to 8 bits, then greedily flip single pixels by ``+-1/255`` (staying
    on the 8-bit grid in ``[0, 1]``) while that reduces ``||A (q - x)||``, the best flip per image
    per round, all images at once."""
    proj = projector(space)
    xs = _images(proj, x, "x").reshape(-1, proj.n)
    xh = _images(proj, x_hat, "x_hat").reshape(-1, proj.n)
    if xs.shape[0] != xh.shape[0]:
        raise InputError(f"x_hat has {xh.shape[0]} samples but x has {xs.shape[0]}")
    levels = torch.round(xh * 255.0)
    naive = levels / 255.0
    amat = proj.matrix
    gram = amat.T @ amat  # (n, n)
    diag = torch.diagonal(gram)
    r = proj.apply(naive - xs)  # (B, m)
    g = r @ amat  # A^T r, (B, n)
    lv = levels.clone()
    flips = torch.zeros(xs.shape[0], dtype=torch.int64)
    rows = torch.arange(xs.shape[0])
    h = 1.0 / 255.0
    for _ in range(int(max_flips)):
        # change of ||r||^2 when pixel i moves by s h: 2 s h g_i + h^2 G_ii
        gain_up = 2 * h * g + h * h * diag
        gain_dn = -2 * h * g + h * h * diag
        gain_up = torch.where(lv < 255, gain_up, torch.full_like(gain_up, math.inf))
        gain_dn = torch.where(lv > 0, gain_dn, torch.full_like(gain_dn, math.inf))
        best_up, i_up = gain_up.min(dim=1)
        best_dn, i_dn = gain_dn.min(dim=1)
        use_up = best_up <= best_dn
        best = torch.where(use_up, best_up, best_dn)
        idx = torch.where(use_up, i_up, i_dn)
        sign = torch.where(use_up, 1.0, -1.0).to(torch.float64)
        move = best < -1e-18
        if not bool(move.any()):
            break
        rr, ii, ss = rows[move], idx[move], sign[move]
        lv[rr, ii] += ss
        g[rr] += (ss * h)[:, None] * gram[ii]
        flips[rr] += 1
    improved = lv / 255.0
    return QuantizeResult(
        naive=naive.reshape(-1, *proj.input_shape), improved=improved.reshape(-1, *proj.input_shape),
        naive_deviation=proj.apply(naive - xs).norm(dim=1), improved_deviation=proj.apply(improved - xs).norm(dim=1),
        flips=flips)

