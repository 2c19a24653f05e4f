"""Tests of harmless.models: the zoo, spec parsing, training, caching and safe loading."""

from __future__ import annotations

import builtins
import dataclasses
import math
import os
import pickle
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from harmless.errors import DataUnavailableError, InputError, ModelSpecError, UnsafeCheckpointError
from harmless.models import (
    ZOO,
    CheckpointWarning,
    TrainConfig,
    TrainingModeWarning,
    build_model,
    checkpoint_paths,
    describe_model,
    first_layer,
    get_model,
    list_zoo,
    load_model,
    load_state_dict_file,
    parse_spec,
    train_loop,
    train_zoo_model,
)
from harmless.models import checkpoint as checkpoint_mod
from harmless.models import train as train_mod
from harmless.models.train import deterministic
from harmless.nn import Normalize


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch, request):
    """Every test but the slow ones gets its own empty cache."""
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("HARMLESS_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory):
    """A folder with MNIST's idx files, to pass as ``data_dir`` (never the user's cache for writing).

    Reads the copy already in the user's cache when there is one (read-only); otherwise
    fetches one into a session-private cache. Skips when MNIST cannot be had.
    """
    from harmless.cache import CACHE_ENV

    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    root = os.environ.get(CACHE_ENV)
    user_folder = (Path(root).expanduser() if root else Path.home() / ".cache" / "harmless") / "data" / "mnist"
    if all((user_folder / n).is_file() for n in names):
        return user_folder
    private = tmp_path_factory.mktemp("mnist-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(private))
        try:
            from harmless.data import load_dataset

            load_dataset("mnist", split="train")
            load_dataset("mnist", split="test")
        except Exception as exc:
            pytest.skip(f"MNIST unavailable: {type(exc).__name__}: {exc}")
    return private / "data" / "mnist"


def _state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------- spec parsing


@pytest.mark.parametrize(
    ("spec", "key"),
    [
        ("mlp5:mnist", "mlp5:mnist"),
        ("mlp5", "mlp5:mnist"),
        ("mlp5:fashion-mnist", "mlp5:fashion-mnist"),
        ("MLP5:Fashion_MNIST", "mlp5:fashion-mnist"),
        ("lenet:mnist", "lenet:mnist"),
        ("lenet:", "lenet:mnist"),
        ("resnet18", "resnet18:cifar10"),
        ("resnet18:stem_stride=8", "resnet18:cifar10,stem_stride=8"),
        ("resnet18,stem_stride=8", "resnet18:cifar10,stem_stride=8"),
        ("resnet18:stem_stride=1", "resnet18:cifar10"),
        (
            "resnet50:cifar10,stem_stride=4,stem_channels=16",
            "resnet50:cifar10,stem_channels=16,stem_stride=4",
        ),
        (" vgg16 : stem_stride = 2 ", "vgg16:cifar10,stem_stride=2"),
        ("vgg16:mnist,stem_kernel=5", "vgg16:mnist,stem_kernel=5"),
        ("mlp5:mnist,hidden=(512,512)", "mlp5:mnist,hidden=512x512"),
        ("mlp5:hidden=512x256x128", "mlp5:mnist,hidden=512x256x128"),
        ("mlp5:hidden=300", "mlp5:mnist,hidden=300"),
        ("mlp5:hidden=256x256x256x256", "mlp5:mnist"),
        ("resnet18:stem_padding=0", "resnet18:cifar10,stem_padding=0"),
        ("vgg16:stem_kernel=4,stem_stride=4,stem_padding=0",
         "vgg16:cifar10,stem_kernel=4,stem_padding=0,stem_stride=4"),
        ("patchcnn", "patchcnn:mnist"),
        ("patchcnn:fashion-mnist", "patchcnn:fashion-mnist"),
        ("patchcnn:mnist,stem_channels=8,stem_kernel=4,stem_stride=4,stem_padding=0", "patchcnn:mnist"),
        ("patchcnn:cifar10,stem_channels=12", "patchcnn:cifar10,stem_channels=12"),
        ("mlp5:mnist,adv_eps=0.1", "mlp5:mnist,adv_eps=0.1"),
        ("mlp5:adv_eps=1e-1", "mlp5:mnist,adv_eps=0.1"),
        ("mlp5:mnist,adv_eps=0", "mlp5:mnist"),
        ("mlp5:mnist,adv_eps=1", "mlp5:mnist,adv_eps=1.0"),
        ("patchcnn:fmnist,adv_eps=0.25", "patchcnn:fashion-mnist,adv_eps=0.25"),
        ("mlp5:mnist,hidden=512,adv_eps=0.05", "mlp5:mnist,adv_eps=0.05,hidden=512"),
    ],
)
def test_spec_canonical_keys(spec, key):
    ms = parse_spec(spec)
    assert ms.key == key
    assert parse_spec(ms.key) == ms
    assert parse_spec(ms) is ms
    assert str(ms) == key
    assert "/" not in ms.file_stem and ":" not in ms.file_stem and "," not in ms.file_stem


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(["resnet18", "resnet50", "vgg16"]),
    dataset=st.sampled_from([None, "mnist", "fashion-mnist", "cifar10"]),
    values=st.dictionaries(
        st.sampled_from(["stem_stride", "stem_channels", "stem_kernel"]),
        st.integers(min_value=1, max_value=64),
    ),
)
def test_spec_round_trip_property(name, dataset, values):
    items = [f"{k}={v}" for k, v in values.items()]
    head = name if dataset is None else f"{name}:{dataset}"
    spec = head + ("" if not items else ("," if dataset else ":") + ",".join(items))
    ms = parse_spec(spec)
    again = parse_spec(ms.key)
    assert again == ms and again.key == ms.key
    kwargs = ms.kwargs
    for k, v in values.items():
        assert kwargs[k] == v
    assert ms.dataset == (dataset or "cifar10")
    # canonical: keys sorted, defaults left out
    extras = ms.key.split(",")[1:]
    assert extras == sorted(extras)
    assert all(not e.endswith("=1") or not e.startswith("stem_stride") for e in extras)


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("", "empty model spec"),
        ("alexnet", "unknown zoo model 'alexnet'"),
        ("alexnet:cifar10", "resnet18"),  # lists the valid names
        ("resnet18:imagenet", "unknown dataset 'imagenet'"),
        ("resnet18:imagenet", "cifar10"),
        ("resnet18:depth=3", "unknown parameter 'depth'"),
        ("resnet18:depth=3", "stem_stride"),
        ("resnet18:stem_stride=0", "stem_stride must be a positive integer"),
        ("resnet18:stem_stride=-2", "stem_stride must be a positive integer"),
        ("resnet18:stem_stride=2.5", "got '2.5'"),
        ("resnet18:stem_stride=two", "got 'two'"),
        ("resnet18:stem_stride=", "has no value"),
        ("resnet18:stem_stride=2,stem_stride=4", "given twice"),
        ("resnet18,cifar10", "unexpected 'cifar10'"),
        ("resnet18:cifar10,mnist", "unexpected 'mnist'"),
        ("resnet18:cifar10,,stem_stride=2", "empty item"),
        ("lenet:stem_stride=2", "valid parameters: adv_eps"),
        ("mlp5:adv_eps=-0.1", "adv_eps must be a number in [0, 1]"),
        ("mlp5:adv_eps=1.5", "adv_eps must be a number in [0, 1]"),
        ("mlp5:adv_eps=nan", "adv_eps must be a number in [0, 1]"),
        ("mlp5:adv_eps=8/255", "got '8/255'"),
        ("resnet18:adv_eps=0.1", "unknown parameter 'adv_eps'"),
        ("patchcnn:stem_stride=0", "stem_stride must be a positive integer"),
        ("mlp5:hidden=(256,", "unbalanced"),
        ("mlp5:hidden=0x256", "hidden must be positive integers"),
        ("mlp5:hidden=()", "hidden must be positive integers"),
        ("resnet18:stem_padding=-1", "stem_padding must be a non-negative integer"),
        ("resnet18:stem_padding=1.5", "stem_padding must be a non-negative integer"),
    ],
)
def test_spec_errors(spec, fragment):
    with pytest.raises(ModelSpecError) as info:
        parse_spec(spec)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_spec_rejects_non_strings():
    with pytest.raises(ModelSpecError):
        parse_spec(42)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- architectures

STRIDES = [1, 2, 3, 4, 8, 16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("stride", STRIDES)
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vgg16"])
def test_conv_zoo_forward_shapes(name, stride, dtype):
    model = build_model(f"{name}:stem_stride={stride}")
    if dtype == torch.float64:
        model = model.double()
    assert not model.training
    conv = first_layer(model)
    assert conv is model.stem.conv and isinstance(model.stem.bn, nn.BatchNorm2d)
    assert conv.stride == (stride, stride) and conv.out_channels == 64
    # Normalize comes first, then the stem.
    assert list(model.named_children())[:2] == [("normalize", model.normalize), ("stem", model.stem)]
    assert isinstance(model.normalize, Normalize)
    x = torch.rand(3, 3, 32, 32, dtype=dtype)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (3, 10) and y.dtype == dtype and torch.isfinite(y).all()


@pytest.mark.parametrize("name", ["resnet18", "vgg16"])
def test_conv_zoo_stem_options_and_grayscale(name):
    model = build_model(f"{name}:mnist,stem_stride=3,stem_channels=8,stem_kernel=5")
    conv = model.stem.conv
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.padding) == (1, 8, (5, 5), (2, 2))
    assert conv.bias is None
    with torch.no_grad():
        assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("name", ["resnet18", "vgg16"])
def test_stem_padding_is_a_spec_parameter(name):
    model = build_model(f"{name}:stem_kernel=4,stem_stride=4,stem_padding=0")
    assert model.stem.conv.padding == (0, 0)
    assert build_model(f"{name}:stem_kernel=5").stem.conv.padding == (2, 2)  # default: kernel // 2
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_vgg_skips_pools_that_would_vanish():
    def pools(m: nn.Module) -> int:
        return sum(isinstance(x, nn.MaxPool2d) for x in m.features)
    assert pools(build_model("vgg16")) == 5  # 32 -> 16 -> 8 -> 4 -> 2 -> 1 (stem keeps 32)
    assert pools(build_model("vgg16:stem_stride=16")) == 1  # 2 -> 1, then nothing
    assert pools(build_model("vgg16:stem_stride=32")) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("spec", "in_shape", "fc1_in"),
    [("mlp5:mnist", (1, 28, 28), 784), ("mlp5:cifar10", (3, 32, 32), 3072)],
)
def test_mlp5(spec, in_shape, fc1_in, dtype):
    model = build_model(spec).to(dtype)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 5
    assert first_layer(model) is model.fc1 is linears[0]
    assert model.fc1.in_features == fc1_in and model.fc1.out_features == 256
    # the first layer's harmless dimension: 528 on MNIST, 2816 on 3x32x32
    assert fc1_in - model.fc1.out_features == {784: 528, 3072: 2816}[fc1_in]
    names = [n for n, _ in model.named_children()]
    assert names[:3] == ["normalize", "flatten", "fc1"]
    y = model(torch.rand(4, *in_shape, dtype=dtype))
    assert y.shape == (4, 10) and y.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("spec", "in_shape"), [("lenet:mnist", (1, 28, 28)), ("lenet:cifar10", (3, 32, 32))])
def test_lenet(spec, in_shape, dtype):
    model = build_model(spec).to(dtype)
    assert first_layer(model) is model.conv1
    assert [n for n, _ in model.named_children()][:2] == ["normalize", "conv1"]
    assert model.conv1.out_channels == 6 and model.conv1.kernel_size == (5, 5)
    y = model(torch.rand(2, *in_shape, dtype=dtype))
    assert y.shape == (2, 10) and y.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("spec", "in_shape", "fc1_in"),
    [("patchcnn:mnist", (1, 28, 28), 32 * 3 * 3), ("patchcnn:cifar10", (3, 32, 32), 32 * 4 * 4),
     ("patchcnn:mnist,stem_kernel=7,stem_stride=7,stem_channels=4", (1, 28, 28), 32 * 2 * 2),
     ("patchcnn:mnist,stem_kernel=3,stem_stride=1,stem_padding=1", (1, 28, 28), 32 * 14 * 14)],
)
def test_patchcnn(spec, in_shape, fc1_in, dtype):
    model = build_model(spec).to(dtype)
    assert first_layer(model) is model.stem
    assert [n for n, _ in model.named_children()][:3] == ["normalize", "stem", "relu1"]
    assert model.fc1.in_features == fc1_in
    y = model(torch.rand(3, *in_shape, dtype=dtype))
    assert y.shape == (3, 10) and y.dtype == dtype


def test_patchcnn_rejects_a_stem_that_leaves_no_map():
    with pytest.raises(ValueError, match="at least 2x2"):
        build_model("patchcnn:mnist,stem_kernel=16,stem_stride=16")


def _dense_stem(model: nn.Module, in_shape: tuple[int, ...]) -> torch.Tensor:
    """The stem's linear part (Normalize's scale folded in) as a dense matrix, column by
    column: the stem applied to each unit image, minus its output on zero."""
    n = math.prod(in_shape)
    prefix = nn.Sequential(model.normalize, model.stem).double()
    with torch.no_grad():
        eye = torch.eye(n, dtype=torch.float64).reshape(n, *in_shape)
        zero = prefix(torch.zeros(1, *in_shape, dtype=torch.float64))
        return (prefix(eye) - zero).reshape(n, -1).T  # (outputs, inputs)


@pytest.mark.parametrize(
    ("spec", "in_shape", "dim"),
    [("patchcnn:mnist", (1, 28, 28), 392),
     ("patchcnn:mnist,stem_channels=12", (1, 28, 28), 784 - 12 * 49),
     pytest.param("patchcnn:cifar10", (3, 32, 32), 3072 - 8 * 64, marks=pytest.mark.slow)],
)
def test_patchcnn_stem_is_block_diagonal_and_engine_dim_matches_brute_force(spec, in_shape, dim):
    import harmless

    model = build_model(spec).double()
    a = _dense_stem(model, in_shape)
    c, h, w = in_shape
    k = model.stem.out_channels
    # block structure: output (channel, i, j) reads only the pixels of patch (i, j)
    rows = a.reshape(k, h // 4, w // 4, c, h // 4, 4, w // 4, 4)
    outside = rows.clone()
    for i in range(h // 4):
        for j in range(w // 4):
            outside[:, i, j, :, i, :, j, :] = 0
    assert torch.count_nonzero(outside) == 0
    rank = int(torch.linalg.matrix_rank(a))
    assert rank == a.shape[0] == k * (h // 4) * (w // 4)
    assert a.shape[1] - rank == dim
    space = harmless.harmless_subspace(model, in_shape)
    assert space.dim == dim and not space.dim_is_lower_bound
    # and the model cannot tell x from x + h for a large harmless h
    x = torch.rand(4, *in_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    hv = 1e3 * space.sample(4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, moved = model(x), model(x + hv)
    assert float((moved - out).abs().max()) <= 1e-9 * float(out.abs().max())


@pytest.mark.parametrize("spec", ["mlp5", "lenet", "patchcnn", "resnet18:stem_stride=4", "vgg16:stem_stride=2"])
def test_zoo_models_are_fx_traceable(spec):
    model = build_model(spec)
    shape = parse_spec(spec).dataset_info.in_shape
    x = torch.rand(2, *shape)
    graph_module = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        assert torch.equal(graph_module(x), model(x))


def test_build_model_seeded_and_rng_neutral():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b = build_model("lenet", seed=5), build_model("lenet", seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    assert _state_equal(a, b)
    assert not _state_equal(a, build_model("lenet", seed=6))


# ----------------------------------------------------------------------------- training


def _synthetic(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


def _train_synthetic(seed, config=None):
    x, y = _synthetic()
    config = config or TrainConfig(epochs=2, batch_size=32)
    with deterministic(seed):
        model = parse_spec("mlp5:mnist,hidden=64x32").build()
        train_loop(model, x, y, config, seed=seed, progress=False)
    return model


def test_train_loop_deterministic():
    a, b = _train_synthetic(0), _train_synthetic(0)
    assert _state_equal(a, b)
    assert not _state_equal(a, _train_synthetic(1))
    assert not a.training


def test_train_loop_sgd_cosine_augment_deterministic():
    cfg = TrainConfig(epochs=1, batch_size=50, optimizer="sgd", lr=0.05, schedule="cosine", augment=True)
    assert _state_equal(_train_synthetic(3, cfg), _train_synthetic(3, cfg))


_ADV_CONFIG = TrainConfig(epochs=1, batch_size=16, adv_eps=0.1, adv_steps=3)


def _train_adv_synthetic(seed: int, config: TrainConfig = _ADV_CONFIG) -> nn.Module:
    x, y = _synthetic(n=48)
    with deterministic(seed):
        model = parse_spec("mlp5:mnist,hidden=32").build()
        train_loop(model, x, y, config, seed=seed, progress=False)
    return model


def test_adversarial_training_is_seeded_deterministic_and_differs_from_clean():
    a, b = _train_adv_synthetic(0), _train_adv_synthetic(0)
    assert _state_equal(a, b)
    assert not _state_equal(a, _train_adv_synthetic(1))
    clean = _train_adv_synthetic(0, dataclasses.replace(_ADV_CONFIG, adv_eps=0.0))
    assert not _state_equal(a, clean)
    assert not a.training


def test_adversarial_training_uses_pgd_on_each_batch(monkeypatch):
    """Every batch is replaced by the PGD attack's x_adv (in the eps ball, inside [0, 1]),
    crafted with the model in eval mode."""
    from harmless.attacks import PGD

    seen = []
    original = PGD.__call__

    def spy(self, model, x, y, **kw):
        assert not model.training
        result = original(self, model, x, y, **kw)
        assert self.eps == 0.1 and self.steps == 3 and self.abs_stepsize == pytest.approx(0.025)
        assert float(result.linf.max()) <= 0.1 + 1e-6
        assert 0 <= float(result.x_adv.min()) <= float(result.x_adv.max()) <= 1
        seen.append(x.shape[0])
        return result

    monkeypatch.setattr(PGD, "__call__", spy)
    _train_adv_synthetic(0)
    assert seen == [16, 16, 16]


@pytest.mark.parametrize("eps", [-0.1, 1.5, float("nan"), True])
def test_adversarial_training_rejects_bad_eps(eps):
    with pytest.raises(InputError, match="adv_eps"):
        train_loop(build_model("mlp5:hidden=8"), *_synthetic(n=8), TrainConfig(epochs=1, adv_eps=eps), progress=False)


def test_adv_eps_is_a_training_parameter_and_part_of_the_cache_key():
    clean, adv = parse_spec("mlp5:mnist"), parse_spec("mlp5:mnist,adv_eps=0.1")
    assert clean.train_config.adv_eps == 0.0 and adv.train_config.adv_eps == 0.1
    assert dataclasses.replace(adv.train_config, adv_eps=0.0) == clean.train_config
    # the same architecture (the builders ignore it), another cache entry
    assert _state_equal(build_model(clean, seed=3), build_model(adv, seed=3))
    assert checkpoint_paths(adv)[0] != checkpoint_paths(clean)[0]
    assert checkpoint_paths(adv)[0].name == "mlp5__mnist__adv_eps=0.1.safetensors"
    _fake_checkpoint("mlp5:mnist,adv_eps=0.1")
    assert not checkpoint_paths(clean)[0].exists()
    assert get_model("mlp5:mnist,adv_eps=0.1", train=False).from_cache
    assert not get_model("mlp5:mnist", train=False).trained
    rows = [r for r in list_zoo() if r.spec == "mlp5:mnist,adv_eps=0.1"]
    assert len(rows) == 1 and rows[0].cached and rows[0].params["adv_eps"] == 0.1
    assert "patchcnn:fashion-mnist" in {r.spec for r in list_zoo()}


def test_train_zoo_model_adversarial_subset(mnist_dir):
    kw = dict(epochs=1, max_train_samples=256, progress=False, data_dir=mnist_dir)
    a = train_zoo_model("mlp5:mnist,adv_eps=0.1,hidden=32", **kw)
    b = train_zoo_model("mlp5:mnist,adv_eps=0.1,hidden=32", **kw)
    clean = train_zoo_model("mlp5:mnist,hidden=32", **kw)
    assert _state_equal(a.model, b.model) and not _state_equal(a.model, clean.model)
    assert a.meta["train_config"]["adv_eps"] == 0.1 and clean.meta["train_config"]["adv_eps"] == 0.0
    assert a.key == "mlp5:mnist,adv_eps=0.1,hidden=32"


def test_deterministic_restores_state():
    torch.manual_seed(7)
    rng = torch.get_rng_state()
    prev = torch.are_deterministic_algorithms_enabled()
    with deterministic(0):
        assert torch.are_deterministic_algorithms_enabled()
        torch.rand(10)
    assert torch.are_deterministic_algorithms_enabled() == prev
    assert torch.equal(torch.get_rng_state(), rng)


def test_train_zoo_model_subset_deterministic(mnist_dir):
    kw = dict(epochs=1, max_train_samples=2000, progress=False, data_dir=mnist_dir)
    a = train_zoo_model("mlp5:mnist", seed=0, **kw)
    b = train_zoo_model("mlp5:mnist", seed=0, **kw)
    c = train_zoo_model("mlp5:mnist", seed=1, **kw)
    assert _state_equal(a.model, b.model)
    assert not _state_equal(a.model, c.model)
    assert a.trained and a.checkpoint is None  # subset runs are not cached by default
    assert a.test_accuracy == b.test_accuracy and 0.5 < a.test_accuracy <= 1.0
    assert not a.model.training
    assert not checkpoint_paths("mlp5:mnist")[0].exists()


def test_train_zoo_model_saves_and_get_model_reuses(mnist_dir):
    trained = train_zoo_model(
        "mlp5:mnist", epochs=1, max_train_samples=1000, progress=False, save=True, data_dir=mnist_dir
    )
    assert trained.checkpoint is not None and trained.checkpoint.exists()
    got = get_model("mlp5:mnist", progress=False)
    assert got.from_cache and got.trained
    assert got.test_accuracy == trained.test_accuracy
    assert _state_equal(got.model, trained.model)
    row = next(r for r in list_zoo() if r.spec == "mlp5:mnist")
    assert row.cached and row.test_accuracy == trained.test_accuracy
    # Results name the checkpoint they were made with (issue 11, item 2): the file's SHA-256.
    from harmless.cache import sha256_file

    digest = sha256_file(trained.checkpoint)
    assert trained.weights_sha256 == got.weights_sha256 == digest
    assert f"checkpoint sha256 {digest[:12]}" in got.weights_note == trained.weights_note


def test_cifar_without_data_is_random_init():
    a = get_model("resnet18:stem_stride=8", progress=False)
    b = train_zoo_model("resnet18:stem_stride=8", progress=False)
    assert not a.trained and not b.trained
    assert a.test_accuracy is None and a.checkpoint is None
    assert "untrained" in a.weights_note
    assert describe_model(a.model).endswith("untrained weights (random init, seed 0)")
    assert _state_equal(a.model, b.model)  # seeded
    assert not checkpoint_paths("resnet18:stem_stride=8")[0].exists()


def test_get_model_without_training():
    got = get_model("lenet:mnist", train=False)
    assert not got.trained and not got.from_cache and not got.model.training


# ----------------------------------------------------------------------------- cache integrity


def _fake_checkpoint(spec="mlp5:mnist", seed=0, init=4):
    """A checkpoint as if trained with ``seed``; its weights are the random init ``init``."""
    model = build_model(spec, seed=init)
    checkpoint_mod.save_checkpoint(spec, model, {"trained": True, "seed": seed, "epochs": 1, "test_accuracy": 0.5})
    return model


def test_seed_is_part_of_the_cache_key():
    seed0 = _fake_checkpoint(seed=0, init=4)
    seed1 = _fake_checkpoint(seed=1, init=5)
    # seed 0 keeps the name it always had (existing caches stay valid); seed 1 has its own
    assert checkpoint_paths("mlp5:mnist")[0].name == "mlp5__mnist.safetensors"
    assert checkpoint_paths("mlp5:mnist", 1)[0].name == "mlp5__mnist-seed1.safetensors"
    assert checkpoint_paths("mlp5:mnist", 1)[0].exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain, other = get_model("mlp5:mnist", train=False), get_model("mlp5:mnist", train=False, seed=1)
    assert plain.from_cache and plain.seed == 0 and _state_equal(plain.model, seed0)
    assert other.from_cache and other.seed == 1 and _state_equal(other.model, seed1)
    assert _state_equal(load_model("mlp5:mnist"), seed0)  # a plain spec always means seed 0


def test_old_cache_entry_of_another_seed_is_not_used_as_seed_0():
    # Before the seed was in the key, `--seed 1` wrote the seed-1 model under the plain name.
    _fake_checkpoint(seed=0)
    _, sidecar = checkpoint_paths("mlp5:mnist")
    sidecar.write_text(sidecar.read_text().replace('"seed": 0', '"seed": 1'))
    with pytest.warns(CheckpointWarning, match="seed 1"):
        assert checkpoint_mod.load_checkpoint("mlp5:mnist") is None


@pytest.mark.parametrize("seed", [-1, 1.5, True, "1"])
def test_bad_seed(seed):
    with pytest.raises(InputError, match="seed"):
        checkpoint_paths("mlp5:mnist", seed)
    with pytest.raises(InputError, match="seed"):
        train_zoo_model("mlp5:mnist", seed=seed)


def test_cached_checkpoint_is_used():
    model = _fake_checkpoint()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = get_model("mlp5:mnist", train=False)
    assert got.from_cache and got.trained and got.test_accuracy == 0.5
    assert _state_equal(got.model, model)
    assert any(r.cached and r.spec == "mlp5:mnist" for r in list_zoo())


def test_corrupt_checkpoint_detected(monkeypatch):
    _fake_checkpoint()
    weights, _ = checkpoint_paths("mlp5:mnist")
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # a flipped bit in a weight: still a valid safetensors file
    weights.write_bytes(bytes(data))
    with pytest.warns(CheckpointWarning, match="corrupt"):
        assert checkpoint_mod.load_checkpoint("mlp5:mnist") is None
    with pytest.warns(CheckpointWarning, match="corrupt"):
        got = get_model("mlp5:mnist", train=False)
    assert not got.from_cache and not got.trained

    calls = []

    def fake_train(spec, **kwargs):
        calls.append((spec.key, kwargs))
        return "retrained"

    monkeypatch.setattr(train_mod, "train_zoo_model", fake_train)
    with pytest.warns(CheckpointWarning):
        assert get_model("mlp5:mnist", progress=False) == "retrained"
    assert calls and calls[0][0] == "mlp5:mnist"


def test_checkpoint_with_broken_sidecar_is_ignored():
    _fake_checkpoint()
    weights, sidecar = checkpoint_paths("mlp5:mnist")
    sidecar.write_text("{not json")
    with pytest.warns(CheckpointWarning, match="sidecar"):
        assert checkpoint_mod.load_checkpoint("mlp5:mnist") is None
    sidecar.unlink()
    with pytest.warns(CheckpointWarning):
        assert checkpoint_mod.load_checkpoint("mlp5:mnist") is None


def test_checkpoint_sidecar_for_other_spec_is_ignored():
    _fake_checkpoint()
    weights, sidecar = checkpoint_paths("mlp5:mnist")
    text = sidecar.read_text().replace('"spec": "mlp5:mnist"', '"spec": "mlp5:fashion-mnist"')
    sidecar.write_text(text)
    with pytest.warns(CheckpointWarning, match="fashion-mnist"):
        assert checkpoint_mod.load_checkpoint("mlp5:mnist") is None


def test_list_zoo_rows():
    rows = list_zoo()
    assert {r.name for r in rows} == set(ZOO)
    assert {r.spec for r in rows} >= {"mlp5:mnist", "lenet:fashion-mnist", "resnet18:cifar10", "vgg16:cifar10"}
    assert not any(r.cached for r in rows)
    row = next(r for r in rows if r.spec == "resnet50:cifar10")
    assert row.params == {"stem_channels": 64, "stem_kernel": 3, "stem_padding": None, "stem_stride": 1}
    assert row.needs_data_dir and row.test_accuracy is None
    _fake_checkpoint("resnet18:cifar10,stem_stride=4")
    extra = [r for r in list_zoo() if r.spec == "resnet18:cifar10,stem_stride=4"]
    assert len(extra) == 1 and extra[0].cached


# ----------------------------------------------------------------------------- hostile checkpoints


class _SystemCall:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _ExecCall:
    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return (builtins.exec, (self.code,))


def _touch_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


@pytest.mark.parametrize("legacy", [False, True])
def test_pickled_callable_is_refused(tmp_path, legacy):
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.pt"
    payload = {"weight": torch.ones(2), "bias": _SystemCall(f"touch {marker}")}
    torch.save(payload, evil, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UnsafeCheckpointError, match="refused") as info:
        load_state_dict_file(evil)
    assert "system" in str(info.value)
    assert not marker.exists()
    # through the public entry points as well
    with pytest.raises(UnsafeCheckpointError):
        load_model("lenet:mnist", weights=evil)
    with pytest.raises(ModelSpecError, match="not a TorchScript"):
        load_model(str(evil))
    assert not marker.exists()


def test_exec_payload_is_refused_and_would_have_run(tmp_path):
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _ExecCall(_touch_code(marker))}, evil)
    with pytest.raises(UnsafeCheckpointError):
        load_state_dict_file(evil)
    assert not marker.exists()
    # The payload is live: an unrestricted unpickler would have run it.
    proof = tmp_path / "PROOF"
    with open(tmp_path / "proof.pkl", "wb") as fh:
        pickle.dump(_ExecCall(_touch_code(proof)), fh)
    with open(tmp_path / "proof.pkl", "rb") as fh:
        pickle.load(fh)
    assert proof.exists()


def test_plain_pickle_file_is_refused(tmp_path):
    marker = tmp_path / "MARKER"
    evil = tmp_path / "weights.bin"
    with open(evil, "wb") as fh:
        pickle.dump(_ExecCall(_touch_code(marker)), fh, protocol=2)
    with pytest.raises(UnsafeCheckpointError):
        load_state_dict_file(evil)
    assert not marker.exists()


def test_unreadable_and_missing_weights(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ModelSpecError, match="cannot read"):
        load_state_dict_file(junk)
    bad_st = tmp_path / "junk.safetensors"
    bad_st.write_bytes(b"\x00" * 20)
    with pytest.raises(ModelSpecError, match="safetensors"):
        load_state_dict_file(bad_st)
    with pytest.raises(DataUnavailableError):
        load_state_dict_file(tmp_path / "nope.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ModelSpecError, match="state dict"):
        load_state_dict_file(tmp_path / "list.pt")


# ----------------------------------------------------------------------------- loading user models


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module ``user_models_h`` with factories, importable for this test only."""
    (tmp_path / "user_models_h.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            def make():
                torch.manual_seed(99)  # a different init from the one whose weights we load
                return nn.Sequential(
                    nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                    nn.Flatten(), nn.Linear(4 * 6 * 6, 3),
                )

            class Holder:
                @staticmethod
                def build():
                    return make().eval()

            def not_a_model():
                return 42

            def needs_args(width):
                return nn.Linear(width, 2)

            NOT_CALLABLE = 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    importlib.invalidate_caches()
    yield
    import sys

    sys.modules.pop("user_models_h", None)


def _reference_model():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )
    model.train()
    model(torch.rand(16, 1, 8, 8))  # non-trivial BatchNorm running stats
    return model.eval()


@pytest.mark.parametrize("fmt", ["torch", "safetensors", "nested_state_dict", "nested_model", "dataparallel"])
def test_factory_with_weights(tmp_path, user_module, fmt):
    ref = _reference_model()
    state = ref.state_dict()
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        path = tmp_path / "w.pt"
        obj = {
            "torch": state,
            "nested_state_dict": {"state_dict": state, "epoch": 3},
            "nested_model": {"model": state, "optimizer": {"lr": 0.1}},
            "dataparallel": {f"module.{k}": v for k, v in state.items()},
        }[fmt]
        torch.save(obj, path)
    with pytest.warns(TrainingModeWarning):
        model = load_model("user_models_h:make", weights=str(path))
    assert not any(m.training for m in model.modules())
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


def test_factory_eval_model_gives_no_warning(user_module):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = load_model("user_models_h:Holder.build")
    assert not model.training


def test_training_mode_warning_and_eval(user_module):
    with pytest.warns(TrainingModeWarning, match="training mode"):
        model = load_model("user_models_h:make")
    assert not any(m.training for m in model.modules())


def test_factory_weights_mismatch(tmp_path, user_module):
    state = _reference_model().state_dict()
    missing = dict(state)
    missing.pop("5.weight")
    missing["extra.weight"] = torch.zeros(1)
    torch.save(missing, tmp_path / "bad.pt")
    with pytest.raises(ModelSpecError) as info:
        load_model("user_models_h:make", weights=tmp_path / "bad.pt")
    assert "missing keys 5.weight" in str(info.value) and "unexpected keys extra.weight" in str(info.value)
    wrong = dict(state)
    wrong["5.weight"] = torch.zeros(3, 7)
    torch.save(wrong, tmp_path / "shape.pt")
    with pytest.raises(ModelSpecError, match="shape mismatch in 5.weight"):
        load_model("user_models_h:make", weights=tmp_path / "shape.pt")


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("user_models_h:not_a_model", "not a torch.nn.Module"),
        ("user_models_h:needs_args", "failed"),
        ("user_models_h:missing", "has no attribute"),
        ("user_models_h:NOT_CALLABLE", "not callable"),
        ("no_such_module_h:make", "cannot import module"),
        ("alexnet", "cannot resolve model"),
        ("resnet18:stem_stride=0", "positive integer"),
    ],
)
def test_load_model_errors(user_module, spec, fragment):
    with pytest.raises(ModelSpecError, match=fragment):
        load_model(spec)


def test_load_model_missing_file(tmp_path):
    with pytest.raises(DataUnavailableError):
        load_model(str(tmp_path / "model.pt"))


def test_zoo_spec_with_weights(tmp_path):
    ref = build_model("lenet:mnist", seed=3)
    torch.save(ref.state_dict(), tmp_path / "lenet.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = load_model("lenet:mnist", weights=tmp_path / "lenet.pt")
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    with pytest.raises(ModelSpecError, match="do not fit"):
        load_model("mlp5:mnist", weights=tmp_path / "lenet.pt")


def test_zoo_spec_through_load_model_cifar_untrained():
    model = load_model("vgg16:stem_stride=4", progress=False)
    assert isinstance(model, nn.Module) and not model.training


_IGNORE_JIT_DEPRECATION = pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:DeprecationWarning")


@_IGNORE_JIT_DEPRECATION
@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_round_trip(tmp_path, how):
    ref = build_model("resnet18:stem_stride=2", seed=1)
    x = torch.rand(2, 3, 32, 32)
    scripted = torch.jit.script(ref) if how == "script" else torch.jit.trace(ref, x)
    path = tmp_path / "model.pt"
    scripted.save(str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = load_model(str(path))
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    assert "parameters" in describe_model(model)
    with pytest.raises(ModelSpecError, match="weights="):
        load_model(str(path), weights=str(path))


@_IGNORE_JIT_DEPRECATION
def test_torchscript_in_training_mode_is_switched(tmp_path):
    scripted = torch.jit.script(build_model("lenet").train())
    scripted.save(str(tmp_path / "train.pth"))
    with pytest.warns(TrainingModeWarning):
        model = load_model(str(tmp_path / "train.pth"))
    assert not model.training


def test_safetensors_file_alone_needs_architecture(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ModelSpecError, match="weights only"):
        load_model(str(tmp_path / "w.safetensors"))


def test_describe_model():
    text = describe_model(build_model("resnet18:stem_stride=4"))
    assert "\n" not in text
    assert "11,173,962 parameters" in text
    assert "first layer stem.conv: Conv2d(3, 64" in text and "stride=(4, 4)" in text
    assert "Normalize(mean=(0.4914, 0.4822, 0.4465)" in text
    assert "first layer fc1: Linear(in_features=784, out_features=256" in describe_model(build_model("mlp5"))


# ----------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_mlp5_mnist_full_training_accuracy():
    """Full MNIST training of MLP-5 (default recipe) into the user's cache: >= 97%."""
    from harmless.data import load_dataset

    try:
        load_dataset("mnist", split="test")
    except Exception as exc:
        pytest.skip(f"MNIST unavailable: {exc}")
    trained = train_zoo_model("mlp5:mnist", progress=False)
    assert trained.test_accuracy is not None and trained.test_accuracy >= 0.97
    assert trained.checkpoint is not None and trained.checkpoint.exists()
    again = get_model("mlp5:mnist", progress=False)
    assert again.from_cache and again.test_accuracy == trained.test_accuracy
