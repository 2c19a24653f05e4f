"""What an attacker who knows the model recovers from a privatised image.

The released ``x_hat = x + delta`` has ``delta`` in ``N(A)``, so the harmful part of the original,
``(I - P) x = (I - P) x_hat``, is public to anyone who knows the first linear layer. The attacks,
configured objects called as ``attack(space, x_hat) -> Reconstruction``:

* :class:`MinNormAttack`: ``(I - P) x_hat``, the minimum-norm point of ``x_hat + N(A)``;
* :class:`BoxAttack`: the point of ``{x_hat + N(A)} ∩ [lo, hi]^n`` nearest to the min-norm one;
* :class:`TVAttack`: a total-variation prior: Adam on a smoothed TV of ``x_hat + U c`` (images with
  height and width) with a penalty for leaving ``[lo, hi]``, finished by the exact projection onto
  ``{x_hat + N(A)} ∩ [lo, hi]^n``;
* :class:`TVLPAttack`: the same prior solved exactly: the image of least anisotropic total
  variation in ``{x_hat + N(A)} ∩ [lo, hi]^n``, a linear program (HiGHS through SciPy), made
  exactly feasible by the projection's repair step. Its optimum is global, so it is the attack
  to report; :class:`TVAttack` is the one that scales to images whose LP would be too large.

Each reconstruction lies in the set of images the model cannot tell apart from ``x``. That set
is the same for every harmless ``x_hat`` released for ``x``, so no choice of ``x_hat`` changes what
these attacks recover. :class:`Audit` runs several and scores them against the original.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy import sparse
from scipy.optimize import linprog

from harmless import validation
from harmless.errors import InputError
from harmless.linalg.subspace import HarmlessSubspace
from harmless.privacy.problem import (
    Bounds,
    Configured,
    PrivacyProblem,
    box_violation,
    check_solver,
    checked_images,
)
from harmless.privacy.solver import ProjectionInfo, project, repair

__all__ = ["Audit", "AuditAttack", "AuditResult", "AttackScore", "BoxAttack", "MinNormAttack", "Reconstruction",
           "TVAttack", "TVLPAttack"]


@dataclasses.dataclass
class Reconstruction:
    """What one attack recovered from a released batch.

    ``x_rec`` ``(B, *input_shape)``, float64; per sample ``box_violation``
    ``max(0, lo - x_rec, x_rec - hi)`` and ``output_deviation`` ``||A (x_rec - x_hat)||`` (round-off:
    every reconstruction has the released image's output); ``projection``: the certificate of
    the final projection, for the attacks that end with one (box, TV), else ``None``."""

    x_rec: torch.Tensor
    attack: str
    box_violation: torch.Tensor
    output_deviation: torch.Tensor
    projection: ProjectionInfo | None = None


class AuditAttack(Configured, abc.ABC):
    """A configured attack on released images: ``attack(space, x_hat) -> Reconstruction``.
    ``name`` identifies it in an :class:`AuditResult`."""

    name: str = ""

    @abc.abstractmethod
    def __call__(self, space: HarmlessSubspace | PrivacyProblem, x_hat: torch.Tensor) -> Reconstruction:
        ...

    def _reconstruction(self, problem: PrivacyProblem, xh: torch.Tensor, rec: torch.Tensor,
                        info: ProjectionInfo | None = None) -> Reconstruction:
        flat = rec.reshape(rec.shape[0], -1)
        dev = problem.apply(flat - xh.reshape(xh.shape[0], -1)).norm(dim=1)
        return Reconstruction(x_rec=rec.reshape(-1, *problem.input_shape), attack=self.name,
                              box_violation=box_violation(flat, self.bounds), output_deviation=dev, projection=info)

    def _check_images(self, problem: PrivacyProblem) -> None:
        if len(problem.input_shape) != 3:
            raise InputError(f"{type(self).__name__} needs image inputs (C, H, W), got input shape "
                             f"{problem.input_shape}")


class MinNormAttack(AuditAttack):
    """``(I - P) x_hat`` (may leave the bounds; ``bounds`` only measure by how much)."""

    name = "min_norm"

    def __init__(self, *, bounds: Bounds = (0.0, 1.0)) -> None:
        super().__init__()
        self.bounds = validation.bounds(bounds)

    def __call__(self, space: HarmlessSubspace | PrivacyProblem, x_hat: torch.Tensor) -> Reconstruction:
        problem = self.problem(space)
        xh = checked_images(problem, x_hat, "x_hat")
        return self._reconstruction(problem, xh, problem.harmful(xh.reshape(xh.shape[0], -1)))


class BoxAttack(AuditAttack):
    """The nearest point to ``(I - P) x_hat`` in ``{x_hat + N(A)} ∩ [lo, hi]^n`` (``x_hat`` in the
    bounds), to ``tol`` within ``max_iter`` interior-point iterations."""

    name = "box"

    def __init__(self, *, tol: float = 1e-12, max_iter: int = 100, bounds: Bounds = (0.0, 1.0)) -> None:
        super().__init__()
        self.tol, self.max_iter = check_solver(tol, max_iter)
        self.bounds = validation.bounds(bounds)

    def __call__(self, space: HarmlessSubspace | PrivacyProblem, x_hat: torch.Tensor) -> Reconstruction:
        problem = self.problem(space)
        xh = checked_images(problem, x_hat, "x_hat", bounds=self.bounds).reshape(-1, problem.n)
        y, info = project(problem, xh, problem.harmful(xh), bounds=self.bounds, tol=self.tol, max_iter=self.max_iter)
        return self._reconstruction(problem, xh, y, info)


def _tv(y: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    dh = y[..., 1:, :-1] - y[..., :-1, :-1]
    dw = y[..., :-1, 1:] - y[..., :-1, :-1]
    return torch.sqrt(dh ** 2 + dw ** 2 + eps ** 2).flatten(1).sum(1)


class TVAttack(AuditAttack):
    """Smoothed-TV minimisation over ``{x_hat + N(A)} ∩ [lo, hi]^n`` (see the module docstring):
    ``steps`` Adam steps of rate ``lr`` from the min-norm point, ``penalty`` on leaving the bounds,
    then the exact projection (``tol``, ``max_iter``).

    The call's ``images`` maps the batch to the images whose TV is minimised, e.g.
    :meth:`Tiling.merge <harmless.privacy.tiles.Tiling.merge>` when the batch holds the tiles of
    larger images, so that the prior also ties neighbouring tiles together; default: the batch
    itself."""

    name = "tv"

    def __init__(self, *, steps: int = 200, lr: float = 0.02, penalty: float = 100.0, tol: float = 1e-12,
                 max_iter: int = 100, bounds: Bounds = (0.0, 1.0)) -> None:
        super().__init__()
        self.steps = validation.positive_int(steps, "steps")
        self.lr = validation.positive_number(lr, "lr")
        self.penalty = validation.positive_number(penalty, "penalty")
        self.tol, self.max_iter = check_solver(tol, max_iter)
        self.bounds = validation.bounds(bounds)

    def __call__(self, space: HarmlessSubspace | PrivacyProblem, x_hat: torch.Tensor, *,
                 images: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Reconstruction:
        problem = self.problem(space)
        self._check_images(problem)
        xh = checked_images(problem, x_hat, "x_hat", bounds=self.bounds)
        lo, hi = self.bounds
        b = xh.shape[0]
        flat = xh.reshape(b, -1)
        start = problem.null @ (problem.harmful(flat) - flat).T  # coefficients of the min-norm point
        c = start.T.clone().requires_grad_(True)
        opt = torch.optim.Adam([c], lr=self.lr)
        for _ in range(self.steps):
            opt.zero_grad()
            y = flat + c @ problem.null
            viol = (torch.relu(lo - y) ** 2 + torch.relu(y - hi) ** 2).sum(1)
            batch = y.reshape(b, *problem.input_shape)
            loss = _tv(batch if images is None else images(batch)).sum() + self.penalty * viol.sum()
            loss.backward()
            opt.step()
        with torch.no_grad():
            y = flat + c.detach() @ problem.null
            out, info = project(problem, flat, y, bounds=self.bounds, tol=self.tol, max_iter=self.max_iter)
        return self._reconstruction(problem, xh, out, info)


def _differences(shape: tuple[int, ...]) -> sparse.csr_matrix:
    """Forward differences along height and width, per channel, as a sparse ``(p, n)`` matrix."""
    idx = np.arange(int(np.prod(shape))).reshape(shape)
    pairs = [(idx[..., 1:, :], idx[..., :-1, :]), (idx[..., :, 1:], idx[..., :, :-1])]
    blocks = []
    for a, b in pairs:
        m = a.size
        rows = np.arange(m)
        values = np.r_[np.ones(m), -np.ones(m)]
        blocks.append(sparse.csr_matrix((values, (np.r_[rows, rows], np.r_[a.ravel(), b.ravel()])),
                                        shape=(m, idx.size)))
    return sparse.vstack(blocks).tocsr()


_TIGHT = {"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10, "ipm_optimality_tolerance": 1e-10}


class TVLPAttack(AuditAttack):
    """The image of least anisotropic total variation ``sum |z_i - z_j|`` (horizontal and vertical
    neighbours, per channel) among all with the model's output on ``x_hat``, exactly:

        min 1.s  s.t.  -s <= D z <= s,  A z = A x_hat,  lo <= z <= hi,

    an LP per image solved by HiGHS (``scipy.optimize.linprog``: interior point with crossover at
    tolerances of 1e-10, else at HiGHS's defaults of 1e-7, else the dual simplex), then made
    exactly feasible by the projection's repair step. About 3 s for a 28x28 image and 10 s for a
    3x32x32 one on a 2-core machine; ``progress`` shows a bar on a terminal."""

    name = "tv_lp"

    def __init__(self, *, progress: bool = False, bounds: Bounds = (0.0, 1.0)) -> None:
        super().__init__()
        self.progress = bool(validation.flag(progress, "progress"))
        self.bounds = validation.bounds(bounds)

    def __call__(self, space: HarmlessSubspace | PrivacyProblem, x_hat: torch.Tensor) -> Reconstruction:
        from tqdm import tqdm

        problem = self.problem(space)
        self._check_images(problem)
        xh = checked_images(problem, x_hat, "x_hat", bounds=self.bounds).reshape(-1, problem.n)
        lo, hi = self.bounds
        n = problem.n
        diff = _differences(problem.input_shape)
        p = diff.shape[0]
        a = problem.matrix.numpy()
        a_sparse = sparse.csr_matrix(np.where(a != 0, a, 0.0))
        eye = sparse.identity(p, format="csr")
        a_ub = sparse.vstack([sparse.hstack([diff, -eye]), sparse.hstack([-diff, -eye])]).tocsr()
        a_eq = sparse.hstack([a_sparse, sparse.csr_matrix((a.shape[0], p))]).tocsr()
        cost = np.r_[np.zeros(n), np.ones(p)]
        var_bounds = np.c_[np.r_[np.full(n, lo), np.zeros(p)], np.r_[np.full(n, hi), np.full(p, np.inf)]]
        out = []
        for k, row in enumerate(tqdm(xh, desc="tv-lp attack", unit="image", disable=not self.progress or None)):
            v = row.numpy()
            # tight tolerances first; HiGHS's interior point sometimes gives up on them (MNIST's
            # digits), and its defaults (1e-7) are then good enough: the repair below is exact. The
            # dual simplex, last, is slower (~10x) but the most robust
            for method, options in (("highs-ipm", _TIGHT), ("highs-ipm", {}), ("highs-ds", {})):
                res = linprog(cost, A_ub=a_ub, b_ub=np.zeros(2 * p), A_eq=a_eq, b_eq=a @ v, bounds=var_bounds,
                              method=method, options=options)
                if res.status == 0:
                    break
            if res.status != 0:  # the LP is feasible (x_hat itself) and bounded (TV >= 0): the solver failed
                raise RuntimeError(f"TVLPAttack: HiGHS failed on image {k}: {res.message}")
            out.append(torch.from_numpy(res.x[:n]))
        # the LP's point is feasible to ~1e-13 and sits on faces of the box, where an interior-point
        # projection would only blur it by ~sqrt(mu): repair it in place instead
        exact, _ = repair(problem, xh, torch.stack(out), bounds=self.bounds)
        return self._reconstruction(problem, xh, exact)


# ---------------------------------------------------------------------------------------------
# Scoring attacks against the original.


@dataclasses.dataclass
class AttackScore:
    """Mean similarity of one attack's reconstruction (or of the released image) to the original:
    SSIM, PSNR and, when asked for, LPIPS; computed on both mapped to [0, 1] and clipped there."""

    ssim: float
    psnr: float
    lpips: float | None = None


@dataclasses.dataclass
class AuditResult:
    """``scores``: per attack name, and ``"released"`` for ``x_hat`` itself; ``reconstructions``:
    per attack name."""

    scores: dict[str, AttackScore]
    reconstructions: dict[str, Reconstruction]


class Audit(Configured):
    """Run several attacks on ``x_hat`` and score each reconstruction against the original ``x``:
    ``Audit()(space, x, x_hat) -> AuditResult``, for image inputs ``(C, H, W)`` (the scores are
    image metrics). ``attacks`` default to the min-norm, box, smoothed-TV and exact-TV attacks;
    every attack must use the audit's ``bounds``. They share one :class:`PrivacyProblem` per
    subspace."""

    def __init__(self, attacks: Sequence[AuditAttack] | None = None, *, lpips: bool = True,
                 bounds: Bounds = (0.0, 1.0)) -> None:
        super().__init__()
        self.bounds = validation.bounds(bounds)
        if attacks is None:
            attacks = (MinNormAttack(bounds=self.bounds), BoxAttack(bounds=self.bounds), TVAttack(bounds=self.bounds),
                       TVLPAttack(bounds=self.bounds))
        attacks = tuple(attacks)
        for attack in attacks:
            if not isinstance(attack, AuditAttack):
                raise InputError(f"attacks must be AuditAttack objects, got {type(attack).__name__}")
            if attack.bounds != self.bounds:
                raise InputError(f"{type(attack).__name__} has bounds {attack.bounds}, the audit {self.bounds}")
        if len({a.name for a in attacks}) != len(attacks):
            raise InputError("two attacks share a name; their scores would collide")
        if not isinstance(lpips, bool):
            raise InputError(f"lpips must be True or False, got {lpips!r}")
        self.attacks, self.lpips = attacks, lpips

    def __call__(self, space: HarmlessSubspace | PrivacyProblem, x: torch.Tensor, x_hat: torch.Tensor) -> AuditResult:
        from harmless import metrics

        problem = self.problem(space)
        if len(problem.input_shape) != 3:
            raise InputError(f"Audit scores images (C, H, W); the input shape is {problem.input_shape}")
        lo, hi = self.bounds
        xs = checked_images(problem, x, "x", bounds=self.bounds)
        xh = checked_images(problem, x_hat, "x_hat", bounds=self.bounds)
        if xs.shape[0] != xh.shape[0]:
            raise InputError(f"x_hat has {xh.shape[0]} samples but x has {xs.shape[0]}")
        recs = {a.name: a(problem, xh) for a in self.attacks}
        ref = (xs - lo) / (hi - lo)  # the metrics measure images in [0, 1]
        scores: dict[str, AttackScore] = {}
        for name, rec in [("released", xh)] + [(k, r.x_rec) for k, r in recs.items()]:
            r = ((rec - lo) / (hi - lo)).clamp(0.0, 1.0)
            scores[name] = AttackScore(ssim=float(metrics.ssim(r, ref).mean()), psnr=float(metrics.psnr(r, ref).mean()),
                                       lpips=float(metrics.lpips(r, ref).mean()) if self.lpips else None)
        return AuditResult(scores=scores, reconstructions=recs)
