"""Figure 2: harmless dimension against the first layer's output dimension.

(a) Conv stems of ResNet-18 (3x3), ResNet-50 (7x7, the ImageNet-style stem) and VGG-16
(3x3) on 3x32x32 inputs, stem stride 1..16. (b) The first fully-connected layer of MLP-5
on MNIST-size (784) and SVHN-size (3072) inputs, its width varied.

Beside each measured dimension: ``n - m`` (what Corollaries 1-2 predict when they apply)
and a dense-rank oracle (NumPy ``matrix_rank`` of the matrix built by applying the torch
layer itself to every basis vector) where that matrix is small enough.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from harmless.experiments.common import Table, provenance, save_figure, save_text
from harmless.linalg.operators import ComposedOperator, ConvOperator
from harmless.linalg.rank import corollary1_conditions
from harmless.linalg.subspace import harmless_subspace

ORACLE_LIMIT = 20_000_000  # matrix entries


def brute_force_rank(layer: nn.Module, in_shape: tuple[int, ...]) -> int:
    """Rank of ``layer``'s linear part from its dense matrix, built by applying the module
    (bias removed) to every standard basis vector: independent of the engine's operators."""
    layer = layer.double().eval()
    n = int(np.prod(in_shape))
    with torch.no_grad():
        zero = layer(torch.zeros(1, *in_shape, dtype=torch.float64))
        cols = []
        for start in range(0, n, 512):
            stop = min(start + 512, n)
            eye = torch.zeros(stop - start, n, dtype=torch.float64)
            eye[torch.arange(stop - start), torch.arange(start, stop)] = 1
            cols.append((layer(eye.view(-1, *in_shape)) - zero).reshape(stop - start, -1))
    return int(np.linalg.matrix_rank(torch.cat(cols).T.numpy()))


def _stem(arch: str, stride: int) -> nn.Module:
    from harmless.models import build_model

    spec = {"resnet18": f"resnet18:stem_stride={stride}",
            "resnet50": f"resnet50:stem_stride={stride},stem_kernel=7",
            "vgg16": f"vgg16:stem_stride={stride}"}[arch]
    return build_model(spec, seed=0)


def run(out_dir: Path, *, quick: bool = False, data_dir: str | None = None) -> list[Path]:
    import matplotlib

    from harmless.models import first_layer
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strides = [1, 2, 4, 8, 16] if quick else list(range(1, 17))
    conv_rows: list[dict[str, Any]] = []
    jobs = [(a, s) for a in ("resnet18", "resnet50", "vgg16") for s in strides]
    for arch, stride in tqdm(jobs, desc="fig2 conv stems", file=None, disable=None):
        model = _stem(arch, stride)
        t = time.perf_counter()
        space = harmless_subspace(model, (3, 32, 32))
        dim = space.dim
        seconds = time.perf_counter() - t
        stem = first_layer(model)
        n, m = space.ambient_dim, space.output_dim
        oracle = brute_force_rank(stem, (3, 32, 32)) if m * n <= ORACLE_LIMIT and not quick else None
        tqdm.write(f"  {arch} stride {stride}: dim {dim} ({space.dim_method}, {seconds:.1f} s)", file=sys.stderr)
        factors = space.operator.factors if isinstance(space.operator, ComposedOperator) else [space.operator]
        conv_op = next(f for f in factors if isinstance(f, ConvOperator))
        failed = [c for c in corollary1_conditions(conv_op) if not c.startswith("n = ")]
        conv_rows.append(dict(arch=arch, stride=stride, kernel=stem.kernel_size[0], n=n, m=m,  # type: ignore[index]
                              dim=dim,
                              n_minus_m=max(0, n - m), oracle=None if oracle is None else n - oracle,
                              method=space.dim_method, seconds=seconds, failed="; ".join(failed) or "-"))

    widths = [64, 128, 256, 512, 784, 1024, 2048, 3072, 4096]
    fc_rows: list[dict[str, Any]] = []
    from harmless.models.zoo import MLP5

    for label, in_shape in (("MNIST-size 1x28x28", (1, 28, 28)), ("SVHN-size 3x32x32", (3, 32, 32))):
        for w in tqdm(widths, desc=f"fig2 MLP-5 {label}", disable=None):
            torch.manual_seed(0)
            c = in_shape[0]
            model = MLP5(in_shape=in_shape, hidden=(w, 256, 256, 256), num_classes=10,
                         mean=(0.5,) * c, std=(0.25,) * c).eval()
            space = harmless_subspace(model, in_shape)
            n, m = space.ambient_dim, space.output_dim
            # fc1 reads the flattened image; Normalize before it is a bijection (same dimension).
            oracle = n - brute_force_rank(first_layer(model), (n,)) if not quick else None
            fc_rows.append(dict(input=label, n=n, m=m, dim=space.dim, n_minus_m=max(0, n - m), oracle=oracle,
                                method=space.dim_method))

    # -- table -------------------------------------------------------------------------
    cmd = "harmless reproduce fig2" + (" --quick" if quick else "")
    t1 = Table(["stem", "kernel", "stride", "n", "m (output dim)", "harmless dim", "n - m", "dense oracle",
                "method", "Corollary 1 conditions that fail"],
               [[r["arch"], str(r["kernel"]), str(r["stride"]), str(r["n"]), str(r["m"]), str(r["dim"]),
                 str(r["n_minus_m"]), "-" if r["oracle"] is None else str(r["oracle"]), r["method"], r["failed"]]
                for r in conv_rows])
    t2 = Table(["input", "n", "m (first FC width)", "harmless dim", "n - m", "dense oracle", "method"],
               [[r["input"], str(r["n"]), str(r["m"]), str(r["dim"]), str(r["n_minus_m"]),
                 "-" if r["oracle"] is None else str(r["oracle"]), r["method"]] for r in fc_rows])
    mismatches = [r for r in conv_rows + fc_rows if r["oracle"] is not None and r["oracle"] != r["dim"]]
    deviates = [r for r in conv_rows if r["dim"] != r["n_minus_m"]]
    n_oracle = sum(r["oracle"] is not None for r in conv_rows + fc_rows)
    text = ("# Figure 2: dimension of the harmless subspace\n\n"
            "Weights: seeded random initialisation (untrained): the dimension depends on the layer's shape and "
            "rank, not on training.\n\n## (a) Convolutional stems on 3x32x32 inputs\n\n" + t1.markdown() +
            "\n## (b) First fully-connected layer of MLP-5\n\n" + t2.markdown() +
            (f"\nMeasured vs dense oracle: {len(mismatches)} mismatches in {n_oracle} comparisons "
               f"(oracle computed where the matrix has <= {ORACLE_LIMIT:,} entries).\n\n" if n_oracle else
               "\nDense oracle not computed (--quick).\n\n") +
            f"Conv stems where the measured dimension differs from max(0, n - m): {len(deviates)} of "
            f"{len(conv_rows)}; in every one of them a condition of Corollary 1 fails (last column): "
            f"{sum(r['failed'] != '-' for r in deviates)} of {len(deviates)}. Three causes: a kernel smaller "
            "than the stride leaves pixels unread; 64 kernels cannot be independent in R^27 (3x3 stems); and, "
            "not in the paper, zero padding: a border window reads fewer real pixels than there are kernels, "
            "so its rows are dependent whatever the weights (ResNet-50's 7x7 stem at stride 5 has m > n and "
            "still a 48-dimensional harmless subspace; at stride 6, 792 instead of n - m = 768).\n"
            + provenance(cmd))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for arch, marker, style in (("resnet18", "o", "-"), ("resnet50", "s", "-"), ("vgg16", "^", ":")):
        rs = [r for r in conv_rows if r["arch"] == arch]
        axes[0].plot([r["m"] for r in rs], [r["dim"] for r in rs], marker=marker, ls=style, ms=4,
                     label=f"{arch} stem, {rs[0]['kernel']}x{rs[0]['kernel']} (measured)")
    ms = sorted({r["m"] for r in conv_rows})
    axes[0].plot(ms, [max(0, 3072 - m) for m in ms], "k--", lw=1, label="max(0, n - m)")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("output dimension m of the stem")
    axes[0].set_ylabel("harmless dimension")
    axes[0].set_title("(a) conv stems, 3x32x32 input, strides 1-16")
    axes[0].legend(fontsize=8)
    for label, marker in (("MNIST-size 1x28x28", "o"), ("SVHN-size 3x32x32", "s")):
        rs = [r for r in fc_rows if r["input"] == label]
        axes[1].plot([r["m"] for r in rs], [r["dim"] for r in rs], marker=marker, label=f"{label} (measured)")
        axes[1].plot([r["m"] for r in rs], [r["n_minus_m"] for r in rs], "k--", lw=1)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("output dimension m of the first FC layer")
    axes[1].set_title("(b) MLP-5 first layer (dashed: max(0, n - m))")
    axes[1].legend(fontsize=8)
    fig.suptitle("Harmless subspace dimension vs output dimension (untrained weights)")
    out_dir.mkdir(parents=True, exist_ok=True)
    return [save_text(text, out_dir / "fig2.md"), save_figure(fig, out_dir / "fig2.png")]
