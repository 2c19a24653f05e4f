"""Tests for harmless.nonlinear: the layer sets H^(l) (Lemmas 1.1-1.6) and the exact convex
pieces of the input sets P^(l) of ReLU networks (Lemma 1, Theorem 2).

Oracles, all independent of the code under test:

* layers: the torch module itself, run on z and z + delta (exact comparisons where the
  arithmetic is exact: integer-valued float tensors for max pooling and ReLU);
* dense matrices built by applying a layer to basis vectors, with NumPy's matrix_rank and
  SciPy's null_space (average pooling, two linear layers, softmax's Jacobian);
* networks: the Jacobian of layer L's output by torch.autograd (its rank gives the piece's
  dimension), and the network evaluated along a direction (the piece's extent, found by
  HiGHS, must be where the output starts to move).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import harmless
from harmless.errors import InputError, TrainingModeWarning, UnsupportedLayerError
from harmless.models.zoo import MLP5
from harmless.nonlinear import (
    EXTREMES,
    INJECTIVE_LAYERS,
    MaxPoolSet,
    ReluNetwork,
    ReluSet,
    SoftmaxSet,
    SubspaceSet,
    ZeroSet,
    extreme_bias_shift,
    harmless_set,
    layer_set,
    two_linear_set,
)

SETTINGS = dict(deadline=None, derandomize=True, database=None)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dense_matrix(fn, shape) -> np.ndarray:
    """The matrix of a linear torch function, column by column from basis vectors."""
    n = math.prod(shape)
    eye = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    with torch.no_grad():
        return fn(eye).reshape(n, -1).T.numpy()


def rel_change(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# ---------------------------------------------------------------------------------------
# Lemma 1.1: injective layers
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", [nn.Sigmoid(), nn.Tanh(), nn.LeakyReLU(0.1), nn.ELU(), nn.SELU(),
                                   nn.BatchNorm1d(5).eval()])
def test_injective_layers_have_only_zero(layer):
    z = torch.randn(5, generator=gen(), dtype=torch.float64)
    s = layer_set(layer.double(), z)
    assert isinstance(s, ZeroSet) and s.dim == 0 and isinstance(layer, INJECTIVE_LAYERS)
    assert s.contains(torch.zeros(2, 5)).all()
    delta = 1e-3 * torch.randn(3, 5, generator=gen(1), dtype=torch.float64)
    assert not s.contains(delta).any()
    # Oracle: the layer itself moves under every non-zero delta.
    with torch.no_grad():
        out = layer(z.unsqueeze(0) + delta)
        assert ((out - layer(z.unsqueeze(0))).abs().amax(dim=1) > 0).all()
    assert (s.sample(4) == 0).all()


def test_non_injective_variants_and_zero_scale_batchnorm():
    z = torch.randn(4, generator=gen(), dtype=torch.float64)
    with pytest.raises(UnsupportedLayerError, match="LeakyReLU"):
        layer_set(nn.LeakyReLU(0.0), z)
    with pytest.raises(UnsupportedLayerError, match="GELU"):
        layer_set(nn.GELU(), z)
    bn = nn.BatchNorm2d(3).double().eval()
    with torch.no_grad():
        bn.weight[1] = 0.0
    zb = torch.randn(3, 2, 2, generator=gen(), dtype=torch.float64)
    s = layer_set(bn, zb)
    assert isinstance(s, SubspaceSet) and s.dim == 4  # channel 1's 2x2 entries are ignored
    d = s.sample(3, scale=1e3)
    with torch.no_grad():
        assert (bn(zb.unsqueeze(0) + d) - bn(zb.unsqueeze(0))).abs().max() < 1e-9


# ---------------------------------------------------------------------------------------
# Lemma 1.2: ReLU
# ---------------------------------------------------------------------------------------
@settings(max_examples=40, **SETTINGS)
@given(st.lists(st.integers(-3, 3), min_size=1, max_size=12), st.integers(0, 2**16),
       st.sampled_from([torch.float64, torch.float32]))
def test_relu_set_against_evaluating_relu(values, seed, dtype):
    # Integer-valued floats: z + delta is exact, so "relu output unchanged" is an exact oracle.
    z = torch.tensor(values, dtype=dtype)
    z_before = z.clone()
    s = layer_set(nn.ReLU(), z)
    assert isinstance(s, ReluSet) and s.dim == int((z <= 0).sum())
    g = gen(seed)
    delta = torch.randint(-4, 5, (64, len(values)), generator=g).to(dtype)
    truth = (torch.relu(z + delta) == torch.relu(z)).all(dim=1)
    assert torch.equal(s.contains(delta), truth)
    for scale in (1.0, 1e6):
        members = s.sample(16, generator=g, scale=scale)
        assert members.dtype == dtype and s.contains(members).all()
        assert torch.equal(torch.relu(z + members), torch.relu(z).expand_as(members))  # bitwise
    assert torch.equal(z, z_before)


def test_relu_flipping_an_active_unit_leaves_the_set():
    z = torch.tensor([1.5, -0.5, 0.0, 2.0], dtype=torch.float64)
    s = layer_set(nn.ReLU(), z)
    inside = torch.tensor([[0.0, 0.5, -7.0, 0.0]], dtype=torch.float64)  # -0.5 + 0.5 = 0: on the boundary
    flip = torch.tensor([[-2.0, 0.0, 0.0, 0.0]], dtype=torch.float64)   # the first unit turns off
    assert s.contains(inside).all() and not s.contains(flip).any()
    assert torch.equal(torch.relu(z + inside), torch.relu(z).unsqueeze(0))
    assert not torch.equal(torch.relu(z + flip), torch.relu(z).unsqueeze(0))


# ---------------------------------------------------------------------------------------
# Lemma 1.3: softmax
# ---------------------------------------------------------------------------------------
@settings(max_examples=20, **SETTINGS)
@given(st.integers(2, 6), st.integers(1, 3), st.integers(0, 2**16))
def test_softmax_set_is_exactly_span_one(k, rows, seed):
    z = torch.randn(rows, k, generator=gen(seed), dtype=torch.float64)
    s = layer_set(nn.Softmax(dim=-1), z)
    assert isinstance(s, SoftmaxSet) and s.dim == rows
    # Oracle: the nullspace of softmax's Jacobian at one slice is span(1).
    p = torch.softmax(z[0], dim=0).numpy()
    ns = scipy.linalg.null_space(np.diag(p) - np.outer(p, p))
    assert ns.shape[1] == 1 and np.allclose(np.abs(ns[:, 0]), 1 / math.sqrt(k))
    d = s.sample(5, generator=gen(seed), scale=1e3)
    assert s.contains(d).all()
    assert rel_change(torch.softmax(z + d, dim=-1), torch.softmax(z, dim=-1).expand_as(d)) < 1e-12
    other = torch.randn(5, rows, k, generator=gen(seed + 1), dtype=torch.float64)
    assert not s.contains(other).any()
    assert rel_change(torch.softmax(z + other, dim=-1), torch.softmax(z, dim=-1).expand_as(other)) > 1e-6


def test_softmax_dim_counts_the_batch_axis():
    z = torch.randn(3, 4, generator=gen(), dtype=torch.float64)
    assert layer_set(nn.Softmax(dim=1), z).axis == 0 and layer_set(nn.Softmax(dim=2), z).axis == 1
    with pytest.raises(UnsupportedLayerError):
        layer_set(nn.Softmax(dim=None), z)


# ---------------------------------------------------------------------------------------
# Lemma 1.4: average pooling (the core's nullspace)
# ---------------------------------------------------------------------------------------
@settings(max_examples=12, **SETTINGS)
@given(st.integers(1, 2), st.integers(3, 6), st.integers(2, 3), st.integers(1, 3))
def test_avgpool_set_is_the_nullspace(c, size, kernel, stride):
    pool = nn.AvgPool2d(kernel, stride)
    z = torch.randn(c, size, size, generator=gen(), dtype=torch.float64)
    s = layer_set(pool, z)
    oracle = z.numel() - np.linalg.matrix_rank(dense_matrix(pool, z.shape))
    assert (s.dim if s.dim else 0) == oracle
    if oracle:
        d = s.sample(4, scale=1e4)
        assert s.contains(d).all()
        assert (pool(z + d) - pool(z).unsqueeze(0)).abs().max() < 1e-9


# ---------------------------------------------------------------------------------------
# Lemma 1.5: max pooling
# ---------------------------------------------------------------------------------------
pool_configs = st.sampled_from([(2, 2, 0, 1), (2, 1, 0, 1), (3, 2, 1, 1), (3, 3, 0, 1), (2, 2, 1, 1), (2, 1, 0, 2)])


@settings(max_examples=30, **SETTINGS)
@given(pool_configs, st.integers(1, 2), st.integers(4, 6), st.integers(0, 2**16))
def test_maxpool_membership_is_exact(config, c, size, seed):
    kernel, stride, padding, dilation = config
    pool = nn.MaxPool2d(kernel, stride, padding, dilation)
    g = gen(seed)
    # Small integers: many tied maxima, and z + delta is exact, so the pooled output is an exact oracle.
    z = torch.randint(-2, 3, (c, size, size), generator=g).double()
    s = layer_set(pool, z)
    assert isinstance(s, MaxPoolSet) and not s.convex and s.dim is None
    delta = torch.randint(-3, 2, (200, c, size, size), generator=g).double()
    delta[::2] = torch.minimum(delta[::2], torch.zeros(()))  # plenty of members too
    truth = (pool(z + delta) == pool(z).unsqueeze(0)).reshape(200, -1).all(dim=1)
    assert torch.equal(s.contains(delta), truth)
    for scale in (1.0, 1e5):
        members = s.sample(20, generator=g, scale=scale)
        assert s.contains(members).all()
        assert (pool(z + members) - pool(z).unsqueeze(0)).abs().max() <= 1e-12 * max(1.0, float(z.abs().max()))


def test_maxpool_tied_maxima():
    pool = nn.MaxPool2d(2)
    z = torch.tensor([[[2.0, 2.0], [0.0, 1.0]]], dtype=torch.float64)
    s = layer_set(pool, z)
    assert s.ties == 1
    one_down = torch.tensor([[[[-1.0, 0.0], [0.0, 0.0]]]], dtype=torch.float64)
    both_down = torch.tensor([[[[-1.0, -1.0], [0.0, 0.0]]]], dtype=torch.float64)
    third_up = torch.tensor([[[[-1.0, -1.0], [2.0, 0.0]]]], dtype=torch.float64)  # a new entry takes the max
    assert s.contains(one_down).all() and not s.contains(both_down).any() and s.contains(third_up).all()
    # The sampler picks either tied entry (or the third one raised to the max) as the attainer.
    samples = s.sample(200, generator=gen())
    at_max = (z + samples).reshape(200, 4) == 2.0
    assert at_max[:, 0].any() and at_max[:, 1].any() and at_max[:, 2].any() and at_max.any(dim=1).all()


def test_maxpool_unsupported_settings():
    with pytest.raises(UnsupportedLayerError, match="ceil_mode"):
        layer_set(nn.MaxPool2d(2, ceil_mode=True), torch.zeros(1, 4, 4))
    with pytest.raises(UnsupportedLayerError, match="MaxPool1d"):
        layer_set(nn.MaxPool1d(2), torch.zeros(1, 4))


# ---------------------------------------------------------------------------------------
# Lemma 1.6: two linear layers
# ---------------------------------------------------------------------------------------
@settings(max_examples=25, **SETTINGS)
@given(st.integers(1, 8), st.integers(1, 8), st.integers(1, 8), st.integers(0, 3), st.integers(0, 2**16))
def test_two_linear_layers(n, d, m, deficient, seed):
    torch.manual_seed(seed)
    a1, a2 = nn.Linear(n, d).double(), nn.Linear(d, m).double()
    with torch.no_grad():  # rank-deficient products happen too
        a2.weight[:, : min(deficient, d)] = 0
    s = two_linear_set(a1, a2, (n,))
    w1, w2 = a1.weight.detach().numpy(), a2.weight.detach().numpy()
    assert s.dim == n - np.linalg.matrix_rank(w2 @ w1)
    assert s.first_dim == n - np.linalg.matrix_rank(w1)
    assert s.first_dim <= s.dim  # P^(0) ⊆ P^(1)
    if s.dim:
        delta = s.sample(3, scale=1e4)
        assert np.abs(delta.numpy() @ (w2 @ w1).T).max() < 1e-9
    if n > d and m > d and deficient == 0:
        assert s.dim == s.first_dim  # Lemma 1.6: n, m > d gives P = P^(0)


# ---------------------------------------------------------------------------------------
# P^(l): exact convex pieces of ReLU networks
# ---------------------------------------------------------------------------------------
def mlp(seed: int, widths=(6, 8, 5), dtype=torch.float64) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).to(dtype).eval()


def cnn(seed: int, dtype=torch.float64) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3)).to(dtype).eval()


def layer_jacobian(model: nn.Sequential, x: torch.Tensor, index: int) -> np.ndarray:
    """Oracle: d(output of layer ``index``)/dx at x by autograd, (m, n)."""
    head = nn.Sequential(*list(model)[: index + 1])
    jac = torch.autograd.functional.jacobian(lambda v: head(v.unsqueeze(0))[0], x)
    return jac.reshape(-1, x.numel()).detach().numpy()


@settings(max_examples=20, **SETTINGS)
@given(st.integers(0, 2**16), st.sampled_from(["mlp", "cnn"]))
def test_piece_dims_and_membership_against_the_network(seed, kind):
    model = mlp(seed) if kind == "mlp" else cnn(seed)
    shape = (6,) if kind == "mlp" else (1, 4, 4)
    x = torch.randn(*shape, generator=gen(seed), dtype=torch.float64)
    x_before = x.clone()
    net = ReluNetwork(model, shape)
    pieces = net.all_pieces(x)
    with torch.no_grad():
        full = model(x.unsqueeze(0))
    dims = []
    for i, piece in enumerate(pieces):
        # Oracle dimension: n - rank of layer i's Jacobian (inactive ReLU rows are 0; no ties here).
        assert piece.dim == x.numel() - np.linalg.matrix_rank(layer_jacobian(model, x, i)), piece.layer
        dims.append(piece.dim)
        delta = piece.sample(12, generator=gen(seed + i))
        assert piece.contains(delta).all()
        cert = piece.certify(delta)
        assert cert.output_unchanged.all() and (cert.layer_change < 1e-9).all()
        with torch.no_grad():
            assert rel_change(model(x + delta), full.expand(12, -1)) < 1e-9
        # Boundary: the extent (HiGHS) is where the network's output starts to move.
        if piece.dim:
            d = piece.basis()[0] + 0.5 * piece.basis()[-1]
            t = piece.extent(d)
            if math.isfinite(t) and t > 0:
                near, past = (t * (1 - 1e-9)) * d, (t * 1.01) * d
                assert piece.contains(torch.stack([near])).all() and not piece.contains(torch.stack([past])).any()
                with torch.no_grad():
                    layer_out = nn.Sequential(*list(model)[: i + 1])
                    base = layer_out(x.unsqueeze(0))
                    assert rel_change(layer_out((x + near).unsqueeze(0)), base) < 1e-9
                    if kind == "mlp":
                        # Past the boundary a unit flips and (generically) the output moves. Not so with
                        # max pooling: an inactive unit that turns on below its window's maximum leaves the
                        # output alone, a point of another piece of the union, not computed here.
                        assert rel_change(layer_out((x + past).unsqueeze(0)), base) > 1e-9
    # P^(l) ⊆ P^(l+1): dims grow, and samples of a layer's piece lie in the next one's.
    assert dims == sorted(dims)
    for a, b in zip(pieces, pieces[1:]):
        assert b.contains(a.sample(6, generator=gen(seed))).all()
    assert torch.equal(x, x_before)


@settings(max_examples=15, **SETTINGS)
@given(st.integers(0, 2**16))
def test_leaving_the_piece_changes_the_output(seed):
    model = mlp(seed, widths=(6, 8, 8, 3))
    x = torch.randn(6, generator=gen(seed), dtype=torch.float64)
    piece = ReluNetwork(model, (6,)).piece(x)
    with torch.no_grad():
        y = model(x.unsqueeze(0))
        pre = model[0](x.unsqueeze(0))[0]
        w = model[0].weight
    active = torch.nonzero(pre > 0).flatten()
    if len(active) == 0:
        return
    # Flip an active first-layer unit: push its pre-activation to -1 along its weight row.
    i = int(active[0])
    delta = (-(pre[i] + 1.0) / w[i].dot(w[i]) * w[i]).unsqueeze(0)
    assert not piece.contains(delta).any()
    with torch.no_grad():
        changed = rel_change(model(x + delta), y) > 1e-9
    cert = piece.certify(delta)
    assert bool(cert.output_unchanged[0]) == (not changed)


def test_p0_of_an_mlp_is_the_nullspace_of_its_first_linear():
    torch.manual_seed(0)
    model = MLP5((1, 4, 4), hidden=(6, 6), num_classes=3).double().eval()
    x = torch.rand(1, 4, 4, generator=gen(), dtype=torch.float64)
    net = ReluNetwork(model, (1, 4, 4))
    assert net.layer_names[:3] == ["normalize", "flatten", "fc1"]
    p0 = net.piece(x, "fc1")
    assert p0.dim == harmless.harmless_subspace(model, (1, 4, 4)).dim == 16 - 6
    assert net.piece(x, "normalize").dim == 0  # a bijection ignores nothing
    # Large harmless perturbations: 1e4 times the image, along H^(0), added to a sample of the full piece.
    full = net.piece(x)
    big = 1e4 * float(x.norm()) * harmless.harmless_subspace(model, (1, 4, 4)).sample(4, generator=gen())
    delta = full.sample(4, generator=gen()) + big
    assert full.contains(delta).all() and full.certify(delta).output_unchanged.all()
    assert full.dim >= p0.dim


def test_theorem2_extremes():
    lin = nn.Linear(4, 3).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(3, 4, generator=gen(), dtype=torch.float64))
    model = nn.Sequential(lin, nn.ReLU(), nn.Linear(3, 2).double()).eval()
    x = torch.randn(4, generator=gen(1), dtype=torch.float64)
    with torch.no_grad():
        lin.bias.copy_(100.0 - lin.weight @ x + 1)  # every pre-activation positive
    net = ReluNetwork(model, (4,))
    assert net.piece(x, 1).dim == net.piece(x, 0).dim == 1  # P = P^(0)
    with torch.no_grad():
        lin.bias.copy_(-100.0 - lin.weight @ x)  # every pre-activation negative
    net = ReluNetwork(model, (4,))
    assert net.piece(x, 1).dim == 4 and net.piece(x, 0).dim == 1  # the larger set: all of R^n locally
    assert net.piece(x, 1).extent(torch.ones(4, dtype=torch.float64)) > 10


@settings(max_examples=12, **SETTINGS)
@given(st.integers(0, 2**16), st.sampled_from([("mlp", "1"), ("mlp", "3"), ("cnn", "1"), ("cnn", "5")]))
def test_theorem2_extremes_by_bias_shift_against_brute_force(seed, where):
    kind, relu = where
    model = mlp(seed, widths=(6, 8, 8, 3)) if kind == "mlp" else cnn(seed)
    shape = (6,) if kind == "mlp" else (1, 4, 4)
    x = torch.randn(*shape, generator=gen(seed), dtype=torch.float64)
    params = [p.clone() for p in model.parameters()]
    n = x.numel()
    for extreme in EXTREMES:
        shifted = extreme_bias_shift(model, x, relu, extreme, margin=0.5)
        m = shifted.model
        k = [name for name, _ in m.named_children()].index(relu)
        pre = layer_jacobian(m, x, k - 1)  # oracle: the ReLU's input Jacobian by autograd
        net = ReluNetwork(m, shape)
        before, at = net.piece(x, k - 1), net.piece(x, k)
        with torch.no_grad():
            y = m(x.unsqueeze(0))
        if extreme == "positive":
            assert (shifted.pre_activation >= 0.5 - 1e-12).all()
            # P^(relu) = P^(previous): the same dimension, n - rank of the previous layer's Jacobian,
            # and the same set (samples of each lie in the other).
            assert at.dim == before.dim == n - np.linalg.matrix_rank(pre)
            assert at.contains(before.sample(8, generator=gen(seed))).all()
            assert before.contains(at.sample(8, generator=gen(seed + 1))).all()
        else:
            assert (shifted.pre_activation <= -0.5 + 1e-12).all()
            # The larger set: everything that keeps the earlier pattern (full-dimensional here,
            # no ties) and leaves the pre-activations <= 0; brute force over random points.
            assert at.dim == n and at.dim >= before.dim
            d = torch.randn(400, *shape, generator=gen(seed + 2), dtype=torch.float64)
            d = d * torch.logspace(-3, 1, 400, dtype=torch.float64).view(-1, *[1] * len(shape))
            with torch.no_grad():
                inside = torch.ones(400, dtype=torch.bool)
                for j in range(k + 1):
                    head = nn.Sequential(*list(m)[:j])  # the input of module j
                    z0, z1 = head(x.unsqueeze(0)), head(x + d)
                    if j == k:
                        inside &= (z1 <= 0).reshape(400, -1).all(dim=1)
                    elif isinstance(m[j], nn.ReLU):
                        inside &= ((z0 > 0) == (z1 > 0)).reshape(400, -1).all(dim=1)
                    elif isinstance(m[j], nn.MaxPool2d):  # each window's maximum still at the same entry
                        _, idx = F.max_pool2d(z0, 2, return_indices=True)
                        at_idx = z1.flatten(2).gather(2, idx.flatten(2).expand(400, -1, -1))
                        inside &= (at_idx == F.max_pool2d(z1, 2).flatten(2)).reshape(400, -1).all(dim=1)
                changed = ((m(x + d) - y).norm(dim=1) / y.norm()) > 1e-9
            assert torch.equal(at.contains(d), inside)
            assert not changed[inside].any()
            assert 0 < int(inside.sum()) < 400  # both sides of the boundary were tried
        delta = at.sample(10, generator=gen(seed + 3))
        assert at.certify(delta).output_unchanged.all()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))  # the caller's model untouched


def test_extreme_bias_shift_bad_input():
    model = mlp(0)
    x = torch.ones(6, dtype=torch.float64)
    with pytest.raises(InputError, match="extreme"):
        extreme_bias_shift(model, x, "1", "negative")
    with pytest.raises(InputError, match="no ReLU named '0'"):
        extreme_bias_shift(model, x, "0", "positive")
    with pytest.raises(UnsupportedLayerError, match="bias"):
        extreme_bias_shift(nn.Sequential(nn.Linear(6, 4, bias=False), nn.ReLU()).double().eval(), x, "1", "positive")


def test_implicit_equalities_from_ties():
    # Two units with opposite weight rows, both exactly at 0: together they force a.delta = 0.
    lin = nn.Linear(2, 2, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0], [-1.0, -2.0]]))
    net = ReluNetwork(nn.Sequential(lin, nn.ReLU()).eval(), (2,))
    piece = net.piece(torch.tensor([2.0, -1.0], dtype=torch.float64), 1)
    assert piece.n_equalities == 0 and list(piece.implicit_equalities) == [0, 1]
    assert piece.dim == 1  # oracle: {delta : delta_1 + 2 delta_2 = 0}
    d = piece.sample(5)
    assert np.abs(d.numpy() @ np.array([1.0, 2.0])).max() < 1e-12


def test_float32_model_and_batch_is_per_sample():
    model = cnn(3, dtype=torch.float32)
    x = torch.randn(3, 1, 4, 4, generator=gen(3))
    params = [p.clone() for p in model.parameters()]
    pieces = harmless_set(model, x)
    assert len(pieces) == 3
    net = ReluNetwork(model, (1, 4, 4))
    for i, piece in enumerate(pieces):
        alone = net.piece(x[i])
        assert piece.dim == alone.dim and np.array_equal(piece.E, alone.E) and np.array_equal(piece.G, alone.G)
        delta = piece.sample(5, generator=gen(i))
        assert delta.dtype == torch.float32 and piece.contains(delta).all()
        with torch.no_grad():
            assert rel_change(model(x[i] + delta), model(x[i : i + 1]).expand(5, -1)) < 1e-4
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))


def test_bad_input():
    model = mlp(0)
    net = ReluNetwork(model, (6,))
    with pytest.raises(InputError, match="shape"):
        net.piece(torch.zeros(5, dtype=torch.float64))
    with pytest.raises(InputError, match="non-finite"):
        net.piece(torch.full((6,), float("nan"), dtype=torch.float64))
    with pytest.raises(InputError, match="no layer named"):
        net.piece(torch.zeros(6, dtype=torch.float64), "fc9")
    with pytest.raises(InputError, match="floating"):
        net.piece(torch.zeros(6, dtype=torch.int64))
    piece = net.piece(torch.ones(6, dtype=torch.float64))
    with pytest.raises(InputError, match="shape"):
        piece.contains(torch.zeros(2, 5, dtype=torch.float64))
    with pytest.raises(UnsupportedLayerError, match="'1'.*Sigmoid"):
        ReluNetwork(nn.Sequential(nn.Linear(3, 3), nn.Sigmoid()).eval(), (3,))

    class Branchy(nn.Module):
        def forward(self, x):
            return x + 1

    with pytest.raises(UnsupportedLayerError, match="Sequential"):
        ReluNetwork(Branchy().eval(), (3,))
    with pytest.raises(InputError, match="non-finite"):
        layer_set(nn.ReLU(), torch.tensor([1.0, float("inf")]))
    training = mlp(0).train()
    with pytest.warns(TrainingModeWarning):
        ReluNetwork(training, (6,))
    assert training.training  # the caller's model keeps its mode


@pytest.mark.slow
def test_lemma1_measurement_on_mlp5():
    # Trains mlp5:mnist on first use (minutes on a busy machine); then a few seconds.
    from harmless.experiments.lemma1 import measure

    r = measure("mlp5:mnist", 3, samples=2)
    fc1 = r.layers.index("fc1")
    assert (r.dims[:, fc1] == 528).all() and r.h0_dim == 528
    assert (np.diff(r.dims, axis=1) >= 0).all()  # P^(l) ⊆ P^(l+1)
    assert max(r.output_change) < 1e-12 and min(r.outside_h0) > 0.1


@pytest.mark.slow
def test_theorem2_extremes_on_mlp5():
    # The README's numbers (MLP-5/MNIST, test image 0). Trains mlp5:mnist on first use.
    from harmless.experiments.lemma1 import measure_extremes

    rows = {(r["relu"], r["extreme"]): r for r in measure_extremes("mlp5:mnist", 0)}
    for relu, before in (("relu1", 528), ("relu3", 683)):
        assert rows[relu, "positive"]["dim_before"] == rows[relu, "positive"]["dim_at"] == before
        assert rows[relu, "non-positive"]["dim_at"] == rows[relu, "non-positive"]["dim_output"] == 784
    assert max(float(r["max_output_change"]) for r in rows.values()) < 1e-12


def test_samples_enter_a_piece_whose_boundary_holds_zero() -> None:
    """A constant image (MNIST's background) gives every window of a conv the same positive
    value, so each max-pool window ties: 0 lies on the piece's boundary and a random hull
    direction leaves it at once (LeNet's samples were all 0 before). sample() must return
    non-zero members (tilted into the piece), each certified by evaluating the network, and the
    extent along them must be positive."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 2, 3, padding=1)
    with torch.no_grad():
        conv.bias.fill_(1.0)  # a zero image: every pre-activation 1 (ReLU active), all tied
    model = nn.Sequential(conv, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3)).double().eval()
    x = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    piece = harmless.harmless_set(model, x)[0]
    assert piece.dim > 0
    delta = piece.sample(16, generator=torch.Generator().manual_seed(2))
    norms = delta.reshape(16, -1).norm(dim=1)
    assert bool((norms > 0).all())
    cert = piece.certify(delta)
    assert bool(cert.contains.all()) and bool(cert.output_unchanged.all())
    with torch.no_grad():
        change = (model(x + delta) - model(x)).abs().max()
    assert float(change) <= 1e-12
    assert piece.extent(delta[0] / norms[0]) > 0


# ---------------------------------------------------------------------------------------
# The fast path (nested pieces, least-squares certificates, Cholesky full-rank, reused hulls)
# against a brute-force oracle: the implicit equalities by one LP over the full input space
# (E delta = 0 as equality constraints, no null space), the dimension by NumPy's dense rank.
# ---------------------------------------------------------------------------------------
def tied_cnn(seed: int) -> nn.Sequential:
    """Conv, ReLU, max pool, an injective 3x3 conv (its piece is the pool's: the reused hull),
    ReLU, max pool, Flatten (injective too), Linear, ReLU, Linear. Positive conv biases on a
    zero background make whole windows tie at a positive value (LeNet's case)."""
    torch.manual_seed(seed)
    conv1, conv2 = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 4, 3, padding=1)
    with torch.no_grad():
        conv1.bias.uniform_(0.2, 1.0)
        conv2.bias.uniform_(-0.5, 1.0)
    return nn.Sequential(conv1, nn.ReLU(), nn.MaxPool2d(2), conv2, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 3)).double().eval()


def oracle_implicit(piece) -> np.ndarray:
    """Brute force: the tight rows that no delta with E delta = 0 and G_T delta <= 0 makes strict
    (max sum s, G_T delta + s <= 0, 0 <= s <= 1; HiGHS over the input space itself)."""
    import scipy.optimize

    tight = np.flatnonzero(piece.h <= 0)
    if tight.size == 0:
        return tight
    g = piece.G[tight]
    g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-300)
    t, n = g.shape
    e = piece.E / max(np.abs(piece.E).max(), 1e-300) if piece.E.size else np.zeros((0, n))
    eq = dict(A_eq=np.hstack([e, np.zeros((e.shape[0], t))]), b_eq=np.zeros(e.shape[0])) if e.shape[0] else {}
    res = scipy.optimize.linprog(np.concatenate([np.zeros(n), -np.ones(t)]), A_ub=np.hstack([g, np.eye(t)]),
                                 b_ub=np.zeros(t), bounds=[(None, None)] * n + [(0, 1)] * t, method="highs", **eq)
    assert res.status == 0
    return tight[res.x[n:] < 0.5]


@settings(max_examples=4, **SETTINGS)
@given(st.integers(0, 2**16), st.integers(0, 3))
def test_fast_pieces_against_brute_force_on_tied_cnns(seed, patch):
    model = tied_cnn(seed)
    x = torch.zeros(1, 8, 8, dtype=torch.float64)  # a background of zeros: tied windows
    if patch:  # an object in one corner, the rest background
        x[0, : 2 * patch, : 2 * patch] = torch.randn(2 * patch, 2 * patch, generator=gen(seed), dtype=torch.float64)
    net = ReluNetwork(model, (1, 8, 8))
    pieces = net.all_pieces(x)  # in order: each piece uses the one below
    with torch.no_grad():
        full = model(x.unsqueeze(0))
    ties = 0
    for i, piece in enumerate(pieces):
        implicit = oracle_implicit(piece)
        assert np.array_equal(np.sort(piece.implicit_equalities), implicit), piece.layer
        ties += implicit.size
        m = np.vstack([piece.E, piece.G[implicit]])
        assert piece.dim == 64 - (np.linalg.matrix_rank(m) if m.shape[0] else 0), piece.layer
        alone = net.piece(x, i)  # without the piece below: the least-squares/LP path alone
        assert alone.dim == piece.dim and np.array_equal(np.sort(alone.implicit_equalities), implicit)
        delta = piece.sample(6, generator=gen(seed + i))
        cert = piece.certify(delta)
        assert cert.contains.all() and (cert.layer_change <= 1e-12).all() and (cert.output_change <= 1e-12).all()
        with torch.no_grad():
            assert rel_change(model(x + delta), full.expand(6, -1)) <= 1e-12
    assert [p.dim for p in pieces] == sorted(p.dim for p in pieces)
    if not patch:
        assert ties > 0  # the tied windows made implicit equalities (checked against the oracle above)


@settings(max_examples=30, **SETTINGS)
@given(st.integers(1, 12), st.integers(1, 6), st.integers(0, 3), st.floats(-14, 0), st.integers(0, 2**16))
def test_cholesky_full_rank_never_contradicts_the_svd(extra, n, deficient, log_cond, seed):
    from harmless.nonlinear.network import _full_rank

    rng = np.random.default_rng(seed)
    m = n + extra
    u, _ = np.linalg.qr(rng.standard_normal((m, n)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    s = np.logspace(0, log_cond, n)
    s[n - min(deficient, n):] = 0.0
    e = (u * s) @ v.T
    if rng.random() < 0.5:
        e[rng.random(e.shape) < 0.6] = 0.0  # mostly zeros: the sparse Gram
    full = np.linalg.matrix_rank(e) == n
    if _full_rank(e):
        assert full  # a certificate only: True never where the SVD finds a lower rank
        assert scipy.linalg.svdvals(e)[-1] >= 1e-4 * scipy.linalg.svdvals(e)[0]
    elif full and log_cond > -1 and not (e == 0).any():
        pytest.fail("a well-conditioned full-rank matrix was not certified")


@settings(max_examples=30, **SETTINGS)
@given(st.integers(1, 8), st.integers(0, 6), st.integers(0, 4), st.integers(0, 2**16))
def test_strict_rows_match_the_full_lp(k, free_rows, pairs, seed):
    """A cone {y : a y <= 0} with implicit rows (pairs +r, -r) and rows that can be strict:
    the least-squares/LP split finds the same strict rows as the LP on all rows, and its y is in
    the cone and strict on them."""
    from harmless.nonlinear.network import _strict_by_lp, _strict_rows

    rng = np.random.default_rng(seed)
    inside = rng.standard_normal(k)
    rows = [r - max(0.0, r @ inside + 0.1) * inside / (inside @ inside) for r in rng.standard_normal((free_rows, k))]
    for r in rng.standard_normal((pairs, k)):
        rows += [r, -r]
    if not rows:
        return
    a = np.array(rows)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    order = rng.permutation(len(a))
    a = a[order]
    expected, _ = _strict_by_lp(a)
    for hint in (None, rng.standard_normal(k)):
        strict, y = _strict_rows(a, hint)
        assert np.array_equal(strict, expected)
        if strict.any():
            v = a @ y
            assert (v[strict] < 0).all() and (v[~strict] <= 1e-9).all()
