"""The rank of a linear operator, and so the dimension of its nullspace (Theorem 1:
``dim = n - rank(A)``), by the cheapest method that is exact for it.

Methods (``method="auto"`` uses the cheapest exact one that applies: disjoint-window
structure, then the Cholesky certificate, then a dense SVD, then the other structural
routes):

``dense-svd``
    The matrix is built (``m * n`` up to a limit) and its singular values computed with
    LAPACK; the rank counts singular values above ``sigma_max * max(m, n) * eps`` (NumPy's
    ``matrix_rank`` rule). Also yields orthonormal bases of the row space and the nullspace.
``gram-cholesky``
    For a tall operator (``m >= n``) asked only for its rank: a Cholesky factorisation of
    ``A^T A - tol I`` exists exactly when every eigenvalue exceeds ``tol`` (the threshold
    below), which certifies full column rank (``dim = 0``) far more cheaply than an SVD.
``gram-eigh``
    For tall operators (``m > n``) whose matrix is too big but whose ``n x n`` Gram matrix
    ``A^T A`` is not: eigenvalues of the Gram matrix, thresholded at
    ``lambda_max * n * eps * 100`` (squaring the matrix halves the usable precision, so the
    threshold is wider; the gap between kept and dropped values is reported).
``structure``
    Composition with bijections (BatchNorm, Normalize, reshapes) keeps the dimension, so
    only the one non-bijective factor is analysed. A convolution whose windows do not
    overlap (effective kernel <= stride, zero padding) is block diagonal: one small block
    per output position, so the rank is a sum of ranks of sub-matrices of the kernel matrix,
    and input pixels no window reads are harmless outright.
``corollary1``
    The paper's Corollary 1 for a wide convolution (``n > m``): kernel >= stride, every input
    pixel read by some window, linearly independent kernels. These conditions do not by
    themselves guarantee full row rank (kernels that are shifts of one another break it), so
    full row rank is then certified numerically: Lanczos on ``A A^T`` must find its smallest
    eigenvalue clearly above zero. Only then is ``dim = n - m`` returned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
import torch

from harmless.errors import TooLargeError
from harmless.linalg.operators import (
    DEFAULT_DENSE_LIMIT,
    ComposedOperator,
    ConvOperator,
    MatrixOperator,
    TorchLinearOperator,
)

#: Largest ``n`` for which the ``n x n`` Gram matrix is formed and eigen-decomposed.
DEFAULT_GRAM_LIMIT = 12_288


@dataclass
class RankResult:
    """The rank of an operator and how it was obtained.

    ``row_basis`` (``rank x n``) and ``null_basis`` (``(n - rank) x n``) are orthonormal
    rows, present when a dense method ran. ``singular_values`` are descending. ``gap`` is
    the ratio of the smallest singular value counted in the rank to the largest one not
    counted (``inf`` when none was dropped): the larger, the clearer the decision.
    """

    n: int
    m: int
    rank: int
    method: str
    singular_values: np.ndarray | None = None
    row_basis: np.ndarray | None = None
    null_basis: np.ndarray | None = None
    gap: float = math.inf
    notes: list[str] = field(default_factory=list)

    @property
    def dim(self) -> int:
        """Dimension of the nullspace, ``n - rank``."""
        return self.n - self.rank


def _gap(sv: np.ndarray, rank: int) -> float:
    if rank == 0 or rank >= len(sv) or sv[rank] == 0:
        return math.inf
    return float(sv[rank - 1] / sv[rank])


def dense_svd_rank(op: TorchLinearOperator, *, limit: int = DEFAULT_DENSE_LIMIT, bases: bool = True) -> RankResult:
    """Rank, singular values and (optionally) orthonormal bases from the SVD of the matrix.

    A tall matrix is first reduced to its ``n x n`` triangular factor ``R`` (same singular
    values and right singular vectors, a fraction of the cost); singular vectors are only
    computed when a nullspace exists, since an injective map needs no basis.
    """
    a = op.to_dense(limit=limit).to("cpu", torch.float64).numpy()
    m, n = a.shape
    if m > n:
        a = scipy.linalg.qr(a, mode="r", overwrite_a=True, check_finite=False)[0][:n]
    sv = scipy.linalg.svd(a, compute_uv=False, lapack_driver="gesdd", check_finite=False)
    tol = (sv[0] if sv.size else 0.0) * max(m, n) * np.finfo(np.float64).eps
    rank = int(np.sum(sv > tol))
    full_sv = np.zeros(n)
    full_sv[: sv.size] = sv
    result = RankResult(n=n, m=m, rank=rank, method="dense-svd", singular_values=full_sv, gap=_gap(full_sv, rank))
    if bases:
        if rank == n:
            result.null_basis = np.zeros((0, n))  # injective: the row space is everything
        else:
            # All n right singular vectors: the last n - rank span the nullspace.
            _, _, vt = scipy.linalg.svd(a, full_matrices=True, lapack_driver="gesdd", check_finite=False)
            result.row_basis = vt[:rank]
            result.null_basis = vt[rank:]
    return result


def _gram_tol(lam_max: float, n: int) -> float:
    return lam_max * n * np.finfo(np.float64).eps * 100


def _full_column_rank_certificate(op: TorchLinearOperator, gram: np.ndarray | None = None) -> RankResult | None:
    """``rank = n`` if a Cholesky factorisation of ``A^T A - tol I`` exists (every eigenvalue
    above the threshold the eigenvalue count would use), else ``None``: a fraction of the
    cost of an SVD or an eigendecomposition."""
    g = op.to_gram().to("cpu", torch.float64).numpy() if gram is None else gram
    lam_max_bound = float(np.abs(g).sum(axis=0).max())  # ||G||_1 >= lambda_max
    try:
        scipy.linalg.cholesky(g - _gram_tol(lam_max_bound, op.n) * np.eye(op.n), lower=True, check_finite=False)
    except np.linalg.LinAlgError:
        return None
    return RankResult(n=op.n, m=op.m, rank=op.n, method="gram-cholesky",
                      notes=["full column rank certified by a Cholesky factorisation of A^T A - tol I"])


def gram_rank(op: TorchLinearOperator, *, limit: int = DEFAULT_GRAM_LIMIT, bases: bool = True) -> RankResult:
    """Rank from the eigenvalues of ``A^T A`` (see the module docstring for the threshold).

    Without ``bases``, full column rank is first certified by a Cholesky factorisation of
    ``A^T A - tol I``: it succeeds exactly when every eigenvalue exceeds ``tol``, the same
    threshold the eigenvalue count uses, at a fraction of an eigendecomposition's cost.
    """
    if op.n > limit:
        raise TooLargeError(f"the Gram matrix would be {op.n} x {op.n}, above the limit {limit}")
    g = op.to_gram().to("cpu", torch.float64).numpy()
    if not bases:
        certified = _full_column_rank_certificate(op, gram=g)
        if certified is not None:
            return certified
        lam = scipy.linalg.eigh(g, eigvals_only=True, check_finite=False)[::-1]
        vec = None
    else:
        lam, vec = scipy.linalg.eigh(g, check_finite=False)
        lam, vec = lam[::-1], vec[:, ::-1]
    tol = _gram_tol(max(float(lam[0]), 0.0), op.n)
    rank = int(np.sum(lam > tol))
    sv = np.sqrt(np.clip(lam, 0.0, None))
    result = RankResult(n=op.n, m=op.m, rank=rank, method="gram-eigh", singular_values=sv, gap=_gap(sv, rank))
    if vec is not None:
        result.row_basis = vec[:, :rank].T.copy()
        result.null_basis = vec[:, rank:].T.copy()
        result.notes.append("bases from the Gram matrix carry ~sqrt(eps) error; projections use CGLS")
    return result


def _non_bijective_core(op: TorchLinearOperator) -> TorchLinearOperator | None:
    """The single factor of a composition that is not a bijection (None if all are)."""
    factors = op.factors if isinstance(op, ComposedOperator) else [op]
    rest = [f for f in factors if not f.bijective]
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else None


def _window_taps(op: ConvOperator) -> list[list[tuple[int, tuple[int, ...]]]]:
    """Per spatial dimension: for each output index, its valid kernel taps' input indices."""
    per_dim = []
    for i in range(op.d):
        size = op.in_shape[1 + i]
        left = op._pad_lr[i][0]
        rows = []
        for o in range(op.out_shape[1 + i]):
            taps = tuple(t for t in range(op.kernel_size[i])
                         if 0 <= o * op.stride[i] - left + t * op.dilation[i] < size)
            rows.append((o, taps))
        per_dim.append(rows)
    return per_dim


def conv_windows_disjoint(op: ConvOperator) -> bool:
    """Whether no input pixel is read by two windows (effective kernel <= stride), with zero padding."""
    return op.padding_mode == "zeros" and all(
        op.dilation[i] * (op.kernel_size[i] - 1) + 1 <= op.stride[i] for i in range(op.d))


def patchwise_conv_rank(op: ConvOperator) -> RankResult:
    """Exact rank of a convolution with disjoint windows, block by block."""
    if not conv_windows_disjoint(op):
        raise ValueError("windows overlap; patchwise rank does not apply")
    kmat = op.kernel_matrix().to("cpu", torch.float64).numpy()  # (C_out, C_in * K)
    c_in = op.in_shape[0]
    kshape = op.kernel_size
    per_dim = _window_taps(op)
    # Count output positions by the set of valid taps along each dimension.
    from collections import Counter
    import itertools

    counts: Counter[tuple[tuple[int, ...], ...]] = Counter()
    for combo in itertools.product(*[[taps for _, taps in rows] for rows in per_dim]):
        counts[combo] += 1
    rank = 0
    cache: dict[tuple[tuple[int, ...], ...], int] = {}
    for combo, count in counts.items():
        if combo not in cache:
            mask = np.zeros(kshape, dtype=bool)
            if all(combo):
                mask[np.ix_(*[list(t) for t in combo])] = True
            cols = np.tile(mask.reshape(-1), c_in)
            sub = kmat[:, cols]
            cache[combo] = int(np.linalg.matrix_rank(sub)) if sub.size else 0
        rank += cache[combo] * count
    return RankResult(n=op.n, m=op.m, rank=rank, method="structure",
                      notes=[f"disjoint windows: {len(counts)} distinct blocks"])


def _pixels_covered(op: ConvOperator) -> bool:
    for i, rows in enumerate(_window_taps(op)):
        seen = set()
        for o, taps in rows:
            seen.update(o * op.stride[i] - op._pad_lr[i][0] + t * op.dilation[i] for t in taps)
        if len(seen) < op.in_shape[1 + i]:
            return False
    return True


def corollary1_rank(op: ConvOperator, *, certify_tol: float = 1e-8, maxiter: int = 5000) -> RankResult:
    """``rank = m`` for a wide convolution meeting Corollary 1, certified by Lanczos."""
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    reasons = []
    if op.n <= op.m:
        reasons.append(f"n = {op.n} <= m = {op.m}")
    if any(op.dilation[i] * (op.kernel_size[i] - 1) + 1 < op.stride[i] for i in range(op.d)):
        reasons.append("kernel smaller than stride")
    if not _pixels_covered(op):
        reasons.append("some input pixels are read by no window")
    kmat = op.kernel_matrix().to("cpu", torch.float64).numpy()
    if np.linalg.matrix_rank(kmat) < kmat.shape[0]:
        reasons.append("the vectorised kernels are linearly dependent")
    if reasons:
        raise TooLargeError("Corollary 1 does not apply (" + "; ".join(reasons) + ") and the layer is too large "
                            "for a dense rank; raise dense_limit or analyse a smaller input")
    sigma_max = op.norm_estimate()
    a = op.to_scipy()
    aat = LinearOperator((op.m, op.m), matvec=lambda y: a.matvec(a.rmatvec(y)), dtype=np.float64)
    try:
        lam_min = float(eigsh(aat, k=1, which="SA", tol=1e-6, maxiter=maxiter, return_eigenvectors=False)[0])
    except ArpackNoConvergence as exc:
        raise TooLargeError("Corollary 1's conditions hold but Lanczos could not certify full row rank "
                            "(no convergence); analyse a smaller input for an exact dimension") from exc
    ratio = math.sqrt(max(lam_min, 0.0)) / sigma_max if sigma_max > 0 else 0.0
    if ratio <= certify_tol:
        raise TooLargeError(f"Corollary 1's conditions hold, yet sigma_min/sigma_max = {ratio:.1e}: the rows are "
                            "(nearly) dependent, so dim > n - m; analyse a smaller input for an exact dimension")
    return RankResult(n=op.n, m=op.m, rank=op.m, method="corollary1", gap=math.inf,
                      notes=[f"full row rank certified by Lanczos: sigma_min/sigma_max = {ratio:.2e}"])


def analyze_rank(op: TorchLinearOperator, *, method: str = "auto", dense_limit: int = DEFAULT_DENSE_LIMIT,
                 gram_limit: int = DEFAULT_GRAM_LIMIT, bases: bool = True) -> RankResult:
    """The rank of ``op`` by ``method`` (``auto``, ``dense``, ``gram`` or ``structure``)."""
    if method not in ("auto", "dense", "gram", "structure"):
        raise ValueError(f"unknown method {method!r}; choose auto, dense, gram or structure")
    if method == "dense":
        return dense_svd_rank(op, limit=dense_limit, bases=bases)
    if method == "gram":
        return gram_rank(op, limit=gram_limit, bases=bases)
    if method == "auto":
        if isinstance(op, MatrixOperator):
            return dense_svd_rank(op, limit=max(dense_limit, op.m * op.n), bases=bases)
        core = _non_bijective_core(op)
        if not bases and isinstance(core, ConvOperator) and conv_windows_disjoint(core):
            r = patchwise_conv_rank(core)  # exact and nearly free: no need for a dense SVD
            return RankResult(n=op.n, m=op.m, rank=r.rank, method=r.method, notes=r.notes)
        if not bases and op.m >= op.n and op.n <= gram_limit:
            certified = _full_column_rank_certificate(op)
            if certified is not None:
                return certified
        if op.m * op.n <= dense_limit:
            return dense_svd_rank(op, limit=dense_limit, bases=bases)
    # Structure: reduce to the one non-bijective factor, then use what is known of it.
    if op.bijective:
        return RankResult(n=op.n, m=op.m, rank=op.n, method="structure", notes=["a bijection"])
    core = _non_bijective_core(op)
    target = core if core is not None else op
    note = [] if target is op else [f"rank of the one non-bijective factor, {type(target).__name__}"]
    if target is not op and target.m * target.n <= dense_limit and method == "auto":
        r = dense_svd_rank(target, limit=dense_limit, bases=False)
        return RankResult(n=op.n, m=op.m, rank=r.rank, method="structure", singular_values=None, gap=r.gap,
                          notes=note + ["dense SVD of that factor"])
    if isinstance(target, ConvOperator):
        if conv_windows_disjoint(target):
            r = patchwise_conv_rank(target)
        elif target.n > target.m:
            r = corollary1_rank(target)
        elif target.n <= gram_limit:
            r = gram_rank(target, limit=gram_limit, bases=False)
        else:
            raise TooLargeError(f"{type(target).__name__} with n = {target.n} <= m = {target.m} and overlapping "
                                "windows is too large for an exact rank here")
        return RankResult(n=op.n, m=op.m, rank=r.rank, method=r.method, gap=r.gap, notes=note + r.notes)
    if method == "auto" and op.m > op.n and op.n <= gram_limit:
        return gram_rank(op, limit=gram_limit, bases=bases)
    raise TooLargeError(f"no exact rank method fits this {op.m} x {op.n} operator ({op!r}); its matrix exceeds "
                        f"the dense limit {dense_limit:,}")
