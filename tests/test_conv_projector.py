"""The fast convolutional-stem projector (harmless.linalg.conv_projector) against a dense oracle.

Oracle: the operator's dense matrix ``A`` (built from the torch operator on the standard
basis), ``scipy.linalg.null_space(A) = N`` and the projector ``N N^T``. Tolerances:
harmless part within 1e-10 * ||delta|| of the oracle's (float64), harmful residual
||A P delta|| / (||A|| ||delta||) <= 1e-12 (float64) and <= 1e-6 (float32).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import harmless
from harmless.linalg.conv_projector import ProjectorInfo, build_conv_projector, sparse_matrix
from harmless.linalg.operators import ChannelScaleOperator, ComposedOperator, ConvOperator, MatrixOperator
from harmless.nn import Normalize


def _conv(k: int, s: int, p: int, c_in: int, c_out: int, size: int, *, dil: int = 1, groups: int = 1,
          mode: str = "zeros", seed: int = 0) -> ConvOperator:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(c_out, c_in // groups, k, k, generator=gen, dtype=torch.float64)
    return ConvOperator(w, (c_in, size, size), stride=(s, s), padding=(p, p), dilation=(dil, dil), groups=groups,
                        padding_mode=mode)


def _oracle(op, delta: torch.Tensor) -> tuple[np.ndarray, float]:
    a = op.to_dense().numpy()
    null = scipy.linalg.null_space(a)
    flat = delta.reshape(delta.shape[0], -1).numpy()
    return (flat @ null) @ null.T, float(np.linalg.norm(a, 2))


def _check_against_oracle(op, batch: int = 3, seed: int = 1) -> ProjectorInfo:
    proj = build_conv_projector(op)
    assert proj is not None
    delta = torch.randn(batch, *op.in_shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    want, norm = _oracle(op, delta)
    scale = delta.reshape(batch, -1).norm(dim=1) * norm
    before = delta.clone()
    harmful, info = proj.harmful(delta, tol=1e-13, scale=scale)
    assert torch.equal(delta, before)  # input untouched
    got = (delta - harmful).reshape(batch, -1).numpy()
    assert info.converged and info.residual <= 1e-12
    err = np.linalg.norm(got - want, axis=1) / np.linalg.norm(delta.reshape(batch, -1).numpy(), axis=1)
    assert err.max() <= 1e-10, err
    return info


@st.composite
def stems(draw):
    """Random 2-D stems with fewer outputs than inputs and an output grid large enough for an
    interior (the projector declines smaller ones)."""
    k = draw(st.integers(1, 7))
    s = draw(st.integers(1, 4))
    p = draw(st.integers(0, min(3, k - 1)))
    c_in = draw(st.integers(1, 3))
    radius = (k - 1) // s
    out = draw(st.integers(2 * radius + 3, 2 * radius + 5))
    size = (out - 1) * s + k - 2 * p
    assume(size >= k - 2 * p and size >= 1)
    c_out = draw(st.integers(1, max(1, min(c_in * s * s - 1, c_in * k * k))))
    # c_out <= c_in * s * s keeps every window's rows independent (for a random kernel, generically)
    op = _conv(k, s, p, c_in, c_out, size, seed=draw(st.integers(0, 100)))
    assume(op.m < op.n and op.n <= 900)
    return op


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(stems())
def test_random_stems_match_dense_oracle(op):
    if build_conv_projector(op) is None:
        # Declined only for a reason: rows of A dependent (A A^T singular), e.g. more output
        # channels than a window's inputs at some frequency.
        a = op.to_dense().numpy()
        assert np.linalg.matrix_rank(a) < a.shape[0]
        return
    info = _check_against_oracle(op)
    assert info.iterations <= 3  # Woodbury makes the preconditioner G^{-1} itself


@pytest.mark.parametrize("kw", [dict(mode="reflect"), dict(mode="circular"), dict(mode="replicate"),
                                dict(dil=2, c_out=2),  # dilation 2, stride 2: windows read one pixel phase (3 inputs)
                                dict(groups=3, c_in=3, c_out=6)])
def test_padding_modes_dilation_groups(kw):
    args = dict(k=3, s=2, p=1, c_in=3, c_out=5, size=20) | kw
    _check_against_oracle(_conv(**args))


@pytest.mark.slow  # a dense SVD of up to 2048 x 3072 per case for the oracle
@pytest.mark.parametrize("k,s,p,c_out", [(7, 4, 3, 32), (5, 4, 2, 16), (8, 4, 2, 24), (4, 4, 0, 16)])
def test_benchmark_stems_small(k, s, p, c_out):
    """The benchmark's stems at 32 px (their 224 px versions are in benchmarks/bench_engine.py)."""
    _check_against_oracle(_conv(k, s, p, 3, c_out, 32))


def test_sparse_matrix_is_the_operator():
    gen = torch.Generator().manual_seed(2)
    conv = _conv(5, 2, 2, 3, 4, 11, mode="reflect")
    pre = ChannelScaleOperator(torch.rand(3, generator=gen, dtype=torch.float64) + 0.5, conv.in_shape)
    post = ChannelScaleOperator(torch.rand(4, generator=gen, dtype=torch.float64) + 0.5, conv.out_shape)
    op = ComposedOperator([pre, conv, post])
    a = sparse_matrix(op)
    assert a is not None
    np.testing.assert_allclose(a.toarray(), op.to_dense().numpy(), rtol=0, atol=1e-14)


def test_declines_what_it_does_not_cover():
    assert build_conv_projector(_conv(7, 2, 3, 3, 20, 24)) is None  # more outputs than inputs
    gen = torch.Generator().manual_seed(0)
    assert build_conv_projector(MatrixOperator(torch.randn(3, 10, generator=gen, dtype=torch.float64))) is None
    assert build_conv_projector(_conv(3, 1, 1, 3, 2, 3)) is None  # no interior: nothing Toeplitz to exploit


def _stem_model(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(16)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 2)
    model = nn.Sequential(Normalize((0.4, 0.5, 0.6), (0.2, 0.3, 0.25)), nn.Conv2d(3, 16, 5, stride=4, padding=2),
                          bn, nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 3))
    return model.to(dtype).eval()


def test_subspace_uses_fast_path_and_matches_oracle():
    space = harmless.harmless_subspace(_stem_model(), (3, 24, 24), dense_limit=1)
    space.fast_projector_after = 0  # the fast path from the first projection
    delta = torch.randn(4, 3, 24, 24, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    before = delta.clone()
    p = space.project(delta)
    assert space.project_method == "conv-woodbury"
    assert torch.equal(delta, before)
    want, _ = _oracle(space.operator, delta)
    assert np.abs(p.reshape(4, -1).numpy() - want).max() <= 1e-10 * float(delta.norm())
    assert float(space.harmful_residual(p).max()) <= 1e-12 * 10  # relative to ||P delta||, not ||delta||
    # batch = per sample; same input, same output (deterministic)
    for i in range(4):
        torch.testing.assert_close(space.project(delta[i:i + 1])[0], p[i], rtol=0, atol=1e-12)
    torch.testing.assert_close(space.project(delta), p, rtol=0, atol=0)
    s = space.sample(2, generator=torch.Generator().manual_seed(0))
    assert space.project_method == "conv-woodbury"
    assert float(space.harmful_residual(s).max()) <= 1e-12


def test_float32_path():
    space = harmless.harmless_subspace(_stem_model(torch.float32), (3, 24, 24), dtype=torch.float32, dense_limit=1)
    space.fast_projector_after = 0
    delta = torch.randn(3, 3, 24, 24, generator=torch.Generator().manual_seed(6))
    p = space.project(delta)
    assert p.dtype == torch.float32 and space.project_method == "conv-woodbury"
    assert float(space.harmful_residual(p.double()).max()) <= 1e-6


def test_falls_back_to_cgls_when_the_check_fails():
    space = harmless.harmless_subspace(_stem_model(), (3, 24, 24), dense_limit=1)

    class Failing:
        def harmful(self, d, *, tol, scale):
            return torch.zeros_like(d), ProjectorInfo(1, 3, 1.0, False)

    space.__dict__["conv_projector"] = Failing()
    space.fast_projector_after = 0
    delta = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    p = space.project(delta)
    assert space.project_method == "cgls"
    want, _ = _oracle(space.operator, delta)
    assert np.abs(p.reshape(2, -1).numpy() - want).max() <= 1e-9 * float(delta.norm())


def test_fast_projector_is_built_only_after_cgls_has_spent_its_cost():
    """Ski rental: the first projections use CGLS; once CGLS has spent fast_projector_after
    passes, the fast projector takes over (and gives the same projection)."""
    space = harmless.harmless_subspace(_stem_model(), (3, 24, 24), dense_limit=1)
    delta = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    space.fast_projector_after = 10**9
    p_cgls = space.project(delta)
    assert space.project_method == "cgls" and "conv_projector" not in space.__dict__
    space.fast_projector_after = 1  # CGLS has now spent more than that
    p_fast = space.project(delta)
    assert space.project_method == "conv-woodbury"
    assert float((p_fast - p_cgls).abs().max()) <= 1e-9 * float(delta.norm())
