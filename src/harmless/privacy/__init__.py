"""Privacy protection with harmless perturbations: hide an image behind one the model cannot tell
apart from it (same output, exactly), and audit what an attacker who knows the model recovers."""

from __future__ import annotations

from harmless.privacy.core import (
    Projector,
    ProjectionInfo,
    QuantizeResult,
    Result,
    box_violation,
    make_decoy,
    privatize_decoy,
    privatize_paper,
    project_affine_box,
    projector,
    quantize_harmless,
)
from harmless.privacy.tiles import Tiling, tiling

__all__ = [
    "Projector", "ProjectionInfo", "QuantizeResult", "Result", "box_violation", "make_decoy", "privatize_decoy",
    "privatize_paper", "project_affine_box", "projector", "quantize_harmless", "Tiling", "tiling",
]
