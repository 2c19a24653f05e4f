"""The one validation module (issue 11, item 11): every check accepts NumPy scalars, never
takes a bool for a number or a string for a shape, and the entry points agree."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import harmless
from harmless import validation
from harmless.attacks import PGD
from harmless.errors import InputError
from harmless.fingerprint import create_fingerprint


@pytest.mark.parametrize("value", [3, np.int64(3), np.int32(3)])
def test_positive_int_accepts_python_and_numpy_integers(value: object) -> None:
    assert validation.positive_int(value, "n") == 3 and type(validation.positive_int(value, "n")) is int


@pytest.mark.parametrize("value", [0, -1, True, 2.0, "3", None, np.float64(3.0)])
def test_positive_int_refuses_the_rest(value: object) -> None:
    with pytest.raises(InputError, match="n must be a positive integer"):
        validation.positive_int(value, "n")


@pytest.mark.parametrize("value", [0.5, 2, np.float32(0.5), np.int64(7)])
def test_positive_number_accepts(value: object) -> None:
    assert validation.positive_number(value, "x") == float(value)


@pytest.mark.parametrize("value", [0, -0.1, math.nan, math.inf, True, "1", None])
def test_positive_number_refuses(value: object) -> None:
    with pytest.raises(InputError, match="x must be a finite positive number"):
        validation.positive_number(value, "x")


@pytest.mark.parametrize("value", [(3, 32, 32), [1, 28, 28], torch.Size([4]), (np.int64(2), 3)])
def test_shape_accepts(value: object) -> None:
    assert validation.shape(value) == tuple(int(v) for v in value)


@pytest.mark.parametrize("value", ["128", b"12", (), (3, 0), (3, -1), (2.0, 3), (True, 2), 5, None])
def test_shape_refuses(value: object) -> None:
    with pytest.raises(InputError, match="input_shape"):
        validation.shape(value)


def test_fraction_bounds_dtype_generator() -> None:
    assert validation.fraction(np.float64(1e-6), "rtol") == 1e-6
    for bad in (0, 1, -1e-3, math.nan, True):
        with pytest.raises(InputError, match="rtol"):
            validation.fraction(bad, "rtol")
    assert validation.fraction(0, "rtol", allow_zero=True) == 0.0
    assert validation.bounds((np.int64(-1), 1)) == (-1.0, 1.0)
    for bad in ((1, 0), (0, math.inf), 0, (0, 1, 2)):
        with pytest.raises(InputError, match="bounds"):
            validation.bounds(bad)
    assert validation.float_dtype(torch.float32) is torch.float32
    with pytest.raises(InputError, match="dtype"):
        validation.float_dtype(torch.float16)
    with pytest.raises(InputError, match="generator"):
        validation.generator(0)


def test_batch_is_checked_and_never_copied_into() -> None:
    x = torch.randn(2, 3)
    assert validation.batch(x, (3,)) is not None
    for bad, match in ((x.numpy(), "torch.Tensor"), (x[0], "shape"), (x.long(), "floating"),
                       (torch.full((2, 3), math.nan), "non-finite")):
        with pytest.raises(InputError, match=match):
            validation.batch(bad, (3,))


def test_entry_points_agree_on_shapes_and_numpy_integers() -> None:
    """Before: the fingerprint read "128" as (1, 2, 8) while harmless_subspace refused it, and
    NumPy integers were accepted in one place and refused in another."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    probes = torch.rand(2, 8)
    with pytest.raises(InputError, match="input_shape"):
        harmless.harmless_subspace(model, "8")
    with pytest.raises(InputError, match="input_shape"):
        create_fingerprint(model, "8", probes, k=2)
    assert harmless.harmless_subspace(model, (np.int64(8),)).sample(np.int64(2)).shape == (2, 8)
    assert create_fingerprint(model, (8,), probes, k=np.int64(2)).k == 2
    assert PGD(eps=np.float32(0.1), steps=np.int64(3)).steps == 3


def test_flag_accepts_bools_and_none_only_where_allowed() -> None:
    assert validation.flag(True, "f") is True and validation.flag(False, "f") is False
    assert validation.flag(None, "f", allow_none=True) is None
    for bad in (None, 1, 0, "yes", np.bool_(True)):
        with pytest.raises(InputError, match="f must be True or False"):
            validation.flag(bad, "f")
    with pytest.raises(InputError, match="f must be True, False or None"):
        validation.flag(1, "f", allow_none=True)


def test_privatizers_check_progress() -> None:
    from harmless.privacy import AffineBoxProjector, DecoyPrivatizer
    from harmless.privacy.audit import TVLPAttack

    for make in (DecoyPrivatizer, AffineBoxProjector):
        assert make(progress=None).progress is None
        with pytest.raises(InputError, match="progress must be True, False or None"):
            make(progress="yes")
    with pytest.raises(InputError, match="progress must be True or False"):
        TVLPAttack(progress=None)  # type: ignore[arg-type]
