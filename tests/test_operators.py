"""Tests of harmless.linalg.operators and harmless.linalg.layers against an independent oracle.

The oracle (tests/oracle.py) builds each layer's matrix by applying the torch module itself
to the standard basis in float64; nothing in it goes through the engine's operators.
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))

import oracle
from oracle import LayerConfig, engine_settings, single_torch_thread  # noqa: F401

import harmless
from harmless.errors import InputError, TooLargeError, UnsupportedLayerError
from harmless.linalg.layers import is_linear_module, operator_for_module
from harmless.linalg.operators import (
    ChannelScaleOperator,
    ComposedOperator,
    ConvOperator,
    FunctionOperator,
    MatrixOperator,
    ReshapeOperator,
    TokenwiseMatrixOperator,
    TorchLinearOperator,
)
from harmless.nn import Normalize

EPS = {torch.float64: np.finfo(np.float64).eps, torch.float32: np.finfo(np.float32).eps}


def engine_operator(cfg: LayerConfig, module: nn.Module, dtype: torch.dtype = torch.float64) -> TorchLinearOperator:
    """The engine's operator for a configuration: ``operator_for_module`` for a single
    layer, the linear run (a ComposedOperator) for a Sequential."""
    if isinstance(module, nn.Sequential):
        run = harmless.linear_run(module, cfg.in_shape, dtype=dtype)
        assert run.stopped_at is None, run.description
        return run.operator
    return operator_for_module(module, cfg.in_shape, dtype=dtype)


def _pairs(op: TorchLinearOperator, seed: int, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    x = oracle.random_batch(op.in_shape, batch, seed=seed, dtype=op.dtype)
    y = oracle.random_batch(op.out_shape, batch, seed=seed + 1, dtype=op.dtype)
    return x, y


# ---------------------------------------------------------------------------------------
# Every operator kind against the oracle matrix
# ---------------------------------------------------------------------------------------
@engine_settings(100)
@given(cfg=oracle.layer_configs(), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_to_dense_equals_oracle_matrix(cfg: LayerConfig, dtype: torch.dtype) -> None:
    module = cfg.make()
    a = oracle.dense_matrix(module, cfg.in_shape)
    op = engine_operator(cfg, module, dtype)
    assert op.in_shape == cfg.in_shape
    assert op.out_shape == oracle.out_shape_of(module, cfg.in_shape)
    assert op.shape == a.shape
    dense = op.to_dense()
    assert dense.dtype == dtype
    d = dense.to(torch.float64).numpy()
    scale = max(float(np.abs(a).max()), 1.0)
    tol = 1e-13 if dtype == torch.float64 else 1e-6
    np.testing.assert_allclose(d, a, rtol=0, atol=tol * scale)


@engine_settings(100)
@given(cfg=oracle.layer_configs(), dtype=st.sampled_from([torch.float64, torch.float32]),
       seed=st.integers(0, 1000))
def test_adjoint_identity_and_rmatvec_against_oracle(cfg: LayerConfig, dtype: torch.dtype, seed: int) -> None:
    """<A x, y> == <x, A^T y> to round-off, and rmatvec equals the oracle's A^T y."""
    module = cfg.make()
    a = oracle.dense_matrix(module, cfg.in_shape)
    op = engine_operator(cfg, module, dtype)
    x, y = _pairs(op, seed)
    ax, aty = op.matvec(x), op.rmatvec(y)
    assert ax.shape == (3, *op.out_shape) and aty.shape == (3, *op.in_shape)
    assert ax.dtype == dtype and aty.dtype == dtype
    xf, yf = oracle.flat(x), oracle.flat(y)
    lhs = np.sum(oracle.flat(ax) * yf, axis=1)
    rhs = np.sum(xf * oracle.flat(aty), axis=1)
    norm_a = max(oracle.spectral_norm(a), 1e-300)
    bound = 50 * EPS[dtype] * math.sqrt(a.shape[0] + a.shape[1]) * norm_a * \
        np.linalg.norm(xf, axis=1) * np.linalg.norm(yf, axis=1)
    assert np.all(np.abs(lhs - rhs) <= bound + 1e-300), (lhs, rhs, bound)
    # against the oracle, A x and A^T y separately
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(oracle.flat(ax), xf @ a.T, rtol=0, atol=tol * max(norm_a, 1) * np.abs(xf).max() * 10)
    np.testing.assert_allclose(oracle.flat(aty), yf @ a, rtol=0, atol=tol * max(norm_a, 1) * np.abs(yf).max() * 10)


@engine_settings(40)
@given(cfg=oracle.layer_configs(), seed=st.integers(0, 1000))
def test_batch_equals_per_sample(cfg: LayerConfig, seed: int) -> None:
    module = cfg.make()
    op = engine_operator(cfg, module)
    x, y = _pairs(op, seed, batch=4)
    ax, aty = op.matvec(x), op.rmatvec(y)
    for i in range(4):
        torch.testing.assert_close(op.matvec(x[i:i + 1])[0], ax[i], rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(op.rmatvec(y[i:i + 1])[0], aty[i], rtol=1e-13, atol=1e-13)


@engine_settings(30)
@given(cfg=oracle.layer_configs(), seed=st.integers(0, 1000))
def test_operator_inputs_not_modified(cfg: LayerConfig, seed: int) -> None:
    module = cfg.make()
    state = {k: v.clone() for k, v in module.state_dict().items()}
    op = engine_operator(cfg, module)
    x, y = _pairs(op, seed)
    x0, y0 = x.clone(), y.clone()
    op.matvec(x)
    op.rmatvec(y)
    op.gram(x)
    op.to_dense()
    assert torch.equal(x, x0) and torch.equal(y, y0)
    for k, v in module.state_dict().items():
        assert torch.equal(v, state[k]), k


@engine_settings(30)
@given(cfg=oracle.layer_configs())
def test_to_gram_and_norm_estimate(cfg: LayerConfig) -> None:
    module = cfg.make()
    a = oracle.dense_matrix(module, cfg.in_shape)
    op = engine_operator(cfg, module)
    g = op.to_gram().numpy()
    norm_a = oracle.spectral_norm(a)
    np.testing.assert_allclose(g, a.T @ a, rtol=0, atol=1e-12 * max(norm_a**2, 1))
    np.testing.assert_array_equal(g, g.T)
    est = op.norm_estimate()
    assert est <= norm_a * (1 + 1e-10) + 1e-300  # a lower bound ...
    assert est >= 0.9 * norm_a  # ... and a good one after 50 power iterations


@engine_settings(25)
@given(cfg=oracle.layer_configs(), seed=st.integers(0, 1000))
def test_to_scipy_matches_oracle(cfg: LayerConfig, seed: int) -> None:
    module = cfg.make()
    a = oracle.dense_matrix(module, cfg.in_shape)
    op = engine_operator(cfg, module)
    lo = op.to_scipy()
    assert lo.shape == a.shape
    rng = np.random.default_rng(seed)
    v, w = rng.standard_normal(a.shape[1]), rng.standard_normal(a.shape[0])
    vm, wm = rng.standard_normal((a.shape[1], 3)), rng.standard_normal((a.shape[0], 2))
    tol = 1e-12 * max(oracle.spectral_norm(a), 1)
    np.testing.assert_allclose(lo.matvec(v), a @ v, rtol=0, atol=tol * 10)
    np.testing.assert_allclose(lo.rmatvec(w), a.T @ w, rtol=0, atol=tol * 10)
    np.testing.assert_allclose(lo.matmat(vm), a @ vm, rtol=0, atol=tol * 10)
    np.testing.assert_allclose(lo.rmatmat(wm), a.T @ wm, rtol=0, atol=tol * 10)
    assert lo.matvec(v).shape == (a.shape[0],)


# ---------------------------------------------------------------------------------------
# Hand-built operators of every type
# ---------------------------------------------------------------------------------------
def _hand_built() -> dict[str, TorchLinearOperator]:
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    conv_w = torch.randn(4, 2, 3, 2, generator=gen, dtype=torch.float64)
    mat = MatrixOperator(w, in_shape=(7,), out_shape=(5,))
    scale = ChannelScaleOperator(torch.tensor([2.0, -0.5, 3.0], dtype=torch.float64), (3, 4))
    reshape = ReshapeOperator((3, 4), (2, 6))
    conv = ConvOperator(conv_w, (2, 6, 5), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=1)
    conv_reflect = ConvOperator(conv_w, (2, 6, 5), stride=(1, 1), padding="same", dilation=(1, 1),
                                padding_mode="reflect")
    pool = FunctionOperator(lambda x: torch.nn.functional.avg_pool2d(x, 2), (3, 4, 4), name="pool")
    composed = ComposedOperator([ReshapeOperator((2, 6), (12,)), MatrixOperator(torch.randn(4, 12, generator=gen,
                                                                                      dtype=torch.float64))])
    matmul = MatrixOperator(w) @ MatrixOperator(torch.randn(7, 3, generator=gen, dtype=torch.float64))
    return {"matrix": mat, "scale": scale, "reshape": reshape, "conv": conv, "conv_reflect_same": conv_reflect,
            "function": pool, "composed": composed, "matmul": matmul}


@pytest.mark.parametrize("name", sorted(_hand_built()))
def test_hand_built_operator_adjoint_and_dense(name: str) -> None:
    op = _hand_built()[name]
    dense = op.to_dense().numpy()
    assert dense.shape == op.shape
    x, y = _pairs(op, seed=11)
    lhs = (op.matvec(x) * y).sum().item()
    rhs = (x * op.rmatvec(y)).sum().item()
    assert abs(lhs - rhs) <= 1e-12 * (abs(lhs) + 1)
    # to_dense agrees with applying the operator (both column and row construction)
    np.testing.assert_allclose(oracle.flat(op.matvec(x)), oracle.flat(x) @ dense.T, atol=1e-12)
    np.testing.assert_allclose(oracle.flat(op.rmatvec(y)), oracle.flat(y) @ dense, atol=1e-12)
    assert name in repr(op).lower() or type(op).__name__ in repr(op) or "->" in repr(op)


def test_matmul_composes_in_the_right_order() -> None:
    a = MatrixOperator(torch.tensor([[1.0, 2.0]], dtype=torch.float64))  # 1 x 2
    b = MatrixOperator(torch.tensor([[1.0], [3.0]], dtype=torch.float64))  # 2 x 1
    ab = a @ b  # x -> a(b(x)), 1 x 1
    assert isinstance(ab, ComposedOperator) and ab.shape == (1, 1)
    assert ab.to_dense().item() == pytest.approx(7.0)
    nested = ComposedOperator([ab, ReshapeOperator((1,), (1,))])
    assert len(nested.factors) == 3  # compositions flatten


def test_bijective_flags() -> None:
    assert ReshapeOperator((2, 3), (6,)).bijective
    assert ChannelScaleOperator(torch.tensor([1.0, 2.0]), (2, 3)).bijective
    assert not ChannelScaleOperator(torch.tensor([1.0, 0.0]), (2, 3)).bijective
    assert not MatrixOperator(torch.eye(3)).bijective  # conservative: a matrix is not assumed invertible
    both = ComposedOperator([ReshapeOperator((2, 3), (6,)), ReshapeOperator((6,), (3, 2))])
    assert both.bijective


def test_float32_operator_outputs_float32_and_casts_inputs() -> None:
    op = MatrixOperator(torch.randn(3, 4), dtype=torch.float32)
    out = op.matvec(torch.randn(2, 4, dtype=torch.float64))
    assert out.dtype == torch.float32
    assert op.rmatvec(torch.randn(2, 3, dtype=torch.float64)).dtype == torch.float32
    assert op.to_dense().dtype == torch.float32


def test_to_dense_over_limit_raises_too_large() -> None:
    op = ReshapeOperator((10, 10), (100,))
    with pytest.raises(TooLargeError, match="limit"):
        op.to_dense(limit=99)
    assert op.to_dense(limit=10_000).shape == (100, 100)


def test_to_dense_row_and_column_construction_agree() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, 2, 5, generator=gen, dtype=torch.float64)
    wide = ConvOperator(w, (2, 9), stride=(1,), padding=(0,), dilation=(1,))  # m = 15 < n = 18: rows
    tall = ConvOperator(w, (2, 9), stride=(1,), padding=(4,), dilation=(1,))  # m = 39 > n = 18: columns
    for op in (wide, tall):
        dense = op.to_dense(batch=4).numpy()
        cols = np.stack([oracle.flat(op.matvec(torch.eye(op.n, dtype=torch.float64)[i].view(1, *op.in_shape)))[0]
                         for i in range(op.n)], axis=1)
        np.testing.assert_allclose(dense, cols, atol=1e-14)


# ---------------------------------------------------------------------------------------
# Conv specifics the strategies may rarely hit
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding", ["same", 1, (2, 0)])
def test_conv_padding_modes_against_oracle(padding_mode: str, padding) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, (2, 3), padding=padding, padding_mode=padding_mode, dilation=(1, 1)).eval()
    shape = (2, 5, 4)
    a = oracle.dense_matrix(conv, shape)
    op = operator_for_module(conv, shape)
    np.testing.assert_allclose(op.to_dense().numpy(), a, atol=1e-14)
    x, y = _pairs(op, seed=1)
    assert abs((op.matvec(x) * y).sum() - (x * op.rmatvec(y)).sum()) < 1e-12


def test_conv_stride_larger_than_kernel_and_groups() -> None:
    torch.manual_seed(1)
    conv = nn.Conv1d(4, 6, 2, stride=5, groups=2, padding=1).eval()
    a = oracle.dense_matrix(conv, (4, 17))
    op = operator_for_module(conv, (4, 17))
    np.testing.assert_allclose(op.to_dense().numpy(), a, atol=1e-14)
    km = op.kernel_matrix().numpy()
    assert km.shape == (6, 4 * 2)
    # block-diagonal over groups: group 0's outputs never read group 1's channels
    np.testing.assert_array_equal(km[:3, 4:], 0)
    np.testing.assert_array_equal(km[3:, :4], 0)


def test_conv3d_against_oracle() -> None:
    torch.manual_seed(2)
    conv = nn.Conv3d(2, 2, (2, 1, 2), stride=(1, 2, 1), padding=(1, 0, 0), padding_mode="replicate").eval()
    shape = (2, 3, 4, 3)
    np.testing.assert_allclose(operator_for_module(conv, shape).to_dense().numpy(),
                               oracle.dense_matrix(conv, shape), atol=1e-14)


def test_linear_on_leading_axes_is_a_tokenwise_operator() -> None:
    lin = nn.Linear(4, 3).eval()
    op = operator_for_module(lin, (2, 4))
    assert isinstance(op, TokenwiseMatrixOperator) and op.out_shape == (2, 3) and op.positions == 2
    np.testing.assert_allclose(op.to_dense().numpy(), oracle.dense_matrix(lin, (2, 4)), atol=1e-14)


def test_batchnorm_affine_false_and_zero_weight() -> None:
    bn = nn.BatchNorm2d(3, affine=False).eval()
    bn.running_var.copy_(torch.tensor([0.5, 2.0, 4.0]))
    op = operator_for_module(bn, (3, 2, 2))
    assert op.bijective
    np.testing.assert_allclose(op.to_dense().numpy(), oracle.dense_matrix(bn, (3, 2, 2)), atol=1e-14)
    bn2 = nn.BatchNorm1d(2).eval()
    with torch.no_grad():
        bn2.weight.copy_(torch.tensor([0.0, 1.5]))
    op2 = operator_for_module(bn2, (2,))
    assert not op2.bijective
    np.testing.assert_allclose(op2.to_dense().numpy(), oracle.dense_matrix(bn2, (2,)), atol=1e-14)


def test_reshape_like_modules_are_identity_maps() -> None:
    for module, shape in [(nn.Identity(), (2, 3)), (nn.Dropout(0.5), (4,)), (nn.Flatten(), (2, 3)),
                          (nn.Unflatten(1, (2, 3)), (6,)), (nn.Dropout2d(), (2, 2, 2))]:
        module.eval()
        op = operator_for_module(module, shape)
        assert isinstance(op, ReshapeOperator)
        np.testing.assert_array_equal(op.to_dense().numpy(), np.eye(op.n))
        assert op.out_shape == oracle.out_shape_of(module, shape)


def test_adaptive_avgpool_against_oracle() -> None:
    pool = nn.AdaptiveAvgPool2d((2, 3))
    shape = (2, 5, 7)
    op = operator_for_module(pool, shape)
    np.testing.assert_allclose(op.to_dense().numpy(), oracle.dense_matrix(pool, shape), atol=1e-14)


def test_operator_for_module_does_not_change_training_flag() -> None:
    """Building an operator must not mutate the module (its training flag included)."""
    for module, shape in [(nn.Flatten(), (2, 3)), (nn.Unflatten(1, (2, 3)), (6,))]:
        module.train()
        operator_for_module(module, shape)
        assert module.training, f"operator_for_module put {type(module).__name__} in eval mode"


# ---------------------------------------------------------------------------------------
# Error paths
# ---------------------------------------------------------------------------------------
def test_matvec_wrong_shape_raises() -> None:
    op = MatrixOperator(torch.randn(3, 4))
    with pytest.raises(InputError, match=r"shape \(B, 4\)"):
        op.matvec(torch.randn(2, 5))
    with pytest.raises(InputError, match="shape"):
        op.matvec(torch.randn(4))  # no batch axis
    with pytest.raises(InputError, match=r"shape \(B, 3\)"):
        op.rmatvec(torch.randn(2, 4))


def test_matvec_non_tensor_raises() -> None:
    op = MatrixOperator(torch.randn(3, 4))
    with pytest.raises(InputError, match="torch.Tensor"):
        op.matvec(np.zeros((1, 4)))
    with pytest.raises(InputError, match="torch.Tensor"):
        op.rmatvec([[0.0, 0.0, 0.0]])


def test_matrix_operator_rejects_non_2d_and_bad_shapes() -> None:
    with pytest.raises(InputError, match="2-D"):
        MatrixOperator(torch.randn(3, 4, 5))
    with pytest.raises(InputError, match="do not match"):
        MatrixOperator(torch.randn(3, 4), in_shape=(5,))


def test_channel_scale_wrong_channels_raises() -> None:
    with pytest.raises(InputError, match="channels"):
        ChannelScaleOperator(torch.ones(3), (2, 4))


def test_reshape_size_mismatch_raises() -> None:
    with pytest.raises(InputError, match="cannot reshape"):
        ReshapeOperator((2, 3), (5,))


def test_composed_operator_errors() -> None:
    with pytest.raises(InputError, match="at least one"):
        ComposedOperator([])
    with pytest.raises(InputError, match="cannot compose"):
        ComposedOperator([ReshapeOperator((2, 3), (6,)), ReshapeOperator((5,), (5,))])
    with pytest.raises(InputError, match="dtype"):
        ComposedOperator([ReshapeOperator((6,), (6,), dtype=torch.float32), ReshapeOperator((6,), (6,))])


def test_conv_operator_errors() -> None:
    w = torch.randn(2, 3, 3, 3)
    with pytest.raises(InputError, match="input channels"):
        ConvOperator(w, (2, 8, 8), stride=(1, 1), padding=(0, 0), dilation=(1, 1))
    with pytest.raises(InputError, match="needs input shape"):
        ConvOperator(w, (3, 8), stride=(1, 1), padding=(0, 0), dilation=(1, 1))
    with pytest.raises(InputError, match="smaller than the kernel"):
        ConvOperator(w, (3, 2, 2), stride=(1, 1), padding=(0, 0), dilation=(1, 1))
    with pytest.raises(InputError, match="unknown padding"):
        ConvOperator(w, (3, 8, 8), stride=(1, 1), padding="full", dilation=(1, 1))
    with pytest.raises(InputError, match="unsupported convolution"):
        ConvOperator(torch.randn(2, 3), (3,), stride=(1,), padding=(0,), dilation=(1,))


def test_operator_for_module_rejects_non_linear_layers_by_name() -> None:
    for module in (nn.ReLU(), nn.LayerNorm(4), nn.MaxPool1d(2), nn.Softmax(dim=1)):
        with pytest.raises(UnsupportedLayerError, match=type(module).__name__):
            operator_for_module(module, (1, 4), name="mylayer")
        assert not is_linear_module(module)
    with pytest.raises(UnsupportedLayerError, match="mylayer"):
        operator_for_module(nn.ReLU(), (4,), name="mylayer")


def test_operator_for_module_batchnorm_without_running_stats_raises() -> None:
    bn = nn.BatchNorm2d(3, track_running_stats=False).eval()
    assert not is_linear_module(bn)
    with pytest.raises(UnsupportedLayerError, match="running statistics"):
        operator_for_module(bn, (3, 4, 4))


def test_operator_for_module_linear_feature_mismatch_raises() -> None:
    with pytest.raises(UnsupportedLayerError, match="expects 4 features"):
        operator_for_module(nn.Linear(4, 2), (5,))


def test_normalize_operator_scale() -> None:
    norm = Normalize([0.1, 0.2], [0.5, 4.0])
    op = operator_for_module(norm, (2, 3))
    assert isinstance(op, ChannelScaleOperator) and op.bijective
    np.testing.assert_allclose(op.to_dense().numpy(), oracle.dense_matrix(norm, (2, 3)), atol=1e-15)


# ---------------------------------------------------------------------------------------
# Operator algebra: adjoint, sums, scalings, vertical stacks (as SciPy's LinearOperator)
# ---------------------------------------------------------------------------------------
def test_operator_algebra_matches_dense_matrices() -> None:
    from harmless.linalg.operators import vstack

    gen = torch.Generator().manual_seed(0)
    conv = ConvOperator(torch.randn(2, 3, 3, 3, generator=gen, dtype=torch.float64), (3, 6, 5), stride=(2, 1),
                        padding=(1, 0), dilation=(1, 1))
    flat = ReshapeOperator(conv.out_shape, (conv.m,))
    a = flat @ conv
    b = MatrixOperator(torch.randn(a.m, a.n, generator=gen, dtype=torch.float64), in_shape=a.in_shape)
    c = MatrixOperator(torch.randn(4, a.n, generator=gen, dtype=torch.float64), in_shape=a.in_shape)
    da, db, dc = a.to_dense().numpy(), b.to_dense().numpy(), c.to_dense().numpy()
    np.testing.assert_allclose(a.H.to_dense().numpy(), da.T, atol=1e-13)
    assert a.H.H is a and a.T.in_shape == a.out_shape
    np.testing.assert_allclose((a + b).to_dense().numpy(), da + db, atol=1e-13)
    np.testing.assert_allclose((a - 2.5 * b).to_dense().numpy(), da - 2.5 * db, atol=1e-13)
    np.testing.assert_allclose((-a * 3).to_dense().numpy(), -3 * da, atol=1e-13)
    stacked = vstack([a, c])
    np.testing.assert_allclose(stacked.to_dense().numpy(), np.vstack([da, dc]), atol=1e-13)
    np.testing.assert_allclose(stacked.H.to_dense().numpy(), np.vstack([da, dc]).T, atol=1e-13)
    # The nullspace of a stack is the intersection of the nullspaces.
    space = harmless.harmless_subspace(vstack([a, c]), a.in_shape)
    assert space.dim == a.n - np.linalg.matrix_rank(np.vstack([da, dc]))
    with pytest.raises(InputError, match="input shapes"):
        a + MatrixOperator(torch.randn(a.m, 5, dtype=torch.float64))
    with pytest.raises(InputError, match="output shapes"):
        a + c
    with pytest.raises(TypeError):
        a * a  # type: ignore[operator]
