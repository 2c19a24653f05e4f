"""Figure 5: model fingerprints from harmless perturbations (MLP-5 on MNIST as model A).

A fingerprint of A (``k`` large harmless perturbations plus a few MNIST test images as
probes, :mod:`harmless.fingerprint`) is verified against variants of A:

* identical function: A in float64, in float32, a copy moved across devices (CPU -> CPU
  copy here, plus CUDA when available), fc1's hidden units permuted (fc1 rows + bias and
  fc2 columns: the same function, other weights);
* derived from A: fine-tuned 1 and 5 epochs (all layers, or with fc1 frozen), fc1 alone
  trained for 1, 3 and 10 SGD steps (lr 1e-3), Gaussian noise on fc1's weights of relative
  size 1e-9 ... 1e-3, 30 % L1 pruning of fc1 or of the later layers only, int8 dynamic
  quantisation of every Linear;
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
from harmless.threads import one_torch_thread

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
    fc1_changed: bool = False  # derived with fc1's weights changed (by more than float32 round-off)


def _log(msg: str) -> None:
    print(f"  fig5: {msg}", file=sys.stderr, flush=True)


def _linear(model: nn.Module, name: str) -> nn.Linear:
    """MLP-5's named Linear layer (fc1, fc2, ...), typed."""
    layer = model.get_submodule(name)
    assert isinstance(layer, nn.Linear), f"{name} is not a Linear layer"
    return layer


def permute_fc1(model: nn.Module, seed: int = 0) -> nn.Module:
    """fc1's output units permuted; fc2's input columns permuted to match: the same function."""
    m = copy.deepcopy(model)
    perm = torch.randperm(_linear(m, "fc1").out_features, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        _linear(m, "fc1").weight.copy_(_linear(m, "fc1").weight[perm])
        _linear(m, "fc1").bias.copy_(_linear(m, "fc1").bias[perm])
        _linear(m, "fc2").weight.copy_(_linear(m, "fc2").weight[:, perm])
    return m.eval()


def _fine_tune(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, epochs: int, *,
               freeze_fc1: bool = False) -> nn.Module:
    """Continue training a copy with Adam at lr 1e-4 (a tenth of the recipe's) on a training subset."""
    from harmless.models import train_loop
    from harmless.models.registry import TrainConfig
    from harmless.models.train import deterministic

    m = copy.deepcopy(model)
    if freeze_fc1:
        for p in _linear(m, "fc1").parameters():
            p.requires_grad_(False)
    cfg = TrainConfig(epochs=epochs, batch_size=128, optimizer="adam", lr=1e-4)
    with deterministic(7):
        train_loop(m, images, targets, cfg, epochs=epochs, seed=7, progress=False)
    return m.eval()


def _fc1_sgd_steps(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, steps: int) -> nn.Module:
    """fc1 alone trained for ``steps`` plain SGD steps at lr 1e-3 on one batch of 128 images:
    the smallest change an adversary could make to evade a fingerprint."""
    m = copy.deepcopy(model).train()
    x = images[:128].float() / (255.0 if not images.is_floating_point() else 1.0)
    x, y = x.reshape(-1, *SHAPE), targets[:128].long()
    opt = torch.optim.SGD(_linear(m, "fc1").parameters(), lr=1e-3)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
    return m.eval()


def _fc1_noise(model: nn.Module, rel: float, seed: int = 0) -> nn.Module:
    """fc1's weights plus Gaussian noise of Frobenius norm ``rel * ||W1||``."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        w = _linear(m, "fc1").weight
        noise = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed))
        w.add_(rel * w.norm() * noise / noise.norm())
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
    for v in out[-2:]:
        v.fc1_changed = True
    out.append(Variant("fine-tuned 5 epochs, fc1 frozen", _fine_tune(a, imgs, tgts, 5, freeze_fc1=True), "derived",
                       "as above, fc1 frozen (what an adversary who knows the method would do)"))
    for steps in (1, 3, 10):
        out.append(Variant(f"fc1: {steps} SGD step{'s' if steps > 1 else ''}", _fc1_sgd_steps(a, imgs, tgts, steps),
                           "derived", f"fc1 alone, SGD lr 1e-3, {steps} step(s) on one batch of 128 training images",
                           fc1_changed=True))
    for rel in (1e-9, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3):
        out.append(Variant(f"fc1 noise {rel:g}", _fc1_noise(a, rel), "derived",
                           f"Gaussian noise on fc1's weights, ||noise|| = {rel:g} ||W1||", fc1_changed=rel >= 1e-5))
    _log(f"fine-tuning done ({time.perf_counter() - t:.0f} s)")
    out.append(Variant("pruned fc1 30%", _prune(a, ["fc1"]), "derived", "L1 unstructured, 30 % of fc1's weights",
                       fc1_changed=True))
    out.append(Variant("pruned fc2-fc5 30%", _prune(a, ["fc2", "fc3", "fc4", "fc5"]), "derived",
                       "L1 unstructured, 30 % of each later layer's weights; fc1 untouched"))
    out.append(Variant("int8 dynamic quantised", _quantize(a), "derived",
                       "torch.ao quantize_dynamic on every nn.Linear (fc1 included)", fc1_changed=True))
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


def _true_deviation(fp: Fingerprint, model: nn.Module) -> float | None:
    """``max_i ||A' d_i|| / (||A|| ||d_i||)`` with ``A'`` the suspect's linear prefix (``A d_i = 0``):
    the quantity the verdict's ``first_layer_deviation`` estimates. ``None`` when the suspect's
    prefix does not run through a float ``fc1`` (a quantised fc1 is not a float linear layer)."""
    import harmless
    from harmless.errors import HarmlessError

    try:
        space = harmless.harmless_subspace(model, SHAPE)
    except HarmlessError:
        return None
    if space.run is None or not any(r.name == "fc1" for r in space.run.layers):
        return None
    d = fp.perturbations
    out = space.operator.matvec(d).reshape(d.shape[0], -1).norm(dim=1)
    return float((out / (fp.operator_norm * d.reshape(d.shape[0], -1).norm(dim=1))).max())


def _by_name(variants: list[Variant], name: str) -> Variant:
    return next(v for v in variants if v.name == name)


def _listing(values: list[float]) -> str:
    return ", ".join(f"{v:g}" for v in values) if values else "(none)"


def _worst_ratio(fp: Fingerprint, verdicts: dict, variants: list[Variant]) -> float:
    """The largest factor between estimated and true deviation over the fc1-only variants."""
    worst = 1.0
    for v in variants:
        if v.name.startswith(("fc1 noise", "fc1: ", "pruned fc1")):
            est, true = verdicts[v.name].first_layer_deviation, _true_deviation(fp, v.model)
            if est is not None and true is not None and true > 1e-6:  # above the round-off floor
                worst = max(worst, est / true, true / est)
    return worst


def _roc(pos: np.ndarray, neg: np.ndarray, thr: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thresholds (log-spaced over the data, unless given) with the true- and false-accept
    rates of "stat <= thr"."""
    if thr is None:
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

    with one_torch_thread():
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
        stats: dict[str, list[float]] = {v.name: [] for v in variants}
        sames: dict[str, list[bool]] = {v.name: [] for v in variants}
        roundoff32, thresholds32 = [], []
        for i in range(n_fp):
            f = create_fingerprint(a, SHAPE, probes, k=k, generator=torch.Generator().manual_seed(1000 + i))
            roundoff32.append(f.roundoff["float32"])
            thresholds32.append(f.thresholds["float32"])
            for v in variants:
                verdict = verify_fingerprint(f, v.model, device=v.device)
                stats[v.name].append(verdict.statistic)
                sames[v.name].append(verdict.same)
        _log(f"{n_fp} fingerprints x {len(variants)} variants verified ({time.perf_counter() - start:.0f} s)")

        def pooled(values: dict[str, list], keep) -> np.ndarray:
            return np.array([x for v in variants if keep(v) for x in values[v.name]])

        def identical(v: Variant) -> bool:
            return v.category == "identical"

        def independent(v: Variant) -> bool:
            return v.category == "independent"

        def fc1_changed(v: Variant) -> bool:
            return v.fc1_changed
        pos, neg, chg = pooled(stats, identical), pooled(stats, independent), pooled(stats, fc1_changed)
        frr = 1 - float(pooled(sames, identical).mean())
        far = float(pooled(sames, independent).mean())
        far_changed = float(pooled(sames, fc1_changed).mean())
        thr_grid, tar, far_grid = _roc(pos, neg)
        _, tar_c, far_c = _roc(pos, chg, thr_grid)

        noise = [v for v in variants if v.name.startswith("fc1 noise")]
        noise_same = [float(v.name.split()[-1]) for v in noise if verdicts[v.name].same]
        noise_diff = [float(v.name.split()[-1]) for v in noise if not verdicts[v.name].same]

        # -- table ------------------------------------------------------------------------
        rows = []
        for v in variants:
            vd = verdicts[v.name]
            s = np.array(stats[v.name])
            est = "–" if vd.first_layer_deviation is None else f"{vd.first_layer_deviation:.2g}"
            true = _true_deviation(fp, v.model)
            acc = "-" if v.accuracy is None else f"{100 * v.accuracy:.2f}%"
            rows.append([v.name, v.category, acc, f"{vd.statistic:.3g}", f"{vd.threshold:.2g}",
                         "same" if vd.same else "different", est, "–" if true is None else f"{true:.2g}",
                         f"{vd.reference_deviation:.2g}", f"{s.min():.3g} / {s.max():.3g}",
                         f"{sum(sames[v.name])}/{len(s)}", v.note])
        table = Table(["variant", "category", "test acc.", "statistic", "threshold", "decision", "est. fc1 dev.",
                       "true fc1 dev.", "probe-output dev.", f"statistic min / max over {n_fp} fingerprints",
                       "'same' verdicts", "what it is"], rows)
        cmd = "harmless reproduce fig5" + (" --quick" if quick else "")
        seconds = time.perf_counter() - start
        text = f"""# Figure 5: model fingerprints from harmless perturbations

Model A: `mlp5:mnist` ({trained.weights_note}). Fingerprint: k = {k} harmless perturbations of A
(float64, exact: largest relative harmful residual {fp.harmful_residual:.1e}), each of L2 norm
{fp.magnitude:.1f} = {DEFAULT_MAGNITUDE_RATIO:g} x the largest of the {n_probes} probes' norms (the first {n_probes}
MNIST test images). Harmless subspace of A: dimension {fp.harmless_dim} (784 - 256).

Statistic: max over probes x and perturbations d of ||f(x+d) - f(x)|| / ||f(x)||, from the
suspect's outputs only (inputs sent in the suspect's parameter dtype). Decision: "same" iff
statistic <= threshold, where the threshold is **10 x the model's own statistic in the precision
the suspect is queried in**, measured when the fingerprint is made (this fingerprint: float32
round-off {fp.roundoff['float32']:.2g}, threshold **{fp.thresholds['float32']:.2g}**; float64 round-off
{fp.roundoff['float64']:.2g}, threshold {fp.thresholds['float64']:.2g}).

"test acc." is measured on the last {len(y_eval):,} MNIST test images (the probes are the first {n_probes}).
"est. fc1 dev." is the verdict's estimate of max_i ||A' d_i|| / (||A|| ||d_i||), how far the suspect's
linear prefix A' (Normalize, Flatten, fc1) moved along the fingerprint's directions (from the gain
of A's later layers, stored in the fingerprint); "true fc1 dev." is that quantity computed from the
suspect's weights (– where its fc1 is not a float linear layer).

## Variants (one fingerprint; then {n_fp} random fingerprints)

{table.markdown()}
"probe-output dev." is the secondary check: the largest relative difference between the suspect's
outputs on the probes and A's stored float64 outputs (not used for the decision).

## What "same" means, measured

"Same" means: along the fingerprint's directions, the suspect's first linear layer agrees with
A's to within about ten times float32 round-off. Measured here: the identical-function variants
(float32, copies, fc1 units permuted) are "same" in {int(pooled(sames, identical).sum())} of {len(pos)} trials
(FRR = {frr:.3f}); noise on fc1 of relative size {_listing(noise_same)} keeps "same", of size
{_listing(noise_diff)} gives "different"; one SGD step on fc1 (lr 1e-3; estimated deviation
{verdicts['fc1: 1 SGD step'].first_layer_deviation:.1g}, true {_true_deviation(fp, _by_name(variants, 'fc1: 1 SGD step').model):.1g})
is {'"same"' if verdicts['fc1: 1 SGD step'].same else '"different"'}. Every variant that changes fc1 by 1e-5 or more
is judged "same" in {int(pooled(sames, fc1_changed).sum())} of {len(chg)} trials (false accepts {far_changed:.3f});
independent models in {int(pooled(sames, independent).sum())} of {len(neg)} (FAR = {far:.3f}). Changes after fc1
(fc1 frozen, later layers pruned) stay "same": the fingerprint cannot see past a first layer that
annihilates it.

The deviation estimate assumes the suspect passes a change of its first layer's output on as A's
later layers do: it is within a factor {_worst_ratio(fp, verdicts, variants):.1f} of the truth for the variants that change
fc1 alone (noise, SGD steps on fc1, pruning fc1), bottoms out at round-off (about
{verdicts['A, float32'].first_layer_deviation:.0e} in float32), and is off where the later layers changed too
(fine-tuning all layers) or differ altogether (independent models): there it only says "large".

## Threshold and error rates

Calibration: the same model in float32 differs from float64 only by round-off of x + d and of
fc1's product, ~eps32 x ||d|| x (gain) / ||f(x)||: over {n_fp} random fingerprints its statistic
(measured at creation) ranged {min(roundoff32):.2g} ... {max(roundoff32):.2g}, so the thresholds ranged
{min(thresholds32):.2g} ... {max(thresholds32):.2g}; the largest identical-function statistic was
**{pos.max():.2g}**. Any model whose first layer does not annihilate d responds with ||A' d|| x (gain):
the smallest independent-model statistic was **{neg.min():.3g}**, and the smallest over variants that
change fc1 by 1e-5 or more **{chg.min():.3g}**. (Version 1 fingerprints, written before this calibration,
used one threshold, 1e-4 x ||d|| / max ||x|| = 0.01 at the default magnitude, under which a one-step
fine-tune of fc1 was still "same".)

ROC (`fig5_roc.png`): identical-function trials against independent models, and against variants
that change fc1 by 1e-5 or more.

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
  will after fc1 (freeze fc1), or evade it with a tiny change of fc1: one SGD step on fc1, or
  noise of relative size 1e-5, already gives "different". The fingerprint is exact but
  brittle: it identifies a first layer, not a lineage.
* The thresholds hold for queries in IEEE float32 / float64 arithmetic on a CPU; a suspect
  evaluated with reduced-precision kernels (TF32 convolutions on a GPU, float16) needs an
  explicit `--threshold`.
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
        fig_roc = _roc_figure(plt, variants, stats, (min(thresholds32), max(thresholds32)), thr_grid, tar, far_grid,
                              (tar_c, far_c), n_fp)
        out_dir.mkdir(parents=True, exist_ok=True)
        return [save_text(text, out_dir / "fig5.md"), save_figure(fig, out_dir / "fig5.png"),
                save_figure(fig_roc, out_dir / "fig5_roc.png")]


@torch.no_grad()
def _figure(plt, fp: Fingerprint, a: nn.Module, b: nn.Module, note: str):
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


def _roc_figure(plt, variants: list[Variant], stats: dict[str, list[float]],
                thr_range: tuple[float, float], thr_grid: np.ndarray, tar: np.ndarray, far: np.ndarray,
                changed: tuple[np.ndarray, np.ndarray], n_fp: int):
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.28 * len(variants) + 2.5), gridspec_kw={"width_ratios": [1.6, 1]})
    colors = {"identical": "tab:green", "derived": "tab:orange", "independent": "tab:red"}
    for i, v in enumerate(variants):
        s = np.maximum(np.array(stats[v.name]), 1e-18)
        axes[0].scatter(s, np.full(s.shape, i) + np.linspace(-0.2, 0.2, len(s)), s=10, color=colors[v.category],
                        label=v.category if v.category not in [w.category for w in variants[:i]] else None)
    axes[0].axvspan(*thr_range, color="k", alpha=0.25,
                    label=f"float32 thresholds {thr_range[0]:.1g}-{thr_range[1]:.1g}")
    axes[0].set_xscale("log")
    axes[0].set_yticks(range(len(variants)))
    axes[0].set_yticklabels([v.name for v in variants], fontsize=8)
    axes[0].invert_yaxis()
    axes[0].set_xlabel("statistic: max ||f(x+d) - f(x)|| / ||f(x)||  (floored at 1e-18)")
    axes[0].set_title(f"{n_fp} random fingerprints per variant")
    axes[0].legend(fontsize=8, loc="center left")  # the left middle is empty: nothing is hidden
    axes[1].plot(far, tar, marker=".", ms=3, label="vs independent models")
    axes[1].plot(changed[1], changed[0], marker=".", ms=3, label="vs fc1 changed by >= 1e-5")
    axes[1].legend(fontsize=7, loc="lower right")
    axes[1].set_xlabel("false accept rate (other models judged 'same')")
    axes[1].set_ylabel("true accept rate (identical function judged 'same')")
    axes[1].set_title("ROC over the threshold")
    axes[1].set_xlim(-0.02, 1.02)
    axes[1].set_ylim(-0.02, 1.02)
    ax2 = axes[1].inset_axes([0.45, 0.42, 0.5, 0.35])
    ax2.plot(thr_grid, 1 - tar, label="FRR")
    ax2.plot(thr_grid, far, label="FAR (independent)")
    ax2.plot(thr_grid, changed[1], label="FAR (fc1 changed)")
    ax2.axvspan(*thr_range, color="k", alpha=0.25)
    ax2.set_xscale("log")
    ax2.set_xlabel("threshold", fontsize=7)
    ax2.tick_params(labelsize=6)
    ax2.legend(fontsize=6)
    fig.tight_layout()
    return fig
