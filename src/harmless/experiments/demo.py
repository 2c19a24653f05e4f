"""The main job: MNIST, the zoo's MLP-5, its harmless subspace, and how exact it is."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from harmless.experiments.common import (
    EPSILON,
    MULTIPLIERS,
    fmt,
    gaussian,
    harmless_perturbation,
    least_harmful_perturbation,
    output_rmse,
    accuracy,
    batched_outputs,
    rms_scale,
    save_figure,
)
from harmless.linalg.subspace import harmless_subspace

SPEC = "mlp5:mnist"


def run_demo(out_dir: Path, *, quick: bool = False) -> None:
    """Print a short report and write ``out_dir/harmless_mnist.png``."""
    from harmless.data import as_tensors, load_dataset
    from harmless.models import get_model

    t0 = time.perf_counter()
    test = load_dataset("mnist", "test")
    print(f"data: MNIST test set, {len(test)} images {'x'.join(map(str, test.shape))}, values in [0, 1]")
    tm = get_model(SPEC)
    origin = "reused from cache" if tm.from_cache else f"trained now in {tm.train_seconds:.0f} s"
    print(f"model: {SPEC} (MLP-5), {origin}; test accuracy {100 * tm.test_accuracy:.2f}%")

    model = tm.model.double().eval()
    shape = test.shape
    space = harmless_subspace(model, shape)
    print(f"linear prefix: {space.run.description}")
    print(f"harmless subspace: dim {space.dim} of {space.ambient_dim} (n - rank, rank {space.rank} by "
          f"{space.dim_method}); the model ignores every input change in it, whatever its size")

    x, y = as_tensors(test, torch.float64)
    if quick:
        x, y = x[:1000], y[:1000]
    clean = batched_outputs(model, x)
    gen = torch.Generator().manual_seed(0)
    harmless = harmless_perturbation(space)
    least, _ = least_harmful_perturbation(model, shape, k=1)
    rows = {"Gaussian noise": gaussian, "harmless": harmless, "least harmful": least}
    print(f"\noutput RMSE on {x.shape[0]} test images (float64), perturbation RMS per pixel = k x {EPSILON}:")
    print("  " + "perturbation".ljust(16) + "".join(f"{k:>2}ε".rjust(11) for k in MULTIPLIERS))
    for name, fn in rows.items():
        vals = [output_rmse(model, x, fn(x, EPSILON * k, gen), clean) for k in MULTIPLIERS]
        print("  " + name.ljust(16) + "".join(fmt(v).rjust(11) for v in vals))

    big = harmless(x, 1.0, gen)
    big = big * (1e4 * x.reshape(x.shape[0], -1).norm(dim=1) / big.reshape(x.shape[0], -1).norm(dim=1)).view(-1, 1, 1, 1)
    resid = space.harmful_residual(big)
    acc_clean = accuracy(model, x, y)
    acc_big = accuracy(model, x + big, y)
    changed = int((batched_outputs(model, x + big).argmax(1) != clean.argmax(1)).sum())
    print(f"\nharmless perturbations with ||δ|| = 10^4 ||x||: worst harmful residual "
          f"||Aδ|| / (||A|| ||δ||) = {float(resid.max()):.1e}; accuracy {100 * acc_clean:.2f}% -> "
          f"{100 * acc_big:.2f}%, {changed} of {x.shape[0]} predictions changed")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    show = x[:6]
    delta = rms_scale(space.sample(6, generator=torch.Generator().manual_seed(1)), 0.5)
    with torch.no_grad():
        p0 = model(show).softmax(1).max(1)
        p1 = model(show + delta).softmax(1).max(1)
    fig, axes = plt.subplots(3, 6, figsize=(10, 5.4))
    for i in range(6):
        for row, img, title in ((0, show[i], f"x: {int(p0.indices[i])} ({float(p0.values[i]):.3f})"),
                                (1, delta[i], "harmless δ (RMS 0.5)"),
                                (2, show[i] + delta[i], f"x+δ: {int(p1.indices[i])} ({float(p1.values[i]):.3f})")):
            ax = axes[row, i]
            if row == 1:
                lim = float(delta.abs().max())
                ax.imshow(img[0].numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim)
            else:
                ax.imshow(img[0].numpy(), cmap="gray")
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.suptitle(f"{SPEC}: adding harmless perturbations leaves every prediction and confidence unchanged")
    path = save_figure(fig, out_dir / "harmless_mnist.png")
    print(f"\nfigure: {path}  ({time.perf_counter() - t0:.0f} s in all)")

