"""Tests of harmless.linalg.prefix: finding a model's linear prefix (and H^(l) at a named
layer), checked against the oracle of tests/oracle.py (the modules applied to the standard
basis in float64).

Harmlessness bound used here (float64): a harmless delta scaled to 1e4 x the input's norm
changes the model's output by at most 1e-12 * ||A|| * ||W_after|| * ||delta||, where
``||W_after||`` bounds the Lipschitz constant of what follows the linear run.
"""

from __future__ import annotations

import os
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))

import oracle
from oracle import single_torch_thread  # noqa: F401

import harmless
from harmless.errors import (
    InputError,
    NoHarmlessSubspaceError,
    TrainingModeWarning,
    UnsupportedLayerError,
)
from harmless.linalg.prefix import linear_layers, linear_run
from harmless.nn import Normalize

F64 = torch.float64


def _seeded(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        for name, b in module.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen) + 0.2)
            elif name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen))
    return module.eval()


def front_end(seed: int = 0) -> nn.Sequential:
    """Normalize -> Conv (wide, stride 2) -> BN -> ReLU -> Flatten -> Linear."""
    return _seeded(nn.Sequential(
        Normalize([0.4, 0.5, 0.6], [0.2, 0.25, 0.3]),
        nn.Conv2d(3, 4, 3, stride=2, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
    ), seed)


SHAPE = (3, 8, 8)


def _dim(module: nn.Module, shape: tuple[int, ...]) -> int:
    a = oracle.dense_matrix(module, shape)
    return a.shape[1] - oracle.rank(a)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.ndim - 1)))


# ---------------------------------------------------------------------------------------
# The prefix of a plain Sequential
# ---------------------------------------------------------------------------------------
def test_normalize_conv_bn_relu_stops_at_relu_after_three_layers() -> None:
    model = front_end()
    run = linear_run(model, SHAPE)
    assert [r.kind for r in run.layers] == ["Normalize", "Conv2d", "BatchNorm2d"]
    assert [r.name for r in run.layers] == ["0", "1", "2"]
    assert run.stopped_at is not None and "ReLU" in run.stopped_at and run.stopped_at.startswith("3")
    assert "not linear" in run.stop_reason
    assert run.layers[0].in_shape == SHAPE and run.layers[-1].out_shape == (4, 4, 4)
    assert "stops at 3 (ReLU)" in run.description
    prefix = model[:3]
    a = oracle.dense_matrix(prefix, SHAPE)
    np.testing.assert_allclose(run.operator.to_dense().numpy(), a, atol=1e-12)
    space = harmless.harmless_subspace(model, SHAPE)
    assert space.dim == 192 - oracle.rank(a) == 192 - 64
    assert space.run is not None and len(space.run.layers) == 3


def test_prefix_samples_leave_the_whole_model_unchanged() -> None:
    model = front_end(1)
    space = harmless.harmless_subspace(model, SHAPE)
    a = oracle.dense_matrix(model[:3], SHAPE)
    norm_a = oracle.spectral_norm(a)
    model64 = oracle.float64_copy(model)
    w_norm = float(torch.linalg.matrix_norm(model64[5].weight.detach(), ord=2))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, *SHAPE, generator=gen, dtype=F64)
    delta = space.sample(6, generator=gen) * _bcast(1e4 * x.reshape(6, -1).norm(dim=1), x)
    dn = delta.reshape(6, -1).norm(dim=1)
    with torch.no_grad():
        diff = (model64(x + delta) - model64(x)).norm(dim=1)
    assert bool((diff <= 1e-12 * w_norm * norm_a * dn).all()), diff
    # and the prediction is the same
    with torch.no_grad():
        assert torch.equal(model64(x + delta).argmax(1), model64(x).argmax(1))


class FlattenModel(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.norm = Normalize([0.1, -0.2], [0.5, 2.0])
        self.conv = nn.Conv2d(2, 3, 3, stride=2)
        self.fc = nn.Linear(3 * 3 * 2, 40)
        self.head = nn.Linear(40, 4)

    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.norm(x))
        if self.how == "torch.flatten":
            x = torch.flatten(x, 1)
        elif self.how == "view_size":
            x = x.view(x.size(0), -1)
        elif self.how == "reshape_shape":
            x = x.reshape(x.shape[0], -1)
        elif self.how == "method_flatten":
            x = x.flatten(1)
        return self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.prefix(x)))


class _Prefix(nn.Module):
    def __init__(self, model: FlattenModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.prefix(x)


@pytest.mark.parametrize("how", ["torch.flatten", "view_size", "reshape_shape", "method_flatten"])
def test_functional_flatten_before_linear_is_traced_through(how: str) -> None:
    model = _seeded(FlattenModel(how), 3)
    shape = (2, 7, 6)
    run = linear_run(model, shape)
    kinds = [r.kind for r in run.layers]
    assert kinds[:2] == ["Normalize", "Conv2d"] and kinds[-1] == "Linear" and len(kinds) == 4, kinds
    assert run.stopped_at is not None and "relu" in run.stopped_at
    a = oracle.dense_matrix(_Prefix(model), shape)
    np.testing.assert_allclose(run.operator.to_dense().numpy(), a, atol=1e-12)
    assert harmless.harmless_subspace(model, shape).dim == 84 - oracle.rank(a)


class Residual(nn.Module):
    def __init__(self, stem_first_normalize: bool) -> None:
        super().__init__()
        self.stem = nn.Sequential(Normalize([0.0, 0.0], [0.5, 0.5]), nn.Conv2d(2, 3, 3, stride=2)) \
            if stem_first_normalize else nn.Conv2d(2, 3, 3, stride=2)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 3 * 3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        y = self.conv2(F.relu(s)) + s  # the stem's output is read twice
        return self.fc(torch.flatten(y, 1))


@pytest.mark.parametrize("normalize", [False, True])
def test_residual_block_stops_at_the_branch(normalize: bool) -> None:
    model = _seeded(Residual(normalize), 5)
    shape = (2, 7, 7)
    run = linear_run(model, shape)
    assert len(run.layers) == (2 if normalize else 1)
    assert run.layers[-1].kind == "Conv2d"
    assert "branch" in run.stop_reason and "2 later layers" in run.stop_reason
    assert run.stopped_at is not None and "stem" in run.stopped_at
    assert harmless.harmless_subspace(model, shape).dim == _dim(model.stem, shape)


def test_input_read_twice_gives_no_prefix() -> None:
    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) + x

    run = linear_run(Skip().eval(), (6,))
    assert run.layers == [] and "branch" in run.stop_reason
    assert harmless.harmless_subspace(Skip().eval(), (6,)).dim == 0


# ---------------------------------------------------------------------------------------
# layer="name": H^(l) at a layer's input
# ---------------------------------------------------------------------------------------
class Deep(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 2, 3, stride=2)
        self.bn2 = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2 * 3 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.flatten(1))


def test_layer_name_gives_subspace_at_that_layers_input() -> None:
    model = _seeded(Deep(), 7)
    shape = (3, 7, 7)
    feature_shape = (4, 7, 7)
    space = harmless.harmless_subspace(model, shape, layer="conv2")
    assert space.input_shape == feature_shape
    assert [r.name for r in space.run.layers] == ["conv2", "bn2"]
    a = oracle.dense_matrix(nn.Sequential(model.conv2, model.bn2), feature_shape)
    assert space.dim == 196 - oracle.rank(a) == 196 - 18
    # harmlessness on the whole model: perturb conv2's input with a forward pre-hook
    model64 = oracle.float64_copy(model)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, *shape, generator=gen, dtype=F64)
    feats = {}
    hook = model64.conv1.register_forward_hook(lambda m, i, o: feats.setdefault("f", o))
    with torch.no_grad():
        clean = model64(x)
    hook.remove()
    fnorm = F.relu(feats["f"]).reshape(4, -1).norm(dim=1)
    delta = space.sample(4, generator=gen) * _bcast(1e4 * fnorm, x)
    handle = model64.conv2.register_forward_pre_hook(lambda m, inp: (inp[0] + delta,))
    with torch.no_grad():
        perturbed = model64(x)
    handle.remove()
    w_norm = float(torch.linalg.matrix_norm(model64.fc.weight.detach(), ord=2))
    dn = delta.reshape(4, -1).norm(dim=1)
    diff = (perturbed - clean).norm(dim=1)
    assert bool((diff <= 1e-12 * w_norm * oracle.spectral_norm(a) * dn).all()), diff
    # a random perturbation of the same size is not harmless (the hook works)
    rnd = torch.randn(4, *feature_shape, generator=gen, dtype=F64)
    rnd = rnd / _bcast(rnd.reshape(4, -1).norm(dim=1), rnd) * _bcast(1e4 * fnorm, rnd)
    handle = model64.conv2.register_forward_pre_hook(lambda m, inp: (inp[0] + rnd,))
    with torch.no_grad():
        assert float((model64(x) - clean).norm()) > 1.0
    handle.remove()


def test_layer_name_on_the_last_linear_and_a_bijective_layer() -> None:
    model = _seeded(Deep(), 8)
    shape = (3, 7, 7)
    fc_space = harmless.harmless_subspace(model, shape, layer="fc")
    assert fc_space.input_shape == (18,)
    assert fc_space.dim == 18 - oracle.rank(oracle.dense_matrix(model.fc, (18,))) == 15
    bn_space = harmless.harmless_subspace(model, shape, layer="bn2")
    assert bn_space.dim == 0
    with pytest.raises(NoHarmlessSubspaceError, match="least_harmful"):
        bn_space.sample(1)


def test_nested_sequential_layer_names() -> None:
    model = nn.Sequential()
    model.add_module("features", nn.Sequential(nn.Conv2d(1, 2, 2, stride=2), nn.ReLU(), nn.Conv2d(2, 1, 2)))
    model.add_module("head", nn.Flatten())
    model = _seeded(model, 2)
    run = linear_run(model, (1, 6, 6))
    assert [r.name for r in run.layers] == ["features.0"]
    space = harmless.harmless_subspace(model, (1, 6, 6), layer="features.2")
    assert space.input_shape == (2, 3, 3)
    assert space.dim == 18 - oracle.rank(oracle.dense_matrix(model.features[2], (2, 3, 3)))


def test_layer_named_non_linear_raises_naming_it() -> None:
    model = front_end()
    with pytest.raises(UnsupportedLayerError, match=r"layer 3 \(ReLU\) is not linear"):
        harmless.harmless_subspace(model, SHAPE, layer="3")
    ln = nn.Sequential(nn.Linear(6, 4), nn.LayerNorm(4), nn.Linear(4, 2)).eval()
    with pytest.raises(UnsupportedLayerError, match=r"1 \(LayerNorm\)"):
        harmless.harmless_subspace(ln, (6,), layer="1")


def test_layer_unknown_lists_the_layers() -> None:
    with pytest.raises(InputError, match="no layer named 'conv9'") as info:
        harmless.harmless_subspace(_seeded(Deep(), 0), (3, 7, 7), layer="conv9")
    for name in ("conv1", "conv2", "bn2", "fc"):
        assert name in str(info.value)


def test_layer_called_twice_is_ambiguous() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(F.relu(self.fc(x)))

    with pytest.raises(InputError, match="called 2 times"):
        harmless.harmless_subspace(Twice().eval(), (4,), layer="fc")


# ---------------------------------------------------------------------------------------
# Where the prefix is empty or ends early
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("first,name", [(nn.ReLU(), "ReLU"), (nn.LayerNorm(6), "LayerNorm"),
                                        (nn.Softmax(dim=1), "Softmax")])
def test_unsupported_first_layer_gives_dim_zero_and_a_reason(first: nn.Module, name: str) -> None:
    model = nn.Sequential(first, nn.Linear(6, 2)).eval()
    run = linear_run(model, (6,))
    assert run.layers == []
    assert run.stopped_at is not None and name in run.stopped_at
    assert f"{name} is not linear" in run.stop_reason
    space = harmless.harmless_subspace(model, (6,))
    assert space.dim == 0 and space.ambient_dim == 6
    with pytest.raises(NoHarmlessSubspaceError):
        space.sample(1)


def test_batchnorm_without_running_stats_is_not_folded() -> None:
    conv = nn.Conv2d(2, 3, 2, stride=2)
    model = _seeded(nn.Sequential(conv, nn.BatchNorm2d(3, track_running_stats=False), nn.ReLU()), 1)
    run = linear_run(model, (2, 6, 6))
    assert [r.kind for r in run.layers] == ["Conv2d"]
    assert run.stopped_at is not None and "BatchNorm2d" in run.stopped_at
    assert "not linear" in run.stop_reason
    assert harmless.harmless_subspace(model, (2, 6, 6)).dim == _dim(conv, (2, 6, 6))
    with pytest.raises(UnsupportedLayerError, match="BatchNorm2d"):
        harmless.harmless_subspace(model, (2, 6, 6), layer="1")


def test_dropout_and_pooling_are_folded() -> None:
    model = _seeded(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Dropout(0.3), nn.AvgPool2d(2),
                                  nn.AdaptiveAvgPool2d((2, 2)), nn.Flatten(), nn.Linear(12, 5), nn.ReLU()), 4)
    shape = (2, 6, 6)
    run = linear_run(model, shape)
    assert [r.kind for r in run.layers] == ["Conv2d", "Dropout", "AvgPool2d", "AdaptiveAvgPool2d", "Flatten",
                                            "Linear"]
    a = oracle.dense_matrix(model[:6], shape)
    np.testing.assert_allclose(run.operator.to_dense().numpy(), a, atol=1e-12)
    assert harmless.harmless_subspace(model, shape).dim == 72 - oracle.rank(a)


def test_squeeze_and_unsqueeze_methods_are_reshapes() -> None:
    class Sq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(1, 2, 3, stride=3)
            self.fc = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.conv(x.unsqueeze(1))  # (B, 12) -> (B, 1, 12) -> (B, 2, 4)
            return torch.tanh(self.fc(x.reshape(x.size(0), 8)))

    model = _seeded(Sq(), 6)
    run = linear_run(model, (12,))
    assert [r.kind for r in run.layers] == ["unsqueeze", "Conv1d", "reshape", "Linear"]
    assert harmless.harmless_subspace(model, (12,)).dim == 12 - 3


class SqueezeAll(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 1, 3)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(self.conv(x).squeeze()))  # (B, 1, 6) -> (B, 6) for B > 1


def test_squeeze_without_dim_after_a_layer() -> None:
    """A valid model (for batches > 1) whose forward calls x.squeeze(). ShapeProp traces
    with a batch of 1, so the traced squeeze drops the batch axis too, and _linear_step
    builds ReshapeOperator((1, 6), ()) which raises InputError("cannot reshape (1, 6) to ()")
    out of linear_run. Expected: fold it or stop the run there, never fail the analysis."""
    model = _seeded(SqueezeAll(), 1)
    space = harmless.harmless_subspace(model, (1, 8))
    conv_dim = _dim(model.conv, (1, 8))
    a_full = oracle.dense_matrix(nn.Sequential(model.conv, nn.Flatten(), model.fc), (1, 8))
    assert space.dim in (conv_dim, 8 - oracle.rank(a_full))
    s = space.sample(3).float()
    x = torch.randn(3, 1, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x + 100 * s), model(x), atol=1e-3, rtol=0)


def test_batch_mixing_view_stops_the_run() -> None:
    """x.view(-1, 4) on (B, 8) makes (2B, 4): not a per-sample map. The run should stop
    there (dim 0 here) rather than raise InputError("cannot reshape (8,) to (4,))")."""
    class Mix(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.fc(x.view(-1, 4)))

    run = linear_run(Mix().eval(), (8,))
    assert run.layers == [] and run.stopped_at is not None


# ---------------------------------------------------------------------------------------
# Training mode, side effects# ---------------------------------------------------------------------------------------
# Training mode, side effects
# ---------------------------------------------------------------------------------------
def test_training_mode_warns_and_flags_are_restored() -> None:
    model = front_end(2)
    model.train()
    model[2].eval()  # a submodule that was already in eval mode stays so
    flags = [m.training for m in model.modules()]
    with pytest.warns(TrainingModeWarning, match="training mode"):
        space = harmless.harmless_subspace(model, SHAPE)
    assert [m.training for m in model.modules()] == flags
    # analysed in eval mode: BatchNorm with running statistics
    assert space.dim == _dim(model[:3], SHAPE)
    with pytest.warns(TrainingModeWarning):
        linear_run(model, SHAPE)
    assert [m.training for m in model.modules()] == flags
    with pytest.warns(TrainingModeWarning):
        harmless.least_harmful(model, SHAPE, k=1)
    assert [m.training for m in model.modules()] == flags


def test_eval_model_gives_no_warning_and_is_not_modified() -> None:
    model = front_end(3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        space = harmless.harmless_subspace(model, SHAPE)
        space.project(torch.randn(2, *SHAPE, dtype=F64))
        _ = space.dim
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]) and v.dtype == state[k].dtype, k
    assert not any(m.training for m in model.modules())


def test_training_flags_restored_when_analysis_fails() -> None:
    model = front_end(0).train()
    with pytest.warns(TrainingModeWarning), pytest.raises(InputError):
        harmless.harmless_subspace(model, (3, 8))  # wrong input shape
    assert all(m.training for m in model.modules())


# ---------------------------------------------------------------------------------------
# Models the tracer cannot handle
# ---------------------------------------------------------------------------------------
def test_model_with_two_inputs_raises_unsupported() -> None:
    """Two required inputs are refused before anything runs (parameters with defaults are fine)."""
    class Two(nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return x + y

    with pytest.raises(UnsupportedLayerError, match="takes 2 required inputs"):
        linear_run(Two().eval(), (3,))


def test_untraceable_model_raises_with_advice() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow
                return self.fc(x)
            return x

    with pytest.raises(UnsupportedLayerError, match="cannot trace"):
        harmless.harmless_subspace(Branchy().eval(), (3,))


def test_input_shape_the_model_rejects() -> None:
    with pytest.raises(InputError, match="does not accept inputs"):
        linear_run(front_end(), (3, 9))


def test_linear_layers_lists_linear_and_conv_layers_with_shapes() -> None:
    model = _seeded(Deep(), 9)
    layers = linear_layers(model, (3, 7, 7))
    assert [(r.name, r.kind, r.in_shape, r.out_shape) for r, _ in layers] == [
        ("conv1", "Conv2d", (3, 7, 7), (4, 7, 7)),
        ("conv2", "Conv2d", (4, 7, 7), (2, 3, 3)),
        ("fc", "Linear", (18,), (3,)),
    ]
    for (rec, op), module in zip(layers, (model.conv1, model.conv2, model.fc)):
        np.testing.assert_allclose(op.to_dense().numpy(), oracle.dense_matrix(module, rec.in_shape), atol=1e-12)


def test_float32_model_with_float64_analysis() -> None:
    """The model's own dtype (float32) does not limit the analysis dtype."""
    model = front_end(4)
    space = harmless.harmless_subspace(model, SHAPE, dtype=F64)
    s = space.sample(2)
    assert s.dtype == F64
    assert float(space.harmful_residual(s).max()) <= 1e-12
