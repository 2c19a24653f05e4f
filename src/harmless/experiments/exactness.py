"""Table 1 (output RMSE under Gaussian, harmless and least harmful perturbations at
epsilon ... 32 epsilon) and Figure 3 (test accuracy against perturbation magnitude)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from harmless.experiments.common import (
    EPSILON,
    MULTIPLIERS,
    PerturbFn,
    Table,
    accuracy,
    batched_outputs,
    fmt,
    gaussian,
    harmless_perturbation,
    least_harmful_perturbation,
    output_rmse,
    provenance,
    save_figure,
    save_text,
)
from harmless.linalg.subspace import harmless_subspace

#: ResNet-50 with the ImageNet-style 7x7 stem at stride 6: overlapping windows (7 > 6) and
#: n = 3072 > m = 64 * 6 * 6 = 2304, so Corollary 1 applies and a harmless subspace exists.
CIFAR_SPEC = "resnet50:cifar10,stem_kernel=7,stem_stride=6"


@dataclass
class Subject:
    """A model under test, its data, and the perturbation families that exist for it."""

    label: str
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    trained: bool
    test_accuracy: float | None
    dim: int
    n: int
    kinds: dict[str, PerturbFn]
    weights_sha256: str | None = None


def load_subjects(*, quick: bool, data_dir: str | None = None, include_cifar: bool = True,
                  specs: tuple[str, ...] = ("mlp5:mnist", "mlp5:fashion-mnist", "lenet:mnist")) -> list[Subject]:
    """The trained MNIST/Fashion-MNIST models on their test sets, and a ResNet-50 (stem
    stride 8, so a subspace exists) on the real CIFAR-10 samples, all in float64."""
    from harmless.data import as_tensors, load_dataset
    from harmless.models import DATASETS, get_model, parse_spec

    todo = list(specs) + ([CIFAR_SPEC] if include_cifar else [])
    subjects = []
    for spec in todo:
        ms = parse_spec(spec)
        tm = get_model(spec, data_dir=data_dir)
        model = tm.model.double().eval()
        if ms.dataset == "cifar10":
            ds = load_dataset("cifar10", "test", data_dir=data_dir) if data_dir else load_dataset("foolbox-cifar10")
        else:
            ds = load_dataset(ms.dataset, "test")
        x, y = as_tensors(ds, torch.float64)
        if quick:
            x, y = x[:1000], y[:1000]
        shape = tuple(DATASETS[ms.dataset].in_shape)
        space = harmless_subspace(model, shape)
        kinds: dict[str, PerturbFn] = {"Gaussian noise": gaussian}
        if space.dim > 0:
            kinds["Harmless perturbation"] = harmless_perturbation(space)
        kinds["Least harmful perturbation"] = least_harmful_perturbation(model, shape, k=1)[0]
        where = "" if tm.trained else " (untrained weights)"
        subjects.append(Subject(label=f"{ms.key}{where}", model=model, x=x, y=y, trained=tm.trained,
                                test_accuracy=tm.test_accuracy, dim=space.dim, n=space.ambient_dim, kinds=kinds,
                                weights_sha256=tm.weights_sha256))
    return subjects


def rmse_rows(subject: Subject, *, seed: int = 0) -> dict[str, list[float]]:
    """RMSE at each of epsilon ... 32 epsilon for each perturbation kind."""
    clean = batched_outputs(subject.model, subject.x)
    rows = {}
    for kind, fn in subject.kinds.items():
        gen = torch.Generator().manual_seed(seed)
        rows[kind] = [output_rmse(subject.model, subject.x, fn(subject.x, EPSILON * k, gen), clean)
                      for k in MULTIPLIERS]
    return rows


def float32_harmless_rmse(subject: Subject, *, seed: int = 0) -> list[float] | None:
    """The same harmless perturbations, exact in float64, evaluated by the float32 model."""
    fn = subject.kinds.get("Harmless perturbation")
    if fn is None:
        return None
    model32 = _float32_copy(subject.model)
    x32 = subject.x.float()
    clean = batched_outputs(model32, x32)
    gen = torch.Generator().manual_seed(seed)
    return [output_rmse(model32, x32, fn(subject.x, EPSILON * k, gen).float(), clean) for k in MULTIPLIERS]


def _rms(t: torch.Tensor) -> float:
    return float(t.pow(2).mean().sqrt())


def _float32_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).float().eval()


def run_table1(out_dir: Path, *, quick: bool = False, data_dir: str | None = None) -> list[Path]:
    subjects = load_subjects(quick=quick, data_dir=data_dir)
    header = ["model", "perturbation"] + [f"{k}ε" if k > 1 else "ε" for k in MULTIPLIERS]
    rows = []
    for s in tqdm(subjects, desc="table1", disable=None):
        for kind, values in rmse_rows(s).items():
            rows.append([s.label, kind + " (float64)"] + [fmt(v) for v in values])
        f32 = float32_harmless_rmse(s)
        if f32 is not None:
            rows.append([s.label, "Harmless perturbation (float32 model)"] + [fmt(v) for v in f32])
        if s.dim == 0:
            rows.append([s.label, "Harmless perturbation", *(["none: injective prefix"] + [""] * 5)])
    cmd = "harmless reproduce table1" + (" --quick" if quick else "")
    desc = "\n".join(f"- {s.label}: {s.x.shape[0]} test images, harmless dim {s.dim} of {s.n}, "
                     f"clean logits RMS {_rms(batched_outputs(s.model, s.x)):.3g}"
                     + (f", test accuracy {100 * s.test_accuracy:.2f}%" if s.test_accuracy is not None else "")
                     + (f", checkpoint sha256 {s.weights_sha256[:12]}" if s.weights_sha256 else "")
                     for s in subjects)
    text = ("# Table 1: output RMSE of perturbed vs original inputs\n\n"
            f"RMSE = E_x[ ||f(x+δ) - f(x)|| / sqrt(n_out) ] on the logits; ε = {EPSILON} RMS per pixel "
            "(images in [0, 1]); every perturbation is rescaled to RMS kε. Harmless: random unit directions of "
            "the subspace; least harmful: the smallest non-zero right singular vector of the linear prefix "
            "(random sign); Gaussian: i.i.d. N(0, (kε)^2). Paper (ResNet-50, CIFAR-10): harmless 3.63e-15 ... "
            "8.55e-15.\n\n" + desc + "\n\n" + Table(header, rows).markdown() +
            "\nThe float32 row evaluates the same float64-exact perturbations with the float32 model: x + δ is "
            "rounded to float32, so the deviation grows with |δ| (about 6e-8 relative round-off per entry).\n"
            + provenance(cmd))
    out_dir.mkdir(parents=True, exist_ok=True)
    return [save_text(text, out_dir / "table1.md")]


FIG3_MAGNITUDES = (0.0, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6)


def run_fig3(out_dir: Path, *, quick: bool = False, data_dir: str | None = None) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    subjects = [s for s in load_subjects(quick=quick, data_dir=data_dir, include_cifar=False) if s.trained]
    kinds = ("Harmless perturbation", "Least harmful perturbation", "Gaussian noise")
    curves: dict[tuple[str, str], list[float]] = {}
    for s in tqdm(subjects, desc="fig3", disable=None):
        for kind, fn in s.kinds.items():
            gen = torch.Generator().manual_seed(0)
            curves[(s.label, kind)] = [accuracy(s.model, s.x + fn(s.x, r, gen) if r > 0 else s.x, s.y)
                                       for r in FIG3_MAGNITUDES]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), sharey=True)
    xs = [r if r > 0 else 0.02 for r in FIG3_MAGNITUDES]
    for ax, kind in zip(axes, kinds):
        for s in subjects:
            if (s.label, kind) in curves:
                ax.plot(xs, [100 * a for a in curves[(s.label, kind)]], marker="o", ms=3, label=s.label)
        ax.set_xscale("log")
        ax.set_title(kind)
        ax.set_xlabel("perturbation RMS per pixel (log; leftmost point: none)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[1].legend(fontsize=8)  # the least-harmful panel has every model
    fig.suptitle("Test accuracy vs perturbation magnitude (float64; LeNet's prefix is injective: no harmless curve)")
    header = ["model", "perturbation"] + [f"{r:g}" for r in FIG3_MAGNITUDES]
    rows = [[label, kind] + [f"{100 * a:.2f}" for a in accs] for (label, kind), accs in curves.items()]
    cmd = "harmless reproduce fig3" + (" --quick" if quick else "")
    models = "\n".join(f"- {s.label}: harmless dim {s.dim} of {s.n}"
                       + (f", checkpoint sha256 {s.weights_sha256[:12]}" if s.weights_sha256 else "")
                       for s in subjects)
    text = ("# Figure 3: test accuracy (%) against perturbation RMS magnitude\n\n"
            f"Images in [0, 1]; columns are the RMS per pixel of the perturbation; {subjects[0].x.shape[0]} test "
            "images per model.\n\n" + models + "\n\n" + Table(header, rows).markdown() + provenance(cmd))
    out_dir.mkdir(parents=True, exist_ok=True)
    return [save_text(text, out_dir / "fig3.md"), save_figure(fig, out_dir / "fig3.png")]

