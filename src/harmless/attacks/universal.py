"""Universal adversarial perturbations: one perturbation ``v`` that changes the model's prediction
on most images at once.

Two crafting algorithms, Foolbox-3 style (settings in the constructor, data in the call, a
typed result)::

    uap = UniversalPerturbation(xi=0.1, norm="inf", target_fooling=0.8)   # Moosavi-Dezfooli et al. 2017
    sgd = SGDUniversal(xi=0.1, norm="inf", steps=200, batch_size=64)       # Shafahi et al. 2020
    r = uap(model, x_craft, x_holdout, generator=torch.Generator().manual_seed(0))
    r.v, r.fooling_rate, r.holdout_fooling_rate, r.history
    harmless_fraction(space, r.v)                                          # ρ of v (a batch of one)

The **fooling rate** is the UAP paper's: the fraction of images whose prediction changes,
``k(clip(x + v)) ≠ k(x)``, whatever the true label (no labels are needed). ``x + v`` is clipped
to ``bounds`` (default ``[0, 1]``) wherever the model sees it; ``v`` itself lies in the Lp ball
of radius ``xi`` (p = ∞ or 2). Everything runs on the model's device, in the images' dtype
(float32 or float64; the model must have the same one), in eval mode (training flags restored),
and the inputs are never modified.

**Harmful subspace only.** ``subspace=space`` (the model's :class:`~harmless.HarmlessSubspace`)
crafts ``v`` in the harmful subspace, the row space of the first linear layer ``A``: after every
update ``v ← Π_ball((I − P) v)``, the harmful part (``space.decompose``) first, then the ball.
In L2 the ball step rescales, which keeps ``v`` in the subspace, and the composition is the
exact projection onto (subspace ∩ ball) (the subspace passes through the ball's centre). In L∞
clipping each pixel would leave the subspace, so the harmful part is **scaled** into the ball
instead (``v · min(1, ξ/‖v‖∞)``): ``v`` is then in the subspace to round-off and in the ball, but
not the nearest such point. ``x + v`` is still clipped to the box where the model sees it; the
clipped change ``clip(x + v) − x`` is in general not harmful-only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from harmless import validation
from harmless.attacks.base import Bounds, check_images, check_norm
from harmless.attacks.deepfool import DeepFool
from harmless.attacks.gradient import _direction, _project
from harmless.errors import InputError
from harmless.linalg.prefix import eval_mode
from harmless.linalg.subspace import HarmlessSubspace

__all__ = ["PassRecord", "SGDUniversal", "UniversalPerturbation", "UniversalResult", "fooling_rate"]

#: Images per forward pass when only predictions are needed (memory, not semantics).
EVAL_BATCH = 1024


@dataclass(frozen=True)
class PassRecord:
    """One pass over the (shuffled) crafting set."""

    fooling_rate: float  # on the whole crafting set, after the pass
    attacked: int  # samples that asked for an update: not fooled when reached (UAP) / seen in a batch (SGD)
    updates: int  # updates applied to v


@dataclass(frozen=True)
class UniversalResult:
    """A universal perturbation and how well it fools.

    ``v`` has shape ``(1, *sample_shape)``: it broadcasts against a batch (``x + r.v``) and is a
    batch of one for :func:`harmless.attacks.harmless_fraction` (``ρ = ‖Pv‖²/‖v‖²``).
    ``fooled[i]`` says whether ``k(clip(x_i + v)) ≠ k(x_i)`` on the crafting set (and
    ``holdout_fooled`` on the held-out set, when one was given).
    """

    v: torch.Tensor
    norm: str | int
    xi: float
    bounds: Bounds
    fooling_rate: float  # on the crafting set
    fooled: torch.Tensor  # (N,) bool
    history: tuple[PassRecord, ...]
    converged: bool  # the target fooling rate was reached (SGDUniversal has no target: False)
    holdout_fooling_rate: float | None = None
    holdout_fooled: torch.Tensor | None = None
    harmful_only: bool = False  # crafted with ``subspace=``: v lies in the harmful subspace (I − P)

    @property
    def passes(self) -> int:
        return len(self.history)

    @property
    def v_norm(self) -> float:
        """``‖v‖_p`` in the crafting norm (≤ xi up to round-off)."""
        flat = self.v.reshape(-1)
        return float(flat.abs().max()) if self.norm == "inf" else float(flat.norm())


# -- data checks ------------------------------------------------------------------------------

def _check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``argmax`` of the logits, in chunks; checks the output is (B, classes)."""
    out = []
    for i in range(0, x.shape[0], EVAL_BATCH):
        logits = model(x[i:i + EVAL_BATCH])
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[1] < 2:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise InputError(f"the model must return logits of shape (B, classes >= 2), got {shape}")
        out.append(logits.argmax(dim=1))
    return torch.cat(out)


def _apply(x: torch.Tensor, v: torch.Tensor, bounds: Bounds | None) -> torch.Tensor:
    return x + v if bounds is None else (x + v).clamp(*bounds)


def _fooled(model: nn.Module, x: torch.Tensor, y0: torch.Tensor, v: torch.Tensor,
            bounds: Bounds | None) -> torch.Tensor:
    return _predict(model, _apply(x, v, bounds)) != y0


def fooling_rate(model: nn.Module, x: torch.Tensor, v: torch.Tensor, *,
                 bounds: Bounds | None = (0.0, 1.0)) -> float:
    """The UAP paper's fooling rate of ``v`` on ``x``: the fraction of images whose prediction
    changes, ``k(clip(x + v)) ≠ k(x)``. ``bounds=None`` evaluates ``x + v`` unclipped (the
    linear-algebra view: then ``v`` and its harmful part ``v⊥`` fool exactly the same images).
    ``v`` is one perturbation, ``(1, *sample_shape)`` or ``sample_shape``. Eval mode, inputs
    untouched."""
    model = _check_model(model)
    b = None if bounds is None else validation.bounds(bounds)
    xs = check_images(model, x, b, "x")
    vs = _check_v(v, tuple(xs.shape[1:]), xs)
    with eval_mode(model, who="fooling_rate evaluates it", stacklevel=4):
        y0 = _predict(model, xs)
        return float(_fooled(model, xs, y0, vs, b).double().mean())


def _check_v(v: object, sample_shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        raise InputError(f"v must be a torch.Tensor, got {type(v).__name__}")
    t = v.detach()
    if tuple(t.shape) == sample_shape:
        t = t[None]
    t = validation.batch(t, sample_shape, "v")
    if t.shape[0] != 1:
        raise InputError(f"v must be one perturbation, shape {sample_shape} or (1, ...), got {tuple(v.shape)}")
    if t.dtype != like.dtype or t.device != like.device:
        raise InputError(f"v must have x's dtype and device ({like.dtype}, {like.device}), got {t.dtype}, {t.device}")
    return t


# -- the common call ----------------------------------------------------------------------------

class _Universal:
    """Shared call: checks, eval mode, clean predictions, the held-out evaluation, the result."""

    def __init__(self, xi: float, norm: str | int, bounds: Bounds, subspace: HarmlessSubspace | None = None) -> None:
        self.xi = validation.positive_number(xi, "xi")
        self.norm = check_norm(norm)
        self.bounds = validation.bounds(bounds)
        if subspace is not None and not isinstance(subspace, HarmlessSubspace):
            raise InputError(f"subspace must be a HarmlessSubspace (harmless.harmless_subspace(model, shape)) or "
                             f"None, got {type(subspace).__name__}")
        self.subspace = subspace

    def _to_ball(self, v: torch.Tensor) -> torch.Tensor:
        """The projection after each update: onto the ball, or with ``subspace`` onto the harmful
        subspace and then into the ball (scaled, not clipped, in L∞: see the module docstring)."""
        if self.subspace is None:
            return _project(v, self.xi, self.norm)
        _, harmful = self.subspace.decompose(v)
        h = harmful.to(dtype=v.dtype, device=v.device)
        size = float(h.abs().max()) if self.norm == "inf" else float(h.norm())
        return h * (self.xi / size) if size > self.xi else h

    def __call__(self, model: nn.Module, x_craft: torch.Tensor, x_holdout: torch.Tensor | None = None, *,
                 generator: torch.Generator | None = None) -> UniversalResult:
        """Craft ``v`` on ``x_craft`` (shuffled with ``generator``; None: torch's global one);
        report its fooling rate there and, if given, on ``x_holdout`` (images the crafting never
        saw)."""
        model = _check_model(model)
        xc = check_images(model, x_craft, self.bounds, "x_craft").clone()
        xh = None if x_holdout is None else check_images(model, x_holdout, self.bounds, "x_holdout",
                                                          tuple(xc.shape[1:])).clone()
        if self.subspace is not None and tuple(self.subspace.input_shape) != tuple(xc.shape[1:]):
            raise InputError(f"the subspace is of inputs {tuple(self.subspace.input_shape)}, the images are "
                             f"{tuple(xc.shape[1:])}")
        validation.generator(generator)
        with eval_mode(model, who=f"{type(self).__name__} evaluates it", stacklevel=4):
            y0 = _predict(model, xc)  # the labels to move away from: the clean predictions
            v, history, converged = self._craft(model, xc, y0, generator)
            v = v.detach()
            fooled = _fooled(model, xc, y0, v, self.bounds)
            hf = None if xh is None else _fooled(model, xh, _predict(model, xh), v, self.bounds)
        return UniversalResult(
            v=v, norm=self.norm, xi=self.xi, bounds=self.bounds, fooling_rate=float(fooled.double().mean()),
            fooled=fooled, history=tuple(history), converged=converged,
            holdout_fooling_rate=None if hf is None else float(hf.double().mean()), holdout_fooled=hf,
            harmful_only=self.subspace is not None)

    def _craft(self, model: nn.Module, x: torch.Tensor, y0: torch.Tensor, generator: torch.Generator | None
               ) -> tuple[torch.Tensor, list[PassRecord], bool]:
        raise NotImplementedError

    def __repr__(self) -> str:
        # The subspace is named by its size, not printed whole.
        args = ", ".join(f"{k}={v!r}" if k != "subspace" or v is None else f"subspace=<dim {v.dim} of {v.ambient_dim}>"
                         for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def _permutation(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    # Drawn on the CPU (a CPU generator cannot draw on a GPU), so that a seed gives one order everywhere.
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randperm(n, generator=generator, device=gen_device).to(device)


# -- Moosavi-Dezfooli et al. 2017 -------------------------------------------------------------------

class UniversalPerturbation(_Universal):
    """The UAP paper's algorithm (Moosavi-Dezfooli et al., CVPR 2017, Algorithm 1)::

        v ← 0
        while fooling_rate(v) < target_fooling and passes < max_passes:
            for x_i in shuffle(X):
                if k(x_i + v) = k(x_i):                       # not fooled yet
                    Δv_i ← DeepFool step from x_i + v          # minimal L2 change of k
                    v ← Π_{p,xi}(v + Δv_i)                     # back onto the Lp ball

    ``target_fooling`` is the paper's 1 − δ. The DeepFool step is :class:`DeepFool` (L2,
    ``deepfool_steps`` iterations at most, ``overshoot``, ``candidates`` classes) run from
    ``clip(x_i + v)`` against the clean prediction ``k(x_i)``; ``Δv_i`` is the change it made
    (``x_adv − clip(x_i + v)``, so the box shapes it as it shapes the images), and, as in the
    authors' code, only a DeepFool run that changed the prediction updates ``v``.

    **Batching.** ``batch_size = 1`` (default) is the paper's algorithm exactly. The fooled
    check is batched without changing it: from the current position, the next images of the
    shuffled order are evaluated at the current ``v`` in one forward pass; those fooled before
    the first not-fooled image are skipped (``v`` has not changed since, so the sequential
    algorithm would skip them too), and the first not-fooled one gets its DeepFool step.
    ``batch_size = b > 1`` is a mini-batch variant: the first ``b`` not-fooled images get their
    DeepFool steps in one batched call, all from the same ``v``; the steps are then added one by
    one in the shuffled order, each projected, and an image already fooled by the ``v`` of that
    moment adds nothing (the paper's rule). The only differences from the paper: images 2..b
    start DeepFool from a ``v`` up to b − 1 updates old, and fooled images between them are not
    re-checked after those updates. DeepFool itself is per-sample (a batch is the same as
    running it on each image alone), so the variant's steps do not depend on the batch's
    composition. Fooling rates (the stopping rule and the results) are always measured on the
    whole set at the end of a pass.
    """

    def __init__(self, xi: float, norm: str | int = "inf", target_fooling: float = 0.8, max_passes: int = 5,
                 overshoot: float = 0.02, deepfool_steps: int = 10, *, candidates: int | None = 10,
                 batch_size: int = 1, bounds: Bounds = (0.0, 1.0), subspace: HarmlessSubspace | None = None) -> None:
        super().__init__(xi, norm, bounds, subspace)
        # A target of 1 is allowed (keep going until every image is fooled or the passes run out).
        if not validation.is_real(target_fooling) or not 0 < float(target_fooling) <= 1:
            raise InputError(f"target_fooling must be a number in (0, 1], got {target_fooling!r}")
        self.target_fooling = float(target_fooling)
        self.max_passes = validation.positive_int(max_passes, "max_passes")
        self.overshoot = validation.nonnegative_number(overshoot, "overshoot")
        self.deepfool_steps = validation.positive_int(deepfool_steps, "deepfool_steps")
        self.batch_size = validation.positive_int(batch_size, "batch_size")
        # DeepFool checks candidates and overshoot; one instance serves every step.
        self._deepfool = DeepFool(steps=self.deepfool_steps, candidates=candidates, overshoot=self.overshoot,
                                  bounds=self.bounds)
        self.candidates = self._deepfool.candidates

    def _craft(self, model: nn.Module, x: torch.Tensor, y0: torch.Tensor, generator: torch.Generator | None
               ) -> tuple[torch.Tensor, list[PassRecord], bool]:
        n = x.shape[0]
        b = self.bounds
        v = torch.zeros((1,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        # Look-ahead window of the batched fooled check: large enough to skip runs of fooled
        # images in one forward pass, small enough not to waste one on images a new v changes.
        window = max(64, 4 * self.batch_size)
        history: list[PassRecord] = []
        rate = 0.0  # v = 0 fools nothing
        while rate < self.target_fooling and len(history) < self.max_passes:
            order = _permutation(n, generator, x.device)
            pos, attacked, updates = 0, 0, 0
            while pos < n:
                # The next batch_size not-fooled images at the current v (and how far that reaches).
                picked: list[torch.Tensor] = []
                want = self.batch_size
                while pos < n and want > 0:
                    idx = order[pos:pos + window]
                    not_fooled = torch.nonzero(~_fooled(model, x[idx], y0[idx], v, b)).flatten()
                    if not_fooled.numel() >= want:
                        take = not_fooled[:want]
                        picked.append(idx[take])
                        pos += int(take[-1]) + 1
                        want = 0
                    else:
                        # Every not-fooled image of this window joins; the rest of it is fooled.
                        picked.append(idx[not_fooled])
                        pos += idx.numel()
                        want -= not_fooled.numel()
                sel = torch.cat(picked) if picked else order[:0]
                if sel.numel() == 0:
                    continue
                attacked += sel.numel()
                z = _apply(x[sel], v, b)
                df = self._deepfool(model, z, y0[sel])  # batched, per-sample: one DeepFool per image
                steps = df.delta
                for j in range(sel.numel()):
                    if not bool(df.success[j]):
                        continue  # DeepFool did not reach another class within its steps: no update
                    if j > 0 and bool(_fooled(model, x[sel[j:j + 1]], y0[sel[j:j + 1]], v, b)[0]):
                        continue  # an earlier update of this mini-batch already fooled it
                    v = self._to_ball(v + steps[j:j + 1])
                    updates += 1
            rate = float(_fooled(model, x, y0, v, b).double().mean())
            history.append(PassRecord(rate, attacked, updates))
        return v, history, rate >= self.target_fooling


# -- Shafahi et al. 2020 ------------------------------------------------------------------------------

class SGDUniversal(_Universal):
    """Stochastic gradient ascent on one perturbation (Shafahi et al., "Universal adversarial
    training", AAAI 2020, Algorithm 1): for mini-batches ``B`` of the shuffled crafting set,

        g = ∇_v mean_{x ∈ B} min(CE(f(clip(x + v)), k(x)), clamp_loss)
        v ← Π_{p,xi}(v + lr · d(g)),   d = sign (L∞) or g/‖g‖₂ (L2)

    ``k(x)`` is the clean prediction (the fooling rate counts prediction changes, so that is the
    label to move away from). The loss is clamped at ``clamp_loss`` so that images already far
    across a boundary stop pulling ``v`` (their gradient is zero); ``None`` leaves it unclamped.
    ``steps`` updates in all, ``batch_size`` images each, passes reshuffled; ``lr`` is the step
    length (default ``xi / 10``). The batch-mean gradient is a sum over samples, so a batch's
    update does not depend on the order of its images. No early stop (``converged`` is False);
    ``history`` has one record per completed or partial pass, with the crafting-set fooling rate
    at its end.
    """

    def __init__(self, xi: float, norm: str | int = "inf", steps: int = 200, batch_size: int = 64,
                 lr: float | None = None, clamp_loss: float | None = 10.0, *,
                 bounds: Bounds = (0.0, 1.0), subspace: HarmlessSubspace | None = None) -> None:
        super().__init__(xi, norm, bounds, subspace)
        self.steps = validation.positive_int(steps, "steps")
        self.batch_size = validation.positive_int(batch_size, "batch_size")
        self.lr = self.xi / 10 if lr is None else validation.positive_number(lr, "lr")
        self.clamp_loss = None if clamp_loss is None else validation.positive_number(clamp_loss, "clamp_loss")

    def _craft(self, model: nn.Module, x: torch.Tensor, y0: torch.Tensor, generator: torch.Generator | None
               ) -> tuple[torch.Tensor, list[PassRecord], bool]:
        n = x.shape[0]
        lo, hi = self.bounds
        v = torch.zeros((1,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        per_pass = math.ceil(n / self.batch_size)
        history: list[PassRecord] = []
        done = 0
        while done < self.steps:
            order = _permutation(n, generator, x.device)
            seen = updates = 0
            for k in range(min(per_pass, self.steps - done)):
                idx = order[k * self.batch_size:(k + 1) * self.batch_size]
                va = v.detach().requires_grad_(True)
                with torch.enable_grad():
                    loss = F.cross_entropy(model((x[idx] + va).clamp(lo, hi)), y0[idx], reduction="none")
                    if self.clamp_loss is not None:
                        loss = loss.clamp(max=self.clamp_loss)
                    (g,) = torch.autograd.grad(loss.mean(), va)
                v = self._to_ball(v + self.lr * _direction(g, self.norm)).detach()
                seen += idx.numel()
                updates += 1
            done += updates
            history.append(PassRecord(float(_fooled(model, x, y0, v, self.bounds).double().mean()), seen, updates))
        return v, history, False
