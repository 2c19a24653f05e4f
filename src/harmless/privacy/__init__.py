"""Privacy protection with harmless perturbations: hide an image behind one the model cannot tell
apart from it (same output, exactly), and audit what an attacker who knows the model recovers.

Privatisers (:class:`DecoyPrivatizer`, :class:`PaperPrivatizer`), the projection
(:class:`AffineBoxProjector`), the 8-bit rounding (:class:`Quantizer`) and the audit attacks
(:mod:`harmless.privacy.audit`) are configured objects: settings, pixel ``bounds`` included, in the
constructor, data in the call, a typed result back. Where the dense bases of a prefix do not fit
(an overlapping convolutional stem at 224 px), the decoy privatiser and the projection solve
matrix-free (:mod:`harmless.privacy.matrix_free`, :class:`MatrixFreeProblem`)."""

from __future__ import annotations

from harmless.privacy.core import (
    AffineBoxProjector,
    DecoyPrivatizer,
    DecoyResult,
    PaperPrivatizer,
    PaperResult,
    Privatizer,
    PrivatizeResult,
    ProjectionResult,
    Quantizer,
    QuantizeResult,
    make_decoy,
)
from harmless.privacy.matrix_free import MatrixFreeProblem
from harmless.privacy.problem import Bounds, PrivacyProblem, box_violation
from harmless.privacy.solver import ProjectionInfo
from harmless.privacy.tiles import Tiling, tiling

__all__ = [
    "AffineBoxProjector", "Bounds", "DecoyPrivatizer", "DecoyResult", "MatrixFreeProblem", "PaperPrivatizer",
    "PaperResult",
    "PrivacyProblem", "PrivatizeResult", "Privatizer", "ProjectionInfo", "ProjectionResult", "Quantizer",
    "QuantizeResult", "Tiling", "box_violation", "make_decoy", "tiling",
]
