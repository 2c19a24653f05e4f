"""Trained zoo checkpoints in the cache.

A zoo model ``spec`` trained with seed ``s`` lives in ``cache_dir("models")`` as two files
named after :attr:`ModelSpec.file_stem`, plus ``-seed<s>`` for ``s != 0`` (seed 0 keeps the
plain name, so caches written before the seed was part of the key stay valid):

* ``<stem>.safetensors``: the state dict (``safetensors.torch.save_file``), and
* ``<stem>.json``: a sidecar with the spec key, seed, epochs, test accuracy, torch version
  and the SHA-256 of the weights file.

Both are written atomically, weights first, so the sidecar is the commit point. A cached
checkpoint is used only when its sidecar parses, names the same spec and its checksum
matches the weights (and its seed is the one asked for); otherwise a
:class:`CheckpointWarning` says why and it is ignored.
"""

from __future__ import annotations

import json
import platform
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from harmless import validation
from harmless.cache import atomic_path, atomic_write_text, cache_dir, sha256_file
from harmless.models.registry import ModelSpec, build_model, parse_spec

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointWarning",
    "check_seed",
    "checkpoint_paths",
    "load_checkpoint",
    "read_sidecar",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = 1


class CheckpointWarning(UserWarning):
    """A cached checkpoint was found but cannot be trusted (corrupt, incomplete, stale)."""


def check_seed(seed: object) -> int:
    """A training seed as an ``int``: non-negative (it names the cache file), NumPy integers
    accepted; anything else is an :class:`InputError`."""
    return validation.nonnegative_int(seed, "seed")


def checkpoint_paths(spec: str | ModelSpec, seed: int = 0) -> tuple[Path, Path]:
    """``(weights, sidecar)`` paths of ``spec``'s checkpoint for training seed ``seed`` in the
    cache (may not exist). The seed is part of the key: training another seed never replaces
    the seed-0 model that every plain ``spec`` means."""
    ms = parse_spec(spec)
    seed = check_seed(seed)
    stem = ms.file_stem if seed == 0 else f"{ms.file_stem}-seed{seed}"
    folder = cache_dir("models")
    return folder / f"{stem}.safetensors", folder / f"{stem}.json"


def save_checkpoint(spec: str | ModelSpec, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write ``model``'s weights and a sidecar with ``meta`` (plus checksum etc.) atomically,
    under the key of ``spec`` and ``meta["seed"]`` (default 0)."""
    from harmless import __version__

    ms = parse_spec(spec)
    seed = check_seed(meta.get("seed", 0))
    weights_path, sidecar_path = checkpoint_paths(ms, seed)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(weights_path) as tmp:
        save_file(state, str(tmp), metadata={"spec": ms.key, "format": str(CHECKPOINT_FORMAT)})
        digest = sha256_file(tmp)
    sidecar = {
        **meta,
        "seed": seed,
        "format": CHECKPOINT_FORMAT,
        "spec": ms.key,
        "name": ms.name,
        "dataset": ms.dataset,
        "params": {k: list(v) if isinstance(v, tuple) else v for k, v in ms.params},
        "weights_file": weights_path.name,
        "weights_sha256": digest,
        "torch_version": torch.__version__,
        "harmless_version": __version__,
        "python_version": platform.python_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_text(sidecar_path, json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    return weights_path


def read_sidecar(spec: str | ModelSpec, seed: int = 0) -> dict[str, Any] | None:
    """The parsed sidecar of ``spec``'s cached checkpoint (training seed ``seed``), or ``None``
    if absent/unreadable."""
    _, sidecar_path = checkpoint_paths(spec, seed)
    try:
        meta = json.loads(sidecar_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def load_checkpoint(spec: str | ModelSpec, seed: int = 0) -> tuple[nn.Module, dict[str, Any]] | None:
    """``(model in eval mode, sidecar)`` of ``spec`` trained with ``seed`` from the cache, or
    ``None`` if absent or untrustworthy.

    A checkpoint that exists but fails a check (sidecar unreadable or for another spec or
    seed, weights missing, SHA-256 mismatch, weights not loadable) gives a
    :class:`CheckpointWarning` and ``None``: it is never silently used.
    """
    ms = parse_spec(spec)
    weights_path, sidecar_path = checkpoint_paths(ms, seed)
    if not weights_path.exists() and not sidecar_path.exists():
        return None

    def reject(why: str) -> None:
        warnings.warn(
            f"ignoring cached checkpoint {weights_path} for {ms.key}: {why}",
            CheckpointWarning,
            stacklevel=3,
        )

    meta = read_sidecar(ms, seed)
    if meta is None:
        reject(f"its sidecar {sidecar_path.name} is missing or unreadable")
        return None
    if meta.get("spec") != ms.key or meta.get("format") != CHECKPOINT_FORMAT:
        reject(f"its sidecar is for {meta.get('spec')!r} (format {meta.get('format')!r})")
        return None
    if meta.get("seed", 0) != seed:
        # Written before the seed was part of the key: another seed's model under this name.
        reject(f"it was trained with seed {meta.get('seed')!r}, not {seed}")
        return None
    if not weights_path.exists():
        reject("the weights file is missing")
        return None
    digest = sha256_file(weights_path)
    if digest != meta.get("weights_sha256"):
        reject(
            f"it is corrupt (SHA-256 {digest[:12]}... does not match the recorded "
            f"{str(meta.get('weights_sha256'))[:12]}...)"
        )
        return None
    try:
        state = load_file(str(weights_path), device="cpu")
        model = build_model(ms, seed=0)  # leaves the global RNG alone
        model.load_state_dict(state, strict=True)
    except Exception as exc:
        reject(f"its weights do not load ({type(exc).__name__}: {str(exc).splitlines()[0]})")
        return None
    return model.eval(), meta
