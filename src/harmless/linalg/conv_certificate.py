"""An exact rank certificate for large zero-padded convolutions, in milliseconds: the sweep.

Order the output windows (or blocks of consecutive windows per spatial dimension)
lexicographically and give each the input pixels that it reads and no earlier one read,
its *new* pixels. Put the columns of ``A`` in the same order (every channel of a pixel
together): the rows of a window then touch only its own new pixels and earlier windows'
ones, so ``A`` is block lower triangular, with one diagonal block ``P_w`` per window: the
kernel's rows restricted to the taps that land on the new pixels (``C_out * #windows`` rows,
``C_in * #new pixels`` columns). For block triangular matrices ``rank(A) >= sum_w rank(P_w)``
(a non-singular minor of every diagonal block together forms a non-singular minor of ``A``).

From above, by shapes alone: ``rank(A) <= n_read`` (the input entries no window reads are
columns of zeros), and ``rank(A) <= sum_w min(C_out * #windows, C_in * #pixels it reads)``
over any partition of the windows (a row block spans at most as many dimensions as it has
rows or reads inputs): a corner window of a 7x7/s6/p3 stem reads 4 x 4 pixels, so its 64
kernels span at most 48 dimensions. When the lower bound meets the upper one the rank is
exact: a tall stem such as ResNet's 7x7/s2/p3 -> 64 at 224 px is injective (``dim = 0``), a
dimension-reducing one has full row rank (``dim = n - m``), and one whose border windows
read fewer inputs than it has kernels has exactly the rank those windows allow.

New pixels factor over the spatial dimensions (a pixel is old exactly when, in some
dimension, an earlier window index already read its coordinate), so the diagonal blocks take
only a handful of shapes (corner, edges, interior, the last rows and columns): each is
decomposed once by an SVD, its rank counted with the tolerance every dense rank in
``harmless`` uses (``sigma > max(r, c) * eps * sigma_max``). Which sweep works depends on the
border: scan directions (``2^d``), blocks of 1 to 4 windows per dimension (a 7x7/s2 stem
without padding: a corner window reads 147 inputs for 64 kernels, a block of 2 x 2 windows
243 for 256) and a short last block merged into the one before are tried, cheapest first,
skipping without any SVD every sweep whose block shapes cannot reach the upper bound.

It proves the rank of the float64 matrix in exact arithmetic up to the tolerance of each
small SVD. It does not bound ``A``'s condition number: a certified injective ``A`` may still
have singular values that a dense SVD of the whole matrix would count as zero (a 3x3/s2/p1
convolution 1 -> 4 on 8 x 8 is square, its diagonal blocks are well conditioned, and
``sigma_min / sigma_max = 2.5e-15``: exact rank 64, NumPy's 63). Such near-harmless
directions are what :func:`harmless.least_harmful` finds. When the
bounds do not meet it proves nothing beyond them, and the caller falls back to its other
methods. Only zero padding: other padding modes reuse border pixels, which breaks the
one-tap-per-pixel structure of the blocks.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
import torch

from harmless.linalg.operators import ConvOperator
from harmless.threads import one_blas_thread

#: Largest diagonal block (entries) that is decomposed; larger ones make a scan order fail.
DEFAULT_MAX_BLOCK_ENTRIES = 4_194_304
#: Budget of SVD floating-point operations (about 10 s on one core of a busy machine).
DEFAULT_MAX_FLOPS = 1.5e11


@dataclass
class SweepCertificate:
    """The outcome of :func:`sweep_certificate`.

    ``rank`` is the exact rank when certified, else ``None`` (``reason`` says why).
    ``unread`` input entries (pixel x channel) are read by no window: they are harmless
    whatever the weights, so ``dim >= unread`` always. ``directions`` (one per spatial
    dimension: ``"forward"`` or ``"backward"``, with ``", last block merged"`` when a short
    last block joined the one before) and ``block`` (windows per block and dimension) name
    the certifying sweep; ``patterns`` is the number of distinct diagonal blocks and
    ``sigma_ratio`` the smallest ``sigma_r / sigma_max`` over the singular values they count
    (the margin over the tolerance ``max(r, c) * eps``); ``tried`` counts the sweeps looked at.
    """

    n: int
    m: int
    rank: int | None
    unread: int
    directions: tuple[str, ...] | None = None
    block: int | None = None
    patterns: int = 0
    sigma_ratio: float = math.nan
    reason: str = ""
    tried: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def certified(self) -> bool:
        return self.rank is not None

    @property
    def dim(self) -> int | None:
        """``n - rank`` when certified."""
        return None if self.rank is None else self.n - self.rank


_Blocks = tuple[Counter[bytes], dict[bytes, tuple[np.ndarray, int]], int]


def _dimension_blocks(size: int, out: int, stride: int, left: int, dilation: int, kernel: int, block: int,
                      backward: bool, merge_tail: bool) -> _Blocks:
    """One spatial dimension of the sweep: for each block of ``block`` consecutive output
    indices (in the scan direction; with ``merge_tail`` a short last block joins the one
    before it), the 0/1 tensor ``taps[a, q, t]`` (``1`` when the block's ``a``-th output reads
    its ``q``-th new input index through tap ``t``) and the number of input indices the block
    reads. Blocks with equal tensors and counts have equal diagonal blocks and bounds; returns
    their counts, the (tensor, read count) pairs and the number of input indices read at all."""
    order = np.arange(out)[::-1] if backward else np.arange(out)
    seen = np.zeros(size, dtype=bool)
    counts: Counter[bytes] = Counter()
    found: dict[bytes, tuple[np.ndarray, int]] = {}
    taps_range = np.arange(kernel) * dilation
    starts = list(range(0, out, block))
    if merge_tail and out % block and len(starts) > 1:
        starts.pop()
    for start, stop in zip(starts, starts[1:] + [out]):
        outs = np.sort(order[start:stop])
        pix = outs[:, None] * stride - left + taps_range[None, :]  # (a, kernel) input index per tap
        valid = (pix >= 0) & (pix < size)
        read = np.unique(pix[valid])
        new = read[~seen[read]]
        seen[read] = True
        taps = ((pix[:, None, :] == new[None, :, None]) & valid[:, None, :]).astype(np.float64)
        key = np.asarray((*taps.shape, read.size), dtype=np.int64).tobytes() + taps.tobytes()
        counts[key] += 1
        found.setdefault(key, (taps, int(read.size)))
    return counts, found, int(seen.sum())


@dataclass
class _Sweep:
    """One scan order and block size: its distinct diagonal blocks and two numbers,
    ``reachable`` (the most its diagonal blocks' ranks can add up to, from their shapes) and
    ``upper`` (an upper bound on ``rank(A)`` from its partition of the rows: a block of
    windows spans at most as many dimensions as it has rows or reads inputs)."""

    block: int
    backward: tuple[bool, ...]
    merged: tuple[bool, ...]
    patterns: list[tuple[tuple[bytes, ...], list[np.ndarray], int, int, int, int]]  # keys, taps, rows, cols, read, n
    reachable: int
    upper: int


def _diagonal_block(weight: np.ndarray, taps: list[np.ndarray]) -> np.ndarray:
    """``sum_t weight[o, c, t] taps[a, q, t]`` over every dimension, as a
    ``(C_out * prod a) x (C_in * prod q)`` matrix."""
    d = len(taps)
    k, a, q = "klm"[:d], "abe"[:d], "pqr"[:d]
    spec = f"oc{k}," + ",".join(f"{a[i]}{q[i]}{k[i]}" for i in range(d)) + f"->o{a}c{q}"
    sub = np.einsum(spec, weight, *taps, optimize=True)
    rows = weight.shape[0] * math.prod(t.shape[0] for t in taps)
    return sub.reshape(rows, -1)


def sweep_certificate(op: ConvOperator, *, max_block: int = 4, max_block_entries: int = DEFAULT_MAX_BLOCK_ENTRIES,
                      max_flops: float = DEFAULT_MAX_FLOPS) -> SweepCertificate:
    """The exact rank of a zero-padded convolution from a sweep over its windows, or the
    reason why no sweep tried certifies it (see the module docstring).

    Scan directions (``2^d``) and blocks of ``1..max_block`` windows per dimension are tried
    cheapest first; a sweep whose block shapes cannot reach the rank bound is skipped
    without any SVD, and distinct diagonal blocks are decided once across sweeps.
    """
    with one_blas_thread():
        return _sweep(op, max_block=max_block, max_block_entries=max_block_entries, max_flops=max_flops)


def _sweep(op: ConvOperator, *, max_block: int, max_block_entries: int, max_flops: float) -> SweepCertificate:
    from harmless.linalg.rank import svd_rank  # rank.py calls this module; import at use

    c_in = op.in_shape[0]
    spatial = op.in_shape[1:]
    outs = op.out_shape[1:]
    if op.padding_mode != "zeros":
        return SweepCertificate(op.n, op.m, None, 0, reason=f"padding_mode {op.padding_mode!r} (the sweep needs "
                                                             "zero padding)")
    weight = op.kernel_matrix().to("cpu", torch.float64).numpy().reshape(op.weight.shape[0], c_in, *op.kernel_size)
    c_out = weight.shape[0]

    # Phase 1, shapes only: every scan order and block size, and the tightest upper bound.
    sweeps: list[_Sweep] = []
    n_read = 0
    for block in range(1, max_block + 1):
        if block > 1 and all(o < block for o in outs):
            break  # every dimension already took all its windows in one block
        # A short last block can leave the border windows too few new inputs (the 7x7/s6/p3 ->
        # 64 stem at 224 px needs blocks of 3 with the last 2 merged in): try it merged into the
        # block before it first, then alone.
        merges = [(True, False) if block > 1 and o % block and o > block else (False,) for o in outs]
        for backward, merged in itertools.product(itertools.product((False, True), repeat=op.d),
                                                  itertools.product(*merges)):
            dims = [_dimension_blocks(spatial[i], outs[i], op.stride[i], op._pad_lr[i][0], op.dilation[i],
                                      op.kernel_size[i], min(block, outs[i]), backward[i], merged[i])
                    for i in range(op.d)]
            n_read = c_in * math.prod(read for _, _, read in dims)
            patterns = []
            for keys in itertools.product(*[list(counts) for counts, _, _ in dims]):
                taps = [dims[i][1][key][0] for i, key in enumerate(keys)]
                rows = c_out * math.prod(t.shape[0] for t in taps)
                cols = c_in * math.prod(t.shape[1] for t in taps)
                read = c_in * math.prod(dims[i][1][key][1] for i, key in enumerate(keys))
                count = math.prod(dims[i][0][key] for i, key in enumerate(keys))
                patterns.append((keys, taps, rows, cols, read, count))
            sweeps.append(_Sweep(block, backward, merged, patterns, sum(p[5] * min(p[2], p[3]) for p in patterns),
                                 sum(p[5] * min(p[2], p[4]) for p in patterns)))
    unread = op.n - n_read
    bound = min([n_read] + [sw.upper for sw in sweeps])  # rank(A) <= bound, exactly (shapes only)

    # Phase 2: the sweeps whose shapes can reach the bound, cheapest first; each distinct
    # diagonal block is decomposed once.
    ranks: dict[tuple[bytes, ...], tuple[int, float]] = {}  # block key -> (rank, sigma_rank / sigma_max)
    flops = 0.0
    first_reason = ""
    eps = np.finfo(np.float64).eps
    for tried, sw in enumerate(sweeps, start=1):
        reason = ""
        if sw.reachable < bound:
            # The culprit: the block whose new unknowns fall furthest short of its share of the bound.
            worst = max(sw.patterns, key=lambda p: min(p[2], p[4]) - min(p[2], p[3]))
            if worst[3] == 0:
                reason = (f"the last windows read no pixel that earlier ones did not, so their equations cannot "
                          f"add to the rank (blocks of {sw.block} window(s)): the sweep cannot reach rank {bound:,}")
            else:
                reason = (f"a diagonal block has {worst[2]} equations for {worst[3]} new unknowns (blocks of "
                          f"{sw.block} window(s)), so the sweep cannot reach rank {bound:,}")
        possible = sw.reachable  # falls as blocks turn out rank-deficient
        ratio = math.inf
        for keys, taps, rows, cols, _, count in sorted(sw.patterns, key=lambda p: p[2] * p[3]) if not reason else []:
            if cols == 0:
                continue
            if keys not in ranks:
                if rows * cols > max_block_entries:
                    reason = f"a {rows} x {cols} diagonal block is above the limit of {max_block_entries:,} entries"
                    break
                flops += 4.0 * rows * cols * min(rows, cols)
                if flops > max_flops:
                    reason = f"the SVDs would exceed the budget of {max_flops:.0e} flops"
                    break
                sv = scipy.linalg.svd(_diagonal_block(weight, taps), compute_uv=False, lapack_driver="gesdd",
                                      check_finite=False)
                r = svd_rank(sv, rows, cols)
                ranks[keys] = (r, float(sv[r - 1] / sv[0]) if r else 0.0)
            r, kept = ranks[keys]
            possible -= count * (min(rows, cols) - r)
            if possible < bound:
                low = f"sigma_min/sigma_max = {kept:.1e}" if r == min(rows, cols) else f"rank {r}"
                reason = (f"a {rows} x {cols} diagonal block (blocks of {sw.block} window(s)) has {low} "
                          f"(tolerance max(r, c) * eps = {max(rows, cols) * eps:.1e}): the sweep cannot reach "
                          f"rank {bound:,}")
                break
            if r:
                ratio = min(ratio, kept)
        if not reason:
            names = tuple(("backward" if b else "forward") + (", last block merged" if m else "")
                          for b, m in zip(sw.backward, sw.merged))
            n_patterns = sum(1 for p in sw.patterns if p[3])
            cert = SweepCertificate(op.n, op.m, bound, unread, directions=names, block=sw.block,
                                    patterns=n_patterns, sigma_ratio=ratio, tried=tried)
            kind = ("injective on the pixels some window reads" if bound == n_read else
                    "of full row rank" if bound == op.m else "of the rank its border windows allow")
            cert.notes.append(
                f"sweep certificate ({', '.join(names)}; blocks of {sw.block} window(s) per dimension): the ranks of "
                f"{n_patterns} distinct diagonal blocks (smallest kept sigma/sigma_max {ratio:.1e}, tolerance "
                f"max(r, c) * eps) reach the upper bound, so the convolution is {kind}: rank {bound:,} "
                f"(exact, for the float64 weights; the certificate does not bound the condition number)")
            if unread:
                cert.notes.append(f"{unread:,} input entries are read by no window (harmless outright)")
            return cert
        first_reason = first_reason or reason
    return SweepCertificate(op.n, op.m, None, unread, tried=len(sweeps),
                            reason=f"{first_reason} (tried {len(sweeps)} scan directions and block sizes)")
