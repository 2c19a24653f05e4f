"""Finding the linear prefix of a model: the leading run of linear/affine steps before the
first non-linearity, composed into one operator, and checked against the model itself.

If a model computes ``f(x) = g(L(x))`` with ``L`` affine and nothing else reading ``x``
or ``L``'s intermediate results, then ``L delta = 0`` implies ``f(x + delta) = f(x)`` for
every ``x``: the nullspace of ``L``'s linear part is the model's input-level harmless
subspace (the paper's H^(0) composed through injective layers such as BatchNorm).

The model is traced with ``torch.fx`` (:mod:`.trace`), so functional calls
(``F.conv2d``, ``(x - mean) / std``, ``x.flatten(2).transpose(1, 2)``, a concatenated
class token, an added position embedding) are seen as well as modules. The walk stops at
the first step that is not linear, at a fan-out (a residual branch), or at a step the
engine does not know, and says which.

**Never silently wrong.** Every step of the run is checked numerically before anything is
returned: at random probes ``u`` and perturbations ``v`` of relative sizes 1e-3, 1 and
1e4, the step's real output (computed by the model's own modules and functions) must
satisfy ``g(u + v) - g(u) = A v`` to round-off, where ``A`` is the engine's operator for
it. A step that fails is not part of the run: the run stops before it and says why, with
the measured defect. A failure is classified by a model-free second difference
``g(u + v) + g(u - v) - 2 g(u)``: non-zero means the step is not affine (so the run is
the whole linear prefix); zero means the engine's model of an affine step is wrong, and
the run is merely shorter than it could be.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn

from harmless.errors import HarmlessError, InputError, TrainingModeWarning, UnsupportedLayerError
from harmless.linalg.layers import (
    RUNNING,
    Constant,
    call_name,
    is_linear_module,
    is_nonlinear_call,
    is_nonlinear_module,
    operator_for_call,
    operator_for_module,
    recognised_module,
)
from harmless.linalg.operators import ComposedOperator, ReshapeOperator, TorchLinearOperator
from harmless.linalg.trace import (
    Recorder,
    Traced,
    bind_inputs,
    downstream,
    first_line,
    forward_parameters,
    single_input_plan,
    trace,
    value_users,
)

#: Probe batch: ``_GROUPS`` base samples, each followed by ``+v`` and ``-v`` at every scale.
_SCALES = (1e-3, 1.0, 1e4)
_GROUPS = 2
_PER_GROUP = 1 + 2 * len(_SCALES)
PROBE_BATCH = _GROUPS * _PER_GROUP

#: Largest relative affinity defect accepted for a step, by the dtype the model computes in.
_STEP_TOL = {torch.float64: 1e-9, torch.float32: 1e-4}
_LOW_PRECISION_TOL = 3e-2

#: Stop kinds after which the run is the model's whole linear prefix (its nullspace is the
#: exact input-level harmless subspace of the linear theory); any other stop gives a
#: subspace of it (every element still harmless, the truth possibly larger).
COMPLETE_STOPS = frozenset({"output", "nonlinear"})


def step_tolerance(dtype: torch.dtype) -> float:
    """The largest relative defect ``||g(u+v) - g(u) - A v|| / (||g(u+v)|| + ||g(u)||)``
    accepted as round-off for a step computed in ``dtype``."""
    return _STEP_TOL.get(dtype, _LOW_PRECISION_TOL)


@dataclass(frozen=True)
class LayerRecord:
    """One step of a linear run and its measured affinity defect (relative, see
    :func:`step_tolerance`)."""

    name: str
    kind: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    defect: float = 0.0


@dataclass
class LinearRun:
    """A composed linear run of steps, what it covered and why it ended.

    ``stop_kind`` is ``output`` (the model's output was reached), ``nonlinear`` (the next
    step is not affine: known, or measured), ``branch`` (an intermediate result is read
    twice), ``unsupported`` (a step the engine cannot represent, or whose representation
    failed the check) or ``scope`` (the traced scope ended: the model could not be traced as
    a whole). ``complete`` says whether the run is the whole linear prefix: only then is
    "no harmless subspace" a statement about the model rather than about the analysis.
    """

    operator: TorchLinearOperator
    layers: list[LayerRecord] = field(default_factory=list)
    stopped_at: str | None = None
    stop_reason: str = ""
    stop_kind: str = "output"
    scope: str = "the whole model"
    tolerance: float = 0.0
    notes: list[str] = field(default_factory=list)
    probe: ModelProbe | None = field(default=None, repr=False)

    @property
    def complete(self) -> bool:
        """Whether the run is the model's whole linear prefix (from its start point)."""
        return self.stop_kind in COMPLETE_STOPS

    @property
    def defect(self) -> float:
        """The largest measured step defect (0 for an empty run)."""
        return max((r.defect for r in self.layers), default=0.0)

    @property
    def description(self) -> str:
        names = " -> ".join(f"{r.name} ({r.kind})" for r in self.layers) or "(identity)"
        tail = f"; stops at {self.stopped_at}: {self.stop_reason}" if self.stopped_at else ""
        where = "" if self.scope == "the whole model" else f" [traced within {self.scope}]"
        return names + tail + where


@contextlib.contextmanager
def eval_mode(model: nn.Module, *, warn: bool = True, who: str = "harmless analyses it",
              stacklevel: int = 3) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the duration (every module's flag restored after, even on
    error), warning if any module was training: ``who`` says who evaluates it, ``stacklevel``
    points the warning at the caller's caller."""
    was_training = [m.training for m in model.modules()]
    if warn and any(was_training):
        warnings.warn(f"the model is in training mode; {who} in eval mode (BatchNorm with "
                      "running statistics, no dropout). Call model.eval() to silence this warning.",
                      TrainingModeWarning, stacklevel=stacklevel)
    model.eval()
    try:
        yield model
    finally:
        for m, flag in zip(model.modules(), was_training):
            m.train(flag)


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and floating dtype of the model's first floating parameter or buffer."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.float32


class _Root(nn.Module):
    """Wraps a bare layer handed over as the model, so that tracing sees it as one call."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


# ---------------------------------------------------------------------------------------
# Probes
# ---------------------------------------------------------------------------------------
def _probe_inputs(input_shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``_GROUPS`` random inputs in [0, 1), each repeated ``_PER_GROUP`` times (seeded)."""
    gen = torch.Generator(device="cpu").manual_seed(20250201)
    base = torch.rand(_GROUPS, *input_shape, generator=gen, dtype=torch.float64)
    return base.repeat_interleave(_PER_GROUP, dim=0).to(device=device, dtype=dtype)


def _perturbations(value: torch.Tensor) -> torch.Tensor:
    """For a probe-batch value whose rows are constant within each group: 0, then ``+-s v``
    for every scale ``s``, with ``||v|| = ||u||`` per group (1 where ``u = 0``)."""
    gen = torch.Generator(device="cpu").manual_seed(7)
    base = value[::_PER_GROUP].detach().to("cpu", torch.float64)
    v = torch.randn(base.shape, generator=gen, dtype=torch.float64)
    u_norm = base.reshape(_GROUPS, -1).norm(dim=1)
    u_norm = torch.where(u_norm > 0, u_norm, torch.ones_like(u_norm))
    v = v * (u_norm / v.reshape(_GROUPS, -1).norm(dim=1)).view(-1, *([1] * (v.ndim - 1)))
    rows = []
    for g in range(_GROUPS):
        rows.append(torch.zeros_like(v[g]))
        for s in _SCALES:
            rows.extend([s * v[g], -s * v[g]])
    return torch.stack(rows).to(device=value.device, dtype=value.dtype)


def _group_rows() -> list[tuple[int, int, int]]:
    """(base row, +v row, -v row) for every group and scale."""
    out: list[tuple[int, int, int]] = []
    for g in range(_GROUPS):
        b = g * _PER_GROUP
        out.extend((b, b + 1 + 2 * i, b + 2 + 2 * i) for i in range(len(_SCALES)))
    return out


def _flat64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(t.shape[0], -1).to(torch.float64)


def _step_defect(op: TorchLinearOperator, r_in: torch.Tensor, r_out: torch.Tensor, tol: float) -> tuple[float, str]:
    """``max ||g(u+v) - g(u) - A (in(u+v) - in(u))|| / (||g(u+v)|| + ||g(u)||)`` over the
    probe rows, and a reason when the operator does not act sample by sample."""
    xi, yo = _flat64(r_in), _flat64(r_out)
    plus_minus = [(b, r) for b, p, q in _group_rows() for r in (p, q)]
    d_in = torch.stack([xi[r] - xi[b] for b, r in plus_minus])
    d_out = torch.stack([yo[r] - yo[b] for b, r in plus_minus])
    op64 = op if op.dtype == torch.float64 else op.astype(torch.float64)
    x = d_in.reshape(len(plus_minus), *op.in_shape).to(op64.device)
    pred = op64.matvec(x).reshape(len(plus_minus), -1).cpu()
    single = torch.cat([op64.matvec(x[i:i + 1]) for i in range(len(plus_minus))]).reshape(len(plus_minus), -1).cpu()
    scale = torch.stack([yo[r].norm() + yo[b].norm() for b, r in plus_minus]).clamp_min(1e-300)
    defect = float(((d_out - pred).norm(dim=1) / scale).max())
    batch_defect = float(((single - pred).norm(dim=1) / scale).max())
    if not math.isfinite(defect):
        return math.inf, "its output is not finite at the probes"
    if not batch_defect <= tol:
        return max(defect, batch_defect), "it mixes the samples of a batch"
    return defect, ""


def _second_difference(r_out: torch.Tensor) -> float:
    """``max ||g(u+v) + g(u-v) - 2 g(u)|| / (||g(u+v)|| + ||g(u-v)|| + 2||g(u)||)``: zero
    (to round-off) exactly when the step is affine along the probes, whatever it is."""
    yo = _flat64(r_out)
    worst = 0.0
    for b, p, q in _group_rows():
        num = (yo[p] + yo[q] - 2 * yo[b]).norm()
        den = yo[p].norm() + yo[q].norm() + 2 * yo[b].norm()
        worst = max(worst, float(num / den.clamp_min(1e-300)))
    return worst if math.isfinite(worst) else math.inf


# ---------------------------------------------------------------------------------------
# The walk
# ---------------------------------------------------------------------------------------
@dataclass
class _Stop:
    node: torch.fx.Node | None
    kind: str
    reason: str


def _describe(node: torch.fx.Node, gm: torch.fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(gm.get_submodule(str(node.target))).__name__})"
    if node.op in ("call_function", "call_method"):
        return f"{node.name} ({call_name(node.target)})"
    return f"{node.name} ({node.op})"


def _static_step(node: torch.fx.Node, current: torch.fx.Node, gm: torch.fx.GraphModule,
                 perturbed: set[torch.fx.Node], opaque: dict[str, str]) -> _Stop | None:
    """Why ``node`` cannot continue the run, judged from the graph alone (None: it may)."""
    others = [a for a in node.all_input_nodes if a is not current and a in perturbed]
    if others:
        return _Stop(node, "unsupported" if node.op != "output" else "output",
                     "it also reads another value that depends on the perturbation")
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if is_nonlinear_module(module):
            return _Stop(node, "nonlinear", f"{type(module).__name__} is not linear")
        if str(node.target) in opaque:
            return _Stop(node, "unsupported", f"{type(module).__name__} could not be traced into "
                                              f"({opaque[str(node.target)]})")
        if not recognised_module(module):
            return _Stop(node, "unsupported", f"{type(module).__name__} is not a layer the engine knows")
        if not is_linear_module(module):
            return _Stop(node, "nonlinear", f"{type(module).__name__} is not linear: it has no running statistics "
                                            "(batch statistics are not a per-sample linear map)")
        if not node.args or node.args[0] is not current or len(node.args) > 1 or node.kwargs:
            return _Stop(node, "unsupported", "it takes more than the running tensor as input")
        return None
    if node.op in ("call_function", "call_method"):
        if is_nonlinear_call(node.target):
            return _Stop(node, "nonlinear", f"{call_name(node.target)} is not linear")
        return None
    return _Stop(node, "unsupported", f"a {node.op} node")


def _arg_value(a: Any, current: torch.fx.Node, values: dict[torch.fx.Node, Any],
               input_dependent: set[torch.fx.Node]) -> Any:
    if isinstance(a, torch.fx.Node):
        if a is current:
            return RUNNING
        return Constant(values[a], input_dependent=a in input_dependent)
    if isinstance(a, (list, tuple)):
        return type(a)(_arg_value(x, current, values, input_dependent) for x in a)
    if isinstance(a, dict):
        return {k: _arg_value(x, current, values, input_dependent) for k, x in a.items()}
    return a


def _per_sample_shape(value: Any) -> tuple[int, ...] | None:
    if not isinstance(value, torch.Tensor) or value.ndim == 0 or value.shape[0] != PROBE_BATCH:
        return None
    if not value.is_floating_point():
        return None
    return tuple(int(s) for s in value.shape[1:])


def _operator_for_node(node: torch.fx.Node, current: torch.fx.Node, gm: torch.fx.GraphModule,
                       values: dict[torch.fx.Node, Any], input_dependent: set[torch.fx.Node],
                       dtype: torch.dtype, device: torch.device) -> tuple[TorchLinearOperator | None, str]:
    in_shape, out_shape = _per_sample_shape(values.get(current)), _per_sample_shape(values.get(node))
    if in_shape is None or out_shape is None:
        return None, "its output is not a per-sample floating-point tensor (or it mixes the batch)"
    try:
        if node.op == "call_module":
            return operator_for_module(gm.get_submodule(str(node.target)), in_shape, out_shape=out_shape,
                                       dtype=dtype, device=device, name=str(node.target)), ""
        args = _arg_value(tuple(node.args), current, values, input_dependent)
        kwargs = _arg_value(dict(node.kwargs), current, values, input_dependent)
        return operator_for_call(node.op, node.target, args, kwargs, in_shape, out_shape, batch=PROBE_BATCH,
                                 dtype=dtype, device=device, name=node.name)
    except (HarmlessError, RuntimeError, TypeError, ValueError) as exc:
        return None, f"its linear part could not be built ({first_line(exc)})"


@dataclass
class ModelProbe:
    """What the end-to-end check needs: the model, the probe inputs, where a perturbation
    enters (the model's input, or the input of the named layer) and the output to compare."""

    model: nn.Module
    inputs: torch.Tensor
    layer: str | None
    output: Any
    source_norms: torch.Tensor


def _walk(traced: Traced, source: torch.fx.Node, first: torch.fx.Node | None, inputs: Sequence[Any],
          dtype: torch.dtype, device: torch.device, scope: str) -> tuple[LinearRun, torch.Tensor]:
    """The verified run from ``source`` (the input of ``first`` when a layer is named)."""
    gm = traced.gm
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    perturbed = downstream([source])
    input_dependent = downstream(placeholders)

    # 1. The candidate steps, from the graph alone.
    chain: list[torch.fx.Node] = []
    current = source
    while True:
        users = [first] if (first is not None and current is source) else value_users(current)
        if not users:
            stop = _Stop(None, "output", "the output of the model")
            break
        if len(users) > 1:
            stop = _Stop(current, "branch", f"its result is read by {len(users)} later layers (a branch)")
            break
        nxt = users[0]
        if nxt.op == "output":
            stop = _Stop(None, "output" if scope == "the whole model" else "scope",
                         "the output of the model" if scope == "the whole model" else f"the output of {scope}")
            break
        blocked = _static_step(nxt, current, gm, perturbed, traced.opaque)
        if blocked is not None:
            stop = blocked
            break
        chain.append(nxt)
        current = nxt

    # 2. One run of the graph on the probe batch, perturbed at the source.
    last = stop.node if stop.node is not None and stop.node.op.startswith("call") and stop.kind != "branch" \
        else (chain[-1] if chain else source)
    keep = {source, *chain, last}
    for n in chain:
        keep.update(a for a in n.all_input_nodes)
    values: dict[torch.fx.Node, Any] = {}
    ends = [last] if last is (chain[-1] if chain else source) else [last, chain[-1] if chain else source]
    for i, end in enumerate(ends):
        try:
            values = Recorder(gm, source=source, inject=lambda v: v + _perturbations(v), keep=keep,
                              stop_after=end).record(*inputs)
            break
        except Exception as exc:
            # The stop node may fail on perturbed inputs; it is then judged without a measurement.
            if i == len(ends) - 1:
                raise InputError(f"the model fails on probe inputs: {first_line(exc)}") from exc
    src_value = values[source]
    if _per_sample_shape(src_value) is None:
        raise InputError("the analysed input is not a per-sample floating-point tensor")
    source_norms = _flat64(src_value[::_PER_GROUP]).norm(dim=1)

    # 3. Each step's operator, checked against the step's real output; the first failure ends the run.
    factors: list[TorchLinearOperator] = []
    records: list[LayerRecord] = []
    tol_used = 0.0
    prev = source
    for node in chain:
        op, why = _operator_for_node(node, prev, gm, values, input_dependent, dtype, device)
        if op is not None:
            out_dtype = values[node].dtype
            tol = step_tolerance(out_dtype)
            defect, why = _step_defect(op, values[prev], values[node], tol)
            tol_used = max(tol_used, tol)
            if not why and defect <= tol:
                factors.append(op)
                kind_name = type(gm.get_submodule(str(node.target))).__name__ if node.op == "call_module" \
                    else call_name(node.target)
                records.append(LayerRecord(str(node.target) if node.op == "call_module" else node.name, kind_name,
                                           op.in_shape, op.out_shape, defect))
                prev = node
                continue
            if not why:
                why = f"its output differs from the engine's linear model of it (defect {defect:.1e} > {tol:.0e})"
        # The step failed: a second difference tells a step that is not affine (the run is then
        # the whole linear prefix) from one the engine misread (the run is only shorter).
        stop = _Stop(node, "unsupported", why)
        break
    stop = _confirm_stop(stop, values)

    start_shape = _per_sample_shape(src_value)
    assert start_shape is not None
    operator: TorchLinearOperator = ComposedOperator(factors) if factors else \
        ReshapeOperator(start_shape, start_shape, dtype=dtype, device=device)
    if stop.node is not None:
        stopped_at: str | None = _describe(stop.node, gm)
    else:
        stopped_at = None if stop.kind == "output" else f"the output of {scope}"
    run = LinearRun(operator, records, stopped_at, stop.reason, stop.kind, scope, tol_used)
    return run, source_norms


def _confirm_stop(stop: _Stop, values: dict[torch.fx.Node, Any]) -> _Stop:
    """Measure whether the map from the source to the stop node is affine along the probes:
    a known non-linearity that measures affine (say, a ReLU whose inputs are all positive)
    only shortens the run; an unknown step that measures non-affine ends the linear prefix."""
    if stop.node is None or stop.kind not in ("nonlinear", "unsupported") or \
            _per_sample_shape(values.get(stop.node)) is None:
        return stop
    value = values[stop.node]
    second = _second_difference(value)
    tol = step_tolerance(value.dtype)
    if stop.kind == "unsupported" and second > tol:
        return _Stop(stop.node, "nonlinear", f"{stop.reason}; its output is not affine in the input (measured "
                                             f"second difference {second:.1e})")
    if stop.kind == "nonlinear" and not second > tol:
        return _Stop(stop.node, "unsupported", f"{stop.reason}, but it measured affine at the probes (second "
                                               f"difference {second:.1e}), so the linear prefix may go on")
    return stop


def _capture_inputs(model: nn.Module, names: Sequence[str], x: torch.Tensor
                    ) -> dict[str, tuple[tuple[Any, ...], dict[str, Any]] | None]:
    """The (args, kwargs) each named sub-module is called with on ``x`` (None: called twice or never)."""
    seen: dict[str, Any] = {}
    handles = []

    def hook_for(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            seen[name] = None if name in seen else (args, kwargs)
        return hook

    for name in names:
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook_for(name), with_kwargs=True))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return {n: seen.get(n) for n in names}


def _layer_in_scope(model: nn.Module, layer: str, x: torch.Tensor, dtype: torch.dtype, device: torch.device,
                    failure: str) -> tuple[LinearRun, torch.Tensor]:
    """``layer=`` on a model that does not trace as a whole: trace the smallest enclosing
    module that does, on the inputs it receives; else the named layer alone."""
    parts = layer.split(".")
    ancestors = [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]
    captured = _capture_inputs(model, [layer, *ancestors], x)
    if captured[layer] is None:
        raise InputError(f"layer {layer!r} is not called exactly once on an input of this shape")
    for name in ancestors:
        call = captured[name]
        if call is None:
            continue
        module = model.get_submodule(name)
        try:
            values, concrete = bind_inputs(module, *call)
            traced = trace(module, concrete)
        except (UnsupportedLayerError, TypeError):
            continue
        rel = layer[len(name) + 1:]
        calls = [n for n in traced.gm.graph.nodes if n.op == "call_module" and str(n.target) == rel]
        if len(calls) != 1 or not calls[0].args or not isinstance(calls[0].args[0], torch.fx.Node):
            continue
        run, norms = _walk(traced, calls[0].args[0], calls[0], values, dtype, device, f"module {name!r}")
        run.notes.append(f"the model cannot be traced as a whole ({failure}); the run was traced within {name!r}"
                         + ("" if run.complete else ", so it may be shorter than the model's: the subspace is "
                            "contained in the true H^(l) (every element is still harmless)"))
        return run, norms
    # No enclosing module traces: the named layer alone.
    module = model.get_submodule(layer)
    holder = _Root(module)
    traced = trace(holder, {})
    node = next(n for n in traced.gm.graph.nodes if n.op == "call_module")
    args, _ = captured[layer]  # type: ignore[misc]
    run, norms = _walk(traced, node.args[0], node, [args[0]], dtype, device, f"layer {layer!r} alone")
    run.notes.append(f"no module enclosing {layer!r} can be traced ({failure}); the run is the layer alone"
                     + ("" if run.complete else ", so the subspace is contained in the true H^(l) (every element is "
                        "still harmless)"))
    return run, norms


def linear_run(model: nn.Module, input_shape: Sequence[int], *, layer: str | None = None,
               dtype: torch.dtype = torch.float64, output: Any = None) -> LinearRun:
    """Compose and check the linear run of ``model`` that starts at its input
    (``layer=None``) or at the input of the named submodule ``layer`` (the paper's H^(l),
    Definition 2).

    The run continues while each step is linear (a supported layer or a functional call,
    see :mod:`harmless.linalg.layers`), fed only by the previous step plus constants, and
    its real output matches the engine's operator to round-off (module docstring). ``output``
    selects the model's output for the end-to-end check when it returns a tuple, dict or
    dataclass (an index, key, attribute name or callable; default: ``logits``, else the
    first tensor).
    """
    input_shape = tuple(int(s) for s in input_shape)
    if isinstance(model, torch.jit.ScriptModule):
        trace(model)  # raises the one-line explanation
    with eval_mode(model, warn=True):
        user_model, model = model, _analysis_copy(model, dtype)
        root = _Root(model) if recognised_module(model) or is_nonlinear_module(model) else model
        plan = single_input_plan(root)
        device, model_dtype = model_device_dtype(model)
        example = torch.zeros(2, *input_shape, dtype=model_dtype, device=device)
        try:  # run the model itself first: its own error message is the one worth showing
            with torch.no_grad():
                model(example)
        except Exception as exc:
            raise InputError(f"the model does not accept inputs of shape (B, {', '.join(map(str, input_shape))}): "
                             f"{first_line(exc)}") from exc
        x = _probe_inputs(input_shape, device, model_dtype)
        if layer is not None:
            _check_layer(model, layer)
        try:
            traced = trace(root, plan)
        except UnsupportedLayerError as exc:
            if layer is None:
                raise
            cause = exc.__cause__
            run, norms = _layer_in_scope(model, layer, x, dtype, device,
                                         first_line(cause) if cause is not None else str(exc))
        else:
            values = [x] + [p.default for p in forward_parameters(root)[1:]]
            gm = traced.gm
            source, first = _source(gm, layer, root is not model)
            if layer is not None and first is None:
                run, norms = _layer_in_scope(model, layer, x, dtype, device,
                                             f"{layer!r} is inside {_opaque_parent(layer, traced)}")
            else:
                run, norms = _walk(traced, source, first, values, dtype, device, "the whole model")
        if layer is not None and not run.layers:
            raise UnsupportedLayerError(f"layer {layer} is not linear: {run.stop_reason}")
        run.probe = ModelProbe(user_model, x[::_PER_GROUP].clone(), layer, output, norms)
        return run


def _analysis_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A float64 copy of a lower-precision model for a float64 analysis: constants that the
    model derives from its weights (``1 / std``, a folded BatchNorm scale) are then computed in
    float64, as in the float64 model that exactness is measured against, and every step is
    checked at float64 round-off. Large models (or ones that cannot be copied) are analysed
    as they are, with their own precision's tolerance."""
    _, model_dtype = model_device_dtype(model)
    if dtype != torch.float64 or model_dtype == torch.float64 or \
            sum(p.numel() for p in model.parameters()) > _CHECK_FLOAT64_PARAMS:
        return model
    try:
        return copy.deepcopy(model).to(torch.float64).eval()
    except Exception:
        return model


def _check_layer(model: nn.Module, layer: str) -> None:
    try:
        module = model.get_submodule(layer)
    except AttributeError as exc:
        names = [n for n, _ in model.named_modules() if n]
        raise InputError(f"no layer named {layer!r} in the model; layers: " + ", ".join(names[:20])
                         + (" ..." if len(names) > 20 else "")) from exc
    if is_nonlinear_module(module):
        raise UnsupportedLayerError(f"layer {layer} ({type(module).__name__}) is not linear")
    if not recognised_module(module):
        raise UnsupportedLayerError(
            f"layer {layer} ({type(module).__name__}) is not a single linear layer the engine knows; name a Linear, "
            "Conv, BatchNorm, pooling or reshape layer (for a block, name its first layer)")


def _opaque_parent(layer: str, traced: Traced) -> str:
    for name in traced.opaque:
        if layer.startswith(name + "."):
            return f"{name!r}, which torch.fx cannot trace into ({traced.opaque[name]})"
    return "a module that is not traced into"


def _source(gm: torch.fx.GraphModule, layer: str | None, wrapped: bool
            ) -> tuple[torch.fx.Node, torch.fx.Node | None]:
    nodes = list(gm.graph.nodes)
    if layer is None:
        return nodes[0], None
    target = f"layer.{layer}" if wrapped else layer
    calls = [n for n in nodes if n.op == "call_module" and str(n.target) == target]
    if not calls:
        return nodes[0], None
    if len(calls) > 1:
        raise InputError(f"layer {layer!r} is called {len(calls)} times; its input is ambiguous")
    first = calls[0]
    if not first.args or not isinstance(first.args[0], torch.fx.Node):
        raise InputError(f"layer {layer!r} has no tensor input")
    return first.args[0], first


# ---------------------------------------------------------------------------------------
# The end-to-end check: a harmless perturbation against the model's own output
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelCheck:
    """The model's own output under harmless perturbations of growing size.

    ``changes[i]`` is the largest relative output change ``||f(x + d) - f(x)|| / ||f(x)||``
    over the probes for harmless ``d`` with ``||d|| = scales[i] * ||x||`` (at the analysed
    input); ``control`` the same for random ``d`` of relative size 1. Computed in ``dtype``
    (float64 on a copy of the model when it is small enough).
    """

    scales: tuple[float, ...]
    changes: tuple[float, ...]
    control: float
    tolerance: float
    dtype: torch.dtype

    @property
    def passed(self) -> bool:
        return all(c <= self.tolerance for c in self.changes)


#: Models up to this many parameters are copied to float64 for the end-to-end check.
_CHECK_FLOAT64_PARAMS = 50_000_000
_MODEL_TOL = {torch.float64: 1e-6, torch.float32: 1e-2}


def select_output(out: Any, output: Any = None) -> torch.Tensor:
    """The tensor to compare from a model's return value (see :func:`linear_run`)."""
    if output is not None:
        if callable(output):
            out = output(out)
        elif isinstance(output, int) and isinstance(out, (tuple, list)):
            out = out[output]
        elif isinstance(out, dict) and output in out:
            out = out[output]
        elif isinstance(output, str) and hasattr(out, output):
            out = getattr(out, output)
        else:
            raise InputError(f"output={output!r} selects nothing from a {type(out).__name__}")
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        items = [out["logits"]] if "logits" in out else list(out.values())
    elif dataclasses.is_dataclass(out) and not isinstance(out, type):
        fields = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
        items = [fields["logits"]] if "logits" in fields else list(fields.values())
    elif isinstance(out, (tuple, list)):
        items = list(out)
    else:
        raise InputError(f"the model returns a {type(out).__name__}; pass output= to select a tensor")
    for item in items:
        if isinstance(item, torch.Tensor) and item.is_floating_point():
            return item
    raise InputError(f"the model's {type(out).__name__} output holds no floating-point tensor; pass output=")


def check_on_model(probe: ModelProbe, harmless: torch.Tensor, control: torch.Tensor, *, rtol: float,
                   precise: bool) -> ModelCheck:
    """Run the model at the probes with ``harmless`` (unit-norm rows, one per probe, at the
    analysed input) scaled to each size, and ``control`` (random unit-norm rows).

    ``rtol`` is the relative harmful residual ``harmless`` was projected to: a float32
    projection (1e-6) moves the output by about that much per unit of size, so the tolerance
    is at least ``1e4 * rtol`` and only ``precise`` (float64) projections are also tried at
    10^4 times the input's size."""
    model = probe.model
    n_params = sum(p.numel() for p in model.parameters())
    _, model_dtype = model_device_dtype(model)
    if model_dtype != torch.float64 and n_params <= _CHECK_FLOAT64_PARAMS:
        try:
            model = copy.deepcopy(model).to(torch.float64)
        except Exception:  # a model that cannot be copied is checked in its own precision
            model = probe.model
    device, dtype = model_device_dtype(model)
    scales = (1.0, 1e4) if dtype == torch.float64 and precise else (1.0,)
    x = probe.inputs.to(device=device, dtype=dtype)
    norms = probe.source_norms.to(device=device, dtype=dtype).clamp_min(1e-300)

    def run_with(delta: torch.Tensor | None) -> torch.Tensor:
        if delta is None:  # a copy: a model that writes into its input must not change the probes
            with torch.no_grad():
                return _flat64(select_output(model(x.clone()), probe.output))
        d = delta.to(device=device, dtype=dtype)
        if probe.layer is None:
            with torch.no_grad():
                return _flat64(select_output(model(x + d), probe.output))
        target = model.get_submodule(probe.layer)

        def add(_m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            return (args[0] + d, *args[1:])

        handle = target.register_forward_pre_hook(add)
        try:
            with torch.no_grad():
                return _flat64(select_output(model(x.clone()), probe.output))
        finally:
            handle.remove()

    with eval_mode(model, warn=False):
        base = run_with(None)
        denom = base.norm(dim=1).clamp_min(1e-300)
        view = (-1,) + (1,) * (harmless.ndim - 1)
        changes = []
        for s in scales:
            out = run_with(harmless.to(device=device, dtype=dtype) * (s * norms).view(view))
            changes.append(float(((out - base).norm(dim=1) / denom).max()))
        out = run_with(control.to(device=device, dtype=dtype) * norms.view(view))
        ctrl = float(((out - base).norm(dim=1) / denom).min())
    return ModelCheck(scales, tuple(changes), ctrl, max(_MODEL_TOL.get(dtype, 1e-1), 1e4 * rtol), dtype)


# ---------------------------------------------------------------------------------------
# Every Linear and Conv layer, for the per-layer report
# ---------------------------------------------------------------------------------------
def linear_layers(model: nn.Module, input_shape: Sequence[int], *,
                  dtype: torch.dtype = torch.float64) -> list[tuple[LayerRecord, TorchLinearOperator]]:
    """Every Linear and Conv module of ``model`` that is called once, as its own operator,
    with its input shape (found by running the model once)."""
    input_shape = tuple(int(s) for s in input_shape)
    with eval_mode(model, warn=False):
        device, model_dtype = model_device_dtype(model)
        names = [n for n, m in model.named_modules()
                 if n and isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and is_linear_module(m)]
        x = torch.zeros(2, *input_shape, dtype=model_dtype, device=device)
        shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]] | None] = {}
        handles = []

        def hook_for(name: str) -> Callable[..., None]:
            def hook(_m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
                ok = args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor) and \
                    args[0].ndim > 0 and args[0].shape[0] == 2 and out.shape[0] == 2
                shapes[name] = None if name in shapes or not ok else (tuple(args[0].shape[1:]), tuple(out.shape[1:]))
            return hook

        for name in names:
            handles.append(model.get_submodule(name).register_forward_hook(hook_for(name)))
        try:
            with torch.no_grad():
                model(x)
        except Exception as exc:
            raise InputError(f"the model does not accept inputs of shape (B, {', '.join(map(str, input_shape))}): "
                             f"{first_line(exc)}") from exc
        finally:
            for h in handles:
                h.remove()
        out = []
        for name in names:
            io = shapes.get(name)
            if io is None:
                continue
            module = model.get_submodule(name)
            op = operator_for_module(module, io[0], out_shape=io[1], dtype=dtype, device=device, name=name)
            out.append((LayerRecord(name, type(module).__name__, io[0], io[1]), op))
        return out
