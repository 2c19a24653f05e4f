"""Pieces shared by the layer sets and the network sets: input checks and pooling windows."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from harmless import validation
from harmless.errors import InputError, UnsupportedLayerError

Shape = tuple[int, ...]


def check_batch(delta: object, shape: Shape, what: str = "delta") -> torch.Tensor:
    """``delta`` as a detached floating tensor of shape ``(B, *shape)`` with finite entries."""
    return validation.batch(delta, shape, what)


def check_sample(z: object, what: str = "z") -> torch.Tensor:
    """One sample (no batch axis): a detached floating tensor with finite entries, cloned so
    that nothing the caller holds is ever written to."""
    if not isinstance(z, torch.Tensor):
        raise InputError(f"{what} must be a torch.Tensor, got {type(z).__name__}")
    if z.ndim < 1 or z.numel() == 0:
        raise InputError(f"{what} must be one non-empty sample without a batch axis, got shape {tuple(z.shape)}")
    if not z.is_floating_point():
        raise InputError(f"{what} must be a floating-point tensor, got {z.dtype}")
    if not bool(torch.isfinite(z).all()):
        raise InputError(f"{what} contains non-finite values (nan or inf)")
    return z.detach().clone()


def check_count(n: object) -> int:
    return validation.positive_int(n, "n")


def check_scale(scale: object) -> float:
    return validation.positive_number(scale, "scale")


def check_rtol(rtol: object) -> float:
    return validation.fraction(rtol, "rtol", allow_zero=True)


def default_generator(generator: torch.Generator | None) -> torch.Generator:
    # Seeded by default: a set's samples are reproducible unless the caller asks otherwise.
    return generator if generator is not None else torch.Generator().manual_seed(0)


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def maxpool_windows(pool: nn.MaxPool2d, shape: Shape) -> torch.Tensor:
    """The flat input indices of every pooling window, ``(C, K, L)`` (K entries per window,
    ``L = H_out * W_out`` windows per channel), ``-1`` where a window reads padding.

    Only the plain max pooling is accepted (``ceil_mode=False``); PyTorch pads max pooling
    with -inf, so a padded entry never holds a window's maximum."""
    if not isinstance(pool, nn.MaxPool2d):
        raise UnsupportedLayerError(f"expected nn.MaxPool2d, got {type(pool).__name__}")
    if pool.ceil_mode:
        raise UnsupportedLayerError("MaxPool2d with ceil_mode=True is not supported (its last windows are partial)")
    if len(shape) != 3:
        raise InputError(f"MaxPool2d here needs samples of shape (C, H, W), got {shape}")
    c, h, w = shape
    kernel, stride = _pair(pool.kernel_size), _pair(pool.stride if pool.stride is not None else pool.kernel_size)
    padding, dilation = _pair(pool.padding), _pair(pool.dilation)
    idx = torch.arange(c * h * w, dtype=torch.float64).reshape(1, c, h, w)
    idx = F.pad(idx, (padding[1], padding[1], padding[0], padding[0]), value=-1.0)
    if idx.shape[2] < dilation[0] * (kernel[0] - 1) + 1 or idx.shape[3] < dilation[1] * (kernel[1] - 1) + 1:
        raise InputError(f"a sample of spatial size {(h, w)} is smaller than the pooling window")
    cols = F.unfold(idx, kernel, dilation=dilation, stride=stride)  # (1, C*K, L), channel-major
    k = kernel[0] * kernel[1]
    return cols.reshape(c, k, -1).round().long()


def window_values(flat: torch.Tensor, windows: torch.Tensor, fill: float) -> torch.Tensor:
    """``flat`` (B, N) read through ``windows`` (C, K, L): (B, C, K, L), ``fill`` on padding."""
    valid = windows >= 0
    vals = flat[:, windows.clamp_min(0)]
    return torch.where(valid, vals, torch.full_like(vals, fill))


def first_argmax(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Index of the first maximum along ``dim``: the tie rule every piece here uses, so that
    the pieces of consecutive layers are nested."""
    top = values.amax(dim=dim, keepdim=True)
    hits = values == top
    k = values.shape[dim]
    ar = torch.arange(k, device=values.device).view([-1 if i == (dim % values.ndim) else 1 for i in range(values.ndim)])
    return torch.where(hits, ar, k).amin(dim=dim)
