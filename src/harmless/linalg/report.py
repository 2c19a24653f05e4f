"""A per-layer report of a model's linear structure: for the linear prefix and for every
Linear/Conv layer, input and output dimensions, rank and harmless dimension."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from harmless.errors import InputError, TooLargeError
from harmless.linalg.operators import TorchLinearOperator
from harmless.linalg.prefix import LinearRun, linear_layers, linear_run
from harmless.linalg.rank import analyze_rank

#: Per-layer limits for the report: wide enough for CIFAR-size layers, small enough to stay fast.
REPORT_DENSE_LIMIT = 20_000_000
REPORT_GRAM_LIMIT = 4_096


@dataclass
class LayerRow:
    """One row of the report. ``rank``/``harmless_dim`` are ``None`` when not computable
    here; ``harmless_dim_lower`` is then the rank-nullity bound ``max(0, n - m)``."""

    name: str
    kind: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    input_dim: int
    output_dim: int
    rank: int | None
    harmless_dim: int | None
    harmless_dim_lower: int
    method: str
    input_level: bool

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _row(name: str, kind: str, op: TorchLinearOperator, input_level: bool) -> LayerRow:
    n, m = op.n, op.m
    rank: int | None
    dim: int | None
    try:
        info = analyze_rank(op, method="auto", dense_limit=REPORT_DENSE_LIMIT, gram_limit=REPORT_GRAM_LIMIT,
                            bases=False)
        rank, dim, method = info.rank, info.dim, info.method
    except TooLargeError:
        rank, dim, method = None, None, "too large"
    return LayerRow(name=name, kind=kind, in_shape=op.in_shape, out_shape=op.out_shape,
                    input_dim=n, output_dim=m, rank=rank, harmless_dim=dim, harmless_dim_lower=max(0, n - m),
                    method=method, input_level=input_level)


def prefix_report(model: nn.Module, input_shape: Sequence[int], *,
                  dtype: torch.dtype = torch.float64) -> tuple[LayerRow, LinearRun]:
    """``(prefix row, the checked linear run)``: the input-level harmless subspace alone (the
    whole model ignores it), without the per-layer ranks, so a caller can answer for the input
    before the slow per-layer table starts."""
    run = linear_run(model, input_shape, dtype=dtype)
    return _row("linear prefix", "+".join(r.kind for r in run.layers) or "identity", run.operator, True), run


def select_layers(names: Sequence[str], layers: str | int | Sequence[str] | None) -> list[int]:
    """Indices into ``names`` picked by ``layers``: ``None``/``"all"`` every layer, ``"none"`` or
    ``0`` none, an int ``N`` the first N, a sequence of names those (in the model's order). An
    unknown name raises :class:`InputError` naming the layers there are."""
    if layers is None or (isinstance(layers, str) and layers == "all"):
        return list(range(len(names)))
    if isinstance(layers, str) and layers == "none":
        return []
    if isinstance(layers, bool):
        raise InputError(f"layers must be 'all', 'none', a count or layer names, got {layers!r}")
    if isinstance(layers, int):
        if layers < 0:
            raise InputError(f"the number of layers must be >= 0, got {layers}")
        return list(range(min(layers, len(names))))
    wanted = [layers] if isinstance(layers, str) else list(layers)
    unknown = [w for w in wanted if w not in names]
    if unknown:
        shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
        raise InputError(f"no linear layer named {', '.join(map(repr, unknown))}; the linear layers are: "
                         f"{shown or 'none'}")
    return [i for i, n in enumerate(names) if n in set(wanted)]


def layer_rows(model: nn.Module, input_shape: Sequence[int], *, layers: str | int | Sequence[str] | None = None,
               dtype: torch.dtype = torch.float64, progress: bool | None = None) -> list[LayerRow]:
    """Every (or the selected, see :func:`select_layers`) Linear/Conv layer's own H^(l), a
    subspace of that layer's input features. A deep model's per-layer ranks take minutes: a
    progress bar shows them, one step per layer (``progress=None``: only on a terminal,
    tqdm's own check; ``False``: never)."""
    from tqdm.auto import tqdm

    found = linear_layers(model, input_shape, dtype=dtype)
    picked = [found[i] for i in select_layers([rec.name for rec, _ in found], layers)]
    rows = []
    bar = tqdm(picked, desc="rank per layer", unit="layer", disable=None if progress is None else not progress,
               leave=False)
    for rec, op in bar:
        bar.set_postfix_str(rec.name, refresh=True)
        rows.append(_row(rec.name, rec.kind, op, False))
    return rows


def layer_report(model: nn.Module, input_shape: Sequence[int], *, dtype: torch.dtype = torch.float64,
                 progress: bool | None = None,
                 layers: str | int | Sequence[str] | None = None) -> tuple[LayerRow, list[LayerRow], LinearRun]:
    """``(prefix row, per-layer rows, the checked linear run)`` for ``model``: :func:`prefix_report`
    then :func:`layer_rows` (``layers`` selects the rows, default all)."""
    prefix, run = prefix_report(model, input_shape, dtype=dtype)
    return prefix, layer_rows(model, input_shape, layers=layers, dtype=dtype, progress=progress), run


def headline(row: LayerRow, run: LinearRun) -> str:
    """What the run shows about the input-level harmless subspace, in one line. It says
    "injective" only when the run is the model's whole linear prefix."""
    n = row.input_dim
    where = f"{run.stop_kind} at {run.stopped_at}: {run.stop_reason}" if run.stopped_at else run.stop_reason
    if row.harmless_dim is None:
        return (f"dim >= {row.harmless_dim_lower} of {n} (rank not computable here; "
                + ("the run is the whole linear prefix)" if run.complete else f"the run stopped early, {where})"))
    if row.harmless_dim > 0:
        if run.complete:
            return f"dim {row.harmless_dim} of {n}: the model ignores every input change in it, whatever its size"
        return (f"dim >= {row.harmless_dim} of {n}: every change in it is harmless, but the run stopped early "
                f"({where}), so the true subspace may be larger")
    if run.complete:
        return (f"dim 0 of {n}: the linear prefix is injective (see harmless.least_harmful for the least harmful "
                "directions)")
    return (f"none found (dim >= 0 of {n}): the run stopped early ({where}); this does not show that the model is "
            "injective")


def steps_table(run: LinearRun) -> str:
    """The run step by step: name, op, shapes and the measured affinity defect, then the stop."""
    rows = [[r.name, r.kind, "x".join(map(str, r.in_shape)) + " -> " + "x".join(map(str, r.out_shape)),
             f"{r.defect:.1e}"] for r in run.layers]
    header = ["step", "op", "shape", "defect"]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    lines = [("  " + "  ".join(h.ljust(w) for h, w in zip(header, widths))).rstrip()]
    lines += [("  " + "  ".join(str(x).ljust(w) for x, w in zip(row, widths))).rstrip() for row in rows]
    if run.stopped_at:
        lines.append(f"  stops at {run.stopped_at}: {run.stop_reason}")
    else:
        lines.append(f"  ends at {run.stop_reason}")
    lines += [f"  note: {note}" for note in run.notes]
    return "\n".join(lines)


def run_as_dict(run: LinearRun) -> dict[str, object]:
    """The run for JSON output."""
    return {"steps": [{"name": r.name, "op": r.kind, "in_shape": list(r.in_shape), "out_shape": list(r.out_shape),
                       "defect": r.defect} for r in run.layers],
            "tolerance": run.tolerance, "stopped_at": run.stopped_at, "stop_reason": run.stop_reason,
            "stop_kind": run.stop_kind, "complete": run.complete, "scope": run.scope, "notes": list(run.notes)}


def format_dim(row: LayerRow) -> str:
    """The harmless dimension as text: exact, or a lower bound when not computable."""
    if row.harmless_dim is not None:
        return str(row.harmless_dim)
    return f">= {row.harmless_dim_lower}"


def markdown_table(prefix: LayerRow, rows: list[LayerRow]) -> str:
    """The report as a markdown table."""
    head = ("| layer | kind | input shape | n | m | rank | harmless dim | method |\n"
            "|---|---|---|---:|---:|---:|---:|---|\n")
    lines = []
    for r in [prefix, *rows]:
        rank = "?" if r.rank is None else str(r.rank)
        shape = "x".join(map(str, r.in_shape))
        lines.append(f"| {r.name} | {r.kind} | {shape} | {r.input_dim} | {r.output_dim} | {rank} | "
                     f"{format_dim(r)} | {r.method} |")
    return head + "\n".join(lines) + "\n"

