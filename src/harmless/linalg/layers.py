"""Turning layers (``nn.Module``s and a few torch functions) into linear operators.

Only the linear part of an affine layer is kept: ``Linear``'s bias, BatchNorm's shift and
Normalize's mean do not change which perturbations are harmless.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harmless.errors import UnsupportedLayerError
from harmless.linalg.operators import (
    ChannelScaleOperator,
    ConvOperator,
    FunctionOperator,
    MatrixOperator,
    ReshapeOperator,
    TorchLinearOperator,
)
from harmless.nn import Normalize

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_AVGPOOL = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
            nn.AdaptiveAvgPool3d)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_RESHAPE = (nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
            nn.AlphaDropout)

#: Module types the engine folds into a linear operator.
LINEAR_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, *_CONV, *_AVGPOOL, *_BATCHNORM, *_RESHAPE, Normalize)

#: Torch functions and tensor methods that only reshape (fx ``call_function``/``call_method``).
RESHAPE_FUNCTIONS: tuple[Any, ...] = (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze)
RESHAPE_METHODS = frozenset({"view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous"})


def is_linear_module(module: nn.Module) -> bool:
    """Whether :func:`operator_for_module` can represent ``module`` (in eval mode)."""
    if isinstance(module, _BATCHNORM):
        return module.track_running_stats and module.running_var is not None
    return isinstance(module, LINEAR_MODULES)


def operator_for_module(module: nn.Module, in_shape: Sequence[int], *, out_shape: Sequence[int] | None = None,
                        dtype: torch.dtype = torch.float64, device: torch.device | str | None = None,
                        name: str = "") -> TorchLinearOperator:
    """The linear part of ``module`` acting on one sample of shape ``in_shape`` (no batch).

    Raises :class:`UnsupportedLayerError`, naming the layer, for anything non-linear.
    """
    label = f"{name} ({type(module).__name__})" if name else type(module).__name__
    in_shape = tuple(int(s) for s in in_shape)
    if device is None:
        param = next(iter(module.parameters()), None)
        buf = next(iter(module.buffers()), None)
        ref = param if param is not None else buf
        device = ref.device if ref is not None else torch.device("cpu")

    if isinstance(module, nn.Linear):
        if in_shape[-1] != module.in_features:
            raise UnsupportedLayerError(f"{label} expects {module.in_features} features, input has shape {in_shape}")
        if len(in_shape) == 1:
            return MatrixOperator(module.weight, dtype=dtype)
        # Linear on (..., features): the same matrix on every leading position.
        weight = module.weight.detach().clone()
        return FunctionOperator(lambda x: F.linear(x, weight.to(x.dtype)), in_shape, dtype=dtype, device=device,
                                name=label)
    if isinstance(module, _CONV):
        if isinstance(module, nn.modules.conv._ConvTransposeNd):  # pragma: no cover - not in _CONV
            raise UnsupportedLayerError(f"{label}: transposed convolutions are not supported")
        return ConvOperator(module.weight, in_shape, stride=module.stride, padding=module.padding,
                            dilation=module.dilation, groups=module.groups, padding_mode=module.padding_mode,
                            dtype=dtype)
    if isinstance(module, _BATCHNORM):
        if not is_linear_module(module):
            raise UnsupportedLayerError(
                f"{label} has no running statistics, so it normalises with batch statistics and is not a "
                "per-sample linear map")
        scale = 1.0 / torch.sqrt(module.running_var.detach().to(dtype) + module.eps)
        if module.affine:
            scale = scale * module.weight.detach().to(dtype)
        return ChannelScaleOperator(scale, in_shape, dtype=dtype)
    if isinstance(module, Normalize):
        return ChannelScaleOperator(1.0 / module.std.detach().to(dtype), in_shape, dtype=dtype)
    if isinstance(module, _RESHAPE):
        if out_shape is None:
            with torch.no_grad():
                probe = torch.zeros(1, *in_shape, dtype=dtype, device=device)
                # Flatten/Unflatten have no training-mode behaviour: calling them mutates nothing.
                out_shape = tuple(module(probe).shape[1:]) if isinstance(module, (nn.Flatten, nn.Unflatten)) \
                    else in_shape
        return ReshapeOperator(in_shape, out_shape, dtype=dtype, device=device)
    if isinstance(module, _AVGPOOL):
        return FunctionOperator(_stateless(module), in_shape, dtype=dtype, device=device, name=label)
    raise UnsupportedLayerError(f"layer {label} is not linear; the engine supports "
                                + ", ".join(sorted({t.__name__ for t in LINEAR_MODULES})))


def _stateless(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A parameter-free module as a plain function (pooling layers hold no tensors)."""
    return lambda x: module(x)
