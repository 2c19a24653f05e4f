"""Turning layers (``nn.Module``s and torch functions) into linear operators.

Only the linear part of an affine layer is kept: ``Linear``'s bias, BatchNorm's shift,
Normalize's mean, an added position embedding or a concatenated class token do not change
which perturbations are harmless.

Layers are recognised by what they compute, never by ``isinstance`` alone: a subclass of a
known layer that overrides ``forward`` (timm's ``BatchNormAct2d`` applies an activation
inside a ``BatchNorm2d`` subclass) is not recognised, and the tracer reads its ``forward``
instead. Whatever is recognised is still checked numerically against the model's own
output (:mod:`harmless.linalg.prefix`), so a mistake here can shorten a run, never make a
wrong one.
"""

from __future__ import annotations

import operator
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
    TokenwiseMatrixOperator,
    TorchLinearOperator,
)
from harmless.nn import Normalize

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_AVGPOOL = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
            nn.AdaptiveAvgPool3d)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_RESHAPE = (nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
            nn.AlphaDropout)

#: Module types the engine folds into a linear operator (subclasses only when they keep
#: the base class's ``forward``; see :func:`recognised_module`).
LINEAR_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, *_CONV, *_AVGPOOL, *_BATCHNORM, *_RESHAPE, Normalize)

#: Module types that are not affine (the run ends there, and the linear prefix is complete).
NONLINEAR_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Hardshrink, nn.Softshrink, nn.Sigmoid, nn.LogSigmoid, nn.Tanh,
    nn.Tanhshrink, nn.Softplus, nn.Softsign, nn.Threshold, nn.GLU, nn.Softmax, nn.Softmax2d, nn.LogSoftmax,
    nn.Softmin, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
    nn.InstanceNorm3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.FractionalMaxPool2d, nn.MultiheadAttention)

#: Torch functions and tensor methods that are not affine in their tensor input.
NONLINEAR_CALLS: frozenset[Any] = frozenset({
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid,
    F.hardtanh, F.sigmoid, F.tanh, F.softplus, F.softsign, F.softmax, F.log_softmax, F.layer_norm, F.group_norm,
    F.instance_norm, F.normalize, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.scaled_dot_product_attention, F.glu, F.logsigmoid,
    torch.relu, torch.sigmoid, torch.tanh, torch.softmax, torch.log_softmax, torch.exp, torch.log, torch.sqrt,
    torch.rsqrt, torch.abs, torch.clamp, torch.clip, torch.maximum, torch.minimum, torch.max, torch.min, torch.sin,
    torch.cos, torch.erf, torch.pow, torch.square, torch.sign, torch.round, torch.floor, torch.ceil,
    operator.pow, operator.abs, operator.floordiv, operator.mod,
    "relu", "relu_", "sigmoid", "tanh", "softmax", "log_softmax", "exp", "log", "sqrt", "rsqrt", "abs", "clamp",
    "clamp_", "clip", "pow", "square", "sign", "round", "floor", "ceil", "max", "min", "norm", "std", "var",
    "sin", "cos", "erf"})


def recognised_module(module: nn.Module) -> bool:
    """Whether ``module`` computes exactly what its known base class computes: its type is
    one of :data:`LINEAR_MODULES`, or a subclass that does not override ``forward``."""
    for base in LINEAR_MODULES:
        if isinstance(module, base):
            return type(module).forward is base.forward
    return False


def is_linear_module(module: nn.Module) -> bool:
    """Whether :func:`operator_for_module` can represent ``module`` (in eval mode)."""
    if not recognised_module(module):
        return False
    if isinstance(module, _BATCHNORM):
        return module.track_running_stats and module.running_var is not None
    return True


def is_nonlinear_module(module: nn.Module) -> bool:
    """Whether ``module`` is a known non-linearity (exact type, or a subclass keeping its forward)."""
    for base in NONLINEAR_MODULES:
        if isinstance(module, base):
            return type(module).forward is base.forward
    return False


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

    if not recognised_module(module):
        raise UnsupportedLayerError(f"layer {label} is not a layer the engine knows: {type(module).__name__} "
                                    "overrides forward() or is not linear")
    if isinstance(module, nn.Linear):
        if in_shape[-1] != module.in_features:
            raise UnsupportedLayerError(f"{label} expects {module.in_features} features, input has shape {in_shape}")
        return linear_operator(module.weight, in_shape, dtype=dtype)
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
        running_var: torch.Tensor = module.running_var  # type: ignore[assignment]  # checked by is_linear_module
        scale = 1.0 / torch.sqrt(running_var.detach().to(dtype) + module.eps)
        if module.affine:
            scale = scale * module.weight.detach().to(dtype)
        return ChannelScaleOperator(scale, in_shape, dtype=dtype)
    if isinstance(module, Normalize):
        std: torch.Tensor = module.std  # type: ignore[assignment]  # a registered buffer
        return ChannelScaleOperator(1.0 / std.detach().to(dtype), in_shape, dtype=dtype)
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
    raise UnsupportedLayerError(f"layer {label} is not linear; the engine supports "  # pragma: no cover
                                + ", ".join(sorted({t.__name__ for t in LINEAR_MODULES})))


def _stateless(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A parameter-free module as a plain function (pooling layers hold no tensors)."""
    return lambda x: module(x)


def linear_operator(weight: torch.Tensor, in_shape: Sequence[int], *, dtype: torch.dtype) -> TorchLinearOperator:
    """``x -> x W^T`` on one sample: a matrix on a flat vector, or the same matrix on every
    position of a ``(..., d)`` input (token-wise, rank ``T * rank(W)`` by structure)."""
    if len(in_shape) == 1:
        return MatrixOperator(weight, dtype=dtype)
    return TokenwiseMatrixOperator(weight, in_shape, dtype=dtype)


# ---------------------------------------------------------------------------------------
# Functional calls (torch.fx call_function / call_method nodes)
# ---------------------------------------------------------------------------------------
class Running:
    """Marks where the running tensor (the perturbed one) enters a call."""

    def __repr__(self) -> str:
        return "<running>"


RUNNING = Running()


class Constant:
    """A tensor or number that does not depend on the perturbation, and a flag that says
    whether it depends on the model's input (then it may differ from sample to sample, and
    it can only be added, never multiply the running tensor)."""

    def __init__(self, value: Any, *, input_dependent: bool) -> None:
        self.value = value
        self.input_dependent = input_dependent


class _Zero:
    """An additive constant, replaced by zeros in the linear part (shape kept, batch free)."""

    def __init__(self, value: Any, batch: int, ndim: int) -> None:
        self.value = value
        self.batched = isinstance(value, torch.Tensor) and value.ndim == ndim and value.ndim > 0 \
            and value.shape[0] == batch

    def materialise(self, like: torch.Tensor) -> Any:
        if not isinstance(self.value, torch.Tensor):
            return 0
        shape = ((like.shape[0],) + tuple(self.value.shape[1:])) if self.batched else tuple(self.value.shape)
        return torch.zeros(shape, dtype=like.dtype if self.value.is_floating_point() else self.value.dtype,
                           device=like.device)


class _Factor:
    """A multiplicative constant: cast to the running tensor's dtype at call time."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def materialise(self, like: torch.Tensor) -> Any:
        v = self.value
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.to(dtype=like.dtype, device=like.device)
        return v


_ADD = frozenset({operator.add, operator.iadd, torch.add, "add", "add_", "__add__", "__radd__"})
_SUB = frozenset({operator.sub, operator.isub, torch.sub, torch.subtract, "sub", "sub_", "subtract", "__sub__"})
_MUL = frozenset({operator.mul, operator.imul, torch.mul, torch.multiply, "mul", "mul_", "multiply", "__mul__",
                  "__rmul__"})
_DIV = frozenset({operator.truediv, operator.itruediv, torch.div, torch.true_divide, torch.divide, "div", "div_",
                  "true_divide", "divide", "__truediv__"})
_NEG = frozenset({operator.neg, torch.neg, torch.negative, "neg", "negative", operator.pos, torch.positive})
_RESHAPE_CALLS = frozenset({torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, "view", "reshape", "flatten",
                            "squeeze", "unsqueeze", "contiguous", "view_as", "reshape_as", "clone", "detach",
                            torch.clone, "float", "double", "to", "type_as"})
_PERMUTE_CALLS = frozenset({torch.permute, torch.transpose, torch.movedim, torch.swapaxes, torch.swapdims,
                            "permute", "transpose", "movedim", "swapaxes", "swapdims"})
_EXPAND_CALLS = frozenset({"expand", "expand_as", "repeat", torch.tile, "tile"})
_LINEAR_GENERIC = frozenset({F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                             F.adaptive_avg_pool3d, torch.mean, torch.sum, "mean", "sum", operator.getitem,
                             torch.narrow, "narrow", torch.select, "select"})
_CAT = frozenset({torch.cat, torch.concat, torch.concatenate})
_MATMUL = frozenset({operator.matmul, torch.matmul, "matmul", "__matmul__"})
_DROPOUT = {F.dropout: 2, F.dropout1d: 2, F.dropout2d: 2, F.dropout3d: 2, F.alpha_dropout: 2,
            F.feature_alpha_dropout: 2}
_CONV_FN = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}


def call_name(target: Any) -> str:
    """A readable name for an fx call target."""
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def is_nonlinear_call(target: Any) -> bool:
    """Whether an fx call target is a known non-linearity."""
    try:
        return target in NONLINEAR_CALLS
    except TypeError:  # unhashable target
        return False


def _arg(args: Sequence[Any], kwargs: dict[str, Any], index: int, name: str, default: Any = None) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _value(a: Any) -> Any:
    return a.value if isinstance(a, Constant) else a


def _count_running(obj: Any) -> int:
    if obj is RUNNING:
        return 1
    if isinstance(obj, (list, tuple)):
        return sum(_count_running(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_count_running(o) for o in obj.values())
    return 0


def _has_input_dependent(obj: Any) -> bool:
    if isinstance(obj, Constant):
        return obj.input_dependent
    if isinstance(obj, (list, tuple)):
        return any(_has_input_dependent(o) for o in obj)
    if isinstance(obj, dict):
        return any(_has_input_dependent(o) for o in obj.values())
    return False


def _mark(obj: Any, role: str, batch: int, ndim: int) -> Any:
    """Replace every :class:`Constant` by its linear-part stand-in: zeros (``role="add"``)
    or the value itself (``role="factor"``)."""
    if isinstance(obj, Constant):
        return _Zero(obj.value, batch, ndim) if role == "add" else _Factor(obj.value)
    if isinstance(obj, list):
        return [_mark(o, role, batch, ndim) for o in obj]
    if isinstance(obj, tuple):
        return tuple(_mark(o, role, batch, ndim) for o in obj)
    if isinstance(obj, dict):
        return {k: _mark(o, role, batch, ndim) for k, o in obj.items()}
    return obj


def _materialise(obj: Any, v: torch.Tensor) -> Any:
    if obj is RUNNING:
        return v
    if isinstance(obj, (_Zero, _Factor)):
        return obj.materialise(v)
    if isinstance(obj, list):
        return [_materialise(o, v) for o in obj]
    if isinstance(obj, tuple):
        return tuple(_materialise(o, v) for o in obj)
    if isinstance(obj, dict):
        return {k: _materialise(o, v) for k, o in obj.items()}
    return obj


def _call_fn(kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
             ) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(v: torch.Tensor) -> torch.Tensor:
        a = _materialise(args, v)
        k = _materialise(kwargs, v)
        if kind == "call_method":
            return getattr(a[0], target)(*a[1:], **k)
        return target(*a, **k)
    return fn


def _shared_factor(c: Any, batch: int, ndim: int) -> tuple[Any, str]:
    """A multiplicative constant the same for every sample (batch rows folded to one), or why not."""
    if isinstance(c, Constant) and c.input_dependent:
        return None, "it multiplies by a value computed from the model's input (a per-sample factor)"
    v = _value(c)
    if isinstance(v, torch.Tensor) and v.ndim == ndim and v.ndim > 0 and v.shape[0] == batch:
        if not bool(torch.equal(v, v[:1].expand_as(v))):
            return None, "it multiplies by a factor that differs between the samples of a batch"
        v = v[:1]
    return (Constant(v, input_dependent=False) if isinstance(c, Constant) else v), ""


def _nonzero_factor(c: Any) -> bool:
    v = _value(c)
    if isinstance(v, torch.Tensor):
        return bool(torch.all(v != 0)) and bool(torch.all(torch.isfinite(v)))
    return isinstance(v, (int, float)) and v != 0 and v == v and abs(v) != float("inf")


def operator_for_call(kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                      in_shape: tuple[int, ...], out_shape: tuple[int, ...], *, batch: int, dtype: torch.dtype,
                      device: torch.device, name: str) -> tuple[TorchLinearOperator | None, str]:
    """The linear part of a functional call ``target(*args, **kwargs)`` (an fx
    ``call_function``, or ``call_method`` with the tensor first), or ``None`` and why not.

    ``args``/``kwargs`` hold :data:`RUNNING` where the perturbed tensor enters (exactly
    once), :class:`Constant` for tensors that do not depend on it (recorded at a probe
    batch of ``batch`` samples) and plain Python values.
    """
    if _count_running((args, kwargs)) != 1:
        return None, "it reads the running tensor more than once, or not as a plain argument"
    ndim = len(in_shape) + 1
    same = in_shape == out_shape
    label = f"{name} ({call_name(target)})"

    def generic(a: tuple[Any, ...], k: dict[str, Any], *, bijective: bool = False, injective: bool = False,
                orthogonal: bool = False, role: str = "add") -> tuple[TorchLinearOperator, str]:
        fn = _call_fn(kind, target, _mark(a, role, batch, ndim), _mark(k, role, batch, ndim))
        op = FunctionOperator(fn, in_shape, out_shape=out_shape, dtype=dtype, device=device, name=label,
                              bijective=bijective, injective=injective or bijective, orthogonal=orthogonal)
        return op, ""

    first_running = bool(args) and args[0] is RUNNING
    if target in _ADD or target in _SUB:
        alpha = kwargs.get("alpha", 1)
        if not isinstance(alpha, (int, float)) or alpha == 0 or len(args) != 2:
            return None, "an addition with an unusual alpha or arity"
        # A number added (x + 1.0) is an additive constant like a tensor: zero in the linear part.
        summands = tuple(Constant(v, input_dependent=False) if isinstance(v, (int, float)) else v for v in args)
        # Same shape: the linear part is the identity, or a negation (c - x): orthogonal.
        return generic(summands, kwargs, injective=True, bijective=same,
                       orthogonal=same and (first_running or alpha in (1, -1)))
    if target in _MUL:
        if len(args) != 2:
            return None, "a multiplication of more than two operands"
        other, why = _shared_factor(args[1] if first_running else args[0], batch, ndim)
        if why:
            return None, why
        a = (RUNNING, other) if first_running else (other, RUNNING)
        return generic(a, kwargs, bijective=same and _nonzero_factor(other), role="factor")
    if target in _DIV:
        if not first_running or len(args) != 2 or kwargs.get("rounding_mode") is not None:
            return None, "a division of something by the running tensor, or with rounding (not linear)"
        other, why = _shared_factor(args[1], batch, ndim)
        if why:
            return None, why
        return generic((RUNNING, other), kwargs, bijective=same and _nonzero_factor(other), role="factor")
    if target in _NEG:
        return generic(args, kwargs, bijective=same, orthogonal=same)
    if target in _RESHAPE_CALLS:
        if not first_running or _has_input_dependent((args[1:], kwargs)) or not same and \
                torch.Size(in_shape).numel() != torch.Size(out_shape).numel():
            return None, "a reshape whose shape depends on the input"
        return ReshapeOperator(in_shape, out_shape, dtype=dtype, device=device), ""
    if target in _PERMUTE_CALLS:
        if not first_running:
            return None, "a permutation with unusual arguments"
        perm = torch.Size(in_shape).numel() == torch.Size(out_shape).numel()
        return generic(args, kwargs, bijective=perm, orthogonal=perm)
    if target in _EXPAND_CALLS:
        return generic(args, kwargs, injective=first_running)
    if target in _CAT:
        tensors = _arg(args, kwargs, 0, "tensors")
        if not isinstance(tensors, (list, tuple)) or _count_running(tensors) != 1:
            return None, "a concatenation that does not take the running tensor once"
        return generic(args, kwargs, injective=True)
    if target in _MATMUL:
        if len(args) != 2:
            return None, "a matrix product with unusual arguments"
        other, why = _shared_factor(args[1] if first_running else args[0], batch, ndim)
        if why:
            return None, why
        w = _value(other)
        if first_running and isinstance(w, torch.Tensor) and w.ndim == 2 and len(in_shape) >= 1:
            return linear_operator(w.T, in_shape, dtype=dtype), ""  # x @ W is a Linear with weight W^T
        a = (RUNNING, other) if first_running else (other, RUNNING)
        return generic(a, kwargs, role="factor")
    if target in _DROPOUT:
        if _arg(args, kwargs, _DROPOUT[target], "training", True):
            return None, "dropout in training mode (random)"
        return ReshapeOperator(in_shape, out_shape, dtype=dtype, device=device), ""
    if target is F.pad:
        pad = _arg(args, kwargs, 1, "pad")
        mode = _arg(args, kwargs, 2, "mode", "constant")
        if not first_running or not isinstance(pad, (list, tuple)) or not all(isinstance(p, int) for p in pad):
            return None, "padding with unusual arguments"
        padded: list[Any] = list(args)
        k = dict(kwargs)
        if mode == "constant":  # the fill value is an additive constant: zero in the linear part
            if len(padded) > 3:
                padded[3] = 0.0
            k.pop("value", None)
        return generic(tuple(padded), k, injective=all(p >= 0 for p in pad))
    if target is F.linear:
        weight = _arg(args, kwargs, 1, "weight")
        if not first_running or not isinstance(weight, Constant) or weight.input_dependent:
            return None, "a linear map whose weight depends on the input"
        w = weight.value
        if not isinstance(w, torch.Tensor) or w.ndim != 2 or w.shape[1] != in_shape[-1]:
            return None, "a linear map with an unusual weight"
        return linear_operator(w, in_shape, dtype=dtype), ""
    if target in _CONV_FN:
        weight = _arg(args, kwargs, 1, "weight")
        if not first_running or not isinstance(weight, Constant) or weight.input_dependent:
            return None, "a convolution whose weight depends on the input"
        d = _CONV_FN[target]

        def tup(v: Any) -> tuple[int, ...]:
            return tuple(v) if isinstance(v, (list, tuple)) else (int(v),) * d

        padding = _arg(args, kwargs, 4, "padding", 0)
        op = ConvOperator(weight.value, in_shape, stride=tup(_arg(args, kwargs, 3, "stride", 1)),
                          padding=padding if isinstance(padding, str) else tup(padding),
                          dilation=tup(_arg(args, kwargs, 5, "dilation", 1)),
                          groups=int(_arg(args, kwargs, 6, "groups", 1)),
                          dtype=dtype)
        return op, ""
    if target is F.batch_norm:
        running_var = _arg(args, kwargs, 2, "running_var")
        weight = _arg(args, kwargs, 3, "weight")
        training = _arg(args, kwargs, 5, "training", False)
        eps = _arg(args, kwargs, 7, "eps", 1e-5)
        if training or not isinstance(running_var, Constant) or running_var.input_dependent or \
                _has_input_dependent(weight) or not isinstance(eps, float):
            return None, "batch normalisation with batch statistics (training mode) or unusual arguments"
        scale = 1.0 / torch.sqrt(running_var.value.detach().to(dtype) + eps)
        if isinstance(weight, Constant) and weight.value is not None:
            scale = scale * weight.value.detach().to(dtype)
        return ChannelScaleOperator(scale, in_shape, dtype=dtype), ""
    if target in _LINEAR_GENERIC:
        if _has_input_dependent((args, kwargs)):
            return None, "its arguments depend on the input"
        return generic(args, kwargs)
    return None, "it is not a supported linear layer"
