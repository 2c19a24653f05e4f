"""The Carlini–Wagner L2 attack (Carlini & Wagner 2017), untargeted, batched."""

from __future__ import annotations

import torch
from torch import nn

from harmless import validation
from harmless.attacks.base import Attack, Bounds, margin_other
from harmless.errors import InputError

#: Scales the image into the open interval before arctanh, so that pixels at the bounds map to
#: finite points (the reference code's 0.999999).
_TANH_SMOOTHER = 0.999999
#: Above this the constant c is taken as unbounded (the reference code's 1e10).
_C_UPPER = 1e10


class CarliniWagnerL2(Attack):
    """Carlini–Wagner L2, untargeted, with the reference implementation's semantics.

    The image is reparametrised as ``x' = lo + (hi − lo)·(tanh(w) + 1)/2`` (always inside the
    box), and for a per-sample constant ``c`` the attack minimises with Adam (``stepsize``,
    ``steps`` iterations from ``w`` of the clean image)::

        ‖x' − x‖² + c · max(f_y(x') − max_{j≠y} f_j(x') + confidence, 0)

    keeping, per sample, the smallest-norm ``x'`` seen with ``f_y < max_{j≠y} f_j − confidence``.
    A binary search over ``c`` (``binary_search_steps`` rounds, from ``initial_const``; ×10 while
    no adversarial has been found, bisection after) adapts it per sample; with 10 or more rounds
    the last one uses the upper bound, as in the reference code. ``abort_early`` stops a sample's
    round when its loss has not decreased by 0.01 % over ``steps // 10`` iterations. Every
    per-sample decision depends on that sample alone, so a batch gives the same result as its
    samples one by one. Samples the model already misclassifies are returned unchanged, failed
    samples as ``x`` itself (``success`` False). ``iterations``: Adam steps per sample, all rounds.
    """

    def __init__(self, steps: int = 1000, binary_search_steps: int = 9, stepsize: float = 0.01,
                 initial_const: float = 1e-3, confidence: float = 0.0, abort_early: bool = True, *,
                 bounds: Bounds = (0.0, 1.0)) -> None:
        super().__init__(bounds)
        self.steps = validation.positive_int(steps, "steps")
        self.binary_search_steps = validation.positive_int(binary_search_steps, "binary_search_steps")
        self.stepsize = validation.positive_number(stepsize, "stepsize")
        self.initial_const = validation.positive_number(initial_const, "initial_const")
        self.confidence = validation.nonnegative_number(confidence, "confidence")
        if not isinstance(abort_early, bool):
            raise InputError(f"abort_early must be True or False, got {abort_early!r}")
        self.abort_early = abort_early

    def _run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor, bounds: Bounds,
             generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = bounds
        b = x.shape[0]
        x_adv = x.clone()
        iterations = torch.zeros(b, dtype=torch.int64, device=x.device)
        todo = torch.arange(b, device=x.device)[logits.argmax(dim=1) == y]
        if todo.numel() == 0:
            return x_adv, iterations
        xs, ys = x[todo], y[todo]
        n = xs.shape[0]
        view = (-1,) + (1,) * (x.dim() - 1)

        def to_image(w: torch.Tensor) -> torch.Tensor:
            return lo + (hi - lo) * (torch.tanh(w) + 1) / 2

        w0 = torch.atanh(((xs - lo) / (hi - lo) * 2 - 1) * _TANH_SMOOTHER)
        dev, dt = x.device, x.dtype
        const = torch.full((n,), self.initial_const, dtype=dt, device=dev)
        lower = torch.zeros(n, dtype=dt, device=dev)
        upper = torch.full((n,), float("inf"), dtype=dt, device=dev)
        best_l2 = torch.full((n,), float("inf"), dtype=dt, device=dev)
        best = xs.clone()
        iters = torch.zeros(n, dtype=torch.int64, device=dev)
        period = max(self.steps // 10, 1)
        beta1, beta2, adam_eps = 0.9, 0.999, 1e-8

        for round_ in range(self.binary_search_steps):
            if self.binary_search_steps >= 10 and round_ == self.binary_search_steps - 1:
                const = torch.where(upper < _C_UPPER, upper, const)
            dw = torch.zeros_like(xs)
            m, v = torch.zeros_like(xs), torch.zeros_like(xs)
            found = torch.zeros(n, dtype=torch.bool, device=dev)
            running = torch.ones(n, dtype=torch.bool, device=dev)
            prev = torch.full((n,), float("inf"), dtype=dt, device=dev)
            for t in range(1, self.steps + 1):
                dwg = dw.detach().requires_grad_(True)
                with torch.enable_grad():
                    xw = to_image(w0 + dwg)
                    out = model(xw)
                    z_y, z_other = margin_other(out, ys)
                    l2 = (xw - xs).reshape(n, -1).pow(2).sum(dim=1)
                    loss = l2 + const * (z_y - z_other + self.confidence).clamp_min(0)
                    (grad,) = torch.autograd.grad(loss.sum(), dwg)
                with torch.no_grad():
                    l2d, lossd = l2.detach(), loss.detach()
                    is_adv = (z_y + self.confidence < z_other).detach() & running
                    better = is_adv & (l2d < best_l2)
                    best_l2 = torch.where(better, l2d, best_l2)
                    best = torch.where(better.reshape(view), xw.detach(), best)
                    found |= is_adv
                    if self.abort_early and (t - 1) % period == 0:
                        # Per sample (the reference code checks the summed loss, which would make
                        # a sample's result depend on the rest of its batch).
                        running &= ~(lossd > 0.9999 * prev)
                        prev = torch.where(running, lossd, prev)
                        if not bool(running.any()):
                            break
                    # Adam, element-wise (its state is per coordinate, hence per sample).
                    m = beta1 * m + (1 - beta1) * grad
                    v = beta2 * v + (1 - beta2) * grad * grad
                    m_hat = m / (1 - beta1 ** t)
                    v_hat = v / (1 - beta2 ** t)
                    dw = torch.where(running.reshape(view), dw - self.stepsize * m_hat / (v_hat.sqrt() + adam_eps),
                                     dw)
                    iters += running
            # Binary search on c, per sample.
            upper = torch.where(found, torch.minimum(upper, const), upper)
            lower = torch.where(found, lower, torch.maximum(lower, const))
            const = torch.where(upper < _C_UPPER, (lower + upper) / 2, const * 10)

        # tanh keeps x' inside the box up to round-off of the affine map; clamp that away.
        x_adv[todo] = best.clamp(lo, hi)
        iterations[todo] = iters
        return x_adv, iterations
