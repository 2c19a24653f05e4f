"""Finding the linear prefix of a model: the leading run of linear/affine layers before the
first non-linearity, composed into one operator.

If a model computes ``f(x) = g(L(x))`` with ``L`` linear (up to a bias) and nothing else
reading ``x`` or ``L``'s intermediate results, then ``L delta = 0`` implies
``f(x + delta) = f(x)`` for every ``x``: the nullspace of ``L`` is the model's input-level
harmless subspace (the paper's H^(0) composed through injective layers such as BatchNorm).

The model is traced with ``torch.fx`` so that functional calls (``torch.flatten``,
``F.relu``, ``x.view``) are seen as well as modules; the walk stops at the first node that
is not linear, or at a fan-out, and reports why.
"""

from __future__ import annotations

import contextlib
import operator
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from harmless.errors import InputError, TrainingModeWarning, UnsupportedLayerError
from harmless.linalg.layers import (
    LINEAR_MODULES,
    RESHAPE_FUNCTIONS,
    RESHAPE_METHODS,
    is_linear_module,
    operator_for_module,
)
from harmless.linalg.operators import ComposedOperator, ReshapeOperator, TorchLinearOperator

_META_METHODS = frozenset({"size", "dim"})


@dataclass(frozen=True)
class LayerRecord:
    """One layer of a linear run."""

    name: str
    kind: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]


@dataclass
class LinearRun:
    """A composed linear run of layers with a record of what it covered and why it ended."""

    operator: TorchLinearOperator
    layers: list[LayerRecord] = field(default_factory=list)
    stopped_at: str | None = None
    stop_reason: str = ""

    @property
    def description(self) -> str:
        names = " -> ".join(f"{r.name} ({r.kind})" for r in self.layers) or "(identity)"
        tail = f"; stops at {self.stopped_at}: {self.stop_reason}" if self.stopped_at else ""
        return names + tail


@contextlib.contextmanager
def eval_mode(model: nn.Module, *, warn: bool = True) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the duration, warning if it was training; restore after."""
    was_training = [m.training for m in model.modules()]
    if warn and model.training:
        warnings.warn("the model is in training mode; harmless analyses it in eval mode (BatchNorm with "
                      "running statistics, no dropout). Call model.eval() to silence this warning.",
                      TrainingModeWarning, stacklevel=3)
    model.eval()
    try:
        yield model
    finally:
        for m, flag in zip(model.modules(), was_training):
            m.train(flag)


class _LeafTracer(torch.fx.Tracer):
    """Keeps every layer the engine understands as one opaque node (never traced into)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, LINEAR_MODULES) or super().is_leaf_module(m, module_qualified_name)


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.float32


#: ShapeProp runs on a batch of this size, so that a reshape mixing samples (``x.view(-1, k)``)
#: shows up as a changed leading dimension.
_PROBE_BATCH = 2


class _Root(nn.Module):
    """Wraps a bare layer handed over as the model, so that tracing sees it as one call."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _trace(model: nn.Module, input_shape: Sequence[int]) -> torch.fx.GraphModule:
    root = _Root(model) if isinstance(model, LINEAR_MODULES) else model
    try:
        graph = _LeafTracer().trace(root)
        gm = torch.fx.GraphModule(root, graph)
    except Exception as exc:  # fx raises many kinds of errors for untraceable code
        raise UnsupportedLayerError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {exc}); "
            "wrap the model's first layers in an nn.Module without data-dependent control flow, "
            "or pass a TorchLinearOperator directly") from exc
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UnsupportedLayerError(f"the model takes {len(placeholders)} inputs; harmless needs exactly one")
    device, dtype = _model_device_dtype(model)
    example = torch.zeros(_PROBE_BATCH, *input_shape, dtype=dtype, device=device)
    try:  # run the model itself first: its own error message is the one worth showing
        with torch.no_grad():
            model(example)
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise InputError(f"the model does not accept inputs of shape (B, {', '.join(map(str, input_shape))}): "
                         f"{type(exc).__name__}: {first_line}") from exc
    with torch.no_grad():
        ShapeProp(gm).propagate(example)
    return gm


def _shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    """A node's per-sample shape, or None if it is not a tensor with the batch in front."""
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape") or len(meta.shape) == 0 or meta.shape[0] != _PROBE_BATCH:
        return None
    return tuple(int(s) for s in meta.shape[1:])


def _tensor_users(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Users that read ``node``'s values (``x.size()`` and ``x.dim()`` only read its shape)."""
    return [u for u in node.users if not (u.op == "call_method" and u.target in _META_METHODS)
            and not (u.op == "call_function" and u.target is getattr and len(u.args) > 1 and u.args[1] == "shape")]


def _describe(node: torch.fx.Node, gm: torch.fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(gm.get_submodule(str(node.target))).__name__})"
    if node.op in ("call_function", "call_method"):
        name = getattr(node.target, "__name__", str(node.target))
        return f"{node.name} ({name})"
    return f"{node.name} ({node.op})"


def _linear_step(node: torch.fx.Node, source: torch.fx.Node, gm: torch.fx.GraphModule, dtype: torch.dtype,
                 device: torch.device) -> tuple[TorchLinearOperator | None, str]:
    """The operator for ``node`` applied to ``source``, or ``None`` and why it is not linear."""
    in_shape, out_shape = _shape(source), _shape(node)
    if in_shape is None or out_shape is None:
        return None, "its output is not a per-sample tensor (not a tensor, or a reshape that mixes the batch)"
    tensor_args = [a for a in node.all_input_nodes if a is not source and _shape(a) is not None]
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if not node.args or node.args[0] is not source or tensor_args:
            return None, "it takes more than the running tensor as input"
        if not is_linear_module(module):
            return None, f"{type(module).__name__} is not linear"
        return operator_for_module(module, in_shape, out_shape=out_shape, dtype=dtype, device=device,
                                   name=str(node.target)), ""
    is_reshape = (node.op == "call_function" and node.target in RESHAPE_FUNCTIONS) or \
                 (node.op == "call_method" and node.target in RESHAPE_METHODS)
    if is_reshape and node.args and node.args[0] is source and \
            all(a.op == "call_method" and a.target in _META_METHODS or _shape(a) is None for a in tensor_args):
        return ReshapeOperator(in_shape, out_shape, dtype=dtype, device=device), ""
    if node.op == "call_function" and node.target in (operator.getitem,):
        return None, "indexing is not supported in the linear prefix"
    return None, "it is not a supported linear layer"


def linear_run(model: nn.Module, input_shape: Sequence[int], *, layer: str | None = None,
               dtype: torch.dtype = torch.float64) -> LinearRun:
    """Compose the linear run of ``model`` that starts at its input (``layer=None``) or at
    the input of the named submodule ``layer`` (the paper's H^(l), Definition 2).

    The run continues while each step is a supported linear layer fed only by the previous
    step, and while no intermediate result is read elsewhere (a residual branch, say).
    """
    input_shape = tuple(int(s) for s in input_shape)
    with eval_mode(model, warn=True):
        gm = _trace(model, input_shape)
        device, _ = _model_device_dtype(model)
        nodes = list(gm.graph.nodes)
        placeholders = [n for n in nodes if n.op == "placeholder"]
        if layer is None:
            source = placeholders[0]
            first = None
        else:
            calls = [n for n in nodes if n.op == "call_module" and str(n.target) == layer]
            if not calls:
                names = [str(n.target) for n in nodes if n.op == "call_module"]
                raise InputError(f"no layer named {layer!r} is called in the model; layers: "
                                 + ", ".join(names[:20]) + (" ..." if len(names) > 20 else ""))
            if len(calls) > 1:
                raise InputError(f"layer {layer!r} is called {len(calls)} times; its input is ambiguous")
            first = calls[0]
            if not first.args or not isinstance(first.args[0], torch.fx.Node):
                raise InputError(f"layer {layer!r} has no tensor input")
            source = first.args[0]

        start_shape = _shape(source)
        if start_shape is None:
            raise InputError(f"cannot determine the input shape of {layer!r}")
        factors: list[TorchLinearOperator] = []
        records: list[LayerRecord] = []
        stopped_at, reason = None, "the output of the model"
        current = source
        while True:
            users = _tensor_users(current)
            if first is not None and current is source:
                users = [first]  # H^(l) is about the named layer's input, whoever else reads it
            if not users:
                break
            if len(users) > 1:
                stopped_at = _describe(current, gm)
                reason = f"its result is read by {len(users)} later layers (a branch)"
                break
            nxt = users[0]
            if nxt.op == "output":
                break
            op, why = _linear_step(nxt, current, gm, dtype, device)
            if op is None:
                stopped_at, reason = _describe(nxt, gm), why
                if first is not None and nxt is first:
                    raise UnsupportedLayerError(f"layer {_describe(nxt, gm)} is not linear: {why}")
                break
            factors.append(op)
            records.append(LayerRecord(
                name=str(nxt.target) if nxt.op == "call_module" else nxt.name,
                kind=type(gm.get_submodule(str(nxt.target))).__name__ if nxt.op == "call_module"
                else getattr(nxt.target, "__name__", str(nxt.target)),
                in_shape=op.in_shape, out_shape=op.out_shape))
            current = nxt
        if not factors:
            identity = ReshapeOperator(start_shape, start_shape, dtype=dtype, device=device)
            return LinearRun(identity, [], stopped_at, reason)
        return LinearRun(ComposedOperator(factors), records, stopped_at, reason)


def linear_layers(model: nn.Module, input_shape: Sequence[int], *,
                  dtype: torch.dtype = torch.float64) -> list[tuple[LayerRecord, TorchLinearOperator]]:
    """Every Linear and Conv layer of ``model`` as its own operator, with its input shape."""
    input_shape = tuple(int(s) for s in input_shape)
    with eval_mode(model, warn=False):
        gm = _trace(model, input_shape)
        device, _ = _model_device_dtype(model)
        out = []
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            module = gm.get_submodule(str(node.target))
            if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                continue
            src = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
            in_shape, out_shape = (_shape(src) if src is not None else None), _shape(node)
            if in_shape is None or out_shape is None:
                continue
            op = operator_for_module(module, in_shape, out_shape=out_shape, dtype=dtype, device=device,
                                     name=str(node.target))
            out.append((LayerRecord(str(node.target), type(module).__name__, in_shape, out_shape), op))
        return out
