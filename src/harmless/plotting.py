"""Small matplotlib helpers shared by the applications, the experiments and the benchmarks:
atomic PNG output and drawing one image, grayscale or RGB."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from harmless.cache import atomic_write_bytes


def save_figure(fig: object, path: Path, *, dpi: int = 130) -> Path:
    """Save a matplotlib figure as PNG, atomically, and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[arg-type]
    return atomic_write_bytes(Path(path), buf.getvalue())


def show_image(ax: object, img: torch.Tensor) -> None:
    """Draw one image ``(C, H, W)`` with values in ``[0, 1]`` (clamped): 1 channel in gray, 3 as RGB."""
    arr = img.detach().cpu().clamp(0, 1).numpy()
    ax.imshow(arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0),  # type: ignore[attr-defined]
              cmap="gray", vmin=0, vmax=1)
