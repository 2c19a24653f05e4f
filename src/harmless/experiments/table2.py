"""Table 2: privacy protection with harmless perturbations (paper: CIFAR-10, ResNet-50).

Settings (CPU-sized; the paper's numbers are quoted beside ours):

* ``mlp5:mnist`` and ``mlp5:fashion-mnist`` (trained, cached): the first 300 test images in
  full mode (8 in quick mode), every method and attack; plus the decoy method on the *whole*
  MNIST and Fashion-MNIST test sets (10,000 images each);
* the untrained ``resnet50:cifar10,stem_kernel=7,stem_stride=6`` on the 20 foolbox CIFAR-10 images;
* an untrained ImageNet ResNet-50 (1000 classes) with a non-overlapping 7x7/s7 stem on the 20
  foolbox ImageNet images (224x224): its QPs split exactly into one per 7x7 tile
  (:mod:`harmless.privacy.tiles`); the overlapping 7x7/s6/p3 stem (58,136 harmless dimensions at
  224 px, a dense basis of ~70 GB) is solved matrix-free by :mod:`harmless.experiments.table2_overlap`.

Every QP is solved by the interior-point method of :mod:`harmless.privacy.core`, whose
certificate (KKT residuals met, certified distance to the exact optimum) is reported per row.

Methods: ``paper`` (Algorithm 1: Adam on the harmless coefficients with a box penalty, then the
exact projection onto ``{x + N(A)} ∩ [0,1]^n``), ``decoy-grey`` / ``decoy-shift`` (our convex
formulation, nearest feasible image to a flat grey image / to another image of the batch), and
Gaussian ``N(0, 0.1^2)`` noise clipped to ``[0, 1]``. Attacker columns: SSIM of each attack's
reconstruction (:mod:`harmless.privacy.audit`) to the original. 8-bit: accuracy change after
naive rounding and after greedy flips (:class:`harmless.privacy.Quantizer`).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from harmless.experiments.common import Table, accuracy, prediction_changes, provenance, save_figure, save_text
from harmless.linalg.subspace import HarmlessSubspace
from harmless.plotting import show_image
from harmless.privacy.tiles import Tiling, per_image_norms

PAPER = "Paper (CIFAR-10, ResNet-50): harmless SSIM 0.4719, LPIPS 0.2031, Δacc 0.00%; Gaussian N(0,0.1²) SSIM 0.6825, LPIPS 0.3007, Δacc 32.46%."


def _log(msg: str) -> None:
    print(f"  table2: {msg}", file=sys.stderr, flush=True)


#: ImageNet's channel statistics, for the ImageNet model's Normalize layer.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
#: The ImageNet model's stem: kernel = stride = 7, no padding, so its windows tile 224 px exactly.
IMAGENET_TILE = 7


def _setting(name: str, data_dir: str | os.PathLike[str] | None) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The float64 eval-mode model and the whole test set of a setting."""
    from harmless.data import as_tensors, load_dataset
    from harmless.models import build_model, get_model, zoo

    if name == "cifar10-resnet50":
        model = build_model("resnet50:cifar10,stem_kernel=7,stem_stride=6")
        ds = load_dataset("foolbox-cifar10", data_dir=data_dir)
    elif name == "imagenet-resnet50":
        torch.manual_seed(0)
        model = zoo.resnet50(stem_kernel=IMAGENET_TILE, stem_stride=IMAGENET_TILE, stem_padding=0, num_classes=1000,
                             mean=IMAGENET_MEAN, std=IMAGENET_STD)
        ds = load_dataset("foolbox-imagenet", data_dir=data_dir)
    else:
        model = get_model(f"mlp5:{name}").model
        ds = load_dataset(name, data_dir=data_dir)
    x, y = as_tensors(ds, torch.float64)
    return model.double().eval(), x, y


def _certificate(converged: torch.Tensor, distance_bound: float) -> str:
    """``converged% / max certified distance to the exact projection`` (per image: the root sum
    of squares of its tiles' bounds, when tiled)."""
    return f"{100 * float(converged.double().mean()):.1f}% / {distance_bound:.1e}"


def _run_setting(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, tv_steps: int, *,
                 paper_steps: int = 300, space: HarmlessSubspace | None = None, tiles: Tiling | None = None,
                 tv_lp_images: int = 0) -> tuple[list[list[str]], list[list[str]], dict[str, torch.Tensor]]:
    """Every method on ``(x, y)``, then every attack; ``space``: the model's harmless subspace, if
    the caller already has it; ``tiles``: solve tile by tile instead (see
    :mod:`harmless.privacy.tiles`); ``tv_lp_images``: run the exact TV attack (an LP per image)
    on the first so many images. Returns the method rows, the audit rows and the images."""
    import harmless
    from harmless import metrics
    from harmless.privacy import DecoyPrivatizer, PaperPrivatizer, PrivacyProblem, Quantizer, make_decoy
    from harmless.privacy.audit import BoxAttack, MinNormAttack, TVAttack, TVLPAttack

    t0 = time.time()
    if tiles is not None:
        space = tiles.part
    elif space is None:
        space = harmless.harmless_subspace(model, tuple(x.shape[1:]))
    problem = PrivacyProblem(space)  # the dense data, made once for every method and attack below
    split, merge = (tiles.split, tiles.merge) if tiles is not None else (torch.nn.Identity(), torch.nn.Identity())
    per_image = tiles.tiles_per_image if tiles is not None else 1
    dims = f"{problem.dim * per_image} of {problem.n * per_image}" + (f" ({per_image} tiles)" if tiles is not None else "")
    _log(f"{name}: harmless dim {dims} ({time.time() - t0:.0f}s)")
    changes = prediction_changes(model, x, y)

    rows = []
    images: dict[str, torch.Tensor] = {"original": x}
    gen = torch.Generator().manual_seed(0)
    xt = split(x)
    grey = DecoyPrivatizer(decoy="grey")
    outs = {
        "harmless (paper, Alg. 1 + exact projection)": lambda: PaperPrivatizer(steps=paper_steps)(problem, xt,
                                                                                               generator=gen),
        "harmless (decoy: flat grey)": lambda: grey(problem, xt),
        # every image's decoy is another whole image, cut into tiles like it
        "harmless (decoy: other image)": lambda: grey(problem, xt, target=split(make_decoy("shift", x))),
    }
    quantize = Quantizer()
    released = {}
    for label, fn in outs.items():
        t0 = time.time()
        r = fn()
        info = r.projection
        xh = merge(r.x_hat)
        released[label] = r.x_hat
        q = quantize(problem, r.x_hat, xt)
        images[label] = xh
        with torch.no_grad():
            out_dev = float((model(xh) - model(x)).abs().max())
        bound = per_image_norms(info.distance_bound, per_image)
        conv = info.converged.reshape(-1, per_image).all(1)
        rows.append([name, label, f"{metrics.ssim(xh.clamp(0, 1), x).mean():.4f}",
                     f"{metrics.lpips(xh.float().clamp(0, 1), x.float()).mean():.4f}", changes(xh),
                     f"{float(r.mse.mean()):.2e}", f"{float(r.box_violation.max()):.1e}",
                     f"{float(per_image_norms(r.output_deviation, per_image).max()):.1e}",
                     f"{out_dev:.1e}", f"{changes(merge(q.naive))} / {changes(merge(q.improved))}",
                     _certificate(conv, float(bound.max()))])
        _log(f"{name}: {label} done ({time.time() - t0:.0f}s)")
    g = (x + 0.1 * torch.randn(x.shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    rows.append([name, "Gaussian N(0, 0.1²), clipped", f"{metrics.ssim(g, x).mean():.4f}",
                 f"{metrics.lpips(g.float(), x.float()).mean():.4f}", changes(g),
                 f"{float(((g - x) ** 2).mean()):.2e}", "0", "-", "-", "-", "-"])

    # the attacks see only the set {x_hat + N(A)} ∩ [0, 1]^n, the same for every released x_hat of
    # x: one run, on the grey-decoy release, serves every method
    t0 = time.time()
    xr = released["harmless (decoy: flat grey)"]
    attacks = {"min-norm (I−P)x̂": (merge(MinNormAttack()(problem, xr).x_rec), x.shape[0]),
               "box: nearest in the set to (I−P)x̂": (merge(BoxAttack()(problem, xr).x_rec), x.shape[0])}
    if tv_steps:
        tv = TVAttack(steps=tv_steps)(problem, xr, images=None if tiles is None else merge)
        attacks[f"TV, smoothed (Adam, {tv_steps} steps)"] = (merge(tv.x_rec), x.shape[0])
    if tv_lp_images and tiles is None:
        k = min(tv_lp_images, x.shape[0])
        attacks["TV, exact (LP, HiGHS)"] = (TVLPAttack()(problem, xr[:k]).x_rec, k)
    audit_rows = []
    for label, (rec, k) in attacks.items():
        rc = rec.clamp(0, 1)
        audit_rows.append([name, label, str(k), f"{metrics.ssim(rc, x[:k]).mean():.4f}",
                           f"{metrics.lpips(rc.float(), x[:k].float()).mean():.4f}",
                           f"{metrics.psnr(rc, x[:k]).mean():.2f}"])
        images[f"attack: {label}"] = rec
    for label in ("harmless (paper, Alg. 1 + exact projection)", "harmless (decoy: flat grey)"):
        xh = images[label].clamp(0, 1)
        audit_rows.append([name, f"(no attack: the released x̂, {label[10:-1]})", str(x.shape[0]),
                           f"{metrics.ssim(xh, x).mean():.4f}", f"{metrics.lpips(xh.float(), x.float()).mean():.4f}",
                           f"{metrics.psnr(xh, x).mean():.2f}"])
    _log(f"{name}: attacks done ({time.time() - t0:.0f}s)")
    return rows, audit_rows, images


def _full_test_set(name: str, model: nn.Module, space: HarmlessSubspace, x: torch.Tensor, y: torch.Tensor,
                   batch: int = 1000) -> list[list[str]]:
    """The flat-grey decoy method on a whole test set, in batches: SSIM, LPIPS, Δacc."""
    from harmless import metrics
    from harmless.privacy import DecoyPrivatizer

    t0 = time.time()
    ssim, lp, box, dev, conv, bound, xh_all = [], [], [], [], [], [], []
    grey = DecoyPrivatizer(decoy="grey")  # keeps the dense data of space for every batch
    for s in range(0, x.shape[0], batch):
        r = grey(space, x[s:s + batch])
        xb = x[s:s + batch]
        ssim.append(metrics.ssim(r.x_hat.clamp(0, 1), xb))
        lp.append(metrics.lpips(r.x_hat.float().clamp(0, 1), xb.float()))
        box.append(float(r.box_violation.max()))
        dev.append(float(r.output_deviation.max()))
        info = r.projection
        conv.append(info.converged)
        bound.append(float(info.distance_bound.max()))
        xh_all.append(r.x_hat)
        _log(f"{name} full test set: {s + xb.shape[0]} of {x.shape[0]} ({time.time() - t0:.0f}s)")
    base = accuracy(model, x, y)
    d_acc = base - accuracy(model, torch.cat(xh_all), y)
    return [[name, str(x.shape[0]), f"{np.concatenate(ssim).mean():.4f}", f"{np.concatenate(lp).mean():.4f}",
             f"{100 * d_acc:.2f}%", f"{max(box):.1e}", f"{max(dev):.1e}",
             _certificate(torch.cat(conv), max(bound)), f"{time.time() - t0:.0f}s"]]


def _ssim_vs_dim(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Untrained Flatten->Linear(3072, w) models on CIFAR images, flat-grey decoy."""
    import harmless
    from harmless import metrics
    from harmless.privacy import DecoyPrivatizer

    fracs, ssims = [], []
    for w in (256, 768, 1536, 2304, 2816):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(3072, w)).double().eval()
        space = harmless.harmless_subspace(model, (3, 32, 32))
        r = DecoyPrivatizer(decoy="grey")(space, x)
        fracs.append((3072 - space.rank) / 3072)
        ssims.append(float(metrics.ssim(r.x_hat.clamp(0, 1), x).mean()))
        _log(f"ssim vs dim: width {w}: fraction {fracs[-1]:.3f}, SSIM {ssims[-1]:.4f}")
    return fracs, ssims


def run(out_dir: Path, *, quick: bool = False, data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Run Table 2 and write ``table2.md``, ``table2.png``, ``table2_ssim_vs_dim.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import harmless
    from harmless.privacy.tiles import tiling

    out_dir = Path(out_dir)
    sizes = {"mnist": 8, "fashion-mnist": 8, "cifar10-resnet50": 4, "imagenet-resnet50": 2} if quick else \
        {"mnist": 300, "fashion-mnist": 300, "cifar10-resnet50": 20, "imagenet-resnet50": 20}
    # the exact TV attack is an LP per image, ~3 s at 28x28 and ~10 s at 3x32x32; at 224 px it would
    # have ~450,000 variables, so ImageNet gets the smoothed attack only
    tv_lp = {"mnist": 2, "fashion-mnist": 2, "cifar10-resnet50": 1, "imagenet-resnet50": 0} if quick else \
        {"mnist": 50, "fashion-mnist": 50, "cifar10-resnet50": 20, "imagenet-resnet50": 0}
    tv_steps = 50 if quick else 100
    header = ["setting", "method", "SSIM ↓", "LPIPS ↑", "Δacc (predictions changed)", "MSE", "max box viol.",
              "max ‖A(x̂−x)‖", "max |f(x̂)−f(x)|", "8-bit PNG Δacc (naive / harmless-aware rounding)",
              "QP converged / max ‖x̂−x̂*‖ bound"]
    rows: list[list[str]] = []
    audit_rows: list[list[str]] = []
    figs: dict[str, dict[str, torch.Tensor]] = {}
    full_rows: list[list[str]] = []
    notes: dict[str, str] = {}
    for name in sizes:
        model, x, y = _setting(name, data_dir)
        notes[name] = str(getattr(model, "weights_note", "untrained weights"))
        n = sizes[name]
        if name == "imagenet-resnet50":
            tiles = tiling(model, tuple(x.shape[1:]), IMAGENET_TILE)
            r, a, imgs = _run_setting(name, model, x[:n], y[:n], tv_steps, tiles=tiles)
        else:
            space = harmless.harmless_subspace(model, tuple(x.shape[1:]))
            r, a, imgs = _run_setting(name, model, x[:n], y[:n], tv_steps, space=space, tv_lp_images=tv_lp[name])
            if name in ("mnist", "fashion-mnist") and not quick:
                full_rows += _full_test_set(name, model, space, x, y)
        rows += r
        audit_rows += a
        figs[name] = imgs
    cif = figs["cifar10-resnet50"]["original"]
    fracs, ssims = _ssim_vs_dim(cif[:5] if quick else cif[:10])

    text = ("# Table 2: privacy protection with harmless perturbations\n\n" + PAPER + "\n\n"
            f"{'Quick' if quick else 'Full'} mode: the first {sizes['mnist']} MNIST and {sizes['fashion-mnist']} "
            f"Fashion-MNIST test images (trained MLP-5); CIFAR-10: the first {sizes['cifar10-resnet50']} foolbox "
            "images with the *untrained* ResNet-50 (stem_kernel=7, stem_stride=6); ImageNet: the first "
            f"{sizes['imagenet-resnet50']} foolbox images (224x224) with an *untrained* 1000-class ResNet-50 whose "
            "stem is 7x7/s7 without padding, solved tile by tile (1024 exact 7x7 QPs per image; the overlapping 7x7/s6 "
            "stem, whose dense harmless basis (58,136 x 150,528) does not fit, is solved matrix-free in "
            "table2_overlap.md). All "
            "computations in float64. Privatised images are in [0, 1] to 1e-12 with no clipping; ‖A(x̂−x)‖ is the "
            "output change of the linear prefix, |f(x̂)−f(x)| that of the model's float64 logits; Δacc is against "
            "the labels (the untrained models' accuracy is chance, so the number of changed predictions is the "
            "measure there). The last column is the QP solver's certificate: the share of images whose "
            "interior-point iterate met every KKT tolerance (1e-12, relative), and the largest certified distance "
            "sqrt(2·gap) from a returned image to the exact optimum (the image itself is always exactly feasible "
            "and harmless). Weights: "
            + "; ".join(f"{name}: {note}" for name, note in notes.items()) + ".\n\n"
            + Table(header, rows).markdown()
            + ("\nThe decoy method on the whole test sets:\n\n"
               + Table(["setting", "images", "SSIM ↓", "LPIPS ↑", "Δacc", "max box viol.", "max ‖A(x̂−x)‖",
                        "QP converged / max ‖x̂−x̂*‖ bound", "time"], full_rows).markdown() if full_rows else "")
            + "\n## The privacy audit: what an attacker who knows the model recovers\n\n"
            "The attacker knows the first linear layer, hence the harmful part (I−P)x = (I−P)x̂ and the set "
            "{x̂+N(A)}∩[0,1]^n of every image the model cannot tell from x. That set is the same for every "
            "harmless x̂ released for x, so the attacks below, run on the grey-decoy release, give the same "
            "reconstruction whichever method released x̂. min-norm = (I−P)x̂; box = the point of the set nearest "
            "to it; TV smoothed = Adam on a smoothed total variation over the set; TV exact = the image of least "
            "anisotropic total variation in the set, an LP solved to optimality by HiGHS (first images only: an "
            "LP per image). SSIM/LPIPS/PSNR of the reconstruction to the original: higher SSIM and PSNR, lower "
            "LPIPS = more leaked. The last rows of each setting are the released images themselves, for "
            "comparison.\n\n"
            + Table(["setting", "attack", "images", "SSIM to x ↑=leak", "LPIPS to x", "PSNR (dB)"],
                    audit_rows).markdown() + "\n"
            "SSIM vs harmless dimension fraction (untrained Flatten→Linear(3072, w), CIFAR images, flat-grey decoy): "
            + ", ".join(f"{f:.3f}: {s:.4f}" for f, s in zip(fracs, ssims)) + "\n"
            + provenance(f"harmless reproduce table2{' --quick' if quick else ''}"))
    paths = [save_text(text, out_dir / "table2.md")]

    cols = ["original", "harmless (paper, Alg. 1 + exact projection)", "harmless (decoy: flat grey)", "attack"]
    fig, axes = plt.subplots(len(figs), len(cols), figsize=(2.0 * len(cols), 2.5 * len(figs)))
    fig.subplots_adjust(hspace=0.45)  # room for the attack column's title on every row
    for i, sname in enumerate(figs):
        # the strongest attack run on this setting: the exact TV where there is one
        attack = max((k for k in figs[sname] if k.startswith("attack: TV")), key=lambda k: "exact" in k)
        for j, k in enumerate(cols):
            key = attack if k == "attack" else k
            ax = axes[i, j]
            show_image(ax, figs[sname][key][0].clamp(0, 1))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0 or k == "attack":
                ax.set_title(key.replace(" (", "\n(").replace(": ", ":\n"), fontsize=6)
        axes[i, 0].set_ylabel(sname, fontsize=7)
    paths.append(save_figure(fig, out_dir / "table2.png"))

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot(fracs, ssims, "o-")
    ax.set_xlabel("harmless dimension fraction (n−m)/n")
    ax.set_ylabel("SSIM(x̂, x), flat-grey decoy")
    ax.set_title("CIFAR-10, untrained Linear(3072, w)", fontsize=8)
    paths.append(save_figure(fig, out_dir / "table2_ssim_vs_dim.png"))
    return paths
