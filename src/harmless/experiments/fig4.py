"""Figure 4: equivalent adversarial spaces, and how much of an attack the model cannot see.

On MLP-5 and the patchify CNN (``patchcnn``: its prefix is Normalize + a 4x4 stride-4 conv,
harmless dim 392 of 784), each on MNIST and Fashion-MNIST, over the first test images, for
FGSM and PGD (L∞ eps 0.1, L2 eps 1.5, PGD 20 steps), DeepFool, Carlini–Wagner L2 (on the first
``CW_IMAGES`` images only: it is the slowest), and Gaussian noise of the same per-sample L2 norm
as PGD-L2's perturbations:

* the harmless fraction ``ρ = ‖Pδ‖²/‖δ‖²`` of each perturbation
  (:func:`harmless.attacks.harmless_fraction`), with the attacks run twice: in the image box
  [0, 1] (the real attack) and without it (bounds ±1000, nothing clipped), which isolates what
  the box adds;
* the success rate at ``x + δ``, at ``x + δ⊥`` and at ``x + δ + s‖δ‖h`` for random harmless
  ``h`` (:func:`harmless.attacks.equivalent_check`), with the float64 output differences;
* the smallest equivalent adversarial example of every attack's x + δ
  (:class:`harmless.attacks.SmallestEquivalent`, L2 and L∞): the shrink ‖δ_min‖/‖δ‖ over the
  attack's successes, whether each success is kept, and the solvers' certificates;
* ``fig4.png``: images x, x+δ, x+δ⊥, x+δ+h with their predictions, ρ histograms, and the
  output change against the size of the added harmless (and, for contrast, random) part.

Everything runs on a float64 copy of the float32 checkpoint (its weights are exact float64
numbers), so that round-off is float64's and ρ ≈ 0 can be told from ρ = 1e-14.
``run(out_dir, quick=True)`` uses 50 images per model instead of 1,000 (C&W on 10, the smallest equivalents on 5 and 1);
``cases=`` injects other models and data (the tests use tiny untrained models).
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import harmless
from harmless.attacks import (
    FGSM,
    PGD,
    Attack,
    AttackResult,
    CarliniWagnerL2,
    DeepFool,
    EquivalenceReport,
    SmallestEquivalent,
    equivalent_check,
    harmless_fraction,
)
from harmless.experiments.common import Table, provenance, save_figure, save_text
from harmless.threads import one_torch_thread

SPECS = ("mlp5:mnist", "mlp5:fashion-mnist", "patchcnn:mnist", "patchcnn:fashion-mnist")
#: Images per model (full run / --quick), and how many of them C&W attacks.
IMAGES, QUICK_IMAGES = 1000, 50
CW_IMAGES, QUICK_CW_IMAGES = 200, 10
#: The smallest equivalents are solved image by image (an interior-point QP for L2, a HiGHS LP for
#: L∞), far slower than the attacks (measured on the shared 2-core machine: 0.35–1.1 s per image
#: for the QP, ~7 s for the LP), so they run on the first SHRINK_IMAGES images of each attack (L2)
#: and on the first LINF_IMAGES of the L2 attacks (L∞; for FGSM's one sign step, ‖δ‖∞ = eps is
#: already the L∞ minimum wherever the box does not cut it: Hölder, as the gradient is in the row space).
SHRINK_IMAGES, QUICK_SHRINK_IMAGES = 50, 5
LINF_IMAGES, QUICK_LINF_IMAGES = 5, 1
LINF_ATTACKS = ("FGSM L2 1.5", "PGD L2 1.5", "DeepFool", "C&W L2")
#: ‖h‖ = s‖δ‖ for the equivalent adversarial space.
SCALES = (10.0, 100.0, 1e4)
#: "No box": bounds far outside anything the attacks reach, so nothing is ever clipped.
FREE = (-1e3, 1e3)
#: The attack whose δ the figure shows and whose norms the noise copies.
PGD_L2 = "PGD L2 1.5"
NOISE = "Gaussian noise (L2 norm of PGD L2's δ)"


def _log(msg: str) -> None:
    print(f"  fig4: {msg}", file=sys.stderr, flush=True)


@dataclass
class Case:
    """A model and the test images to attack (``x`` in [0, 1], float64; ``y`` int64)."""

    name: str
    model: nn.Module  # float64, eval mode
    x: torch.Tensor
    y: torch.Tensor
    indices: list[int]  # test-set indices of x
    checksum: str | None = None  # weights SHA-256
    note: str = ""


@dataclass
class AttackRow:
    """One attack on one case: the box-constrained result, the unboxed one, the equivalence."""

    name: str
    rho: np.ndarray  # (B,) NaN where δ = 0
    rho_free: np.ndarray | None  # same attack without the box (None: noise, never clipped)
    success_free: float | None
    box_changed: np.ndarray | None  # (B,) bool: the box changed δ (δ differs from the unboxed attack's)
    l2: np.ndarray
    linf: np.ndarray
    report: EquivalenceReport
    seconds: float
    shrink: dict[str, Shrink] | None = None  # norm ("L2", "L∞") -> the smallest equivalent (attacks only)


@dataclass
class Shrink:
    """The smallest equivalent adversarial examples of one attack in one norm, summarised."""

    norm: str  # "L2" or "L∞"
    images: int  # the first `images` images of the case were considered
    ratio: np.ndarray  # ‖δ_min‖/‖δ‖ in that norm over the attack's successes (δ ≠ 0)
    other: np.ndarray  # the other norm's ratio at the same points (L∞ shrink of the L2 optimum ...)
    successes: int  # samples the attack fooled (with δ ≠ 0)
    kept: int  # of those, still fooled at x + δ_min
    bound: float  # the largest certificate: L2 distance bound to the optimum / L∞ optimality gap
    output_diff: float  # max relative float64 output difference f(x + δ_min) vs f(x + δ)
    residual: float  # max ‖A(x_min − x_adv)‖ / (‖A‖ max(1, ‖x_adv‖))
    converged: float  # fraction of the solves that reported convergence
    seconds: float


@dataclass
class CaseResult:
    case: Case
    space: harmless.HarmlessSubspace
    dim: int
    n: int
    rows: list[AttackRow]
    pgd_delta: torch.Tensor  # PGD L2's δ, for the figure
    curve_scales: np.ndarray
    curves: dict[str, np.ndarray]  # name -> (S,) median relative output change over samples
    seconds: float


AttackFactory = Callable[[tuple[float, float]], Attack]
CW = "C&W L2"


def attacks() -> list[tuple[str, AttackFactory]]:
    """The attacks of the figure: settings fixed here, bounds given per run (box or not). C&W
    (always in the box: its tanh reparametrisation *is* the box) runs on a subset only."""
    return [
        ("FGSM L∞ 0.1", lambda b: FGSM(0.1, "inf", bounds=b)),
        ("FGSM L2 1.5", lambda b: FGSM(1.5, 2, bounds=b)),
        ("PGD L∞ 0.1", lambda b: PGD(0.1, 20, "inf", random_start=True, bounds=b)),
        (PGD_L2, lambda b: PGD(1.5, 20, 2, random_start=False, bounds=b)),
        ("PGD L2 1.5, random start", lambda b: PGD(1.5, 20, 2, random_start=True, bounds=b)),
        ("DeepFool", lambda b: DeepFool(bounds=b)),
        (CW, lambda b: CarliniWagnerL2(steps=100, binary_search_steps=5, stepsize=0.05, initial_const=1.0,
                                       bounds=b)),
    ]


def zoo_cases(images: int, data_dir: str | None, specs: Sequence[str] = SPECS) -> list[Case]:
    """Zoo models (cached, or trained now), each on the first ``images`` test images of its data set."""
    from harmless.data import as_tensors, load_dataset
    from harmless.models import get_model, parse_spec

    out = []
    for spec in specs:
        tm = get_model(spec, data_dir=data_dir, progress=False)
        x, y = as_tensors(load_dataset(parse_spec(spec).dataset, "test", data_dir=data_dir), torch.float64)
        out.append(Case(spec, copy.deepcopy(tm.model).double().eval(), x[:images], y[:images],
                        list(range(min(images, len(y)))), tm.weights_sha256, tm.weights_note))
    return out


def _stats(v: np.ndarray) -> tuple[float, float, float, float, float, float]:
    """mean, median, q25, q75, min, max over the finite entries."""
    f = v[np.isfinite(v)]
    if f.size == 0:
        return (math.nan,) * 6
    return (float(f.mean()), float(np.median(f)), float(np.quantile(f, 0.25)), float(np.quantile(f, 0.75)),
            float(f.min()), float(f.max()))


def _relative(a: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (a - ref).norm(dim=1) / ref.norm(dim=1)


SHRINK_NORMS: dict[str, str | int] = {"L2": 2, "L∞": "inf"}


def smallest_equivalents(model: nn.Module, space: harmless.HarmlessSubspace, r: AttackResult, x: torch.Tensor,
                         y: torch.Tensor, solvers: dict[str, SmallestEquivalent],
                         limits: dict[str, int]) -> dict[str, Shrink]:
    """The smallest equivalent of every adversarial example the attack found (success, δ ≠ 0)
    among the first ``limits[norm]`` images, in each norm of ``solvers``."""
    fooled = r.success.cpu() & (r.l2.cpu() > 0)
    out: dict[str, Shrink] = {}
    for norm, solver in solvers.items():
        t = time.perf_counter()
        images = min(limits[norm], len(fooled))
        if images <= 0:
            continue
        idx = torch.nonzero(fooled[:images]).flatten()
        if idx.numel() == 0:
            nan = math.nan
            out[norm] = Shrink(norm, images, np.zeros(0), np.zeros(0), 0, 0, nan, nan, nan, nan, 0.0)
            continue
        sub = AttackResult(x_adv=r.x_adv[idx], delta=r.delta[idx], success=r.success[idx], y_pred=r.y_pred[idx],
                           logits=r.logits[idx], l2=r.l2[idx], linf=r.linf[idx])
        s = solver(model, space, sub, x[idx], y=y[idx])
        assert s.success_small is not None
        l2, linf = s.shrink_l2.numpy(), s.shrink_linf.numpy()
        out[norm] = Shrink(norm, images, l2 if norm == "L2" else linf, linf if norm == "L2" else l2, int(idx.numel()),
                           int(s.success_small.sum()), float(s.optimality_bound.max()), s.max_output_diff,
                           float(s.harmful_residual.max()), float(s.certificate.converged.double().mean()),
                           time.perf_counter() - t)
    return out


@torch.no_grad()
def measure(case: Case, *, seed: int = 0, cw_images: int = CW_IMAGES, shrink_images: int = SHRINK_IMAGES,
            linf_images: int = LINF_IMAGES) -> CaseResult:
    """Every attack on one case, boxed and unboxed (C&W: boxed only, on the first ``cw_images``
    images), ρ, the equivalence check and the smallest equivalents (L2: the first
    ``shrink_images`` images; L∞: the first ``linf_images`` of the :data:`LINF_ATTACKS`; 0 leaves
    it out)."""
    start = time.perf_counter()
    model, x, y = case.model, case.x, case.y
    shape = tuple(x.shape[1:])
    space = harmless.harmless_subspace(model, shape)
    solvers = {norm: SmallestEquivalent(norm=order) for norm, order in SHRINK_NORMS.items()}
    rows: list[AttackRow] = []
    pgd_delta: torch.Tensor | None = None
    for i, (name, make) in enumerate(attacks()):
        t = time.perf_counter()
        # The same seed for the boxed and the unboxed run: identical random starts, so any
        # difference between the two perturbations is the box's doing.
        if name == CW:
            xs, ys = x[:cw_images], y[:cw_images]
            boxed = make((0.0, 1.0))(model, xs, ys, generator=torch.Generator().manual_seed(seed + i))
            free = None
        else:
            xs, ys = x, y
            boxed = make((0.0, 1.0))(model, xs, ys, generator=torch.Generator().manual_seed(seed + i))
            free = make(FREE)(model, xs, ys, generator=torch.Generator().manual_seed(seed + i))
        rep = equivalent_check(model, space, xs, boxed, SCALES, y=ys,
                               generator=torch.Generator().manual_seed(100 + seed + i))
        limits = {"L2": shrink_images, "L∞": linf_images if name in LINF_ATTACKS else 0}
        shrink = smallest_equivalents(model, space, boxed, xs, ys, solvers, limits)
        _log(f"{case.name}: {name} on {len(ys)} images, {time.perf_counter() - t:.1f} s "
             f"(smallest equivalents {sum(v.seconds for v in shrink.values()):.1f} s)")
        if free is None:
            rows.append(AttackRow(name, rep.rho.numpy(), None, None, None, boxed.l2.numpy(), boxed.linf.numpy(), rep,
                                  time.perf_counter() - t, shrink))
        else:
            changed = (boxed.delta != free.delta).reshape(len(ys), -1).any(dim=1)
            rows.append(AttackRow(name, rep.rho.numpy(), harmless_fraction(space, free).numpy(),
                                  float(free.success_rate), changed.numpy(), boxed.l2.numpy(), boxed.linf.numpy(),
                                  rep, time.perf_counter() - t, shrink))
        if name == PGD_L2:
            pgd_delta = boxed.delta
    assert pgd_delta is not None
    # Noise of PGD-L2's per-sample norm, not clipped (x + noise may leave [0, 1]): ρ is a
    # property of the direction, and clipping would add the box's harmless part back in.
    t = time.perf_counter()
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1000), dtype=torch.float64)
    norms = pgd_delta.reshape(len(y), -1).norm(dim=1)
    noise = g * (norms / g.reshape(len(y), -1).norm(dim=1)).reshape(-1, *([1] * len(shape)))
    rep = equivalent_check(model, space, x, noise, SCALES, y=y, generator=torch.Generator().manual_seed(2000 + seed))
    flat = noise.reshape(len(y), -1)
    rows.append(AttackRow(NOISE, rep.rho.numpy(), None, None, None, flat.norm(dim=1).numpy(),
                          flat.abs().amax(dim=1).numpy(), rep, time.perf_counter() - t))

    # Output change against the size of an added part: harmless h for the attack and the noise,
    # a random (Gaussian) direction of the same size for contrast.
    curve_scales = np.logspace(-2, 4, 13)
    curves: dict[str, np.ndarray] = {}
    for label, d in ((f"{PGD_L2} + harmless h", pgd_delta), ("noise + harmless h", noise)):
        r = equivalent_check(model, space, x, d, tuple(float(s) for s in curve_scales),
                             generator=torch.Generator().manual_seed(3000 + seed))
        curves[label] = r.harmless_diff.median(dim=1).values.numpy()
    f_adv = model(x + pgd_delta)
    u = torch.randn(x.shape, generator=torch.Generator().manual_seed(4000 + seed), dtype=torch.float64)
    u = u / u.reshape(len(y), -1).norm(dim=1).reshape(-1, *([1] * len(shape)))
    rand = [float(_relative(model(x + pgd_delta + float(s) * norms.reshape(-1, *([1] * len(shape))) * u),
                            f_adv).median()) for s in curve_scales]  # 13 batched evaluations, not per sample
    curves[f"{PGD_L2} + random direction"] = np.array(rand)
    return CaseResult(case, space, space.dim, space.ambient_dim, rows, pgd_delta, curve_scales, curves,
                      time.perf_counter() - start)


# -- report -----------------------------------------------------------------------------------

def _e(v: float) -> str:
    return "–" if v is None or not math.isfinite(v) else (f"{v:.1e}" if v != 0 and abs(v) < 1e-3 else f"{v:.4f}")


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def rho_table(r: CaseResult) -> Table:
    rows = []
    for a in r.rows:
        mean, med, q25, q75, lo, hi = _stats(a.rho)
        free = _stats(a.rho_free) if a.rho_free is not None else None
        rows.append([a.name, str(int(np.isfinite(a.rho).sum())), _e(mean), _e(med), f"{_e(q25)} – {_e(q75)}",
                     f"{_e(lo)} – {_e(hi)}", "–" if a.box_changed is None else _pct(float(a.box_changed.mean())),
                     "–" if free is None else _e(free[1]), "–" if free is None else _e(free[5]),
                     f"{np.median(a.l2):.3f}", f"{np.median(a.linf):.3f}"])
    return Table(["perturbation", "samples (δ ≠ 0)", "ρ mean", "ρ median", "ρ quartiles", "ρ min – max",
                  "box changed δ", "ρ median, no box", "ρ max, no box", "median ‖δ‖₂", "median ‖δ‖∞"], rows)


def equivalence_table(r: CaseResult) -> Table:
    rows = []
    for a in r.rows:
        rates = a.report.success_rates
        assert rates is not None
        s, sp, sh = rates
        rows.append([a.name, _pct(s), _pct(a.success_free), _pct(sp)] + [_pct(v) for v in sh]
                    + [f"{a.report.max_perp_diff:.1e}"] + [f"{v:.1e}" for v in a.report.max_harmless_diff]
                    + [_pct(a.report.label_kept), _pct(float(a.report.perp_outside_box.double().mean())),
                       _pct(float(a.report.harmless_outside_box[0].double().mean()))])
    scales = [f"{s:g}" for s in SCALES]
    return Table(["perturbation", "success x+δ", "success, no box", "success x+δ⊥"]
                 + [f"success x+δ+h, ‖h‖={s}‖δ‖" for s in scales] + ["max rel. Δf, δ⊥"]
                 + [f"max rel. Δf, h {s}×" for s in scales] + ["label kept (all)", "x+δ⊥ outside [0,1]",
                                                                  f"x+δ+h ({scales[0]}×) outside [0,1]"], rows)


def shrink_table(r: CaseResult) -> Table:
    rows = []
    for a in r.rows:
        for norm, sh in (a.shrink or {}).items():
            _, med, q25, q75, lo, hi = _stats(sh.ratio)
            other = "L∞" if norm == "L2" else "L2"
            rows.append([a.name, norm, f"{sh.successes} (of the first {sh.images})", _e(med), f"{_e(q25)} – {_e(q75)}", f"{_e(lo)} – {_e(hi)}",
                         f"{other} {_e(float(np.median(sh.other))) if sh.other.size else '–'}",
                         f"{sh.kept}/{sh.successes}", f"{sh.bound:.1e}", f"{sh.output_diff:.1e}",
                         f"{sh.residual:.1e}", _pct(sh.converged), f"{sh.seconds:.1f}"])
    return Table(["perturbation", "nearest in", "adversarial examples (images)", "shrink median", "shrink quartiles",
                  "shrink min – max", "other norm's shrink (median)", "success kept", "certificate (max)",
                  "max rel. Δf", "max residual", "solver converged", "time (s)"], rows)


@torch.no_grad()
def _clean_error(r: CaseResult) -> float:
    return float((r.case.model(r.case.x).argmax(dim=1) != r.case.y).double().mean())


def _row(r: CaseResult, name: str) -> AttackRow:
    return next(a for a in r.rows if a.name == name)


def _summary(results: list[CaseResult]) -> str:
    """The prediction, checked on the numbers."""
    lines = []
    for r in results:
        pgd, df, noise = _row(r, PGD_L2), _row(r, "DeepFool"), _row(r, NOISE)
        fg = _row(r, "FGSM L∞ 0.1")
        assert pgd.rho_free is not None and df.rho_free is not None and fg.rho_free is not None
        assert pgd.box_changed is not None
        unclipped = pgd.rho[~pgd.box_changed]
        worst_perp = max(a.report.max_perp_diff for a in r.rows)
        worst_h = max(max(a.report.max_harmless_diff) for a in r.rows)
        kept = min(a.report.label_kept for a in r.rows)
        lines.append(
            f"- **{r.case.name}** (dim {r.dim} of n = {r.n}, dim/n = {r.dim / r.n:.4f}): unclipped gradient steps "
            f"have ρ ≈ 0 — PGD L2 without the box max ρ {_e(float(np.nanmax(pgd.rho_free)))}, DeepFool without "
            f"the box max {_e(float(np.nanmax(df.rho_free)))} (round-off: ‖Pδ‖/‖δ‖ ≤ "
            f"{math.sqrt(max(float(np.nanmax(pgd.rho_free)), float(np.nanmax(df.rho_free)))):.0e}); in the box, the box "
            f"changed PGD L2's δ on {_pct(float(pgd.box_changed.mean()))} of the samples and its median ρ is "
            f"{_e(float(np.nanmedian(pgd.rho)))} (unchanged samples: "
            f"{'none' if unclipped.size == 0 else 'max ρ ' + _e(float(np.nanmax(unclipped)))}); "
            f"sign steps add a harmless part even without the box (FGSM L∞, no box: median ρ "
            f"{_e(float(np.nanmedian(fg.rho_free)))}); noise: mean ρ {_e(float(np.nanmean(noise.rho)))} against "
            f"dim/n = {r.dim / r.n:.4f}. Equivalence: largest relative float64 output difference "
            f"{worst_perp:.1e} for δ⊥ and {worst_h:.1e} for δ + h (up to ‖h‖ = {max(SCALES):g}‖δ‖); labels kept on "
            f"{_pct(kept)} of the samples (worst perturbation).{_shrink_summary(r)}")
    return "\n".join(lines)


def _shrink_summary(r: CaseResult) -> str:
    parts = []
    for norm in SHRINK_NORMS:
        items = [(a.name, a.shrink[norm]) for a in r.rows if a.shrink and norm in a.shrink]
        if not items:
            continue
        lost = sum(sh.successes - sh.kept for _, sh in items)
        medians = ", ".join(f"{n} {_e(float(np.median(sh.ratio))) if sh.ratio.size else '–'}" for n, sh in items)
        parts.append(f"{norm}: median shrink {medians}; successes lost: {lost}, worst certificate "
                     f"{max(sh.bound for _, sh in items):.1e}")
    if not parts:
        return ""
    return " Smallest equivalent (‖δ_min‖/‖δ‖ over each attack's successes) — " + "; ".join(parts) + "."


def run(out_dir: Path, *, quick: bool = False, data_dir: str | None = None,
        cases: Sequence[Case] | None = None) -> list[Path]:
    """Run the experiment; write ``fig4.md`` and ``fig4.png`` to ``out_dir``. ``cases`` replaces
    the zoo models and test images (the command always uses :data:`SPECS`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    with one_torch_thread():
        start = time.perf_counter()
        images = QUICK_IMAGES if quick else IMAGES
        cw_images = QUICK_CW_IMAGES if quick else CW_IMAGES
        shrink_images = QUICK_SHRINK_IMAGES if quick else SHRINK_IMAGES
        linf_images = QUICK_LINF_IMAGES if quick else LINF_IMAGES
        todo = list(cases) if cases is not None else zoo_cases(images, data_dir)
        results = []
        for c in todo:
            results.append(measure(c, cw_images=cw_images, shrink_images=shrink_images, linf_images=linf_images))
            _log(f"{c.name}: {len(c.y)} images, {results[-1].seconds:.1f} s")
        per_case = 2 if len(results) <= 2 else 1  # four rows of images at most
        figure_samples = [(r, i) for r in results for i in _figure_indices(r, per_case)]
        fig = _figure(plt, results, figure_samples)
        seconds = time.perf_counter() - start
        cmd = "harmless reproduce fig4" + (" --quick" if quick else "")
        text = _markdown(results, figure_samples, seconds, quick) + provenance(cmd)
        out_dir.mkdir(parents=True, exist_ok=True)
        return [save_text(text, out_dir / "fig4.md"), save_figure(fig, out_dir / "fig4.png")]


def _figure_indices(r: CaseResult, k: int = 1) -> list[int]:
    """The first ``k`` samples that PGD L2 turned adversarial (else the first ``k``)."""
    ok = _row(r, PGD_L2).report.success
    assert ok is not None
    idx = [int(i) for i in torch.nonzero(ok).flatten()[:k]]
    return idx if len(idx) == k else list(range(min(k, len(r.case.y))))


def _verdict(results: list[CaseResult]) -> str:
    """Does the data agree with the prediction? Unboxed gradient steps ρ < 1e-20 (round-off), sign
    steps ρ > 0.01, noise within 0.02 of dim/n (for MLP-5 its mean over 1,000 draws has sd ~0.0008)."""
    ok = True
    for r in results:
        for a in r.rows:
            if a.name in (PGD_L2, "FGSM L2 1.5", "DeepFool") and a.rho_free is not None:
                ok &= bool(np.nanmax(a.rho_free) < 1e-20)
            if a.name.startswith(("FGSM L∞", "PGD L∞")) and a.rho_free is not None:
                ok &= bool(np.nanmin(a.rho_free) > 0.01)
        ok &= bool(abs(np.nanmean(_row(r, NOISE).rho) - r.dim / r.n) < 0.02)
    if not ok:
        return "**The prediction does not hold on every count: see the numbers above.**"
    return ("So the prediction holds: gradient directions are (to round-off) entirely harmful, and the harmless "
            "part of real attacks comes from the box and from sign steps; noise has ρ ≈ dim/n.")


def _clipping_line(results: list[CaseResult]) -> str:
    """Whether the box changed every perturbed sample, and δ⊥ kept every success: measured."""
    every = all(np.array_equal(a.box_changed, np.isfinite(a.rho)) for r in results for a in r.rows
                if a.box_changed is not None)
    same = all(torch.equal(a.report.success, a.report.perp_success) for r in results for a in r.rows
               if a.report.success is not None and a.report.perp_success is not None)
    worst = max(a.report.max_perp_diff for r in results for a in r.rows)
    box = ("the box changed the perturbation of every sample an attack perturbed (DeepFool leaves the samples "
           "the model already misclassifies at δ = 0, hence its lower \"box changed\" fraction)" if every else
           "the box changed some perturbations and not others (column \"box changed δ\")")
    return (f"{box}, and still f(x + δ⊥) = f(x + δ) to {worst:.1e} (relative, worst sample) and the success at "
            f"x + δ⊥ {'equals that at x + δ on every sample' if same else 'differs from that at x + δ on some samples'}.")


def _limit(results: list[CaseResult], norm: str) -> str:
    counts = sorted({a.shrink[norm].images for r in results for a in r.rows if a.shrink and norm in a.shrink})
    return "/".join(str(c) for c in counts) or "0"


def _cw_count(results: list[CaseResult]) -> str:
    counts = sorted({len(_row(r, CW).rho) for r in results})
    return "/".join(str(c) for c in counts)


def _markdown(results: list[CaseResult], samples: list[tuple[CaseResult, int]], seconds: float, quick: bool) -> str:
    parts = [f"""# Figure 4: equivalent adversarial spaces, and the harmless fraction of attacks

Theorems 3–5 of the paper: a perturbation δ acts on the model exactly like its harmful part
δ⊥ = (I − P)δ (P: the orthogonal projector onto the harmless subspace N(A) of the linear prefix),
so x + δ, x + δ⊥ and every x + δ + h with h ∈ N(A), of any size, give the same output: each
adversarial example has an unbounded *equivalent adversarial space*.

**Prediction, before measuring.** The input gradient of any loss is Aᵀ·(gradient at the output of
the linear prefix A: MLP-5's fc1, the patchify CNN's 4x4 stride-4 convolution, whose matrix is
block-diagonal, one 8 x 16 block per patch), so it lies in the row space of A: a plain gradient
step is entirely harmful, **ρ = ‖Pδ‖²/‖δ‖² ≈ 0**
for an unclipped L2 gradient attack (PGD L2 without a random start, FGSM L2, DeepFool). Two things
add a harmless part: the **sign** of a gradient (L∞ attacks) is not in the row space, and **box
clipping** to [0, 1] zeroes coordinates of the step (most MNIST pixels sit at 0, so a step that
pushes them below 0 is cut). A random start (uniform in the ball) is isotropic, and PGD's
projection onto the L2 ball only rescales, so it never removes that start's harmless part.
Isotropic **noise** should have ρ ≈ dim/n: 528/784 = 0.673 for MLP-5 and 392/784 = 0.5 for the
patchify CNN (its prefix is just Normalize + the patchify conv; nothing about the argument changes,
only the dimension). And, whatever ρ is, f(x + δ⊥) = f(x + δ + h) = f(x + δ) to float64
round-off. The **smallest equivalent** x + δ_min (the image in [0, 1] nearest x among all that the
model cannot tell from x + δ) can only shrink δ as far as the box allows: where the harmless part of
δ comes from clipping, it sits on pixels the box holds, so we expect little shrink in L2.

**Measured** (every attack run twice, with the seed shared: in the box [0, 1], and "no box"
with bounds ±1000 so that nothing is clipped; "box changed δ" is the fraction of samples whose
perturbation differs between the two runs):

{_summary(results)}

{_verdict(results)} Clipping does not
touch the equivalence: {_clipping_line(results)}
The rounding error of x + δ + h grows with ‖h‖ (~1e-16 · ‖h‖/‖x + δ‖), to at most
{max(a.report.max_harmless_diff[-1] for r in results for a in r.rows):.1e} at ‖h‖ = {SCALES[-1]:g}‖δ‖.

Set-up: attacks from `harmless.attacks`, run on a float64 copy of each float32 checkpoint (its
weights are exact float64 numbers, so nothing but float64 round-off separates the outputs); labels
are the true test labels; success = the prediction differs from the label (samples the model
already misclassifies count as successes, for every perturbation alike). FGSM L∞ eps 0.1, FGSM L2
eps 1.5; PGD L∞ eps 0.1 (20 steps, step 2.5·eps/20, random start); PGD L2 eps 1.5 (20 steps, no
random start, and again with one); DeepFool (L2, overshoot 0.02, ≤ 50 steps, 10 candidate
classes); C&W L2 (100 Adam steps of 0.05, 5 binary-search rounds from c = 1, on the first
{_cw_count(results)} images only: its 500 gradient steps per image are the slowest part); Gaussian noise rescaled per
sample to the L2 norm of PGD L2's (boxed) perturbation, not clipped. ρ from `harmless.attacks.harmless_fraction` (‖Pδ‖² measured directly, so ρ ≈ 0 is
resolved to ~1e-32); the equivalence from `harmless.attacks.equivalent_check`: h a random unit
vector of N(A) per sample and scale, ‖h‖ = s·‖δ‖ with s = {', '.join(f'{s:g}' for s in SCALES)}; "max rel. Δf" is
the largest ‖f(x+δ') − f(x+δ)‖/‖f(x+δ)‖ over the samples (float64 logits).

x + δ⊥ and x + δ + h leave [0, 1] (last two columns; δ⊥ wherever δ ≠ 0): the
equivalence is a statement about the linear prefix, which does not care about the image box; an
equivalent perturbation *inside* the box is the smallest equivalent of table (c).

The smallest equivalent, table (c): `harmless.attacks.SmallestEquivalent` on the adversarial
examples of each attack (success, δ ≠ 0; noise is left out, x + noise leaves the box) among the
first {_limit(results, "L2")} images in L2, and the first {_limit(results, "L∞")} in L∞ (the L2 attacks only: for FGSM L∞'s one sign step
‖δ‖∞ = eps is already the L∞ minimum wherever the box does not cut it, by Hölder's inequality with the
gradient, which is in the row space). Each is solved image by
image, far slower than the attacks (times in the last column), hence the subsets: **not** the
1,000 images of tables (a) and (b). **L2**: the QP
min ‖x' − x‖₂ over (x + δ + N(A)) ∩ [0, 1]ⁿ by the project's interior-point solver; its certificate
is a bound on the distance of x + δ_min to the exact optimum (from the duality gap). **L∞**: the LP
min ‖x' − x‖∞ over the same set, by HiGHS; its certificate bounds ‖δ_min‖∞ − min ‖δ'‖∞ (a Lagrangian
lower bound). "success kept": still misclassified at x + δ_min; "max rel. Δf": the largest
‖f(x + δ_min) − f(x + δ)‖/‖f(x + δ)‖ (float64); "max residual": ‖A(x + δ_min − x − δ)‖ relative
to ‖A‖ max(1, ‖x + δ‖); the shrink is at most 1 exactly (x + δ itself is feasible).
"""]
    for r in results:
        c = r.case
        idx = c.indices
        span = f"{idx[0]}–{idx[-1]}" if idx == list(range(idx[0], idx[-1] + 1)) else ", ".join(map(str, idx))
        sha = (c.checksum or "not saved")[:12]
        parts.append(f"""
## {c.name}

{len(c.y):,} test images (indices {span}); weights SHA-256 `{sha}…` ({c.note}); harmless subspace
dim {r.dim} of n = {r.n} (dim/n = {r.dim / r.n:.4f}); the model misclassifies {_pct(_clean_error(r))} of these
images unperturbed. Measured in {r.seconds:.1f} s.

### (a) Harmless fraction ρ = ‖Pδ‖²/‖δ‖²

{rho_table(r).markdown()}
### (b) Success and the equivalent adversarial space

{equivalence_table(r).markdown()}
### (c) The smallest equivalent adversarial example (‖δ_min‖/‖δ‖)

{shrink_table(r).markdown()}
Time per perturbation (boxed + unboxed attack, ρ, the equivalence check and the smallest equivalents): {', '.join(f'{a.name} {a.seconds:.1f} s'
                                                                                    for a in r.rows)}.
""")
    shown = ", ".join(f"{r.case.name} test image {r.case.indices[i]}" for r, i in samples)
    parts.append(f"""
## Figure

`fig4.png`: rows are {shown}. Columns: x, x + δ (PGD L2 1.5, in the box), x + δ⊥, x + δ + h
(‖h‖ = 100‖δ‖, harmless), each with its prediction and the relative change of its float64 logits
against x + δ (x + δ⊥ and x + δ + h are drawn on their own grey scale, their range in the title: they
leave [0, 1]). Bottom: histograms of ρ per perturbation (in the box), and the median relative output
change of x + δ + s‖δ‖u against x + δ over the samples, for u harmless (the attack's δ and the noise)
and for u a random direction.

Run time: {seconds:.0f} s on {os.cpu_count()} CPUs, one torch thread{f' (quick: {QUICK_IMAGES} images per model)' if quick else ''}.
""")
    return "".join(parts)


@torch.no_grad()
def _figure(plt, results: list[CaseResult], samples: list[tuple[CaseResult, int]]):
    import matplotlib.gridspec as gridspec

    rows = len(samples)
    fig = plt.figure(figsize=(13, 2.6 * rows + 3.6))
    gs = gridspec.GridSpec(rows + 1, 12, figure=fig, height_ratios=[1] * rows + [1.35])
    for row, (r, i) in enumerate(samples):
        c = r.case
        x, d = c.x[i:i + 1], r.pgd_delta[i:i + 1]
        space = r.space
        _, perp = space.decompose(d)
        h = space.sample(1, generator=torch.Generator().manual_seed(7 + i)) * 100 * d.norm()
        pts = [("x", x), ("x + δ (PGD L2)", x + d), ("x + δ⊥", x + perp), ("x + δ + h, ‖h‖=100‖δ‖", x + d + h)]
        f_adv = c.model(x + d)
        for col, (title, p) in enumerate(pts):
            ax = fig.add_subplot(gs[row, 3 * col:3 * col + 3])
            f = c.model(p)
            pred = int(f.argmax(dim=1))
            rel = float(_relative(f, f_adv)[0])
            img = p[0].mean(dim=0).numpy() if p.shape[1] > 1 else p[0, 0].numpy()
            lo, hi = (0.0, 1.0) if col < 2 else (float(img.min()), float(img.max()))
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
            extra = "" if col < 2 else f"\nshown on [{lo:.2g}, {hi:.2g}]"
            label = f" (label {int(c.y[i])})" if col == 0 else ""
            ax.set_title(f"{title}: pred {pred}{label}\nrel. Δf vs x+δ: {rel:.1e}{extra}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(f"{c.name}\n#{c.indices[i]}", fontsize=8)
    shown = results[:4]
    width = 8 // len(shown) if len(shown) > 1 else 6  # histograms left, the curves on the right
    for k, r in enumerate(shown):
        ax = fig.add_subplot(gs[rows, width * k:width * (k + 1)])
        bins = np.linspace(0, 1, 41)
        for a in r.rows:
            v = a.rho[np.isfinite(a.rho)]
            ax.hist(v, bins=bins, histtype="step", label=a.name, linewidth=1.2)
        ax.axvline(r.dim / r.n, color="k", linestyle=":", linewidth=1)
        ax.set_xlabel("ρ = ‖Pδ‖²/‖δ‖² (dotted: dim/n)", fontsize=8)
        ax.set_ylabel("samples", fontsize=8)
        ax.set_title(f"{r.case.name}: ρ, in the box", fontsize=8)
        ax.tick_params(labelsize=7)
        if k == 0:
            ax.legend(fontsize=6)
    ax = fig.add_subplot(gs[rows, width * len(shown):])
    for r, style in zip(shown, ("-", "--", ":", "-.")):
        for label, v in r.curves.items():
            ax.loglog(r.curve_scales, np.maximum(v, 1e-18), style, marker=".", label=f"{r.case.name}: {label}")
    ax.set_xlabel("s (size of the added part: s‖δ‖)", fontsize=8)
    ax.set_ylabel("median rel. change of f (float64)", fontsize=8)
    ax.set_title("adding harmless h: output unchanged (to round-off) at any size", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=5.5)
    fig.suptitle("Equivalent adversarial spaces on MLP-5 and the patchify CNN: x + δ, x + δ⊥ and x + δ + h are "
                 "one input to the model", fontsize=10)
    fig.tight_layout()
    return fig
