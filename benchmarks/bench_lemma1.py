"""Benchmark: LeNet's per-image pieces (every layer), the fast path against the plain algorithm, in one run.

Run on demand (not part of the tests; timings are never asserted):

    .venv/bin/python benchmarks/bench_lemma1.py [--images 3] [--spec lenet:mnist] [--out FILE]

Per test image, the dimension of the exact convex piece at every layer two ways, alternating:

* ``fast``: ``ReluNetwork.all_pieces(x)`` with the dims asked in layer order (what
  ``harmless reproduce lemma1`` does): implicit equalities proven strict by the nested piece's
  inward direction or a least-squares direction, HiGHS only on the rows left; full rank by a
  Cholesky certificate; injective affine layers reuse the piece below; G never stacked;
* ``plain``: the algorithm as it was (and as the tests' oracle does it), written out here from the
  pieces' public matrices ``E``, ``G``, ``h``: one SVD of ``E`` per piece for its null space, one
  HiGHS LP over all tight rows for the implicit equalities, and the rank of those rows inside the
  null space by SVD.

Both must give the same dimensions (checked; a mismatch exits 1). The report gives the median
seconds per image of each and the ratio plain / fast, measured here and now on this machine.
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
import scipy.optimize
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from harmless.cache import atomic_write_text  # noqa: E402
from harmless.data import as_tensors, load_dataset  # noqa: E402
from harmless.models import DATASETS, get_model, parse_spec  # noqa: E402
from harmless.nonlinear import ReluNetwork  # noqa: E402
from harmless.threads import one_blas_thread, one_torch_thread  # noqa: E402


def plain_dim(e: np.ndarray, g: np.ndarray, h: np.ndarray) -> int:
    """n - rank([E; G_I]) the plain way: SVD null space of E, one LP over all tight rows."""
    n = e.shape[1]
    null = scipy.linalg.null_space(e) if e.shape[0] else np.eye(n)
    rank_e = n - null.shape[1]
    tight = np.flatnonzero(h <= 0)
    if tight.size == 0 or null.shape[1] == 0:
        return n - rank_e
    gy = g[tight] / np.linalg.norm(g[tight], axis=1, keepdims=True) @ null
    gy = gy[np.linalg.norm(gy, axis=1) > 1e-12 * null.shape[1] ** 0.5]
    if gy.shape[0] == 0:
        return n - rank_e
    t, k = gy.shape
    res = scipy.optimize.linprog(np.concatenate([np.zeros(k), -np.ones(t)]), A_ub=np.hstack([gy, np.eye(t)]),
                                 b_ub=np.zeros(t), bounds=[(None, None)] * k + [(0, 1)] * t, method="highs")
    implicit = gy[res.x[k:] < 0.5]
    inner = np.linalg.matrix_rank(implicit) if implicit.shape[0] else 0
    return n - rank_e - inner


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--spec", default="lenet:mnist")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    ms = parse_spec(args.spec)
    model = get_model(args.spec).model.double().eval()
    shape = tuple(DATASETS[ms.dataset].in_shape)
    x, _ = as_tensors(load_dataset(ms.dataset, "test"), torch.float64)
    fast_s, plain_s, ok = [], [], True
    with one_blas_thread(), one_torch_thread():
        net = ReluNetwork(model, shape)
        net.all_pieces(x[0])[-1].dim  # the per-network set-up (injectivity checks, prefix Jacobian) outside the timing
        for i in range(args.images):
            t = time.perf_counter()
            fast = [p.dim for p in net.all_pieces(x[i])]
            fast_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            plain = [plain_dim(p.E, p.G, p.h) for p in ReluNetwork(model, shape).all_pieces(x[i])]
            plain_s.append(time.perf_counter() - t)
            ok &= fast == plain
            same = "equal" if fast == plain else "DIFFER"
            print(f"image {i}: fast {fast_s[-1]:.2f} s, plain {plain_s[-1]:.2f} s, dims {same} {fast}", file=sys.stderr)
    f, p = statistics.median(fast_s), statistics.median(plain_s)
    report = (f"# bench_lemma1: {args.spec}, {args.images} test images, every layer's piece\n\n"
              f"| path | median s / image |\n|---|---:|\n| fast (all_pieces, dims in layer order) | {f:.2f} |\n"
              f"| plain (SVD null space + one LP over all tight rows, per piece) | {p:.2f} |\n\n"
              f"Ratio plain / fast: {p / f:.1f}x. Dimensions {'identical' if ok else 'DIFFERENT'} on every image "
              "and layer.\n"
              f"Machine: {platform.machine()}, torch {torch.__version__}, one thread, interleaved in one process.\n")
    print(report)
    if args.out is not None:
        atomic_write_text(args.out, report)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
