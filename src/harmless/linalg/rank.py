"""The rank of a linear operator, and so the dimension of its nullspace (Theorem 1:
``dim = n - rank(A)``), by the cheapest method that is exact for it.

Methods (``method="auto"`` uses the cheapest exact one that applies: disjoint-window
structure, the sweep certificate for a convolution whose Gram matrix would be large, then
the Cholesky certificate, then a dense SVD, then the Gram eigenvalues):

``dense-svd``
    The matrix is built (``m * n`` up to a limit) and its singular values computed with
    LAPACK; the rank counts singular values above ``sigma_max * max(m, n) * eps`` (NumPy's
    ``matrix_rank`` rule). Also yields orthonormal bases of the row space and the nullspace.
``gram-cholesky``
    With ``G`` the smaller Gram matrix (``A^T A`` if ``m >= n``, else ``A A^T``): a Cholesky
    factorisation of ``G - tol I`` exists exactly when every eigenvalue exceeds ``tol`` (the
    threshold below), which certifies full rank far more cheaply than an SVD.
``gram-eigh``
    Eigenvalues of the smaller Gram matrix, thresholded at ``lambda_max * size * eps * 100``
    (squaring the matrix halves the usable precision, so the threshold is wider; the gap
    between kept and dropped values is reported).
``sweep-certificate``
    For a zero-padded convolution whose smaller side exceeds ``SWEEP_BEFORE_GRAM`` (or the
    Gram limit): the matrix is block triangular when the windows are swept in order, so the
    ranks of a handful of small diagonal blocks bound its rank from below; when that bound
    meets ``min(m, n_read)`` the rank is exact (:mod:`harmless.linalg.conv_certificate`).
    ResNet's 7x7/s2/p3 stem at 224 px is certified injective this way in milliseconds.
    When it does not meet, the routes below run as if the sweep had not been tried.
``structure``
    Composition with bijections (BatchNorm, Normalize, reshapes) keeps the dimension, so
    only the one non-bijective factor is analysed. A convolution whose windows do not
    overlap (effective kernel <= stride, zero padding) is block diagonal: one small block
    per output position, so the rank is a sum of ranks of sub-matrices of the kernel matrix,
    and input pixels no window reads are harmless outright.
Corollary 1 of the paper (``dim = n - m`` for a wide convolution with kernel >= stride and
linearly independent kernels) is checked by :func:`corollary1_conditions` but never taken
as the answer: its conditions are not sufficient (kernels that are shifts of one another
keep the rows dependent). It is reported beside the exact figure.
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
    TokenwiseMatrixOperator,
    TorchLinearOperator,
)

#: Largest ``n`` for which the ``n x n`` Gram matrix is formed and eigen-decomposed.
DEFAULT_GRAM_LIMIT = 12_288
#: Above this smaller side (or above the Gram limit), a convolution is offered to the sweep
#: certificate before any Gram matrix is formed: the sweep takes milliseconds at any size,
#: a Cholesky factorisation of a Gram matrix of side s about s^3 / 3 flops (a minute at the
#: Gram limit). Below it the Gram route is as cheap and is kept.
SWEEP_BEFORE_GRAM = 2_048


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


def svd_rank(sv: np.ndarray, m: int, n: int) -> int:
    """Singular values (descending) above ``sigma_max * max(m, n) * eps``: NumPy's
    ``matrix_rank`` rule, the one every dense rank in ``harmless`` uses."""
    if not sv.size:
        return 0
    return int(np.sum(sv > sv[0] * max(m, n) * np.finfo(np.float64).eps))


def _reduced_matrix(op: TorchLinearOperator, limit: int) -> np.ndarray:
    """The float64 matrix of ``op``; a tall one reduced to its ``n x n`` triangular factor ``R``
    (same singular values and right singular vectors, a fraction of the SVD's cost)."""
    if op.dtype != torch.float64:
        op = op.astype(torch.float64)
    a = op.to_dense(limit=limit).to("cpu", torch.float64).numpy()
    if a.shape[0] > a.shape[1]:
        a = scipy.linalg.qr(a, mode="r", overwrite_a=True, check_finite=False)[0][: a.shape[1]]
    return a


def dense_svd_rank(op: TorchLinearOperator, *, limit: int = DEFAULT_DENSE_LIMIT, bases: bool = True) -> RankResult:
    """Rank, singular values and (optionally) orthonormal bases from the SVD of the matrix."""
    m, n = op.m, op.n
    a = _reduced_matrix(op, limit)
    if bases:
        # One SVD with all n right singular vectors: the last n - rank span the nullspace.
        _, sv, vt = scipy.linalg.svd(a, full_matrices=True, lapack_driver="gesdd", check_finite=False)
    else:
        sv, vt = scipy.linalg.svd(a, compute_uv=False, lapack_driver="gesdd", check_finite=False), None
    rank = svd_rank(sv, m, n)
    full_sv = np.zeros(n)
    full_sv[: sv.size] = sv
    result = RankResult(n=n, m=m, rank=rank, method="dense-svd", singular_values=full_sv, gap=_gap(full_sv, rank))
    if vt is not None:
        result.row_basis = vt[:rank] if rank < n else None  # injective: the row space is everything
        result.null_basis = vt[rank:]
    return result


def right_singular_vectors(op: TorchLinearOperator, *, limit: int = DEFAULT_DENSE_LIMIT
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Singular values (descending) and the matching right singular vectors (rows) of the
    matrix, ``min(m, n)`` of each."""
    _, sv, vt = scipy.linalg.svd(_reduced_matrix(op, limit), full_matrices=False, lapack_driver="gesdd",
                                 check_finite=False)
    return sv, vt


def gram_tol(lam_max: float, size: int) -> float:
    """The eigenvalue threshold for Gram matrices (wider than :func:`svd_rank`'s: squaring
    the matrix halves the usable precision)."""
    return lam_max * size * np.finfo(np.float64).eps * 100


def _small_gram(op: TorchLinearOperator) -> np.ndarray:
    """``A^T A`` (n x n) for a tall operator, ``A A^T`` (m x m) for a wide one: both have the
    rank of ``A`` and the smaller one is the cheaper to factorise."""
    g = op.to_gram() if op.m >= op.n else op.to_cogram()
    return g.to("cpu", torch.float64).numpy()


def _full_rank_certificate(op: TorchLinearOperator, gram: np.ndarray | None = None) -> RankResult | None:
    """``rank = min(m, n)`` if a Cholesky factorisation of ``G - tol I`` exists for the smaller
    Gram matrix ``G`` (so every eigenvalue lies above the threshold that the eigenvalue count
    would use), else ``None``; a fraction of the cost of an SVD or eigendecomposition."""
    g = _small_gram(op) if gram is None else gram
    size = g.shape[0]
    lam_max_bound = float(np.abs(g).sum(axis=0).max())  # ||G||_1 >= lambda_max
    if lam_max_bound == 0.0:
        return None
    try:
        scipy.linalg.cholesky(g - gram_tol(lam_max_bound, size) * np.eye(size), lower=True, check_finite=False)
    except np.linalg.LinAlgError:
        return None
    side = "A^T A" if op.m >= op.n else "A A^T"
    return RankResult(n=op.n, m=op.m, rank=size, method="gram-cholesky",
                      notes=[f"full rank certified by a Cholesky factorisation of {side} - tol I"])


def gram_rank(op: TorchLinearOperator, *, limit: int = DEFAULT_GRAM_LIMIT, bases: bool = True) -> RankResult:
    """Rank from the eigenvalues of the smaller Gram matrix (see the module docstring for
    the threshold). Bases (from ``A^T A``'s eigenvectors) only for tall operators."""
    if min(op.m, op.n) > limit:
        raise TooLargeError(f"the Gram matrix would be {min(op.m, op.n)} x {min(op.m, op.n)}, above the limit {limit}")
    g = _small_gram(op)
    want_vectors = bases and op.m >= op.n
    if not bases:
        certified = _full_rank_certificate(op, gram=g)
        if certified is not None:
            return certified
    if want_vectors:
        lam, vec = scipy.linalg.eigh(g, check_finite=False)
        lam, vec = lam[::-1], vec[:, ::-1]
    else:
        lam, vec = scipy.linalg.eigh(g, eigvals_only=True, check_finite=False)[::-1], None
    tol = gram_tol(max(float(lam[0]), 0.0), g.shape[0])
    rank = int(np.sum(lam > tol))
    sv = np.zeros(op.n)
    sv[: lam.size] = np.sqrt(np.clip(lam, 0.0, None))[: op.n]
    result = RankResult(n=op.n, m=op.m, rank=rank, method="gram-eigh", singular_values=sv, gap=_gap(sv, rank))
    if vec is not None:
        result.row_basis = vec[:, :rank].T.copy()
        result.null_basis = vec[:, rank:].T.copy()
        result.notes.append("bases from the Gram matrix carry ~sqrt(eps) error; projections use CGLS")
    return result


def _non_bijective_core(op: TorchLinearOperator) -> TorchLinearOperator | None:
    """The factor of a composition that decides its nullspace: the first one that is not a
    bijection, provided every later factor is injective (``N(B A) = N(A)`` for injective
    ``B``, and ``dim N(A C) = dim N(A)`` for bijective ``C``). None if there is none."""
    factors = op.factors if isinstance(op, ComposedOperator) else [op]
    rest = [i for i, f in enumerate(factors) if not f.bijective]
    if not rest:
        return None
    i = rest[0]
    return factors[i] if all(f.injective for f in factors[i + 1:]) else None


def _core_rank(core: TorchLinearOperator, dense_limit: int) -> tuple[int, list[str]] | None:
    """The exact rank of a structured core, or None when its structure gives none."""
    if core.injective:
        return core.n, ["an injective map (an embedding)"]
    if isinstance(core, ConvOperator) and conv_windows_disjoint(core):
        blocks = patchwise_conv_rank(core)  # exact and nearly free
        return blocks.rank, blocks.notes
    if isinstance(core, TokenwiseMatrixOperator) and core.matrix.numel() <= dense_limit:
        w = core.matrix.detach().to("cpu", torch.float64).numpy()
        sv = scipy.linalg.svd(w, compute_uv=False, lapack_driver="gesdd", check_finite=False)
        r = svd_rank(sv, *w.shape)
        return core.positions * r, [f"token-wise matrix: {core.positions} positions x rank {r} of the "
                                    f"{w.shape[0]} x {w.shape[1]} weight"]
    return None


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
    import itertools
    from collections import Counter

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
        seen: set[int] = set()
        for o, taps in rows:
            seen.update(o * op.stride[i] - op._pad_lr[i][0] + t * op.dilation[i] for t in taps)
        if len(seen) < op.in_shape[1 + i]:
            return False
    return True


def corollary1_conditions(op: ConvOperator) -> list[str]:
    """The conditions of the paper's Corollary 1 that ``op`` fails (empty: all hold).

    When they hold, Corollary 1 predicts ``dim = n - m``. They are not sufficient (kernels
    that are shifts of one another keep the rows dependent), so the engine never takes the
    prediction as the answer: it is reported beside an exact rank, or as the reason a layer
    too large for an exact rank probably has ``dim = n - m``.
    """
    failed = []
    if op.n <= op.m:
        failed.append(f"n = {op.n} <= m = {op.m}")
    if op.padding_mode != "zeros":
        failed.append(f"padding_mode {op.padding_mode!r} (the corollary assumes zero padding)")
    if any(op.dilation[i] * (op.kernel_size[i] - 1) + 1 < op.stride[i] for i in range(op.d)):
        failed.append("kernel smaller than stride")
    if not _pixels_covered(op):
        failed.append("some input pixels are read by no window")
    kmat = op.kernel_matrix().to("cpu", torch.float64).numpy()
    if np.linalg.matrix_rank(kmat) < kmat.shape[0]:
        failed.append("the vectorised kernels are linearly dependent")
    # Not in the paper: with zero padding a border window reads fewer real inputs; when they
    # are fewer than the kernels, that window's rows are dependent whatever the weights.
    fewest = op.in_shape[0] // op.groups * int(np.prod([min(len(t) for _, t in rows) for rows in _window_taps(op)]))
    per_group = op.weight.shape[0] // op.groups
    if fewest < per_group:
        failed.append(f"border windows read only {fewest} inputs for {per_group} kernels (zero padding)")
    return failed


def analyze_rank(op: TorchLinearOperator, *, method: str = "auto", dense_limit: int = DEFAULT_DENSE_LIMIT,
                 gram_limit: int = DEFAULT_GRAM_LIMIT, bases: bool = True) -> RankResult:
    """The rank of ``op`` by ``method`` (``auto``, ``dense``, ``gram`` or ``structure``).

    Ranks are always computed in float64 on a float64 copy of the operator: a float32
    layer's weights are exact float64 numbers, and its rank is the rank of that matrix
    (float32 round-off would otherwise turn zero singular values into 1e-8).
    """
    if method not in ("auto", "dense", "gram", "structure"):
        raise ValueError(f"unknown method {method!r}; choose auto, dense, gram or structure")
    if op.dtype != torch.float64:
        op = op.astype(torch.float64)
    if method == "dense":
        return dense_svd_rank(op, limit=dense_limit, bases=bases)
    if method == "gram":
        return gram_rank(op, limit=gram_limit, bases=bases)
    if method == "auto" and isinstance(op, MatrixOperator):
        return dense_svd_rank(op, limit=max(dense_limit, op.m * op.n), bases=bases)
    if method == "auto" and bases and op.m * op.n <= dense_limit:
        return dense_svd_rank(op, limit=dense_limit, bases=True)
    if op.bijective:
        return RankResult(n=op.n, m=op.m, rank=op.n, method="structure", notes=["a bijection"])
    core = _non_bijective_core(op)
    structured = _core_rank(core, dense_limit) if core is not None else None
    if structured is not None:
        rank, notes = structured
        note = [] if core is op else [f"rank of the one factor that decides the nullspace ({type(core).__name__}); "
                                      "the others are bijections before it or injective maps after it"]
        return RankResult(n=op.n, m=op.m, rank=op.n - (core.n - rank), method="structure",  # type: ignore[union-attr]
                          notes=note + notes)
    small_side = min(op.m, op.n)
    sweep = None
    if isinstance(core, ConvOperator) and small_side > min(gram_limit, SWEEP_BEFORE_GRAM):
        # The sweep certificate decides a large zero-padded convolution (ResNet's 7x7/s2 stem
        # at 224 px) from a handful of small SVDs, in milliseconds; a Gram matrix of side s
        # costs s applications of the operator and s^3 / 3 flops to factorise.
        from harmless.linalg.conv_certificate import sweep_certificate  # it imports svd_rank from here

        sweep = sweep_certificate(core)
        if sweep.rank is not None:
            note = [] if core is op else ["rank of the one factor that decides the nullspace (ConvOperator); "
                                          "the others are bijections before it or injective maps after it"]
            return RankResult(n=op.n, m=op.m, rank=op.n - (core.n - sweep.rank), method="sweep-certificate",
                              notes=note + sweep.notes)
    if small_side <= gram_limit:
        certified = _full_rank_certificate(op)
        if certified is not None:
            return certified
    if method == "auto" and op.m * op.n <= dense_limit:
        return dense_svd_rank(op, limit=dense_limit, bases=bases)
    if small_side <= gram_limit:
        return gram_rank(op, limit=gram_limit, bases=False)
    prediction = ""
    if isinstance(core, ConvOperator):
        failed = corollary1_conditions(core)
        prediction = (f"; Corollary 1's conditions hold, so dim = n - m = {op.n - op.m} is likely but not certified"
                      if not failed else f"; Corollary 1 does not apply ({'; '.join(failed)})")
        if sweep is not None:
            prediction += f"; the sweep certificate does not apply ({sweep.reason})"
            if sweep.unread:
                entries = "entry is" if sweep.unread == 1 else "entries are"
                prediction += f"; {sweep.unread:,} input {entries} read by no window, so dim >= {sweep.unread:,}"
    raise TooLargeError(f"no exact rank method fits this {op.m} x {op.n} operator: its matrix exceeds the dense "
                        f"limit {dense_limit:,} and its Gram matrices the limit {gram_limit:,}{prediction}")
