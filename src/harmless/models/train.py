"""Training zoo models, reproducibly, and caching them.

* :func:`train_zoo_model` trains a zoo spec from scratch (deterministic for a seed) and,
  by default, stores it in the cache (see :mod:`harmless.models.checkpoint`).
* :func:`get_model` returns the cached checkpoint when there is a sound one, else trains.
* :func:`list_zoo` lists the zoo with what is cached.

MNIST and Fashion-MNIST models train on the full training set. CIFAR-10 cannot be fetched
here: CIFAR-10 models train only when ``data_dir`` points at a CIFAR-10 python-pickle
folder, and otherwise come back with seeded random weights and ``trained=False`` (anything
computed from them must say "untrained weights"; see :attr:`TrainedModel.weights_note`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from harmless.cache import cache_dir
from harmless.errors import DataUnavailableError, InputError, ModelSpecError
from harmless.models.checkpoint import (
    check_seed,
    checkpoint_paths,
    load_checkpoint,
    read_sidecar,
    save_checkpoint,
)
from harmless.models.registry import (
    ZOO,
    ModelSpec,
    TrainConfig,
    build_model,
    parse_spec,
)

log = logging.getLogger(__name__)

__all__ = [
    "TrainedModel",
    "ZooRow",
    "deterministic",
    "evaluate",
    "get_model",
    "list_zoo",
    "train_loop",
    "train_zoo_model",
]


@dataclass
class TrainedModel:
    """A zoo model (on the CPU, in eval mode) and where its weights came from."""

    model: nn.Module
    spec: ModelSpec
    trained: bool  # False: seeded random initialisation ("untrained weights")
    test_accuracy: float | None = None  # on the dataset's test split; None when untrained
    checkpoint: Path | None = None  # the cached .safetensors file, if any
    seed: int = 0
    epochs: int = 0
    train_seconds: float | None = None
    from_cache: bool = False
    max_train_samples: int | None = None
    meta: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        # Lets describe_model() (and anyone holding only the module) tell trained from not.
        setattr(self.model, "weights_note", self.weights_note)  # a plain attribute, not a submodule

    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def weights_sha256(self) -> str | None:
        """SHA-256 of the cached checkpoint file (``None`` when the weights were not saved):
        results name it, because training is bitwise reproducible only on the same machine,
        torch build and thread count, so the same spec can mean other weights elsewhere."""
        digest = self.meta.get("weights_sha256")
        if isinstance(digest, str):
            return digest
        if self.checkpoint is not None and Path(self.checkpoint).is_file():
            from harmless.cache import sha256_file

            return sha256_file(Path(self.checkpoint))
        return None

    @property
    def weights_note(self) -> str:
        """What the weights are, for figure captions and reports (with the checkpoint's checksum)."""
        if not self.trained:
            return f"untrained weights (random init, seed {self.seed})"
        digest = self.weights_sha256
        sha = f", checkpoint sha256 {digest[:12]}" if digest else ""
        if self.test_accuracy is None:
            return f"trained weights ({self.epochs} epochs{sha})"
        return f"trained weights, test accuracy {100 * self.test_accuracy:.2f}%{sha}"


# ----------------------------------------------------------------------------- determinism


@contextlib.contextmanager
def deterministic(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Seed torch, switch on deterministic algorithms, and restore everything afterwards.

    The global RNG state, ``torch.are_deterministic_algorithms_enabled()`` (and its
    warn-only flag) and ``cudnn.benchmark`` are as before on exit. On accelerators, ops
    without a deterministic kernel warn instead of failing.
    """
    device = torch.device(device)
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_bench = torch.backends.cudnn.benchmark
    devices = [device.index or 0] if device.type == "cuda" else []
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True, warn_only=device.type != "cpu")
        torch.backends.cudnn.benchmark = False
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(prev, warn_only=prev_warn)
            torch.backends.cudnn.benchmark = prev_bench


# ----------------------------------------------------------------------------- loops


def _as_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1]; float images unchanged (as float32)."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    return images.to(torch.float32)


def _augment(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop (zero padding ``pad``) and horizontal flip, per sample, from ``gen``."""
    b, c, h, w = x.shape
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = (dy.view(b, 1) + torch.arange(h).view(1, h)).view(b, 1, h, 1)
    cols = (dx.view(b, 1) + torch.arange(w).view(1, w)).view(b, 1, 1, w)
    return padded[torch.arange(b).view(b, 1, 1, 1), torch.arange(c).view(1, c, 1, 1), rows, cols]


def _adversary(config: TrainConfig) -> Any:
    """The PGD attack that adversarial training (``config.adv_eps > 0``) runs on every batch."""
    eps = config.adv_eps
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 <= eps <= 1.0:
        raise InputError(f"adv_eps must be a number in [0, 1], got {eps!r}")
    if eps == 0:
        return None
    from harmless.attacks import PGD  # lazily: the attacks need nothing from the models package

    return PGD(eps=float(eps), steps=config.adv_steps, norm="inf",
               abs_stepsize=config.adv_rel_stepsize * float(eps), random_start=True)


def train_loop(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    config: TrainConfig,
    *,
    epochs: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
    desc: str = "training",
) -> nn.Module:
    """Train ``model`` in place on ``images`` (uint8 or float in [0, 1]) and ``targets``.

    With ``config.adv_eps > 0`` every batch is first replaced by L∞ PGD examples
    (:class:`harmless.attacks.PGD`, ``config.adv_steps`` steps, random start) against the
    current weights: PGD adversarial training.

    Shuffling, augmentation and PGD's random starts draw from a ``torch.Generator`` seeded
    with ``seed``; call
    it inside :func:`deterministic` (as :func:`train_zoo_model` does) for bitwise
    reproducible weights. Returns the model, in eval mode, on ``device``.
    """
    epochs = config.epochs if epochs is None else epochs
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise InputError(f"epochs must be a positive integer, got {epochs!r}")
    images = torch.as_tensor(images)
    targets = torch.as_tensor(targets).to(torch.int64)
    n = images.shape[0]
    if n == 0 or targets.shape != (n,):
        raise InputError(f"need N images and N targets, got {tuple(images.shape)} and {tuple(targets.shape)}")
    device = torch.device(device)
    model.to(device).train()
    if config.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(
            model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
    elif config.optimizer == "sgd":
        opt = torch.optim.SGD(
            model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
    else:
        raise InputError(f"unknown optimizer {config.optimizer!r}; valid: adam, sgd")
    bs = config.batch_size
    steps_per_epoch = math.ceil(n / bs)
    if n % bs == 1 and n > 1:
        steps_per_epoch -= 1  # a batch of one breaks BatchNorm: drop it
    total = epochs * steps_per_epoch
    sched = None
    if config.schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
        )
    elif config.schedule != "none":
        raise InputError(f"unknown schedule {config.schedule!r}; valid: none, cosine")
    gen = torch.Generator().manual_seed(seed)
    attack = _adversary(config)
    with tqdm(
        total=total, desc=desc, unit="batch", file=sys.stderr, disable=None if progress else True, leave=False
    ) as bar:
        for epoch in range(epochs):
            order = torch.randperm(n, generator=gen)
            for step in range(steps_per_epoch):
                idx = order[step * bs : (step + 1) * bs]
                x = _as_float(images[idx])
                if config.augment:
                    x = _augment(x, gen)
                x, y = x.to(device), targets[idx].to(device)
                if attack is not None:
                    # Craft on the current weights in eval mode (as any attack is run), then train
                    # on the adversarial batch only (Madry et al.); the random starts come from gen.
                    model.eval()
                    x = attack(model, x, y, generator=gen).x_adv
                    model.train()
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                bar.update(1)
                if step % 20 == 0 or step == steps_per_epoch - 1:
                    bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{loss.item():.4f}")
    return model.eval()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    batch_size: int = 1000,
    device: torch.device | str = "cpu",
) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) on uint8/float images in [0, 1]."""
    images = torch.as_tensor(images)
    targets = torch.as_tensor(targets).to(torch.int64)
    model.eval()
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        x = _as_float(images[start : start + batch_size]).to(device)
        pred = model(x).argmax(dim=1).cpu()
        correct += int((pred == targets[start : start + batch_size]).sum())
    return correct / max(1, images.shape[0])


# ----------------------------------------------------------------------------- zoo


def _load_split(dataset: str, split: str, data_dir: str | os.PathLike[str] | None) -> Any:
    try:
        from harmless.data import load_dataset
    except ImportError as exc:  # pragma: no cover - the data package ships with harmless
        raise DataUnavailableError(f"harmless.data cannot be imported: {exc}") from exc
    return load_dataset(dataset, split=split, data_dir=data_dir)


# Wall time of one epoch over 60,000 28x28 images on an idle 2-core CPU: MLP-5's 5 epochs take
# about 20 s (README), LeNet's about 4 minutes (issue 11). Only for the "roughly how long" notice
# before training; a busy machine takes several times longer.
_SECONDS_PER_EPOCH_60K = {"mlp5": 4.0, "lenet": 48.0, "patchcnn": 6.0}


def training_estimate(ms: ModelSpec, epochs: int, samples: int) -> str:
    """Roughly how long training ``ms`` takes on a CPU, in words (``"roughly 20 s"``)."""
    per_epoch = _SECONDS_PER_EPOCH_60K.get(ms.name)
    if per_epoch is None:
        return "possibly hours on a CPU"  # the CIFAR networks: never measured end to end here
    pixels = math.prod(ms.dataset_info.in_shape[1:]) / (28 * 28)
    config = ms.train_config
    # adversarial training: every step also runs PGD (a gradient per PGD step, two forwards)
    passes = 1 + (config.adv_steps + 1 if config.adv_eps > 0 else 0)
    seconds = per_epoch * epochs * samples / 60000 * pixels * passes
    if seconds < 90:
        return f"roughly {max(5, round(seconds / 5) * 5):.0f} s on an idle 2-core CPU"
    return f"roughly {round(seconds / 60):.0f} min on an idle 2-core CPU"


def _random_init(ms: ModelSpec, seed: int) -> TrainedModel:
    return TrainedModel(build_model(ms, seed=seed), ms, trained=False, seed=seed, epochs=0)


def train_zoo_model(
    spec: str | ModelSpec,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    epochs: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
    max_train_samples: int | None = None,
    save: bool | None = None,
) -> TrainedModel:
    """Train zoo model ``spec`` from a seeded initialisation and report its test accuracy.

    Bitwise reproducible on the CPU for a given ``seed`` (same torch build and thread
    count). ``epochs`` defaults to the spec's training recipe (5 for mlp5/lenet).
    ``max_train_samples`` trains on the first N training images only (for tests/smoke runs).
    ``save`` (default: only for full-data runs) stores the checkpoint in the cache,
    replacing any earlier one for the spec and seed (each seed has its own cache entry).

    A CIFAR-10 spec without ``data_dir`` is not trained: it returns seeded random weights
    with ``trained=False`` (nothing is cached). The returned model is on the CPU, in eval mode.
    """
    ms = parse_spec(spec)
    seed = check_seed(seed)
    if max_train_samples is not None and (
        isinstance(max_train_samples, bool)
        or not isinstance(max_train_samples, int)
        or max_train_samples < 1
    ):
        raise InputError(f"max_train_samples must be a positive integer, got {max_train_samples!r}")
    if ms.dataset_info.needs_data_dir and data_dir is None:
        return _random_init(ms, seed)
    config = ms.train_config
    epochs = config.epochs if epochs is None else epochs
    train = _load_split(ms.dataset, "train", data_dir)
    test = _load_split(ms.dataset, "test", data_dir)
    images, targets = torch.as_tensor(train.images), torch.as_tensor(train.targets)
    if max_train_samples is not None:
        images, targets = images[:max_train_samples], targets[:max_train_samples]
    if save is None:
        save = max_train_samples is None
    # One line before a wait that can last minutes: which model, that it trains, how long.
    log.info("training %s%s now (%d epochs on %s images; %s, longer when the cores are busy)%s",
             ms.key, "" if seed == 0 else f" (seed {seed})", epochs, f"{int(images.shape[0]):,}",
             training_estimate(ms, epochs, int(images.shape[0])),
             "; it is cached for later runs" if save else "")
    start = time.perf_counter()
    with deterministic(seed, device):
        model = ms.build()
        train_loop(
            model,
            images,
            targets,
            config,
            epochs=epochs,
            seed=seed,
            device=device,
            progress=progress,
            desc=f"training {ms.key}",
        )
        accuracy = evaluate(model, test.images, test.targets, device=device)
    seconds = time.perf_counter() - start
    model = model.to("cpu").eval()
    meta = {
        "trained": True,
        "seed": seed,
        "epochs": epochs,
        "max_train_samples": max_train_samples,
        "train_samples": int(images.shape[0]),
        "test_accuracy": accuracy,
        "train_seconds": round(seconds, 3),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "train_config": {k: getattr(config, k) for k in config.__dataclass_fields__},
        "data_dir": None if data_dir is None else str(data_dir),
    }
    checkpoint = save_checkpoint(ms, model, meta) if save else None
    return TrainedModel(
        model,
        ms,
        trained=True,
        test_accuracy=accuracy,
        checkpoint=checkpoint,
        seed=seed,
        epochs=epochs,
        train_seconds=seconds,
        max_train_samples=max_train_samples,
        meta=meta,
    )


def get_model(
    spec: str | ModelSpec,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    train: bool = True,
    progress: bool = True,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> TrainedModel:
    """The cached checkpoint of ``spec`` trained with ``seed`` (default 0: what a plain spec
    always means) if there is a sound one, else a newly trained one.

    A corrupt cached checkpoint gives a :class:`~harmless.models.checkpoint.CheckpointWarning`
    and is re-trained. With ``train=False``, or for CIFAR-10 without ``data_dir``, a missing
    checkpoint gives random weights seeded with ``seed`` (``trained=False``) instead.
    """
    ms = parse_spec(spec)
    seed = check_seed(seed)
    loaded = load_checkpoint(ms, seed)
    if loaded is not None:
        model, meta = loaded
        return TrainedModel(
            model,
            ms,
            trained=bool(meta.get("trained", True)),
            test_accuracy=meta.get("test_accuracy"),
            checkpoint=checkpoint_paths(ms, seed)[0],
            seed=int(meta.get("seed", 0)),
            epochs=int(meta.get("epochs", 0)),
            train_seconds=meta.get("train_seconds"),
            from_cache=True,
            max_train_samples=meta.get("max_train_samples"),
            meta=meta,
        )
    if not train or (ms.dataset_info.needs_data_dir and data_dir is None):
        return _random_init(ms, seed)
    return train_zoo_model(ms, data_dir=data_dir, progress=progress, device=device, seed=seed, save=True)


@dataclass(frozen=True)
class ZooRow:
    """One line of :func:`list_zoo`."""

    spec: str  # canonical key
    name: str
    dataset: str
    datasets: tuple[str, ...]  # every dataset the architecture can be built for
    params: dict[str, Any]
    description: str
    needs_data_dir: bool  # training needs a user-supplied data_dir (CIFAR-10)
    cached: bool  # a trained checkpoint is in the cache
    test_accuracy: float | None
    checkpoint: Path | None


def _row(ms: ModelSpec) -> ZooRow:
    weights, _ = checkpoint_paths(ms)
    meta = read_sidecar(ms)
    cached = bool(
        meta is not None
        and meta.get("spec") == ms.key
        and meta.get("trained", True)
        and weights.exists()
    )
    return ZooRow(
        spec=ms.key,
        name=ms.name,
        dataset=ms.dataset,
        datasets=ms.entry.datasets,
        params=ms.kwargs,
        description=ms.entry.description,
        needs_data_dir=ms.dataset_info.needs_data_dir,
        cached=cached,
        test_accuracy=meta.get("test_accuracy") if cached and meta else None,
        checkpoint=weights if cached else None,
    )


def list_zoo() -> list[ZooRow]:
    """Every architecture x dataset at default parameters, then other cached specs.

    ``cached``/``test_accuracy`` come from the checkpoint sidecars (checksums are verified
    only when a checkpoint is loaded).
    """
    specs: list[ModelSpec] = []
    for entry in ZOO.values():
        ordered = (entry.default_dataset,) + tuple(d for d in entry.datasets if d != entry.default_dataset)
        specs += [parse_spec(f"{entry.name}:{d}") for d in ordered]
    seen = {ms.key for ms in specs}
    for sidecar in sorted(cache_dir("models").glob("*.json")):
        try:
            key = json.loads(sidecar.read_text(encoding="utf-8")).get("spec")
            ms = parse_spec(key)
        except (OSError, ValueError, AttributeError, ModelSpecError):
            continue
        if ms.key not in seen:
            seen.add(ms.key)
            specs.append(ms)
    return [_row(ms) for ms in specs]
