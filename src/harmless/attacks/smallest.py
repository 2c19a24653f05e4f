"""The smallest equivalent adversarial example (issue 12, part 3).

Given an adversarial example ``x_adv = x + δ`` and the harmless subspace ``N(A)`` of the model's
linear prefix, every point of ``x_adv + N(A)`` gives the model exactly the same logits (the
paper's equivalent adversarial space). Among those that are still images (inside the pixel box),
the one nearest to ``x`` solves the strictly convex QP::

    min ‖x' − x‖₂   s.t.   A (x' − x_adv) = 0,   lo ≤ x' ≤ hi.

That is the privacy package's affine-box projection with ``anchor = x_adv`` and ``target = x``
(:class:`harmless.privacy.AffineBoxProjector`): the same certified interior-point solver, whose
duality gap bounds the distance of the returned point to the exact optimum. ``δ⊥ = (I − P)δ``
alone would be the unconstrained answer, but it usually leaves the box; the QP keeps the box.

    smallest = SmallestEquivalent(bounds=(0.0, 1.0))
    r = smallest(model, space, PGD(eps=2.0, norm=2)(model, x, y), x)
    r.x_small, r.shrink_l2, r.certificate.distance_bound, r.output_diff, r.label_kept

Since ``x_adv`` itself is feasible, ``‖x_small − x‖ ≤ ‖δ‖``: the shrink factor is at most 1,
exactly (where the solver's point is no nearer, ``x_adv`` itself is returned). The model's
float64 output at ``x_small`` equals its output at ``x_adv`` up to round-off, so the adversarial
label, and with it the attack's success, is kept.

``SmallestEquivalent(norm="inf")`` asks for the L∞-nearest one instead, a linear program::

    min t   s.t.   −t ≤ x' − x ≤ t,   R (x' − x_adv) = 0,   lo ≤ x' ≤ hi,

with ``R`` the orthonormal rows of the row space of ``A`` (well-conditioned equalities; the row
space has fewer unknowns than the null-space form ``x' = x_adv + U c``, whose box rows would be
dense). Each image's LP is solved by HiGHS (:func:`scipy.optimize.linprog`); its certificate is
a Lagrangian lower bound on the optimum, recomputed here from HiGHS's row multipliers, so
``optimality_bound = ‖x_small − x‖∞ − lower bound`` holds whatever the solver did (an LP's
optimum need not be unique, so there is no distance bound, only one on the value).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from harmless import validation
from harmless.attacks.base import AttackResult, Bounds, check_norm
from harmless.attacks.harmless_view import _float64_model, _relative
from harmless.errors import InputError
from harmless.linalg.prefix import eval_mode
from harmless.linalg.subspace import HarmlessSubspace
from harmless.privacy import AffineBoxProjector, PrivacyProblem, ProjectionInfo, box_violation
from harmless.privacy.problem import checked_images
from harmless.privacy.solver import repair

__all__ = ["LPCertificate", "SmallestEquivalent", "SmallestEquivalentResult"]


@dataclass(frozen=True)
class LPCertificate:
    """Per-sample certificate of the L∞ smallest equivalent (the LP of the module docstring).

    ``lower_bound``: a lower bound on the exact optimum ``min ‖x' − x‖∞``, the Lagrangian dual
    function at HiGHS's row multipliers (any multipliers give a valid bound, so it does not rely on
    the solver's accuracy; float64 round-off aside); ``gap``: ``‖x_small − x‖∞ − lower_bound``
    (≥ 0 up to round-off), so the returned L∞ norm is within ``gap`` of the minimum; ``rel_gap``:
    gap / max(‖x_small − x‖∞, 1e-30); ``infeasibility``: ``‖(I − P)(x' − x_adv)‖`` of HiGHS's
    point before the repair, relative to ``(hi − lo) max(1, ‖x_adv‖)`` (after it, the result's
    ``harmful_residual``); ``box_violation``: how far ``x_small`` leaves the box, per sample
    (~1e-12 at most, after the repair); ``shrink``: the factor
    the repair scaled the harmless part by (1: none needed); ``iterations``: simplex/IPM
    iterations (the most over the batch); ``converged``: per sample, HiGHS reported an optimum
    (False also where no LP was needed, ``δ = 0``, with a gap of 0)."""

    gap: torch.Tensor
    lower_bound: torch.Tensor
    rel_gap: torch.Tensor
    infeasibility: torch.Tensor
    box_violation: torch.Tensor
    shrink: torch.Tensor
    iterations: int
    converged: torch.Tensor

    @property
    def optimality_bound(self) -> torch.Tensor:
        """Per sample, ``‖x_small − x‖∞ − min ‖x' − x‖∞ ≤ optimality_bound``."""
        return self.gap.clamp_min(0.0)


@dataclass(frozen=True)
class SmallestEquivalentResult:
    """What :class:`SmallestEquivalent` found, one entry per sample (``B`` samples), in float64.

    ``x_small`` is in the bounds and satisfies ``A (x_small − x_adv) = 0`` up to round-off;
    ``delta_small = x_small − x`` and ``delta = x_adv − x``. The shrink factors are
    ``‖δ_small‖ / ‖δ‖`` (L2 and L∞; NaN where ``δ = 0``: nothing to shrink). ``output_diff`` is the
    relative float64 difference ``‖f(x_small) − f(x_adv)‖ / ‖f(x_adv)‖``; ``y_adv`` and
    ``y_small`` the labels at ``x_adv`` and ``x_small``. ``success`` is the attack's (from the
    :class:`AttackResult`, or ``y_adv ≠ y`` with labels ``y``); ``success_small`` is ``y_small ≠ y``
    with labels, else ``success & label_kept`` (without ``y`` a changed label cannot be judged, so
    it is not counted). ``norm`` is the norm ``x_small`` is nearest to ``x`` in (2 or ``"inf"``).
    With ``norm=2``, ``certificate`` is the projection's :class:`~harmless.privacy.ProjectionInfo`:
    ``certificate.distance_bound`` bounds ``‖x_small − x_small*‖`` to the exact optimum; with
    ``norm="inf"`` it is an :class:`LPCertificate` (a bound on the value, not the distance).
    ``optimality_bound`` bounds, for either norm, how far ``‖δ_small‖`` is above the minimum.
    """

    x_small: torch.Tensor
    delta_small: torch.Tensor
    delta: torch.Tensor
    l2_before: torch.Tensor
    l2_after: torch.Tensor
    linf_before: torch.Tensor
    linf_after: torch.Tensor
    shrink_l2: torch.Tensor
    shrink_linf: torch.Tensor
    output_diff: torch.Tensor
    harmful_residual: torch.Tensor  # ‖A(x_small − x_adv)‖ / (‖A‖ max(1, ‖x_adv‖)), ~1e-16
    y_adv: torch.Tensor
    y_small: torch.Tensor
    label_kept: torch.Tensor
    success: torch.Tensor | None
    success_small: torch.Tensor | None
    certificate: ProjectionInfo | LPCertificate
    bounds: Bounds
    norm: str | int = 2

    @property
    def distance_bound(self) -> torch.Tensor:
        """Per sample, the certified bound on the distance of ``x_small`` to the exact optimum
        (L2 only: the L∞ optimum need not be unique, see :attr:`optimality_bound`)."""
        if isinstance(self.certificate, LPCertificate):
            raise InputError("the L∞ smallest equivalent is an LP, whose optimum need not be unique: it has no "
                             "distance bound; use optimality_bound (a bound on the L∞ norm's excess)")
        return self.certificate.distance_bound

    @property
    def optimality_bound(self) -> torch.Tensor:
        """Per sample, a certified bound on ``‖δ_small‖ − min ‖δ'‖`` in the result's norm (L2: the
        distance bound, by the triangle inequality; L∞: the LP's gap)."""
        if isinstance(self.certificate, LPCertificate):
            return self.certificate.optimality_bound
        return self.certificate.distance_bound

    @property
    def max_output_diff(self) -> float:
        return float(self.output_diff.max())

    @property
    def success_kept(self) -> float | None:
        """Fraction of the attack's successes that ``x_small`` keeps (None without success data)."""
        if self.success is None or self.success_small is None:
            return None
        n = int(self.success.sum())
        return float((self.success & self.success_small).sum()) / n if n else float("nan")


class SmallestEquivalent:
    """The nearest image to ``x`` that the model cannot tell from ``x_adv``: the point of
    ``(x_adv + N(A)) ∩ [lo, hi]^n`` nearest ``x`` in L2 (``norm=2``, a QP) or L∞
    (``norm="inf"``, an LP); see the module docstring.

    Settings: ``norm`` (2 or ``"inf"``), ``bounds`` (the pixel box, default ``(0, 1)``), ``tol``
    and ``max_iter``, all checked here. For ``norm=2`` the last two are the interior-point
    solver's (default ``1e-12`` and 100); for ``norm="inf"`` they are HiGHS's primal and dual
    feasibility tolerance (default ``1e-9``; HiGHS takes none below ``1e-10``) and its iteration
    limit per image (default 100,000). Each object keeps the dense data of every subspace it is
    called on, so reuse one object across batches."""

    def __init__(self, *, norm: object = 2, bounds: Bounds = (0.0, 1.0), tol: float | None = None,
                 max_iter: int | None = None) -> None:
        self.norm: str | int = check_norm(norm)
        if self.norm == 2:
            # The projector checks the settings (through harmless.validation) and owns the solver.
            self._projector = AffineBoxProjector(tol=1e-12 if tol is None else tol,
                                                 max_iter=100 if max_iter is None else max_iter, bounds=bounds)
            self.tol: float = self._projector.tol
            self.max_iter: int = self._projector.max_iter
        else:
            # Only its bounds check and its cache of dense problems are used: HiGHS solves the LP.
            self._projector = AffineBoxProjector(bounds=bounds)
            self.tol = 1e-9 if tol is None else validation.positive_number(tol, "tol")
            if self.tol < _HIGHS_TOL_FLOOR:
                raise InputError(f"tol must be >= {_HIGHS_TOL_FLOOR:g} for norm='inf' (HiGHS's smallest feasibility "
                                 f"tolerance), got {tol!r}")
            self.max_iter = 100_000 if max_iter is None else validation.positive_int(max_iter, "max_iter")
        self.bounds: Bounds = self._projector.bounds

    def __repr__(self) -> str:
        return (f"SmallestEquivalent(norm={self.norm!r}, bounds={self.bounds!r}, tol={self.tol!r}, "
                f"max_iter={self.max_iter!r})")

    def __call__(self, model: nn.Module, space: HarmlessSubspace | PrivacyProblem,
                 adversarial: AttackResult | torch.Tensor, x: torch.Tensor, *,
                 y: torch.Tensor | None = None, progress: bool = False) -> SmallestEquivalentResult:
        """``adversarial``: an :class:`AttackResult` (its ``x_adv`` and ``success``) or a batch
        ``x_adv``; ``x``: the clean images; ``y`` (optional int64 labels) decides success.
        ``space`` is the model's own harmless subspace (or its :class:`~harmless.privacy.
        PrivacyProblem`). ``progress``: a bar over the images' LPs (``norm="inf"``; on a terminal
        only). Nothing passed in is modified."""
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(adversarial, AttackResult):
            success: torch.Tensor | None = adversarial.success.detach().cpu()
            x_adv_in = adversarial.x_adv
        elif isinstance(adversarial, torch.Tensor):
            x_adv_in, success = adversarial, None
        else:
            raise InputError(f"the adversarial examples must be an AttackResult or a tensor x_adv, "
                             f"got {type(adversarial).__name__}")
        problem = self._projector.problem(space)  # dense data made once per subspace, then kept
        # Both are validated and copied to float64 on the CPU here (the solvers' precision);
        # x_adv must lie in the box, or the feasible set could be empty.
        x_adv = checked_images(problem, x_adv_in, "x_adv", bounds=self.bounds)
        x0 = checked_images(problem, x, "x", bounds=self.bounds)
        b = x_adv.shape[0]
        if x0.shape[0] != b:
            raise InputError(f"x has {x0.shape[0]} samples but x_adv has {b}")
        if success is not None and tuple(success.shape) != (b,):
            raise InputError(f"the AttackResult's success must have shape ({b},), got {tuple(success.shape)}")
        if y is not None:
            validation.labels(y, b)

        certificate: ProjectionInfo | LPCertificate
        if self.norm == 2:
            x_small, certificate = self._nearest_l2(problem, x_adv, x0)
        else:
            x_small, certificate = self._nearest_linf(problem, x_adv, x0, progress=progress)
        flat = x_small.reshape(b, -1)
        d = (x_adv - x0).reshape(b, -1)
        d_small = flat - x0.reshape(b, -1)
        moved = flat - x_adv.reshape(b, -1)
        # Relative to the image, not to the move: a move of 1e-9 (DeepFool's δ is almost all
        # harmful, so x_small ≈ x_adv) would otherwise inflate round-off into a large ratio.
        scale = problem.norm * x_adv.reshape(b, -1).norm(dim=1).clamp_min(1.0)
        residual = problem.apply(moved).norm(dim=1) / scale.clamp_min(1e-300)

        m64 = _float64_model(model)
        device = next((t.device for t in m64.parameters()), torch.device("cpu"))
        with eval_mode(m64, who="SmallestEquivalent evaluates it", stacklevel=3), torch.no_grad():
            # One batch, so both points see the same kernels (no batch-size-dependent round-off).
            out = m64(torch.cat([x_adv, x_small]).to(device))
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2 * b:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise InputError(f"the model must return logits of shape (B, classes), got {shape}")
        out = out.cpu()
        f_adv, f_small = out[:b], out[b:]
        if y is not None and bool((y >= f_adv.shape[1]).any()):
            raise InputError(f"labels must be < {f_adv.shape[1]} (the number of classes), got {int(y.max())}")
        y_adv, y_small = f_adv.argmax(dim=1), f_small.argmax(dim=1)
        kept = y_adv == y_small
        success_small: torch.Tensor | None
        if y is not None:
            yc = y.detach().cpu()
            success, success_small = y_adv != yc, y_small != yc
        else:
            success_small = None if success is None else success & kept

        l2, l2s = d.norm(dim=1), d_small.norm(dim=1)
        linf, linfs = d.abs().amax(dim=1), d_small.abs().amax(dim=1)
        nan = torch.full_like(l2, float("nan"))
        return SmallestEquivalentResult(
            x_small=x_small, delta_small=d_small.reshape(x_small.shape), delta=d.reshape(x_small.shape),
            l2_before=l2, l2_after=l2s, linf_before=linf, linf_after=linfs,
            # δ = 0 (an attack that left the sample alone): the ratio is undefined, not 0 or 1.
            shrink_l2=torch.where(l2 > 0, l2s / l2.clamp_min(1e-300), nan),
            shrink_linf=torch.where(linf > 0, linfs / linf.clamp_min(1e-300), nan),
            output_diff=_relative(f_small, f_adv), harmful_residual=residual, y_adv=y_adv, y_small=y_small,
            label_kept=kept, success=success, success_small=success_small, certificate=certificate,
            bounds=self.bounds, norm=self.norm)

    def _nearest_l2(self, problem: PrivacyProblem, x_adv: torch.Tensor,
                    x0: torch.Tensor) -> tuple[torch.Tensor, ProjectionInfo]:
        b = x_adv.shape[0]
        proj = self._projector(problem, x_adv, x0)
        # The interior-point answer is optimal only up to its certificate (its iterates stay
        # ~1e-6 inside the box), while x_adv is feasible exactly: where the solver's point is no
        # nearer to x (δ = 0, or δ already in the row space and inside the box, as DeepFool's
        # almost is), keep x_adv. So ‖δ_small‖ ≤ ‖δ‖ holds exactly, and the certificate still
        # bounds the distance to the optimum (the objective only went down).
        flat_adv = x_adv.reshape(b, -1)
        worse = (proj.y.reshape(b, -1) - x0.reshape(b, -1)).norm(dim=1) >= (flat_adv - x0.reshape(b, -1)).norm(dim=1)
        return torch.where(worse.reshape((b,) + (1,) * (x_adv.dim() - 1)), x_adv, proj.y), proj.info

    def _nearest_linf(self, problem: PrivacyProblem, x_adv: torch.Tensor, x0: torch.Tensor, *,
                      progress: bool) -> tuple[torch.Tensor, LPCertificate]:
        """One LP per image (they share only the constraint matrix), in the variables
        ``(d, t)``, ``d = x' − x``: ``min t`` s.t. ``R d = R δ``, ``±d − t ≤ 0``,
        ``lo − x ≤ d ≤ hi − x``, ``0 ≤ t ≤ ‖δ‖∞`` (the last bound is free: ``x_adv`` is
        feasible with ``t = ‖δ‖∞``, and finite bounds on every variable make the dual bound
        finite). HiGHS's point is then repaired to exact feasibility, as the L2 path's is."""
        from scipy import sparse
        from scipy.optimize import linprog
        from tqdm import tqdm

        b = x_adv.shape[0]
        lo, hi = self.bounds
        xa = x_adv.reshape(b, -1)
        xf = x0.reshape(b, -1)
        row = problem.row.numpy()  # (r, n), orthonormal rows: the equalities are well conditioned
        r, n = row.shape
        a_eq = sparse.hstack([sparse.csr_matrix(row), sparse.csr_matrix((r, 1))]).tocsc()
        eye, ones = sparse.identity(n, format="csr"), sparse.csr_matrix(np.ones((n, 1)))
        a_ub = sparse.vstack([sparse.hstack([eye, -ones]), sparse.hstack([-eye, -ones])]).tocsc()
        b_ub = np.zeros(2 * n)
        cost = np.zeros(n + 1)
        cost[n] = 1.0
        options = {"primal_feasibility_tolerance": self.tol, "dual_feasibility_tolerance": self.tol,
                   "maxiter": self.max_iter}
        # HiGHS's interior-point method (with crossover, so a vertex and its multipliers): on
        # MLP-5/MNIST (784 pixels, 256 equalities) it took 24 iterations and 0.7x the time of
        # the dual simplex (~2,000 iterations; measured on the same images in one run).
        raw = xa.numpy().copy()  # HiGHS's points; x_adv itself where no LP was solved
        polished = raw.copy()  # the same, with its active set made exact (see _polish)
        lower = np.zeros(b)  # ‖·‖∞ ≥ 0: the trivial bound where HiGHS gives no multipliers
        converged = np.zeros(b, dtype=bool)
        iterations = 0
        for k in tqdm(range(b), desc="L∞ smallest equivalent", unit="image", disable=not progress or None):
            xk, delta = xf[k].numpy(), (xa[k] - xf[k]).numpy()
            top = float(np.abs(delta).max())
            if top == 0.0:
                continue  # nothing to shrink: x_adv = x, the optimum 0
            box = np.empty((n + 1, 2))
            box[:n, 0], box[:n, 1], box[n] = lo - xk, hi - xk, (0.0, top)
            b_eq = row @ delta
            res = linprog(cost, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=b_eq, bounds=box,
                          method="highs-ipm", options=options)
            iterations = max(iterations, int(getattr(res, "nit", 0) or 0))
            converged[k] = res.status == 0
            if res.x is not None:
                raw[k] = xk + res.x[:n]
                polished[k] = _polish(row, xa[k].numpy(), raw[k], lo, hi)
            lower[k] = max(0.0, _dual_bound(res, row, b_eq, box, top))
        raw_t = torch.from_numpy(raw)
        # HiGHS meets its equalities and bounds to ~tol; the repair (alternating projections,
        # then a shrink towards x_adv, never a clip) makes the point feasible to round-off.
        y, theta = repair(problem, xa, raw_t.clamp(lo, hi), bounds=self.bounds)
        # The repair may have to shrink a lot where x_adv sits on the box and HiGHS's point is
        # off it by its tolerance (a patchify CNN: theta 0.37, an L∞ gap of 3e-2); the polished
        # point usually needs no shrink. Both are exactly feasible: keep the nearer one.
        y2, theta2 = repair(problem, xa, torch.from_numpy(polished).clamp(lo, hi), bounds=self.bounds)
        better = (y2 - xf).abs().amax(dim=1) < (y - xf).abs().amax(dim=1)
        y, theta = torch.where(better[:, None], y2, y), torch.where(better, theta2, theta)
        infeasibility = problem.harmful(raw_t - xa).norm(dim=1) / ((hi - lo) * xa.norm(dim=1).clamp_min(1.0))
        # x_adv is feasible exactly: where HiGHS's repaired point is no nearer, keep it, so
        # ‖δ_small‖∞ ≤ ‖δ‖∞ holds exactly and the gap below is measured on what is returned.
        before = (xa - xf).abs().amax(dim=1)
        worse = (y - xf).abs().amax(dim=1) >= before
        flat = torch.where(worse[:, None], xa, y)
        primal = (flat - xf).abs().amax(dim=1)
        low = torch.from_numpy(lower)
        gap = primal - low
        cert = LPCertificate(gap=gap, lower_bound=low, rel_gap=gap / primal.clamp_min(1e-30),
                             infeasibility=infeasibility, box_violation=box_violation(flat, self.bounds),
                             shrink=theta, iterations=iterations,
                             converged=torch.from_numpy(converged))
        return flat.reshape(x_adv.shape), cert


def _polish(row: np.ndarray, x_adv: np.ndarray, z: np.ndarray, lo: float, hi: float,
            atol: float = 1e-7) -> np.ndarray:
    """HiGHS's point ``z`` with its active set made exact: pixels within ``atol`` of a bound put
    on it, then the equalities ``row (z − x_adv) = 0`` restored by the least-norm change of the
    other pixels only (they are inside the box by more than ``atol``, and the change is of the
    order of HiGHS's tolerance, so they stay inside). A vertex of the LP keeps its value."""
    z = z.copy()
    at_lo, at_hi = z - lo <= atol, hi - z <= atol
    z[at_lo], z[at_hi] = lo, hi
    free = ~(at_lo | at_hi)
    if free.any():
        change, *_ = np.linalg.lstsq(row[:, free], -(row @ (z - x_adv)), rcond=None)
        z[free] += change
    return z


#: HiGHS refuses primal/dual feasibility tolerances below this.
_HIGHS_TOL_FLOOR = 1e-10


def _dual_bound(res: object, row: np.ndarray, b_eq: np.ndarray, box: np.ndarray, top: float) -> float:
    """A lower bound on the LP's optimum from HiGHS's row multipliers (0 where it gave none).

    For ``min t`` s.t. ``A_ub z ≤ 0``, ``A_eq z = b_eq``, ``l ≤ z ≤ u`` and any multipliers
    ``λ ≥ 0``, ``η``, the Lagrangian dual ``g = −η·b_eq + min_{l≤z≤u} (c + A_ubᵀλ + A_eqᵀη)·z``
    is a lower bound (weak duality); the minimum over the box is separable and exact. SciPy's
    marginals are the objective's sensitivities ``∂f/∂b = −λ, −η``; λ is clipped at 0, so the
    bound stays valid whatever the solver returned (only its tightness depends on it)."""
    n = row.shape[1]
    eqlin, ineqlin = getattr(res, "eqlin", None), getattr(res, "ineqlin", None)
    try:
        eta = -np.asarray(eqlin.marginals, dtype=np.float64)  # type: ignore[union-attr]
        lam = np.maximum(-np.asarray(ineqlin.marginals, dtype=np.float64), 0.0)  # type: ignore[union-attr]
    except AttributeError:
        return 0.0
    if eta.shape != b_eq.shape or lam.shape != (2 * n,) or not (np.isfinite(eta).all() and np.isfinite(lam).all()):
        return 0.0
    plus, minus = lam[:n], lam[n:]
    reduced_d = row.T @ eta + plus - minus  # the coefficient of d in the Lagrangian
    reduced_t = 1.0 - plus.sum() - minus.sum()  # ... and of t
    value = (-eta @ b_eq + np.minimum(reduced_d * box[:n, 0], reduced_d * box[:n, 1]).sum()
             + min(0.0, reduced_t * top))
    return float(value) if math.isfinite(value) else 0.0
