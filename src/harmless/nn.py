"""Small layer types that the zoo's models use and the engine understands."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` on inputs of shape ``(B, C, ...)``.

    An invertible affine map, so it never creates harmless perturbations itself; the
    engine folds it into the linear prefix of a model.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor(list(mean), dtype=torch.float32)
        std_t = torch.as_tensor(list(std), dtype=torch.float32)
        if mean_t.shape != std_t.shape or mean_t.ndim != 1:
            raise ValueError("mean and std must be sequences of equal length")
        if not bool(torch.all(std_t > 0)):
            raise ValueError("std must be positive")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.shape[1] == self.mean.shape[0], "Normalize: the input's channel count (dim 1) "
                      "differs from the number of mean/std values")
        # Channels moved last so the per-channel vectors broadcast for any number of
        # spatial axes, without reading x.ndim (keeps the module torch.fx-traceable).
        moved = x.movedim(1, -1)
        mean, std = self.mean.to(x.dtype), self.std.to(x.dtype)
        return ((moved - mean) / std).movedim(-1, 1)

    def extra_repr(self) -> str:
        return f"mean={self.mean.tolist()}, std={self.std.tolist()}"
