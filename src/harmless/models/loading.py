"""Loading a user's model, safely.

:func:`load_model` accepts, in this order of precedence:

1. a path to an existing file: a TorchScript archive (``torch.jit.load``, on the CPU);
2. a zoo spec (``mlp5:mnist``, ``resnet18:stem_stride=8``, ...; see
   :mod:`harmless.models.registry`): the cached checkpoint, else trained now (or, with
   ``weights=``, the zoo architecture with those weights);
3. ``package.module:factory``: the module is imported, ``factory()`` called with no
   arguments and must return an ``nn.Module``; ``weights=`` then loads a state dict.

Weights files are read with ``torch.load(..., weights_only=True)`` (or
``safetensors.torch.load_file`` for ``.safetensors``), so a checkpoint that would need to
run code to unpickle is refused with :class:`~harmless.errors.UnsafeCheckpointError` and
nothing in it is executed. A state dict may be nested under ``"state_dict"``,
``"model_state_dict"`` or ``"model"``, and a ``module.`` prefix (DataParallel) is dropped.

Whatever is loaded is returned in eval mode; a model that arrives in training mode gives a
:class:`TrainingModeWarning` first.
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
import sys
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harmless.errors import DataUnavailableError, InputError, ModelSpecError, TrainingModeWarning, UnsafeCheckpointError
from harmless.models.registry import build_model, is_zoo_spec, parse_spec, zoo_names

__all__ = [
    "TrainingModeWarning",
    "apply_state_dict",
    "describe_model",
    "load_model",
    "load_state_dict_file",
]

_FACTORY_RE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".pkl", ".ts")


# ----------------------------------------------------------------------------- weights


def _unsafe_detail(exc: BaseException) -> str:
    text = str(exc)
    match = re.search(r"unsupported\s+global:?\s*(?:GLOBAL\s+)?([\w.]+)", text, re.I)
    if match:
        return f"it references {match.group(1)}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:160] if lines else type(exc).__name__


def _unwrap_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    for _ in range(4):
        if isinstance(obj, Mapping) and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
        ):
            return dict(obj)
        if not isinstance(obj, Mapping):
            break
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
        else:
            break
    kind = type(obj).__name__
    raise ModelSpecError(
        f"{source} does not hold a state dict (a mapping of names to tensors, possibly under "
        f"'state_dict' or 'model'); found a {kind}"
    )


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a ``torch.save`` file, never running code.

    Raises :class:`DataUnavailableError` (no such file), :class:`UnsafeCheckpointError`
    (the pickle needs more than tensors and plain containers) or :class:`ModelSpecError`
    (unreadable, or not a state dict).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise InputError(f"weights {path} is a directory, not a weights file (.pt or .safetensors)")
    if not path.is_file():
        raise DataUnavailableError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise ModelSpecError(f"cannot read {path} as safetensors: {exc}") from exc
    try:
        with warnings.catch_warnings():
            # torch notes pickle protocols it did not write; irrelevant to the user.
            warnings.filterwarnings("ignore", message=".*pickle protocol.*", category=UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"refused to load {path}: unpickling it would run code or build objects other "
            f"than tensors ({_unsafe_detail(exc)}); harmless loads only plain state dicts "
            f"(torch.load weights_only=True) and .safetensors files: re-save with "
            f"torch.save(model.state_dict(), ...)"
        ) from None
    except Exception as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ModelSpecError(f"cannot read weights file {path}: {first}") from exc
    return _unwrap_state_dict(obj, str(path))


def _few(keys: list[str], n: int = 4) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def apply_state_dict(
    model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "weights"
) -> nn.Module:
    """Load ``state`` into ``model`` strictly; mismatches raise :class:`ModelSpecError`."""
    state = dict(state)
    own = model.state_dict()
    if state and all(k.startswith("module.") for k in state) and not any(
        k.startswith("module.") for k in own
    ):
        state = {k[len("module.") :]: v for k, v in state.items()}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_few(unexpected)}")
        raise ModelSpecError(
            f"{source} do not fit {type(model).__name__}: {'; '.join(parts)}"
        )
    bad = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if tuple(v.shape) != tuple(own[k].shape)
    ]
    if bad:
        raise ModelSpecError(
            f"{source} do not fit {type(model).__name__}: shape mismatch in {_few(bad, 3)}"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelSpecError(f"{source} do not fit {type(model).__name__}: {exc}") from exc
    return model


# ----------------------------------------------------------------------------- models


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(n.split("/", 1)[-1].startswith("code/") for n in names) or any(
        n.endswith("/constants.pkl") for n in names
    )


def _load_torchscript(path: Path) -> nn.Module:
    if path.suffix == ".safetensors":
        raise ModelSpecError(
            f"{path} holds weights only; name the architecture too: "
            f"load_model('package.module:factory' or a zoo spec, weights='{path}')"
        )
    if path.suffix == ".pt2":
        raise ModelSpecError(
            f"{path} is a torch.export archive; harmless does not load those (torch.export.load "
            f"unpickles without restriction): pass a TorchScript file, or "
            f"'package.module:factory' with weights= holding a state dict"
        )
    if not _is_torchscript_archive(path):
        raise ModelSpecError(
            f"{path} is not a TorchScript archive; harmless does not unpickle whole models: "
            f"save one with torch.jit.script(model).save(...) (or torch.jit.trace), or pass "
            f"'package.module:factory' with weights='{path}' holding a state dict"
        )
    try:
        with warnings.catch_warnings():
            # torch >= 2.10 deprecates TorchScript; loading still works and is what we want.
            warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=DeprecationWarning)
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelSpecError(f"cannot load TorchScript archive {path}: {first}") from exc


def _import_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        top = name.split(".")[0]
        if exc.name not in (top, name) and not name.startswith(f"{exc.name}."):
            raise ModelSpecError(f"importing {name} failed: {exc}") from exc
        cwd = os.getcwd()
        if cwd in sys.path or "" in sys.path:
            raise ModelSpecError(f"cannot import module {name!r}: {exc}") from exc
        sys.path.insert(0, cwd)  # like `python -m`: modules in the working directory
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as exc2:
            raise ModelSpecError(f"cannot import module {name!r}: {exc2}") from exc2
        finally:
            sys.path.remove(cwd)
    except Exception as exc:
        raise ModelSpecError(f"importing {name} failed: {type(exc).__name__}: {exc}") from exc


def _load_factory(spec: str) -> nn.Module:
    module_name, _, attr_path = spec.partition(":")
    obj: Any = _import_module(module_name)
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ModelSpecError(f"{module_name} has no attribute {attr_path!r}") from None
    if not callable(obj):
        raise ModelSpecError(f"{spec} is not callable (a factory returning an nn.Module)")
    try:
        model = obj()
    except Exception as exc:
        raise ModelSpecError(f"calling {spec}() failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{spec}() returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _ensure_eval(model: nn.Module, source: str) -> nn.Module:
    if any(m.training for m in model.modules()):
        warnings.warn(
            f"{source} was in training mode; switched it to eval mode (BatchNorm uses its "
            f"running statistics, dropout is off)",
            TrainingModeWarning,
            stacklevel=3,
        )
    return model.eval()


def load_model(
    spec: str,
    *,
    weights: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    allow_training: bool = True,
) -> nn.Module:
    """Load a model from a TorchScript file, a zoo spec, or ``package.module:factory``.

    ``weights`` (a state-dict file) applies to zoo specs and factories. Zoo specs without
    ``weights`` come from the cache or are trained now (``data_dir``/``progress`` are passed
    on); with ``allow_training=False`` a zoo model that would have to be trained raises
    :class:`DataUnavailableError` instead. The model comes back on the CPU, in eval mode.

    Raises :class:`ModelSpecError` (unknown spec, bad factory, weights that do not fit),
    :class:`UnsafeCheckpointError` (a checkpoint that would run code) or
    :class:`DataUnavailableError` (a file that does not exist).
    """
    if not isinstance(spec, str):
        raise ModelSpecError(f"a model spec is a string, got {type(spec).__name__}")
    text = spec.strip()
    path = Path(text).expanduser()
    if text and path.is_file():
        if weights is not None:
            raise ModelSpecError(
                f"weights= applies to zoo specs and package.module:factory, not to the file {path}"
            )
        return _ensure_eval(_load_torchscript(path), str(path))
    if is_zoo_spec(text):
        ms = parse_spec(text)
        if weights is None:
            from harmless.models.train import get_model

            tm = get_model(ms, data_dir=data_dir, progress=progress, train=allow_training)
            # untrained and not from the cache: get_model would have trained it if allowed
            # (CIFAR-10 without data_dir never trains: its seeded random weights are the model)
            if not tm.trained and not (ms.dataset_info.needs_data_dir and data_dir is None):
                raise DataUnavailableError(
                    f"{ms.key} is not trained yet (no cached checkpoint) and training was not allowed "
                    f"(--no-train); train it first with `harmless models train {ms.key}`"
                )
            return _ensure_eval(tm.model, ms.key)
        model = apply_state_dict(build_model(ms, seed=0), load_state_dict_file(weights), str(weights))
        return _ensure_eval(model, ms.key)
    if _FACTORY_RE.fullmatch(text):
        model = _load_factory(text)
        if weights is not None:
            apply_state_dict(model, load_state_dict_file(weights), str(weights))
        return _ensure_eval(model, f"{text}()")
    if text and path.is_dir():
        raise InputError(f"model {path} is a directory, not a TorchScript file, zoo spec or package.module:factory")
    if text.lower().endswith(_WEIGHT_SUFFIXES) or os.sep in text:
        raise DataUnavailableError(f"model file not found: {path}")
    raise ModelSpecError(
        f"cannot resolve model {spec!r}: expected a zoo spec ({', '.join(zoo_names())}, e.g. "
        f"resnet18:stem_stride=2), a TorchScript file, or package.module:factory"
    )


# ----------------------------------------------------------------------------- describe


def _type_name(module: nn.Module) -> str:
    return str(getattr(module, "original_name", None) or type(module).__name__)


def _layer_text(module: nn.Module) -> str:
    if _type_name(module) == "Normalize" and hasattr(module, "mean") and hasattr(module, "std"):
        mean_t, std_t = getattr(module, "mean"), getattr(module, "std")  # buffers of a Normalize
        mean = ", ".join(f"{float(v):.4g}" for v in mean_t.flatten())
        std = ", ".join(f"{float(v):.4g}" for v in std_t.flatten())
        return f"Normalize(mean=({mean}), std=({std}))"
    if isinstance(module, torch.jit.ScriptModule):
        shapes = ", ".join(
            f"{n} {'x'.join(map(str, p.shape))}" for n, p in module.named_parameters(recurse=False)
        )
        return f"{_type_name(module)}({shapes})"
    return " ".join(repr(module).split())


def describe_model(model: nn.Module) -> str:
    """One line: class, parameter count, mode, input normalisation and first layer."""
    n_params = sum(p.numel() for p in model.parameters())
    parts = [f"{_type_name(model)}: {n_params:,} parameters"]
    parts.append("training mode" if model.training else "eval mode")
    first = None
    for name, module in model.named_modules():
        if module is model or any(True for _ in module.children()):
            continue
        kind = _type_name(module)
        if kind == "Normalize":
            parts.append(f"input {_layer_text(module)}")
            continue
        if kind in ("Flatten", "Identity", "Dropout", "Unflatten"):
            continue
        first = f"first layer {name}: {_layer_text(module)}"
        break
    if first:
        parts.append(first)
    note = getattr(model, "weights_note", None)  # set on zoo models by get_model & co.
    if isinstance(note, str):
        parts.append(note)
    return "; ".join(parts)
