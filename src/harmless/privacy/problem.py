"""The dense data every privacy computation on one harmless subspace needs, built once.

A :class:`PrivacyProblem` holds the linear prefix ``A`` as a float64 matrix and orthonormal
bases of its row space and nullspace, taken from the subspace's own factorisation
(:attr:`HarmlessSubspace.factorization <harmless.linalg.subspace.HarmlessSubspace.factorization>`)
when it has one. Building it costs a dense matrix and possibly an SVD, so it is made once per
subspace and kept by whoever uses it: pass one problem to many privatisers and attacks, or let
each configured object keep its own (:class:`ProblemCache`, weakly keyed by the subspace, so a
subspace that is dropped takes its dense data with it).

The checks shared by the privatisers and the audit attacks also live here: solver settings and
image batches in their bounds (scalar settings are checked by :mod:`harmless.validation`).
"""

from __future__ import annotations

import weakref
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import torch

from harmless import validation
from harmless.errors import InputError, NoHarmlessSubspaceError, TooLargeError
from harmless.linalg.subspace import HarmlessSubspace

if TYPE_CHECKING:
    from harmless.privacy.matrix_free import MatrixFreeProblem

__all__ = ["Bounds", "Configured", "PrivacyProblem", "ProblemCache", "box_violation", "check_solver"]

#: Pixel bounds ``(lo, hi)``, ``lo < hi``: the box every privatised image stays in.
Bounds = tuple[float, float]

#: How far outside the bounds a pixel may be, relative to ``hi - lo`` (round-off of the exact
#: projections).
EPS_BOX = 1e-12


class PrivacyProblem:
    """Dense float64 data of one subspace's linear prefix, on the CPU.

    ``matrix``: ``A`` as ``(m, n)``; ``row`` ``(r, n)`` and ``null`` ``(d, n)``: orthonormal bases
    of the row space and of ``N(A)``; ``norm``: ``||A||_2``. ``harmful(v)`` = ``(I - P) v``,
    ``harmless(v)`` = ``P v`` and ``apply(v)`` = ``A v`` for flat batches ``(B, n)``.

    Raises :class:`~harmless.errors.NoHarmlessSubspaceError` when the prefix is injective (nothing
    to hide behind) and :class:`~harmless.errors.TooLargeError` when ``A`` is too large to be
    dense (a patchify stem can then be solved tile by tile: :func:`harmless.privacy.tiling`).
    The problem keeps no reference to the subspace, so caches keyed weakly by it can let go.
    """

    def __init__(self, space: HarmlessSubspace) -> None:
        if not isinstance(space, HarmlessSubspace):
            raise InputError(f"space must be a HarmlessSubspace, got {type(space).__name__}")
        self.input_shape: tuple[int, ...] = tuple(space.input_shape)
        self.n = int(space.ambient_dim)
        dense = space.operator.to_dense()
        self.matrix = torch.as_tensor(dense).detach().to(dtype=torch.float64, device="cpu").reshape(-1, self.n)
        dim = space.known_dim
        if dim is None:
            raise TooLargeError(f"the rank of the linear prefix ({self.matrix.shape[0]} x {self.n}) cannot be found "
                                "exactly, so the dense privacy solver cannot be used; a patchify stem can be solved "
                                "tile by tile (harmless.privacy.tiling)")
        rank = self.n - int(dim)
        if rank >= self.n:
            if space.dim_is_lower_bound:
                raise NoHarmlessSubspaceError(
                    f"no harmless subspace found (rank {rank} of {self.n} inputs), but the linear run stopped early "
                    "(see space.run), so this does not show that the model is injective: nothing can be hidden "
                    "with what the analysis found")
            raise NoHarmlessSubspaceError(
                f"the linear prefix is injective (rank {rank} of {self.n} inputs): nothing can be hidden")
        fact = space.factorization  # the subspace's own dense SVD, when it made one: reuse it
        if fact is not None and fact.row_basis is not None and fact.null_basis is not None \
                and fact.row_basis.shape[0] == rank:
            self.row = torch.as_tensor(fact.row_basis, dtype=torch.float64).reshape(rank, self.n).contiguous()
            self.null = torch.as_tensor(fact.null_basis, dtype=torch.float64).reshape(-1, self.n).contiguous()
            sv = torch.as_tensor(fact.singular_values, dtype=torch.float64)
        else:
            _, sv, vt = torch.linalg.svd(self.matrix, full_matrices=True)
            self.row = vt[:rank].contiguous()
            self.null = vt[rank:].contiguous()
        self.rank = rank
        self.dim = self.n - rank
        self.norm = float(sv[0]) if sv.numel() else 0.0  # ||A||_2 from the SVD at hand, not a second one

    def __repr__(self) -> str:
        return f"PrivacyProblem(input_shape={self.input_shape}, rank={self.rank}, dim={self.dim})"

    def harmful(self, v: torch.Tensor) -> torch.Tensor:
        """``(I - P) v`` for ``v`` of shape ``(B, n)``, through whichever basis is smaller."""
        if self.rank <= self.dim:
            return (v @ self.row.T) @ self.row
        return v - (v @ self.null.T) @ self.null

    def harmless(self, v: torch.Tensor) -> torch.Tensor:
        """``P v`` for ``v`` of shape ``(B, n)``."""
        if self.dim <= self.rank:
            return (v @ self.null.T) @ self.null
        return v - (v @ self.row.T) @ self.row

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """``A v`` for ``v`` of shape ``(B, n)`` (the output change of the linear prefix)."""
        return v @ self.matrix.T

    @cached_property
    def gram(self) -> torch.Tensor:
        """``A^T A`` ``(n, n)``, for the greedy 8-bit rounding (made on first use, then kept)."""
        return self.matrix.T @ self.matrix


class ProblemCache:
    """The :class:`PrivacyProblem` of each subspace a configured object is called on, made on the
    first call and reused after. Keyed weakly by the subspace object (not by ``id()``, which
    Python reuses once an object is gone). A :class:`PrivacyProblem` passed in is used as is."""

    def __init__(self) -> None:
        self._problems: weakref.WeakKeyDictionary[HarmlessSubspace, PrivacyProblem] = weakref.WeakKeyDictionary()
        self._matrix_free: weakref.WeakKeyDictionary[HarmlessSubspace, MatrixFreeProblem] = \
            weakref.WeakKeyDictionary()

    def matrix_free(self, space: HarmlessSubspace) -> MatrixFreeProblem:
        """The :class:`~harmless.privacy.matrix_free.MatrixFreeProblem` of ``space``, made once."""
        from harmless.privacy.matrix_free import MatrixFreeProblem  # it imports this module

        found = self._matrix_free.get(space)
        if found is None:
            found = self._matrix_free[space] = MatrixFreeProblem(space)
        return found

    def __call__(self, space: HarmlessSubspace | PrivacyProblem) -> PrivacyProblem:
        if isinstance(space, PrivacyProblem):
            return space
        if not isinstance(space, HarmlessSubspace):
            raise InputError(f"space must be a HarmlessSubspace or a PrivacyProblem, got {type(space).__name__}")
        problem = self._problems.get(space)
        if problem is None:
            problem = self._problems[space] = PrivacyProblem(space)
        return problem


class Configured:
    """Base of the configured objects (privatisers, attacks, ...): settings are attributes set
    (and checked) by the constructor; the dense data of each subspace a call sees are kept in a
    :class:`ProblemCache`."""

    bounds: Bounds

    def __init__(self) -> None:
        self._problems = ProblemCache()

    def problem(self, space: HarmlessSubspace | PrivacyProblem) -> PrivacyProblem:
        """The dense data of ``space``, made on the first call with it and kept."""
        return self._problems(space)

    def solver_problem(self, space: HarmlessSubspace | PrivacyProblem) -> PrivacyProblem | MatrixFreeProblem:
        """The dense data of ``space`` when they fit, else (where the dense path raises
        :class:`~harmless.errors.TooLargeError`) the data of the matrix-free projection
        (:mod:`harmless.privacy.matrix_free`), made once per subspace and kept; when neither
        applies, the dense path's error, with the matrix-free one's reason added."""
        try:
            return self._problems(space)
        except TooLargeError as dense_error:
            if not isinstance(space, HarmlessSubspace):
                raise
            try:
                return self._problems.matrix_free(space)
            except TooLargeError as err:
                raise TooLargeError(f"{dense_error}; the matrix-free solver does not apply either: {err}") from err

    def __repr__(self) -> str:
        settings = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        args = ", ".join(f"{k}={'<tensor>' if isinstance(v, torch.Tensor) else repr(v)}" for k, v in settings.items())
        return f"{type(self).__name__}({args})"


# ---------------------------------------------------------------------------------------------
# Checks.


def check_solver(tol: object, max_iter: object) -> tuple[float, int]:
    """The settings of the interior-point projection: ``tol`` > 0, ``max_iter`` a positive int."""
    return validation.positive_number(tol, "tol"), validation.positive_int(max_iter, "max_iter")


def format_bounds(bounds: Bounds) -> str:
    """``"[0, 1]"``: the bounds as messages write them."""
    return f"[{bounds[0]:g}, {bounds[1]:g}]"


def checked_images(problem: PrivacyProblem | MatrixFreeProblem, x: object, what: str = "x", *,
                   bounds: Bounds | None = None) -> torch.Tensor:
    """A validated float64 copy of a batch ``(B, *input_shape)`` (a single image is accepted);
    with ``bounds``, its values must lie in them (up to :data:`EPS_BOX` of the width)."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.asarray(x))
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise InputError(f"{what} must be a floating-point tensor"
                         + (f" in {format_bounds(bounds)}" if bounds is not None else "") + f", got {x.dtype}")
    shape = problem.input_shape
    if tuple(x.shape) == shape:
        x = x.unsqueeze(0)
    if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape:
        hint = ""
        if len(shape) == 3 and x.ndim == 4 and tuple(x.shape[2:]) == shape[1:] and x.shape[1] != shape[0]:
            kinds = {1: "grayscale", 3: "RGB"}
            hint = (f" ({kinds.get(int(x.shape[1]), f'{x.shape[1]}-channel')} images for a model that takes "
                    f"{kinds.get(shape[0], f'{shape[0]}-channel')} input)")
        raise InputError(f"{what} must have shape (B, {', '.join(map(str, shape))}), got {tuple(x.shape)}{hint}")
    if x.shape[0] == 0:
        raise InputError(f"{what} is an empty batch")
    if not bool(torch.isfinite(x).all()):
        raise InputError(f"{what} contains non-finite values (nan or inf)")
    out = x.detach().to(dtype=torch.float64, device="cpu").clone()
    if bounds is not None:
        lo, hi = bounds
        slack = EPS_BOX * (hi - lo)
        if float(out.min()) < lo - slack or float(out.max()) > hi + slack:
            raise InputError(f"{what} must have values in {format_bounds(bounds)} (got range "
                             f"[{float(out.min()):.4g}, {float(out.max()):.4g}])")
    return out


def box_violation(y: torch.Tensor, bounds: Bounds = (0.0, 1.0)) -> torch.Tensor:
    """Per sample ``max(0, lo - y, y - hi)`` over pixels."""
    lo, hi = bounds
    flat = y.reshape(y.shape[0], -1)
    return torch.clamp(torch.maximum(lo - flat, flat - hi), min=0.0).amax(dim=1)
