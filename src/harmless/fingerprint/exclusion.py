"""The linear algebra of fingerprints: which harmless perturbations of A are also harmless
for other models (intersections of nullspaces), and what is left to draw from.

Every prefix is an operator from the engine, scaled to unit norm (scaling never changes a
nullspace, and it keeps a model with small weights from being drowned by another's); the
intersection ``N(A1) ∩ N(A2) ∩ ...`` is the nullspace of their vertical stack
(:func:`harmless.linalg.operators.vstack`), from the engine's one dense SVD.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch
from torch import nn

from harmless import validation
from harmless.errors import InputError, NoHarmlessSubspaceError
from harmless.linalg.operators import DEFAULT_DENSE_LIMIT, TorchLinearOperator, vstack
from harmless.linalg.rank import svd_rank
from harmless.linalg.subspace import HarmlessSubspace, harmless_subspace


def unit_prefix(model: nn.Module, shape: tuple[int, ...], dense_limit: int
                ) -> tuple[HarmlessSubspace, TorchLinearOperator]:
    """A model's harmless subspace and its linear prefix scaled to unit spectral norm."""
    space = harmless_subspace(model, shape, dtype=torch.float64, dense_limit=dense_limit)
    norm = space.operator_norm
    return space, (space.operator * (1.0 / norm) if norm > 0 else space.operator)


def null_rows(ops: Sequence[TorchLinearOperator], shape: tuple[int, ...], dense_limit: int) -> np.ndarray:
    """Orthonormal rows ``(d, n)`` spanning ``N(op_1) ∩ N(op_2) ∩ ...``: the nullspace of the
    stacked operators, by the engine's dense SVD (each operator may have ``dense_limit`` entries)."""
    stacked = vstack(ops)
    space = harmless_subspace(stacked, shape, dense_limit=dense_limit * len(ops))
    return space.basis().reshape(space.dim, stacked.n).to("cpu", torch.float64).numpy()


def intersection_basis(models: Sequence[nn.Module], input_shape: Sequence[int], *,
                       dense_limit: int = DEFAULT_DENSE_LIMIT) -> torch.Tensor:
    """An orthonormal basis ``(d, *input_shape)`` of ``N(A1) ∩ N(A2) ∩ ...``, the perturbations
    harmless for every model at once: the nullspace of the stacked prefixes ``[A1; A2; ...]``
    (each scaled to unit norm first), from one float64 SVD."""
    shape = validation.shape(input_shape)
    if not models:
        raise InputError("intersection_basis needs at least one model")
    ops = [unit_prefix(m, shape, dense_limit)[1] for m in models]
    null = null_rows(ops, shape, dense_limit)
    return torch.from_numpy(np.ascontiguousarray(null)).reshape(-1, *shape)


def injective_message(space: HarmlessSubspace) -> str:
    """Why no fingerprint can be drawn from ``space``: "injective" only for a complete run."""
    m, n = space.output_dim, space.ambient_dim
    if space.dim_is_lower_bound and space.run is not None:
        # Never "injective" when the analysis merely stopped (a branch, an unknown step).
        return (f"cannot create a fingerprint: no harmless subspace was found, but the linear run stopped early "
                f"({space.run.stop_kind} at {space.run.stopped_at}: {space.run.stop_reason}), so the model may still "
                "have one that the analysis cannot see; `harmless analyze` shows the run step by step")
    return (f"cannot create a fingerprint: the model has no harmless subspace (its linear prefix maps {n} inputs "
            f"to {m} outputs injectively, so no non-zero perturbation is harmless). Fingerprints need a first "
            "linear layer with a nullspace, e.g. a fully-connected first layer narrower than the input.")




def exclusion_basis(model: nn.Module, exclude: Sequence[nn.Module], input_shape: Sequence[int], *,
                    mode: str = "joint", dense_limit: int = DEFAULT_DENSE_LIMIT,
                    ) -> tuple[torch.Tensor, list[int], int, int]:
    """An orthonormal basis of the part of ``N(A)`` a fingerprint may be drawn from.

    ``mode="joint"`` (default, the paper's ``P1 - (P1 ∩ P2)``): ``N(A) ⊖ (N(A) ∩ N(B1) ∩ N(B2)
    ∩ ...)``, the orthogonal complement within ``N(A)`` of the perturbations harmless for all
    models at once (the nullspace of the stacked matrices ``[A; B1; B2; ...]``). No non-zero
    vector of it is harmless for *every* excluded model; a random one is harmful for each Bi
    with probability 1 (``N(A) ∩ N(Bi)`` is a proper subspace of measure zero).

    ``mode="each"``: ``N(A) ⊖ (I1 + I2 + ...)`` with ``Ii = N(A) ∩ N(Bi)``: every non-zero
    vector is *guaranteed* harmful for each Bi separately, but the sum of the intersections
    often fills ``N(A)`` with two or more excluded models (for MLP-5 on MNIST each ``Ii`` has
    dimension 784 - 512 = 272 of ``dim N(A) = 528``), leaving nothing to draw from.

    Returns ``(basis (d, *input_shape), [dim Ii for each Bi], dim of the excluded subspace,
    dim N(A))``. Each prefix matrix is built densely (at most ``dense_limit`` entries).
    """
    found = exclusion(model, exclude, validation.shape(input_shape), mode, dense_limit)
    return found.basis, found.dims, found.excluded_dim, found.harmless_dim


@dataclass
class Exclusion:
    """What :func:`exclusion` computed: the basis to draw from ``(d, *shape)``, ``dim N(A) ∩ N(Bi)``
    per excluded model, the excluded dimension, ``N(A)``'s orthonormal rows ``(dim, n)``, and
    the unit-norm prefixes of A and of each Bi (for the margins)."""

    basis: torch.Tensor
    dims: list[int]
    excluded_dim: int
    null_rows: np.ndarray
    prefix: TorchLinearOperator
    excluded: list[TorchLinearOperator]

    @property
    def harmless_dim(self) -> int:
        return int(self.null_rows.shape[0])


def exclusion(model: nn.Module, exclude: Sequence[nn.Module], shape: tuple[int, ...], mode: str,
              dense_limit: int) -> Exclusion:
    """:func:`exclusion_basis` with what it computed on the way."""
    if mode not in ("joint", "each"):
        raise InputError(f"mode must be 'joint' or 'each', got {mode!r}")
    space, a = unit_prefix(model, shape, dense_limit)
    na = null_rows([a], shape, dense_limit)
    if na.shape[0] == 0:
        raise NoHarmlessSubspaceError(injective_message(space))
    ops = []
    for other in exclude:
        b = unit_prefix(other, shape, dense_limit)[1]
        if b.in_shape != a.in_shape:
            raise InputError(f"an excluded model's linear prefix takes inputs {b.in_shape}, the model's {a.in_shape}")
        ops.append(b)
    pieces = [null_rows([a, b], shape, dense_limit) for b in ops]
    dims = [int(p.shape[0]) for p in pieces]
    n = a.n
    if mode == "joint":
        if len(ops) == 1:
            s_rows = pieces[0]
        else:
            s_rows = null_rows([a, *ops], shape, dense_limit) if ops else np.zeros((0, n))
    elif sum(dims):
        stacked = np.vstack([p for p in pieces if p.shape[0]])
        # Orthonormal basis of the sum of the intersections (they may overlap): small dense
        # bases, so SciPy's SVD directly.
        u, sv, _ = scipy.linalg.svd(stacked.T, full_matrices=False, check_finite=False)
        s_rows = u[:, :svd_rank(sv, *stacked.shape)].T
    else:
        s_rows = np.zeros((0, n))
    # Work in N(A)'s coordinates: the excluded subspace S lies inside N(A), so its coordinates
    # C = S na^T have orthonormal rows, and N(A) ⊖ S is na's span of the nullspace of C.
    coords = s_rows @ na.T
    if coords.shape[0]:
        _, sv, vt = scipy.linalg.svd(coords, full_matrices=True, check_finite=False)
        keep = int(np.sum(sv > 0.5))  # singular values are exactly 1 (S inside N(A)): split at 1/2
        comp = vt[keep:]
    else:
        comp = np.eye(na.shape[0])
    basis = comp @ na
    return Exclusion(torch.from_numpy(np.ascontiguousarray(basis)).reshape(-1, *shape), dims, int(s_rows.shape[0]),
                     na, a, ops)


def relative_norms(op: TorchLinearOperator, delta: torch.Tensor) -> torch.Tensor:
    """``||op d_i|| / ||d_i||`` per perturbation (``op`` of unit norm: the relative residual)."""
    d = delta.reshape(delta.shape[0], *op.in_shape).to(op.dtype)
    return op.matvec(d).reshape(d.shape[0], -1).norm(dim=1) / d.reshape(d.shape[0], -1).norm(dim=1)


def exclusion_margin(delta: torch.Tensor, models: Sequence[nn.Module], input_shape: Sequence[int]) -> list[float]:
    """For each model B: ``min_i ||B delta_i|| / (||B|| ||delta_i||)`` over the perturbations,
    with ``B`` its linear prefix (0: some perturbation is harmless for B; ~1e-16 counts as 0)."""
    shape = validation.shape(input_shape)
    out = []
    for m in models:
        out.append(float(harmless_subspace(m, shape, dtype=torch.float64).harmful_residual(
            delta.to(torch.float64)).min()))
    return out


