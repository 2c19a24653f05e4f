"""Parsers for standard dataset file formats: idx (MNIST), CIFAR python pickles, SVHN .mat,
and a folder of images per class.

Every parser returns uint8 images laid out ``(N, C, H, W)``; see :class:`ImageDataset`.
Nothing here downloads anything: these read files the user (or :mod:`.sources`) supplied.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from harmless.data.datasets import ImageDataset
from harmless.errors import DataUnavailableError, InputError

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR100_CLASSES",
    "DIGIT_CLASSES",
    "FASHION_MNIST_CLASSES",
    "load_cifar",
    "load_image_folder",
    "load_svhn_mat",
    "parse_idx",
    "png_bytes",
    "read_idx_file",
    "read_image",
    "safe_load_pickle",
]

DIGIT_CLASSES: tuple[str, ...] = tuple(str(i) for i in range(10))
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
CIFAR100_CLASSES: tuple[str, ...] = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle",
    "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)  # fmt: skip

# ---------------------------------------------------------------------------------------
# idx (the MNIST family's format): 2 zero bytes, a type code, ndim, ndim big-endian uint32
# dimensions, then the values big-endian in C order.

_IDX_TYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def parse_idx(data: bytes | bytearray | memoryview, *, what: str = "idx data") -> np.ndarray:
    """Parse idx-format bytes into an array of the stored shape (native byte order).

    The array shares memory with ``data`` when the values are single bytes (writable if
    ``data`` is a ``bytearray``). Raises :class:`InputError` on a bad header or a size that
    does not match the header.
    """
    view = memoryview(data).cast("B")
    if len(view) < 4 or view[0] != 0 or view[1] != 0 or view[2] not in _IDX_TYPES:
        raise InputError(f"{what}: not an idx file (bad magic number)")
    dtype, ndim = _IDX_TYPES[view[2]], view[3]
    header = 4 + 4 * ndim
    if len(view) < header:
        raise InputError(f"{what}: idx header truncated")
    dims = struct.unpack(f">{ndim}I", view[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(view) != expected:
        raise InputError(
            f"{what}: idx header says {dims} of {dtype} ({expected} bytes), file has {len(view)} bytes"
        )
    arr = np.frombuffer(view, dtype=dtype, offset=header).reshape(dims)
    if dtype.itemsize > 1:
        arr = arr.astype(dtype.newbyteorder("="))
    return arr


def read_idx_file(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an idx file, gzipped or not (told apart by content, not by name)."""
    path = Path(path)
    raw = _read_maybe_gzip(path)
    return parse_idx(raw, what=str(path))


def _read_maybe_gzip(path: Path) -> bytearray:
    try:
        with open(path, "rb") as fh:
            head = fh.read(2)
            fh.seek(0)
            if head == b"\x1f\x8b":
                with gzip.GzipFile(fileobj=fh) as gz:
                    return bytearray(gz.read())
            buf = bytearray(os.fstat(fh.fileno()).st_size)
            fh.readinto(buf)
            return buf
    except FileNotFoundError as exc:
        raise DataUnavailableError(f"{path}: no such file") from exc
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise InputError(f"{path}: cannot read ({exc})") from exc


# ---------------------------------------------------------------------------------------
# Safe unpickling. CIFAR's python files are pickled dicts of bytes, lists and ndarrays;
# a pickle can name any importable callable, so only the handful numpy needs to rebuild
# arrays, dtypes and scalars is let through.


def _latin1_encode(obj: object, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # Python 3 writes bytes in protocol <= 2 as _codecs.encode(str, "latin1"); nothing else.
    if not isinstance(obj, str) or encoding.lower() not in ("latin1", "latin-1") or errors != "strict":
        raise InputError("refusing _codecs.encode with arguments other than (str, 'latin1')")
    return obj.encode("latin1")


def _numpy_globals() -> dict[tuple[str, str], Callable[..., Any]]:
    # Taken from numpy's own reducers so both the numpy 1 (numpy.core) and numpy 2
    # (numpy._core) spellings map to the right objects without importing a deprecated module.
    arr = np.zeros(1)
    reconstruct: Callable[..., Any] = arr.__reduce__()[0]  # type: ignore[assignment]
    frombuffer: Callable[..., Any] = arr.__reduce_ex__(5)[0]  # type: ignore[assignment]
    scalar: Callable[..., Any] = np.float64(0).__reduce__()[0]  # type: ignore[assignment]
    table: dict[tuple[str, str], Callable[..., Any]] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[(mod, "_reconstruct")] = reconstruct
        table[(mod, "scalar")] = scalar
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        table[(mod, "_frombuffer")] = frombuffer
    return table


_SAFE_GLOBALS = _numpy_globals()


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, what: str) -> None:
        super().__init__(file, encoding="bytes")
        self._what = what

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise InputError(
                f"{self._what}: refusing to unpickle {module}.{name}: a dataset pickle holds only "
                "numpy arrays, lists and bytes, and this one would call other code (is it malicious?)"
            ) from None

    def persistent_load(self, pid: object) -> Any:
        raise InputError(f"{self._what}: refusing a pickle with persistent ids")


def safe_load_pickle(path: str | os.PathLike[str]) -> Any:
    """Unpickle a data file that may hold only numpy arrays/dtypes/scalars and plain Python
    values (dicts, lists, bytes, str, numbers). Python 2 strings load as ``bytes``.

    Anything that would import or call other code is refused with :class:`InputError`
    before it runs.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            return _NumpyOnlyUnpickler(fh, str(path)).load()
    except InputError:
        raise
    except FileNotFoundError as exc:
        raise DataUnavailableError(f"{path}: no such file") from exc
    except Exception as exc:  # a corrupt pickle raises almost anything
        raise InputError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from exc


# ---------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100, "python version" (cifar-10-python.tar.gz / cifar-100-python.tar.gz).


def _key(d: dict[Any, Any], key: str, what: str) -> Any:
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise InputError(f"{what}: missing key {key!r} (found {sorted(map(repr, d))})")


def _cifar_meta_names(path: Path, key: str, expected: int) -> list[str] | None:
    if not path.is_file():
        return None
    meta = safe_load_pickle(path)
    try:
        names = _key(meta, key, str(path)) if isinstance(meta, dict) else None
    except InputError:
        return None
    if not isinstance(names, list) or len(names) != expected:
        return None
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def load_cifar(root: str | os.PathLike[str], which: int = 10, split: str = "test") -> ImageDataset:
    """Load CIFAR-10 or CIFAR-100 from the python-pickle release.

    ``root`` is the folder holding ``cifar-10-batches-py/`` (``data_batch_1`` .. ``_5``,
    ``test_batch``, optionally ``batches.meta``) or ``cifar-100-python/`` (``train``,
    ``test``, optionally ``meta``), or that folder itself. CIFAR-100 uses the 100 fine labels.
    Images come out ``(N, 3, 32, 32)`` uint8 RGB; pickles are read with
    :func:`safe_load_pickle`.
    """
    if which not in (10, 100):
        raise InputError(f"load_cifar: which must be 10 or 100, got {which!r}")
    if split not in ("train", "test"):
        raise InputError(f"load_cifar: split must be 'train' or 'test', got {split!r}")
    root = Path(root).expanduser()
    sub = "cifar-10-batches-py" if which == 10 else "cifar-100-python"
    folder = root / sub if (root / sub).is_dir() else root
    if which == 10:
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        label_key, meta_file, meta_key = "labels", "batches.meta", "label_names"
        default_classes: Sequence[str] = CIFAR10_CLASSES
    else:
        names = [split]
        label_key, meta_file, meta_key = "fine_labels", "meta", "fine_label_names"
        default_classes = CIFAR100_CLASSES
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DataUnavailableError(
            f"CIFAR-{which} {split} split: missing {', '.join(missing)} in {folder}. "
            f"Extract the python version (cifar-{which}-python.tar.gz) and pass the folder that "
            f"contains {sub}/ (files: {', '.join(names)})."
        )
    images, labels = [], []
    for n in names:
        path = folder / n
        d = safe_load_pickle(path)
        if not isinstance(d, dict):
            raise InputError(f"{path}: expected a pickled dict, got {type(d).__name__}")
        data = np.asarray(_key(d, "data", str(path)))
        lab = np.asarray(_key(d, label_key, str(path)))
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise InputError(f"{path}: 'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
        if lab.ndim != 1 or lab.shape[0] != data.shape[0] or not np.issubdtype(lab.dtype, np.integer):
            raise InputError(f"{path}: {label_key!r} must be {data.shape[0]} integers, got {lab.dtype} {lab.shape}")
        # Each row is the red plane, then green, then blue, each 32x32 row-major.
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(lab.astype(np.int64))
    classes = _cifar_meta_names(folder / meta_file, meta_key, len(default_classes)) or list(default_classes)
    return ImageDataset(
        torch.from_numpy(np.ascontiguousarray(np.concatenate(images))),
        torch.from_numpy(np.concatenate(labels)),
        classes,
        name=f"cifar{which}",
        split=split,
    )


# ---------------------------------------------------------------------------------------
# SVHN, cropped digits (train_32x32.mat, test_32x32.mat, extra_32x32.mat).


def load_svhn_mat(path: str | os.PathLike[str], *, split: str | None = None) -> ImageDataset:
    """Load an SVHN cropped-digits ``.mat`` file (MATLAB v5, as released).

    ``X`` is ``(32, 32, 3, N)`` uint8 and ``y`` ``(N, 1)`` with digit 0 stored as 10; the
    result has images ``(N, 3, 32, 32)`` and labels 0..9 (10 mapped to 0).
    """
    import scipy.io

    path = Path(path).expanduser()
    if not path.is_file():
        raise DataUnavailableError(
            f"{path}: no such file (SVHN cropped digits: train_32x32.mat / test_32x32.mat / extra_32x32.mat)"
        )
    try:
        mat = scipy.io.loadmat(path, variable_names=["X", "y"])
    except NotImplementedError as exc:  # MATLAB v7.3 (HDF5)
        raise InputError(f"{path}: unsupported .mat version ({exc}); SVHN ships MATLAB v5 files") from exc
    except Exception as exc:
        raise InputError(f"{path}: not a readable .mat file ({type(exc).__name__}: {exc})") from exc
    if "X" not in mat or "y" not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise InputError(f"{path}: expected variables 'X' and 'y', found {found}")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"])
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[2] not in (1, 3):
        raise InputError(f"{path}: 'X' must be uint8 (H, W, C, N), got {x.dtype} {x.shape}")
    y = y.reshape(-1)
    if y.shape[0] != x.shape[3] or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise InputError(f"{path}: 'y' must hold {x.shape[3]} labels, got {y.dtype} {mat['y'].shape}")
    y = y.astype(np.int64)
    y[y == 10] = 0
    if y.size and (y.min() < 0 or y.max() > 9):
        raise InputError(f"{path}: labels must be 1..10 (10 meaning 0), got {y.min()}..{y.max()}")
    images = np.ascontiguousarray(x.transpose(3, 2, 0, 1))
    return ImageDataset(torch.from_numpy(images), torch.from_numpy(y), DIGIT_CLASSES, name="svhn", split=split)


# ---------------------------------------------------------------------------------------
# A folder of images per class.

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_GRAY_MODES = frozenset({"1", "L", "LA"})
_COLOUR_MODES = frozenset({"RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"})
_IMAGE_ERRORS = (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError)


def _natural_mode(mode: str, path: Path) -> str:
    if mode in _GRAY_MODES:
        return "L"
    if mode in _COLOUR_MODES:
        return "RGB"
    raise InputError(f"{path}: unsupported image mode {mode!r} (only 8-bit grayscale or colour images)")


def read_image(path: str | os.PathLike[str], mode: str | None = None) -> np.ndarray:
    """Read one image as uint8 ``(C, H, W)``: ``mode="L"`` gives C=1, ``"RGB"`` C=3, ``None``
    whichever of the two the file naturally is (alpha dropped, palettes expanded)."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            natural = _natural_mode(im.mode, path)
            # a copy: Pillow's buffer is read-only, and torch.from_numpy warns on (and would
            # share) a read-only array
            arr = np.array(im.convert(mode or natural), dtype=np.uint8, copy=True)
    except InputError:
        raise
    except _IMAGE_ERRORS as exc:
        raise InputError(f"{path}: cannot read image ({exc})") from exc
    return arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))


def png_bytes(img: torch.Tensor) -> bytes:
    """An 8-bit PNG of a ``(C, H, W)`` image in [0, 1] (C = 1 or 3), each value rounded to the
    nearest of k/255 (in float64, so a float32 k/255 comes back as k)."""
    arr = np.round(img.detach().double().cpu().numpy() * 255.0).clip(0, 255).astype(np.uint8)
    pil = Image.fromarray(arr[0], mode="L") if arr.shape[0] == 1 else Image.fromarray(arr.transpose(1, 2, 0), "RGB")
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def load_image_folder(
    root: str | os.PathLike[str], *, mode: str | None = None, name: str = "folder"
) -> ImageDataset:
    """Load ``root/<class_name>/*.png|*.jpg|*.jpeg``; classes are the sorted sub-folder names.

    All images must have the same size (:class:`InputError` naming two that differ
    otherwise; nothing is resized). They must also all be grayscale or all colour, unless
    ``mode="L"`` (1 channel) or ``mode="RGB"`` (3 channels) is given to convert every one.
    Hidden entries (starting with ``.``) and other file types are skipped. Images come out
    uint8 ``(N, C, H, W)``, ordered by class then file name.
    """
    if mode not in (None, "L", "RGB"):
        raise InputError(f"load_image_folder: mode must be None, 'L' or 'RGB', got {mode!r}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataUnavailableError(f"{root}: no such folder (expected {root}/<class_name>/*.png or *.jpg)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[tuple[Path, int]] = []
    for label, cls in enumerate(classes):
        for p in sorted((root / cls).iterdir()):
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES:
                files.append((p, label))
    if not files:
        raise InputError(
            f"{root}: no images found (expected {root}/<class_name>/*.png or *.jpg; classes seen: {classes or 'none'})"
        )
    arrays: list[np.ndarray] = []
    for p, _ in files:
        arr = read_image(p, mode)
        if arrays and arr.shape[0] != arrays[0].shape[0]:
            gray, colour = (files[0][0], p) if arrays[0].shape[0] == 1 else (p, files[0][0])
            raise InputError(
                f"{root}: mixes grayscale ({gray}) and colour ({colour}) images; "
                "pass mode='L' or mode='RGB' to convert them all"
            )
        if arrays and arr.shape != arrays[0].shape:
            first = files[0][0]
            raise InputError(
                f"{root}: images differ in size: {first} is {arrays[0].shape[2]}x{arrays[0].shape[1]}, "
                f"{p} is {arr.shape[2]}x{arr.shape[1]} (width x height); resize them to one size"
            )
        arrays.append(arr)
    return ImageDataset(
        torch.from_numpy(np.stack(arrays)),
        torch.tensor([label for _, label in files], dtype=torch.int64),
        classes,
        name=name,
    )
