"""Lemma 1 measured: the dimension of the exact convex piece of P^(l) at every layer of MLP-5
(MNIST, Fashion-MNIST), per test image, and what the piece at the output adds to H^(0).

Run it with ``harmless reproduce lemma1 --out results`` (or ``run('results')`` from Python)
(``quick=True``: 100 images per data set instead of 1,000). Writes ``lemma1.md`` and
``lemma1.png`` into ``out_dir``.
"""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import harmless
from harmless.nonlinear import ReluNetwork
from harmless.threads import one_blas_thread, one_torch_thread

SPECS = ("mlp5:mnist", "mlp5:fashion-mnist", "lenet:mnist")
#: Images per model (full run, quick run). LeNet's pieces cost a few times MLP-5's (equalities up to
#: ~5,000 x 784 at the conv layers; tied max-pool windows make implicit equalities, found by an LP):
#: ~2 s per image on the 2 shared cores (results/lemma1.md), after the nested-piece shortcuts of
#: harmless.nonlinear.network (~21 s per image before).
IMAGES = {"mlp5:mnist": (1000, 100), "mlp5:fashion-mnist": (1000, 100), "lenet:mnist": (1000, 3)}
COMMAND = "harmless reproduce lemma1 --out results"


@dataclass
class ModelResult:
    """Per layer, the piece's dimension on every image; and the output piece's samples."""

    spec: str
    layers: list[str]
    kinds: list[str]
    dims: np.ndarray  # (images, layers)
    h0_dim: int
    n: int
    checksum: str | None
    accuracy: float | None
    extents: list[float] = field(default_factory=list)  # ||t_max d|| / ||x||, output piece
    outside_h0: list[float] = field(default_factory=list)  # ||delta - P0 delta|| / ||delta|| of samples
    output_change: list[float] = field(default_factory=list)  # relative change of the float64 logits
    seconds: float = 0.0


def measure(spec: str, images: int, *, samples: int = 4, seed: int = 0) -> ModelResult:
    """The piece at every layer for the first ``images`` test images of the spec's data set."""
    from harmless.data import as_tensors, load_dataset
    from harmless.models import DATASETS, get_model, parse_spec

    start = time.perf_counter()
    ms = parse_spec(spec)
    tm = get_model(spec)
    model = tm.model.double().eval()
    shape = tuple(DATASETS[ms.dataset].in_shape)
    x, _ = as_tensors(load_dataset(ms.dataset, "test"), torch.float64)
    x = x[:images]
    net = ReluNetwork(model, shape)
    h0 = harmless.harmless_subspace(model, shape)
    gen = torch.Generator().manual_seed(seed)
    dims = np.zeros((len(x), len(net.steps)), dtype=np.int64)
    result = ModelResult(spec, net.layer_names, [s.kind for s in net.steps], dims, h0.dim, net.n,
                         _checksum(tm), tm.test_accuracy)
    for i, sample in enumerate(tqdm(x, desc=f"lemma1 {spec}", disable=None)):
        pieces = net.all_pieces(sample)  # dims asked in layer order: each piece reuses the one below
        dims[i] = [p.dim for p in pieces]
        out = pieces[-1]
        delta = out.sample(samples, generator=gen)
        cert = out.certify(delta)
        result.output_change.extend(cert.output_change.tolist())
        harmful = delta - h0.project(delta)
        result.outside_h0.extend((harmful.reshape(samples, -1).norm(dim=1)
                                  / delta.reshape(samples, -1).norm(dim=1)).tolist())
        # Along the first sample's direction: a random hull direction tilted into the piece (where 0
        # is on its boundary, e.g. LeNet's max-pool ties among zeros, an untilted one leaves at once).
        direction = delta[0].reshape(-1).double()
        if not bool(direction.any()):  # a dimension-0 piece: nothing to measure
            direction = torch.randn(direction.numel(), generator=gen, dtype=torch.float64)
        direction = direction / direction.norm()
        t = out.extent(direction.reshape(shape))
        result.extents.append(t / float(sample.norm()))
    result.seconds = time.perf_counter() - start
    return result


def measure_extremes(spec: str, image: int = 0, relus: tuple[str, ...] = ("relu1", "relu3"),
                     *, samples: int = 4) -> list[dict[str, object]]:
    """Theorem 2's extremes on a trained zoo model at one test image, made by
    :func:`harmless.nonlinear.extreme_bias_shift` (margin 1): per ReLU and extreme, the piece's
    dimension at the layer before the ReLU, at the ReLU and at the output, the largest bias shift,
    and the largest relative change of the float64 output over ``samples`` members of the ReLU's
    piece. Run: ``python -c "from harmless.experiments.lemma1 import measure_extremes as m;
    print(m('mlp5:mnist'))"``."""
    from harmless.data import as_tensors, load_dataset
    from harmless.models import DATASETS, get_model, parse_spec
    from harmless.nonlinear import EXTREMES, extreme_bias_shift

    ms = parse_spec(spec)
    model = get_model(spec).model.double().eval()
    shape = tuple(DATASETS[ms.dataset].in_shape)
    x, _ = as_tensors(load_dataset(ms.dataset, "test"), torch.float64)
    sample = x[image]
    names = ReluNetwork(model, shape).layer_names
    rows: list[dict[str, object]] = []
    for relu in relus:
        k = names.index(relu)
        for extreme in EXTREMES:
            shifted = extreme_bias_shift(model, sample, relu, extreme)
            net = ReluNetwork(shifted.model, shape)
            before, at, out = net.piece(sample, k - 1), net.piece(sample, k), net.piece(sample)
            change = at.certify(at.sample(samples, generator=torch.Generator().manual_seed(0))).output_change
            rows.append({"relu": relu, "extreme": extreme, "max_bias_shift": float(shifted.shift.abs().max()),
                         "dim_before": before.dim, "dim_at": at.dim, "dim_output": out.dim,
                         "max_output_change": float(change.max())})
    return rows


def _checksum(tm: object) -> str | None:
    """The checkpoint's SHA-256 from its sidecar, else of its file (a model trained just now)."""
    from harmless.cache import sha256_file

    meta = getattr(tm, "meta", None) or {}
    if meta.get("weights_sha256"):
        return str(meta["weights_sha256"])
    path = getattr(tm, "checkpoint", None)
    return sha256_file(path) if path is not None and Path(path).exists() else None


def _table(r: ModelResult) -> str:
    lines = ["| l (paper) | layer | kind | mean dim | min | max |", "|---|---|---|---:|---:|---:|"]
    first = r.kinds.index("affine") if "affine" in r.kinds else 0
    for j, (name, kind) in enumerate(zip(r.layers, r.kinds)):
        col = r.dims[:, j]
        # The paper's P^(l): the output of its (l+1)-th layer unchanged; the linear prefix up to
        # fc1 is its first layer, so fc1 is l = 0 and every later module adds one.
        fc1 = _first_layer(r) if any(n in r.layers for n in ("conv1", "fc1")) else first
        paper = str(j - fc1) if j >= fc1 else "-"
        lines.append(f"| {paper} | {name} | {kind} | {col.mean():.1f} | {col.min()} | {col.max()} |")
    return "\n".join(lines) + "\n"


def _figure(results: list[ModelResult], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from harmless.plotting import save_figure

    # One panel per architecture (same layer names): each model's dims against its own layers
    # (one shared axis would label MLP-5's layers with LeNet's names).
    groups: dict[tuple[str, ...], list[ModelResult]] = {}
    for r in results:
        groups.setdefault(tuple(r.layers[_first_layer(r):]), []).append(r)
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups) + 1, 4), squeeze=False, sharey=True)
    for ax, (names, group) in zip(axes[0], groups.items()):
        xs = np.arange(len(names))
        for r in group:
            col = r.dims[:, _first_layer(r):]
            line, = ax.plot(xs, col.mean(axis=0), marker="o", label=f"{r.spec} (mean over {len(r.dims)} images)")
            ax.fill_between(xs, col.min(axis=0), col.max(axis=0), color=line.get_color(), alpha=0.2)
        ax.set_xticks(xs, names, rotation=45)
        ax.axhline(group[0].n, color="gray", lw=0.8, ls=":")
        ax.set_xlabel("layer L (its output unchanged); the first conv/fc layer = the paper's l = 0", fontsize=8)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("dim of the exact convex piece of P")
    fig.suptitle("Lemma 1: harmless input sets grow with depth (band: min-max over images)")
    return save_figure(fig, path)


def _first_layer(r: ModelResult) -> int:
    """The paper's l = 0: the first conv or Linear layer (the linear prefix ends there)."""
    return min(r.layers.index(n) for n in ("conv1", "fc1") if n in r.layers)


def _extremes_section(rows: list[dict[str, object]]) -> str:
    lines = ["\n## Theorem 2's extremes on the trained MLP-5 (MNIST, test image 0)\n",
             "Made by `harmless.nonlinear.extreme_bias_shift(model, x, relu, extreme)` (margin 1): a float64 copy whose "
             "bias before the chosen ReLU is shifted so that every pre-activation at x is >= 1 (all positive) or <= -1 "
             "(all non-positive); the layers before it are untouched. Theorem 2 predicts: all positive, the set does "
             "not grow at that ReLU (dim at the ReLU = dim before it); all non-positive, everything that keeps the "
             "earlier pattern is harmless there.\n\n",
             "| ReLU | extreme | largest bias shift | dim before the ReLU | dim at the ReLU | dim at the output | "
             "largest output change of members |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['relu']} | {r['extreme']} | {float(r['max_bias_shift']):.2f} | {r['dim_before']} | "  # type: ignore[arg-type]
                     f"{r['dim_at']} | {r['dim_output']} | {float(r['max_output_change']):.1e} |")  # type: ignore[arg-type]
    return "".join(lines[:2]) + "\n".join(lines[2:]) + "\n"


def _fmt(values: list[float]) -> str:
    a = np.asarray(values)
    return f"median {np.median(a):.3g}, min {a.min():.3g}, max {a.max():.3g}"


def run(out_dir: str | os.PathLike[str], quick: bool = False) -> list[Path]:
    """Measure both models and write ``lemma1.md`` and ``lemma1.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with one_blas_thread(), one_torch_thread():
        results = [measure(spec, IMAGES[spec][1 if quick else 0]) for spec in SPECS]
        extremes = measure_extremes("mlp5:mnist")
    png = _figure(results, out / "lemma1.png")
    text = ["# Lemma 1: harmless input sets beyond the linear prefix (MLP-5, LeNet)\n",
            "For each test image x and each layer L of MLP-5 and LeNet (max pooling: the piece keeps each window's argmax), the **exact convex piece** of the harmless input "
            "set that contains δ = 0: the input perturbations that keep every ReLU's sign pattern before L and "
            "leave L's output unchanged (`harmless.nonlinear.ReluNetwork(model, shape).all_pieces(x)`). Its "
            "dimension is that of its affine hull, n − rank of the equality constraints (SciPy SVD, threshold "
            "max(shape)·eps·σ_max; a full rank certified by a Cholesky factorisation instead where σ_min ≥ ~1e-3 σ_max; "
            "tight inequalities that cannot be made strict, from max-pool ties, counted as equalities, found by a "
            "HiGHS LP). Exact: the piece. Not computed: the other pieces of the union over activation "
            "regions (flipping a unit may also leave the output unchanged), so these dimensions are those of one "
            "piece, not of the whole set P.\n"]
    for r in results:
        text.append(f"\n## {r.spec}\n")
        acc = f"{100 * r.accuracy:.2f}%" if r.accuracy is not None else "unknown"
        text.append(f"Images: the first {len(r.dims)} test images (indices 0–{len(r.dims) - 1}). Checkpoint "
                    f"weights SHA-256: `{r.checksum}`; test accuracy {acc}. n = {r.n}; "
                    f"H^(0) (the linear prefix's nullspace, `harmless.harmless_subspace`): dim {r.h0_dim}. "
                    f"Measured in {r.seconds:.0f} s ({r.seconds / max(1, len(r.dims)):.2f} s per image: every "
                    "layer's piece, its samples, their float64 check and the extent LP).\n\n")
        text.append(_table(r))
        text.append(f"\nAt the output (the last row), per image: {samples_line(r)}\n")
    text.append(_extremes_section(extremes))
    text.append(f"\nFigure: `{png.name}` (mean dimension per layer, band min–max over images).\n")
    text.append(f"\nMachine: {platform.machine()}, {os.cpu_count()} CPUs (no GPU; shared with other jobs, so the "
                f"times are upper bounds), {platform.system()} "
                f"{platform.release()}; torch {torch.__version__}, Python {platform.python_version()}. "
                f"Total {time.perf_counter() - start:.0f} s.\n\nCommand: `{COMMAND}`"
                f"{' (quick=True)' if quick else ''}\n")
    md = out / "lemma1.md"
    from harmless.cache import atomic_write_text

    atomic_write_text(md, "".join(text))
    return [md, png]


def samples_line(r: ModelResult) -> str:
    k = len(r.output_change) // max(1, len(r.dims))
    return (f"{k} sampled δ (random directions in the piece's affine hull, a uniform fraction of the way to its "
            f"boundary): largest relative change of the float64 logits {max(r.output_change):.2e}; their part "
            f"outside H^(0), ‖δ − P₀δ‖/‖δ‖: {_fmt(r.outside_h0)}. Extent (largest step inside the piece along one "
            f"random direction into the piece: the first sampled δ's, HiGHS LP), as a multiple of ‖x‖: {_fmt([e for e in r.extents if math.isfinite(e)])}"
            f" ({sum(not math.isfinite(e) for e in r.extents)} unbounded); H^(0) itself is unbounded.")
