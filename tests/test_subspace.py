"""Tests of harmless.harmless_subspace / least_harmful against an independent oracle.

The oracle (tests/oracle.py) builds the layer's matrix ``A`` by applying the torch module
itself to the standard basis in float64, then takes its rank with
``numpy.linalg.matrix_rank``, its nullspace with ``scipy.linalg.null_space`` and the
projector ``P = N N^T``. Theorem 1: ``dim = n - rank(A)``.

Tolerances (stated once, used throughout):

* projections, float64 dense path:   ||P_engine d - P_oracle d|| <= 1e-10 * max(1, kappa/100) * ||d||
* projections, float32:              ||P_engine d - P_oracle d|| <= 1e-4  * max(1, kappa/100) * ||d||
  (``kappa = sigma_1 / sigma_r`` over the non-zero singular values: a subspace computed from
  a perturbed matrix tilts by ~eps * kappa, whatever the algorithm);
* harmful residual ||A P d|| / (||A|| ||d||) <= 1e-12 (float64) and <= 1e-5 (float32);
* harmlessness of a sample scaled to ||delta|| = 1e4 ||x||, in float64:
  ||layer(x + delta) - layer(x)|| <= 1e-12 * ||A|| * ||delta||, and for the whole model
  (layer -> ReLU -> Flatten -> Linear W) ||f(x + delta) - f(x)|| <= 1e-12 * ||W|| * ||A|| * ||delta||.

Models handed to ``harmless_subspace`` wrap single layers in ``nn.Sequential`` because a bare
layer passed as the model is mis-analysed (see test_bare_layer_as_model_matches_oracle).
"""

from __future__ import annotations

import os
import sys
import warnings

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))

import oracle
from oracle import LayerConfig, engine_settings, single_torch_thread  # noqa: F401

import harmless
from harmless.errors import (
    HarmlessError,
    InputError,
    NoHarmlessSubspaceError,
    PrecisionWarning,
    TooLargeError,
    UnsupportedLayerError,
)
from harmless.linalg.layers import operator_for_module
from harmless.linalg.operators import MatrixOperator
from harmless.nn import Normalize

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")

F64, F32 = torch.float64, torch.float32


def as_model(module: nn.Module) -> nn.Module:
    return module if isinstance(module, nn.Sequential) else nn.Sequential(module).eval()


def proj_tol(kappa: float, dtype: torch.dtype) -> float:
    return (1e-10 if dtype == F64 else 1e-4) * max(1.0, kappa / 100)


class Case:
    """A configuration, its module, the oracle's answers, computed once."""

    def __init__(self, cfg: LayerConfig) -> None:
        self.cfg = cfg
        self.module = cfg.make()
        self.model = as_model(self.module)
        self.shape = cfg.in_shape
        self.a = oracle.dense_matrix(self.module, cfg.in_shape)
        self.m, self.n = self.a.shape
        self.rank = oracle.rank(self.a)
        self.dim = self.n - self.rank
        self.norm = oracle.spectral_norm(self.a)
        self.kappa = oracle.condition_of_nonzero(self.a)
        self._p: np.ndarray | None = None

    @property
    def p(self) -> np.ndarray:
        if self._p is None:
            self._p = oracle.projector(self.a)
        return self._p

    def space(self, dtype: torch.dtype = F64, **kw) -> harmless.HarmlessSubspace:
        return harmless.harmless_subspace(self.model, self.shape, dtype=dtype, **kw)


# =======================================================================================
# 3. dim against the oracle, for every method that applies
# =======================================================================================
@engine_settings(120)
@given(cfg=oracle.layer_configs())
def test_dim_matches_oracle_float64(cfg: LayerConfig) -> None:
    c = Case(cfg)
    assume(oracle.rank_is_clear(c.a))
    for method in ("auto", "dense"):
        space = c.space(method=method)
        assert space.dim == c.dim, (method, space.dim, c.dim)
        assert space.rank == c.rank
        assert (space.ambient_dim, space.output_dim) == (c.n, c.m)
        assert space.input_shape == c.shape
        # "dense" is an SVD; "auto" may pick any exact route, but always one of the documented ones
        if method == "dense":
            assert space.dim_method == "dense-svd"
        else:
            assert space.dim_method in ("dense-svd", "gram-cholesky", "gram-eigh", "structure")
        assert space.rank_info.dim == c.dim
    # "structure" where it applies (TooLargeError where it does not)
    try:
        structure_dim = c.space(method="structure").dim
    except TooLargeError:
        pass
    else:
        assert structure_dim == c.dim, ("structure", structure_dim, c.dim)
    # "auto" with a tiny dense_limit walks the structure / Corollary 1 / Gram route
    try:
        space = c.space(dense_limit=1)
        auto_dim = space.dim
    except TooLargeError:
        pass
    else:
        assert auto_dim == c.dim, ("auto, dense_limit=1", space.dim_method, auto_dim, c.dim)
    # "gram" for tall operators whose smallest non-zero singular value is clear of its threshold
    if c.m >= c.n and oracle.rank_is_clear(c.a, nonzero=1e-5):
        assert c.space(method="gram").dim == c.dim


@engine_settings(80)
@given(cfg=oracle.layer_configs())
def test_dim_matches_oracle_float32(cfg: LayerConfig) -> None:
    c = Case(cfg)
    # clear by float32 standards: zeros are exact, non-zeros far above float32 round-off
    assume(oracle.rank_is_clear(c.a, zero=1e-12, nonzero=1e-4))
    for method in ("auto", "dense"):
        space = c.space(F32, method=method)
        assert space.dim == c.dim, (method, space.dim, c.dim, space.rank_info.singular_values)


def test_float32_rank_threshold_with_rounded_composite() -> None:
    """Minimal repro: a float32 space of Normalize -> Linear whose Linear has two equal
    columns. The composite matrix in float32 carries ~1e-8 relative round-off, but the rank
    threshold is float64's ``sigma_max * max(m, n) * 2.2e-16``: the zero singular value
    (~2e-8) is counted, dim 0 instead of 1."""
    norm = Normalize([0.0] * 4, [0.3, 0.7, 1.1, 1.3])
    lin = nn.Linear(4, 5)
    with torch.no_grad():
        w = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
        w[:, 1] = w[:, 0]
        lin.weight.copy_(w)
    model = nn.Sequential(norm, lin).eval()
    a = oracle.dense_matrix(model, (4,))
    assert 4 - oracle.rank(a) == 1
    assert harmless.harmless_subspace(model, (4,), dtype=F64).dim == 1
    assert harmless.harmless_subspace(model, (4,), dtype=F32).dim == 1


def test_dim_conv_bn_with_duplicated_kernels_float32() -> None:
    """The same float32 problem on the canonical image front end Conv -> BatchNorm with two
    identical kernels: rows k and k' become s_k w and s_k' w, rounded separately."""
    gen = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(2, 3, 3, stride=2, bias=False)
    bn = nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        w = torch.randn(3, 2, 3, 3, generator=gen)
        w[2] = w[0]
        conv.weight.copy_(w)
        bn.running_var.copy_(torch.tensor([0.3, 1.7, 2.9]))
        bn.weight.copy_(torch.tensor([1.3, -0.7, 0.45]))
    model = nn.Sequential(conv, bn).eval()
    shape = (2, 5, 5)
    want = 50 - oracle.rank(oracle.dense_matrix(model, shape))
    assert harmless.harmless_subspace(model, shape, dtype=F64).dim == want
    assert harmless.harmless_subspace(model, shape, dtype=F32).dim == want


# =======================================================================================
# 3. project / decompose / harmful residual against the oracle
# =======================================================================================
def _assert_projects_like_oracle(c: Case, delta: torch.Tensor, got: torch.Tensor, dtype: torch.dtype) -> None:
    """``got`` equals the oracle projector applied to ``delta``, and its harmful residual
    ``||A P d|| / (||A|| ||d||)``, measured with the oracle's matrix, is at round-off."""
    want = oracle.flat(delta) @ c.p
    dn = np.linalg.norm(oracle.flat(delta), axis=1)
    err = np.linalg.norm(oracle.flat(got) - want, axis=1) / dn
    assert np.all(err <= proj_tol(c.kappa, dtype)), (err, c.kappa)
    if c.norm > 0:
        res = np.linalg.norm(oracle.flat(got) @ c.a.T, axis=1) / (c.norm * dn)
        assert np.all(res <= (1e-12 if dtype == F64 else 1e-5)), res


@engine_settings(100)
@given(cfg=oracle.layer_configs(), dtype=st.sampled_from([F64, F32]), seed=st.integers(0, 10_000))
def test_project_matches_oracle_projector(cfg: LayerConfig, dtype: torch.dtype, seed: int) -> None:
    c = Case(cfg)
    assume(oracle.rank_is_clear(c.a) and c.kappa <= 1e6)
    space = c.space(dtype)
    if dtype == F32:
        assume(space.dim == c.dim)  # float32 dims are tested (and can fail) above
    delta = oracle.random_batch(c.shape, 3, seed=seed)
    got = space.project(delta)
    assert got.shape == delta.shape and got.dtype == dtype
    _assert_projects_like_oracle(c, delta, got, dtype)
    # projecting twice changes nothing
    again = space.project(got)
    dn = np.linalg.norm(oracle.flat(delta), axis=1)
    assert np.all(np.linalg.norm(oracle.flat(again - got), axis=1) / dn <= proj_tol(c.kappa, dtype))


@engine_settings(30)
@given(cfg=oracle.layer_configs(), seed=st.integers(0, 10_000))
def test_decompose_sums_back_and_is_orthogonal(cfg: LayerConfig, seed: int) -> None:
    c = Case(cfg)
    assume(oracle.rank_is_clear(c.a) and c.kappa <= 1e6)
    space = c.space()
    delta = oracle.random_batch(c.shape, 3, seed=seed)
    harmless_part, harmful_part = space.decompose(delta)
    d, h, g = oracle.flat(delta), oracle.flat(harmless_part), oracle.flat(harmful_part)
    dn = np.linalg.norm(d, axis=1)
    assert np.all(np.linalg.norm(h + g - d, axis=1) <= 1e-14 * dn)
    assert np.all(np.abs(np.sum(h * g, axis=1)) <= 1e-10 * max(1.0, c.kappa / 100) * dn**2)
    torch.testing.assert_close(harmless_part, space.project(delta), rtol=0, atol=0)
    want_g = d - d @ c.p
    assert np.all(np.linalg.norm(g - want_g, axis=1) <= proj_tol(c.kappa, F64) * dn)


@engine_settings(30)
@given(cfg=oracle.layer_configs(), seed=st.integers(0, 10_000))
def test_harmful_residual_matches_oracle(cfg: LayerConfig, seed: int) -> None:
    c = Case(cfg)
    assume(c.norm > 0)
    space = c.space()
    delta = oracle.random_batch(c.shape, 3, seed=seed)
    got = space.harmful_residual(delta).numpy()
    d = oracle.flat(delta)
    want = np.linalg.norm(d @ c.a.T, axis=1) / (c.norm * np.linalg.norm(d, axis=1))
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-15)


# =======================================================================================
# 3. harmless samples do not change the layer's nor the model's output
# =======================================================================================
@engine_settings(60)
@given(cfg=oracle.layer_configs(), seed=st.integers(0, 10_000))
def test_scaled_harmless_samples_leave_layer_and_model_output_unchanged(cfg: LayerConfig, seed: int) -> None:
    c = Case(cfg)
    assume(c.dim > 0 and oracle.rank_is_clear(c.a))
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(c.m, 5)
    with torch.no_grad():
        head.weight.copy_(torch.randn(5, c.m, generator=gen))
    model = nn.Sequential(c.module, nn.ReLU(), nn.Flatten(), head).eval()
    space = harmless.harmless_subspace(model, c.shape)
    assert space.run is not None and space.run.stopped_at is not None and "ReLU" in space.run.stopped_at
    assert space.dim == c.dim
    samples = space.sample(4, generator=gen)
    x = torch.randn(4, *c.shape, generator=gen, dtype=F64)
    xn = x.reshape(4, -1).norm(dim=1)
    delta = samples * (1e4 * xn).view(-1, *([1] * len(c.shape)))
    dn = delta.reshape(4, -1).norm(dim=1).numpy()
    model64 = oracle.float64_copy(model)
    with torch.no_grad():
        layer_diff = (model64[0](x + delta) - model64[0](x)).reshape(4, -1).norm(dim=1).numpy()
        out_diff = (model64(x + delta) - model64(x)).reshape(4, -1).norm(dim=1).numpy()
    w_norm = float(torch.linalg.matrix_norm(head.weight.double(), ord=2))
    assert np.all(layer_diff <= 1e-12 * c.norm * dn), (layer_diff, c.norm * dn)
    assert np.all(out_diff <= 1e-12 * w_norm * c.norm * dn), (out_diff, w_norm * c.norm * dn)
    # the same perturbations are clearly harmful when not projected (sanity of the check)
    if c.norm > 0:
        raw = torch.randn(4, *c.shape, generator=gen, dtype=F64)
        raw = raw / raw.reshape(4, -1).norm(dim=1).view(-1, *([1] * len(c.shape))) * (1e4 * xn).view(
            -1, *([1] * len(c.shape)))
        with torch.no_grad():
            raw_diff = (model64[0](x + raw) - model64[0](x)).reshape(4, -1).norm(dim=1).numpy()
        assert np.all(raw_diff > 1e-6 * c.norm * dn)


# =======================================================================================
# 3. samples, contains, basis
# =======================================================================================
@engine_settings(40)
@given(cfg=oracle.layer_configs(), dtype=st.sampled_from([F64, F32]), seed=st.integers(0, 10_000))
def test_sample_properties(cfg: LayerConfig, dtype: torch.dtype, seed: int) -> None:
    c = Case(cfg)
    assume(c.dim > 0 and oracle.rank_is_clear(c.a) and c.kappa <= 1e6)
    space = c.space(dtype)
    if dtype == F32:
        assume(space.dim == c.dim)
    s1 = space.sample(5, generator=torch.Generator().manual_seed(seed))
    s2 = space.sample(5, generator=torch.Generator().manual_seed(seed))
    s3 = space.sample(5, generator=torch.Generator().manual_seed(seed + 1))
    assert s1.shape == (5, *c.shape) and s1.dtype == dtype
    assert torch.equal(s1, s2), "same seed, different samples"
    assert not torch.equal(s1, s3)
    assert torch.equal(space.sample(2), space.sample(2)), "the default generator is not deterministic"
    norms = s1.reshape(5, -1).norm(dim=1).double()
    torch.testing.assert_close(norms, torch.ones(5, dtype=F64), rtol=0, atol=1e-12 if dtype == F64 else 1e-6)
    assert bool(space.contains(s1).all())
    # relative to the sample's own norm: float32 round-off in P g is amplified by ||g|| / ||P g||
    assert float(space.harmful_residual(s1).max()) <= (1e-12 if dtype == F64 else 1e-4)
    # in the oracle's nullspace
    sf = oracle.flat(s1)
    assert np.all(np.linalg.norm(sf - sf @ c.p, axis=1) <= proj_tol(c.kappa, dtype))
    # random perturbations are not harmless when the subspace is not everything
    if c.dim < c.n:
        rnd = oracle.random_batch(c.shape, 5, seed=seed, dtype=dtype)
        assert not bool(space.contains(rnd).any())


@pytest.mark.parametrize("dtype", [F64, F32])
def test_sample_is_finite_when_a_draw_lies_in_the_row_space(dtype) -> None:
    """sample() divides P g by ||P g|| without a guard. With the default generator (seed 0)
    and a layer whose weight row is that generator's first draw, P g is exactly 0 in
    float32 and the sample is NaN (in float64 it is round-off noise scaled to norm 1)."""
    w = torch.randn(1, 4, generator=torch.Generator().manual_seed(0), dtype=F64).float()
    lin = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    space = harmless.harmless_subspace(nn.Sequential(lin).eval(), (4,), dtype=dtype)
    assert space.dim == 3
    s = space.sample(3)
    assert bool(torch.isfinite(s).all()), s
    torch.testing.assert_close(s.norm(dim=1).double(), torch.ones(3, dtype=F64), rtol=0, atol=1e-6)
    assert float(space.harmful_residual(s).max()) <= (1e-12 if dtype == F64 else 1e-5)


@engine_settings(60)
@given(cfg=oracle.layer_configs())
def test_basis_orthonormal_and_spans_oracle_nullspace(cfg: LayerConfig) -> None:
    c = Case(cfg)
    assume(oracle.rank_is_clear(c.a) and c.kappa <= 1e6)
    space = c.space()
    b = space.basis()
    assert b.shape == (c.dim, *c.shape) and b.dtype == F64
    bf = oracle.flat(b) if c.dim else np.zeros((0, c.n))
    np.testing.assert_allclose(bf @ bf.T, np.eye(c.dim), atol=1e-12)
    np.testing.assert_allclose(bf.T @ bf, c.p, atol=proj_tol(c.kappa, F64))
    if c.dim:
        assert bool(space.contains(b).all())


@engine_settings(25)
@given(cfg=oracle.layer_configs())
def test_gram_method_basis_spans_oracle_nullspace(cfg: LayerConfig) -> None:
    c = Case(cfg)
    assume(c.m >= c.n and oracle.rank_is_clear(c.a, nonzero=1e-5) and c.kappa <= 1e4)
    space = c.space(method="gram")
    assert space.dim_method.startswith("gram") and space.dim == c.dim
    bf = oracle.flat(space.basis()) if c.dim else np.zeros((0, c.n))
    np.testing.assert_allclose(bf @ bf.T, np.eye(c.dim), atol=1e-10)
    np.testing.assert_allclose(bf.T @ bf, c.p, atol=1e-9 * max(1.0, c.kappa / 100))


@engine_settings(25)
@given(cfg=oracle.layer_configs(), seed=st.integers(0, 10_000))
def test_batch_results_equal_per_sample_results(cfg: LayerConfig, seed: int) -> None:
    c = Case(cfg)
    space = c.space()
    delta = oracle.random_batch(c.shape, 4, seed=seed)
    proj = space.project(delta)
    harmless_part, harmful_part = space.decompose(delta)
    res = space.harmful_residual(delta)
    cont = space.contains(delta)
    for i in range(4):
        one = delta[i:i + 1]
        torch.testing.assert_close(space.project(one)[0], proj[i], rtol=1e-12, atol=1e-13)
        h1, g1 = space.decompose(one)
        torch.testing.assert_close(h1[0], harmless_part[i], rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(g1[0], harmful_part[i], rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(space.harmful_residual(one)[0], res[i], rtol=1e-12, atol=1e-15)
        assert bool(space.contains(one)[0]) == bool(cont[i])


@engine_settings(25)
@given(cfg=oracle.layer_configs(), seed=st.integers(0, 10_000), delta_dtype=st.sampled_from([F64, F32]))
def test_inputs_are_not_modified(cfg: LayerConfig, seed: int, delta_dtype: torch.dtype) -> None:
    c = Case(cfg)
    state = {k: v.clone() for k, v in c.model.state_dict().items()}
    space = c.space()
    delta = oracle.random_batch(c.shape, 3, seed=seed, dtype=delta_dtype)
    before = delta.clone()
    outs = [space.project(delta), *space.decompose(delta), space.harmful_residual(delta), space.contains(delta)]
    assert torch.equal(delta, before)
    # the results do not alias the input either: writing into them leaves delta alone
    for out in outs[:3]:
        out.add_(1.0)
    assert torch.equal(delta, before)
    for k, v in c.model.state_dict().items():
        assert torch.equal(v, state[k]), k


# =======================================================================================
# 4. the matrix-free path (CGLS), forced with dense_limit=1
# =======================================================================================
@engine_settings(50)
@given(cfg=oracle.layer_configs(), seed=st.integers(0, 10_000))
def test_matrix_free_project_matches_oracle_float64(cfg: LayerConfig, seed: int) -> None:
    c = Case(cfg)
    assume(oracle.rank_is_clear(c.a) and c.kappa <= 1e4)
    space = c.space(dense_limit=1)
    delta = oracle.random_batch(c.shape, 3, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)
        got = space.project(delta)
    _assert_projects_like_oracle(c, delta, got, F64)


@engine_settings(20)
@given(cfg=oracle.layer_configs(), seed=st.integers(0, 10_000))
def test_matrix_free_project_matches_oracle_float32(cfg: LayerConfig, seed: int) -> None:
    c = Case(cfg)
    assume(oracle.rank_is_clear(c.a) and c.kappa <= 1e3)
    space = c.space(F32, dense_limit=1)
    delta = oracle.random_batch(c.shape, 3, seed=seed, dtype=F32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)
        got = space.project(delta)
    assert got.dtype == F32
    want = oracle.flat(delta) @ c.p
    dn = np.linalg.norm(oracle.flat(delta), axis=1)
    err = np.linalg.norm(oracle.flat(got) - want, axis=1) / dn
    assert np.all(err <= proj_tol(c.kappa, F32)), (err, c.kappa)


def _conv16(c_out: int, k: int, stride: int, padding: int, *, duplicate: bool = False, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(3, c_out, k, stride=stride, padding=padding)
    with torch.no_grad():
        w = torch.randn(conv.weight.shape, generator=gen)
        if duplicate:
            w[-1] = w[0]
            w[-2] = 2 * w[1]
        conv.weight.copy_(w)
    return conv.eval()


@pytest.mark.parametrize("c_out,k,stride,padding,duplicate", [
    (4, 3, 1, 1, False),   # tall and injective: project ~ 0
    (2, 3, 2, 1, False),   # wide, overlapping windows (Corollary 1 route)
    (5, 3, 2, 0, False),   # wide, some pixels read by no window
    (8, 4, 4, 0, True),    # disjoint windows, duplicated kernels (rank deficient)
    (6, 3, 1, 1, True),    # tall but rank deficient: duplicated / doubled kernels
])
def test_matrix_free_project_on_3x16x16_conv(c_out, k, stride, padding, duplicate) -> None:
    shape = (3, 16, 16)
    conv = _conv16(c_out, k, stride, padding, duplicate=duplicate)
    a = oracle.dense_matrix(conv, shape)
    p = oracle.projector(a)
    kappa = oracle.condition_of_nonzero(a)
    norm = oracle.spectral_norm(a)
    space = harmless.harmless_subspace(nn.Sequential(conv).eval().eval(), shape, dense_limit=1)
    delta = oracle.random_batch(shape, 3, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)
        got = space.project(delta)
    # An injective layer (dim 0, certified) needs no solve: its harmless part is zero.
    assert (space.last_solve is not None and space.last_solve.converged) or space.dim == 0
    d = oracle.flat(delta)
    dn = np.linalg.norm(d, axis=1)
    err = np.linalg.norm(oracle.flat(got) - d @ p, axis=1) / dn
    assert np.all(err <= proj_tol(kappa, F64)), err
    res = np.linalg.norm(oracle.flat(got) @ a.T, axis=1) / (norm * dn)
    assert np.all(res <= 1e-12), res
    # where an exact matrix-free rank exists, it agrees with the oracle
    try:
        dim = space.dim
    except TooLargeError:
        return
    assert dim == a.shape[1] - oracle.rank(a), space.dim_method


# =======================================================================================
# Rank by structure (rank.py's non-dense routes) against the oracle
# =======================================================================================
@st.composite
def disjoint_conv_configs(draw: st.DrawFn) -> LayerConfig:
    """Convolutions whose windows never overlap (effective kernel <= stride), zero padding."""
    d = draw(st.sampled_from([1, 2]))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(d))
    dilation = tuple(draw(st.sampled_from([1, 1, 2])) for _ in range(d))
    eff = [dl * (k - 1) + 1 for k, dl in zip(kernel, dilation)]
    stride = tuple(e + draw(st.integers(0, 2)) for e in eff)
    padding = tuple(draw(st.integers(0, 2)) for _ in range(d))
    groups = draw(st.sampled_from([1, 1, 2]))
    c_in, c_out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 4))
    smax = 20 if d == 1 else 8
    spatial = tuple(draw(st.integers(max(1, e - 2 * p), smax)) for e, p in zip(eff, padding))
    return LayerConfig("conv", (c_in, *spatial), dict(out_channels=c_out, kernel_size=kernel, stride=stride,
                                                      padding=padding, dilation=dilation, groups=groups,
                                                      padding_mode="zeros", bias=False),
                       seed=draw(st.integers(0, 2**16)),
                       degenerate=draw(st.sampled_from(["none", "zero", "duplicate", "multiple", "rank1"])))


@engine_settings(80)
@given(cfg=disjoint_conv_configs())
def test_structure_rank_of_disjoint_windows_matches_oracle(cfg: LayerConfig) -> None:
    c = Case(cfg)
    assume(oracle.rank_is_clear(c.a))
    space = c.space(method="structure")
    assert space.dim == c.dim


def test_structure_drops_bijective_factors() -> None:
    gen = torch.Generator().manual_seed(4)
    conv = nn.Conv2d(2, 3, 2, stride=2, bias=False)
    with torch.no_grad():
        w = torch.randn(conv.weight.shape, generator=gen)
        w[2] = w[0] + w[1]  # rank-2 kernel matrix: one harmless direction per window
        conv.weight.copy_(w)
    model = nn.Sequential(Normalize([0.1, 0.2], [0.3, 0.4]), conv, nn.BatchNorm2d(3).eval()).eval()
    shape = (2, 6, 5)
    want = 60 - oracle.rank(oracle.dense_matrix(model, shape))
    space = harmless.harmless_subspace(model, shape, method="structure")
    assert space.dim == want


def test_structure_route_on_random_wide_conv_meeting_corollary1() -> None:
    from harmless.linalg.operators import ConvOperator
    from harmless.linalg.rank import corollary1_conditions

    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(3, 2, 3, stride=2, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
    shape = (3, 10, 9)
    a = oracle.dense_matrix(conv, shape)
    op = ConvOperator(conv.weight, shape, stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
    assert corollary1_conditions(op) == []
    space = harmless.harmless_subspace(nn.Sequential(conv).eval().eval(), shape, method="structure")
    assert space.dim_method == "gram-cholesky"  # full row rank certified, not assumed
    assert space.dim == a.shape[1] - oracle.rank(a) == a.shape[1] - a.shape[0]


def _assert_matrix_free_dims_agree(c: Case) -> None:
    """Every matrix-free rank route that answers agrees with the dense oracle."""
    for kwargs in (dict(method="structure"), dict(dense_limit=1)):
        try:
            dim = c.space(**kwargs).dim
        except TooLargeError:
            continue
        assert dim == c.dim, (kwargs, dim, c.dim)


@pytest.mark.parametrize("length", [10, 30, 60])
def test_corollary1_not_fooled_by_shifted_kernels(length: int) -> None:
    """Kernels [a, b, 0] and [0, a, b] (per channel) are linearly independent, the kernel is
    wider than the stride and every pixel is read, so Corollary 1's conditions hold; but
    kernel 0 at position o+1 equals kernel 1 at position o, so the rows are dependent:
    rank = length - 1 < m. The structure route must either give the oracle's dim or raise
    TooLargeError; it must never certify full row rank."""
    gen = torch.Generator().manual_seed(0)
    a2 = torch.randn(2, 2, generator=gen)
    conv = nn.Conv1d(2, 2, 3, bias=False)
    with torch.no_grad():
        w = torch.zeros(2, 2, 3)
        w[0, :, 0:2] = a2
        w[1, :, 1:3] = a2
        conv.weight.copy_(w)
    shape = (2, length)
    a = oracle.dense_matrix(conv, shape)
    want = 2 * length - oracle.rank(a)
    assert want > 2 * length - a.shape[0]  # rank deficient beyond n - m
    for kwargs in (dict(method="structure"), dict(dense_limit=1)):
        space = harmless.harmless_subspace(nn.Sequential(conv).eval().eval(), shape, **kwargs)
        try:
            dim = space.dim
        except TooLargeError:
            continue
        assert dim == want, (kwargs, space.dim_method, dim, want, space.rank_info.notes)


@pytest.mark.parametrize("padding_mode,length", [("reflect", 7), ("replicate", 12), ("circular", 30)])
def test_corollary1_with_non_zero_padding_modes(padding_mode: str, length: int) -> None:
    """A 1x1 grouped conv with padding 1 in reflect/replicate/circular mode: the outputs at
    the padded positions repeat interior outputs, so rank = 21 < m = 27 (for length 7), although
    the kernels are independent. Corollary 1 is a zero-padding result; the structure route
    applies it anyway and Lanczos (eigsh 'SA') misses the 6-fold zero eigenvalue of A A^T
    (it returns 1.24), certifying full row rank: dim 15 instead of 21."""
    cfg = LayerConfig("conv", (6, length), dict(out_channels=3, kernel_size=(1,), stride=(1,), padding=(1,),
                                                dilation=(1,), groups=3, padding_mode=padding_mode, bias=False),
                      seed=0)
    c = Case(cfg)
    assert c.rank < c.m
    _assert_matrix_free_dims_agree(c)


def test_structure_route_with_a_single_output() -> None:
    """A conv whose kernel covers its whole input has m = 1 output: corollary1_rank calls
    eigsh(k=1) on a 1 x 1 operator and SciPy raises TypeError("... k >= N"), which escapes
    as a non-harmless error."""
    conv = nn.Conv1d(1, 1, 4, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[1.0, -2.0, 0.5, 3.0]]]))
    for kwargs in (dict(method="structure"), dict(dense_limit=1)):
        space = harmless.harmless_subspace(nn.Sequential(conv).eval().eval(), (1, 4), **kwargs)
        try:
            dim = space.dim
        except TooLargeError:
            continue
        assert dim == 3


def test_structure_on_linear_uses_the_small_gram_matrix() -> None:
    model = nn.Sequential(nn.Linear(6, 3)).eval()
    space = harmless.harmless_subspace(model, (6,), method="structure")
    assert space.dim == 3 and space.dim_method.startswith("gram")


def test_too_large_for_every_exact_method_says_so_and_names_corollary1() -> None:
    from harmless.linalg.operators import ConvOperator
    from harmless.linalg.rank import analyze_rank

    weight = torch.randn(3, 3, 3, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    # Stride 1 and m = n = 270: the sweep certificate cannot decide it (the last windows read
    # no new pixel), so no structural method applies.
    op = ConvOperator(weight, (3, 10, 9), stride=(1, 1), padding=(1, 1), dilation=(1, 1))
    with pytest.raises(TooLargeError, match="no exact rank method") as exc:
        analyze_rank(op, method="structure", gram_limit=10)
    assert "Corollary 1" in str(exc.value) and "sweep certificate does not apply" in str(exc.value)


# =======================================================================================
# 5. least_harmful
# =======================================================================================
@engine_settings(50)
@given(cfg=oracle.layer_configs(), k=st.integers(1, 3))
def test_least_harmful_with_nullspace_gives_smallest_nonzero_singular_values(cfg: LayerConfig, k: int) -> None:
    c = Case(cfg)
    assume(0 < c.dim and c.rank >= 1 and oracle.rank_is_clear(c.a))
    k = min(k, c.rank)
    vecs, gains = harmless.least_harmful(c.model, c.shape, k=k)
    assert vecs.shape == (k, *c.shape) and gains.shape == (k,)
    g = gains.numpy()
    assert np.all(np.diff(g) >= 0), "gains not ascending"
    want = oracle.smallest_nonzero_singular_values(c.a, k)
    np.testing.assert_allclose(g, want, rtol=0, atol=1e-12 * c.norm)
    vf = oracle.flat(vecs)
    np.testing.assert_allclose(np.linalg.norm(vf @ c.a.T, axis=1), g, rtol=0, atol=1e-12 * c.norm)
    np.testing.assert_allclose(np.linalg.norm(vf, axis=1), 1, atol=1e-12)
    # outside the harmless subspace: orthogonal to the oracle's nullspace
    assert np.all(np.linalg.norm(vf @ c.p, axis=1) <= proj_tol(c.kappa, F64))


@engine_settings(30)
@given(cfg=oracle.layer_configs(), k=st.integers(1, 3))
def test_least_harmful_on_injective_layers_gives_smallest_singular_values(cfg: LayerConfig, k: int) -> None:
    c = Case(cfg)
    assume(c.dim == 0 and oracle.rank_is_clear(c.a))
    k = min(k, c.n)
    vecs, gains = harmless.least_harmful(c.model, c.shape, k=k)
    g = gains.numpy()
    assert np.all(np.diff(g) >= 0)
    np.testing.assert_allclose(g, np.sort(oracle.singular_values(c.a))[:k], rtol=0, atol=1e-12 * c.norm)
    np.testing.assert_allclose(np.linalg.norm(oracle.flat(vecs) @ c.a.T, axis=1), g, atol=1e-12 * c.norm)


def test_least_harmful_k1_with_nullspace_minimal() -> None:
    """Linear(4 -> 1): rank 1, dim 3; the least harmful direction is the weight row."""
    lin = nn.Linear(4, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0, 0.5, 3.0]]))
    vecs, gains = harmless.least_harmful(nn.Sequential(lin).eval(), (4,), k=1)
    assert float(gains[0]) == pytest.approx(float(np.linalg.norm([1.0, -2.0, 0.5, 3.0])), rel=1e-12)
    assert abs(float(vecs[0] @ lin.weight[0].double())) == pytest.approx(float(gains[0]), rel=1e-12)


def test_least_harmful_injective_linear_minimal() -> None:
    """Lemma 2's case: an injective layer (n <= m). dense_svd_rank leaves row_basis None
    when rank == n, and least_harmful indexes it: TypeError."""
    gen = torch.Generator().manual_seed(0)
    lin = nn.Linear(4, 6)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(6, 4, generator=gen))
    a = oracle.dense_matrix(lin, (4,))
    vecs, gains = harmless.least_harmful(nn.Sequential(lin).eval(), (4,), k=2)
    sv = np.sort(oracle.singular_values(a))
    np.testing.assert_allclose(gains.numpy(), sv[:2], atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(oracle.flat(vecs) @ a.T, axis=1), sv[:2], atol=1e-12)


def test_least_harmful_injective_conv_matches_oracle_smallest_singular_value() -> None:
    conv = _conv16(4, 3, 1, 1)
    shape = (3, 8, 8)
    a = oracle.dense_matrix(conv, shape)
    assert oracle.rank(a) == a.shape[1]
    vecs, gains = harmless.least_harmful(nn.Sequential(conv).eval(), shape, k=1)
    assert float(gains[0]) == pytest.approx(oracle.singular_values(a)[-1], abs=1e-12 * oracle.spectral_norm(a))


def test_least_harmful_iterative_injective_matches_oracle() -> None:
    """dense_limit=1 takes the Lanczos route; on an injective tall operator it is right."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(9, 5, generator=gen, dtype=F64)
    op = MatrixOperator(w)
    vecs, gains = harmless.least_harmful(op, (5,), k=2, dense_limit=1)
    sv = np.sort(np.linalg.svd(w.numpy(), compute_uv=False))
    np.testing.assert_allclose(gains.numpy(), sv[:2], rtol=1e-8)


def test_least_harmful_iterative_wide_full_row_rank_matches_oracle() -> None:
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(4, 10, generator=gen, dtype=F64)
    vecs, gains = harmless.least_harmful(MatrixOperator(w), (10,), k=2, dense_limit=1)
    sv = np.sort(np.linalg.svd(w.numpy(), compute_uv=False))
    np.testing.assert_allclose(gains.numpy(), sv[:2], rtol=1e-8)


def test_least_harmful_iterative_wide_rank_deficient_rows() -> None:
    """m < n with dependent rows: A A^T is singular, so the smallest eigenvalues Lanczos
    returns are zeros; v = A^T u / sqrt(tiny) is noise. The gains must still be the
    smallest NON-zero singular values (the dense route gets this right)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4, 10, generator=gen, dtype=F64)
    w[3] = w[2]
    op = MatrixOperator(w)
    want = oracle.smallest_nonzero_singular_values(w.numpy(), 2)
    _, dense_gains = harmless.least_harmful(op, (10,), k=2)
    np.testing.assert_allclose(dense_gains.numpy(), want, rtol=1e-10)
    try:
        _, gains = harmless.least_harmful(op, (10,), k=2, dense_limit=1)
    except TooLargeError:
        return  # refusing is acceptable; a wrong answer is not
    np.testing.assert_allclose(gains.numpy(), want, rtol=1e-6)


def test_least_harmful_iterative_k_equal_to_n() -> None:
    """k = n (= rank) is valid; the Lanczos route must not crash with SciPy's TypeError."""
    w = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    sv = np.sort(np.linalg.svd(w.numpy(), compute_uv=False))
    try:
        _, gains = harmless.least_harmful(MatrixOperator(w), (3,), k=3, dense_limit=1)
    except HarmlessError:
        return
    np.testing.assert_allclose(gains.numpy(), sv, rtol=1e-8)


def test_least_harmful_k_above_rank_raises() -> None:
    lin = nn.Sequential(nn.Linear(6, 2)).eval()
    with pytest.raises(InputError, match="exceeds the rank 2"):
        harmless.least_harmful(lin, (6,), k=3)


@pytest.mark.parametrize("k", [0, -1, 1.5, "2", None])
def test_least_harmful_bad_k_raises(k) -> None:
    with pytest.raises(InputError, match="k must be a positive int"):
        harmless.least_harmful(nn.Sequential(nn.Linear(6, 2)).eval(), (6,), k=k)


# =======================================================================================
# A bare layer passed as the model
# =======================================================================================
@pytest.mark.parametrize("make,shape", [
    (lambda: nn.Linear(6, 2), (6,)),
    (lambda: nn.Conv2d(3, 2, 3, stride=2), (3, 8, 8)),
    (lambda: nn.AvgPool2d(2), (1, 4, 4)),
], ids=["Linear", "Conv2d", "AvgPool2d"])
def test_bare_layer_as_model_matches_oracle(make, shape) -> None:
    """harmless_subspace(nn.Conv2d(...), shape): fx traces *into* the root module (the leaf
    rule never applies to the root), sees F.conv2d as a call_function it does not know, and
    stops before any layer: an identity prefix, dim 0."""
    torch.manual_seed(0)
    layer = make().eval()
    a = oracle.dense_matrix(layer, shape)
    want = a.shape[1] - oracle.rank(a)
    assert want > 0
    assert harmless.harmless_subspace(layer, shape).dim == want


def test_operator_passed_directly() -> None:
    conv = _conv16(2, 3, 2, 1)
    shape = (3, 8, 8)
    op = operator_for_module(conv, shape)
    a = oracle.dense_matrix(conv, shape)
    space = harmless.harmless_subspace(op, shape)
    assert space.run is None
    assert space.dim == 192 - oracle.rank(a)
    space_list = harmless.harmless_subspace(op, list(shape))
    assert space_list.dim == space.dim


# =======================================================================================
# 7. every error path, one check per test
# =======================================================================================
LIN = (6,)


def _lin_model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 2)).eval()


def _space() -> harmless.HarmlessSubspace:
    return harmless.harmless_subspace(_lin_model(), LIN)


@pytest.mark.parametrize("shape", [5, None, object()], ids=["int", "None", "object"])
def test_input_shape_not_a_sequence(shape) -> None:
    with pytest.raises(InputError, match="input_shape"):
        harmless.harmless_subspace(_lin_model(), shape)


def test_input_shape_empty() -> None:
    with pytest.raises(InputError, match="input_shape must be a non-empty"):
        harmless.harmless_subspace(_lin_model(), ())


@pytest.mark.parametrize("shape", [(0,), (-6,), (6, 0)])
def test_input_shape_non_positive(shape) -> None:
    with pytest.raises(InputError, match="positive integers"):
        harmless.harmless_subspace(_lin_model(), shape)


def test_input_shape_with_non_integral_float() -> None:
    """(6.7,) must be refused, not silently truncated to (6,)."""
    with pytest.raises(InputError, match="input_shape"):
        harmless.harmless_subspace(_lin_model(), (6.7,))


def test_input_shape_given_as_string() -> None:
    """"12" is not a shape; it must not be read as (1, 2)."""
    with pytest.raises(InputError, match="input_shape"):
        harmless.harmless_subspace(nn.Sequential(nn.Linear(2, 1)).eval(), "12")


def test_input_shape_the_model_does_not_accept() -> None:
    with pytest.raises(InputError, match=r"does not accept inputs of shape \(B, 7\)"):
        harmless.harmless_subspace(_lin_model(), (7,))


def test_input_shape_mismatching_an_operator() -> None:
    op = MatrixOperator(torch.randn(2, 6))
    with pytest.raises(InputError, match="does not match"):
        harmless.harmless_subspace(op, (5,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int64, torch.complex128, "float64"])
def test_dtype_not_float32_or_float64(dtype) -> None:
    with pytest.raises(InputError, match="dtype"):
        harmless.harmless_subspace(_lin_model(), LIN, dtype=dtype)


def test_dtype_not_float_in_least_harmful() -> None:
    with pytest.raises(InputError, match="dtype"):
        harmless.least_harmful(_lin_model(), LIN, dtype=torch.int32)


@pytest.mark.parametrize("method", ["svd", "AUTO", "", None])
def test_method_unknown(method) -> None:
    with pytest.raises(InputError, match="method must be auto, dense, gram or structure"):
        harmless.harmless_subspace(_lin_model(), LIN, method=method)


@pytest.mark.parametrize("limit", [0, -1, 2.5, "100", None])
def test_dense_limit_invalid(limit) -> None:
    with pytest.raises(InputError, match="dense_limit must be a positive int"):
        harmless.harmless_subspace(_lin_model(), LIN, dense_limit=limit)


@pytest.mark.parametrize("rtol", [0, 0.0, 1, 1.5, -1e-3, float("nan"), float("inf")])
def test_rtol_out_of_range(rtol) -> None:
    with pytest.raises(InputError, match=r"rtol must be a number in \(0, 1\)"):
        harmless.harmless_subspace(_lin_model(), LIN, rtol=rtol)


def test_rtol_not_a_number() -> None:
    with pytest.raises(InputError, match="rtol"):
        harmless.harmless_subspace(_lin_model(), LIN, rtol="1e-8")


@pytest.mark.parametrize("method", ["project", "decompose", "contains", "harmful_residual"])
@pytest.mark.parametrize("shape", [(6,), (2, 5), (2, 6, 1), (1, 1, 6)], ids=["no-batch", "wrong-size", "extra-axis",
                                                                          "extra-axis-2"])
def test_delta_wrong_shape(method: str, shape) -> None:
    with pytest.raises(InputError, match=r"delta must have shape \(B, 6\)"):
        getattr(_space(), method)(torch.zeros(shape, dtype=F64))


@pytest.mark.parametrize("method", ["project", "decompose", "contains", "harmful_residual"])
def test_delta_not_a_tensor(method: str) -> None:
    with pytest.raises(InputError, match="torch.Tensor"):
        getattr(_space(), method)(np.zeros((1, 6)))


@pytest.mark.parametrize("method", ["project", "decompose", "contains", "harmful_residual"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_delta_non_finite(method: str, bad: float) -> None:
    delta = torch.zeros(2, 6, dtype=F64)
    delta[1, 3] = bad
    with pytest.raises(InputError, match="non-finite"):
        getattr(_space(), method)(delta)


@pytest.mark.parametrize("method", ["project", "decompose", "contains", "harmful_residual"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex128])
def test_delta_not_floating_point(method: str, dtype) -> None:
    with pytest.raises(InputError, match="floating-point"):
        getattr(_space(), method)(torch.zeros(2, 6, dtype=dtype))


@pytest.mark.parametrize("n", [0, -3, 2.0, "4", None])
def test_sample_count_invalid(n) -> None:
    with pytest.raises(InputError, match="n must be a positive int"):
        _space().sample(n)


def test_sample_count_bool() -> None:
    """True is an int in Python; sample(True) should be refused like other non-counts
    (it currently crashes inside torch.randn with a TypeError)."""
    with pytest.raises(InputError, match="n must be a positive int"):
        _space().sample(True)


def test_sample_on_injective_layer_points_to_least_harmful() -> None:
    model = nn.Sequential(nn.Linear(3, 5)).eval()
    space = harmless.harmless_subspace(model, (3,))
    assert space.dim == 0
    with pytest.raises(NoHarmlessSubspaceError, match="least_harmful") as info:
        space.sample(1)
    assert "injective" in str(info.value)


def test_basis_on_too_large_operator() -> None:
    conv = nn.Sequential(nn.Conv2d(1, 1, 2, stride=2)).eval()
    space = harmless.harmless_subspace(conv, (1, 8, 8), dense_limit=10)
    assert space.dim == 48  # exact by structure
    with pytest.raises(TooLargeError, match="exceeds dense_limit=10"):
        space.basis()


def test_basis_with_structure_method_does_not_claim_the_limit_is_exceeded() -> None:
    """method="structure" on a 16 x 64 operator: basis() raises saying the operator
    "exceeds the dense limit (50,000,000 entries)", which is false. Either return the basis
    (it is affordable) or say why not."""
    conv = nn.Sequential(nn.Conv2d(1, 1, 2, stride=2)).eval()
    space = harmless.harmless_subspace(conv, (1, 8, 8), method="structure")
    try:
        b = space.basis()
    except TooLargeError as exc:
        assert "exceeds the dense limit" not in str(exc), str(exc)
    else:
        assert b.shape == (48, 1, 8, 8)


def test_dense_method_over_limit_raises_too_large() -> None:
    space = harmless.harmless_subspace(nn.Sequential(nn.Conv2d(1, 1, 2, stride=2)).eval(), (1, 8, 8),
                                       method="dense", dense_limit=10)
    with pytest.raises(TooLargeError, match="above the limit"):
        _ = space.dim


@pytest.mark.parametrize("model", [lambda x: x, torch.zeros(3), "resnet18", None], ids=["function", "tensor", "str",
                                                                                       "None"])
def test_model_not_a_module(model) -> None:
    with pytest.raises(InputError, match="torch.nn.Module or a TorchLinearOperator"):
        harmless.harmless_subspace(model, LIN)


def test_model_not_a_module_in_least_harmful() -> None:
    with pytest.raises(InputError, match="torch.nn.Module"):
        harmless.least_harmful("model", LIN)


def test_layer_unknown_lists_layers() -> None:
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    with pytest.raises(InputError, match="no layer named 'fc'") as info:
        harmless.harmless_subspace(model, LIN, layer="fc")
    assert "layers: 0, 1, 2" in str(info.value)


def test_layer_with_an_operator() -> None:
    with pytest.raises(InputError, match="layer= applies to models"):
        harmless.harmless_subspace(MatrixOperator(torch.randn(2, 6)), LIN, layer="0")


def test_all_user_errors_are_harmless_errors() -> None:
    for exc in (InputError, NoHarmlessSubspaceError, TooLargeError, UnsupportedLayerError):
        assert issubclass(exc, HarmlessError)
    assert issubclass(InputError, ValueError) and issubclass(UnsupportedLayerError, TypeError)


# =======================================================================================
# 8. device and dtype of results
# =======================================================================================
@pytest.mark.parametrize("space_dtype", [F64, F32])
@pytest.mark.parametrize("delta_dtype", [F64, F32])
def test_results_in_space_dtype_on_input_device(space_dtype, delta_dtype) -> None:
    conv = _conv16(2, 3, 2, 1)
    shape = (3, 6, 6)
    space = harmless.harmless_subspace(nn.Sequential(conv).eval().eval(), shape, dtype=space_dtype)
    assert space.dtype == space_dtype
    delta = oracle.random_batch(shape, 2, seed=0, dtype=delta_dtype)
    for out in (space.project(delta), *space.decompose(delta), space.harmful_residual(delta)):
        assert out.dtype == space_dtype and out.device == delta.device
    cont = space.contains(delta)
    assert cont.dtype == torch.bool and cont.device == delta.device
    assert space.sample(2).dtype == space_dtype
    assert space.basis().dtype == space_dtype
    vecs, gains = harmless.least_harmful(nn.Sequential(conv).eval(), shape, k=1, dtype=space_dtype)
    assert vecs.dtype == space_dtype and gains.dtype == space_dtype


def test_float32_matrix_free_outputs_float32() -> None:
    conv = _conv16(2, 3, 2, 1)
    space = harmless.harmless_subspace(nn.Sequential(conv).eval().eval(), (3, 6, 6), dtype=F32, dense_limit=1)
    out = space.project(oracle.random_batch((3, 6, 6), 2, seed=0))
    assert out.dtype == F32
    assert space.sample(2).dtype == F32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dense_limit", [50_000_000, 1])
def test_cuda_model_results_on_cuda(dense_limit: int) -> None:
    conv = _conv16(2, 3, 2, 1).cuda()
    shape = (3, 8, 8)
    space = harmless.harmless_subspace(nn.Sequential(conv).eval().eval(), shape, dense_limit=dense_limit)
    delta = oracle.random_batch(shape, 2, seed=0).cuda()
    out = space.project(delta)
    assert out.device == delta.device and out.dtype == F64
    assert space.sample(2).device.type == "cuda"
    a = oracle.dense_matrix(conv.cpu(), shape)
    want = oracle.flat(delta.cpu()) @ oracle.projector(a)
    np.testing.assert_allclose(oracle.flat(out), want, atol=1e-9)
    # a CPU delta into a CUDA space comes back on the CPU
    assert space.project(delta.cpu()).device.type == "cpu"


# =======================================================================================
# A longer, non-derandomised sweep (run with -m slow)
# =======================================================================================
@pytest.mark.slow
@oracle.settings(max_examples=400, deadline=None, database=None,
                 suppress_health_check=oracle.ENGINE_SETTINGS["suppress_health_check"])
@given(cfg=oracle.layer_configs(), seed=st.integers(0, 10_000))
def test_sweep_dim_project_and_structure_against_oracle(cfg: LayerConfig, seed: int) -> None:
    c = Case(cfg)
    assume(oracle.rank_is_clear(c.a) and c.kappa <= 1e5)
    for dtype in (F64, F32):
        space = c.space(dtype)
        if dtype == F32 and not oracle.rank_is_clear(c.a, nonzero=1e-4):
            continue
        assert space.dim == c.dim, (dtype, space.dim, c.dim)
        delta = oracle.random_batch(c.shape, 2, seed=seed, dtype=dtype)
        got = oracle.flat(space.project(delta))
        dn = np.linalg.norm(oracle.flat(delta), axis=1)
        assert np.all(np.linalg.norm(got - oracle.flat(delta) @ c.p, axis=1) <= proj_tol(c.kappa, dtype) * dn)
    _assert_matrix_free_dims_agree(c)


def test_zero_padding_border_windows_break_corollary1() -> None:
    """Found while reproducing Fig 2: with zero padding a corner window of a 7x7 / stride-6
    convolution reads only 4x4 real pixels, fewer than its 20 kernels, so its rows are
    dependent whatever the weights, and dim exceeds n - m although the paper's conditions
    (kernel >= stride, independent kernels, every pixel read) hold."""
    from harmless.linalg.operators import ConvOperator
    from harmless.linalg.rank import corollary1_conditions

    conv = nn.Conv2d(1, 20, 7, stride=6, padding=3, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=torch.Generator().manual_seed(0)))
    shape = (1, 22, 22)
    a = oracle.dense_matrix(conv, shape)
    n, m = a.shape[1], a.shape[0]
    space = harmless.harmless_subspace(nn.Sequential(conv).eval().eval(), shape)
    assert (n, m) == (484, 320)
    assert space.dim == n - oracle.rank(a) == n - m + 4  # the (0, 0) corner: 20 kernels, 16 pixels
    op = ConvOperator(conv.weight, shape, stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
    assert corollary1_conditions(op) == ["border windows read only 16 inputs for 20 kernels (zero padding)"]


def test_project_and_sample_work_when_no_exact_rank_fits(monkeypatch) -> None:
    """Large overlapping convolutions have no affordable exact rank; project/sample must still
    work matrix-free (they need no rank), and agree with the dense projection."""
    import harmless.linalg.subspace as sub
    from harmless.errors import TooLargeError

    def no_rank(*args, **kwargs):
        raise TooLargeError("no exact rank method fits (simulated)")

    torch.manual_seed(0)
    conv = nn.Conv2d(1, 2, 3, stride=2, bias=False).double().eval()
    dense = harmless.harmless_subspace(nn.Sequential(conv).eval(), (1, 9, 9))
    big = harmless.harmless_subspace(nn.Sequential(conv).eval(), (1, 9, 9), dense_limit=1)
    d = torch.randn(3, 1, 9, 9, dtype=torch.float64) * 1e3
    expected = dense.project(d)
    monkeypatch.setattr(sub, "analyze_rank", no_rank)
    with pytest.raises(TooLargeError):
        _ = big.dim
    p = big.project(d)
    assert torch.allclose(p, expected, rtol=0, atol=1e-9 * float(d.abs().max()))
    s = big.sample(4, generator=torch.Generator().manual_seed(0))
    assert float(big.harmful_residual(s).max()) < 1e-12
    assert torch.allclose(s.flatten(1).norm(dim=1), torch.ones(4, dtype=torch.float64))
