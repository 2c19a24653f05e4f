"""The sweep certificate (harmless.linalg.conv_certificate) against brute force.

Oracle: the dense matrix of the torch module itself (tests/oracle.py, no harmless.linalg)
and NumPy's matrix_rank. The certificate is only sufficient, so the properties are: when it
certifies, its rank is the oracle's; where the matrix is rank-deficient beyond what the
certificate would claim, it declines; and at 224 px it decides the common stems.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
import oracle
from oracle import engine_settings, single_torch_thread  # noqa: F401

import harmless
from harmless.errors import TooLargeError
from harmless.linalg.conv_certificate import sweep_certificate
from harmless.linalg.operators import ChannelScaleOperator, ComposedOperator, ConvOperator
from harmless.linalg.rank import SWEEP_BEFORE_GRAM, analyze_rank, conv_windows_disjoint, gram_rank
from harmless.nn import Normalize

F64 = torch.float64


def _op(conv: nn.Conv1d | nn.Conv2d | nn.Conv3d, shape: tuple[int, ...]) -> ConvOperator:
    return ConvOperator(conv.weight, shape, stride=conv.stride, padding=conv.padding,  # type: ignore[arg-type]
                        dilation=conv.dilation, groups=conv.groups, padding_mode=conv.padding_mode)


def _conv(d: int, c_in: int, c_out: int, kernel: int, *, seed: int = 0, **kwargs: Any) -> nn.Conv1d | nn.Conv2d:
    conv = (nn.Conv1d if d == 1 else nn.Conv2d)(c_in, c_out, kernel, bias=False, **kwargs).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=torch.Generator().manual_seed(seed), dtype=F64))
    return conv


def _degrade(w: torch.Tensor, how: str, gen: torch.Generator) -> torch.Tensor:
    """Weights with exact rank deficiencies that a sound certificate must never overlook."""
    w = w.clone()
    if how == "zero-tap":  # one tap (all channels, all kernels) is zero
        idx = tuple(int(torch.randint(s, (1,), generator=gen)) for s in w.shape[2:])
        w[(slice(None), slice(None), *idx)] = 0
    elif how == "zero-edge" and w.shape[2] > 1:  # the first tap row/column is zero
        w[:, :, 0] = 0
    elif how == "duplicate" and w.shape[0] > 1:  # kernel 1 repeats kernel 0
        w[1] = w[0]
    elif how == "dyadic-rank1":  # every kernel a multiple of one (exact in float64)
        base = torch.randint(-4, 5, w.shape[1:], generator=gen).to(w.dtype) / 4
        w = torch.randint(-4, 5, (w.shape[0],) + (1,) * (w.ndim - 1), generator=gen).to(w.dtype) / 4 * base
    return w


PRIME = 2_147_483_629  # below 2^31: products of two residues fit in int64


def exact_rank_lower_bound(a: np.ndarray, p: int = PRIME) -> int:
    """The rank modulo ``p`` of the float64 matrix read as exact rationals: a lower bound on
    its exact rank (and equal to it unless ``p`` divides a minor, which a prime near 2^31
    makes improbable). No floating-point threshold, so ill-conditioning cannot fool it."""
    mant, exp = np.frexp(a)  # a = mant * 2^exp, mant * 2^53 an exact integer
    ints = (mant * 2.0**53).astype(np.int64) % p
    shifts = (exp.astype(np.int64) - 53) % (p - 1)  # 2^(exp - 53) mod p, by Fermat
    powers = {int(k): pow(2, int(k), p) for k in np.unique(shifts)}
    m = (ints * np.vectorize(powers.__getitem__, otypes=[np.int64])(shifts)) % p
    rank = 0
    for col in range(m.shape[1]):
        nonzero = np.nonzero(m[rank:, col])[0]
        if not nonzero.size:
            continue
        piv = rank + int(nonzero[0])
        m[[rank, piv]] = m[[piv, rank]]
        m[rank] = m[rank] * pow(int(m[rank, col]), p - 2, p) % p
        others = np.nonzero(m[:, col])[0]
        others = others[others != rank]
        m[others] = (m[others] - m[others, col:col + 1] * m[rank]) % p
        rank += 1
        if rank == m.shape[0]:
            break
    return rank


def assert_exact_rank(a: np.ndarray, rank: int) -> None:
    """``rank`` is the exact rank of ``a``: NumPy's when they agree; otherwise ``a`` must be
    ill-conditioned (an exact rank above the numerical one), which the rank modulo a prime
    decides without a threshold. The certificate proves exact ranks, and e.g. a 3x3/s2/p1
    1 -> 4 convolution on 8 x 8 is square, non-singular and has sigma_min/sigma_max = 2.5e-15."""
    numerical = oracle.rank(a)
    if numerical != rank:
        assert numerical < rank and exact_rank_lower_bound(a) == rank, (rank, numerical)
        event("exact rank above the numerical rank (ill-conditioned)")


@st.composite
def conv_cases(draw: st.DrawFn) -> tuple[nn.Conv1d | nn.Conv2d | nn.Conv3d, tuple[int, ...], str]:
    d = draw(st.sampled_from([1, 2, 2, 3]))
    c_in = draw(st.integers(1, 3))
    c_out = draw(st.integers(1, 20))
    groups = draw(st.sampled_from([g for g in (1, 2, 3) if c_in % g == 0 and c_out % g == 0]))
    kernel = draw(st.integers(1, 5))
    stride = draw(st.integers(1, 3))
    padding: int | str = draw(st.sampled_from([0, 1, 2] + (["same"] if stride == 1 else [])))
    dilation = draw(st.sampled_from([1, 1, 1, 2]))
    sizes = {1: (draw(st.integers(5, 40)),), 2: (draw(st.integers(5, 12)), draw(st.integers(5, 12))),
             3: tuple(draw(st.integers(4, 6)) for _ in range(3))}[d]
    eff = dilation * (kernel - 1) + 1
    sizes = tuple(max(s, eff) for s in sizes)  # every input at least one window wide
    mode = draw(st.sampled_from(["zeros"] * 6 + ["reflect", "circular"])) if padding not in (0, "same") else "zeros"
    how = draw(st.sampled_from(["random"] * 4 + ["zero-tap", "zero-edge", "duplicate", "dyadic-rank1"]))
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[d](c_in, c_out, kernel, stride=stride, padding=padding,
                                                dilation=dilation, groups=groups, padding_mode=mode,
                                                bias=False).double()
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    with torch.no_grad():
        conv.weight.copy_(_degrade(torch.randn(conv.weight.shape, generator=gen, dtype=F64), how, gen))
    return conv, (c_in, *sizes), how


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@engine_settings(200)
@given(case=conv_cases())
def test_certified_rank_is_the_dense_rank(case: tuple[nn.Conv1d | nn.Conv2d | nn.Conv3d, tuple[int, ...], str]
                                          ) -> None:
    conv, shape, how = case
    op = _op(conv, shape)
    cert = sweep_certificate(op)
    a = oracle.dense_matrix(conv, shape)
    assert a.shape == (op.m, op.n)
    if conv.padding_mode != "zeros":
        assert not cert.certified and "padding_mode" in cert.reason
        return
    # Entries read by no window are zero columns of A, whatever the weights.
    assert int(np.sum(~a.any(axis=0))) >= cert.unread
    event(f"certified={cert.certified} ({how})")
    if cert.certified:
        event("certified below min(m, n_read)" if cert.rank < min(op.m, op.n - cert.unread) else "certified full")
    if cert.certified:
        assert_exact_rank(a, cert.rank)
        # through analyze_rank, with every matrix route ruled out (disjoint windows take
        # the block-diagonal route first)
        info = analyze_rank(op, dense_limit=1, gram_limit=0, bases=False)
        assert info.method == ("structure" if conv_windows_disjoint(op) else "sweep-certificate")
        assert info.rank == cert.rank
    else:
        assert cert.reason


@st.composite
def border_deficient_cases(draw: st.DrawFn) -> tuple[nn.Conv1d | nn.Conv2d | nn.Conv3d, tuple[int, ...], str]:
    """Overlap by one pixel (stride = kernel - 1), padding kernel // 2, and more kernels than
    a corner window reads inputs but no more than an interior window's new ones: rank < m
    from the border alone (the zoo's 7x7/s6/p3 -> 64 stem in small)."""
    d = draw(st.sampled_from([1, 2]))
    c_in = draw(st.integers(1, 2))
    kernel = draw(st.integers(3, 6))
    stride, padding = kernel - 1, kernel // 2
    corner = c_in * (kernel - padding) ** d
    interior = c_in * stride ** d
    c_out = draw(st.integers(min(corner + 1, interior), interior))
    size = draw(st.integers(2 * stride, 5 * stride))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    conv = {1: nn.Conv1d, 2: nn.Conv2d}[d](c_in, c_out, kernel, stride=stride, padding=padding, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen, dtype=F64))
    return conv, (c_in, *(size,) * d), "border"


@engine_settings(60)
@given(case=border_deficient_cases())
def test_border_deficient_ranks_are_the_dense_rank(case: tuple[nn.Conv1d | nn.Conv2d | nn.Conv3d, tuple[int, ...],
                                                               str]) -> None:
    conv, shape, _ = case
    op = _op(conv, shape)
    cert = sweep_certificate(op)
    if cert.certified:
        assert_exact_rank(oracle.dense_matrix(conv, shape), cert.rank)
        event("certified below min(m, n_read)" if cert.rank < min(op.m, op.n - cert.unread) else "certified full")
    else:
        event("declined")


@pytest.mark.parametrize("d,c_in,c_out,kernel,stride,padding,size", [
    (2, 3, 20, 3, 2, 1, 9),    # at most 12 new unknowns per window for 20 equations: injective
    (2, 3, 24, 7, 2, 3, 12),   # a corner window has 48 unknowns for 24 equations: blocks of 3 x 3 windows
    (2, 3, 6, 5, 4, 2, 12),    # dimension-reducing: full row rank
    (1, 2, 8, 4, 3, 0, 14),    # pixel 13 unread: dim = 2 exactly
    (2, 2, 8, 3, 1, 1, 6),     # stride 1: corner 8 unknowns, edges 4, interior 2, for 8 equations
])
def test_certifies_known_cases(d: int, c_in: int, c_out: int, kernel: int, stride: int, padding: int,
                               size: int) -> None:
    conv = _conv(d, c_in, c_out, kernel, stride=stride, padding=padding)
    shape = (c_in, *(size,) * d)
    op = _op(conv, shape)
    cert = sweep_certificate(op)
    a = oracle.dense_matrix(conv, shape)
    assert cert.certified, cert.reason
    assert cert.rank == oracle.rank(a) and cert.sigma_ratio > 0
    assert cert.notes and "sweep certificate" in cert.notes[0]


def test_border_windows_with_fewer_inputs_than_kernels_give_the_exact_rank() -> None:
    """7x7/s6/p3 -> 64 (the zoo's s6 stem) at 20 px: the corner windows read 4 x 4 or 4 x 5
    pixels (48 or 60 inputs for 64 kernels), so rank = m - 24 < m, dim > n - m. The sweep
    needs blocks of windows with the short last block merged in."""
    conv = _conv(2, 3, 64, 7, stride=6, padding=3, seed=0)
    shape = (3, 20, 20)
    op = _op(conv, shape)
    cert = sweep_certificate(op)
    assert cert.certified, cert.reason
    assert cert.rank == op.m - 24 == oracle.rank(oracle.dense_matrix(conv, shape))
    assert "last block merged" in cert.directions[0] and "border windows allow" in cert.notes[0]


def test_unread_pixels_give_an_exact_dim() -> None:
    conv = _conv(1, 2, 8, 4, stride=3)
    op = _op(conv, (2, 14))  # windows read 0..12; pixel 13 is read by no window
    cert = sweep_certificate(op)
    assert cert.unread == 2 and cert.certified and cert.dim == 2
    assert cert.dim == 28 - oracle.rank(oracle.dense_matrix(conv, (2, 14)))


def test_a_zero_last_tap_is_certified_by_the_backward_sweep() -> None:
    """Last tap zero: forward, each window's new pixel is read through that tap (a zero
    column); backward, through the first tap. A is still injective (padding reads every
    pixel through every tap) and only the backward sweep shows it."""
    conv = _conv(1, 1, 3, 3, padding=2)
    with torch.no_grad():
        conv.weight[:, :, 2] = 0
    op = _op(conv, (1, 6))
    cert = sweep_certificate(op)
    assert cert.certified and cert.directions == ("backward",) and cert.block == 1
    assert cert.rank == 6 == oracle.rank(oracle.dense_matrix(conv, (1, 6)))


def _assert_declines(conv: nn.Conv1d | nn.Conv2d, shape: tuple[int, ...]) -> None:
    op = _op(conv, shape)
    a = oracle.dense_matrix(conv, shape)
    cert = sweep_certificate(op)
    bound = min(op.m, op.n - cert.unread)
    assert oracle.rank(a) < bound  # truly rank-deficient: a certificate would be wrong
    assert not cert.certified and cert.reason
    with pytest.raises(TooLargeError, match="sweep certificate does not apply"):
        analyze_rank(op, dense_limit=1, gram_limit=0, bases=False)


def test_declines_a_pixel_read_only_through_zero_taps() -> None:
    conv = _conv(2, 3, 64, 7, stride=2, padding=3)
    with torch.no_grad():  # pixel (0, 0) is read by windows 0 and 1 through taps 3 and 1 only
        conv.weight[:, :, [1, 3], :] = 0
    _assert_declines(conv, (3, 14, 14))


def test_declines_duplicated_kernels_in_a_dimension_reducing_stem() -> None:
    conv = _conv(2, 3, 8, 7, stride=4, padding=3)
    with torch.no_grad():
        conv.weight[1] = conv.weight[0]
    _assert_declines(conv, (3, 20, 20))


def test_declines_shifted_kernels() -> None:
    """Kernels [a, b, 0] and [0, a, b]: independent, but the rows of neighbouring windows
    coincide (the counterexample to Corollary 1's sufficiency in test_subspace.py)."""
    gen = torch.Generator().manual_seed(0)
    a2 = torch.randn(2, 2, generator=gen, dtype=F64)
    conv = _conv(1, 2, 2, 3)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, :, 0:2] = a2
        conv.weight[1, :, 1:3] = a2
    _assert_declines(conv, (2, 30))


def test_declines_where_no_sweep_can_reach_the_rank() -> None:
    """3 -> 2 channels, 3x3/s1/p1: full row rank (m < n), but the last windows of every
    sweep read no new pixel, so their rows cannot count: the certificate is only sufficient
    and declines, saying why, without an SVD."""
    conv = _conv(2, 3, 2, 3, padding=1)
    op = _op(conv, (3, 8, 8))
    assert oracle.rank(oracle.dense_matrix(conv, (3, 8, 8))) == op.m
    cert = sweep_certificate(op)
    assert not cert.certified and "read no pixel that earlier ones did not" in cert.reason


def test_a_declined_sweep_still_reports_unread_entries() -> None:
    """Duplicated kernels (rank 3 < m = 6) and pixel 7 read by no window: TooLargeError says
    dim >= 1 (exact lower bound) besides the reason."""
    conv = _conv(1, 1, 2, 3, stride=2)
    with torch.no_grad():
        conv.weight[1] = conv.weight[0]
    _assert_declines(conv, (1, 8))
    with pytest.raises(TooLargeError, match="1 input entry is read by no window, so dim >= 1"):
        analyze_rank(_op(conv, (1, 8)), dense_limit=1, gram_limit=0, bases=False)


def test_other_padding_modes_decline() -> None:
    conv = _conv(2, 3, 64, 7, stride=2, padding=3, padding_mode="reflect")
    cert = sweep_certificate(_op(conv, (3, 16, 16)))
    assert not cert.certified and "padding_mode 'reflect'" in cert.reason


# -- at 224 px ---------------------------------------------------------------------------
STEMS_224 = [
    (64, 7, 2, 3, 0),                 # ResNet-50's stem: injective
    (32, 3, 2, 1, 0),                 # MobileNet's stem: injective
    (32, 7, 4, 3, 3 * 224 * 224 - 32 * 56 * 56),  # dimension-reducing: full row rank, dim = n - m
]


@pytest.mark.parametrize("c_out,kernel,stride,padding,want_dim", STEMS_224)
def test_stem_operators_at_224_px_are_certified(c_out: int, kernel: int, stride: int, padding: int,
                                                want_dim: int) -> None:
    conv = _conv(2, 3, c_out, kernel, stride=stride, padding=padding, seed=1)
    info = analyze_rank(_op(conv, (3, 224, 224)), bases=False)
    assert info.method == "sweep-certificate" and info.dim == want_dim, info.notes


def test_normalize_conv_batchnorm_operator_at_224_px() -> None:
    """The certificate applies to the one non-bijective factor of a prefix."""
    conv = _conv(2, 3, 64, 7, stride=2, padding=3, seed=4)
    gen = torch.Generator().manual_seed(2)
    prefix = ComposedOperator([ChannelScaleOperator(torch.rand(3, generator=gen, dtype=F64) + 0.5, (3, 224, 224)),
                               _op(conv, (3, 224, 224)),
                               ChannelScaleOperator(torch.rand(64, generator=gen, dtype=F64) + 0.5, (64, 112, 112))])
    info = analyze_rank(prefix, bases=False)
    assert info.method == "sweep-certificate" and info.dim == 0
    assert any("one factor that decides the nullspace" in note for note in info.notes)


def test_mid_size_convolutions_take_the_sweep_before_the_gram_matrix() -> None:
    """n = 3072 > SWEEP_BEFORE_GRAM: the sweep answers first (the Cholesky route it replaces
    took 15 s here, see the slow test below)."""
    op = _op(_conv(2, 3, 64, 7, stride=2, padding=3, seed=6), (3, 32, 32))
    assert op.n > SWEEP_BEFORE_GRAM
    info = analyze_rank(op, bases=False)
    assert info.method == "sweep-certificate" and info.rank == op.n


@pytest.mark.slow
def test_mid_size_sweep_agrees_with_the_gram_cholesky_certificate() -> None:
    op = _op(_conv(2, 3, 64, 7, stride=2, padding=3, seed=6), (3, 32, 32))
    gram = gram_rank(op, bases=False)  # the 3072 x 3072 Gram matrix, factorised
    assert gram.method == "gram-cholesky" and gram.rank == analyze_rank(op, bases=False).rank == op.n


@pytest.mark.slow
@pytest.mark.parametrize("c_out,kernel,stride,padding,want_dim", STEMS_224)
def test_stems_at_224_px_end_to_end(c_out: int, kernel: int, stride: int, padding: int, want_dim: int) -> None:
    """harmless_subspace on models (the linear run and its checks take most of the time)."""
    conv = _conv(2, 3, c_out, kernel, stride=stride, padding=padding, seed=1)
    model = nn.Sequential(conv, nn.ReLU()).eval()
    start = time.perf_counter()
    space = harmless.harmless_subspace(model, (3, 224, 224))
    traced = time.perf_counter()
    dim = space.dim
    done = time.perf_counter()
    assert dim == want_dim and space.dim_method == "sweep-certificate", space.rank_info.notes
    assert not space.dim_is_lower_bound
    print(f"\n{kernel}x{kernel}/s{stride}/p{padding} -> {c_out} at 224 px: dim {dim}; linear run "
          f"{traced - start:.2f} s, dim {done - traced:.3f} s")


@pytest.mark.slow
def test_the_s6_stem_at_224_px_has_the_rank_its_corners_allow() -> None:
    """The overlapping 7x7/s6/p3 -> 64 stem of Table 2 at 224 px: dim = n - m + 24 (about
    5 s of CPU: blocks of 3 x 3 windows, the last 5 merged)."""
    op = _op(_conv(2, 3, 64, 7, stride=6, padding=3, seed=0), (3, 224, 224))
    info = analyze_rank(op, bases=False)
    assert info.method == "sweep-certificate" and info.dim == op.n - op.m + 24 == 58_136, info.notes


@pytest.mark.slow
def test_normalize_conv_batchnorm_model_at_224_px() -> None:
    bn = nn.BatchNorm2d(64).double().eval()
    with torch.no_grad():
        bn.running_var.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(2))
        bn.weight.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(3))
    model = nn.Sequential(Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
                          _conv(2, 3, 64, 7, stride=2, padding=3, seed=4), bn, nn.ReLU()).eval()
    space = harmless.harmless_subspace(model, (3, 224, 224))
    assert space.dim == 0 and space.dim_method == "sweep-certificate"
    assert any("one factor that decides the nullspace" in note for note in space.rank_info.notes)


def test_a_stem_without_padding_needs_blocks_of_windows() -> None:
    """7x7/s2/p0 -> 64 at 96 px: a corner window has 147 unknowns for 64 equations, a block
    of 2 x 2 windows 243 for 256. Pixel 95 is read by no window: dim = 3 * (96^2 - 95^2)."""
    conv = _conv(2, 3, 64, 7, stride=2, seed=5)
    cert = sweep_certificate(_op(conv, (3, 96, 96)))
    assert cert.certified and cert.block == 2, cert.reason
    assert cert.dim == cert.unread == 3 * (96 * 96 - 95 * 95)
