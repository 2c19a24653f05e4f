"""The main job: MNIST, the zoo's MLP-5, its harmless subspace, and how exact it is; then
privacy protection with harmless perturbations on a few real test images (Fashion-MNIST, where
it works, and MNIST, where it cannot)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from harmless.experiments.common import (
    EPSILON,
    MULTIPLIERS,
    accuracy,
    batched_outputs,
    fmt,
    gaussian,
    harmless_perturbation,
    least_harmful_perturbation,
    output_rmse,
    rms_scale,
    save_figure,
)
from harmless.linalg.subspace import HarmlessSubspace, harmless_subspace
from harmless.plotting import show_image

if TYPE_CHECKING:
    from harmless.privacy import PrivacyProblem

SPEC = "mlp5:mnist"
#: The model of the privacy part: on MNIST most pixels sit exactly at 0 and may not go below it
#: (the privatised image must stay in [0, 1]), so a digit cannot be hidden; clothing images can.
PRIVACY_SPEC = "mlp5:fashion-mnist"



def _percent(value: float | None) -> str:
    return "unknown" if value is None else f"{100 * value:.2f}%"

def run_demo(out_dir: Path, *, quick: bool = False) -> None:
    """Print a short report and write ``out_dir/harmless_mnist.png`` and
    ``out_dir/privatize_fashion.png`` (``quick``: 1,000 test images instead of 10,000 for the
    exactness part; 2 images per data set instead of 4 and shorter optimisations for privacy)."""
    from harmless.data import as_tensors, load_dataset
    from harmless.models import get_model

    t0 = time.perf_counter()
    test = load_dataset("mnist", "test")
    print(f"data: MNIST test set, {len(test)} images {'x'.join(map(str, test.shape))}, values in [0, 1]")
    tm = get_model(SPEC)
    origin = "reused from cache" if tm.from_cache else f"trained now in {tm.train_seconds:.0f} s"
    print(f"model: {SPEC} (MLP-5), {origin}; test accuracy {_percent(tm.test_accuracy)}"
          + (f"; checkpoint sha256 {tm.weights_sha256[:12]}" if tm.weights_sha256 else ""))

    model = tm.model.double().eval()
    shape = test.shape
    space = harmless_subspace(model, shape)
    print(f"linear prefix: {space.run.description if space.run else '(an operator)'}")
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
    print(f"\nfigure: {path}")

    # Privacy: a few real test images, hidden behind harmless perturbations.
    n_images = 2 if quick else 4
    fashion = load_dataset("fashion-mnist", "test")
    ftm = get_model(PRIVACY_SPEC)
    origin = "reused from cache" if ftm.from_cache else f"trained now in {ftm.train_seconds:.0f} s"
    print(f"\nprivacy model: {PRIVACY_SPEC} (MLP-5), {origin}; test accuracy {_percent(ftm.test_accuracy)}"
          + (f"; checkpoint sha256 {ftm.weights_sha256[:12]}" if ftm.weights_sha256 else ""))
    fmodel = ftm.model.double().eval()
    fx, _ = as_tensors(fashion, torch.float64)
    cases = [PrivacyCase("Fashion-MNIST", fmodel, harmless_subspace(fmodel, fashion.shape), fx[:n_images],
                         ("paper", "decoy")),
             PrivacyCase("MNIST", model, space, x[:n_images], ("decoy",))]
    privacy_demo(cases, out_dir / "privatize_fashion.png", paper_steps=100 if quick else 300)
    print(f"\n({time.perf_counter() - t0:.0f} s in all)")


# ---------------------------------------------------------------------------------------------
# Privacy protection on real test images.

#: The methods of :func:`privatize_case`: the paper's Algorithm 1, and the same-output image
#: nearest to a flat grey decoy (convex, solved exactly).
METHOD_LABELS = {"paper": "paper (Alg. 1)", "decoy": "decoy (grey)"}


@dataclass
class PrivacyCase:
    """Images to privatise (float64 ``(B, C, H, W)`` in [0, 1]), the model (float64, eval mode)
    and its harmless subspace, and which methods to use (``"paper"``, ``"decoy"``)."""

    dataset: str
    model: nn.Module
    space: HarmlessSubspace
    x: torch.Tensor
    methods: tuple[str, ...]

    @cached_property
    def problem(self) -> PrivacyProblem:
        """The dense data of ``space`` the privacy solvers need, made once for all the case's
        methods and its attack."""
        from harmless.privacy import PrivacyProblem

        return PrivacyProblem(self.space)


@dataclass
class PrivacyRow:
    """One method on one case: the privatised images and what they give away.

    ``ssim``/``attack_ssim`` are per image (released image resp. the attacker's TV reconstruction
    vs the original); ``lpips`` the mean (None when its weights are unavailable);
    ``box_violation``/``output_deviation`` the largest over the images (``||A (x_hat - x)||``);
    ``model_deviation`` ``max |f(x_hat) - f(x)|`` in float64; ``changed`` how many predicted
    classes differ."""

    dataset: str
    method: str
    x: torch.Tensor
    x_hat: torch.Tensor
    attack: torch.Tensor
    ssim: np.ndarray
    lpips: float | None
    box_violation: float
    output_deviation: float
    model_deviation: float
    changed: int
    attack_ssim: np.ndarray

    @property
    def label(self) -> str:
        return METHOD_LABELS.get(self.method, self.method)


def _mean_lpips(a: torch.Tensor, b: torch.Tensor) -> float | None:
    from harmless.errors import DataUnavailableError
    from harmless.metrics import lpips

    try:
        return float(lpips(a.clamp(0, 1), b).mean())
    except DataUnavailableError:
        return None


def privatize_case(case: PrivacyCase, method: str, *, paper_steps: int = 300, use_lpips: bool = True,
                   attack: torch.Tensor | None = None) -> PrivacyRow:
    """Privatise ``case.x`` with ``method`` and audit it (the attacker knows the model): the exact
    total-variation attack, or ``attack`` when the caller has it already (it depends only on the
    set of same-output images, the same for every method)."""
    from harmless.metrics import ssim
    from harmless.privacy import DecoyPrivatizer, PaperPrivatizer, PrivatizeResult
    from harmless.privacy.audit import TVLPAttack

    problem = case.problem
    if method == "paper":
        res: PrivatizeResult = PaperPrivatizer(steps=paper_steps)(problem, case.x,
                                                                 generator=torch.Generator().manual_seed(0))
    elif method == "decoy":
        res = DecoyPrivatizer(decoy="grey")(problem, case.x)
    else:
        raise ValueError(f"unknown method {method!r}")
    x_hat = res.x_hat.to(case.x.dtype)
    if attack is None:
        attack = TVLPAttack()(problem, x_hat).x_rec
    with torch.no_grad():
        out, out_hat = case.model(case.x), case.model(x_hat)
    return PrivacyRow(
        dataset=case.dataset, method=method, x=case.x, x_hat=x_hat, attack=attack,
        ssim=ssim(x_hat.clamp(0, 1), case.x), lpips=_mean_lpips(x_hat, case.x) if use_lpips else None,
        box_violation=float(res.box_violation.max()), output_deviation=float(res.output_deviation.max()),
        model_deviation=float((out_hat - out).abs().max()), changed=int((out_hat.argmax(1) != out.argmax(1)).sum()),
        attack_ssim=ssim(attack.clamp(0, 1), case.x))


def print_privacy_table(rows: list[PrivacyRow]) -> None:
    """One line per (data set, method); means over the images, worst cases for the exactness."""
    # "x̂" is two code points but one column wide: one more pad character per x̂
    head = (f"  {'images':<18}{'method':<16}{'SSIM':>7}{'LPIPS':>8}{'max box viol.':>15}{'max ‖A(x̂−x)‖':>16}"
            f"{'max |f(x̂)−f(x)|':>18}  {'predictions':<18}{'attacker SSIM (TV)':>18}")
    print(head)
    for r in rows:
        n = r.x.shape[0]
        lp = f"{r.lpips:.3f}" if r.lpips is not None else "-"
        preds = f"{n - r.changed} of {n} unchanged"
        print(f"  {f'{r.dataset} ×{n}':<18}{r.label:<16}{float(r.ssim.mean()):>7.3f}{lp:>8}{r.box_violation:>15.1e}"
              f"{r.output_deviation:>15.1e}{r.model_deviation:>17.1e}  {preds:<18}{float(r.attack_ssim.mean()):>18.3f}")


def privacy_figure(rows: list[PrivacyRow], path: Path) -> Path:
    """Rows = images; columns = original | each method's privatised image | the attacker's exact TV
    reconstruction (the same for every method); SSIM to the original in every title. ``rows`` are
    of one case (the same images)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.axes import Axes

    x = rows[0].x
    n, ncol = x.shape[0], len(rows) + 2
    fig, axes = plt.subplots(n, ncol, figsize=(1.9 * ncol, 1.7 * n + 0.9), squeeze=False)

    def show(ax: Axes, img: torch.Tensor, title: str) -> None:
        show_image(ax, img)
        ax.set_title(title, fontsize=8)
        ax.axis("off")

    last = next((r for r in rows if r.method == "decoy"), rows[-1])
    for i in range(n):
        show(axes[i, 0], x[i], "original" if i == 0 else "")
        for j, r in enumerate(rows, start=1):
            show(axes[i, j], r.x_hat[i], (f"{r.label}\n" if i == 0 else "") + f"SSIM {float(r.ssim[i]):.2f}")
        show(axes[i, -1], last.attack[i], ("attacker's reconstruction\n(least TV, same output)\n" if i == 0 else "")
             + f"SSIM {float(last.attack_ssim[i]):.2f}")
    height = 1.7 * n + 0.9
    fig.subplots_adjust(hspace=0.3, top=1 - 0.6 / height)
    # above the column titles (three lines, ~0.5 in); the tight bounding box of save_figure keeps it
    fig.suptitle(f"{last.dataset}: every image in a row gives the model the same output (float64 round-off);\n"
                 "SSIM to the original, lower = better hidden", fontsize=9, y=1 + 0.05 / height, va="bottom")
    return save_figure(fig, path)


def privacy_demo(cases: list[PrivacyCase], path: Path, *, paper_steps: int = 300,
                 use_lpips: bool = True) -> list[PrivacyRow]:
    """Privatise and audit every case, print the table, and write the side-by-side figure of the
    first case to ``path``; returns the rows."""
    which = " and ".join(f"{c.x.shape[0]} {c.dataset}" for c in cases)
    print(f"\nprivacy: {which} test images, each replaced by an image x̂ = x + δ the model cannot tell from it\n"
          "(δ harmless, x̂ in [0, 1]); SSIM/LPIPS of x̂ to x: SSIM 1 = identical, lower = better hidden. The attacker\n"
          "knows the model: the image of least total variation among all with the same output (exact: an LP).")
    rows = []
    for c in cases:
        attack = None
        for m in c.methods:
            rows.append(privatize_case(c, m, paper_steps=paper_steps, use_lpips=use_lpips, attack=attack))
            attack = rows[-1].attack
    print_privacy_table(rows)
    if use_lpips and any(r.lpips is None for r in rows):
        print("  (LPIPS: its weights could not be fetched; see harmless.metrics.perceptual)")
    for c in cases:
        mine = [r for r in rows if r.dataset == c.dataset]
        best = min(float(r.ssim.mean()) for r in mine)
        frac = float((c.x == 0).float().mean())
        verdict = ("even the best-hidden images are essentially the originals" if best > 0.95
                   else "the best-hidden images are visibly changed")
        print(f"  {c.dataset}: {100 * frac:.0f}% of the pixels are exactly 0 (a same-output change may not take them "
              f"below 0); {verdict} (mean SSIM {best:.3f})")
    first = [r for r in rows if r.dataset == cases[0].dataset]
    fig_path = privacy_figure(first, path)
    print(f"figure: {fig_path}")
    return rows

