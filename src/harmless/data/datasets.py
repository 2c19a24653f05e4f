"""The in-memory image dataset every loader in :mod:`harmless.data` returns."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset, Subset

from harmless.errors import InputError

__all__ = ["ImageDataset", "as_tensors"]


class ImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """A labelled image set held in memory.

    ``ds[i]`` is ``(image, label)``: ``image`` a float32 tensor of shape ``(C, H, W)``
    (channels first; grayscale has ``C == 1``) with values in ``[0, 1]`` (the stored byte
    divided by 255), ``label`` a Python ``int`` indexing :attr:`classes`.

    Attributes:
        images: uint8 tensor ``(N, C, H, W)``, values 0..255, for whole-set access.
        targets: int64 tensor ``(N,)``, values in ``0 .. len(classes) - 1``.
        classes: class names; ``classes[label]`` names a label.
        name: the dataset's name (``"mnist"``, ``"foolbox-cifar10"``, ...).
        split: ``"train"``, ``"test"``, ... or ``None`` where it does not apply.
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        classes: Sequence[str],
        name: str,
        split: str | None = None,
    ) -> None:
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
            raise InputError(
                f"{name}: images must be a uint8 tensor (N, C, H, W), got "
                f"{getattr(images, 'dtype', type(images).__name__)} of shape "
                f"{tuple(getattr(images, 'shape', ()))}"
            )
        if images.shape[1] not in (1, 3):
            raise InputError(f"{name}: images must have 1 or 3 channels, got shape {tuple(images.shape)}")
        targets = torch.as_tensor(targets).to(torch.int64).reshape(-1)
        if targets.shape[0] != images.shape[0]:
            raise InputError(f"{name}: {images.shape[0]} images but {targets.shape[0]} labels")
        classes = [str(c) for c in classes]
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= len(classes)):
            raise InputError(
                f"{name}: labels must lie in 0..{len(classes) - 1} ({len(classes)} classes), "
                f"got {int(targets.min())}..{int(targets.max())}"
            )
        self.images = images.contiguous()
        self.targets = targets
        self.classes = classes
        self.name = name
        self.split = split

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].to(torch.float32).div_(255.0), int(self.targets[index])

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of every image."""
        _, c, h, w = self.images.shape
        return int(c), int(h), int(w)

    def __repr__(self) -> str:
        split = f", split={self.split!r}" if self.split else ""
        return (
            f"ImageDataset(name={self.name!r}{split}, n={len(self)}, shape={self.shape}, "
            f"classes={len(self.classes)})"
        )


def as_tensors(
    ds: Dataset[tuple[torch.Tensor, int]], dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole dataset as ``(x, y)``.

    ``x`` has shape ``(N, C, H, W)``, the given floating ``dtype`` and values in ``[0, 1]``;
    ``y`` is int64 of shape ``(N,)``. Fast for an :class:`ImageDataset` or a
    :class:`~torch.utils.data.Subset` of one; any other dataset of ``(image, label)`` pairs
    is iterated.
    """
    if not dtype.is_floating_point:
        raise InputError(f"as_tensors: dtype must be a floating type, got {dtype}")
    if isinstance(ds, ImageDataset):
        return ds.images.to(dtype).div_(255.0), ds.targets.clone()
    if isinstance(ds, Subset) and isinstance(ds.dataset, ImageDataset):
        idx = torch.as_tensor(list(ds.indices), dtype=torch.int64)
        return ds.dataset.images[idx].to(dtype).div_(255.0), ds.dataset.targets[idx].clone()
    xs: list[torch.Tensor] = []
    ys: list[int] = []
    for i in range(len(ds)):  # type: ignore[arg-type]
        x, y = ds[i]
        xs.append(torch.as_tensor(x).to(dtype))
        ys.append(int(y))
    if not xs:
        raise InputError("as_tensors: the dataset is empty")
    return torch.stack(xs), torch.tensor(ys, dtype=torch.int64)
