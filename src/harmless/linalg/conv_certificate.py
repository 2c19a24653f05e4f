"""An exact rank certificate for large zero-padded convolutions, in milliseconds: the sweep.

Order the output windows (or blocks of ``b`` consecutive windows per spatial dimension)
lexicographically and give each the input pixels that it reads and no earlier one read,
its *new* pixels. Put the columns of ``A`` in the same order (every channel of a pixel
together): the rows of a window then touch only its own new pixels and earlier windows'
ones, so ``A`` is block lower triangular, with one diagonal block ``P_w`` per window: the
kernel's rows restricted to the taps that land on the new pixels (``C_out * #windows`` rows,
``C_in * #new pixels`` columns). For block triangular matrices ``rank(A) >= sum_w rank(P_w)``
(a non-singular minor of every diagonal block together forms a non-singular minor of
``A``), and always ``rank(A) <= min(m, n_read)`` with ``n_read`` the input entries that some
window reads (the others are columns of zeros). When the two bounds meet, the rank is
exact: every block of full column rank makes ``A`` injective on the pixels it reads
(a tall stem such as ResNet's 7x7/s2/p3 -> 64 at 224 px: ``dim = 0``), every block of full
row rank makes ``A`` of full row rank (a dimension-reducing stem: ``dim = n - m``).

New pixels factor over the spatial dimensions (a pixel is old exactly when, in some
dimension, an earlier window index already read its coordinate), so the diagonal blocks take
only a handful of shapes (corner, edges, interior, the last rows and columns): each is
decided once by an SVD, with the tolerance every dense rank in ``harmless`` uses
(``sigma_min > max(r, c) * eps * sigma_max``). The certificate may hold in one scan direction
and not in another (the border windows differ), and single windows may be too small where
blocks of windows are not (a 7x7/s2 stem without padding: a corner window reads 147 inputs
for 64 outputs); directions and block sizes are tried from the cheapest.

It proves the rank of the float64 matrix in exact arithmetic up to the tolerance of each
small SVD. It does not bound ``A``'s condition number: a certified injective ``A`` may still
have singular values that a dense SVD of the whole matrix would count as zero. When the
bounds do not meet it proves nothing beyond them, and the caller falls back to its other
methods. Only zero padding: other padding modes reuse border pixels, which breaks the
one-tap-per-pixel structure of the blocks.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
import torch

from harmless.linalg.operators import ConvOperator

#: Largest diagonal block (entries) that is decomposed; larger ones make a scan order fail.
DEFAULT_MAX_BLOCK_ENTRIES = 4_194_304
#: Budget of SVD floating-point operations (about a few seconds on one core).
DEFAULT_MAX_FLOPS = 5e10


@dataclass
class SweepCertificate:
    """The outcome of :func:`sweep_certificate`.

    ``rank`` is the exact rank when certified, else ``None`` (``reason`` says why).
    ``unread`` input entries (pixel x channel) are read by no window: they are harmless
    whatever the weights, so ``dim >= unread`` always. ``directions`` (one per spatial
    dimension, ``"forward"`` or ``"backward"``) and ``block`` (windows per block and
    dimension) name the certifying sweep; ``patterns`` is the number of distinct diagonal
    blocks decided and ``sigma_ratio`` the smallest ``sigma_min / sigma_max`` among them
    (the margin over the tolerance ``max(r, c) * eps``).
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


def _dimension_blocks(size: int, out: int, stride: int, left: int, dilation: int, kernel: int, block: int,
                      backward: bool) -> tuple[Counter[bytes], dict[bytes, np.ndarray], int]:
    """One spatial dimension of the sweep: for each block of ``block`` consecutive output
    indices (in the scan direction), the 0/1 tensor ``taps[a, q, t]`` (``1`` when the block's
    ``a``-th output reads its ``q``-th new input index through tap ``t``). Blocks with equal
    tensors have equal diagonal blocks; returns their counts, the tensors and the number of
    input indices read at all."""
    order = np.arange(out)[::-1] if backward else np.arange(out)
    seen = np.zeros(size, dtype=bool)
    counts: Counter[bytes] = Counter()
    tensors: dict[bytes, np.ndarray] = {}
    taps_range = np.arange(kernel) * dilation
    for start in range(0, out, block):
        outs = np.sort(order[start:start + block])
        pix = outs[:, None] * stride - left + taps_range[None, :]  # (a, kernel) input index per tap
        valid = (pix >= 0) & (pix < size)
        read = np.unique(pix[valid])
        new = read[~seen[read]]
        seen[read] = True
        taps = ((pix[:, None, :] == new[None, :, None]) & valid[:, None, :]).astype(np.float64)
        key = np.asarray(taps.shape, dtype=np.int64).tobytes() + taps.tobytes()
        counts[key] += 1
        tensors.setdefault(key, taps)
    return counts, tensors, int(seen.sum())


def _diagonal_block(weight: np.ndarray, taps: list[np.ndarray]) -> np.ndarray:
    """``sum_t weight[o, c, t] taps[a, q, t]`` over every dimension, as a
    ``(C_out * prod a) x (C_in * prod q)`` matrix."""
    d = len(taps)
    k, a, q = "klm"[:d], "abe"[:d], "pqr"[:d]
    spec = f"oc{k}," + ",".join(f"{a[i]}{q[i]}{k[i]}" for i in range(d)) + f"->o{a}c{q}"
    sub = np.einsum(spec, weight, *taps, optimize=True)
    rows = weight.shape[0] * math.prod(t.shape[0] for t in taps)
    return sub.reshape(rows, -1)


def _one_blas_thread() -> contextlib.AbstractContextManager[object]:
    """One BLAS thread for the small SVDs: on a busy machine extra OpenBLAS threads made a
    256 x 243 SVD 0.2 s instead of 5 ms (and the 8x8/s4 stem at 224 px 12 s instead of 0.08 s)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # not a dependency of harmless; without it the sweep is only slower
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def sweep_certificate(op: ConvOperator, *, max_block: int = 4, max_block_entries: int = DEFAULT_MAX_BLOCK_ENTRIES,
                      max_flops: float = DEFAULT_MAX_FLOPS) -> SweepCertificate:
    """The exact rank of a zero-padded convolution from a sweep over its windows, or the
    reason why no sweep tried certifies it (see the module docstring).

    Scan directions (``2^d``) and blocks of ``1..max_block`` windows per dimension are tried
    cheapest first; a sweep whose block shapes cannot reach the rank bound is skipped
    without any SVD, and distinct diagonal blocks are decided once across sweeps.
    """
    with _one_blas_thread():
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

    def dimension(i: int, block: int, backward: bool) -> tuple[Counter[bytes], dict[bytes, np.ndarray], int]:
        return _dimension_blocks(spatial[i], outs[i], op.stride[i], op._pad_lr[i][0], op.dilation[i],
                                 op.kernel_size[i], min(block, outs[i]), backward)

    read_per_dim = [dimension(i, 1, False)[2] for i in range(op.d)]
    n_read = c_in * math.prod(read_per_dim)
    unread = op.n - n_read
    bound = min(op.m, n_read)
    decided: dict[tuple[bytes, ...], tuple[bool, float]] = {}  # block key -> (full rank, sigma ratio)
    flops = 0.0
    first_reason = ""
    tried = 0
    eps = np.finfo(np.float64).eps
    blocks_tried: set[tuple[int, ...]] = set()
    for block in range(1, max_block + 1):
        effective = tuple(min(block, o) for o in outs)
        if effective in blocks_tried:
            break  # every dimension already takes all its windows in one block
        blocks_tried.add(effective)
        for backward in itertools.product((False, True), repeat=op.d):
            tried += 1
            dims = [dimension(i, block, backward[i]) for i in range(op.d)]
            combos = []
            reachable = 0
            for keys in itertools.product(*[list(c) for c, _, _ in dims]):
                taps = [dims[i][1][key] for i, key in enumerate(keys)]
                rows = c_out * math.prod(t.shape[0] for t in taps)
                cols = c_in * math.prod(t.shape[1] for t in taps)
                count = math.prod(dims[i][0][key] for i, key in enumerate(keys))
                reachable += count * min(rows, cols)
                combos.append((keys, taps, rows, cols))
            reason = ""
            if reachable < bound:
                # Some block has more unknowns than equations and fewer equations than its
                # share of the rank: no weights make this sweep certify.
                # The culprits: blocks with more unknowns than equations when the bound is
                # n_read (injectivity), fewer unknowns than equations when it is m.
                sign = 1 if bound == n_read else -1
                worst = max(combos, key=lambda c: sign * (c[3] - c[2]))
                if worst[3] == 0:
                    reason = (f"the last windows read no pixel that earlier ones did not, so their equations cannot "
                              f"add to the rank (blocks of {block} window(s)): the sweep cannot reach rank {bound:,}")
                else:
                    reason = (f"a diagonal block has {worst[2]} equations for {worst[3]} unknowns (blocks of {block} "
                              f"window(s)), so the sweep cannot reach rank {bound:,}")
            ratio = math.inf
            for keys, taps, rows, cols in sorted(combos, key=lambda c: c[2] * c[3]) if not reason else []:
                if cols == 0:
                    continue
                if keys not in decided:
                    if rows * cols > max_block_entries:
                        reason = f"a {rows} x {cols} diagonal block is above the limit of {max_block_entries:,} entries"
                        break
                    flops += 4.0 * rows * cols * min(rows, cols)
                    if flops > max_flops:
                        reason = f"the SVDs would exceed the budget of {max_flops:.0e} flops"
                        break
                    sv = scipy.linalg.svd(_diagonal_block(weight, taps), compute_uv=False, lapack_driver="gesdd",
                                          check_finite=False)
                    full = sv.size > 0 and svd_rank(sv, rows, cols) == min(rows, cols)
                    decided[keys] = (full, float(sv[-1] / sv[0]) if sv.size and sv[0] > 0 else 0.0)
                full, r = decided[keys]
                if not full:
                    reason = (f"a {rows} x {cols} diagonal block (blocks of {block} window(s)) is rank-deficient: "
                              f"sigma_min/sigma_max = {r:.1e} <= tolerance {max(rows, cols) * eps:.1e}")
                    break
                ratio = min(ratio, r)
            if not reason:
                names = tuple("backward" if b else "forward" for b in backward)
                n_patterns = sum(1 for c in combos if c[3])
                cert = SweepCertificate(op.n, op.m, bound, unread, directions=names, block=block,
                                        patterns=n_patterns, sigma_ratio=ratio, tried=tried)
                kind = ("injective on the pixels some window reads" if bound == n_read else "full row rank")
                cert.notes.append(
                    f"sweep certificate ({', '.join(names)}; blocks of {block} window(s) per dimension): "
                    f"{n_patterns} distinct diagonal blocks all of full rank (smallest sigma_min/sigma_max "
                    f"{ratio:.1e}, tolerance max(r, c) * eps), so the convolution is {kind}: rank {bound:,}")
                if unread:
                    cert.notes.append(f"{unread:,} input entries are read by no window (harmless outright)")
                return cert
            first_reason = first_reason or reason
    return SweepCertificate(op.n, op.m, None, unread, tried=tried,
                            reason=f"{first_reason} (tried {tried} scan directions and block sizes)")
