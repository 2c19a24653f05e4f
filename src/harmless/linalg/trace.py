"""Tracing models as people write them, with ``torch.fx``.

* Layers the engine knows (exact types, or subclasses that keep the base ``forward``) and
  known non-linearities stay opaque nodes; everything else is traced into, so a
  ``BatchNorm2d`` subclass with an activation in its ``forward`` shows its activation.
* A sub-module that ``torch.fx`` cannot trace into (data-dependent control flow, say) is
  kept opaque and the trace is retried, so one awkward block does not sink the model.
* Parameters with defaults (``forward(self, x, attn_mask=None)``) are traced with their
  defaults.
* :class:`Recorder` runs the traced graph on a probe batch, perturbs one node's value, and
  keeps the values the caller asks for (the linear-run check of :mod:`.prefix`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn

from harmless.errors import UnsupportedLayerError
from harmless.linalg.layers import is_nonlinear_module, recognised_module

#: How many sub-modules may be made opaque before tracing gives up.
_MAX_OPAQUE = 64

#: fx call targets that read only a tensor's shape, never its values.
META_METHODS = frozenset({"size", "dim"})


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


class _Tracer(torch.fx.Tracer):
    def __init__(self, opaque: Iterable[str]) -> None:
        super().__init__()
        self.opaque = frozenset(opaque)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.opaque or recognised_module(m) or is_nonlinear_module(m):
            return True
        if isinstance(m, torch.jit.ScriptModule):
            return True
        return super().is_leaf_module(m, module_qualified_name)


@dataclass
class Traced:
    """A traced module: its graph module and the sub-modules kept opaque (name -> why fx
    could not trace into them)."""

    gm: torch.fx.GraphModule
    opaque: dict[str, str] = field(default_factory=dict)


def trace(root: nn.Module, concrete_args: dict[str, Any] | None = None) -> Traced:
    """Trace ``root``; sub-modules that cannot be traced into become opaque nodes."""
    if isinstance(root, torch.jit.ScriptModule):
        raise UnsupportedLayerError(
            "TorchScript models cannot be analysed: torch.fx cannot read a TorchScript graph. Load the model's "
            "Python class with its weights instead (package.module:factory --weights FILE)")
    opaque: dict[str, str] = {}
    for _ in range(_MAX_OPAQUE + 1):
        tracer = _Tracer(opaque)
        try:
            graph = tracer.trace(root, concrete_args=concrete_args)
            return Traced(torch.fx.GraphModule(tracer.root, graph), opaque)
        except Exception as exc:  # fx raises many kinds of errors for untraceable code
            stack = list(tracer.module_stack.values())
            culprit = str(stack[-1][0]) if stack else ""
            if not culprit or culprit in opaque:
                raise UnsupportedLayerError(
                    f"cannot trace {type(root).__name__} with torch.fx ({first_line(exc)}); wrap the model's first "
                    "layers in an nn.Module without data-dependent control flow, pass layer= to analyse a layer "
                    "inside it, or pass a TorchLinearOperator directly") from exc
            opaque[culprit] = first_line(exc)
    raise UnsupportedLayerError(f"cannot trace {type(root).__name__}: more than {_MAX_OPAQUE} sub-modules "
                                "cannot be traced into")  # pragma: no cover


def forward_parameters(module: nn.Module) -> list[inspect.Parameter]:
    """The parameters of ``module.forward`` (without ``self``)."""
    try:
        return list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature
        return []


def single_input_plan(module: nn.Module) -> dict[str, Any]:
    """``concrete_args`` for a model called with one tensor: every other parameter keeps
    its default. Raises when ``forward`` needs more than one input."""
    params = forward_parameters(module)
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p.name for p in params if p.kind in positional and p.default is inspect.Parameter.empty]
    if len(required) != 1:
        raise UnsupportedLayerError(
            f"the model takes {len(required)} required inputs ({', '.join(required) or 'none'}); harmless needs "
            "exactly one (parameters with defaults are fine): wrap the model, or pass layer= for a layer inside it")
    return {p.name: p.default for p in params if p.kind in positional and p.default is not inspect.Parameter.empty}


def bind_inputs(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                ) -> tuple[list[Any], dict[str, Any]]:
    """The values of every ``forward`` parameter in order, and ``concrete_args`` for the
    non-tensor ones (so that tracing specialises on them, as the model was called)."""
    sig = inspect.signature(module.forward)
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    values, concrete = [], {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            if value:
                raise UnsupportedLayerError(f"{type(module).__name__}.forward takes *args/**kwargs")
            continue
        values.append(value)
        if not isinstance(value, torch.Tensor):
            concrete[name] = value
    return values, concrete


class _Done(Exception):
    pass


class Recorder(torch.fx.Interpreter):
    """Runs a graph module, perturbing the value of ``source`` by ``inject(value)`` and
    keeping (a copy of) the value of each node in ``keep``; stops after ``stop_after``."""

    def __init__(self, gm: torch.fx.GraphModule, *, source: torch.fx.Node,
                 inject: Callable[[torch.Tensor], torch.Tensor], keep: set[torch.fx.Node],
                 stop_after: torch.fx.Node | None) -> None:
        super().__init__(gm)
        self.source = source
        self.inject = inject
        self.keep = keep
        self.stop_after = stop_after
        self.values: dict[torch.fx.Node, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        if n is self.source:
            result = self.inject(result)
        if n in self.keep:
            # A copy: a later in-place op (x.add_(...)) must not change what was recorded.
            # (Parameters and buffers, get_attr nodes, are kept as they are: never written, maybe large.)
            self.values[n] = result.clone() if isinstance(result, torch.Tensor) and n.op != "get_attr" else result
        if n is self.stop_after:
            raise _Done
        return result

    def record(self, *inputs: Any) -> dict[torch.fx.Node, Any]:
        with torch.no_grad():
            try:
                self.run(*inputs)
            except _Done:
                pass
        return self.values


def value_users(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Users that read ``node``'s values (``x.size()``, ``x.dim()``, ``x.shape`` only read its shape)."""
    return [u for u in node.users if not is_meta(u)]


def is_meta(node: torch.fx.Node) -> bool:
    """Whether ``node`` reads only the shape of its input."""
    if node.op == "call_method" and node.target in META_METHODS:
        return True
    return node.op == "call_function" and node.target is getattr and len(node.args) > 1 and \
        node.args[1] in ("shape", "ndim", "dtype", "device")


def downstream(sources: Iterable[torch.fx.Node]) -> set[torch.fx.Node]:
    """Every node whose value depends on the values of ``sources`` (shape reads cut the edge)."""
    seen: set[torch.fx.Node] = set()
    todo = list(sources)
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        todo.extend(value_users(n))
    return seen
