"""The zoo's registry and its specification strings.

A zoo spec names an architecture, optionally the dataset it is for, and optionally some of
its parameters::

    NAME[:DATASET][,key=value...]

    mlp5:mnist            lenet:fashion-mnist       resnet18
    resnet18:stem_stride=8                          vgg16:stem_stride=2
    resnet50:cifar10,stem_stride=4,stem_channels=16 mlp5:mnist,hidden=512x512
    resnet18:stem_kernel=4,stem_stride=4,stem_padding=0   (a "patchify" stem: tiles split)
    patchcnn:fashion-mnist  patchcnn:mnist,stem_channels=12
    mlp5:mnist,adv_eps=0.1  (PGD adversarial training, L∞ radius 0.1: a training parameter)

The first item after ``:`` that has no ``=`` is the dataset (default: ``mnist`` for
``mlp5``/``lenet``/``patchcnn``, ``cifar10`` for the ResNets and VGG). Values are integers, floats or
tuples, written ``512x512`` or ``(512,512)``. ``adv_eps`` is the one training parameter (a
float; the builders ignore it, :attr:`ModelSpec.train_config` applies it). Names are case-insensitive.

:func:`parse_spec` turns a string into a :class:`ModelSpec`, whose :attr:`ModelSpec.key` is
the canonical form (dataset always written, parameters sorted, those at their defaults left
out): ``parse_spec(s).key`` parses back to the same spec.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from harmless.errors import ModelSpecError
from harmless.models import zoo

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "ModelSpec",
    "TrainConfig",
    "ZOO",
    "ZooEntry",
    "ZooParam",
    "build_model",
    "is_zoo_spec",
    "parse_spec",
    "zoo_names",
]


@dataclass(frozen=True)
class DatasetInfo:
    """What a zoo model needs to know about the dataset it is built for."""

    name: str
    in_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    needs_data_dir: bool  # no copy ships or can be fetched: the user must pass data_dir


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("mnist", (1, 28, 28), 10, zoo.MNIST_MEAN, zoo.MNIST_STD, False),
    "fashion-mnist": DatasetInfo(
        "fashion-mnist", (1, 28, 28), 10, zoo.FASHION_MNIST_MEAN, zoo.FASHION_MNIST_STD, False
    ),
    "cifar10": DatasetInfo("cifar10", (3, 32, 32), 10, zoo.CIFAR10_MEAN, zoo.CIFAR10_STD, True),
}

_DATASET_ALIASES = {
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar_10": "cifar10",
}


@dataclass(frozen=True)
class TrainConfig:
    """How a zoo model is trained by default (see :mod:`harmless.models.train`)."""

    epochs: int
    batch_size: int = 128
    optimizer: str = "adam"  # "adam" or "sgd"
    lr: float = 1e-3
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    schedule: str = "none"  # "none" or "cosine" (per step)
    augment: bool = False  # random crop (padding 4) + horizontal flip, for CIFAR
    # PGD adversarial training (Madry et al. 2018) when adv_eps > 0: every batch is replaced by
    # L∞ PGD examples of radius adv_eps (adv_steps steps of adv_rel_stepsize·adv_eps, random
    # start), crafted on the model as it is at that step. Set per spec by the adv_eps parameter.
    adv_eps: float = 0.0
    adv_steps: int = 7
    adv_rel_stepsize: float = 0.25


@dataclass(frozen=True)
class ZooParam:
    """A parameter a spec may set: ``kind`` is ``"int"`` (positive), ``"ints"`` (tuple),
    ``"padding"`` (non-negative; the default ``None`` means ``stem_kernel // 2``) or ``"eps"``
    (a float in [0, 1], e.g. the adversarial-training radius ``adv_eps``)."""

    name: str
    kind: str
    default: Any
    help: str = ""


@dataclass(frozen=True)
class ZooEntry:
    """One architecture of the zoo."""

    name: str
    description: str
    default_dataset: str
    datasets: tuple[str, ...]
    params: tuple[ZooParam, ...]
    builder: Callable[[Mapping[str, Any], DatasetInfo], nn.Module] = field(repr=False)
    train_config: TrainConfig
    cifar_train_config: TrainConfig | None = None  # replaces train_config on CIFAR-10

    def param(self, name: str) -> ZooParam:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def config_for(self, dataset: str) -> TrainConfig:
        if dataset == "cifar10" and self.cifar_train_config is not None:
            return self.cifar_train_config
        return self.train_config


def _stem_params(channels: int, kernel: int) -> tuple[ZooParam, ...]:
    return (
        ZooParam("stem_channels", "int", channels, "output channels of the first convolution"),
        ZooParam("stem_kernel", "int", kernel, "kernel size of the first convolution"),
        ZooParam("stem_stride", "int", 1, "stride of the first convolution"),
        ZooParam("stem_padding", "padding", None, "zero padding of the first convolution (default kernel // 2)"),
    )


# A training parameter, not an architectural one: the builders ignore it, ModelSpec.train_config
# passes it on, and, being part of the spec key, it gives the adversarially trained model its own
# cache entry (mlp5:mnist,adv_eps=0.1 never replaces mlp5:mnist).
_ADV_EPS = ZooParam(
    "adv_eps", "eps", 0.0, "L∞ radius of PGD adversarial training (0: standard training), e.g. 0.1"
)


def _patch_params() -> tuple[ZooParam, ...]:
    # Defaults tile a 28x28 image into 7x7 patches of 4x4 = 16 pixels, each mapped to 8
    # channels: the stem keeps 392 of 784 input dimensions and its null space has the other 392.
    return (
        ZooParam("stem_channels", "int", 8, "output channels of the patchify convolution"),
        ZooParam("stem_kernel", "int", 4, "kernel size of the patchify convolution"),
        ZooParam("stem_stride", "int", 4, "stride of the patchify convolution"),
        ZooParam("stem_padding", "padding", 0, "zero padding of the patchify convolution"),
        _ADV_EPS,
    )


def _build_mlp5(p: Mapping[str, Any], ds: DatasetInfo) -> nn.Module:
    return zoo.MLP5(ds.in_shape, p["hidden"], ds.num_classes, ds.mean, ds.std)


def _build_lenet(p: Mapping[str, Any], ds: DatasetInfo) -> nn.Module:
    return zoo.LeNet(ds.in_shape, ds.num_classes, ds.mean, ds.std)


def _conv_kwargs(p: Mapping[str, Any], ds: DatasetInfo) -> dict[str, Any]:
    return dict(
        stem_stride=p["stem_stride"],
        stem_channels=p["stem_channels"],
        stem_kernel=p["stem_kernel"],
        stem_padding=p["stem_padding"],
        in_channels=ds.in_shape[0],
        num_classes=ds.num_classes,
        mean=ds.mean,
        std=ds.std,
    )


def _build_patchcnn(p: Mapping[str, Any], ds: DatasetInfo) -> nn.Module:
    return zoo.PatchCNN(
        ds.in_shape,
        stem_channels=p["stem_channels"],
        stem_kernel=p["stem_kernel"],
        stem_stride=p["stem_stride"],
        stem_padding=p["stem_padding"],
        num_classes=ds.num_classes,
        mean=ds.mean,
        std=ds.std,
    )


def _build_resnet18(p: Mapping[str, Any], ds: DatasetInfo) -> nn.Module:
    return zoo.resnet18(**_conv_kwargs(p, ds))


def _build_resnet50(p: Mapping[str, Any], ds: DatasetInfo) -> nn.Module:
    return zoo.resnet50(**_conv_kwargs(p, ds))


def _build_vgg16(p: Mapping[str, Any], ds: DatasetInfo) -> nn.Module:
    return zoo.vgg16(**_conv_kwargs(p, ds), input_size=min(ds.in_shape[1:]))


_ALL_DATASETS = tuple(DATASETS)
# Adam 1e-3, batch 128, decayed to 0 by a per-step cosine: MLP-5 reaches ~98% on MNIST.
_SMALL_CONFIG = TrainConfig(epochs=5, batch_size=128, optimizer="adam", lr=1e-3, schedule="cosine")
_SMALL_CIFAR_CONFIG = dataclasses.replace(_SMALL_CONFIG, epochs=20, augment=True)
# The patchify CNN keeps only half of each 4x4 patch: 5 epochs left Fashion-MNIST at 85.6 %, 10 reach the target.
_PATCH_CONFIG = dataclasses.replace(_SMALL_CONFIG, epochs=10)
_CIFAR_CONFIG = TrainConfig(
    epochs=30,
    batch_size=128,
    optimizer="sgd",
    lr=0.1,
    momentum=0.9,
    weight_decay=5e-4,
    schedule="cosine",
    augment=True,
)

ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry(
            "mlp5",
            "MLP-5: Normalize, Flatten, 5 Linear layers (ReLU between)",
            "mnist",
            _ALL_DATASETS,
            (ZooParam("hidden", "ints", (256, 256, 256, 256), "hidden widths, e.g. 256x256x256x256"), _ADV_EPS),
            _build_mlp5,
            _SMALL_CONFIG,
            _SMALL_CIFAR_CONFIG,
        ),
        ZooEntry(
            "lenet",
            "LeNet-5: Normalize, 2 conv (5x5) + max-pool, 3 Linear layers",
            "mnist",
            _ALL_DATASETS,
            (_ADV_EPS,),
            _build_lenet,
            _SMALL_CONFIG,
            _SMALL_CIFAR_CONFIG,
        ),
        ZooEntry(
            "patchcnn",
            "Patchify CNN: Normalize, conv 4x4 stride 4 (8 ch), conv 3x3 (32) + max-pool, 2 Linear layers",
            "mnist",
            _ALL_DATASETS,
            _patch_params(),
            _build_patchcnn,
            _PATCH_CONFIG,
            _SMALL_CIFAR_CONFIG,
        ),
        ZooEntry(
            "resnet18",
            "CIFAR ResNet-18 (BasicBlock), stem conv + BN, no max-pool",
            "cifar10",
            _ALL_DATASETS,
            _stem_params(64, 3),
            _build_resnet18,
            _CIFAR_CONFIG,
        ),
        ZooEntry(
            "resnet50",
            "CIFAR ResNet-50 (Bottleneck), stem conv + BN, no max-pool",
            "cifar10",
            _ALL_DATASETS,
            _stem_params(64, 3),
            _build_resnet50,
            _CIFAR_CONFIG,
        ),
        ZooEntry(
            "vgg16",
            "CIFAR VGG-16 with BatchNorm, stem conv + BN, one Linear classifier",
            "cifar10",
            _ALL_DATASETS,
            _stem_params(64, 3),
            _build_vgg16,
            # VGG without residual connections trains more reliably from a lower rate.
            dataclasses.replace(_CIFAR_CONFIG, lr=0.05),
        ),
    )
}


def zoo_names() -> tuple[str, ...]:
    """The zoo's architecture names."""
    return tuple(ZOO)


# ----------------------------------------------------------------------------- specs


def _format_value(value: Any) -> str:
    if isinstance(value, tuple):
        return "x".join(_format_value(v) for v in value)
    return repr(value) if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class ModelSpec:
    """A resolved zoo spec: architecture, dataset, and every parameter's value."""

    name: str
    dataset: str
    params: tuple[tuple[str, Any], ...]  # all parameters (defaults included), sorted by name

    @property
    def entry(self) -> ZooEntry:
        return ZOO[self.name]

    @property
    def dataset_info(self) -> DatasetInfo:
        return DATASETS[self.dataset]

    @property
    def kwargs(self) -> dict[str, Any]:
        """The parameters as a dict (defaults included)."""
        return dict(self.params)

    @property
    def key(self) -> str:
        """Canonical spec string: ``name:dataset[,k=v...]`` with non-default params, sorted."""
        entry = self.entry
        extras = [
            f"{k}={_format_value(v)}" for k, v in self.params if v != entry.param(k).default
        ]
        return ",".join([f"{self.name}:{self.dataset}", *extras])

    @property
    def file_stem(self) -> str:
        """:attr:`key` made safe as a file name (``:`` and ``,`` become ``__``)."""
        stem = self.key.replace(":", "__").replace(",", "__")
        return re.sub(r"[^A-Za-z0-9_.=-]", "-", stem)

    @property
    def train_config(self) -> TrainConfig:
        """The entry's recipe for the dataset, with this spec's training parameters (adv_eps)."""
        config = self.entry.config_for(self.dataset)
        adv_eps = self.kwargs.get("adv_eps", 0.0)
        return dataclasses.replace(config, adv_eps=float(adv_eps)) if adv_eps else config

    def build(self) -> nn.Module:
        """A freshly initialised model (uses the global RNG: see :func:`build_model`)."""
        return self.entry.builder(self.kwargs, self.dataset_info)

    def __str__(self) -> str:
        return self.key


def _split_items(text: str, spec: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    items: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise ModelSpecError(f"unbalanced ')' in model spec {spec!r}")
        if ch == "," and depth == 0:
            items.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    if depth != 0:
        raise ModelSpecError(f"unbalanced '(' in model spec {spec!r}")
    items.append("".join(current).strip())
    return items


_INT_RE = re.compile(r"[+-]?\d+")
_X_TUPLE_RE = re.compile(r"\d+(?:x\d+)+")


def _parse_value(text: str) -> Any:
    """An int, float or tuple (``(a,b)`` or ``axb``); anything else stays a string."""
    text = text.strip()
    if text.startswith("(") and text.endswith(")"):
        inner = text[1:-1].strip()
        if not inner:
            return ()
        parts = [p for p in (s.strip() for s in inner.split(",")) if p]
        return tuple(_parse_value(p) for p in parts)
    if _X_TUPLE_RE.fullmatch(text):
        return tuple(int(p) for p in text.split("x"))
    if _INT_RE.fullmatch(text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _coerce(entry: ZooEntry, param: ZooParam, raw: str) -> Any:
    value = _parse_value(raw)
    if param.kind == "int":
        if _positive_int(value):
            return value
        raise ModelSpecError(
            f"{entry.name}: {param.name} must be a positive integer, got {raw!r}"
        )
    if param.kind == "ints":
        if _positive_int(value):
            value = (value,)
        if isinstance(value, tuple) and value and all(_positive_int(v) for v in value):
            return value
        raise ModelSpecError(
            f"{entry.name}: {param.name} must be positive integers like 256x256 or (256,256), "
            f"got {raw!r}"
        )
    if param.kind == "padding":
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        raise ModelSpecError(f"{entry.name}: {param.name} must be a non-negative integer, got {raw!r}")
    if param.kind == "eps":
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0:
            return float(value)
        raise ModelSpecError(f"{entry.name}: {param.name} must be a number in [0, 1] (like 0.1), got {raw!r}")
    raise AssertionError(f"unknown parameter kind {param.kind!r}")  # pragma: no cover


def _unknown_name_message(name: str) -> str:
    return f"unknown zoo model {name!r}; zoo models: {', '.join(ZOO)}"


def _first_token(spec: str) -> str:
    return re.split(r"[:,]", spec.strip(), maxsplit=1)[0].strip().lower()


def is_zoo_spec(spec: str) -> bool:
    """Whether ``spec`` names a zoo architecture (it may still be malformed otherwise)."""
    return isinstance(spec, str) and _first_token(spec) in ZOO


def parse_spec(spec: str | ModelSpec) -> ModelSpec:
    """Parse ``NAME[:DATASET][,key=value...]``; malformed specs raise :class:`ModelSpecError`."""
    if isinstance(spec, ModelSpec):
        return spec
    if not isinstance(spec, str):
        raise ModelSpecError(f"a model spec is a string, got {type(spec).__name__}")
    text = spec.strip()
    if not text:
        raise ModelSpecError(f"empty model spec; zoo models: {', '.join(ZOO)}")
    match = re.match(r"\s*([^:,]*)\s*([:,]?)(.*)\Z", text, re.S)
    assert match is not None
    name = match.group(1).strip().lower()
    if name not in ZOO:
        raise ModelSpecError(_unknown_name_message(name or text))
    entry = ZOO[name]
    rest = match.group(3)
    dataset: str | None = None
    values: dict[str, Any] = {}
    if match.group(2):
        items = _split_items(rest, spec)
        for i, item in enumerate(items):
            if not item:
                if i == 0 and match.group(2) == ":":
                    continue  # "name:" or "name:,k=v": the default dataset
                raise ModelSpecError(f"empty item in model spec {spec!r}")
            if "=" not in item:
                if i == 0 and match.group(2) == ":":
                    dataset = _resolve_dataset(entry, item)
                    continue
                raise ModelSpecError(
                    f"unexpected {item!r} in model spec {spec!r}: the dataset comes first, "
                    f"right after ':'; then key=value items"
                )
            key, _, raw = item.partition("=")
            key = key.strip().lower()
            if not any(p.name == key for p in entry.params):
                valid = ", ".join(p.name for p in entry.params) or "none"
                raise ModelSpecError(
                    f"unknown parameter {key!r} for {name}; valid parameters: {valid}"
                )
            if key in values:
                raise ModelSpecError(f"parameter {key!r} given twice in model spec {spec!r}")
            if not raw.strip():
                raise ModelSpecError(f"{name}: parameter {key!r} has no value")
            values[key] = _coerce(entry, entry.param(key), raw)
    params = tuple(sorted((p.name, values.get(p.name, p.default)) for p in entry.params))
    return ModelSpec(name, dataset or entry.default_dataset, params)


def _resolve_dataset(entry: ZooEntry, text: str) -> str:
    ds = text.strip().lower()
    ds = _DATASET_ALIASES.get(ds, ds)
    if ds not in entry.datasets:
        raise ModelSpecError(
            f"unknown dataset {text.strip()!r} for {entry.name}; valid datasets: "
            f"{', '.join(entry.datasets)}"
        )
    return ds


def build_model(spec: str | ModelSpec, *, seed: int | None = 0) -> nn.Module:
    """A zoo model with freshly initialised weights, in eval mode.

    With a ``seed`` the initialisation is reproducible and the global RNG is left as it
    was; ``seed=None`` draws from the global RNG.
    """
    import torch

    ms = parse_spec(spec)
    if seed is None:
        model = ms.build()
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = ms.build()
    return model.eval()
