"""Benchmark: ``harmless privatize`` on one process against Ray Data with 1 and 2 workers, in one run.

Run on demand (not part of the tests; timings are never asserted; needs ``pip install 'harmless[ray]'``):

    .venv/bin/python benchmarks/bench_ray.py [--n 1000] [--out results/ray.md] [--work DIR]

The first ``n`` MNIST test images are written as PNG files, then privatised with the zoo's
MLP-5 (``mlp5:mnist``) and the grey decoy three times, each into its own folder: by
:func:`~harmless.privacy.job.privatize_files` in this process, then by
:func:`~harmless.privacy.distributed.privatize_files_ray` with 1 and with 2 workers on one
local Ray instance with 2 CPUs (started once; its start-up is timed apart). Every output file
of the Ray runs is compared, byte for byte, with the single-process run's (the JSON report
with its folder's name replaced: it names its own files). Throughput is images per second of
wall time, from the call to the report, so it includes each Ray run's actor start-up and each
worker's dense data.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from harmless.cache import atomic_write_text  # noqa: E402  (after the src/ path: the checkout is measured)
from harmless.cli.common import resolve_model  # noqa: E402
from harmless.data import load_dataset  # noqa: E402
from harmless.linalg.subspace import harmless_subspace  # noqa: E402
from harmless.models import get_model  # noqa: E402
from harmless.privacy.distributed import import_ray, privatize_files_ray  # noqa: E402
from harmless.privacy.job import privatize_files  # noqa: E402


def contents(out: Path) -> dict[str, bytes]:
    """Every file a run wrote; the report's own folder name replaced (it names its files)."""
    files = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    files["report.json"] = files["report.json"].replace(str(out).encode(), b"<out>")
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="MNIST test images (default 1000)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "results" / "ray.md"))
    ap.add_argument("--work", help="folder for the images and outputs (default: a temporary one, removed)")
    args = ap.parse_args()
    ray = import_ray()

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_ray_"))
    try:
        trained = get_model("mlp5:mnist", train=False)
        model, shape = resolve_model("mlp5:mnist", weights=None, input_shape=None, data_dir=None,
                                     allow_training=False)  # as `harmless privatize` loads it
        space = harmless_subspace(model, shape)
        images = load_dataset("mnist", "test").images[:args.n].numpy()
        inputs = work / "in"
        inputs.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            Image.fromarray(img[0]).save(inputs / f"test{i:05d}.png")
        load = [os.getloadavg()[0]]
        rows: list[tuple[str, float, bool | None]] = []

        t = time.perf_counter()
        privatize_files(space, [inputs], work / "single", batch_size=args.batch_size, progress=False)
        rows.append(("one process (1 torch thread)", time.perf_counter() - t, None))
        reference = contents(work / "single")
        print(f"single: {rows[-1][1]:.1f} s", flush=True)

        t = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT / "src")}})
        startup = time.perf_counter() - t
        try:
            for workers in (1, 2):
                out = work / f"ray{workers}"
                t = time.perf_counter()
                privatize_files_ray(space, [inputs], out, batch_size=args.batch_size, workers=workers,
                                    progress=False)
                rows.append((f"Ray Data, {workers} worker{'s' if workers > 1 else ''}", time.perf_counter() - t,
                             contents(out) == reference))
                load.append(os.getloadavg()[0])
                print(f"ray {workers}: {rows[-1][1]:.1f} s, identical: {rows[-1][2]}", flush=True)
        finally:
            ray.shutdown()
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    n, single = args.n, rows[0][1]
    table = "".join(
        f"| {name} | {wall:.1f} | {n / wall:.2f} | {single / wall:.2f} | "
        f"{'reference' if same is None else ('yes, all ' + str(len(reference)) + ' files' if same else 'NO')} |\n"
        for name, wall, same in rows)
    digest = (trained.weights_sha256 or "unknown")[:12]
    cores = os.cpu_count() or 1
    fewer = "" if n >= 1000 else (" (fewer images than the 1,000 of the default, which would have held this shared "
                                  "machine for about 40 minutes; `--n 1000` measures those)")
    busy = ""
    if max(load) > 2 * cores:  # the times then say more about the other jobs than about the engines
        busy = (f"The load average was up to {max(load) / cores:.0f}× the number of cores: these times measure the "
                "share of the cores the other jobs left to each run, which changed from run to run, so the "
                "speed-ups above are not a property of the engines (no run was faster for a reason of its own). "
                "Throughput on an idle machine was not measured.\n\n")
    text = (
        "# Privatising MNIST on Ray Data: one process against 1 and 2 workers\n\n"
        f"`python benchmarks/bench_ray.py --n {n}`{fewer}: the zoo's MLP-5 (`mlp5:mnist`, weights sha256 {digest}…, "
        f"float64), the first {n} MNIST test images written as PNG files, the grey decoy (`harmless privatize "
        f"MODEL DIR --out OUT [--ray --workers N]`), batches of {args.batch_size}, measured one after the other in "
        f"one run. Ray {ray.__version__} on a local instance with 2 CPUs, started once ({startup:.1f} s, not in the "
        "times below); each Ray time includes starting its actors and each actor's dense data of the harmless "
        f"subspace (made once per worker). Machine: {os.cpu_count()} CPU cores ({platform.machine()}), no GPU, "
        f"shared with other jobs while this ran (1-minute load average {', '.join(f'{v:.1f}' for v in load)} "
        f"before and after each Ray run); Python {platform.python_version()}, torch {torch.__version__}, NumPy "
        f"{np.__version__}.\n\n"
        "| engine | wall time (s) | images/s | speed-up over one process | outputs identical to one process |\n"
        "|---|---:|---:|---:|---|\n" + table +
        "\nIdentical means byte for byte: every `.privatized.png` and `.privatized.safetensors`, `report.md`, "
        "`side_by_side.png` and `report.json` (whose paths name its own folder, replaced before comparing). "
        "This holds because each image is solved on its own, on one torch thread, with random numbers seeded by "
        "the run's seed and the file name (`harmless.privacy.job`); it is not a claim across machines: another "
        "CPU or torch build may change the last bits (the outputs still verify, and the report certifies them).\n\n"
        + busy +
        "Where this does not hold: on a machine whose cores are busy with other work (as here) a second worker "
        "gains only what the other jobs leave free; with more cores per worker than one, a single process on "
        "several torch threads would be faster than one worker, but its results would differ in the last bits "
        "from any other thread count, which is why every engine solves on one thread.\n")
    path = atomic_write_text(args.out, text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
