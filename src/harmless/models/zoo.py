"""The model zoo's architectures.

Every zoo model is a plain :class:`torch.nn.Module` whose forward has no data-dependent
Python control flow (so it can be traced with :mod:`torch.fx`, treating
:class:`harmless.nn.Normalize` as a leaf), and every one starts with a
:class:`~harmless.nn.Normalize` (the dataset's per-channel mean/std) followed directly by
its first linear layer. That leading run of affine layers is what the harmless subspace is
computed from, so the convolutional models make it configurable (``stem_stride``,
``stem_channels``, ``stem_kernel``).

Module names (``model.get_submodule(name)``); each class also records the dotted name of
its first linear layer as ``first_layer_name``:

* :class:`MLP5` (an ``nn.Sequential``): ``normalize``, ``flatten``, ``fc1``, ``relu1``,
  ``fc2``, ... ``fc5`` (``len(hidden) + 1`` Linear layers). First layer: ``fc1``.
* :class:`LeNet` (an ``nn.Sequential``): ``normalize``, ``conv1``, ``relu1``, ``pool1``,
  ``conv2``, ``relu2``, ``pool2``, ``flatten``, ``fc1``, ``relu3``, ``fc2``, ``relu4``,
  ``fc3``. First layer: ``conv1``.
* :class:`PatchCNN` (an ``nn.Sequential``): ``normalize``, ``stem`` (the patchify conv),
  ``relu1``, ``conv2``, ``relu2``, ``pool``, ``flatten``, ``fc1``, ``relu3``, ``fc2``.
  First layer: ``stem``.
* :class:`ResNet` (``resnet18``, ``resnet50``): ``normalize``, ``stem`` (an
  ``nn.Sequential`` of ``conv``, ``bn``, ``relu``), ``layer1`` ... ``layer4``, ``pool``
  (``AdaptiveAvgPool2d(1)``), ``flatten``, ``fc``. First layer: ``stem.conv``.
* :class:`VGG` (``vgg16``): ``normalize``, ``stem`` (``conv``, ``bn``, ``relu``),
  ``features`` (the other 12 conv/BN/ReLU triples and the max-pools), ``pool``
  (``AdaptiveAvgPool2d(1)``), ``flatten``, ``classifier`` (one Linear). First layer:
  ``stem.conv``.

The stem convolution has ``padding = stem_kernel // 2`` and no bias (a BatchNorm follows).
With ``stem_stride = s`` the rest of the network simply sees a smaller feature map; every
stride works on any input size at least 1x1 (ResNets pool adaptively, and VGG drops the
max-pools that would shrink its map below 1x1 for the ``input_size`` it was built for).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from harmless.nn import Normalize

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "LeNet",
    "MLP5",
    "MNIST_MEAN",
    "MNIST_STD",
    "PatchCNN",
    "ResNet",
    "VGG",
    "first_layer",
    "resnet18",
    "resnet50",
    "vgg16",
]

MNIST_MEAN: tuple[float, ...] = (0.1307,)
MNIST_STD: tuple[float, ...] = (0.3081,)
FASHION_MNIST_MEAN: tuple[float, ...] = (0.2860,)
FASHION_MNIST_STD: tuple[float, ...] = (0.3530,)
CIFAR10_MEAN: tuple[float, ...] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, ...] = (0.2470, 0.2435, 0.2616)


def _default_stats(
    channels: int, mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std for ``channels`` channels: given ones, else CIFAR-10's (3) or MNIST's (1)."""
    if mean is None:
        mean = CIFAR10_MEAN if channels == 3 else MNIST_MEAN * channels
    if std is None:
        std = CIFAR10_STD if channels == 3 else MNIST_STD * channels
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean/std need {channels} values, got {len(mean)} and {len(std)}")
    return mean, std


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def first_layer(model: nn.Module) -> nn.Module:
    """The first linear layer of a zoo model (the one named by its ``first_layer_name``)."""
    name = getattr(model, "first_layer_name", None)
    if not isinstance(name, str):
        raise TypeError(f"{type(model).__name__} is not a zoo model (no first_layer_name)")
    return model.get_submodule(name)


# ----------------------------------------------------------------------------- MLP-5


class MLP5(nn.Sequential):
    """The paper's MLP-5: ``Normalize -> Flatten -> Linear(n, 256) -> ReLU -> ... -> Linear(256, C)``.

    ``hidden`` gives the hidden widths; the default four give five Linear layers. The first
    Linear maps ``n = prod(in_shape)`` inputs to ``hidden[0]`` outputs, so its harmless
    subspace has dimension ``n - hidden[0]`` (528 on MNIST).
    """

    first_layer_name = "fc1"

    def __init__(
        self,
        in_shape: Sequence[int] = (1, 28, 28),
        hidden: Sequence[int] = (256, 256, 256, 256),
        num_classes: int = 10,
        mean: Sequence[float] | None = MNIST_MEAN,
        std: Sequence[float] | None = MNIST_STD,
    ) -> None:
        in_shape = tuple(int(s) for s in in_shape)
        hidden = tuple(int(h) for h in hidden)
        if len(in_shape) != 3:
            raise ValueError(f"in_shape must be (C, H, W), got {in_shape}")
        if not hidden:
            raise ValueError("hidden needs at least one width")
        _check_positive(num_classes=num_classes, **{f"in_shape[{i}]": s for i, s in enumerate(in_shape)})
        for h in hidden:
            _check_positive(hidden=h)
        mean, std = _default_stats(in_shape[0], mean, std)
        n_in = in_shape[0] * in_shape[1] * in_shape[2]
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["normalize"] = Normalize(mean, std)
        layers["flatten"] = nn.Flatten()
        widths = (n_in, *hidden)
        for i in range(len(hidden)):
            layers[f"fc{i + 1}"] = nn.Linear(widths[i], widths[i + 1])
            layers[f"relu{i + 1}"] = nn.ReLU()
        layers[f"fc{len(hidden) + 1}"] = nn.Linear(widths[-1], num_classes)
        super().__init__(layers)
        self.in_shape = in_shape
        self.num_classes = num_classes


# ----------------------------------------------------------------------------- LeNet-5


class LeNet(nn.Sequential):
    """LeNet-5 with ReLU and max-pooling.

    ``Normalize -> Conv2d(C, 6, 5, padding=2) -> ReLU -> MaxPool2d(2) -> Conv2d(6, 16, 5)
    -> ReLU -> MaxPool2d(2) -> Flatten -> Linear(., 120) -> ReLU -> Linear(120, 84) -> ReLU
    -> Linear(84, num_classes)``. The flattened size follows from ``in_shape`` (400 on
    28x28, 576 on 32x32).
    """

    first_layer_name = "conv1"

    def __init__(
        self,
        in_shape: Sequence[int] = (1, 28, 28),
        num_classes: int = 10,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        in_shape = tuple(int(s) for s in in_shape)
        if len(in_shape) != 3:
            raise ValueError(f"in_shape must be (C, H, W), got {in_shape}")
        _check_positive(num_classes=num_classes, **{f"in_shape[{i}]": s for i, s in enumerate(in_shape)})
        c, h, w = in_shape
        mean, std = _default_stats(c, mean, std)
        # conv1 keeps the size (5x5, padding 2); pool halves; conv2 (5x5, no padding) -4; pool halves.
        h2, w2 = (h // 2 - 4) // 2, (w // 2 - 4) // 2
        if h2 < 1 or w2 < 1:
            raise ValueError(f"LeNet needs inputs of at least 12x12, got {h}x{w}")
        super().__init__(
            OrderedDict(
                [
                    ("normalize", Normalize(mean, std)),
                    ("conv1", nn.Conv2d(c, 6, kernel_size=5, padding=2)),
                    ("relu1", nn.ReLU()),
                    ("pool1", nn.MaxPool2d(2)),
                    ("conv2", nn.Conv2d(6, 16, kernel_size=5)),
                    ("relu2", nn.ReLU()),
                    ("pool2", nn.MaxPool2d(2)),
                    ("flatten", nn.Flatten()),
                    ("fc1", nn.Linear(16 * h2 * w2, 120)),
                    ("relu3", nn.ReLU()),
                    ("fc2", nn.Linear(120, 84)),
                    ("relu4", nn.ReLU()),
                    ("fc3", nn.Linear(84, num_classes)),
                ]
            )
        )
        self.in_shape = in_shape
        self.num_classes = num_classes


# ----------------------------------------------------------------------------- patchify CNN


class PatchCNN(nn.Sequential):
    """A small CNN whose first layer is a "patchify" convolution with a harmless subspace.

    ``Normalize -> Conv2d(C, k, kernel, stride, padding) -> ReLU -> Conv2d(k, 32, 3,
    padding=1) -> ReLU -> MaxPool2d(2) -> Flatten -> Linear(., 128) -> ReLU ->
    Linear(128, num_classes)``. With the defaults (kernel = stride = 4, no padding, k = 8) the
    stem tiles a 28x28 image into 49 disjoint 4x4 patches and maps each patch's 16 pixels
    (times C channels) to k outputs: its matrix is block-diagonal with 49 blocks of k x 16C,
    rank 49·k = 392 of 784, so the harmless subspace has dimension 784 - 392 = 392 (exactly,
    for generic weights). On 32x32x3 it keeps 8·64 = 512 of 3072.
    """

    first_layer_name = "stem"

    def __init__(
        self,
        in_shape: Sequence[int] = (1, 28, 28),
        *,
        stem_channels: int = 8,
        stem_kernel: int = 4,
        stem_stride: int = 4,
        stem_padding: int = 0,
        width: int = 32,
        hidden: int = 128,
        num_classes: int = 10,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        in_shape = tuple(int(s) for s in in_shape)
        if len(in_shape) != 3:
            raise ValueError(f"in_shape must be (C, H, W), got {in_shape}")
        _check_positive(
            stem_channels=stem_channels,
            stem_kernel=stem_kernel,
            stem_stride=stem_stride,
            width=width,
            hidden=hidden,
            num_classes=num_classes,
            **{f"in_shape[{i}]": s for i, s in enumerate(in_shape)},
        )
        if isinstance(stem_padding, bool) or not isinstance(stem_padding, int) or stem_padding < 0:
            raise ValueError(f"stem_padding must be a non-negative int, got {stem_padding!r}")
        c, h, w = in_shape
        mean, std = _default_stats(c, mean, std)
        # The 3x3 conv keeps the map's size; the pool halves it (floor), so the map needs 2x2.
        hs, ws = (_conv_out(s, stem_kernel, stem_stride, stem_padding) for s in (h, w))
        if hs < 2 or ws < 2:
            raise ValueError(
                f"the stem (kernel {stem_kernel}, stride {stem_stride}, padding {stem_padding}) leaves a "
                f"{max(hs, 0)}x{max(ws, 0)} map on {h}x{w} inputs; PatchCNN needs at least 2x2"
            )
        super().__init__(
            OrderedDict(
                [
                    ("normalize", Normalize(mean, std)),
                    (
                        "stem",
                        nn.Conv2d(c, stem_channels, stem_kernel, stride=stem_stride, padding=stem_padding),
                    ),
                    ("relu1", nn.ReLU()),
                    ("conv2", nn.Conv2d(stem_channels, width, 3, padding=1)),
                    ("relu2", nn.ReLU()),
                    ("pool", nn.MaxPool2d(2)),
                    ("flatten", nn.Flatten()),
                    ("fc1", nn.Linear(width * (hs // 2) * (ws // 2), hidden)),
                    ("relu3", nn.ReLU()),
                    ("fc2", nn.Linear(hidden, num_classes)),
                ]
            )
        )
        self.in_shape = in_shape
        self.num_classes = num_classes


# ----------------------------------------------------------------------------- stems


def _stem(in_channels: int, channels: int, kernel: int, stride: int, padding: int | None = None) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            [
                (
                    "conv",
                    nn.Conv2d(
                        in_channels,
                        channels,
                        kernel_size=kernel,
                        stride=stride,
                        padding=kernel // 2 if padding is None else padding,
                        bias=False,
                    ),
                ),
                ("bn", nn.BatchNorm2d(channels)),
                ("relu", nn.ReLU()),
            ]
        )
    )


# ----------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 convolutions with a residual connection (ResNet-50/101/152)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)
        self.relu3 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + self.shortcut(x))


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(
        OrderedDict(
            [
                ("conv", nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)),
                ("bn", nn.BatchNorm2d(out_planes)),
            ]
        )
    )


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stride-1 stem, no max-pool, four stages, global average pool.

    The stem (``self.stem``: ``conv``, ``bn``, ``relu``) is configurable; with
    ``stem_stride > 1`` the stages see a smaller map, and the adaptive pool makes any size work.
    """

    first_layer_name = "stem.conv"

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        num_blocks: Sequence[int],
        *,
        stem_stride: int = 1,
        stem_channels: int = 64,
        stem_kernel: int = 3,
        stem_padding: int | None = None,
        in_channels: int = 3,
        num_classes: int = 10,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        _check_positive(
            stem_stride=stem_stride,
            stem_channels=stem_channels,
            stem_kernel=stem_kernel,
            in_channels=in_channels,
            num_classes=num_classes,
        )
        if stem_padding is not None and (not isinstance(stem_padding, int) or stem_padding < 0):
            raise ValueError(f"stem_padding must be a non-negative int or None, got {stem_padding!r}")
        mean, std = _default_stats(in_channels, mean, std)
        self.normalize = Normalize(mean, std)
        # stem_padding=None: kernel // 2; 0 with stem_kernel == stem_stride gives a "patchify"
        # stem whose windows tile the image exactly
        self.stem = _stem(in_channels, stem_channels, stem_kernel, stem_stride, stem_padding)
        in_planes = stem_channels
        stages = []
        for i, (planes, n, stride) in enumerate(zip((64, 128, 256, 512), num_blocks, (1, 2, 2, 2))):
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(block(in_planes, planes, s))
                in_planes = planes * block.expansion
            stages.append((f"layer{i + 1}", nn.Sequential(*blocks)))
        self.layer1, self.layer2, self.layer3, self.layer4 = (m for _, m in stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_planes, num_classes)
        self.in_channels = in_channels
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.normalize(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.pool(x)))


def resnet18(**kwargs: Any) -> ResNet:
    """CIFAR ResNet-18 (BasicBlock, [2, 2, 2, 2]); keyword arguments (``stem_stride``,
    ``stem_channels``, ``stem_kernel``, ``stem_padding``, ``in_channels``, ``num_classes``, ``mean``, ``std``)
    as for :class:`ResNet`."""
    return ResNet(BasicBlock, (2, 2, 2, 2), **kwargs)


def resnet50(**kwargs: Any) -> ResNet:
    """CIFAR ResNet-50 (Bottleneck, [3, 4, 6, 3]); keyword arguments as for :func:`resnet18`."""
    return ResNet(Bottleneck, (3, 4, 6, 3), **kwargs)


# ----------------------------------------------------------------------------- VGG

_VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip


class VGG(nn.Module):
    """CIFAR-style VGG with BatchNorm after every convolution and a single Linear classifier.

    The first convolution is the configurable stem (``self.stem``: ``conv``, ``bn``,
    ``relu``). The max-pools are laid out for inputs of ``input_size`` (the smaller side):
    any pool that would shrink the map below 1x1 is left out, so every stem stride works.
    """

    first_layer_name = "stem.conv"

    def __init__(
        self,
        cfg: Sequence[int | str] = _VGG16_CFG,
        *,
        stem_stride: int = 1,
        stem_channels: int = 64,
        stem_kernel: int = 3,
        stem_padding: int | None = None,
        in_channels: int = 3,
        num_classes: int = 10,
        input_size: int = 32,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        _check_positive(
            stem_stride=stem_stride,
            stem_channels=stem_channels,
            stem_kernel=stem_kernel,
            in_channels=in_channels,
            num_classes=num_classes,
            input_size=input_size,
        )
        if not cfg or not isinstance(cfg[0], int):
            raise ValueError("a VGG configuration starts with a convolution width")
        if stem_padding is not None and (not isinstance(stem_padding, int) or stem_padding < 0):
            raise ValueError(f"stem_padding must be a non-negative int or None, got {stem_padding!r}")
        mean, std = _default_stats(in_channels, mean, std)
        self.normalize = Normalize(mean, std)
        self.stem = _stem(in_channels, stem_channels, stem_kernel, stem_stride, stem_padding)
        padding = stem_kernel // 2 if stem_padding is None else stem_padding
        size = _conv_out(input_size, stem_kernel, stem_stride, padding)
        if size < 1:
            raise ValueError(f"stem leaves no output on {input_size}x{input_size} inputs")
        layers: list[nn.Module] = []
        channels = stem_channels
        for item in cfg[1:]:
            if item == "M":
                if size >= 2:
                    layers.append(nn.MaxPool2d(2, 2))
                    size //= 2
            else:
                width = int(item)
                layers += [
                    nn.Conv2d(channels, width, 3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(),
                ]
                channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(channels, num_classes)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.input_size = input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.stem(self.normalize(x)))
        return self.classifier(self.flatten(self.pool(x)))


def vgg16(
    *,
    stem_stride: int = 1,
    stem_channels: int = 64,
    stem_kernel: int = 3,
    stem_padding: int | None = None,
    in_channels: int = 3,
    num_classes: int = 10,
    input_size: int = 32,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> VGG:
    """CIFAR VGG-16 with BatchNorm (13 convolutions, one Linear classifier)."""
    return VGG(
        _VGG16_CFG,
        stem_stride=stem_stride,
        stem_channels=stem_channels,
        stem_kernel=stem_kernel,
        stem_padding=stem_padding,
        in_channels=in_channels,
        num_classes=num_classes,
        input_size=input_size,
        mean=mean,
        std=std,
    )
