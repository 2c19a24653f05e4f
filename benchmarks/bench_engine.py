"""Benchmark: harmless's project()/basis() against scipy.linalg.null_space on the same layers.

Run on demand (not part of the tests):

    .venv/bin/python benchmarks/bench_engine.py [--quick]

Writes results/benchmark_engine.md and results/benchmark_engine.png. For each layer it times
(one run each, wall clock, this machine):
  * scipy: build the dense matrix by applying the layer to every basis vector, then
    scipy.linalg.null_space, then project a batch with the dense projector N N^T;
  * harmless dense: harmless_subspace(...) + basis() (SVD of the operator's matrix), and
    project() of a batch with the row-space basis;
  * harmless matrix-free: project() of the same batch by CGLS (dense_limit=1), never
    forming a matrix, with the harmful residual it reached.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import harmless  # noqa: E402  (after the src/ path, so the checkout's harmless is measured)
from harmless.cache import atomic_write_text  # noqa: E402
from harmless.plotting import save_figure  # noqa: E402


def layers(quick: bool) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    out = [
        ("Linear 784->256 (MLP-5 fc1)", nn.Linear(784, 256), (784,)),
        ("Conv 3->16 k3 s2 p1, 3x32x32", nn.Conv2d(3, 16, 3, stride=2, padding=1), (3, 32, 32)),
        ("Conv 3->64 k7 s4 p3, 3x32x32", nn.Conv2d(3, 64, 7, stride=4, padding=3), (3, 32, 32)),
        ("Conv 3->16 k5 s3 p2, 3x48x48", nn.Conv2d(3, 16, 5, stride=3, padding=2), (3, 48, 48)),
    ]
    if not quick:
        out.append(("Conv 3->32 k4 s4, 3x64x64", nn.Conv2d(3, 32, 4, stride=4), (3, 64, 64)))
    return [(name, layer.double().eval(), shape) for name, layer, shape in out]


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def dense_matrix(layer: nn.Module, shape: tuple[int, ...]) -> np.ndarray:
    n = int(np.prod(shape))
    with torch.no_grad():
        zero = layer(torch.zeros(1, *shape, dtype=torch.float64))
        cols = layer(torch.eye(n, dtype=torch.float64).view(n, *shape)) - zero
    return cols.reshape(n, -1).T.numpy()


def _residual_vs_delta(space: harmless.HarmlessSubspace, proj: torch.Tensor, delta: torch.Tensor) -> float:
    """max ||A P delta|| / (||A|| ||delta||): relative to delta, so that a (near) zero harmless
    part of an injective layer does not turn round-off into a large ratio."""
    a_proj = space.operator.matvec(proj).reshape(proj.shape[0], -1).norm(dim=1)
    return float((a_proj / (space.operator_norm * delta.reshape(delta.shape[0], -1).norm(dim=1))).max())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    repeats = 1  # each timing is seconds long; the layers, not the repeats, are the point
    rows = []
    for name, layer, shape in layers(args.quick):
        delta = torch.randn(args.batch, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

        def scipy_path():
            a = dense_matrix(layer, shape)
            null = scipy.linalg.null_space(a)
            flat = delta.reshape(args.batch, -1).numpy()
            return null.shape[1], (flat @ null) @ null.T

        t_scipy, (dim_scipy, proj_scipy) = timed(scipy_path, repeats)

        def dense_path():
            space = harmless.harmless_subspace(layer, shape)
            return space.basis(), space.project(delta)

        t_dense, (basis, proj_dense) = timed(dense_path, repeats)

        def free_path():
            space = harmless.harmless_subspace(layer, shape, dense_limit=1, method="structure")
            p = space.project(delta)
            return p, space

        t_free, (proj_free, space_free) = timed(free_path, repeats)
        err_dense = float(np.abs(proj_dense.reshape(args.batch, -1).numpy() - proj_scipy).max())
        err_free = float(np.abs(proj_free.reshape(args.batch, -1).numpy() - proj_scipy).max())
        rows.append(dict(layer=name, n=int(np.prod(shape)), dim=basis.shape[0], dim_scipy=dim_scipy,
                         t_scipy=t_scipy, t_dense=t_dense, t_free=t_free, err_dense=err_dense, err_free=err_free,
                         resid=_residual_vs_delta(space_free, proj_free, delta),
                         iters=space_free.last_solve.iterations if space_free.last_solve else 0))
        print(rows[-1], flush=True)

    header = ("| layer | n | dim (harmless) | dim (scipy) | scipy null_space + project (s) | harmless dense basis + "
              f"project (s) | harmless matrix-free project, batch {args.batch} (s) | CGLS iterations | "
              "max |P_harmless - P_scipy| dense / matrix-free | harmful residual (matrix-free) |\n"
              "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|\n")
    body = "".join(f"| {r['layer']} | {r['n']} | {r['dim']} | {r['dim_scipy']} | {r['t_scipy']:.3f} | "
                   f"{r['t_dense']:.3f} | {r['t_free']:.3f} | {r['iters']} | {r['err_dense']:.1e} / "
                   f"{r['err_free']:.1e} | {r['resid']:.1e} |\n" for r in rows)
    cmd = "python benchmarks/bench_engine.py" + (" --quick" if args.quick else "")
    text = ("# Engine benchmark: harmless vs scipy.linalg.null_space\n\n"
            f"One run each, float64, CPU ({platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads), torch {torch.__version__}.\n\n" + header + body +
            f"\nMade by `{cmd}`.\n")
    out = ROOT / "results"
    atomic_write_text(out / "benchmark_engine.md", text)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    x = np.arange(len(rows))
    w = 0.27
    ax.bar(x - w, [r["t_scipy"] for r in rows], w, label="scipy null_space (dense)")
    ax.bar(x, [r["t_dense"] for r in rows], w, label="harmless basis() + project (dense SVD)")
    ax.bar(x + w, [r["t_free"] for r in rows], w, label="harmless project (matrix-free CGLS)")
    ax.set_xticks(x, [r["layer"] for r in rows], rotation=15, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("seconds (log)")
    ax.legend(fontsize=8)
    ax.set_title("Harmless subspace: time per layer")
    save_figure(fig, out / "benchmark_engine.png")
    print(text)


if __name__ == "__main__":
    main()
