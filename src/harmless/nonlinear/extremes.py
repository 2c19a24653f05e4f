"""Theorem 2's two extremes, constructed on a real network by a bias shift.

The paper: at a ReLU whose pre-activations are all positive the harmless set does not grow
(``P^(relu) = P^(previous layer)``, the ReLU acts as the identity there); at one whose
pre-activations are all non-positive it becomes everything that keeps the earlier pattern and
leaves the pre-activations non-positive (the ReLU's output is 0 on all of it).

Trained networks at natural samples are never at either extreme, so :func:`extreme_bias_shift`
makes one: a float64 copy of the model whose affine layer feeding the chosen ReLU has its bias
moved, so that at the sample every pre-activation of that ReLU is ``>= margin`` (``"positive"``)
or ``<= -margin`` (``"non-positive"``). Nothing before that layer changes (so the earlier
pattern and the earlier pieces are the model's own); for ``nn.Linear`` each unit moves only as
far as needed (``z' = max(z, margin)`` or ``min(z, -margin)``), for ``nn.Conv2d`` (one bias per
channel) every unit of a channel moves by that channel's largest needed shift.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from harmless.errors import InputError, UnsupportedLayerError, VerificationError
from harmless.nonlinear._common import check_sample
from harmless.nonlinear.network import ReluNetwork

EXTREMES = ("positive", "non-positive")


@dataclass
class BiasShift:
    """The shifted model and what was done: ``layer`` (the affine layer whose bias moved),
    ``relu`` (the ReLU now at the extreme), ``shift`` (the bias change, per output feature or
    channel), ``pre_activation`` (the ReLU's input at the sample after the shift)."""

    model: nn.Module
    extreme: str
    layer: str
    relu: str
    shift: torch.Tensor
    pre_activation: torch.Tensor


def extreme_bias_shift(model: nn.Module, sample: torch.Tensor, relu: str, extreme: str, *, margin: float = 1.0,
                       input_shape: Sequence[int] | None = None) -> BiasShift:
    """A float64 eval copy of ``model`` with the ReLU named ``relu`` at Theorem 2's ``extreme``
    (``"positive"`` or ``"non-positive"``) at ``sample`` (one sample, no batch axis), by shifting
    the bias of the layer right before it (an ``nn.Linear`` or ``nn.Conv2d`` with a bias)."""
    if extreme not in EXTREMES:
        raise InputError(f"extreme must be one of {', '.join(EXTREMES)}, got {extreme!r}")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not margin > 0:
        raise InputError(f"margin must be a positive number, got {margin!r}")
    x = check_sample(sample, "sample").to(torch.float64)
    shape = tuple(input_shape) if input_shape is not None else tuple(x.shape)
    net = ReluNetwork(model, shape)  # checks the model and gives the plan (its own float64 copy)
    names = net.layer_names
    if relu not in names or net.steps[names.index(relu)].kind != "relu":
        relus = [s.name for s in net.steps if s.kind == "relu"]
        raise InputError(f"no ReLU named {relu!r}; the ReLUs are {', '.join(relus) or 'none'}")
    i = names.index(relu)
    before = net.steps[i - 1].module if i > 0 else None
    if not isinstance(before, (nn.Linear, nn.Conv2d)) or before.bias is None:
        raise UnsupportedLayerError(f"the layer before {relu!r} must be an nn.Linear or nn.Conv2d with a bias to "
                                    "shift, got " + (type(before).__name__ if before is not None else "nothing"))
    shifted = copy.deepcopy(net.model)
    steps = dict(ReluNetwork._leaves(shifted))
    target = steps[names[i - 1]]
    assert isinstance(target, (nn.Linear, nn.Conv2d)) and target.bias is not None
    with torch.no_grad():
        z = x.unsqueeze(0)
        for name in names[:i]:
            z = steps[name](z)
        z = z[0]
        need = (margin - z) if extreme == "positive" else (-margin - z)
        if isinstance(target, nn.Linear):
            per_unit = need.reshape(-1, need.shape[-1]) if need.ndim > 1 else need.unsqueeze(0)
            shift = per_unit.amax(dim=0).clamp_min(0) if extreme == "positive" else per_unit.amin(dim=0).clamp_max(0)
        else:
            per_channel = need.reshape(need.shape[0], -1)
            shift = per_channel.amax(dim=1).clamp_min(0) if extreme == "positive" else \
                per_channel.amin(dim=1).clamp_max(0)
        target.bias.add_(shift.to(target.bias.dtype))
        z = x.unsqueeze(0)
        for name in names[:i]:
            z = steps[name](z)
    pre = z[0]
    edge = margin * (1 - 1e-9)
    ok = bool((pre >= edge).all()) if extreme == "positive" else bool((pre <= -edge).all())
    if not ok:  # never silently wrong: the shift is checked on the shifted model itself
        raise VerificationError(f"the bias shift did not put {relu!r} at the {extreme} extreme")
    return BiasShift(shifted, extreme, names[i - 1], relu, shift, pre)
