"""The attack contract: settings checked once in the constructor, data checked once per call,
one typed result.

Every attack is a callable object (Foolbox 3 style)::

    attack = PGD(eps=8 / 255, steps=10, norm="inf")
    result = attack(model, x, y, generator=torch.Generator().manual_seed(0))

``model`` maps images in ``bounds`` (default ``[0, 1]``; normalisation belongs inside the
model) to logits ``(B, classes)``. The attack runs on the model's device and in the input's
dtype (the model must have the same one), over the whole batch at once, with the model in eval
mode (its training flags are restored afterwards). ``x`` and ``y`` are never modified.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from harmless import validation
from harmless.errors import InputError
from harmless.linalg.prefix import eval_mode

Bounds = tuple[float, float]


@dataclass(frozen=True)
class AttackResult:
    """What an attack returns, one entry per sample (``B`` samples).

    ``x_adv`` lies inside the bounds; ``delta`` is exactly ``x_adv - x``. ``success`` is
    ``y_pred != y`` (untargeted). A minimum-norm attack that finds nothing for a sample returns
    ``x`` itself there (``delta`` 0, ``success`` False). ``iterations`` is the number of
    gradient steps each sample took (iterative minimum-norm attacks only, else None).
    """

    x_adv: torch.Tensor
    delta: torch.Tensor
    success: torch.Tensor  # bool (B,)
    y_pred: torch.Tensor  # int64 (B,), the model's prediction on x_adv
    logits: torch.Tensor  # (B, classes), the model's output on x_adv
    l2: torch.Tensor  # (B,), ||delta||_2 per sample
    linf: torch.Tensor  # (B,), ||delta||_inf per sample
    iterations: torch.Tensor | None = None  # int64 (B,)

    @property
    def success_rate(self) -> float:
        """Fraction of samples misclassified after the attack."""
        return float(self.success.double().mean()) if self.success.numel() else float("nan")


# -- settings ---------------------------------------------------------------------------------







def check_norm(norm: object) -> str | int:
    """``"inf"`` (also ``math.inf``, ``np.inf``, ``"linf"``) or ``2`` (also ``2.0``, ``"2"``, ``"l2"``)."""
    if isinstance(norm, str):
        key = norm.strip().lower()
        if key in ("inf", "linf", "l_inf"):
            return "inf"
        if key in ("2", "l2"):
            return 2
    elif isinstance(norm, (int, float, np.integer, np.floating)) and not isinstance(norm, (bool, np.bool_)):
        if math.isinf(float(norm)) and float(norm) > 0:
            return "inf"
        if float(norm) == 2:
            return 2
    raise InputError(f"norm must be 'inf' or 2, got {norm!r}")






# -- data -------------------------------------------------------------------------------------

def _model_dtype_device(model: nn.Module) -> tuple[torch.dtype | None, torch.device | None]:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype, t.device
    return None, None


def check_images(model: nn.Module, x: object, bounds: Bounds | None, name: str = "x",
                 sample_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """A non-empty floating batch (of ``sample_shape`` when given), finite, inside ``bounds``
    (unless None), in the model's dtype and on its device; returned detached (the checks read
    values only, and a caller's tensor may require grad)."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise InputError(f"{name} must be floating point (float32 or float64), got {x.dtype}")
    if x.dim() < 2:
        raise InputError(f"{name} must be a batch (B, ...) with at least 2 dimensions, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise InputError(f"{name} is an empty batch (B = 0)")
    if x.numel() == 0:
        raise InputError(f"{name} has no features: shape {tuple(x.shape)}")
    if sample_shape is not None and tuple(x.shape[1:]) != tuple(sample_shape):
        raise InputError(f"{name} must have shape (B, {', '.join(map(str, sample_shape))}), got {tuple(x.shape)}")
    x = x.detach()
    if not bool(torch.isfinite(x).all()):
        raise InputError(f"{name} contains NaN or infinite values")
    if bounds is not None:
        lo, hi = bounds
        xmin, xmax = float(x.min()), float(x.max())
        if xmin < lo or xmax > hi:
            raise InputError(f"{name} must lie inside the bounds [{lo}, {hi}], its values span "
                             f"[{xmin:.6g}, {xmax:.6g}] (images in [0, 1]: normalisation belongs inside the model)")
    dtype, device = _model_dtype_device(model)
    if dtype is not None and dtype != x.dtype:
        raise InputError(f"the model is in {dtype} but {name} is {x.dtype}; attacks follow the input's dtype, "
                         f"so convert one of them (e.g. model.to({x.dtype}))")
    if device is not None and device != x.device:
        raise InputError(f"the model is on {device} but {name} is on {x.device}; move them to one device")
    return x


def check_data(model: object, x: object, y: object, bounds: Bounds) -> None:
    """Everything an attack needs to know about its data, checked once at the entry point."""
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    xs = check_images(model, x, bounds)
    if not isinstance(y, torch.Tensor):
        raise InputError(f"y must be a torch.Tensor of int64 labels, got {type(y).__name__}")
    if y.device != xs.device:
        raise InputError(f"y is on {y.device} but x is on {xs.device}")
    validation.labels(y, xs.shape[0])


def check_logits(logits: torch.Tensor, y: torch.Tensor) -> None:
    """The model's output on the clean batch: logits (B, classes) and labels in range."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != y.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise InputError(f"the model must return logits of shape (B, classes) = ({y.shape[0]}, C), got {shape}")
    if logits.shape[1] < 2:
        raise InputError(f"the model must return at least 2 classes, got {logits.shape[1]}")
    if bool((y >= logits.shape[1]).any()):
        raise InputError(f"labels must be < {logits.shape[1]} (the number of classes), got {int(y.max())}")




def per_sample_norms(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = delta.reshape(delta.shape[0], -1)
    return flat.norm(dim=1), flat.abs().amax(dim=1)


class Attack:
    """Base class: validates data, enforces eval mode, builds the :class:`AttackResult`.

    Subclasses validate their settings in ``__init__`` (calling ``super().__init__(bounds)``)
    and implement :meth:`_run`, which returns ``x_adv`` (inside the bounds) and optionally the
    per-sample iteration counts.
    """

    def __init__(self, bounds: Bounds = (0.0, 1.0)) -> None:
        self.bounds = validation.bounds(bounds)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                 generator: torch.Generator | None = None, bounds: Bounds | None = None) -> AttackResult:
        """Attack ``model`` on the batch ``x`` with true labels ``y``; ``bounds`` overrides the
        constructor's for this call; ``generator`` seeds the random parts (random starts)."""
        b = self.bounds if bounds is None else validation.bounds(bounds)
        check_data(model, x, y, b)
        validation.generator(generator)
        # Never touch the caller's tensors: every attack works on detached copies.
        x0 = x.detach().clone()
        y0 = y.detach().clone()
        with eval_mode(model, who="the attack evaluates it", stacklevel=4):
            with torch.no_grad():
                logits0 = model(x0)
            check_logits(logits0, y0)
            x_adv, iterations = self._run(model, x0, y0, logits0, b, generator)
            x_adv = x_adv.detach()
            with torch.no_grad():
                logits = model(x_adv)
        delta = x_adv - x0  # by definition, so that delta == x_adv - x exactly
        y_pred = logits.argmax(dim=1)
        l2, linf = per_sample_norms(delta)
        return AttackResult(x_adv=x_adv, delta=delta, success=y_pred != y0, y_pred=y_pred, logits=logits.detach(),
                            l2=l2, linf=linf, iterations=iterations)

    def _run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor, bounds: Bounds,
             generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def _settings(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._settings().items())
        return f"{type(self).__name__}({args})"


def margin_other(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The label's logit and the largest other logit, per sample."""
    z_y = logits.gather(1, y[:, None])[:, 0]
    other = logits.scatter(1, y[:, None], float("-inf"))
    return z_y, other.amax(dim=1)
