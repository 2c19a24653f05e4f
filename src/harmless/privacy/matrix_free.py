"""The privacy projection without dense bases, for linear prefixes too large to factorise.

The projection of a target ``t`` onto ``{a + N(A)} ∩ [0, 1]^n`` (unit-box coordinates, as in
:mod:`harmless.privacy.solver`) is solved through its Lagrangian dual in the *output* space,

    q(w) = min_{0<=y<=1} 1/2||y - t||^2 + (A^T w).(y - a),   y(w) = clip(t - A^T w, 0, 1),

a concave, smooth function with gradient ``A (y(w) - a)``: every evaluation costs one pass
through ``A^T`` and one through ``A`` and no projection at all. It is maximised by L-BFGS
(SciPy's L-BFGS-B without bounds) in the variables of a block-Jacobi preconditioner of
``A A^T`` (one ``C x C`` block per output position of a convolutional stem, pseudo-inverted,
found by probing the operator). Chosen over an interior-point method with PCG-solved Newton
systems because the subspace's fast FFT projector declines the 7x7/s6/p3 -> 64 stem (its
``A A^T`` is singular: corner windows read fewer pixels than they have channels), so every
exact projection costs a PCG of several hundred operator passes, and the dual needs none per
iteration (measured: :mod:`harmless.experiments.table2_overlap`).

Whatever the optimiser did, the answer is certified as the dense path's is: ``mu = A^T w`` lies
in the row space by construction, so ``q(w)`` is a lower bound on the optimum; the returned point
is ``y(w)`` made exactly feasible (its harmless part taken by an exact, residual-checked
projector, alternating projections with the box, then a shrink towards ``a``; never clipped), and
``primal(y) - q(w)`` is its certificate. ``converged`` is set only where the dual's KKT residual
``||A (y(w) - a)||`` met the tolerance (the other KKT conditions hold by construction of ``y(w)``).

The exact projector is the subspace's fast convolutional-stem projector when it has one, else a
preconditioned conjugate gradient on ``A A^T y = A delta`` with the same block-Jacobi
preconditioner (``A A^T`` may be singular: the pseudo-inverse blocks keep the iteration in its
range), whose harmful residual ``||A (delta - A^T y)||`` is checked against the tolerance.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import scipy.optimize
import torch

from harmless.errors import InputError, NoHarmlessSubspaceError, TooLargeError
from harmless.linalg.operators import TorchLinearOperator
from harmless.linalg.subspace import HarmlessSubspace
from harmless.privacy.problem import EPS_BOX, Bounds, box_violation
from harmless.privacy.solver import ProjectionInfo, dual_value, shrink_into_box

__all__ = ["BlockJacobiProjector", "MatrixFreeProblem", "project"]

#: The relative harmful residual every exact projection here must reach (float64).
PROJECTION_RTOL = 1e-13


class BlockJacobiProjector:
    """The orthogonal projector onto ``N(A)`` for an operator with a ``(C, H, W)`` output grid
    whose rows couple only nearby positions (a convolutional stem and its per-channel
    scalings): PCG on ``A A^T y = A delta`` with the pseudo-inverses of the ``C x C`` diagonal
    blocks of ``A A^T`` (one per output position) as preconditioner. ``blocks`` holds them,
    ``sqrt_blocks`` their symmetric square roots (the dual solver's change of variables)."""

    def __init__(self, op: TorchLinearOperator, *, keep: torch.Tensor | None = None, radius: int | None = None,
                 norm: float | None = None) -> None:
        if len(op.out_shape) != 3:
            raise TooLargeError(f"the matrix-free privacy solver needs an output grid (C, H, W), got {op.out_shape}")
        start = time.perf_counter()
        self.operator = op.astype(torch.float64) if op.dtype != torch.float64 else op
        c, h, w = (int(s) for s in op.out_shape)
        self.grid = (c, h, w)
        # keep: a 0/1 mask of the input pixels that may move (the projector is then onto
        # N(A) ∩ {d = 0 off the mask}, through A D A^T with D = diag(keep))
        self.keep = None if keep is None else keep.to(torch.float64).reshape(1, *op.in_shape).to(op.device)
        self.radius = self._radius() if radius is None else radius
        g = self._diagonal_blocks()  # (HW, C, C)
        lam, vec = torch.linalg.eigh(g)
        # pseudo-inverse per block: a zero eigenvalue is a dependent set of rows (a corner window
        # that reads fewer pixels than it has channels); it stays out of the iteration
        keep = lam > 1e-10 * lam.amax(dim=1, keepdim=True).clamp_min(1e-300)
        inv = torch.where(keep, 1.0 / torch.where(keep, lam, torch.ones_like(lam)), torch.zeros_like(lam))
        self.blocks = (vec * inv[:, None, :]) @ vec.mT
        self.sqrt_blocks = (vec * inv.sqrt()[:, None, :]) @ vec.mT
        # a lower bound on ||A||: ||A_p|| of the largest block
        self.norm = math.sqrt(float(lam.amax())) if norm is None else norm
        self.setup_seconds = time.perf_counter() - start

    def _gram(self, y: torch.Tensor) -> torch.Tensor:
        op = self.operator
        return op._matvec(self._masked(op._rmatvec(y)))

    def _masked(self, v: torch.Tensor) -> torch.Tensor:
        return v if self.keep is None else v * self.keep

    def masked(self, keep: torch.Tensor) -> BlockJacobiProjector:
        """The projector onto ``N(A) ∩ {d : d = 0 where keep is 0}`` (its blocks probed anew)."""
        return BlockJacobiProjector(self.operator, keep=keep, radius=self.radius, norm=self.norm)

    def _radius(self) -> int:
        """How far apart (in output positions, Chebyshev) two rows of ``A A^T`` still couple: read
        from the columns of ``A A^T`` at the centre and the four corners."""
        c, h, w = self.grid
        spots = [(h // 2, w // 2), (0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1)]
        radius = 0
        for i, j in spots:
            e = torch.zeros(c, c, h, w, dtype=torch.float64, device=self.operator.device)
            e[torch.arange(c), torch.arange(c), i, j] = 1.0
            col = self._gram(e).abs().amax(dim=(0, 1)).cpu()
            ii, jj = torch.nonzero(col > 0, as_tuple=True)
            if ii.numel():
                radius = max(radius, int((ii - i).abs().max()), int((jj - j).abs().max()))
        return radius

    def _diagonal_blocks(self) -> torch.Tensor:
        """The ``C x C`` blocks of ``A A^T`` on its diagonal, ``(H W, C, C)``, by probing: positions
        ``radius + 1`` apart in both directions do not couple, so one probe per channel and per
        residue class of positions reads all their blocks at once."""
        c, h, w = self.grid
        s = self.radius + 1
        out = torch.zeros(h * w, c, c, dtype=torch.float64)
        ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        for a in range(s):
            for b in range(s):
                mask = ((ii % s == a) & (jj % s == b)).reshape(-1)
                e = torch.zeros(c, c, h * w, dtype=torch.float64)
                e[torch.arange(c), torch.arange(c)] = mask.to(torch.float64)
                col = self._gram(e.view(c, c, h, w).to(self.operator.device)).cpu().reshape(c, c, h * w)
                # col[k, :, p] = G[(:, p), (k, p)] for p in the class
                out[mask] = col[:, :, mask].permute(2, 1, 0)
        return out.to(self.operator.device)

    def precondition(self, r: torch.Tensor, blocks: torch.Tensor | None = None) -> torch.Tensor:
        """``M r`` for a batch ``(B, C*H*W)``, ``M`` block diagonal over output positions."""
        c, h, w = self.grid
        m = self.blocks if blocks is None else blocks
        v = r.reshape(-1, c, h * w).permute(2, 1, 0)  # (HW, C, B): one batched matmul over positions
        return torch.bmm(m, v).permute(2, 1, 0).reshape(r.shape[0], -1)

    def harmful(self, delta: torch.Tensor, *, tol: float = PROJECTION_RTOL,
                maxiter: int = 5000) -> tuple[torch.Tensor, int, torch.Tensor]:
        """``(I - P) delta`` for a flat float64 batch ``(B, n)`` (with a mask: ``delta`` must be 0 off
        it, and so is the result); returns it, the operator passes
        per image and the relative harmful residual ``||A (delta - harmful)|| / (||A|| ||delta||)``
        per image (the caller decides what to accept)."""
        op = self.operator
        bsz = delta.shape[0]
        shape_in = (bsz, *op.in_shape)
        b = op._matvec(delta.reshape(shape_in)).reshape(bsz, -1)
        passes = 1
        scale = (self.norm * delta.norm(dim=1)).clamp_min(1e-300)
        target = tol * scale
        y = torch.zeros_like(b)
        r = b.clone()
        z = self.precondition(r)
        p = z.clone()
        rz = (r * z).sum(1)
        tiny = torch.finfo(torch.float64).tiny
        for _ in range(maxiter):
            if not bool((r.norm(dim=1) > target).any()):
                break
            q = self._gram(p.reshape(bsz, *op.out_shape)).reshape(bsz, -1)
            passes += 2
            pq = (p * q).sum(1)
            active = r.norm(dim=1) > target
            alpha = torch.where(active & (pq > tiny), rz / pq.clamp_min(tiny), torch.zeros_like(pq))
            y = y + alpha[:, None] * p
            r = r - alpha[:, None] * q
            z = self.precondition(r)
            rz_new = (r * z).sum(1)
            beta = torch.where(rz.abs() > tiny, rz_new / torch.where(rz.abs() > tiny, rz, torch.ones_like(rz)),
                               torch.zeros_like(rz))
            p = z + beta[:, None] * p
            rz = rz_new
        harmful = self._masked(op._rmatvec(y.reshape(bsz, *op.out_shape))).reshape(bsz, -1)
        true = (b - op._matvec(harmful.reshape(shape_in)).reshape(bsz, -1)).norm(dim=1)
        passes += 2
        return harmful, passes, true / scale


class MatrixFreeProblem:
    """What the matrix-free projection needs of one subspace, built once: the float64 operator,
    ``||A||`` (power-iteration estimate), the block-Jacobi data and an exact projector.

    Raises :class:`~harmless.errors.TooLargeError` when the prefix has no ``(C, H, W)`` output
    grid (nothing to precondition by) and :class:`~harmless.errors.NoHarmlessSubspaceError` when
    the subspace is known to be empty. ``apply``/``harmful``/``harmless`` take flat batches."""

    def __init__(self, space: HarmlessSubspace) -> None:
        if not isinstance(space, HarmlessSubspace):
            raise InputError(f"space must be a HarmlessSubspace, got {type(space).__name__}")
        if space.known_dim == 0:
            raise NoHarmlessSubspaceError("the linear prefix is injective: nothing can be hidden")
        op = space.operator
        self.operator = op.astype(torch.float64) if op.dtype != torch.float64 else op
        self.input_shape: tuple[int, ...] = tuple(space.input_shape)
        self.n = int(space.ambient_dim)
        self.dim = space.known_dim
        self.jacobi = BlockJacobiProjector(self.operator)
        self.norm = max(float(space.operator_norm), self.jacobi.norm)
        self.jacobi.norm = self.norm
        # the fast conv-stem projector when the subspace has one (it declines singular A A^T)
        self.fast = space.conv_projector
        self.passes = 0  # operator passes per image, summed over this problem's projections

    def __repr__(self) -> str:
        return f"MatrixFreeProblem(input_shape={self.input_shape}, dim={self.dim})"

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """``A v`` for flat batches ``(B, n)``."""
        return self.operator._matvec(v.reshape(-1, *self.input_shape)).reshape(v.shape[0], -1)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self.operator._rmatvec(y.reshape(-1, *self.operator.out_shape)).reshape(y.shape[0], -1)

    def harmful(self, v: torch.Tensor) -> torch.Tensor:
        """``(I - P) v`` to a relative harmful residual of :data:`PROJECTION_RTOL`, checked;
        raises :class:`~harmless.errors.TooLargeError` when the solve does not get there."""
        scale = self.norm * v.norm(dim=1)
        if self.fast is not None:
            z, info = self.fast.harmful(v.reshape(-1, *self.input_shape), tol=PROJECTION_RTOL, scale=scale)
            self.passes += info.passes * v.shape[0]  # one pass of the batch is one per image
            if info.converged:
                return z.reshape(v.shape[0], -1)
        z, passes, rel = self.jacobi.harmful(v)
        self.passes += passes * v.shape[0]
        if float(rel.max()) > 10 * PROJECTION_RTOL:
            raise TooLargeError(f"the matrix-free projector reached a relative harmful residual of "
                                f"{float(rel.max()):.1e} only (wanted {PROJECTION_RTOL:.0e}); no answer is returned")
        return z

    def harmless(self, v: torch.Tensor) -> torch.Tensor:
        return v - self.harmful(v)


@dataclasses.dataclass
class _Solve:
    w: torch.Tensor
    iterations: int
    evaluations: int


def _dual(problem: MatrixFreeProblem, w: torch.Tensor, a: torch.Tensor,
          t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q(w)``, its gradient ``A (y - a)`` (the dual's KKT residual) and ``y(w)`` for flat
    batches: one pass through ``A^T`` and one through ``A`` per image."""
    mu = problem.adjoint(w)
    y = (t - mu).clamp(0.0, 1.0)
    return dual_value(y, t, mu, a), problem.apply(y - a), y


def _maximise(problem: MatrixFreeProblem, a: torch.Tensor, t: torch.Tensor, *, tol: float,
              max_iter: int) -> _Solve:
    """L-BFGS on ``-q`` in the variables ``v`` with ``w = S v`` (``S`` the block-Jacobi square
    root), from ``w = 0``; stops when ``||A (y - a)|| <= tol ||A|| max(1, ||a||)`` or after
    ``max_iter`` iterations in all. ``q`` is piecewise quadratic, and SciPy's line search gives up
    at its kinks now and then: the optimiser is then restarted from the best point so far (its
    curvature pairs dropped), as long as the restarts still improve ``q``."""
    sq = problem.jacobi.sqrt_blocks
    target = tol * problem.norm * max(1.0, float(a.norm()))
    m = problem.operator.m
    count = [0]
    iterations = [0]
    best: dict[str, object] = {"q": -math.inf, "v": np.zeros(m)}

    class _Done(Exception):
        pass

    def fun(v: np.ndarray) -> tuple[float, np.ndarray]:
        count[0] += 1
        w = problem.jacobi.precondition(torch.from_numpy(v)[None], sq)[0]
        q_batch, g_batch, _ = _dual(problem, w[None], a[None], t[None])
        q, g = float(q_batch[0]), g_batch[0]
        if q > float(best["q"]):  # type: ignore[arg-type]
            best.update(q=q, v=v.copy())
        if float(g.norm()) <= target:
            best.update(q=q, v=v.copy())
            raise _Done
        gv = problem.jacobi.precondition(g[None], sq)[0]
        return -q, -gv.numpy()

    def callback(_: np.ndarray) -> None:
        iterations[0] += 1

    while iterations[0] < max_iter:
        before, done_before = float(best["q"]), iterations[0]  # type: ignore[arg-type]
        left = max_iter - iterations[0]
        try:
            scipy.optimize.minimize(fun, best["v"], jac=True, method="L-BFGS-B", callback=callback,
                                    options={"maxiter": left, "maxcor": 10, "ftol": 0.0, "gtol": 0.0,
                                             "maxfun": 2 * left + 20, "maxls": 40})
        except _Done:
            break
        gained = float(best["q"]) - before  # type: ignore[arg-type]
        if iterations[0] == done_before or gained <= 1e-15 * max(1.0, abs(float(best["q"]))):  # type: ignore[arg-type]
            break  # a restart that does not move: round-off level
    v = best["v"]
    assert isinstance(v, np.ndarray)
    w = problem.jacobi.precondition(torch.from_numpy(v)[None], sq)[0]
    return _Solve(w, iterations[0], count[0])


def _repair(problem: MatrixFreeProblem, a: torch.Tensor, y: torch.Tensor,
            rounds: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``y`` (in the box, nearly feasible) made exactly feasible without clipping, image by image
    (unit box); returns it, the shrink factor and the relative harmful part of ``y - a`` before.

    The dense path's repair (alternating projections, then a shrink towards ``a``) needs its
    iterate to be feasible to round-off: a pixel of ``a`` on a bound that the correction pushes
    outwards by even 1e-10 makes the shrink give up almost everything. So pixels where ``a`` and
    ``y`` sit on the same bound (to 1e-9) are held there exactly: the correction is the
    projection onto ``N(A) ∩ {d = 0 on them}`` (the block-Jacobi projector with those columns
    masked), followed by a few alternating projections of the same kind and the shrink."""
    margin = 0.5 * EPS_BOX
    diff = y - a
    harm = problem.harmful(diff)
    infeasibility = harm.norm(dim=1) / a.norm(dim=1).clamp_min(1.0)
    out = torch.empty_like(y)
    thetas = torch.empty(y.shape[0], dtype=y.dtype)
    for i in range(y.shape[0]):
        d = diff[i:i + 1] - harm[i:i + 1]
        if float(box_violation(a[i:i + 1] + d)) > margin:
            held = ((a[i] <= 0.0) & (y[i] <= 1e-9)) | ((a[i] >= 1.0) & (y[i] >= 1.0 - 1e-9))
            proj = problem.jacobi.masked(~held)
            v = torch.where(held, 0.0, diff[i])[None]
            for _ in range(rounds):
                z, passes, rel = proj.harmful(v)
                problem.passes += passes
                if float(rel.max()) > 10 * PROJECTION_RTOL:
                    break  # keep the exact d from before
                d = v - z
                cur = a[i:i + 1] + d
                if float(box_violation(cur)) <= margin:
                    break
                v = torch.where(held, 0.0, cur.clamp(0.0, 1.0) - a[i:i + 1])
        shrunk, theta = shrink_into_box(a[i:i + 1], d)
        out[i], thetas[i] = shrunk[0], theta[0]
    return out, thetas, infeasibility


def project(problem: MatrixFreeProblem, anchor: torch.Tensor, target: torch.Tensor, *, bounds: Bounds,
            tol: float, max_iter: int, progress: bool | None = None) -> tuple[torch.Tensor, ProjectionInfo]:
    """The nearest point to each flat target ``(B, n)`` in ``{anchor + N(A)} ∩ [lo, hi]^n``, image by
    image, with the certificate of :class:`~harmless.privacy.solver.ProjectionInfo`
    (``iterations``: the most L-BFGS iterations over the batch; ``operator_passes``: passes
    through ``A`` or ``A^T`` per image, summed over the batch, repair included)."""
    lo, hi = bounds
    width = hi - lo
    a = ((anchor - lo) / width).to(torch.float64)
    t = ((target - lo) / width).to(torch.float64)
    ws, its = [], 0
    start_passes = problem.passes
    evaluations = 0
    from tqdm.auto import tqdm

    # disable=None: tqdm shows the bar only when stderr is a terminal
    bar = tqdm(total=a.shape[0], desc="matrix-free projection", unit="image",
               disable=None if progress is None else not progress)
    for i in range(a.shape[0]):
        s = _maximise(problem, a[i], t[i], tol=tol, max_iter=max_iter)
        ws.append(s.w)
        its = max(its, s.iterations)
        evaluations += s.evaluations
        bar.update(1)
    bar.close()
    q, grad, y0 = _dual(problem, torch.stack(ws), a, t)
    conv = grad.norm(dim=1) <= tol * problem.norm * a.norm(dim=1).clamp_min(1.0)
    y, theta, infeasibility = _repair(problem, a, y0)
    primal = 0.5 * ((y - t) ** 2).sum(1)
    gap = primal - q
    passes = problem.passes - start_passes + 2 * evaluations + 4 * a.shape[0]
    info = ProjectionInfo(gap=gap * (width * width), rel_gap=gap / primal.clamp_min(1e-30),
                          infeasibility=infeasibility, shrink=theta, iterations=its, converged=conv,
                          operator_passes=passes)
    return lo + width * y, info
