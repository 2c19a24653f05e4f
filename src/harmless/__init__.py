"""harmless: find, measure and use the harmless perturbations of deep networks."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]

from harmless.errors import (
    HarmlessError,
    InputError,
    NoHarmlessSubspaceError,
    TooLargeError,
    UnsupportedLayerError,
)
from harmless.linalg.operators import TorchLinearOperator
from harmless.linalg.prefix import linear_run
from harmless.linalg.subspace import HarmlessSubspace, harmless_subspace, least_harmful

# Last: harmless.nonlinear calls down into the names above (linear_run) at run time.
from harmless.nonlinear import harmless_set

__all__ += [
    "HarmlessError", "InputError", "NoHarmlessSubspaceError", "TooLargeError", "UnsupportedLayerError",
    "TorchLinearOperator", "HarmlessSubspace", "harmless_subspace", "least_harmful", "linear_run",
    "harmless_set",
]
