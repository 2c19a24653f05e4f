"""Fixed-budget gradient attacks: FGSM (Goodfellow et al. 2015) and PGD (Madry et al. 2018),
in the L∞ and L2 norms, untargeted, on the cross-entropy loss of the true label."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harmless import validation
from harmless.attacks.base import Attack, Bounds, check_norm
from harmless.errors import InputError


def _loss_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gradient of the cross-entropy of each sample w.r.t. its own input. The summed loss gives
    every sample its unscaled gradient (a mean would divide by B, which the sign or the
    normalisation removes again, but which can underflow tiny entries to zero)."""
    xa = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(xa), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, xa)
    return grad


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm, shaped to broadcast against ``t``."""
    return t.reshape(t.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (t.dim() - 1)))


def _direction(grad: torch.Tensor, norm: str | int) -> torch.Tensor:
    """The steepest-ascent direction of unit norm: sign(g) for L∞, g/||g||₂ for L2 (0 where g = 0)."""
    if norm == "inf":
        return grad.sign()
    n = _flat_norm(grad)
    return torch.where(n > 0, grad / n.clamp_min(torch.finfo(grad.dtype).tiny), torch.zeros_like(grad))


def _project(delta: torch.Tensor, eps: float, norm: str | int) -> torch.Tensor:
    """Onto the eps ball around 0: clamp per coordinate (L∞), rescale to norm eps if larger (L2)."""
    if norm == "inf":
        return delta.clamp(-eps, eps)
    n = _flat_norm(delta)
    factor = torch.where(n > eps, eps / n.clamp_min(torch.finfo(delta.dtype).tiny), torch.ones_like(n))
    return delta * factor


def _random_start(x: torch.Tensor, eps: float, norm: str | int, generator: torch.Generator | None) -> torch.Tensor:
    """A point drawn uniformly from the eps ball around each sample (before clipping to the box).
    Drawn on the generator's device (a CPU generator cannot draw on a GPU) and moved to x's."""
    device = generator.device if generator is not None else x.device
    shape = x.shape
    if norm == "inf":
        u = torch.rand(shape, generator=generator, dtype=x.dtype, device=device)
        return (2 * u - 1).to(x.device) * eps
    # Uniform in the L2 ball: a uniform direction (normalised Gaussian) and radius eps * U^(1/n).
    n = x[0].numel()
    g = torch.randn(shape, generator=generator, dtype=x.dtype, device=device)
    r = torch.rand((shape[0],), generator=generator, dtype=x.dtype, device=device) ** (1.0 / n)
    g = g / _flat_norm(g).clamp_min(torch.finfo(x.dtype).tiny)
    return (g * (eps * r).reshape(-1, *([1] * (x.dim() - 1)))).to(x.device)


def _pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, stepsize: float, steps: int,
         norm: str | int, bounds: Bounds, start: torch.Tensor | None) -> torch.Tensor:
    """Madry et al.'s iteration: step along the normalised gradient, project onto the eps ball
    around x, clip to the box. Both sets contain x, so the result lies in both."""
    lo, hi = bounds
    x_adv = x if start is None else (x + start).clamp(lo, hi)
    for _ in range(steps):
        x_adv = x_adv + stepsize * _direction(_loss_gradient(model, x_adv, y), norm)
        x_adv = (x + _project(x_adv - x, eps, norm)).clamp(lo, hi)
    return x_adv.detach()


class PGD(Attack):
    """Projected gradient descent (Madry et al. 2018), untargeted, maximising the cross-entropy.

    ``steps`` iterations of ``x ← clip_box(x₀ + Π_eps(x + α·d(∇loss) − x₀))`` where ``d`` is
    ``sign`` (L∞) or ``g/‖g‖₂`` (L2), ``Π_eps`` the projection onto the eps ball, and the step
    ``α = abs_stepsize`` or else ``rel_stepsize · eps`` (default ``2.5 / steps``, Madry's rule,
    so the iterate can cross the ball 2.5 times). ``random_start`` begins at a point drawn
    uniformly from the eps ball (clipped to the box), drawn with ``generator`` (None: torch's
    global generator); without it the attack is deterministic.
    """

    def __init__(self, eps: float, steps: int = 40, norm: str | int = "inf", *, rel_stepsize: float | None = None,
                 abs_stepsize: float | None = None, random_start: bool = True,
                 bounds: Bounds = (0.0, 1.0)) -> None:
        super().__init__(bounds)
        self.eps = validation.positive_number(eps, "eps")
        self.steps = validation.positive_int(steps, "steps")
        self.norm = check_norm(norm)
        if rel_stepsize is not None and abs_stepsize is not None:
            raise InputError("give rel_stepsize or abs_stepsize, not both")
        self.rel_stepsize = None if rel_stepsize is None else validation.positive_number(rel_stepsize, "rel_stepsize")
        self.abs_stepsize = None if abs_stepsize is None else validation.positive_number(abs_stepsize, "abs_stepsize")
        if not isinstance(random_start, bool):
            raise InputError(f"random_start must be True or False, got {random_start!r}")
        self.random_start = random_start

    @property
    def stepsize(self) -> float:
        """The absolute step α."""
        if self.abs_stepsize is not None:
            return self.abs_stepsize
        rel = 2.5 / self.steps if self.rel_stepsize is None else self.rel_stepsize
        return rel * self.eps

    def _run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor, bounds: Bounds,
             generator: torch.Generator | None) -> tuple[torch.Tensor, None]:
        start = _random_start(x, self.eps, self.norm, generator) if self.random_start else None
        return _pgd(model, x, y, eps=self.eps, stepsize=self.stepsize, steps=self.steps, norm=self.norm,
                    bounds=bounds, start=start), None


class FGSM(Attack):
    """The fast gradient (sign) method (Goodfellow et al. 2015): one step of size ``eps`` along
    ``sign(∇loss)`` (L∞) or ``∇loss/‖∇loss‖₂`` (L2, "FGM"), clipped to the box. Deterministic."""

    def __init__(self, eps: float, norm: str | int = "inf", *, bounds: Bounds = (0.0, 1.0)) -> None:
        super().__init__(bounds)
        self.eps = validation.positive_number(eps, "eps")
        self.norm = check_norm(norm)

    def _run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor, bounds: Bounds,
             generator: torch.Generator | None) -> tuple[torch.Tensor, None]:
        lo, hi = bounds
        # One step of length eps from x stays in the eps ball: no projection, only the box.
        return (x + self.eps * _direction(_loss_gradient(model, x, y), self.norm)).clamp(lo, hi).detach(), None
