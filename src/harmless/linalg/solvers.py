"""Matrix-free least squares on torch operators.

Hand-written because SciPy's ``lsqr``/``cg`` work on one NumPy vector at a time: here every
sample of a batch runs its own CGLS recursion on the operator's device and dtype, with one
operator application per iteration for the whole batch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from harmless.errors import PrecisionWarning
from harmless.linalg.operators import TorchLinearOperator


@dataclass(frozen=True)
class SolveInfo:
    """How a batched solve ended: iterations used and the worst relative residual reached."""

    iterations: int
    residual: float
    converged: bool


def _bdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.reshape(a.shape[0], -1) * b.reshape(b.shape[0], -1)).sum(dim=1)


def _bview(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.ndim - 1)))


def row_space_component(op: TorchLinearOperator, delta: torch.Tensor, *, tol: float, scale: torch.Tensor,
                        maxiter: int = 20_000, refinements: int = 3) -> tuple[torch.Tensor, SolveInfo]:
    """The orthogonal projection of ``delta`` onto the row space of ``A`` (its harmful part).

    Solves ``min ||A z - A delta||`` by CGLS started at zero: its iterates stay in the row
    space ``range(A^T)``, so it converges to the minimum-norm solution ``A^+ A delta``. It
    stops when every sample's true residual ``||A (delta - z)||`` is at most
    ``tol * scale`` (``scale`` per sample, e.g. ``||A|| * ||delta||``), restarting from the
    true residual up to ``refinements`` times to remove drift in the recursive one.
    """
    b = op.matvec(delta)
    z = torch.zeros_like(delta)
    target = tol * scale
    total = 0
    worst = float("inf")
    for _ in range(refinements + 1):
        r = b - op._matvec(z)
        res = r.reshape(r.shape[0], -1).norm(dim=1)
        worst = float((res / scale.clamp_min(torch.finfo(scale.dtype).tiny)).max()) if res.numel() else 0.0
        if bool(torch.all(res <= target)):
            return z, SolveInfo(total, worst, True)
        dz, used = _cgls(op, r, target, maxiter)
        z = z + dz
        total += used
    r = b - op._matvec(z)
    res = r.reshape(r.shape[0], -1).norm(dim=1)
    worst = float((res / scale.clamp_min(torch.finfo(scale.dtype).tiny)).max())
    converged = bool(torch.all(res <= target))
    if not converged:
        warnings.warn(f"CGLS stopped after {total} iterations at relative residual {worst:.2e} > {tol:.0e}; "
                      "the harmless part is less exact than asked", PrecisionWarning, stacklevel=3)
    return z, SolveInfo(total, worst, converged)


def _cgls(op: TorchLinearOperator, b: torch.Tensor, target: torch.Tensor, maxiter: int) -> tuple[torch.Tensor, int]:
    """Plain CGLS for ``min ||A x - b||`` from ``x = 0``, batched, with per-sample freezing."""
    s = op._rmatvec(b)
    x = torch.zeros_like(s)
    r = b.clone()
    p = s.clone()
    gamma = _bdot(s, s)
    active = r.reshape(r.shape[0], -1).norm(dim=1) > target
    it = 0
    tiny = torch.finfo(gamma.dtype).tiny
    while bool(active.any()) and it < maxiter:
        it += 1
        q = op._matvec(p)
        qq = _bdot(q, q)
        alpha = torch.where(active & (qq > tiny), gamma / qq.clamp_min(tiny), torch.zeros_like(gamma))
        x = x + _bview(alpha, x) * p
        r = r - _bview(alpha, r) * q
        s = op._rmatvec(r)
        gamma_new = _bdot(s, s)
        beta = torch.where(active & (gamma > tiny), gamma_new / gamma.clamp_min(tiny), torch.zeros_like(gamma))
        p = s + _bview(beta, p) * p
        gamma = gamma_new
        active = active & (r.reshape(r.shape[0], -1).norm(dim=1) > target) & (gamma_new > tiny)
    return x, it
