"""Privatising large images whose linear prefix splits into independent tiles.

A first convolution whose kernel equals its stride and has no padding (a "patchify" stem, as
in ViT or ConvNeXt), after per-pixel layers only (Normalize), reads every ``t x t`` tile of the
image through the same matrix and no pixel twice: the prefix is block diagonal, its harmless
subspace is the direct sum of one tile's, and every privacy QP (decoy, Algorithm 1's final
projection, the attacker's box reconstruction) splits exactly into one small QP per tile. That
is what makes 224x224 ImageNet images tractable: their harmless subspace has 84,992 dimensions
for a 7x7/s7 stem with 64 channels, whose dense basis (~100 GB) the whole-image solver would need.

:func:`tiling` checks the split instead of trusting the architecture: the whole image's
harmless dimension (exact, from the engine) must equal the number of tiles times a tile's, and a
perturbation that is harmless tile by tile must be harmless for the whole prefix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from harmless.errors import InputError
from harmless.linalg.subspace import HarmlessSubspace, harmless_subspace

__all__ = ["Tiling", "tiling", "per_image_norms"]


def per_image_norms(values: torch.Tensor, tiles_per_image: int) -> torch.Tensor:
    """Per-tile norms (``||A (x_hat - x)||``, distance bounds) combined into per-image norms: the
    root sum of squares over each image's tiles (consecutive, as :meth:`Tiling.split` orders them)."""
    return (values ** 2).reshape(-1, tiles_per_image).sum(1).sqrt()


@dataclasses.dataclass(frozen=True)
class Tiling:
    """``part``: the harmless subspace of one ``(C, tile, tile)`` tile; ``whole``: that of the
    image. :meth:`split` cuts ``(B, C, H, W)`` images into ``(B * L, C, tile, tile)`` tiles
    (row-major over the tile grid, image by image), :meth:`merge` puts them back."""

    image_shape: tuple[int, int, int]
    tile: int
    part: HarmlessSubspace
    whole: HarmlessSubspace

    @property
    def tiles_per_image(self) -> int:
        _, h, w = self.image_shape
        return (h // self.tile) * (w // self.tile)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise InputError(f"images must have shape (B, {', '.join(map(str, self.image_shape))}), "
                             f"got {tuple(x.shape)}")
        c, t = self.image_shape[0], self.tile
        b, _, h, w = x.shape
        tiles = x.reshape(b, c, h // t, t, w // t, t).permute(0, 2, 4, 1, 3, 5)
        return tiles.reshape(-1, c, t, t)

    def merge(self, tiles: torch.Tensor) -> torch.Tensor:
        c, h, w = self.image_shape
        t = self.tile
        if tiles.ndim != 4 or tuple(tiles.shape[1:]) != (c, t, t) or tiles.shape[0] % self.tiles_per_image:
            raise InputError(f"tiles must have shape (B * {self.tiles_per_image}, {c}, {t}, {t}), "
                             f"got {tuple(tiles.shape)}")
        b = tiles.shape[0] // self.tiles_per_image
        grid = tiles.reshape(b, h // t, w // t, c, t, t).permute(0, 3, 1, 4, 2, 5)
        return grid.reshape(b, c, h, w)


def _prefix_module(model: nn.Module, whole: HarmlessSubspace, tile: int) -> nn.Module:
    """The layers of ``whole``'s linear prefix as one ``nn.Sequential`` (they form a chain, each
    fed only by the one before), or ``model`` itself when they are not all submodules of it.
    A Linear layer in the prefix reads the whole image at once: refused here, in those words."""
    layers = getattr(getattr(whole, "run", None), "layers", None) or []
    modules = []
    for record in layers:
        try:
            module = model.get_submodule(record.name)
        except AttributeError:
            return model  # a functional step (x.view, torch.flatten): run the whole model instead
        if isinstance(module, nn.Linear):
            raise InputError(f"the linear prefix does not split into {tile}x{tile} tiles: its layer {record.name} "
                             f"(Linear) reads the whole image at once; tiling needs a first convolution with "
                             f"kernel = stride = {tile} and no padding")
        modules.append(module)
    return nn.Sequential(*modules).eval() if modules else model


def tiling(model: nn.Module, image_shape: Sequence[int], tile: int, *,
           generator: torch.Generator | None = None) -> Tiling:
    """The tile decomposition of ``model``'s harmless subspace on ``image_shape`` images, in
    float64. Raises :class:`InputError` when the image does not divide into tiles or when the
    prefix does not split over them (overlapping or padded first convolution, a Linear first
    layer, ...)."""
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 3:
        raise InputError(f"image_shape must be (C, H, W), got {shape}")
    if not isinstance(tile, int) or isinstance(tile, bool) or tile <= 0:
        raise InputError(f"tile must be a positive int, got {tile!r}")
    c, h, w = shape
    if h % tile or w % tile:
        raise InputError(f"{h}x{w} images do not divide into {tile}x{tile} tiles")
    whole = harmless_subspace(model, shape, dtype=torch.float64)
    # Only the linear prefix has to run on a tile: a classifier head sized for the whole
    # image (Flatten -> Linear) need not, and its shape error would say nothing useful.
    prefix = _prefix_module(model, whole, tile)
    try:
        part = harmless_subspace(prefix, (c, tile, tile), dtype=torch.float64)
    except InputError as err:
        raise InputError(f"the linear prefix does not split into {tile}x{tile} tiles: the model does not run "
                         f"on a single tile ({err})") from err
    result = Tiling(shape, tile, part, whole)
    count = result.tiles_per_image
    dim = whole.known_dim
    if dim is None or dim != count * part.dim:
        raise InputError(f"the linear prefix does not split into {tile}x{tile} tiles: the image's harmless "
                         f"dimension is {dim if dim is not None else 'unknown'}, {count} tiles have "
                         f"{count * part.dim} (the first layer must read each tile alone, e.g. a convolution "
                         f"with kernel = stride = {tile} and no padding)")
    if part.dim == 0:
        return result  # both injective: nothing to hide, which the privacy functions will say
    # the dimensions agree; a harmless-by-tiles perturbation must also be harmless for the image.
    # ||A|| of a block-diagonal prefix is the tile's (asking the whole subspace would factorise it)
    delta = result.merge(part.sample(2 * count, generator=generator))
    out = whole.operator.matvec(delta.to(whole.dtype)).flatten(1).norm(dim=1)
    if float((out / (part.operator_norm * delta.flatten(1).norm(dim=1))).max()) > 1e-12:
        raise InputError(f"the linear prefix does not split into {tile}x{tile} tiles: tile-wise harmless "
                         "perturbations change its output")
    return result
