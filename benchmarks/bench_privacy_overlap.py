"""Benchmark: the matrix-free privacy projection (harmless.privacy.matrix_free) against the dense
interior-point solver (harmless.privacy.solver) on a size where both run, in one run.

Run on demand (not part of the tests; timings are never asserted):

    .venv/bin/python benchmarks/bench_privacy_overlap.py [--px 36] [--images 3] [--max-iter 400] [--threads 1]

Model: Table 2's untrained 1000-class ImageNet ResNet-50 with the overlapping 7x7/s6/p3 -> 64
stem (seed 0, float64), on the first ``images`` foolbox ImageNet images area-downsampled to
``px`` x ``px``; the flat-grey decoy (target 0.5 everywhere). Both solvers get the same anchors and
targets; the dense one's set-up (its dense SVD) and the matrix-free one's (block-Jacobi probing)
are timed apart from the solves, and the two solves are interleaved image by image so that a
change in the machine's load hits both. Reported per solver: set-up, solve time per image,
certified distance bound, converged share; and the distance between the two answers (which
must be below the sum of their bounds), with the ratio of solve times.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import harmless  # noqa: E402  (after the src/ path)
from harmless.data import as_tensors, load_dataset  # noqa: E402
from harmless.experiments.table2 import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from harmless.models import zoo  # noqa: E402
from harmless.privacy import PrivacyProblem, solver  # noqa: E402
from harmless.privacy.matrix_free import MatrixFreeProblem, project  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--px", type=int, default=36)
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--max-iter", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = zoo.resnet50(stem_kernel=7, stem_stride=6, num_classes=1000, mean=IMAGENET_MEAN,
                         std=IMAGENET_STD).double().eval()
    px = args.px
    space = harmless.harmless_subspace(model, (3, px, px))
    x, _ = as_tensors(load_dataset("foolbox-imagenet"), torch.float64)
    x = torch.nn.functional.interpolate(x[:args.images], size=(px, px), mode="area").clamp(0, 1)
    a = x.reshape(args.images, -1)
    t = torch.full_like(a, 0.5)
    t0 = time.perf_counter()
    dense = PrivacyProblem(space)
    dense_setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    mf = MatrixFreeProblem(space)
    mf_setup = time.perf_counter() - t0
    times = {"dense": 0.0, "matrix-free": 0.0}
    ys: dict[str, list[torch.Tensor]] = {"dense": [], "matrix-free": []}
    bounds: dict[str, list[float]] = {"dense": [], "matrix-free": []}
    conv: dict[str, list[bool]] = {"dense": [], "matrix-free": []}
    passes = 0
    for i in range(args.images):
        ai, ti = a[i:i + 1], t[i:i + 1]
        t0 = time.perf_counter()
        yd, infod = solver.project(dense, ai, ti, bounds=(0.0, 1.0), tol=1e-12, max_iter=100)
        times["dense"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        ym, infom = project(mf, ai, ti, bounds=(0.0, 1.0), tol=1e-12, max_iter=args.max_iter)
        times["matrix-free"] += time.perf_counter() - t0
        passes += infom.operator_passes or 0
        for key, y, info in (("dense", yd, infod), ("matrix-free", ym, infom)):
            ys[key].append(y)
            bounds[key].append(float(info.distance_bound[0]))
            conv[key].append(bool(info.converged[0]))
    dist = (torch.cat(ys["dense"]) - torch.cat(ys["matrix-free"])).norm(dim=1)
    print(f"# bench_privacy_overlap: 7x7/s6/p3 -> 64 stem at 3x{px}x{px} (n = {space.ambient_dim}, "
          f"dim N(A) = {dense.dim}), {args.images} foolbox ImageNet images, grey decoy, {args.threads} thread(s)")
    print("| solver | set-up (s) | solve / image (s) | max distance bound | converged |")
    print("|---|---|---|---|---|")
    print(f"| dense interior point | {dense_setup:.1f} | {times['dense'] / args.images:.2f} | "
          f"{max(bounds['dense']):.1e} | {sum(conv['dense'])}/{args.images} |")
    print(f"| matrix-free dual L-BFGS ({args.max_iter} it.) | {mf_setup:.1f} | "
          f"{times['matrix-free'] / args.images:.2f} | {max(bounds['matrix-free']):.1e} | "
          f"{sum(conv['matrix-free'])}/{args.images} |")
    print(f"solve-time ratio matrix-free / dense: {times['matrix-free'] / times['dense']:.2f}; operator passes "
          f"per image (matrix-free): {passes / args.images:.0f}; max distance between the answers "
          f"{float(dist.max()):.1e} (must be <= the sum of the bounds: "
          f"{bool((dist <= torch.tensor(bounds['dense']) + torch.tensor(bounds['matrix-free']) + 1e-9).all())})")


if __name__ == "__main__":
    main()
