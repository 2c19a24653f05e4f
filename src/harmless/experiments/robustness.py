"""Robustness categories (seed 002: Moosavi-Dezfooli et al., "Universal adversarial
perturbations", CVPR 2017, as read by G. Wu, "The geometry of adversarial perturbations").

A classifier ``f`` and a radius ε; ``D`` the test distribution, ``B_ε`` the Lp ball:

1. ``∀I ∈ D, ∀Δ ∈ B_ε: f(I) = f(I + Δ)``   no small perturbation fools it (robust);
2. ``∀I ∈ D, ∃Δ ∈ B_ε: f(I) ≠ f(I + Δ)``   every image has its own adversarial perturbation;
3. ``∃Δ ∈ B_ε, ∀I ∈ D: f(I) ≠ f(I + Δ)``   one perturbation fools (most) images: universal;
4. ``∀I ∈ D, ∀Δ ∈ B_ε: f(I) ≠ f(I + Δ)``   every small perturbation fools it.

Measured on held-out test images, per ε (L∞ and L2 grids), with "fools" = the prediction
changes (the UAP paper's definition, against the clean prediction):

* ``r4``: flip rate of random perturbations of norm exactly ε (L∞: random signs ±ε, a corner of
  the ball; L2: a uniform direction), ``draws`` per image, over all (image, draw) pairs;
* ``r3``: held-out fooling rate of a universal perturbation crafted on *other* test images
  (the UAP paper's DeepFool algorithm and Shafahi et al.'s SGD; the one with the higher
  crafting-set fooling rate counts);
* ``r2``: success rate of per-sample attacks within ε (PGD, 40 steps, random start; DeepFool,
  whose perturbation counts where its norm is ≤ ε); an image counts if either succeeds;
* ``r1``: accuracy that survives all of them (correct, and fooled by none).

**Rule** (threshold ``TAU``): the model is in category 4 at ε if ``r4 ≥ τ``, else 3 if
``r3 ≥ τ``, else 2 if ``r2 ≥ τ``, else 1. The critical radius ``ε*`` of a rate is where it
first reaches τ (linear interpolation between grid points). Plus the correlation of the
decision-boundary normals (DeepFool directions) against random unit vectors, and the harmless
view of every UAP: ``ρ(v)`` and ``fooling(v)`` against ``fooling(v⊥)``, with and without the
box clipping.

``run(out_dir, quick=False)`` writes ``robustness.md`` and ``robustness.png``;
``harmless reproduce robustness``.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

import harmless
from harmless import validation
from harmless.attacks import PGD, DeepFool, SGDUniversal, UniversalPerturbation, UniversalResult, harmless_fraction
from harmless.attacks.base import check_images, check_norm
from harmless.errors import InputError
from harmless.experiments.common import Table, provenance, save_figure, save_text
from harmless.linalg.prefix import eval_mode
from harmless.threads import one_torch_thread

SPEC = "mlp5:mnist"
#: The category threshold: "almost every" / "most" read as a majority.
TAU = 0.5
#: A stricter reading of "almost every", reported beside it (ε* only).
TAU_STRICT = 0.9
GRIDS: dict[str | int, tuple[float, ...]] = {"inf": (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4),
                                             2: (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)}
QUICK_GRIDS: dict[str | int, tuple[float, ...]] = {"inf": (0.05, 0.1, 0.2, 0.3), 2: (1.0, 2.0, 4.0, 8.0)}
#: "No box": bounds nothing reaches, for the boundary normals (geometry, not an attack).
FREE = (-1e3, 1e3)
#: Further models, measured over the L∞ grid only (time): the PGD-adversarially-trained MLP-5
#: (used only when its checkpoint is cached: adversarial training is not started from here),
#: MLP-5 on Fashion-MNIST, LeNet and the patchify CNN on MNIST and Fashion-MNIST.
ADV_SPEC = "mlp5:mnist,adv_eps=0.1"
OTHER_SPECS = (ADV_SPEC, "mlp5:fashion-mnist", "lenet:mnist", "lenet:fashion-mnist", "patchcnn:mnist",
               "patchcnn:fashion-mnist")


def _log(msg: str) -> None:
    print(f"  robustness: {msg}", file=sys.stderr, flush=True)


def _norm_name(norm: str | int) -> str:
    return "L∞" if norm == "inf" else "L2"


@dataclass
class Settings:
    """Everything that sets the size of the run."""

    eval_images: int
    craft_images: int
    draws: int
    uap_passes: int
    sgd_steps: int
    sgd_batch: int
    pgd_steps: int = 40
    deepfool_steps: int = 50
    seed: int = 0
    #: Also craft an SGD UAP in the harmful subspace only (needs ``space``; not part of r3).
    harmful_uap: bool = True
    #: batch_size of the DeepFool UAP: 1 is the paper's algorithm exactly, more the documented
    #: mini-batch variant (faster; used for the further models).
    uap_batch: int = 1

    @classmethod
    def of(cls, quick: bool) -> Settings:
        if quick:
            return cls(eval_images=100, craft_images=100, draws=5, uap_passes=3, sgd_steps=100, sgd_batch=50)
        return cls(eval_images=1000, craft_images=300, draws=10, uap_passes=5, sgd_steps=300, sgd_batch=50)

    @classmethod
    def other(cls, quick: bool) -> Settings:
        """The further models: fewer images and passes, the DeepFool UAP in its mini-batch variant
        (16), so that the whole run (four models) stays within ~40 min on 2 cores shared with
        other jobs (about 9 min of CPU time in all)."""
        if quick:
            return replace(cls.of(True), uap_batch=16)
        return cls(eval_images=500, craft_images=200, draws=10, uap_passes=3, sgd_steps=300, sgd_batch=50,
                   uap_batch=16)


@dataclass
class UapView:
    """The harmless view of one universal perturbation, on the evaluation images (float64)."""

    name: str
    rho: float  # ‖Pv‖²/‖v‖²
    fool_v: float  # clip(x + v)
    fool_vperp: float  # clip(x + v⊥)
    fool_v_free: float  # x + v, no clipping
    fool_vperp_free: float  # x + v⊥, no clipping
    pred_mismatch_free: int  # images where f(x + v) and f(x + v⊥) disagree (expected 0)
    max_rel_diff_free: float  # max ‖f(x+v⊥) − f(x+v)‖/‖f(x+v)‖
    clipped_images: float  # fraction of images where clip(x + v) ≠ x + v
    clipped_images_perp: float
    clipped_pixels: float  # mean fraction of pixels clipped (x + v)
    kept: float  # mean ‖clip(x + v) − x‖ / ‖v‖


@dataclass
class EpsRow:
    eps: float
    random_flip: float  # r4, over (image, draw) pairs
    random_all: float  # images flipped by every draw
    random_any: float  # images flipped by at least one draw
    uap_df_craft: float
    uap_df_hold: float
    uap_df_passes: int
    uap_sgd_craft: float
    uap_sgd_hold: float
    uap_choice: str  # which UAP gives r3
    uap_rate: float  # r3
    pgd: float
    deepfool: float
    per_sample: float  # r2
    survive: float  # r1
    category: int
    views: list[UapView] = field(default_factory=list)
    seconds_uap: float = 0.0
    seconds_sgd: float = 0.0
    # SGD UAP crafted in the harmful subspace only (same settings; None: not measured).
    uap_harmful_craft: float | None = None
    uap_harmful_hold: float | None = None
    uap_harmful_rho: float | None = None


@dataclass
class ModelRun:
    """One further model over the L∞ grid (or why it was left out)."""

    spec: str
    dataset: str
    note: str = ""  # the checkpoint (weights_note)
    clean_acc: float | None = None
    harmless_dim: int | None = None
    result: NormResult | None = None
    skipped: str | None = None


@dataclass
class NormResult:
    norm: str | int
    rows: list[EpsRow]
    uaps: dict[float, UniversalResult]  # the UAP that gives r3, per ε (for the figure)
    seconds: float

    @property
    def eps(self) -> list[float]:
        return [r.eps for r in self.rows]


def category(r2: float, r3: float, r4: float, tau: float = TAU) -> int:
    """The rule: the least robust category whose rate reaches ``tau``; 1 if none does."""
    if r4 >= tau:
        return 4
    if r3 >= tau:
        return 3
    if r2 >= tau:
        return 2
    return 1


def critical_radius(eps: Sequence[float], rates: Sequence[float], tau: float, *,
                    falling: bool = False) -> tuple[float | None, str]:
    """The first ε at which ``rate ≥ tau`` (``≤ tau`` when ``falling``), linearly interpolated
    between the grid points around the crossing; ``(None, "> max")`` if never reached,
    ``(eps[0], "≤ min")`` if already reached at the first point."""
    def hit(r: float) -> bool:
        return r <= tau if falling else r >= tau
    for i, (e, r) in enumerate(zip(eps, rates)):
        if hit(r):
            if i == 0:
                return float(e), f"≤ {e:g}"
            e0, r0 = eps[i - 1], rates[i - 1]
            t = (tau - r0) / (r - r0) if r != r0 else 1.0
            return float(e0 + t * (e - e0)), f"{e0:g} – {e:g}"
    return None, f"> {eps[-1]:g}"


# -- measurements --------------------------------------------------------------------------------

@torch.no_grad()
def _pred(model: nn.Module, x: torch.Tensor, batch: int = 2000) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch]).argmax(dim=1) for i in range(0, x.shape[0], batch)])


def _random_directions(shape: tuple[int, ...], norm: str | int, gen: torch.Generator,
                       dtype: torch.dtype) -> torch.Tensor:
    """Unit-norm random directions: random signs (L∞) or normalised Gaussians (L2)."""
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    if norm == "inf":
        return g.sign().to(dtype)
    flat = g.reshape(shape[0], -1)
    return (g / flat.norm(dim=1).reshape(-1, *([1] * (len(shape) - 1)))).to(dtype)


@torch.no_grad()
def uap_view(name: str, model64: nn.Module, space: harmless.HarmlessSubspace, x64: torch.Tensor,
             v: torch.Tensor, bounds: tuple[float, float] = (0.0, 1.0)) -> UapView:
    """ρ of ``v``; fooling by ``v`` and by ``v⊥ = v − Pv``, clipped and unclipped (float64)."""
    lo, hi = bounds
    v64 = v.to(torch.float64)
    rho = float(harmless_fraction(space, v64)[0])
    _, vperp = space.decompose(v64)
    y0 = _pred(model64, x64)

    def fool(d: torch.Tensor, clip: bool) -> torch.Tensor:
        p = x64 + d
        return _pred(model64, p.clamp(lo, hi) if clip else p) != y0

    f_free, f_perp_free = model64(x64 + v64), model64(x64 + vperp)
    rel = (f_perp_free - f_free).norm(dim=1) / f_free.norm(dim=1)
    outside = ((x64 + v64) < lo) | ((x64 + v64) > hi)
    outside_p = ((x64 + vperp) < lo) | ((x64 + vperp) > hi)
    n = x64.shape[0]
    kept = ((x64 + v64).clamp(lo, hi) - x64).reshape(n, -1).norm(dim=1) / float(v64.norm())
    return UapView(name, rho, float(fool(v64, True).double().mean()), float(fool(vperp, True).double().mean()),
                   float(fool(v64, False).double().mean()), float(fool(vperp, False).double().mean()),
                   int((f_free.argmax(dim=1) != f_perp_free.argmax(dim=1)).sum()), float(rel.max()),
                   float(outside.reshape(n, -1).any(dim=1).double().mean()),
                   float(outside_p.reshape(n, -1).any(dim=1).double().mean()),
                   float(outside.reshape(n, -1).double().mean()), float(kept.mean()))


def check_grid(grid: object, name: str = "eps") -> tuple[float, ...]:
    """A non-empty ε grid of positive finite numbers, in increasing order (ε* interpolates along it)."""
    if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence) or len(grid) == 0:
        raise InputError(f"{name} must be a non-empty list of positive numbers, got {grid!r}")
    values = tuple(validation.positive_number(e, name) for e in grid)
    if list(values) != sorted(set(values)):
        raise InputError(f"{name} must be strictly increasing, got {', '.join(f'{e:g}' for e in values)}")
    return values


def measure_norm(model: nn.Module, x_eval: torch.Tensor, y_eval: torch.Tensor, x_craft: torch.Tensor,
                 norm: str | int, grid: Sequence[float], st: Settings, *,
                 model64: nn.Module | None = None, space: harmless.HarmlessSubspace | None = None,
                 log: Callable[[str], None] = _log, progress: bool | None = False) -> NormResult:
    """All four rates at every ε of ``grid`` in one norm, on the held-out ``x_eval`` (labels
    ``y_eval``; images in [0, 1], in the model's dtype), the UAPs crafted on ``x_craft`` (other
    images). ``space`` (the model's harmless subspace) adds a UAP crafted in the harmful subspace
    only; ``model64`` with it (a float64 copy) adds the harmless view of each UAP. ``progress``:
    a tqdm bar over the grid (None: only on a terminal). The model is measured in eval mode (a
    model in training mode is switched, with a warning, by the attacks; its flags are restored)."""
    norm = check_norm(norm)
    grid = check_grid(grid)
    x_eval = check_images(model, x_eval, (0.0, 1.0), "x_eval")
    x_craft = check_images(model, x_craft, (0.0, 1.0), "x_craft", tuple(x_eval.shape[1:]))
    y_eval = validation.labels(y_eval, x_eval.shape[0], "y_eval").to(x_eval.device)
    with eval_mode(model, who="measure_norm evaluates it", stacklevel=3):
        bar = tqdm(total=len(grid), desc=f"robustness {_norm_name(norm)}", unit="ε", file=sys.stderr,
                   disable=None if progress is None else not progress, leave=False)
        try:
            return _measure_norm(model, x_eval, y_eval, x_craft, norm, grid, st, model64, space, log, bar)
        finally:
            bar.close()


def _measure_norm(model: nn.Module, x_eval: torch.Tensor, y_eval: torch.Tensor, x_craft: torch.Tensor,
                  norm: str | int, grid: Sequence[float], st: Settings, model64: nn.Module | None,
                  space: harmless.HarmlessSubspace | None, log: Callable[[str], None], bar) -> NormResult:
    start = time.perf_counter()
    shape = tuple(x_eval.shape[1:])
    n = x_eval.shape[0]
    y0 = _pred(model, x_eval)
    correct = y0 == y_eval
    # DeepFool once: a minimum-norm attack, so success within ε is a threshold on its norm.
    df = DeepFool(steps=st.deepfool_steps)(model, x_eval, y0)
    df_norm = df.linf if norm == "inf" else df.l2
    rows: list[EpsRow] = []
    uaps: dict[float, UniversalResult] = {}
    x64 = None if model64 is None else x_eval.to(torch.float64)
    # A UAP in the harmful subspace only differs from the standard one when there is a harmless subspace.
    harmful_space = space if (st.harmful_uap and space is not None and space.dim > 0) else None
    for k, eps in enumerate(grid):
        bar.set_postfix_str(f"ε = {eps:g}")
        gen = torch.Generator().manual_seed(st.seed + 1000 * k + (0 if norm == "inf" else 500))
        # (a) random perturbations of norm eps: all draws in one batch (draw d of image i at d·n + i).
        dirs = _random_directions((st.draws * n,) + shape, norm, gen, x_eval.dtype).to(x_eval.device)
        xr = (x_eval.repeat(st.draws, *([1] * len(shape))) + eps * dirs).clamp(0.0, 1.0)
        flips = (_pred(model, xr) != y0.repeat(st.draws)).reshape(st.draws, n)
        # (b) universal perturbations crafted on other images, evaluated on these.
        t = time.perf_counter()
        ua = UniversalPerturbation(eps, norm, target_fooling=0.8, max_passes=st.uap_passes, batch_size=st.uap_batch)(
            model, x_craft, x_eval, generator=torch.Generator().manual_seed(st.seed + k))
        t_uap = time.perf_counter() - t
        t = time.perf_counter()
        us = SGDUniversal(eps, norm, steps=st.sgd_steps, batch_size=st.sgd_batch)(
            model, x_craft, x_eval, generator=torch.Generator().manual_seed(st.seed + k))
        t_sgd = time.perf_counter() - t
        uh = None
        if harmful_space is not None:
            # The same SGD, every update projected onto the harmful subspace (then into the ball).
            uh = SGDUniversal(eps, norm, steps=st.sgd_steps, batch_size=st.sgd_batch, subspace=harmful_space)(
                model, x_craft, x_eval, generator=torch.Generator().manual_seed(st.seed + k))
        assert ua.holdout_fooled is not None and us.holdout_fooled is not None
        # The UAP that counts is chosen on the crafting set (never on the held-out images).
        best, choice = (us, "SGD") if us.fooling_rate >= ua.fooling_rate else (ua, "DeepFool-UAP")
        uaps[eps] = best
        assert best.holdout_fooling_rate is not None
        # (c) per-sample attacks.
        pgd = PGD(eps, st.pgd_steps, norm)(model, x_eval, y0, generator=torch.Generator().manual_seed(st.seed + k))
        df_ok = df.success & (df_norm <= eps)
        per_sample = pgd.success | df_ok
        # (d) what survives everything: correct, and fooled by none of the above.
        fooled_any = flips.any(dim=0) | ua.holdout_fooled | us.holdout_fooled | per_sample
        survive = correct & ~fooled_any
        r4 = float(flips.double().mean())
        r3 = best.holdout_fooling_rate
        r2 = float(per_sample.double().mean())
        views = []
        if model64 is not None and space is not None and x64 is not None:
            views = [uap_view(f"DeepFool-UAP {_norm_name(norm)} {eps:g}", model64, space, x64, ua.v),
                     uap_view(f"SGD-UAP {_norm_name(norm)} {eps:g}", model64, space, x64, us.v)]
        rows.append(EpsRow(
            eps, r4, float(flips.all(dim=0).double().mean()), float(flips.any(dim=0).double().mean()),
            ua.fooling_rate, float(ua.holdout_fooling_rate or 0.0), ua.passes, us.fooling_rate,
            float(us.holdout_fooling_rate or 0.0), choice, r3, pgd.success_rate, float(df_ok.double().mean()),
            r2, float(survive.double().mean()), category(r2, r3, r4), views, t_uap, t_sgd,
            None if uh is None else uh.fooling_rate, None if uh is None else uh.holdout_fooling_rate,
            None if uh is None or harmful_space is None
            else float(harmless_fraction(harmful_space, uh.v.to(harmful_space.dtype))[0])))
        log(f"{_norm_name(norm)} eps {eps:g}: random {r4:.3f}, UAP {r3:.3f} ({choice}), per-sample {r2:.3f}, "
            f"survive {rows[-1].survive:.3f} -> category {rows[-1].category} "
            f"(DeepFool-UAP {t_uap:.1f} s, {ua.passes} passes; SGD {t_sgd:.1f} s)")
        bar.update(1)
    return NormResult(norm, rows, uaps, time.perf_counter() - start)


@dataclass
class Spectrum:
    """Singular values of N unit normals against N random unit vectors (σ_k / σ_1)."""

    normals: np.ndarray
    random: np.ndarray
    random_rowspace: np.ndarray | None  # random unit vectors of the row space of A (the harmful subspace)
    count: int  # N (DeepFool found a boundary for these images)
    n: int  # input dimension
    harmful_dim: int | None  # n − dim of the harmless subspace
    rank_normals: int  # σ_k > 1e-8 σ_1


@torch.no_grad()
def normals_spectrum(model64: nn.Module, x64: torch.Tensor, space: harmless.HarmlessSubspace | None,
                     seed: int = 0, steps: int = 50) -> Spectrum:
    """DeepFool (no box: the geometry of the boundaries, not an attack) from each image; its
    perturbation r is a sum of gradient steps toward the nearest boundary, r/‖r‖ the normal."""
    y0 = _pred(model64, x64)
    r = DeepFool(steps=steps, bounds=FREE)(model64, x64, y0)
    d = r.delta[r.success].reshape(int(r.success.sum()), -1)
    normals = d / d.norm(dim=1, keepdim=True)
    count, n = normals.shape
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn((count,) + tuple(x64.shape[1:]), generator=gen, dtype=torch.float64)

    def sv(m: torch.Tensor) -> np.ndarray:
        m = m.reshape(m.shape[0], -1)
        s = torch.linalg.svdvals(m / m.norm(dim=1, keepdim=True))
        return (s / s[0]).numpy()

    rowspace = None
    harmful_dim = None
    if space is not None:
        _, perp = space.decompose(g)
        rowspace = sv(perp)
        harmful_dim = space.ambient_dim - space.dim
    s_norm = sv(normals)
    return Spectrum(s_norm, sv(g), rowspace, count, n, harmful_dim, int((s_norm > 1e-8).sum()))


# -- the run ---------------------------------------------------------------------------------------

def run(out_dir: Path, *, quick: bool = False, data_dir: str | None = None) -> list[Path]:
    """MLP-5 on MNIST: the four rates over an L∞ and an L2 grid, the categories, ε*, the
    boundary-normal spectrum; writes ``robustness.md`` and ``robustness.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from harmless.data import as_tensors, load_dataset
    from harmless.models import get_model

    out_dir = Path(out_dir)
    with one_torch_thread():
        start = time.perf_counter()
        st = Settings.of(quick)
        grids = QUICK_GRIDS if quick else GRIDS
        tm = get_model(SPEC, data_dir=data_dir, progress=False)
        model = copy.deepcopy(tm.model).float().eval()
        model64 = copy.deepcopy(tm.model).double().eval()
        x, y = as_tensors(load_dataset("mnist", "test", data_dir=data_dir), torch.float32)
        # Evaluation images first, crafting images right after them: disjoint by construction.
        ev = (0, st.eval_images)
        cr = (st.eval_images, st.eval_images + st.craft_images)
        x_eval, y_eval = x[ev[0]:ev[1]], y[ev[0]:ev[1]]
        x_craft = x[cr[0]:cr[1]]
        space = harmless.harmless_subspace(model64, tuple(x.shape[1:]))
        results = [measure_norm(model, x_eval, y_eval, x_craft, norm, grids[norm], st, model64=model64, space=space,
                                progress=None)
                   for norm in ("inf", 2)]
        t = time.perf_counter()
        spec = normals_spectrum(model64, x_eval.double(), space, seed=st.seed)
        t_spec = time.perf_counter() - t
        with torch.no_grad():
            clean_acc = float((_pred(model, x_eval) == y_eval).double().mean())
        others = [_other_model(o, Settings.other(quick), grids["inf"], data_dir) for o in OTHER_SPECS]
        seconds = time.perf_counter() - start
        cmd = "harmless reproduce robustness --out results" + (" --quick" if quick else "")
        text = _markdown(results, spec, st, tm.weights_sha256, tm.weights_note, clean_acc, ev, cr, space,
                         seconds, t_spec, quick) + _others_markdown(others, results[0], Settings.other(quick)) + \
            provenance(cmd)
        fig = _figure(plt, results, spec, x_eval, model, others)
        out_dir.mkdir(parents=True, exist_ok=True)
        return [save_text(text, out_dir / "robustness.md"), save_figure(fig, out_dir / "robustness.png")]


def _other_model(spec: str, st: Settings, grid: Sequence[float], data_dir: str | None) -> ModelRun:
    """One further model over the L∞ grid: held-out test images 0..eval_images−1, UAPs crafted
    on the next craft_images; a model that cannot be had (not in this zoo, or the adversarially
    trained one not cached) is reported as left out, with the reason."""
    from harmless.data import as_tensors, load_dataset
    from harmless.errors import HarmlessError, NoHarmlessSubspaceError, TooLargeError
    from harmless.models import DATASETS, get_model, parse_spec

    try:
        ms = parse_spec(spec)
    except HarmlessError as exc:
        return ModelRun(spec, "?", skipped=f"not in this zoo ({exc})")
    dataset = DATASETS[ms.dataset].name
    # Only cached checkpoints: training (adversarial training above all) is not started from here.
    tm = get_model(spec, data_dir=data_dir, progress=False, train=False)
    if not tm.trained:
        return ModelRun(spec, dataset, skipped=f"no cached checkpoint when this ran (train it with "
                                               f"`harmless models train {spec}`, then re-run)")
    model = copy.deepcopy(tm.model).float().eval()
    x, y = as_tensors(load_dataset(dataset, "test", data_dir=data_dir), torch.float32)
    n, c = st.eval_images, st.craft_images
    space = None
    try:
        space = harmless.harmless_subspace(copy.deepcopy(tm.model).double().eval(), tuple(x.shape[1:]))
        dim: int | None = int(space.dim)
    except (NoHarmlessSubspaceError, TooLargeError):
        dim = None
    _log(f"{spec}: harmless subspace dim {dim}")
    res = measure_norm(model, x[:n], y[:n], x[n:n + c], "inf", grid, st, space=space, progress=None,
                       log=lambda m: _log(f"{spec}: {m}"))
    with torch.no_grad():
        acc = float((_pred(model, x[:n]) == y[:n]).double().mean())
    return ModelRun(spec, dataset, tm.weights_note, acc, dim, res)


# -- report ------------------------------------------------------------------------------------------

def _p(v: float) -> str:
    return f"{100 * v:.1f}%"


def _rates_table(r: NormResult) -> Table:
    rows = []
    for e in r.rows:
        rows.append([f"{e.eps:g}", _p(e.random_flip), _p(e.random_all), _p(e.random_any),
                     f"{_p(e.uap_df_hold)} ({_p(e.uap_df_craft)}, {e.uap_df_passes} p.)",
                     f"{_p(e.uap_sgd_hold)} ({_p(e.uap_sgd_craft)})", f"**{_p(e.uap_rate)}** ({e.uap_choice})",
                     _p(e.pgd), _p(e.deepfool), f"**{_p(e.per_sample)}**", f"**{_p(e.survive)}**",
                     f"**{e.category}**", _harmful_cell(e)])
    return Table(["ε", "r4 random flip (pairs)", "all draws flip", "any draw flips",
                  "DeepFool-UAP held-out (crafting, passes)", "SGD-UAP held-out (crafting)", "r3 UAP held-out",
                  "PGD", "DeepFool ≤ ε", "r2 per-sample", "r1 survives all", "category",
                  "SGD-UAP harmful subspace only: held-out (crafting; ρ)"], rows)


def _harmful_cell(e: EpsRow) -> str:
    if e.uap_harmful_hold is None or e.uap_harmful_craft is None:
        return "–"
    return f"{_p(e.uap_harmful_hold)} ({_p(e.uap_harmful_craft)}; {e.uap_harmful_rho:.0e})"


def _critical_table(results: list[NormResult]) -> Table:
    rows = []
    for r in results:
        eps = r.eps
        for label, rates, falling in (("r4 random flip", [e.random_flip for e in r.rows], False),
                                      ("r3 UAP held-out", [e.uap_rate for e in r.rows], False),
                                      ("r2 per-sample", [e.per_sample for e in r.rows], False),
                                      ("r1 survives all (falls to τ)", [e.survive for e in r.rows], True)):
            cells = [_norm_name(r.norm), label]
            for tau in (TAU, TAU_STRICT):
                tau_r1 = 1 - tau if falling else tau  # r1: robust accuracy falls below 1 − τ
                val, where = critical_radius(eps, rates, tau_r1, falling=falling)
                cells.append("not reached (" + where + ")" if val is None else f"{val:.3g} ({where})")
            rows.append(cells)
    return Table(["norm", "rate", f"ε* at τ = {TAU:g}", f"ε* at τ = {TAU_STRICT:g} (r1: 1 − τ)"], rows)


def _view_table(results: list[NormResult]) -> Table:
    rows = []
    for r in results:
        for e in r.rows:
            for v in e.views:
                rows.append([v.name, f"{v.rho:.3g}", _p(v.fool_v), _p(v.fool_vperp), _p(v.fool_v_free),
                             _p(v.fool_vperp_free), str(v.pred_mismatch_free), f"{v.max_rel_diff_free:.1e}",
                             _p(v.clipped_images), _p(v.clipped_images_perp), _p(v.clipped_pixels), f"{v.kept:.3f}"])
    return Table(["UAP", "ρ(v)", "fooling clip(x+v)", "fooling clip(x+v⊥)", "fooling x+v (no clip)",
                  "fooling x+v⊥ (no clip)", "images f(x+v) ≠ f(x+v⊥)", "max rel. Δf, v⊥ vs v",
                  "images clipped, x+v", "images clipped, x+v⊥", "pixels clipped, x+v",
                  "mean ‖clip(x+v)−x‖/‖v‖"], rows)


def _view_verdict(results: list[NormResult]) -> str:
    """What the harmless-view table shows, computed from it."""
    views = [v for r in results for e in r.rows for v in e.views]
    if not views:
        return ""
    mismatch = sum(v.pred_mismatch_free for v in views)
    worst = max(v.max_rel_diff_free for v in views)
    differ = [v for v in views if v.fool_v != v.fool_vperp]
    clipped = min(v.clipped_images for v in views)
    gap = max(abs(v.fool_v - v.fool_vperp) for v in views)
    rhos = [v.rho for v in views]
    return (f"Without clipping, v and v⊥ change the prediction of {'exactly the same images' if mismatch == 0 else f'different images ({mismatch} in all)'} "
            f"for all {len(views)} UAPs (logits agree to {worst:.1e}, relative). ρ(v) ranges from {min(rhos):.3g} to "
            f"{max(rhos):.3g}. With clipping, x + v leaves [0, 1] on at least {_p(clipped)} of the images for every UAP, "
            f"and the clipped fooling rates of v and v⊥ differ for {len(differ)} of the {len(views)} UAPs (by up to "
            f"{100 * gap:.1f} points): the harmless part of a UAP changes what it does only through the box.")


def _summary(results: list[NormResult]) -> str:
    lines = []
    for r in results:
        cats = ", ".join(f"{e.eps:g} → {e.category}" for e in r.rows)
        lines.append(f"- **{_norm_name(r.norm)}**: category per ε: {cats}.")
    return "\n".join(lines)


def _spectrum_lines(s: Spectrum) -> str:
    ks = [k for k in (1, 10, 50, 100, 200, 256, 300) if k <= len(s.normals)]

    def at(a: np.ndarray | None, k: int) -> str:
        return "–" if a is None or k > len(a) else f"{a[k - 1]:.2e}"
    t = Table(["k"] + [str(k) for k in ks],
              [["DeepFool normals"] + [at(s.normals, k) for k in ks],
               ["random unit vectors (R^n)"] + [at(s.random, k) for k in ks],
               ["random unit vectors of the row space of A"] + [at(s.random_rowspace, k) for k in ks]])
    hd = "" if s.harmful_dim is None else (
        f" The normals' numerical rank (σ_k > 1e-8 σ_1) is {s.rank_normals}, at most n − dim = "
        f"{s.harmful_dim}: every DeepFool step is a combination of input gradients, which lie in the row "
        "space of the first layer A (the harmless subspace is invisible to them), so the normals live in "
        f"that {s.harmful_dim}-dimensional subspace. The row-space baseline separates this forced "
        "correlation from the correlation the UAP paper measures.")
    # The claim is computed, not assumed: below both baselines at every k from 2 up to the normals'
    # numerical rank (beyond it their σ_k are round-off, and a comparison there says nothing).
    m = min(len(s.normals) - 1, s.rank_normals if s.rank_normals else len(s.normals) - 1)
    below = bool(np.all(s.normals[1:m] < s.random[1:m]))
    below_row = s.random_rowspace is None or bool(np.all(s.normals[1:m] < s.random_rowspace[1:m]))
    if below and below_row:
        verdict = (f"The normals' σ_k/σ_1 lie below both random baselines at every k from 2 to {m} (their "
                   "numerical rank; beyond it they are round-off): the boundary orientations near the data are "
                   "correlated (a few directions carry most of them), more than the restriction to the row "
                   "space alone explains.")
    else:
        verdict = (f"The normals' σ_k/σ_1 are {'' if below else 'not '}below the R^n baseline at every k from 2 "
                   f"to {m} and {'' if below_row else 'not '}below the row-space baseline there (see the table).")
    return f"{s.count} normals (n = {s.n}); σ_k/σ_1:\n\n{t.markdown()}\n{verdict}{hd}"


def _markdown(results: list[NormResult], spec: Spectrum, st: Settings, sha: str | None, note: str, clean_acc: float,
              ev: tuple[int, int], cr: tuple[int, int], space: harmless.HarmlessSubspace, seconds: float,
              t_spec: float, quick: bool) -> str:
    parts = [f"""# Robustness categories of MLP-5 (MNIST): random, universal and per-sample perturbations

Seed 002 (G. Wu on Moosavi-Dezfooli et al., *Universal adversarial perturbations*, CVPR 2017):
four categories, from most to least robust, for a radius ε and B_ε the Lp ball:

1. ∀I ∈ D, ∀Δ ∈ B_ε: f(I) = f(I + Δ)  (no small perturbation fools it);
2. ∀I ∈ D, ∃Δ ∈ B_ε: f(I) ≠ f(I + Δ)  (each image has its own);
3. ∃Δ ∈ B_ε, ∀I ∈ D: f(I) ≠ f(I + Δ)  (one universal perturbation);
4. ∀I ∈ D, ∀Δ ∈ B_ε: f(I) ≠ f(I + Δ)  (every small perturbation).

**Measured rates** on held-out test images, "fools" = the prediction changes (against the clean
prediction, the UAP paper's fooling rate; x + Δ clipped to [0, 1]):
r4 = flip rate of random Δ with ‖Δ‖ = ε ("∀Δ": the fraction of (image, draw) pairs), r3 = held-out
fooling rate of one Δ crafted on other images ("∃Δ ∀I"), r2 = success rate of per-sample attacks
("∀I ∃Δ": PGD or DeepFool within ε), r1 = accuracy surviving all of them ("∀I ∀Δ: no change", on
correctly classified images).

**Rule** (τ = {TAU:g}, "almost every"/"most" read as a majority): category 4 if r4 ≥ τ, else 3 if
r3 ≥ τ, else 2 if r2 ≥ τ, else 1. ε* of a rate is the first radius at which it reaches τ (linear
interpolation between the grid points that bracket the crossing); for r1, where it falls to 1 − τ.
The same with the strict τ = {TAU_STRICT:g} is listed for comparison (it is not the rule).

{_summary(results)}

## Set-up

Model `{SPEC}`: {note}; float32 for every rate, a float64
copy for the harmless view and the normals; clean accuracy on the evaluation images {_p(clean_acc)}.
Evaluation (held-out) images: MNIST test indices {ev[0]}–{ev[1] - 1}; crafting images for the UAPs:
test indices {cr[0]}–{cr[1] - 1} (disjoint). Random perturbations: {st.draws} draws per image and ε
(L∞: independent random signs, Δ = ±ε per pixel, a corner of the ball; L2: a uniform direction of
norm ε). UAPs per ε: `UniversalPerturbation(ε, norm, target_fooling=0.8, max_passes={st.uap_passes},
overshoot=0.02, deepfool_steps=10)` (the UAP paper's algorithm, exact: batch_size 1) and
`SGDUniversal(ε, norm, steps={st.sgd_steps}, batch_size={st.sgd_batch}, lr=ε/10, clamp_loss=10)`; r3 takes the one with
the higher crafting-set fooling rate. Per-sample: `PGD(ε, {st.pgd_steps}, norm)` (random start, step 2.5ε/{st.pgd_steps})
and `DeepFool(steps={st.deepfool_steps})` (L2, minimum norm: counted where its L∞ resp. L2 norm is ≤ ε), against
the clean prediction. Seeds fixed (0 and offsets per ε). Harmless subspace of the first layer: dim
{space.dim} of n = {space.ambient_dim}.

**A UAP in the harmful subspace only** (last column, not part of r3): the same SGD, with every update
projected onto the row space of the first layer A (`SGDUniversal(..., subspace=space)`: v ← (I − P)v,
then into the ball). In L2 the ball step rescales, which stays in the subspace (the exact projection
onto subspace ∩ ball); in L∞ clipping would leave the subspace, so the harmful part is scaled into the
ball instead: v is harmful-only to round-off (ρ in the column), but a scaled-down L∞ vector is far
from the ball's corners, where the standard sign-step UAP lives, and so fools much less at the same ε.
"""]
    for r in results:
        parts.append(f"""
## {_norm_name(r.norm)}

{_rates_table(r).markdown()}
(Bold: the four rates and the category. "all draws flip"/"any draw flips": images flipped by every /
by at least one of the {st.draws} random draws. UAP columns: held-out fooling rate, in brackets the
crafting-set rate and the passes used.) Measured in {r.seconds:.0f} s (DeepFool-UAP
{sum(e.seconds_uap for e in r.rows):.0f} s, SGD-UAP {sum(e.seconds_sgd for e in r.rows):.1f} s over the grid).
""")
    parts.append(f"""
## Critical radii ε*

{_critical_table(results).markdown()}
## The harmless view of the UAPs

For each crafted v: ρ(v) = ‖Pv‖²/‖v‖² (P: projector onto the harmless subspace of the first layer),
and the fooling rate on the evaluation images of v and of its harmful part v⊥ = v − Pv, with the
box clipping (what an image can carry) and without it (the linear-algebra statement: f(x + v) =
f(x + v⊥) exactly). Float64. "images clipped": the fraction of images where x + v (x + v⊥) leaves
[0, 1] somewhere, so that clipping changes the perturbation.

{_view_table(results).markdown()}
{_view_verdict(results)}

## Correlation of the decision-boundary normals

DeepFool (no box, ≤ 50 steps) from each evaluation image; its perturbation r is the route to the
nearest boundary and r/‖r‖ the boundary normal there (the UAP paper's Fig. 8 construction).
{_spectrum_lines(spec)} ({t_spec:.1f} s.)

## Figure

`robustness.png`: the four rates against ε (L∞, L2; grey: the harmful-subspace-only UAP) over the
category bands given by the rule, for MLP-5 on MNIST and (second row) the further models below; the
singular values σ_k/σ_1 of the normals against random unit vectors; the L∞ UAP that gives r3 at ε =
0.2 with held-out images it fools (clip(x + v), predicted class before → after).

Run time (all models): {seconds:.0f} s on {os.cpu_count()} CPUs shared with other jobs, one torch thread{' (quick: 100 evaluation and 100 crafting images, coarse grid)' if quick else ''}.
""")
    return "".join(parts)


def _others_markdown(others: list[ModelRun], main: NormResult, st: Settings) -> str:
    done = [o for o in others if o.result is not None]
    parts = [f"""
## More models (L∞)

The same measurements over the L∞ grid for further zoo models, with {st.eval_images} held-out test images
(indices 0–{st.eval_images - 1} of each model's own test set), UAPs crafted on the next {st.craft_images},
{st.draws} random draws, `UniversalPerturbation(max_passes={st.uap_passes}, batch_size={st.uap_batch})` (the
documented mini-batch variant, for time), the same SGD, PGD and DeepFool settings as above. The MLP-5
on MNIST column repeats the L∞ categories above.

"""]
    for o in others:
        if o.result is None:
            parts.append(f"- `{o.spec}`: left out: {o.skipped}.\n")
        else:
            hd = "no harmless subspace measured" if o.harmless_dim is None else f"harmless subspace dim {o.harmless_dim}"
            parts.append(f"- `{o.spec}`: {o.note}; clean accuracy on the held-out images "
                         f"{_p(o.clean_acc or 0.0)}; {hd}.\n")
    if not done:
        return "".join(parts)
    grid = main.eps
    head = ["ε", f"`{SPEC}`"] + [f"`{o.spec}`" for o in done]
    rows = []
    for i, e in enumerate(grid):
        cells = [f"{e:g}", str(main.rows[i].category)]
        for o in done:
            assert o.result is not None
            cells.append(str(o.result.rows[i].category))
        rows.append(cells)
    parts.append(f"\nCategory per ε (rule as above, τ = {TAU:g}):\n\n{Table(head, rows).markdown()}")
    for o in done:
        assert o.result is not None
        r = o.result
        t = Table(["ε", "r4 random flip", "r3 UAP held-out", "r2 per-sample", "r1 survives all", "category",
                   "SGD-UAP harmful subspace only: held-out (crafting; ρ)"],
                  [[f"{e.eps:g}", _p(e.random_flip), f"{_p(e.uap_rate)} ({e.uap_choice})", _p(e.per_sample),
                    _p(e.survive), f"**{e.category}**", _harmful_cell(e)] for e in r.rows])
        crit = []
        for label, rates, falling in (("r3", [e.uap_rate for e in r.rows], False),
                                      ("r2", [e.per_sample for e in r.rows], False),
                                      ("r1", [e.survive for e in r.rows], True)):
            val, where = critical_radius(r.eps, rates, 1 - TAU if falling else TAU, falling=falling)
            crit.append(f"{label} {'not reached (' + where + ')' if val is None else f'{val:.3g} ({where})'}")
        parts.append(f"\n### `{o.spec}`\n\n{t.markdown()}ε* (τ = {TAU:g}): {'; '.join(crit)}. "
                     f"Measured in {r.seconds:.0f} s.\n")
    return "".join(parts)


_BAND = {1: "#d8f0d8", 2: "#fff2c0", 3: "#ffd8b0", 4: "#f8c0c0"}


def _rates_axes(ax, r: NormResult, title: str, legend: bool = True) -> None:
    eps = np.array(r.eps)
    # Category bands: each grid point's category from its midpoint to the next.
    edges = np.concatenate([[eps[0]], (eps[1:] + eps[:-1]) / 2, [eps[-1]]])
    for i, e in enumerate(r.rows):
        ax.axvspan(edges[i], edges[i + 1], color=_BAND[e.category], alpha=0.8, linewidth=0)
        ax.text((edges[i] + edges[i + 1]) / 2, 1.03, str(e.category), ha="center", fontsize=8)
    for label, vals, style in (("r4 random flip", [e.random_flip for e in r.rows], "o-"),
                               ("r3 UAP held-out", [e.uap_rate for e in r.rows], "s-"),
                               ("r2 per-sample (PGD ∪ DeepFool)", [e.per_sample for e in r.rows], "^-"),
                               ("r1 survives all", [e.survive for e in r.rows], "v--")):
        ax.plot(eps, vals, style, label=label, markersize=4)
    harmful = [e.uap_harmful_hold for e in r.rows]
    if all(h is not None for h in harmful):
        ax.plot(eps, harmful, "x:", color="grey", label="UAP, harmful subspace only", markersize=4)
    ax.axhline(TAU, color="k", linestyle=":", linewidth=1)
    ax.set_ylim(-0.02, 1.08)
    ax.set_xlabel(f"ε ({_norm_name(r.norm)}, image units [0, 1])", fontsize=9)
    ax.set_ylabel("rate", fontsize=9)
    ax.set_title(title, fontsize=9)
    if legend:
        ax.legend(fontsize=7, loc="center right")


def _figure(plt, results: list[NormResult], spec: Spectrum, x_eval: torch.Tensor, model: nn.Module,
            others: Sequence[ModelRun] = ()):
    done = [o for o in others if o.result is not None]
    rows = 3 if done else 2
    fig = plt.figure(figsize=(15, 4 * rows))
    gs = fig.add_gridspec(rows, 6)
    for k, r in enumerate(results):
        _rates_axes(fig.add_subplot(gs[0, 3 * k:3 * k + 3]), r,
                    f"MLP-5 MNIST, {_norm_name(r.norm)}: rates and category (bands; τ = {TAU:g} dotted)")
    for k, o in enumerate(done[:3]):
        assert o.result is not None
        _rates_axes(fig.add_subplot(gs[1, 2 * k:2 * k + 2]), o.result, f"{o.spec}, L∞", legend=False)
    last = rows - 1
    ax = fig.add_subplot(gs[last, :2])
    ax.semilogy(np.arange(1, len(spec.normals) + 1), np.maximum(spec.normals, 1e-17),
                label=f"DeepFool normals ({spec.count} images)")
    ax.semilogy(np.arange(1, len(spec.random) + 1), spec.random, label="random unit vectors in R^n")
    if spec.random_rowspace is not None:
        ax.semilogy(np.arange(1, len(spec.random_rowspace) + 1), np.maximum(spec.random_rowspace, 1e-17),
                    label="random unit vectors of the row space of A")
    if spec.harmful_dim is not None:
        ax.axvline(spec.harmful_dim, color="k", linestyle=":", linewidth=1)
    ax.set_xlabel("k", fontsize=9)
    ax.set_ylabel("σ_k / σ_1", fontsize=9)
    ax.set_title("decision-boundary normals vs random directions (dotted: rank of A)", fontsize=9)
    ax.legend(fontsize=7)
    # The L∞ UAP nearest ε = 0.2 and held-out images it fools, with their predictions before → after.
    r = results[0]
    xi = min(r.eps, key=lambda e: abs(e - 0.2))
    u = r.uaps[xi]
    sub = gs[last, 2:].subgridspec(1, 5)
    ax = fig.add_subplot(sub[0, 0])
    lim = float(u.v.abs().max())
    ax.imshow(u.v[0, 0].cpu().numpy(), cmap="seismic", vmin=-lim, vmax=lim)
    ax.set_title(f"UAP L∞ ξ = {xi:g}\nheld-out fooling {_p(u.holdout_fooling_rate or 0.0)}", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    assert u.holdout_fooled is not None
    fooled = torch.nonzero(u.holdout_fooled.cpu()).flatten()[:4]
    with torch.no_grad():
        xs = x_eval[fooled]
        xa = (xs + u.v).clamp(0.0, 1.0)
        before, after = _pred(model, xs).tolist(), _pred(model, xa).tolist()
    for j in range(len(fooled)):
        ax = fig.add_subplot(sub[0, j + 1])
        ax.imshow(xa[j, 0].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"test #{int(fooled[j])}: {before[j]} → {after[j]}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Robustness categories: random < universal < per-sample perturbations", fontsize=10)
    fig.tight_layout()
    return fig


__all__ = ["ADV_SPEC", "GRIDS", "OTHER_SPECS", "QUICK_GRIDS", "TAU", "EpsRow", "ModelRun", "NormResult", "Settings",
           "Spectrum", "UapView", "category", "check_grid", "critical_radius", "measure_norm", "normals_spectrum", "run",
           "uap_view"]
