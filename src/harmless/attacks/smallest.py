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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from harmless import validation
from harmless.attacks.base import AttackResult, Bounds
from harmless.attacks.harmless_view import _float64_model, _relative
from harmless.errors import InputError
from harmless.linalg.prefix import eval_mode
from harmless.linalg.subspace import HarmlessSubspace
from harmless.privacy import AffineBoxProjector, PrivacyProblem, ProjectionInfo
from harmless.privacy.problem import checked_images

__all__ = ["SmallestEquivalent", "SmallestEquivalentResult"]


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
    it is not counted). ``certificate`` is the projection's :class:`~harmless.privacy.ProjectionInfo`:
    ``certificate.distance_bound`` bounds ``‖x_small − x_small*‖`` to the exact optimum.
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
    certificate: ProjectionInfo
    bounds: Bounds

    @property
    def distance_bound(self) -> torch.Tensor:
        """Per sample, the certified bound on the distance of ``x_small`` to the exact optimum."""
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
    """The nearest image to ``x`` that the model cannot tell from ``x_adv``: the projection of
    ``x`` onto ``(x_adv + N(A)) ∩ [lo, hi]^n`` (see the module docstring).

    Settings: ``bounds`` (the pixel box, default ``(0, 1)``), ``tol`` and ``max_iter`` of the
    interior-point solver; checked here. Each object keeps the dense data of every subspace it
    is called on (through its :class:`~harmless.privacy.AffineBoxProjector`), so reuse one
    object across batches."""

    def __init__(self, *, bounds: Bounds = (0.0, 1.0), tol: float = 1e-12, max_iter: int = 100) -> None:
        # The projector checks the settings (through harmless.validation) and owns the solver.
        self._projector = AffineBoxProjector(tol=tol, max_iter=max_iter, bounds=bounds)
        self.bounds: Bounds = self._projector.bounds
        self.tol: float = self._projector.tol
        self.max_iter: int = self._projector.max_iter

    def __repr__(self) -> str:
        return f"SmallestEquivalent(bounds={self.bounds!r}, tol={self.tol!r}, max_iter={self.max_iter!r})"

    def __call__(self, model: nn.Module, space: HarmlessSubspace | PrivacyProblem,
                 adversarial: AttackResult | torch.Tensor, x: torch.Tensor, *,
                 y: torch.Tensor | None = None) -> SmallestEquivalentResult:
        """``adversarial``: an :class:`AttackResult` (its ``x_adv`` and ``success``) or a batch
        ``x_adv``; ``x``: the clean images; ``y`` (optional int64 labels) decides success.
        ``space`` is the model's own harmless subspace (or its :class:`~harmless.privacy.
        PrivacyProblem`). Nothing passed in is modified."""
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
        # Both are validated and copied to float64 on the CPU here (the solver's precision);
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

        proj = self._projector(problem, x_adv, x0)
        # The interior-point answer is optimal only up to its certificate (its iterates stay
        # ~1e-6 inside the box), while x_adv is feasible exactly: where the solver's point is no
        # nearer to x (δ = 0, or δ already in the row space and inside the box, as DeepFool's
        # almost is), keep x_adv. So ‖δ_small‖ ≤ ‖δ‖ holds exactly, and the certificate still
        # bounds the distance to the optimum (the objective only went down).
        flat_adv = x_adv.reshape(b, -1)
        worse = (proj.y.reshape(b, -1) - x0.reshape(b, -1)).norm(dim=1) >= (flat_adv - x0.reshape(b, -1)).norm(dim=1)
        x_small = torch.where(worse.reshape((b,) + (1,) * (x_adv.dim() - 1)), x_adv, proj.y)
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
            label_kept=kept, success=success, success_small=success_small, certificate=proj.info,
            bounds=self.bounds)
