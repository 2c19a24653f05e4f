"""Benchmark: harmless's batched FGSM, PGD and DeepFool against ART 1.20.1's, in one run.

Run on demand (not part of the tests; timings are never asserted):

    .venv/bin/python benchmarks/bench_attacks.py [--n 1000] [--repeats 3] [--threads 1] [--out FILE]

Same model (the zoo's MLP-5 on MNIST, float32, CPU), same first ``n`` MNIST test images, same
labels (the model's own predictions, which is what ART's DeepFool attacks), same settings, the
whole batch at once in both libraries (ART's ``batch_size = n``). Each attack is timed
``repeats`` times, alternating the two libraries, and the median wall time is kept; the report
gives the ratio ours / ART (below 1: ours is faster) with both success rates, measured here and
now, so the machine's speed cancels out of the ratio.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from harmless.attacks import FGSM, PGD, DeepFool  # noqa: E402  (after the src/ path: the checkout is measured)
from harmless.cache import atomic_write_text  # noqa: E402
from harmless.data import as_tensors, load_dataset  # noqa: E402
from harmless.models import get_model  # noqa: E402


def timed(fn: Callable[[], np.ndarray], repeats: int) -> tuple[float, np.ndarray]:
    times, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    assert result is not None
    return statistics.median(times), result


def success(model: nn.Module, x_adv: np.ndarray | torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(torch.as_tensor(x_adv)).argmax(1) != y).double().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="MNIST test images (default 1000)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per attack and library (median kept)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both libraries (default 1)")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_attacks.md"))
    args = ap.parse_args()

    import art
    from art.attacks.evasion import DeepFool as ArtDeepFool
    from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescentPyTorch
    from art.estimators.classification import PyTorchClassifier

    # One thread by default, for both libraries: on a shared machine more threads than free
    # cores make every run slower and noisier (measured: FGSM 0.10-0.20 s with 2 busy threads,
    # 0.014 s with 1), and the ratio is what the benchmark reports.
    torch.set_num_threads(args.threads)

    model = get_model("mlp5:mnist").model.float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x, _ = as_tensors(load_dataset("mnist", "test"))
    x = x[:args.n].contiguous()
    with torch.no_grad():
        y = model(x).argmax(1)  # the predicted labels: every sample starts correctly "classified"
    xn, yn, n = x.numpy(), y.numpy(), x.shape[0]
    clf = PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=(1, 28, 28), nb_classes=10,
                            clip_values=(0.0, 1.0), device_type="cpu")

    eps, steps = 0.1, 10
    cases: list[tuple[str, str, Callable[[], np.ndarray], Callable[[], np.ndarray]]] = [
        ("FGSM L∞", f"eps {eps}",
         lambda: FGSM(eps, norm="inf")(model, x, y).x_adv.numpy(),
         lambda: FastGradientMethod(clf, norm=np.inf, eps=eps, batch_size=n).generate(xn, yn)),
        ("PGD L∞", f"eps {eps}, {steps} steps of eps/4, no random start",
         lambda: PGD(eps, steps=steps, norm="inf", abs_stepsize=eps / 4, random_start=False)(model, x, y).x_adv.numpy(),
         lambda: ProjectedGradientDescentPyTorch(clf, norm=np.inf, eps=eps, eps_step=eps / 4, max_iter=steps,
                                                 num_random_init=0, batch_size=n, verbose=False).generate(xn, yn)),
        ("PGD L2", f"eps 1.5, {steps} steps of eps/4, no random start",
         lambda: PGD(1.5, steps=steps, norm=2, abs_stepsize=1.5 / 4, random_start=False)(model, x, y).x_adv.numpy(),
         lambda: ProjectedGradientDescentPyTorch(clf, norm=2, eps=1.5, eps_step=1.5 / 4, max_iter=steps,
                                                 num_random_init=0, batch_size=n, verbose=False).generate(xn, yn)),
        ("DeepFool", "50 steps, 10 candidate classes, overshoot 0.02",
         lambda: DeepFool(steps=50, candidates=10, overshoot=0.02)(model, x, y).x_adv.numpy(),
         lambda: ArtDeepFool(clf, max_iter=50, epsilon=0.02, nb_grads=10, batch_size=n,
                             verbose=False).generate(xn)),
    ]
    rows = []
    for name, setting, ours_fn, art_fn in cases:
        ours_fn(), art_fn()  # warm-up (first-call allocations, lazy imports), not timed
        t_ours, x_ours = timed(ours_fn, args.repeats)
        t_art, x_art = timed(art_fn, args.repeats)
        l2_ours = float(np.median(np.linalg.norm((x_ours - xn).reshape(n, -1), axis=1)))
        l2_art = float(np.median(np.linalg.norm((x_art - xn).reshape(n, -1), axis=1)))
        rows.append((name, setting, t_ours, t_art, success(model, x_ours, y), success(model, x_art, y),
                     l2_ours, l2_art))
        print(f"{name}: ours {t_ours:.3f} s, ART {t_art:.3f} s, ratio {t_ours / t_art:.3f}; success "
              f"{100 * rows[-1][4]:.1f}% / {100 * rows[-1][5]:.1f}%", flush=True)

    header = ("| attack | settings | ours (s) | ART (s) | ours / ART | success ours | success ART "
              "| median ‖δ‖₂ ours | ART |\n|---|---|---:|---:|---:|---:|---:|---:|---:|\n")
    body = "".join(f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.3f} | {r[2] / r[3]:.2f} | {100 * r[4]:.1f} % "
                   f"| {100 * r[5]:.1f} % | {r[6]:.3f} | {r[7]:.3f} |\n" for r in rows)
    text = (f"# Attacks: harmless against ART {art.__version__}\n\n"
            f"`python benchmarks/bench_attacks.py --n {args.n} --repeats {args.repeats} --threads {args.threads}`: "
            "MLP-5 (zoo `mlp5:mnist`, "
            f"float32), the first {n} MNIST test images, labels = the model's predictions, the whole batch at once "
            f"in both libraries (ART `batch_size={n}`); median wall time of {args.repeats} runs after a warm-up, "
            f"measured in the same run. CPU: {platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} torch threads; Python {platform.python_version()}, torch {torch.__version__}, "
            f"NumPy {np.__version__}.\n\n" + header + body +
            "\nA ratio below 1 means ours is faster. FGSM and L∞ PGD compute the same iterates as ART "
            "(tests/test_attacks.py: bit-identical up to float32 round-off); L2 PGD differs only where the box binds "
            "(ART clips, then rescales; we rescale, then clip); DeepFool applies the overshoot to every iterate "
            "(the reference code) where ART applies it once at the end, so its norms are about 2 % smaller.\n")
    path = atomic_write_text(args.out, text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
