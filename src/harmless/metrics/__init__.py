"""Image similarity metrics (SSIM, PSNR) and accuracy change, for privacy evaluations.

Images are float tensors/arrays ``(N, C, H, W)`` (or one ``(C, H, W)``) with values in ``[0, 1]``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from harmless.errors import InputError

__all__ = ["ssim", "psnr", "accuracy", "delta_accuracy", "lpips"]


def _pair(a: object, b: object) -> tuple[np.ndarray, np.ndarray]:
    arrs = []
    for name, v in (("a", a), ("b", b)):
        if isinstance(v, torch.Tensor):
            v = v.detach().to(torch.float64).cpu().numpy()
        if not isinstance(v, np.ndarray) or not np.issubdtype(v.dtype, np.floating):
            raise InputError(f"{name} must be a floating-point tensor or array, got {type(v).__name__}")
        v = np.asarray(v, dtype=np.float64)
        if v.ndim == 3:
            v = v[None]
        if v.ndim != 4:
            raise InputError(f"{name} must have shape (N, C, H, W) or (C, H, W), got {v.shape}")
        if not np.isfinite(v).all():
            raise InputError(f"{name} contains non-finite values (nan or inf)")
        arrs.append(v)
    if arrs[0].shape != arrs[1].shape:
        raise InputError(f"images differ in shape: {arrs[0].shape} vs {arrs[1].shape} (grayscale vs RGB?)")
    return arrs[0], arrs[1]


def ssim(a: object, b: object) -> np.ndarray:
    """Per-image SSIM (scikit-image ``structural_similarity``, ``data_range=1``, Gaussian-free
    7x7 window; RGB via ``channel_axis``); 1 for identical images."""
    from skimage.metrics import structural_similarity

    x, y = _pair(a, b)
    out = np.empty(x.shape[0])
    for i in range(x.shape[0]):
        if x.shape[1] == 1:
            out[i] = structural_similarity(x[i, 0], y[i, 0], data_range=1.0)
        else:
            out[i] = structural_similarity(np.moveaxis(x[i], 0, -1), np.moveaxis(y[i], 0, -1), data_range=1.0,
                                           channel_axis=-1)
    return out


def psnr(a: object, b: object) -> np.ndarray:
    """Per-image PSNR in dB for data range 1 (``inf`` for identical images)."""
    x, y = _pair(a, b)
    mse = ((x - y) ** 2).reshape(x.shape[0], -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(1.0 / mse)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``, evaluated in batches."""
    pred = torch.cat([model(x[i:i + batch]) for i in range(0, x.shape[0], batch)]).argmax(dim=1)
    return float((pred.cpu() == y.cpu()).double().mean())


def delta_accuracy(model: nn.Module, x: torch.Tensor, x_new: torch.Tensor, y: torch.Tensor,
                   batch: int = 500) -> float:
    """``acc(model, x) - acc(model, x_new)`` (top-1, labels ``y``): the accuracy lost by the change."""
    if x.shape != x_new.shape:
        raise InputError(f"x and x_new differ in shape: {tuple(x.shape)} vs {tuple(x_new.shape)}")
    if y.shape[0] != x.shape[0]:
        raise InputError(f"y has {y.shape[0]} labels for {x.shape[0]} images")
    return accuracy(model, x, y, batch) - accuracy(model, x_new, y, batch)


def lpips(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, net: str = "alex") -> np.ndarray:
    """Per-image LPIPS (v0.1 heads; ``net`` ``"alex"`` or ``"vgg"``) of images in ``[0, 1]``; 0 for
    identical images, symmetric. Bad shapes, non-finite values or an unknown ``net`` raise
    :class:`~harmless.errors.InputError`; see :mod:`harmless.metrics.perceptual`."""
    from harmless.metrics.perceptual import lpips as _lpips

    return _lpips(a, b, net)
