"""Errors a user can cause and act on.

Every error the command-line tool reports as one line (no traceback) derives from
:class:`HarmlessError`; anything else is a bug in ``harmless`` and keeps its traceback.
"""

from __future__ import annotations


class HarmlessError(Exception):
    """Base of all user-facing errors."""


class InputError(HarmlessError, ValueError):
    """A parameter or tensor is malformed: wrong shape, dtype, non-finite values, ..."""


class UnsupportedLayerError(HarmlessError, TypeError):
    """A layer the engine cannot turn into a linear operator where one is needed."""


class NoHarmlessSubspaceError(HarmlessError, ValueError):
    """The linear map is injective: its only harmless perturbation is zero."""


class VerificationError(HarmlessError, RuntimeError):
    """The model's own output changed under a perturbation the analysis calls harmless; the
    analysis refuses to return it (the message says by how much)."""


class TooLargeError(HarmlessError, MemoryError):
    """A dense computation was asked for on an operator too large for it."""


class DataUnavailableError(HarmlessError, RuntimeError):
    """A dataset or model cannot be fetched or found; the message says how to supply it."""


class UnsafeCheckpointError(HarmlessError, RuntimeError):
    """A checkpoint would need to execute code to load; it was refused."""


class ModelSpecError(HarmlessError, ValueError):
    """A model specification string cannot be resolved."""


class TrainingModeWarning(UserWarning):
    """A model was handed over in training mode; it is analysed/evaluated in eval mode."""


class PrecisionWarning(UserWarning):
    """A result is less exact than asked for (e.g. an iterative solve stopped early)."""
