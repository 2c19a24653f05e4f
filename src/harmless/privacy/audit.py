"""What an attacker who knows the model recovers from a privatised image.

The released ``x_hat = x + delta`` has ``delta`` in ``N(A)``, so the harmful part of the original,
``(I - P) x = (I - P) x_hat``, is public to anyone who knows the first linear layer. The attacks:

* ``min_norm``: ``(I - P) x_hat``, the minimum-norm point of ``x_hat + N(A)``;
* ``box``: the point of ``{x_hat + N(A)} ∩ [0, 1]^n`` nearest to the min-norm one;
* ``tv``: a total-variation prior: Adam on a smoothed TV of ``x_hat + U c`` (images with height and
  width) with a penalty for leaving ``[0, 1]``, finished by the exact projection onto
  ``{x_hat + N(A)} ∩ [0, 1]^n``.

Each reconstruction lies in the set of images the model cannot tell apart from ``x``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from harmless.errors import InputError
from harmless.linalg.subspace import HarmlessSubspace
from harmless.privacy.core import Projector, _check_positive, _images, _project_flat, projector

__all__ = ["min_norm_attack", "box_attack", "tv_attack", "audit"]


def min_norm_attack(space: HarmlessSubspace | Projector, x_hat: torch.Tensor) -> torch.Tensor:
    """``(I - P) x_hat`` (may leave ``[0, 1]``)."""
    proj = projector(space)
    xh = _images(proj, x_hat, "x_hat", box=False)
    return proj.harmful(xh.reshape(xh.shape[0], -1)).reshape(xh.shape)


def box_attack(space: HarmlessSubspace | Projector, x_hat: torch.Tensor, *, max_iter: int = 100) -> torch.Tensor:
    """The nearest point to ``(I - P) x_hat`` in ``{x_hat + N(A)} ∩ [0, 1]^n`` (``x_hat`` in the box)."""
    proj = projector(space)
    xh = _images(proj, x_hat, "x_hat").reshape(-1, proj.n)
    _check_positive(max_iter, "max_iter", integer=True)
    y, _ = _project_flat(proj, xh, proj.harmful(xh), max_iter=max_iter)
    return y.reshape(-1, *proj.input_shape)


def _tv(y: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    dh = y[..., 1:, :-1] - y[..., :-1, :-1]
    dw = y[..., :-1, 1:] - y[..., :-1, :-1]
    return torch.sqrt(dh ** 2 + dw ** 2 + eps ** 2).flatten(1).sum(1)


def tv_attack(space: HarmlessSubspace | Projector, x_hat: torch.Tensor, *, steps: int = 200, lr: float = 0.02,
              penalty: float = 100.0, max_iter: int = 100,
              images: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Smoothed-TV minimisation over ``{x_hat + N(A)} ∩ [0, 1]^n`` (see the module docstring).

    ``images`` maps the batch to the images whose TV is minimised, e.g. :meth:`Tiling.merge
    <harmless.privacy.tiles.Tiling.merge>` when the batch holds the tiles of larger images, so that
    the prior also ties neighbouring tiles together; default: the batch itself."""
    proj = projector(space)
    if len(proj.input_shape) != 3:
        raise InputError(f"tv_attack needs image inputs (C, H, W), got input shape {proj.input_shape}")
    xh = _images(proj, x_hat, "x_hat")
    _check_positive(steps, "steps", integer=True)
    _check_positive(lr, "lr")
    _check_positive(penalty, "penalty")
    _check_positive(max_iter, "max_iter", integer=True)
    b = xh.shape[0]
    flat = xh.reshape(b, -1)
    start = proj.null @ (proj.harmful(flat) - flat).T  # coefficients of the min-norm point
    c = start.T.clone().requires_grad_(True)
    opt = torch.optim.Adam([c], lr=lr)
    for _ in range(int(steps)):
        opt.zero_grad()
        y = flat + c @ proj.null
        viol = (torch.relu(-y) ** 2 + torch.relu(y - 1.0) ** 2).sum(1)
        batch = y.reshape(b, *proj.input_shape)
        loss = _tv(batch if images is None else images(batch)).sum() + penalty * viol.sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        y = flat + c.detach() @ proj.null
        out, _ = _project_flat(proj, flat, y, max_iter=max_iter)
    return out.reshape(b, *proj.input_shape)


def audit(space: HarmlessSubspace | Projector, x: torch.Tensor, x_hat: torch.Tensor, *, lpips: bool = True,
          tv_steps: int = 200) -> dict[str, dict[str, float]]:
    """Run every attack on ``x_hat``; return per attack the mean SSIM / PSNR / (LPIPS) of its
    reconstruction to the original ``x`` (reconstructions clipped to ``[0, 1]`` for the metrics),
    plus ``"released"``: the same for ``x_hat`` itself."""
    from harmless import metrics

    proj = projector(space)
    xs = _images(proj, x, "x")
    recs = {"released": _images(proj, x_hat, "x_hat"), "min_norm": min_norm_attack(proj, x_hat),
            "box": box_attack(proj, x_hat)}
    if len(proj.input_shape) == 3 and tv_steps > 0:
        recs["tv"] = tv_attack(proj, x_hat, steps=tv_steps)
    out: dict[str, dict[str, float]] = {}
    for name, rec in recs.items():
        r = rec.clamp(0.0, 1.0)
        row = {"ssim": float(metrics.ssim(r, xs).mean()), "psnr": float(metrics.psnr(r, xs).mean())}
        if lpips:
            row["lpips"] = float(metrics.lpips(r, xs).mean())
        out[name] = row
    return out
