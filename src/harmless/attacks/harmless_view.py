"""Adversarial perturbations seen through the harmless subspace (the paper's Theorems 3–5, Fig 4).

For a model whose linear prefix ``A`` has a harmless subspace ``N(A)`` (``P`` its orthogonal
projector), every perturbation splits as ``δ = Pδ + δ⊥`` with ``δ⊥ = (I − P)δ``, and the model
cannot tell ``x + δ`` from ``x + δ⊥`` nor from ``x + δ + h`` for any harmless ``h`` of any
size: every adversarial example has an unbounded "equivalent adversarial space". Two tools::

    space = harmless.harmless_subspace(model, (1, 28, 28))
    r = PGD(eps=1.5, steps=20, norm=2)(model, x, y)
    harmless_fraction(space, r)                          # ρ = ‖Pδ‖² / ‖δ‖² per sample
    rep = equivalent_check(model, space, x, r, y=y)      # f(x+δ) vs f(x+δ⊥) vs f(x+δ+s‖δ‖h)
    rep.max_perp_diff, rep.max_harmless_diff, rep.label_kept

The equality ``f(x + δ) = f(x + δ⊥)`` holds for *every* δ, whether or not an attack's box
clipping shaped it: clipping only changes how large ``Pδ`` is (and ``x + δ⊥`` or ``x + δ + h``
may then leave the image box, which the linear argument does not care about). What is left is
floating-point round-off, ~1e-15 relative in float64; the checks therefore run the model in
float64 (a float64 copy of a float32 model; its weights are exact float64 numbers).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from harmless import validation
from harmless.attacks.base import AttackResult
from harmless.errors import InputError
from harmless.linalg.prefix import eval_mode
from harmless.linalg.subspace import HarmlessSubspace

__all__ = ["EquivalenceReport", "equivalent_check", "harmless_fraction"]

DeltaLike = AttackResult | torch.Tensor


def _delta_of(delta: object, space: HarmlessSubspace, name: str = "delta") -> torch.Tensor:
    """The perturbation batch of an :class:`AttackResult` or a tensor, checked against the space."""
    if isinstance(delta, AttackResult):
        delta = delta.delta
    if not isinstance(space, HarmlessSubspace):
        raise InputError(f"space must be a HarmlessSubspace (harmless.harmless_subspace(model, shape)), "
                         f"got {type(space).__name__}")
    return validation.batch(delta, space.input_shape, name)


def _flat_sq_norm(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).double().pow(2).sum(dim=1)


def harmless_fraction(space: HarmlessSubspace, delta: DeltaLike) -> torch.Tensor:
    """``ρ = ‖Pδ‖² / ‖δ‖²`` per sample (float64, shape ``(B,)``): the share of each perturbation's
    energy the model cannot see. 0 for a perturbation in the row space of ``A`` (a plain gradient
    step: the input gradient is ``Aᵀ·(…)``), 1 for a harmless one, about ``dim / n`` for isotropic
    noise. ``NaN`` where ``δ = 0`` (a minimum-norm attack that found nothing, or a sample it left
    alone): the fraction of nothing is undefined, and a 0 there would bias the statistics.

    ``delta`` is an :class:`AttackResult` (its ``delta``) or a batch ``(B, *space.input_shape)``;
    it is not modified. ``‖Pδ‖²`` is measured directly (not as ``‖δ‖² − ‖δ⊥‖²``), so a ρ near 0
    is resolved down to round-off squared (~1e-32 in float64), not ~1e-16."""
    d = _delta_of(delta, space)
    harmless_part, _ = space.decompose(d)
    return _rho(harmless_part, d)


def _rho(harmless_part: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    num, den = _flat_sq_norm(harmless_part), _flat_sq_norm(d).to(harmless_part.device)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float64).tiny),
                       torch.full_like(den, float("nan")))


@dataclass(frozen=True)
class EquivalenceReport:
    """What :func:`equivalent_check` measured, ``B`` samples and ``S`` scales.

    Differences are relative, per sample: ``‖f(x + δ') − f(x + δ)‖ / ‖f(x + δ)‖`` for the
    equivalent perturbation ``δ'`` (``δ⊥``, or ``δ + s‖δ‖h`` with ``h`` a random unit harmless
    direction, fresh per sample). Labels are ``argmax f``; ``y_adv`` is the label at ``x + δ``.
    The ``success*`` fields are set when true labels ``y`` were given (success: label ≠ y).
    """

    dtype: torch.dtype  # the precision the model was evaluated in (float64)
    scales: tuple[float, ...]  # s: ‖h‖ = s‖δ‖ per sample
    rho: torch.Tensor  # (B,) ‖Pδ‖²/‖δ‖² (NaN where δ = 0)
    y_adv: torch.Tensor  # (B,) int64, the label at x + δ
    perp_diff: torch.Tensor  # (B,) relative output difference, x + δ⊥ against x + δ
    harmless_diff: torch.Tensor  # (S, B) relative output difference, x + δ + s‖δ‖h against x + δ
    perp_label_kept: torch.Tensor  # (B,) bool
    harmless_label_kept: torch.Tensor  # (S, B) bool
    perp_outside_box: torch.Tensor  # (B,) bool: x + δ⊥ leaves the bounds somewhere
    harmless_outside_box: torch.Tensor  # (S, B) bool: x + δ + s‖δ‖h leaves the bounds somewhere
    bounds: tuple[float, float]
    success: torch.Tensor | None = None  # (B,) bool, at x + δ
    perp_success: torch.Tensor | None = None  # (B,) bool, at x + δ⊥
    harmless_success: torch.Tensor | None = None  # (S, B) bool, at x + δ + s‖δ‖h

    @property
    def max_perp_diff(self) -> float:
        """The largest relative output difference between ``x + δ⊥`` and ``x + δ``."""
        return float(self.perp_diff.max())

    @property
    def max_harmless_diff(self) -> tuple[float, ...]:
        """Per scale, the largest relative output difference between ``x + δ + s‖δ‖h`` and ``x + δ``."""
        return tuple(float(v) for v in self.harmless_diff.amax(dim=1))

    @property
    def label_kept(self) -> float:
        """Fraction of samples whose label at ``x + δ`` is kept by ``δ⊥`` and by every ``δ + s‖δ‖h``."""
        kept = self.perp_label_kept & self.harmless_label_kept.all(dim=0)
        return float(kept.double().mean())

    @property
    def success_rates(self) -> tuple[float, float, tuple[float, ...]] | None:
        """``(at x + δ, at x + δ⊥, per scale at x + δ + s‖δ‖h)``, or None without labels."""
        if self.success is None or self.perp_success is None or self.harmless_success is None:
            return None
        return (float(self.success.double().mean()), float(self.perp_success.double().mean()),
                tuple(float(v) for v in self.harmless_success.double().mean(dim=1)))


def _float64_model(model: nn.Module) -> nn.Module:
    """The model itself when it computes in float64, else a float64 copy (the caller's untouched)."""
    floats = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
    if all(t.dtype == torch.float64 for t in floats):
        return model
    return copy.deepcopy(model).double()


def _relative(a: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-sample ``‖a − ref‖ / ‖ref‖`` (``‖a − ref‖`` where ``ref`` is 0)."""
    num = (a - ref).reshape(a.shape[0], -1).norm(dim=1)
    den = ref.reshape(ref.shape[0], -1).norm(dim=1)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), num)


def equivalent_check(model: nn.Module, space: HarmlessSubspace, x: torch.Tensor, delta: DeltaLike,
                     scales: Sequence[float] = (1, 10, 100), *, y: torch.Tensor | None = None,
                     bounds: tuple[float, float] = (0.0, 1.0),
                     generator: torch.Generator | None = None) -> EquivalenceReport:
    """Measure the equivalent adversarial space of ``x + δ`` (Theorems 3–5) on the model itself.

    Evaluates the model in float64 (a float64 copy if it is float32; eval mode, flags restored)
    at ``x + δ``, at ``x + δ⊥`` (``δ⊥ = (I − P)δ``) and at ``x + δ + s‖δ‖h`` for each ``s`` in
    ``scales``, ``h`` a random unit vector of the harmless subspace drawn per sample with
    ``generator`` (default: seeded, so the check is reproducible). ``space`` must be the
    model's own harmless subspace (``harmless.harmless_subspace(model, shape)``).

    The points need not lie in ``bounds``: the theory is linear algebra, and ``x + δ⊥`` or
    ``x + δ + h`` usually leave the image box (``perp_outside_box`` says where). ``bounds`` is
    only used for that report. ``y`` (true labels, int64) adds the success rates. Nothing
    passed in is modified.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    d = _delta_of(delta, space)
    x0 = validation.batch(x, space.input_shape, "x")
    if d.shape != x0.shape:
        raise InputError(f"delta must have the shape of x {tuple(x0.shape)}, got {tuple(d.shape)}")
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence) or len(scales) == 0:
        raise InputError(f"scales must be a non-empty sequence of positive numbers, got {scales!r}")
    s = tuple(validation.positive_number(v, f"scales[{i}]") for i, v in enumerate(scales))
    lo, hi = validation.bounds(bounds)
    validation.generator(generator)
    b = x0.shape[0]
    if y is not None:
        validation.labels(y, b)

    m64 = _float64_model(model)
    device = next((t.device for t in m64.parameters()), x0.device)
    x64, d64 = x0.to(device=device, dtype=torch.float64), d.to(device=device, dtype=torch.float64)
    harmless_part, perp = space.decompose(d64)
    perp = perp.to(device=device, dtype=torch.float64)
    norms = d64.reshape(b, -1).norm(dim=1)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    # One unit harmless direction per sample (and per scale: reusing h across scales would only
    # test one line through x + δ; fresh draws cover more of the space at no extra cost).
    h = space.sample(len(s) * b, generator=gen).to(device=device, dtype=torch.float64)
    factor = (torch.tensor(s, dtype=torch.float64, device=device)[:, None] * norms[None, :]).reshape(-1)
    view = (-1,) + (1,) * (x64.dim() - 1)
    x_h = (x64 + d64).repeat(len(s), *([1] * (x64.dim() - 1))) + h * factor.reshape(view)

    with eval_mode(m64, who="equivalent_check evaluates it", stacklevel=4), torch.no_grad():
        f_adv = m64(x64 + d64)
        f_perp = m64(x64 + perp)
        # All scales in one batch: (S·B, ...) with sample i of scale k at row k·B + i.
        f_h = m64(x_h)
    if not isinstance(f_adv, torch.Tensor) or f_adv.dim() != 2 or f_adv.shape[0] != b:
        raise InputError(f"the model must return logits of shape (B, classes), got "
                         f"{tuple(f_adv.shape) if isinstance(f_adv, torch.Tensor) else type(f_adv).__name__}")
    if y is not None and bool((y >= f_adv.shape[1]).any()):
        raise InputError(f"labels must be < {f_adv.shape[1]} (the number of classes), got {int(y.max())}")

    y_adv = f_adv.argmax(dim=1)
    y_perp = f_perp.argmax(dim=1)
    y_h = f_h.argmax(dim=1).reshape(len(s), b)
    perp_diff = _relative(f_perp, f_adv)
    harmless_diff = _relative(f_h, f_adv.repeat(len(s), 1)).reshape(len(s), b)
    xp = (x64 + perp).reshape(b, -1)
    outside = (xp < lo).any(dim=1) | (xp > hi).any(dim=1)
    xh = x_h.reshape(len(s) * b, -1)
    outside_h = ((xh < lo).any(dim=1) | (xh > hi).any(dim=1)).reshape(len(s), b)
    yy = None if y is None else y.to(device)
    return EquivalenceReport(
        dtype=torch.float64, scales=s, rho=_rho(harmless_part, d64).cpu(), y_adv=y_adv.cpu(),
        perp_diff=perp_diff.cpu(), harmless_diff=harmless_diff.cpu(), perp_label_kept=(y_perp == y_adv).cpu(),
        harmless_label_kept=(y_h == y_adv[None, :]).cpu(), perp_outside_box=outside.cpu(),
        harmless_outside_box=outside_h.cpu(), bounds=(lo, hi),
        success=None if yy is None else (y_adv != yy).cpu(),
        perp_success=None if yy is None else (y_perp != yy).cpu(),
        harmless_success=None if yy is None else (y_h != yy[None, :]).cpu())
