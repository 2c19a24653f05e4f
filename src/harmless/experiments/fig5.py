"""Figure 5: model fingerprints from harmless perturbations (MLP-5 on MNIST as model A).

A fingerprint of A (``k`` large harmless perturbations plus a few MNIST test images as
probes, :mod:`harmless.fingerprint`) is verified against variants of A:

* identical function: A in float64, in float32, a copy moved across devices (CPU -> CPU
  copy here, plus CUDA when available), fc1's hidden units permuted (fc1 rows + bias and
  fc2 columns: the same function, other weights);
* derived from A: fine-tuned 1 and 5 epochs (all layers, or with fc1 frozen), 30 % L1
  pruning of fc1 or of the later layers only, int8 dynamic quantisation of every Linear;
* independent: same architecture trained from another seed (1 epoch on a training subset,
  to keep the run short), MLP-5 trained on Fashion-MNIST, an MLP with a wider first layer
  (512 units, seeded random initialisation).

ROC / FAR / FRR use many random fingerprints (fresh perturbations each): positives are the
identical-function variants, negatives the independent models; derived models are
reported separately, since whether they "are" A is the question the method cannot settle.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from harmless.experiments.common import Table, accuracy, provenance, save_figure, save_text
from harmless.fingerprint import (
    DEFAULT_MAGNITUDE_RATIO,
    Fingerprint,
    create_fingerprint,
    verify_fingerprint,
)

SHAPE = (1, 28, 28)


@dataclasses.dataclass
class Variant:
    """A suspect model and what it is."""

    name: str
    model: nn.Module
    category: str  # "identical", "derived" or "independent"
    note: str
    device: str = "cpu"
    accuracy: float | None = None


def _log(msg: str) -> None:
    print(f"  fig5: {msg}", file=sys.stderr, flush=True)


def permute_fc1(model: nn.Module, seed: int = 0) -> nn.Module:
    """fc1's output units permuted; fc2's input columns permuted to match: the same function."""
    m = copy.deepcopy(model)
    perm = torch.randperm(m.fc1.out_features, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        m.fc1.weight.copy_(m.fc1.weight[perm])
        m.fc1.bias.copy_(m.fc1.bias[perm])
        m.fc2.weight.copy_(m.fc2.weight[:, perm])
    return m.eval()


def _fine_tune(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, epochs: int, *,
               freeze_fc1: bool = False) -> nn.Module:
    """Continue training a copy with Adam at lr 1e-4 (a tenth of the recipe's) on a training subset."""
    from harmless.models import train_loop
    from harmless.models.registry import TrainConfig
    from harmless.models.train import deterministic

    m = copy.deepcopy(model)
    if freeze_fc1:
        for p in m.fc1.parameters():
            p.requires_grad_(False)
    cfg = TrainConfig(epochs=epochs, batch_size=128, optimizer="adam", lr=1e-4)
    with deterministic(7):
        train_loop(m, images, targets, cfg, epochs=epochs, seed=7, progress=False)
    return m.eval()


def _prune(model: nn.Module, layers: list[str], amount: float = 0.3) -> nn.Module:
    from torch.nn.utils import prune

    m = copy.deepcopy(model)
    for name in layers:
        layer = getattr(m, name)
        prune.l1_unstructured(layer, "weight", amount=amount)
        prune.remove(layer, "weight")  # make the pruning permanent (plain weights again)
    return m.eval()


def _quantize(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8).eval()


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: str = "cpu") -> float:
    """Accuracy with the inputs in the variant's own dtype and device (quantised models warn)."""
    dtype = next((t.dtype for t in model.parameters() if t.is_floating_point()), torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return accuracy(model, x.to(device=device, dtype=dtype), y)


def _variants(a: nn.Module, quick: bool, data_dir: str | None, x_eval: torch.Tensor,
              y_eval: torch.Tensor) -> list[Variant]:
    from harmless.data import load_dataset
    from harmless.models import MLP5, get_model, train_zoo_model

    train = load_dataset("mnist", "train", data_dir=data_dir)
    n_ft = 2000 if quick else 6000
    imgs, tgts = torch.as_tensor(train.images)[:n_ft], torch.as_tensor(train.targets)[:n_ft]
    seed_samples = 3000 if quick else 20000
    out = [
        Variant("A, float64", copy.deepcopy(a).double().eval(), "identical", "same weights, float64 arithmetic"),
        Variant("A, float32", a, "identical", "the model itself (float32)"),
        Variant("A, copy moved to CPU", copy.deepcopy(a).to("cpu").eval(), "identical",
                "device move: a deep copy moved CPU -> CPU (no GPU on this machine)"),
    ]
    if torch.cuda.is_available():
        out.append(Variant("A, on CUDA", copy.deepcopy(a).to("cuda").eval(), "identical", "device move to CUDA",
                           device="cuda"))
    out.append(Variant("A, fc1 units permuted", permute_fc1(a), "identical",
                       "fc1 rows+bias and fc2 columns permuted: same function, other weights"))
    t = time.perf_counter()
    for ep in (1, 5):
        out.append(Variant(f"fine-tuned {ep} epoch{'s' if ep > 1 else ''}", _fine_tune(a, imgs, tgts, ep), "derived",
                           f"Adam lr 1e-4, {ep} epoch(s) on {n_ft} MNIST training images, all layers"))
    out.append(Variant("fine-tuned 5 epochs, fc1 frozen", _fine_tune(a, imgs, tgts, 5, freeze_fc1=True), "derived",
                       "as above, fc1 frozen (what an adversary who knows the method would do)"))
    _log(f"fine-tuning done ({time.perf_counter() - t:.0f} s)")
    out.append(Variant("pruned fc1 30%", _prune(a, ["fc1"]), "derived", "L1 unstructured, 30 % of fc1's weights"))
    out.append(Variant("pruned fc2-fc5 30%", _prune(a, ["fc2", "fc3", "fc4", "fc5"]), "derived",
                       "L1 unstructured, 30 % of each later layer's weights; fc1 untouched"))
    out.append(Variant("int8 dynamic quantised", _quantize(a), "derived",
                       "torch.ao quantize_dynamic on every nn.Linear (fc1 included)"))
    t = time.perf_counter()
    other = train_zoo_model("mlp5:mnist", seed=1, epochs=1, max_train_samples=seed_samples, save=False,
                            progress=False, data_dir=data_dir)
    _log(f"other seed trained ({time.perf_counter() - t:.0f} s)")
    out.append(Variant("other seed", other.model, "independent",
                       f"MLP-5 from seed 1, 1 epoch on {seed_samples} MNIST training images"))
    out.append(Variant("MLP-5 Fashion-MNIST", get_model("mlp5:fashion-mnist", progress=False).model, "independent",
                       "same architecture trained on Fashion-MNIST (cached zoo model)"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        wide = MLP5(in_shape=SHAPE, hidden=(512, 256, 256, 256)).eval()
    out.append(Variant("wider MLP (fc1 512)", wide, "independent",
                       "MLP-5 with a 512-unit first layer, seeded random initialisation"))
    for v in out:
        v.accuracy = _accuracy(v.model, x_eval, y_eval, v.device)
    return out


def _roc(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thresholds (log-spaced over the data) with the true- and false-accept rates of "stat <= thr"."""
    lo = math.log10(max(min(pos.min(), neg.min()), 1e-300)) - 1
    hi = math.log10(max(pos.max(), neg.max())) + 1
    thr = np.logspace(lo, hi, 400)
    tar = (pos[None, :] <= thr[:, None]).mean(axis=1)
    far = (neg[None, :] <= thr[:, None]).mean(axis=1)
    return thr, tar, far


def run(out_dir: Path, *, quick: bool = False, data_dir: str | None = None) -> list[Path]:
    """Run the fingerprint evaluation; write ``fig5.md``, ``fig5.png`` and ``fig5_roc.png`` to ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from harmless.data import as_tensors, load_dataset
    from harmless.models import get_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread is as fast and shares the machine
    try:
        start = time.perf_counter()
        trained = get_model("mlp5:mnist", data_dir=data_dir, progress=False)
        a = trained.model.eval()
        x_test, y_test = as_tensors(load_dataset("mnist", "test", data_dir=data_dir))
        n_probes, k = 4, 8
        probes = x_test[:n_probes]
        x_eval, y_eval = x_test[-(1000 if quick else 5000):], y_test[-(1000 if quick else 5000):]
        variants = _variants(a, quick, data_dir, x_eval, y_eval)
        _log(f"{len(variants)} variants ready ({time.perf_counter() - start:.0f} s)")

        # -- one fingerprint, every variant ---------------------------------------------
        fp = create_fingerprint(a, SHAPE, probes, k=k, generator=torch.Generator().manual_seed(0),
                                description="mlp5:mnist, harmless reproduce fig5")
        verdicts = {v.name: verify_fingerprint(fp, v.model, device=v.device) for v in variants}
        other = next(v for v in variants if v.name == "other seed")
        t = time.perf_counter()
        fp_x = create_fingerprint(a, SHAPE, probes, k=k, exclude=[other.model],
                                  generator=torch.Generator().manual_seed(0))
        v_x = verify_fingerprint(fp_x, other.model)
        v_xa = verify_fingerprint(fp_x, a)
        excl_seconds = time.perf_counter() - t

        # -- many random fingerprints: ROC ------------------------------------------------
        n_fp = 5 if quick else 20
        stats = {v.name: [] for v in variants}
        for i in range(n_fp):
            f = create_fingerprint(a, SHAPE, probes, k=k, generator=torch.Generator().manual_seed(1000 + i))
            for v in variants:
                stats[v.name].append(verify_fingerprint(f, v.model, device=v.device).statistic)
        _log(f"{n_fp} fingerprints x {len(variants)} variants verified ({time.perf_counter() - start:.0f} s)")
        pos = np.array([s for v in variants if v.category == "identical" for s in stats[v.name]])
        neg = np.array([s for v in variants if v.category == "independent" for s in stats[v.name]])
        der = np.array([s for v in variants if v.category == "derived" for s in stats[v.name]])
        thr = fp.threshold
        frr = float((pos > thr).mean())
        far = float((neg <= thr).mean())
        thr_grid, tar, far_grid = _roc(pos, neg)
        float32_max = max(stats["A, float32"])

        # -- table ------------------------------------------------------------------------
        rows = []
        for v in variants:
            vd = verdicts[v.name]
            s = np.array(stats[v.name])
            rows.append([v.name, v.category, f"{100 * v.accuracy:.2f}%", f"{vd.statistic:.3g}",
                         "same" if vd.same else "different", f"{vd.reference_deviation:.2g}",
                         f"{s.min():.3g} / {s.max():.3g}", f"{int((s <= thr).sum())}/{len(s)}", v.note])
        table = Table(["variant", "category", "test acc.", "statistic", "decision", "probe-output dev.",
                       f"statistic min / max over {n_fp} fingerprints", "'same' verdicts", "what it is"], rows)
        cmd = "harmless reproduce fig5" + (" --quick" if quick else "")
        seconds = time.perf_counter() - start
        text = f"""# Figure 5: model fingerprints from harmless perturbations

Model A: `mlp5:mnist` ({trained.weights_note}). Fingerprint: k = {k} harmless perturbations of A
(float64, exact: largest relative harmful residual {fp.harmful_residual:.1e}), each of L2 norm
{fp.magnitude:.1f} = {DEFAULT_MAGNITUDE_RATIO:g} x the largest of the {n_probes} probes' norms (the first {n_probes}
MNIST test images). Harmless subspace of A: dimension {fp.harmless_dim} (784 - 256).

Statistic: max over probes x and perturbations d of ||f(x+d) - f(x)|| / ||f(x)||, from the
suspect's outputs only (inputs sent in the suspect's parameter dtype). Decision: "same" iff
statistic <= threshold = **{thr:g}**.

## Variants (one fingerprint; then {n_fp} random fingerprints)

{table.markdown()}
"probe-output dev." is the secondary check: the largest relative difference between the suspect's
outputs on the probes and A's stored float64 outputs (not used for the decision).

## Threshold and error rates

Calibration: the same model in float32 only differs from float64 by round-off of x + d and of
fc1's product, ~eps32 x ||d|| x (gain) / ||f(x)||: over {n_fp} random fingerprints x {k} perturbations x
{n_probes} probes its largest statistic was **{float32_max:.2g}** (float64: {max(stats['A, float64']):.1g}); any model whose
first layer does not annihilate d responds with ||A' d|| x (gain), *larger* than its output: the smallest
independent-model statistic was **{neg.min():.3g}**. Both scale linearly with ||d||, so the threshold is
set to 1e-4 x (||d|| / max ||x||) = {thr:g} at the default magnitude: {thr / float32_max:.0f}x above the
worst same-model value, {neg.min() / thr:.0f}x below the best independent-model value.

At threshold {thr:g}, over {n_fp} fingerprints: **FRR = {frr:.3f}** ({int((pos > thr).sum())} of {len(pos)} identical-function
trials rejected), **FAR = {far:.3f}** ({int((neg <= thr).sum())} of {len(neg)} independent-model trials accepted).
The two groups are separated by {math.log10(neg.min() / pos.max()):.1f} orders of magnitude, so every threshold
between {pos.max():.2g} and {neg.min():.3g} gives FAR = FRR = 0 on these trials (ROC: `fig5_roc.png`).
Derived models judged "same": {int((der <= thr).sum())} of {len(der)} trials (see the table: exactly those that keep fc1).

## Exclusion (P1 - P1 ∩ P2)

With the other-seed model excluded, N(A) ∩ N(B) has dimension {fp_x.intersection_dims[0]} (= 784 - 256 - 256:
two generic 256-row first layers share a {fp_x.intersection_dims[0]}-dimensional nullspace), and the
perturbations are drawn from its {fp.harmless_dim - fp_x.excluded_dim}-dimensional orthogonal complement in N(A): smallest
relative ||B d|| / (||B|| ||d||) = {fp_x.exclusion_margins[0]:.3f}; verdicts: A {v_xa.statistic:.2g} (same),
B {v_x.statistic:.3g} ({'same' if v_x.same else 'different'}). ({excl_seconds:.1f} s, dense SVDs of 784-column matrices.)

## What "same" means, and the limits

* The test certifies that the suspect's **first linear layer has A's nullspace** (for
  generic perturbations), not that its weights are A's: a permutation of fc1's units, any
  change of later layers (fine-tuning with fc1 frozen, pruning fc2-fc5) keeps the verdict
  "same" even when the function changed (see the probe-output deviation).
* An adversary who knows the fingerprint method can keep "same" while changing the model at
  will after fc1 (freeze fc1), or evade it with a tiny change of fc1: fine-tuning fc1, pruning
  or quantising it moves its nullspace and the fingerprint breaks (statistic >> 1). The
  fingerprint is exact but brittle: it identifies a first layer, not a lineage.
* The perturbed inputs are far outside the image range ([0, 1]): a suspect that rejects or
  clips out-of-range inputs cannot be queried this way.
* Models whose linear prefix is injective (e.g. `lenet:mnist`, a padded 5x5 convolution)
  have no harmless subspace and cannot be fingerprinted.
* Device move: this machine has no GPU, so the "device move" variant is a CPU -> CPU copy
  {'(CUDA variant included)' if torch.cuda.is_available() else '(no CUDA variant)'}. The other-seed model is
  trained for 1 epoch on {3000 if quick else 20000} images to keep the run short.

Run time: {seconds:.0f} s.
""" + provenance(cmd)

        # -- figures ----------------------------------------------------------------------
        fig = _figure(plt, fp, a, other.model, trained.weights_note)
        fig_roc = _roc_figure(plt, variants, stats, thr, thr_grid, tar, far_grid, n_fp)
        out_dir.mkdir(parents=True, exist_ok=True)
        return [save_text(text, out_dir / "fig5.md"), save_figure(fig, out_dir / "fig5.png"),
                save_figure(fig_roc, out_dir / "fig5_roc.png")]
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def _figure(plt, fp: Fingerprint, a: nn.Module, b: nn.Module, note: str):  # noqa: ANN001, ANN202
    """Probes, perturbations, and the logits of A and of another model on x and x + d."""
    p = min(fp.num_probes, 4)
    fig, axes = plt.subplots(4, p, figsize=(3.0 * p, 10.5))
    x = fp.probes[:p]
    d = fp.perturbations[:p]
    xa, xd = x.float(), (x + d).float()
    fa, fad = a(xa), a(xd)
    fb, fbd = b(xa), b(xd)
    classes = np.arange(fa.shape[1])
    for j in range(p):
        axes[0, j].imshow(x[j, 0].numpy(), cmap="gray", vmin=0, vmax=1)
        axes[0, j].set_title(f"probe x{j + 1}")
        lim = float(d[j].abs().max())
        axes[1, j].imshow(d[j, 0].numpy(), cmap="seismic", vmin=-lim, vmax=lim)
        axes[1, j].set_title(f"d{j + 1} (||d|| = {fp.magnitude:.0f},\nshown scaled to +-{lim:.0f})", fontsize=8)
        for ax, clean, pert, who in ((axes[2, j], fa, fad, "model A"), (axes[3, j], fb, fbd, "other seed")):
            ax.bar(classes - 0.2, clean[j].numpy(), width=0.4, label="f(x)")
            ax.bar(classes + 0.2, pert[j].numpy(), width=0.4, label="f(x + d)")
            ax.set_xticks(classes)
            ax.set_title(f"{who}: logits", fontsize=9)
            if who == "other seed":
                ax.set_yscale("symlog", linthresh=10)
        for ax in axes[:2, j]:
            ax.axis("off")
    axes[2, 0].legend(fontsize=7)
    fig.suptitle("Fingerprint of MLP-5 (MNIST): harmless for A (logits unchanged), not for another model\n"
                 f"({note}; perturbations {DEFAULT_MAGNITUDE_RATIO:g}x the probe norm, far outside [0, 1])",
                 fontsize=10)
    fig.tight_layout()
    return fig


def _roc_figure(plt, variants: list[Variant], stats: dict[str, list[float]], thr: float,  # noqa: ANN001, ANN202
                thr_grid: np.ndarray, tar: np.ndarray, far: np.ndarray, n_fp: int):
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1.6, 1]})
    colors = {"identical": "tab:green", "derived": "tab:orange", "independent": "tab:red"}
    for i, v in enumerate(variants):
        s = np.maximum(np.array(stats[v.name]), 1e-18)
        axes[0].scatter(s, np.full(s.shape, i) + np.linspace(-0.2, 0.2, len(s)), s=10, color=colors[v.category],
                        label=v.category if v.category not in [w.category for w in variants[:i]] else None)
    axes[0].axvline(thr, color="k", ls="--", lw=1, label=f"threshold {thr:g}")
    axes[0].set_xscale("log")
    axes[0].set_yticks(range(len(variants)))
    axes[0].set_yticklabels([v.name for v in variants], fontsize=8)
    axes[0].invert_yaxis()
    axes[0].set_xlabel("statistic: max ||f(x+d) - f(x)|| / ||f(x)||  (floored at 1e-18)")
    axes[0].set_title(f"{n_fp} random fingerprints per variant")
    axes[0].legend(fontsize=8, loc="center left")  # the left middle is empty: nothing is hidden
    axes[1].plot(far, tar, marker=".", ms=3)
    axes[1].set_xlabel("false accept rate (independent models judged 'same')")
    axes[1].set_ylabel("true accept rate (identical function judged 'same')")
    axes[1].set_title("ROC over the threshold (identical vs independent)")
    axes[1].set_xlim(-0.02, 1.02)
    axes[1].set_ylim(-0.02, 1.02)
    ax2 = axes[1].inset_axes([0.45, 0.12, 0.5, 0.4])
    ax2.plot(thr_grid, 1 - tar, label="FRR")
    ax2.plot(thr_grid, far, label="FAR")
    ax2.axvline(thr, color="k", ls="--", lw=1)
    ax2.set_xscale("log")
    ax2.set_xlabel("threshold", fontsize=7)
    ax2.tick_params(labelsize=6)
    ax2.legend(fontsize=6)
    fig.tight_layout()
    return fig
