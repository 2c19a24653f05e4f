"""DeepFool (Moosavi-Dezfooli et al. 2016), multi-class, L2, batched."""

from __future__ import annotations

import torch
from torch import nn

from harmless import validation
from harmless.attacks.base import Attack, Bounds
from harmless.errors import InputError


class DeepFool(Attack):
    """DeepFool, untargeted, L2: linearise the model around the current point and step to the
    nearest linearised decision boundary, until the prediction leaves the true label.

    Per sample, with ``f`` the logits, ``y`` the label and ``k`` ranging over the candidate
    classes (the ``candidates - 1`` classes with the largest clean logits other than ``y``; all
    classes if ``candidates`` is None)::

        w_k = ∇(f_k − f_y),  d_k = f_k − f_y
        l   = argmin_k |d_k| / ‖w_k‖
        r   += (|d_l| / ‖w_l‖ + 1e-4) · w_l / ‖w_l‖
        x_i = clip(x + (1 + overshoot) · r)

    as in the authors' reference code (the 1e-4 pushes each step just past the linearised
    boundary). A sample stops (is frozen) once its prediction differs from ``y``, and only the
    samples still running are evaluated. Samples the model already misclassifies are returned
    unchanged (``iterations`` 0). ``steps`` bounds the updates per sample; a sample still
    correctly classified after them is returned at its last iterate, with ``success`` False.
    """

    def __init__(self, steps: int = 50, candidates: int | None = 10, overshoot: float = 0.02, *,
                 bounds: Bounds = (0.0, 1.0)) -> None:
        super().__init__(bounds)
        self.steps = validation.positive_int(steps, "steps")
        self.candidates = None if candidates is None else validation.positive_int(candidates, "candidates")
        if self.candidates == 1:
            raise InputError("candidates must be >= 2 (the label and at least one other class), or None for all")
        self.overshoot = validation.nonnegative_number(overshoot, "overshoot")

    def _run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor, bounds: Bounds,
             generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = bounds
        b, classes = logits.shape
        k = classes if self.candidates is None else min(self.candidates, classes)
        # The other candidate classes of each sample, from its clean logits, the label excluded
        # explicitly (a tie with the label must not drop it from the comparison).
        others = logits.scatter(1, y[:, None], float("-inf")).topk(k - 1, dim=1).indices  # (B, k-1)
        view = (-1,) + (1,) * (x.dim() - 1)
        tiny = torch.finfo(x.dtype).tiny

        r_tot = torch.zeros_like(x)
        x_adv = x.clone()
        iterations = torch.zeros(b, dtype=torch.int64, device=x.device)
        active = torch.arange(b, device=x.device)[logits.argmax(dim=1) == y]
        for _ in range(self.steps):
            if active.numel() == 0:
                break
            xa = x_adv[active].detach().requires_grad_(True)
            ya, oa = y[active], others[active]
            with torch.enable_grad():
                out = model(xa)
                still = out.detach().argmax(dim=1) == ya
                # One backward pass per candidate class (a loop over classes, not samples):
                # the gradient of the summed margins is every sample's own gradient.
                z_y = out.gather(1, ya[:, None])[:, 0]
                grads, diffs = [], []
                for j in range(k - 1):
                    diff = out.gather(1, oa[:, j:j + 1])[:, 0] - z_y
                    (g,) = torch.autograd.grad(diff.sum(), xa, retain_graph=j < k - 2)
                    grads.append(g)
                    diffs.append(diff.detach())
            w = torch.stack(grads, dim=1)  # (A, k-1, ...)
            d = torch.stack(diffs, dim=1)  # (A, k-1)
            w_norm = w.reshape(w.shape[0], k - 1, -1).norm(dim=2)  # (A, k-1)
            dist = d.abs() / w_norm.clamp_min(tiny)
            dist = torch.where(w_norm > 0, dist, torch.full_like(dist, float("inf")))
            best = dist.argmin(dim=1)
            rows = torch.arange(best.numel(), device=x.device)
            w_l, n_l = w[rows, best], w_norm[rows, best]
            # A flat model (all w = 0) gives no direction: the sample stays where it is.
            step = torch.where((n_l > 0).reshape(view),
                               ((dist[rows, best] + 1e-4) / n_l.clamp_min(tiny)).reshape(view) * w_l,
                               torch.zeros_like(w_l))
            # Only the samples still correctly classified move; the others are done.
            run = active[still]
            r_tot[run] = r_tot[run] + step[still]
            x_adv[run] = (x[run] + (1 + self.overshoot) * r_tot[run]).clamp(lo, hi)
            iterations[run] += 1
            active = run
        return x_adv.detach(), iterations
