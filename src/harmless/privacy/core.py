"""Privacy protection with harmless perturbations (Chen et al., AAAI 2025, Algorithm 1).

A sensitive image ``x`` is replaced by ``x_hat = x + delta`` with ``delta`` in the harmless
subspace ``N(A)`` of the model's linear prefix ``A``: the model's output on ``x_hat`` equals
its output on ``x`` exactly, while ``x_hat`` should look unlike ``x``.

Privatisers are configured objects, as the attacks of Foolbox 3 and of :mod:`harmless.attacks`:
their settings (solver tolerance, steps, pixel bounds, ...) are checked once, in the
constructor; the data (subspace, images, random generator) come with each call, which returns
a typed result::

    privatize = DecoyPrivatizer(decoy="grey", bounds=(0.0, 1.0))
    r = privatize(space, x)                  # a DecoyResult
    r.x_hat, r.projection.distance_bound

Everything works in float64 with a dense factorisation of ``A`` (inputs of a few thousand
pixels: MNIST, CIFAR-10; larger images tile by tile, :mod:`harmless.privacy.tiles`). Each
object keeps that factorisation per subspace it has seen (:class:`~harmless.privacy.problem.
ProblemCache`); to share it between objects, pass a :class:`~harmless.privacy.problem.
PrivacyProblem` instead of the subspace. The projection and its certificate are in
:mod:`harmless.privacy.solver`.
"""

from __future__ import annotations

import abc
import dataclasses
import math

import torch

from harmless import validation
from harmless.errors import InputError
from harmless.linalg.subspace import HarmlessSubspace
from harmless.privacy.matrix_free import MatrixFreeProblem
from harmless.privacy.matrix_free import project as project_matrix_free
from harmless.privacy.problem import (
    Bounds,
    Configured,
    PrivacyProblem,
    box_violation,
    check_solver,
    checked_images,
)
from harmless.privacy.solver import ProjectionInfo, project

__all__ = [
    "AffineBoxProjector", "DecoyPrivatizer", "DecoyResult", "PaperPrivatizer", "PaperResult", "PrivatizeResult",
    "Privatizer", "ProjectionResult", "Quantizer", "QuantizeResult", "make_decoy",
]

#: The kinds of decoy :func:`make_decoy` makes (with their aliases).
DECOY_KINDS = ("grey", "gray", "noise", "shift", "other")


# ---------------------------------------------------------------------------------------------
# Projection onto {anchor + N(A)} ∩ [lo, hi]^n.


def _project(problem: PrivacyProblem | MatrixFreeProblem, anchor: torch.Tensor, target: torch.Tensor, *,
             bounds: Bounds, tol: float, max_iter: int, progress: bool | None) -> tuple[torch.Tensor, ProjectionInfo]:
    """The dense interior-point projection, or the matrix-free one for prefixes too large for it."""
    if isinstance(problem, MatrixFreeProblem):
        return project_matrix_free(problem, anchor, target, bounds=bounds, tol=tol, max_iter=max_iter,
                                   progress=progress)
    return project(problem, anchor, target, bounds=bounds, tol=tol, max_iter=max_iter)


@dataclasses.dataclass
class ProjectionResult:
    """``y`` ``(B, *input_shape)``: the projections; ``info``: their certificate."""

    y: torch.Tensor
    info: ProjectionInfo


class AffineBoxProjector(Configured):
    """The nearest point to ``target`` in ``{anchor + N(A)} ∩ [lo, hi]^n``, per sample.

    Solved by an interior-point method until the relative primal and dual residuals and the
    mean complementarity are below ``tol``, for at most ``max_iter`` iterations. The result is in
    ``bounds`` and harmless up to round-off; ``info.gap`` bounds its suboptimality and
    ``info.converged`` says which samples met ``tol``. ``anchor`` must lie in the box (so the
    set is not empty).

    Where the dense bases do not fit (a convolutional stem at 224 px), the projection is made
    matrix-free (:mod:`harmless.privacy.matrix_free`; ``max_iter`` then counts its L-BFGS
    iterations per image, ``progress`` shows a bar per image: ``None`` on a terminal only)."""

    def __init__(self, *, tol: float = 1e-12, max_iter: int = 100, bounds: Bounds = (0.0, 1.0),
                 progress: bool | None = None) -> None:
        super().__init__()
        self.tol, self.max_iter = check_solver(tol, max_iter)
        self.bounds = validation.bounds(bounds)
        self.progress = validation.flag(progress, "progress", allow_none=True)

    def __call__(self, space: HarmlessSubspace | PrivacyProblem, anchor: torch.Tensor,
                 target: torch.Tensor) -> ProjectionResult:
        problem = self.solver_problem(space)
        a = checked_images(problem, anchor, "anchor", bounds=self.bounds).reshape(-1, problem.n)
        t = checked_images(problem, target, "target").reshape(-1, problem.n)
        if t.shape[0] != a.shape[0]:
            raise InputError(f"target has {t.shape[0]} samples but anchor has {a.shape[0]}")
        y, info = _project(problem, a, t, bounds=self.bounds, tol=self.tol, max_iter=self.max_iter,
                           progress=self.progress)
        return ProjectionResult(y.reshape(-1, *problem.input_shape), info)


# ---------------------------------------------------------------------------------------------
# Privatisation.


@dataclasses.dataclass
class PrivatizeResult:
    """A privatised batch.

    ``x_hat`` (float64, ``(B, *input_shape)``, in ``bounds``), ``delta = x_hat - x`` (harmless);
    per sample: ``box_violation`` ``max(0, lo - x_hat, x_hat - hi)``, ``output_deviation``
    ``||A (x_hat - x)||`` of the linear prefix, ``harmful_residual`` ``||A delta|| / (||A|| ||delta||)``,
    ``mse`` ``mean((x_hat - x)^2)``; ``method`` (``"paper"``, ``"decoy-grey"``, ...) and the
    certificate of the final projection (``projection``).
    """

    x_hat: torch.Tensor
    delta: torch.Tensor
    box_violation: torch.Tensor
    output_deviation: torch.Tensor
    harmful_residual: torch.Tensor
    mse: torch.Tensor
    method: str
    bounds: Bounds
    projection: ProjectionInfo


@dataclasses.dataclass
class DecoyResult(PrivatizeResult):
    """:class:`PrivatizeResult` of :class:`DecoyPrivatizer`; ``decoy``: the target it was pulled
    towards, per sample."""

    decoy: torch.Tensor


@dataclasses.dataclass
class PaperResult(PrivatizeResult):
    """:class:`PrivatizeResult` of :class:`PaperPrivatizer`; ``raw_box_violation``: per sample,
    before the final projection; ``objective``: the mean objective every 50 Adam steps."""

    raw_box_violation: torch.Tensor
    objective: list[float]


def _measured(problem: PrivacyProblem | MatrixFreeProblem, x: torch.Tensor, x_hat: torch.Tensor,
              bounds: Bounds) -> dict[str, torch.Tensor]:
    """The per-sample fields every :class:`PrivatizeResult` carries."""
    b = x.shape[0]
    x_hat = x_hat.reshape(b, -1)
    d = x_hat - x.reshape(b, -1)
    out = problem.apply(d).norm(dim=1)
    res = out / (problem.norm * d.norm(dim=1)).clamp_min(1e-300)
    return {"x_hat": x_hat.reshape(b, *problem.input_shape), "delta": d.reshape(b, *problem.input_shape),
            "box_violation": box_violation(x_hat, bounds), "output_deviation": out, "harmful_residual": res,
            "mse": (d ** 2).mean(dim=1)}


class Privatizer(Configured, abc.ABC):
    """A configured privatiser: ``privatizer(space, x, generator=None) -> PrivatizeResult``.

    ``space`` is a :class:`~harmless.linalg.subspace.HarmlessSubspace` (its dense data are made
    on the first call and kept for the next) or a :class:`~harmless.privacy.problem.PrivacyProblem`;
    ``x`` a batch ``(B, *input_shape)`` in ``bounds`` (not modified)."""

    @abc.abstractmethod
    def __call__(self, space: HarmlessSubspace | PrivacyProblem, x: torch.Tensor, *,
                 generator: torch.Generator | None = None) -> PrivatizeResult:
        ...


class PaperPrivatizer(Privatizer):
    """Algorithm 1 of the paper: maximise ``MSE(x_hat, x) - penalty * mean(box violation^2)`` over
    the harmless coefficients ``c`` (``x_hat = x + U c``) with Adam (``steps`` steps of rate
    ``lr``) from a random start of RMS ``init_scale`` per pixel (relative to ``hi - lo``; the
    objective is flat at ``c = 0``), then restore feasibility inside the affine set: ``x_hat`` is
    replaced by its projection onto ``{x + U c} ∩ [lo, hi]^n`` (not clipped, which would break
    harmlessness), to ``tol`` within ``max_iter`` interior-point iterations. The random start
    comes from ``generator`` (default: a generator seeded with 0, so calls repeat)."""

    def __init__(self, *, steps: int = 300, lr: float = 0.05, penalty: float = 10.0, init_scale: float = 0.1,
                 tol: float = 1e-12, max_iter: int = 100, bounds: Bounds = (0.0, 1.0)) -> None:
        super().__init__()
        self.steps = validation.positive_int(steps, "steps")
        self.lr = validation.positive_number(lr, "lr")
        self.penalty = validation.positive_number(penalty, "penalty")
        self.init_scale = validation.positive_number(init_scale, "init_scale")
        self.tol, self.max_iter = check_solver(tol, max_iter)
        self.bounds = validation.bounds(bounds)

    def __call__(self, space: HarmlessSubspace | PrivacyProblem, x: torch.Tensor, *,
                 generator: torch.Generator | None = None) -> PaperResult:
        problem = self.problem(space)
        xs = checked_images(problem, x, "x", bounds=self.bounds)
        gen = validation.generator(generator)
        if gen is None:
            gen = torch.Generator().manual_seed(0)  # a fixed start, so that calls repeat
        lo, hi = self.bounds
        b = xs.shape[0]
        flat = xs.reshape(b, -1)
        u = problem.null  # (d, n)
        c0 = torch.randn(b, problem.dim, generator=gen, dtype=torch.float64)
        c0 = c0 * (self.init_scale * (hi - lo) * math.sqrt(problem.n) / c0.norm(dim=1, keepdim=True))
        c = c0.clone().requires_grad_(True)
        opt = torch.optim.Adam([c], lr=self.lr)
        history = []
        for step in range(self.steps):
            opt.zero_grad()
            y = flat + c @ u
            mse = ((y - flat) ** 2).mean(dim=1)
            viol = (torch.relu(lo - y) ** 2 + torch.relu(y - hi) ** 2).mean(dim=1)
            loss = -(mse - self.penalty * viol).sum()
            loss.backward()
            opt.step()
            if step % 50 == 0 or step == self.steps - 1:
                history.append(float((mse - self.penalty * viol).mean().detach()))
        with torch.no_grad():
            y = flat + c.detach() @ u
            raw_violation = box_violation(y, self.bounds)
            x_hat, info = project(problem, flat, y, bounds=self.bounds, tol=self.tol, max_iter=self.max_iter)
        return PaperResult(**_measured(problem, xs, x_hat, self.bounds), method="paper", bounds=self.bounds,
                           projection=info, raw_box_violation=raw_violation, objective=history)


def make_decoy(kind: str | torch.Tensor, x: torch.Tensor, *, generator: torch.Generator | None = None,
               bounds: Bounds = (0.0, 1.0)) -> torch.Tensor:
    """A decoy batch shaped like ``x``: ``"grey"`` (the middle of ``bounds`` everywhere),
    ``"noise"`` (uniform in ``bounds``), ``"shift"`` (the batch rolled by one: every image's decoy
    is another image of the batch), or a tensor (one image broadcast to the batch, or a batch)."""
    lo, hi = validation.bounds(bounds)
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
        return torch.full(x.shape, (lo + hi) / 2, dtype=torch.float64)
    if kind == "noise":
        return lo + (hi - lo) * torch.rand(x.shape, generator=gen, dtype=torch.float64)
    if kind in ("shift", "other"):
        if x.shape[0] < 2:
            raise InputError("decoy 'shift' needs a batch of at least 2 images")
        return torch.roll(x.detach().to(torch.float64), 1, dims=0)
    raise InputError(f"unknown decoy {kind!r}: use 'grey', 'noise', 'shift' or an image tensor")


class DecoyPrivatizer(Privatizer):
    """Our convex formulation: ``min ||x_hat - t||^2  s.t.  A x_hat = A x, lo <= x_hat <= hi``, with
    ``t`` the decoy: the projection of ``t`` onto ``{x + N(A)} ∩ [lo, hi]^n``, to ``tol`` within
    ``max_iter`` interior-point iterations. ``decoy``: ``"grey"``, ``"noise"``, ``"shift"`` or an
    image tensor (see :func:`make_decoy`). ``result.projection`` certifies the answer per sample
    (``converged``, ``gap``, ``distance_bound``).

    ``target=`` in the call replaces the configured decoy by explicit per-sample targets
    ``(B, *input_shape)``: decoys made on whole images and then cut into tiles, whose kind
    (``"shift"``, ``"noise"``) means something for the images, not for the tiles.

    Where the dense bases do not fit, the projection is made matrix-free, as in
    :class:`AffineBoxProjector` (``progress``: a bar per image; ``None``: on a terminal only)."""

    def __init__(self, *, decoy: str | torch.Tensor = "grey", tol: float = 1e-12, max_iter: int = 100,
                 bounds: Bounds = (0.0, 1.0), progress: bool | None = None) -> None:
        super().__init__()
        if isinstance(decoy, torch.Tensor):
            if not decoy.is_floating_point() or not bool(torch.isfinite(decoy).all()):
                raise InputError("decoy must be a floating-point image tensor with finite values")
            decoy = decoy.detach().to(torch.float64).clone()
        elif decoy not in DECOY_KINDS:
            raise InputError(f"unknown decoy {decoy!r}: use 'grey', 'noise', 'shift' or an image tensor")
        self.decoy: str | torch.Tensor = decoy
        self.tol, self.max_iter = check_solver(tol, max_iter)
        self.bounds = validation.bounds(bounds)
        self.progress = validation.flag(progress, "progress", allow_none=True)

    @property
    def method(self) -> str:
        """``"decoy-grey"``, ``"decoy-noise"``, ...; ``"decoy-image"`` for a tensor decoy."""
        return f"decoy-{self.decoy}" if isinstance(self.decoy, str) else "decoy-image"

    def __call__(self, space: HarmlessSubspace | PrivacyProblem, x: torch.Tensor, *,
                 generator: torch.Generator | None = None, target: torch.Tensor | None = None) -> DecoyResult:
        problem = self.solver_problem(space)
        xs = checked_images(problem, x, "x", bounds=self.bounds)
        validation.generator(generator)
        t = make_decoy(self.decoy if target is None else target, xs, generator=generator, bounds=self.bounds)
        t = checked_images(problem, t, "decoy")
        b = xs.shape[0]
        x_hat, info = _project(problem, xs.reshape(b, -1), t.reshape(b, -1), bounds=self.bounds, tol=self.tol,
                               max_iter=self.max_iter, progress=self.progress)
        method = self.method if target is None else "decoy-image"
        return DecoyResult(**_measured(problem, xs, x_hat, self.bounds), method=method, bounds=self.bounds,
                           projection=info, decoy=t)


# ---------------------------------------------------------------------------------------------
# 8-bit output.


@dataclasses.dataclass
class QuantizeResult:
    """``naive``: every pixel rounded to the nearest of 256 levels spanning the bounds;
    ``improved``: after greedy single-level flips that reduce ``||A (q - x)||``. Per sample
    ``*_deviation`` is ``||A (q - x)||``; ``flips`` how many pixels the greedy pass changed."""

    naive: torch.Tensor
    improved: torch.Tensor
    naive_deviation: torch.Tensor
    improved_deviation: torch.Tensor
    flips: torch.Tensor


class Quantizer(Configured):
    """Round a privatised batch to 8 bits (256 levels from ``lo`` to ``hi``), then greedily move
    single pixels by one level (staying on the grid, inside the bounds) while that reduces
    ``||A (q - x)||``, the best move per image per round, all images at once, for at most
    ``max_flips`` rounds: ``Quantizer()(space, x_hat, x) -> QuantizeResult``."""

    def __init__(self, *, max_flips: int = 5000, bounds: Bounds = (0.0, 1.0)) -> None:
        super().__init__()
        self.max_flips = validation.positive_int(max_flips, "max_flips")
        self.bounds = validation.bounds(bounds)

    def __call__(self, space: HarmlessSubspace | PrivacyProblem, x_hat: torch.Tensor,
                 x: torch.Tensor) -> QuantizeResult:
        problem = self.problem(space)
        lo, hi = self.bounds
        width = hi - lo
        xs = checked_images(problem, x, "x", bounds=self.bounds).reshape(-1, problem.n)
        xh = checked_images(problem, x_hat, "x_hat", bounds=self.bounds).reshape(-1, problem.n)
        if xs.shape[0] != xh.shape[0]:
            raise InputError(f"x_hat has {xh.shape[0]} samples but x has {xs.shape[0]}")
        levels = torch.round((xh - lo) / width * 255.0)
        naive = lo + width * (levels / 255.0)
        amat = problem.matrix
        gram = problem.gram  # (n, n), kept by the problem for the next batch
        diag = torch.diagonal(gram)
        r = problem.apply(naive - xs)  # (B, m)
        g = r @ amat  # A^T r, (B, n)
        lv = levels.clone()
        flips = torch.zeros(xs.shape[0], dtype=torch.int64)
        rows = torch.arange(xs.shape[0])
        h = width / 255.0
        # a move must lower ||r||^2 by more than round-off, which scales with the grid step squared
        threshold = -1e-18 * (width * width)
        for _ in range(self.max_flips):
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
            move = best < threshold
            if not bool(move.any()):
                break
            rr, ii, ss = rows[move], idx[move], sign[move]
            lv[rr, ii] += ss
            g[rr] += (ss * h)[:, None] * gram[ii]
            flips[rr] += 1
        improved = lo + width * (lv / 255.0)
        shape = problem.input_shape
        return QuantizeResult(
            naive=naive.reshape(-1, *shape), improved=improved.reshape(-1, *shape),
            naive_deviation=problem.apply(naive - xs).norm(dim=1),
            improved_deviation=problem.apply(improved - xs).norm(dim=1), flips=flips)
