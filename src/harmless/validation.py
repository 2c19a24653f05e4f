"""One place for the checks that every public entry point makes on its arguments.

Each check returns the value in canonical form (a Python ``int``/``float``/``tuple``) or
raises :class:`~harmless.errors.InputError` with one line that names the argument and shows
what was given. NumPy scalars are accepted wherever Python numbers are; ``bool`` never
counts as a number; strings never count as shapes (``"128"`` is refused, not read as
``(1, 2, 8)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from harmless.errors import InputError

__all__ = [
    "batch", "bounds", "labels", "float_dtype", "fraction", "generator", "is_int", "is_real", "nonnegative_int",
    "nonnegative_number", "positive_int", "positive_number", "real_number", "shape",
]


def is_int(value: object) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value: object) -> bool:
    """A Python or NumPy real number (integers included), not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def positive_int(value: object, name: str) -> int:
    """An integer >= 1."""
    if not is_int(value) or int(value) < 1:  # type: ignore[call-overload]
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)  # type: ignore[call-overload]


def nonnegative_int(value: object, name: str) -> int:
    """An integer >= 0."""
    if not is_int(value) or int(value) < 0:  # type: ignore[call-overload]
        raise InputError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)  # type: ignore[call-overload]


def real_number(value: object, name: str) -> float:
    """A finite real number."""
    if not is_real(value) or not math.isfinite(float(value)):  # type: ignore[arg-type]
        raise InputError(f"{name} must be a finite real number, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def positive_number(value: object, name: str) -> float:
    """A finite real number > 0."""
    if not is_real(value) or not math.isfinite(float(value)) or float(value) <= 0:  # type: ignore[arg-type]
        raise InputError(f"{name} must be a finite positive number, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def nonnegative_number(value: object, name: str) -> float:
    """A finite real number >= 0."""
    if not is_real(value) or not math.isfinite(float(value)) or float(value) < 0:  # type: ignore[arg-type]
        raise InputError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def fraction(value: object, name: str, *, allow_zero: bool = False) -> float:
    """A number in (0, 1) (``[0, 1)`` with ``allow_zero``): tolerances."""
    low_ok = (lambda v: v >= 0) if allow_zero else (lambda v: v > 0)
    if not is_real(value) or not (low_ok(float(value)) and float(value) < 1):  # type: ignore[arg-type]
        raise InputError(f"{name} must be a number in {'[0' if allow_zero else '(0'}, 1), got {value!r}")
    return float(value)  # type: ignore[arg-type]


def shape(value: object, name: str = "input_shape") -> tuple[int, ...]:
    """A non-empty sequence (list, tuple, ``torch.Size``) of positive integers."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, torch.Size)):
        raise InputError(f"{name} must be a sequence of positive integers such as (3, 32, 32), got {value!r}")
    if not value or not all(is_int(s) and int(s) > 0 for s in value):
        raise InputError(f"{name} must be a non-empty sequence of positive integers, got {value!r}")
    return tuple(int(s) for s in value)


def float_dtype(dtype: object, name: str = "dtype") -> torch.dtype:
    """``torch.float32`` or ``torch.float64``."""
    if dtype not in (torch.float32, torch.float64):
        raise InputError(f"{name} must be torch.float32 or torch.float64, got {dtype}")
    return dtype


def bounds(value: object, name: str = "bounds") -> tuple[float, float]:
    """Two finite reals ``(lo, hi)`` with ``lo < hi``."""
    try:
        pair: tuple[object, ...] = tuple(value)  # type: ignore[arg-type]
    except TypeError:
        raise InputError(f"{name} must be a pair (lo, hi), got {value!r}") from None
    if len(pair) != 2:
        raise InputError(f"{name} must be a pair (lo, hi), got {value!r}")
    lo_f, hi_f = real_number(pair[0], f"{name}[0]"), real_number(pair[1], f"{name}[1]")
    if not lo_f < hi_f:
        raise InputError(f"{name} must satisfy lo < hi, got {value!r}")
    return lo_f, hi_f


def flag(value: object, name: str, *, allow_none: bool = False) -> bool | None:
    """``True`` or ``False`` (and ``None`` where ``allow_none``: e.g. "on a terminal only")."""
    if isinstance(value, bool) or (allow_none and value is None):
        return value
    raise InputError(f"{name} must be True{', False or None' if allow_none else ' or False'}, got {value!r}")


def generator(value: object, name: str = "generator") -> torch.Generator | None:
    """``None`` or a ``torch.Generator``."""
    if value is not None and not isinstance(value, torch.Generator):
        raise InputError(f"{name} must be a torch.Generator or None, got {type(value).__name__}")
    return value


def batch(value: object, sample_shape: Sequence[int], name: str = "delta") -> torch.Tensor:
    """A floating tensor ``(B, *sample_shape)`` with finite entries, detached (never written to)."""
    if not isinstance(value, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    want = tuple(sample_shape)
    if value.ndim != len(want) + 1 or tuple(value.shape[1:]) != want:
        raise InputError(f"{name} must have shape (B, {', '.join(map(str, want))}), got {tuple(value.shape)}")
    if not value.is_floating_point():
        raise InputError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if not bool(torch.isfinite(value).all()):
        raise InputError(f"{name} contains non-finite values (nan or inf)")
    return value.detach()


def labels(value: object, count: int, name: str = "y") -> torch.Tensor:
    """Class labels: an int64 tensor of shape ``(count,)`` with entries >= 0."""
    if not isinstance(value, torch.Tensor) or value.dtype != torch.int64 or tuple(value.shape) != (count,):
        got = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise InputError(f"{name} must be an int64 tensor of shape ({count},) (one label per sample), got {got}")
    if bool((value < 0).any()):
        raise InputError(f"labels must be >= 0, got {int(value.min())}")
    return value
