"""Shared pieces of the paper's experiments: perturbations of a given RMS magnitude,
output RMSE, accuracy, markdown tables, figure saving (atomic)."""

from __future__ import annotations

import math
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from harmless.cache import atomic_write_text
from harmless.linalg.subspace import HarmlessSubspace, least_harmful
from harmless.metrics import accuracy  # also re-exported for the experiments
from harmless.plotting import save_figure  # noqa: F401  (re-exported for the experiments)

#: The paper's magnitudes: epsilon, 2 epsilon, ..., 32 epsilon (RMS per input entry).
MULTIPLIERS = (1, 2, 4, 8, 16, 32)
#: epsilon, as an RMS per pixel in [0, 1] image units.
EPSILON = 0.1

PerturbFn = Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]


def rms_scale(delta: torch.Tensor, rms: float) -> torch.Tensor:
    """Rescale each sample of ``delta`` to RMS ``rms`` (``||d|| / sqrt(n) == rms``)."""
    flat = delta.reshape(delta.shape[0], -1)
    norms = flat.norm(dim=1).clamp_min(torch.finfo(delta.dtype).tiny)
    factor = rms * math.sqrt(flat.shape[1]) / norms
    return delta * factor.view(-1, *([1] * (delta.ndim - 1)))


def gaussian(x: torch.Tensor, rms: float, gen: torch.Generator) -> torch.Tensor:
    """i.i.d. ``N(0, rms^2)`` noise per entry."""
    return torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype) * rms


def harmless_perturbation(space: HarmlessSubspace) -> PerturbFn:
    """Random harmless perturbations of RMS ``rms``, a fresh direction per sample."""
    def fn(x: torch.Tensor, rms: float, gen: torch.Generator) -> torch.Tensor:
        return rms_scale(space.sample(x.shape[0], generator=gen).to(x.dtype), rms)
    return fn


def least_harmful_perturbation(model: nn.Module, input_shape: Sequence[int], k: int = 8) -> tuple[PerturbFn, float]:
    """Perturbations along a random combination of the ``k`` least harmful directions
    (random signs and weights), of RMS ``rms``; also returns the largest gain used."""
    vecs, gains = least_harmful(model, input_shape, k=k)

    def fn(x: torch.Tensor, rms: float, gen: torch.Generator) -> torch.Tensor:
        coef = torch.randn(x.shape[0], vecs.shape[0], generator=gen, dtype=torch.float64).to(vecs.dtype)
        d = (coef @ vecs.reshape(vecs.shape[0], -1)).reshape(x.shape[0], *vecs.shape[1:])
        return rms_scale(d.to(x.dtype), rms)
    return fn, float(gains.max())


@torch.no_grad()
def prediction_changes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[torch.Tensor], str]:
    """A formatter for Table 2's Δacc column: the accuracy lost on ``images`` against ``(x, y)``,
    and how many predictions differ from the model's on ``x``."""
    with torch.no_grad():
        base_pred = model(x).argmax(1)
    base = accuracy(model, x, y)

    def changes(images: torch.Tensor) -> str:
        with torch.no_grad():
            changed = int((model(images).argmax(1) != base_pred).sum())
        return f"{100 * (base - accuracy(model, images, y)):.2f}% ({changed} changed)"

    return changes


def batched_outputs(model: nn.Module, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """``model(x)`` in batches."""
    return torch.cat([model(x[i:i + batch]) for i in range(0, x.shape[0], batch)])


@torch.no_grad()
def output_rmse(model: nn.Module, x: torch.Tensor, delta: torch.Tensor, clean: torch.Tensor | None = None,
                batch: int = 500) -> float:
    """The paper's RMSE: ``E_x[ ||f(x + d) - f(x)|| / sqrt(n_out) ]``."""
    clean = batched_outputs(model, x, batch) if clean is None else clean
    pert = batched_outputs(model, x + delta, batch)
    diff = (pert - clean).reshape(x.shape[0], -1)
    return float((diff.norm(dim=1) / math.sqrt(diff.shape[1])).mean())


@dataclass
class Table:
    """A markdown table builder."""

    header: list[str]
    rows: list[list[str]]

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.header) + " |", "|" + "|".join("---" for _ in self.header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines) + "\n"


def provenance(command: str) -> str:
    """A footer saying how a results file was made."""
    return (f"\nMade by `{command}` (harmless, torch {torch.__version__}, Python "
            f"{platform.python_version()}, {platform.machine()}, {sys.platform}).\n")


def save_text(text: str, path: Path) -> Path:
    """Write a text/markdown file atomically."""
    return atomic_write_text(path, text)


def fmt(x: float) -> str:
    """Numbers as the paper prints them: 4 decimals, or scientific when tiny."""
    if x == 0:
        return "0"
    if abs(x) < 1e-3:
        return f"{x:.2e}"
    return f"{x:.4f}"


