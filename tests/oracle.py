"""An independent oracle for the linear-algebra engine, and random layer configurations.

Nothing here uses :mod:`harmless.linalg`: the dense matrix of a layer is built by applying
the *torch module itself* (a float64 copy, in eval mode) to every standard basis vector
``e_i`` and subtracting ``module(0)`` (which removes any bias / BatchNorm shift / Normalize
mean). Rank, nullspace and projector then come from NumPy / SciPy:

* rank: ``numpy.linalg.matrix_rank`` (tolerance ``sigma_max * max(m, n) * eps``),
* nullspace: ``scipy.linalg.null_space`` (orthonormal columns ``N``, same tolerance rule),
* projector onto the nullspace: ``P = N N^T``.

The hypothesis strategies below draw small layers (``n <= ~400`` inputs, so the oracle is
cheap) of every kind the engine supports, sometimes with degenerate weights (zero kernels,
duplicated rows, kernels that are shifts or multiples of one another, zero BatchNorm
scales) so that rank deficiency actually happens. Degenerate weights are built from
dyadic numbers where possible so that the deficiency is exact even in float32.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from torch import nn

from harmless.nn import Normalize

# ---------------------------------------------------------------------------------------
# Hypothesis settings shared by the engine tests: modest example counts, no deadline (the
# first call of a torch kernel is slow), deterministic so that CI runs are reproducible.
# ---------------------------------------------------------------------------------------
ENGINE_SETTINGS = dict(deadline=None, derandomize=True, database=None,
                       suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                              HealthCheck.data_too_large])


def engine_settings(max_examples: int = 30) -> settings:
    return settings(max_examples=max_examples, **ENGINE_SETTINGS)


@pytest.fixture(autouse=True, scope="module")
def single_torch_thread():
    """Run the engine tests on one intra-op thread, restoring the setting afterwards.

    The problems here are tiny (n <= ~800); with two threads on a loaded two-core machine
    torch's OpenMP barriers dominate (a float64 dilated conv of 138 samples took 4.3 s on two
    threads, 2.4 ms on one). Import this fixture into a test module to activate it there.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    blas = _openblas_handles()
    blas_old = [get() for get, _ in blas]
    for _, set_ in blas:
        set_(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)
        for (_, set_), n in zip(blas, blas_old):
            set_(n)


def _openblas_handles() -> list[tuple[Any, Any]]:
    """(get, set) thread-count functions of every OpenBLAS that NumPy / SciPy loaded, found
    by name in /proc/self/maps (best effort: none on other platforms or builds).

    The same oversubscription hits LAPACK: an eigh of 768 x 768 took 6.7 s with OpenBLAS's
    default threads on the loaded test machine and 0.1 s with one.
    """
    import ctypes

    handles = []
    try:
        with open("/proc/self/maps") as fh:
            paths = sorted({line.split()[-1] for line in fh if "openblas" in line and line.split()[-1].startswith("/")})
    except OSError:
        return handles
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for get_name, set_name in (("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
                                   ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
                                   ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
                                   ("openblas_get_num_threads", "openblas_set_num_threads")):
            get, set_ = getattr(lib, get_name, None), getattr(lib, set_name, None)
            if get is not None and set_ is not None:
                get.restype, get.argtypes = ctypes.c_int, []
                set_.restype, set_.argtypes = None, [ctypes.c_int]
                handles.append((get, set_))
                break
    return handles


# ---------------------------------------------------------------------------------------
# The oracle
# ---------------------------------------------------------------------------------------
def float64_copy(module: nn.Module) -> nn.Module:
    """A float64, eval-mode deep copy (the original is left untouched)."""
    return copy.deepcopy(module).double().eval()


def dense_matrix(module: nn.Module, in_shape: tuple[int, ...]) -> np.ndarray:
    """The ``(m, n)`` matrix of the linear part of ``module`` on inputs of ``in_shape``,
    built by brute force: ``A[:, i] = module(e_i) - module(0)`` in float64."""
    mod = float64_copy(module)
    n = int(math.prod(in_shape))
    with torch.no_grad():
        eye = torch.eye(n, dtype=torch.float64).reshape(n, *in_shape)
        cols = mod(eye) - mod(torch.zeros(1, *in_shape, dtype=torch.float64))
    return cols.reshape(n, -1).T.contiguous().numpy().copy()


def out_shape_of(module: nn.Module, in_shape: tuple[int, ...]) -> tuple[int, ...]:
    with torch.no_grad():
        return tuple(float64_copy(module)(torch.zeros(1, *in_shape, dtype=torch.float64)).shape[1:])


def singular_values(a: np.ndarray) -> np.ndarray:
    """All ``min(m, n)`` singular values, descending (an empty matrix has none)."""
    if a.size == 0:
        return np.zeros(0)
    return np.linalg.svd(a, compute_uv=False)


def rank(a: np.ndarray) -> int:
    if a.size == 0:
        return 0
    return int(np.linalg.matrix_rank(a))


def nullspace(a: np.ndarray) -> np.ndarray:
    """Orthonormal columns spanning ``N(A)``, shape ``(n, n - rank)``."""
    if a.shape[0] == 0:
        return np.eye(a.shape[1])
    return scipy.linalg.null_space(a)


def projector(a: np.ndarray) -> np.ndarray:
    """The orthogonal projector ``N N^T`` onto the nullspace of ``a``."""
    nb = nullspace(a)
    return nb @ nb.T


def spectral_norm(a: np.ndarray) -> float:
    sv = singular_values(a)
    return float(sv[0]) if sv.size else 0.0


def condition_of_nonzero(a: np.ndarray) -> float:
    """``sigma_1 / sigma_r`` over the non-zero singular values (1 for a zero matrix)."""
    sv = singular_values(a)
    r = rank(a)
    if r == 0:
        return 1.0
    return float(sv[0] / sv[r - 1])


def rank_is_clear(a: np.ndarray, *, zero: float = 1e-12, nonzero: float = 1e-7) -> bool:
    """Whether the numerical rank is unambiguous: every singular value is either below
    ``zero * sigma_1`` or above ``nonzero * sigma_1`` (so any sane threshold agrees)."""
    sv = singular_values(a)
    if sv.size == 0 or sv[0] == 0:
        return True
    rel = sv / sv[0]
    return bool(np.all((rel <= zero) | (rel >= nonzero)))


def smallest_nonzero_singular_values(a: np.ndarray, k: int) -> np.ndarray:
    sv = singular_values(a)
    r = rank(a)
    return np.sort(sv[:r])[:k]


# ---------------------------------------------------------------------------------------
# Layer configurations
# ---------------------------------------------------------------------------------------
@dataclass
class LayerConfig:
    """A recipe for one small layer: ``make()`` builds a fresh float32 module in eval mode."""

    kind: str
    in_shape: tuple[int, ...]
    params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    degenerate: str = "none"

    def __repr__(self) -> str:
        return (f"LayerConfig({self.kind!r}, in_shape={self.in_shape}, params={self.params}, seed={self.seed}, "
                f"degenerate={self.degenerate!r})")

    @property
    def n(self) -> int:
        return int(math.prod(self.in_shape))

    def make(self) -> nn.Module:
        # offset, so that weights never replay the stream of a sampler seeded with a small int
        gen = torch.Generator().manual_seed(1_000_003 + self.seed)
        module = _BUILDERS[self.kind](self, gen)
        return module.eval()


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64).float()


def _dyadic(gen: torch.Generator, *shape: int) -> torch.Tensor:
    """Small integers over 8: exactly representable and exactly summable in float32."""
    return (torch.randint(-8, 9, shape, generator=gen).double() / 8).float()


def _degenerate_rows(w: torch.Tensor, how: str, gen: torch.Generator) -> torch.Tensor:
    """Make the first axis of ``w`` (output channels / rows) rank deficient."""
    w = w.clone()
    rows = w.shape[0]
    if how == "zero" and rows >= 1:
        w[int(torch.randint(rows, (1,), generator=gen))] = 0
    elif how == "duplicate" and rows >= 2:
        w[-1] = w[0]
    elif how == "multiple" and rows >= 2:
        w[-1] = 2 * w[0]
    elif how == "shift" and rows >= 2 and w.ndim >= 3 and w.shape[-1] >= 2:
        # kernel 1 is kernel 0 moved one tap along the last axis (Corollary 1's blind spot)
        w[0][..., -1] = 0
        w[-1] = 0
        w[-1][..., 1:] = w[0][..., :-1]
    elif how == "allzero":
        w.zero_()
    elif how == "rank1" and rows >= 2:
        u = _dyadic(gen, rows)
        w = u.view(-1, *([1] * (w.ndim - 1))) * w[0:1]
    return w


def _build_linear(cfg: LayerConfig, gen: torch.Generator) -> nn.Module:
    p = cfg.params
    layer = nn.Linear(p["in_features"], p["out_features"], bias=p["bias"])
    w = _dyadic(gen, p["out_features"], p["in_features"]) if cfg.degenerate != "none" else \
        _randn(gen, p["out_features"], p["in_features"])
    w = _degenerate_rows(w, cfg.degenerate, gen)
    if cfg.degenerate == "columns" and p["in_features"] >= 2:
        w[:, -1] = w[:, 0]
    with torch.no_grad():
        layer.weight.copy_(w)
        if layer.bias is not None:
            layer.bias.copy_(_randn(gen, p["out_features"]))
    return layer


_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _build_conv(cfg: LayerConfig, gen: torch.Generator) -> nn.Module:
    p = cfg.params
    d = len(cfg.in_shape) - 1
    conv = _CONV[d](cfg.in_shape[0], p["out_channels"], p["kernel_size"], stride=p["stride"], padding=p["padding"],
                    dilation=p["dilation"], groups=p["groups"], bias=p["bias"], padding_mode=p["padding_mode"])
    shape = tuple(conv.weight.shape)
    w = _dyadic(gen, *shape) if cfg.degenerate != "none" else _randn(gen, *shape)
    w = _degenerate_rows(w, cfg.degenerate, gen)
    with torch.no_grad():
        conv.weight.copy_(w)
        if conv.bias is not None:
            conv.bias.copy_(_randn(gen, p["out_channels"]))
    return conv


def _build_avgpool(cfg: LayerConfig, gen: torch.Generator) -> nn.Module:
    p = cfg.params
    cls = {1: nn.AvgPool1d, 2: nn.AvgPool2d}[len(cfg.in_shape) - 1]
    return cls(p["kernel_size"], stride=p["stride"], padding=p["padding"], ceil_mode=p["ceil_mode"],
               count_include_pad=p["count_include_pad"])


def _random_bn(channels: int, dims: int, gen: torch.Generator, degenerate: str) -> nn.Module:
    cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    bn = cls(channels)
    with torch.no_grad():
        bn.running_mean.copy_(_randn(gen, channels))
        bn.running_var.copy_(torch.rand(channels, generator=gen) * 3 + 0.1)
        bn.weight.copy_(_randn(gen, channels))
        bn.bias.copy_(_randn(gen, channels))
        if degenerate == "zero":
            bn.weight[0] = 0
    return bn.eval()


def _random_normalize(channels: int, gen: torch.Generator) -> Normalize:
    mean = (torch.rand(channels, generator=gen) - 0.5).tolist()
    std = (torch.rand(channels, generator=gen) * 0.5 + 0.1).tolist()
    return Normalize(mean, std)


def _build_batchnorm(cfg: LayerConfig, gen: torch.Generator) -> nn.Module:
    dims = max(1, len(cfg.in_shape) - 1)
    return _random_bn(cfg.in_shape[0], dims, gen, cfg.degenerate)


def _build_normalize(cfg: LayerConfig, gen: torch.Generator) -> nn.Module:
    return _random_normalize(cfg.in_shape[0], gen)


def _build_flatten(cfg: LayerConfig, gen: torch.Generator) -> nn.Module:
    return nn.Flatten()


def _build_norm_conv_bn(cfg: LayerConfig, gen: torch.Generator) -> nn.Module:
    conv_cfg = LayerConfig("conv", cfg.in_shape, cfg.params, seed=cfg.seed + 1, degenerate=cfg.degenerate)
    conv = _build_conv(conv_cfg, gen)
    d = len(cfg.in_shape) - 1
    return nn.Sequential(_random_normalize(cfg.in_shape[0], gen), conv,
                         _random_bn(cfg.params["out_channels"], d, gen, "none"))


def _build_flatten_linear(cfg: LayerConfig, gen: torch.Generator) -> nn.Module:
    lin_cfg = LayerConfig("linear", (cfg.n,), cfg.params, seed=cfg.seed + 1, degenerate=cfg.degenerate)
    return nn.Sequential(nn.Flatten(), _build_linear(lin_cfg, gen))


_BUILDERS = {
    "linear": _build_linear,
    "conv": _build_conv,
    "avgpool": _build_avgpool,
    "batchnorm": _build_batchnorm,
    "normalize": _build_normalize,
    "flatten": _build_flatten,
    "norm_conv_bn": _build_norm_conv_bn,
    "flatten_linear": _build_flatten_linear,
}

_DEGENERATE = st.sampled_from(["none", "none", "none", "zero", "duplicate", "multiple", "shift", "allzero", "rank1"])


@st.composite
def linear_configs(draw: st.DrawFn) -> LayerConfig:
    in_f = draw(st.integers(1, 14))
    out_f = draw(st.integers(1, 14))
    lead = draw(st.sampled_from([(), (), (), (3,), (2, 2)]))  # Linear on (..., features) too
    degenerate = draw(st.sampled_from(["none", "none", "zero", "duplicate", "multiple", "allzero", "rank1",
                                       "columns"]))
    return LayerConfig("linear", (*lead, in_f), dict(in_features=in_f, out_features=out_f,
                                                     bias=draw(st.booleans())),
                       seed=draw(st.integers(0, 2**16)), degenerate=degenerate)


def _conv_params(draw: st.DrawFn, d: int, max_n: int) -> tuple[tuple[int, ...], dict[str, Any]] | None:
    groups = draw(st.sampled_from([1, 1, 1, 2, 3]))
    c_in = groups * draw(st.integers(1, 2 if d < 3 else 1))
    c_out = groups * draw(st.integers(1, 3 if d < 3 else 2))
    kmax = {1: 5, 2: 3, 3: 2}[d]
    kernel = tuple(draw(st.integers(1, kmax)) for _ in range(d))
    dilation = tuple(draw(st.sampled_from([1, 1, 1, 1, 1, 2])) for _ in range(d))
    stride = tuple(draw(st.sampled_from([1, 1, 2, 3, 4])) for _ in range(d))
    padding_kind = draw(st.sampled_from(["int", "int", "int", "valid", "same"]))
    padding_mode = draw(st.sampled_from(["zeros", "zeros", "zeros", "reflect", "replicate", "circular"]))
    if padding_kind == "same":
        stride = (1,) * d
        padding: Any = "same"
        pads = [(dl * (k - 1) // 2, dl * (k - 1) - dl * (k - 1) // 2) for k, dl in zip(kernel, dilation)]
    elif padding_kind == "valid":
        padding = "valid"
        pads = [(0, 0)] * d
    else:
        padding = tuple(draw(st.integers(0, 2)) for _ in range(d))
        pads = [(p, p) for p in padding]
    smax = {1: 24, 2: 9, 3: 5}[d]
    spatial = []
    for i in range(d):
        eff = dilation[i] * (kernel[i] - 1) + 1
        lo = max(1, eff - sum(pads[i]))
        if padding_mode in ("reflect", "circular"):
            lo = max(lo, max(pads[i]) + 1)  # reflect needs pad < size; keep circular honest too
        if lo > smax:
            return None
        spatial.append(draw(st.integers(lo, smax)))
    in_shape = (c_in, *spatial)
    if math.prod(in_shape) > max_n:
        return None
    return in_shape, dict(out_channels=c_out, kernel_size=kernel, stride=stride, padding=padding,
                          dilation=dilation, groups=groups, padding_mode=padding_mode, bias=draw(st.booleans()))


@st.composite
def conv_configs(draw: st.DrawFn, dims: tuple[int, ...] = (1, 2, 3), max_n: int = 400,
                 kind: str = "conv") -> LayerConfig:
    d = draw(st.sampled_from(dims))
    got = _conv_params(draw, d, max_n)
    if got is None:
        from hypothesis import reject
        reject()
    in_shape, params = got
    return LayerConfig(kind, in_shape, params, seed=draw(st.integers(0, 2**16)), degenerate=draw(_DEGENERATE))


@st.composite
def avgpool_configs(draw: st.DrawFn) -> LayerConfig:
    d = draw(st.sampled_from([1, 2]))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(d))
    stride = tuple(draw(st.integers(1, 4)) for _ in range(d))
    padding = tuple(draw(st.integers(0, k // 2)) for k in kernel)
    smax = {1: 20, 2: 9}[d]
    spatial = tuple(draw(st.integers(k, smax)) for k in kernel)
    c = draw(st.integers(1, 3))
    return LayerConfig("avgpool", (c, *spatial),
                       dict(kernel_size=kernel if d > 1 else kernel[0], stride=stride if d > 1 else stride[0],
                            padding=padding if d > 1 else padding[0], ceil_mode=draw(st.booleans()),
                            count_include_pad=draw(st.booleans())),
                       seed=draw(st.integers(0, 2**16)))


@st.composite
def channel_configs(draw: st.DrawFn) -> LayerConfig:
    kind = draw(st.sampled_from(["batchnorm", "normalize", "flatten"]))
    c = draw(st.integers(1, 4))
    spatial = draw(st.sampled_from([(), (5,), (3, 4), (2, 3, 2)]))  # () is BatchNorm1d on (C,) features
    return LayerConfig(kind, (c, *spatial), {}, seed=draw(st.integers(0, 2**16)),
                       degenerate=draw(st.sampled_from(["none", "none", "zero"])))


@st.composite
def composite_configs(draw: st.DrawFn) -> LayerConfig:
    if draw(st.booleans()):
        cfg = draw(conv_configs(dims=(1, 2), max_n=300, kind="norm_conv_bn"))
        return cfg
    c = draw(st.integers(1, 3))
    spatial = draw(st.sampled_from([(4,), (3, 4), (2, 5)]))
    in_shape = (c, *spatial)
    n = math.prod(in_shape)
    out_f = draw(st.integers(1, 2 * n if n < 20 else 40))
    degenerate = draw(st.sampled_from(["none", "none", "zero", "duplicate", "multiple", "allzero", "rank1",
                                       "columns"]))
    return LayerConfig("flatten_linear", in_shape, dict(in_features=n, out_features=out_f, bias=True),
                       seed=draw(st.integers(0, 2**16)), degenerate=degenerate)


def layer_configs(*, include_identity_like: bool = True) -> st.SearchStrategy[LayerConfig]:
    """Every kind: Linear, Conv1d/2d/3d, AvgPool1d/2d, BatchNorm, Normalize, Flatten, and
    Sequentials (Normalize -> Conv -> BatchNorm, Flatten -> Linear)."""
    parts = [linear_configs(), conv_configs(), conv_configs(dims=(2,)), avgpool_configs(), composite_configs()]
    if include_identity_like:
        parts.append(channel_configs())
    return st.one_of(*parts)


def conv_only_configs(max_n: int = 400) -> st.SearchStrategy[LayerConfig]:
    return conv_configs(max_n=max_n)


# ---------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------
def flat(t: torch.Tensor) -> np.ndarray:
    """``(B, ...)`` tensor -> ``(B, n)`` float64 array."""
    return t.detach().reshape(t.shape[0], -1).to("cpu", torch.float64).numpy()


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    scale = max(float(np.linalg.norm(b)), 1e-300)
    return float(np.linalg.norm(a - b)) / scale


def random_batch(shape: tuple[int, ...], batch: int, *, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *shape, generator=gen, dtype=torch.float64).to(dtype)
