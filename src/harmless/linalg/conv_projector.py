"""A fast exact projector onto the nullspace of a 2-D convolutional stem.

For a stem ``A`` (a 2-D convolution, optionally between per-channel scalings such as
Normalize and eval-mode BatchNorm) with fewer outputs than inputs, the harmful part of
``delta`` is ``A^T y`` where ``G y = A delta`` and ``G = A A^T``. ``G`` lives on the
output grid ``(C_out, H_o, W_o)`` and is *block Toeplitz* away from the border: every
interior row is the same ``C_out x C_out`` stencil of radius ``r`` (windows that overlap).
So ``G = C + E`` with

* ``C`` the block-circulant matrix of that stencil on the ``H_o x W_o`` torus, inverted
  exactly by FFT (one ``C_out x C_out`` Hermitian block per frequency), and
* ``E = G - C`` non-zero only on the rows/columns of a border set ``B`` (the positions
  within ``r`` of an edge, where the torus wraps round, plus every row that differs from
  the stencil because its window reads padding), found by comparing every row of ``G``
  with the stencil.

``G^{-1} = C^{-1} - C^{-1} U (I + E_BB U^T C^{-1} U)^{-1} E_BB U^T C^{-1}`` (Woodbury) needs
one dense LU of size ``|B|`` per model, after which a solve costs two FFT solves and one
dense ``|B|`` triangular pair. It is used as the preconditioner of a batched conjugate
gradient on ``G y = A delta``: exact in one or two iterations when ``C`` is well
conditioned, and still correct (only slower) when it is not. The result ``A^T y`` lies in
the row space by construction; its harmful residual ``||A (delta - A^T y)||`` is checked
against the tolerance, so the answer is the orthogonal decomposition or is declined.

All arithmetic is float64 (a float32 operator is widened: exact), on the operator's device.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from harmless.linalg.operators import (
    ChannelScaleOperator,
    ComposedOperator,
    ConvOperator,
    ReshapeOperator,
    TorchLinearOperator,
)

#: Above this many border unknowns the dense capacitance matrix (``|B|^2`` float64 entries,
#: three copies while it is built) is not formed and :func:`build_conv_projector` declines.
DEFAULT_BORDER_LIMIT = 9_000

#: Relative size below which an eigenvalue of the circulant part, or a pivot of the border
#: correction, counts as zero (then ``G`` is numerically singular and the builder declines).
_SINGULAR = 1e-11


@dataclass(frozen=True)
class ProjectorInfo:
    """How a fast projection went: conjugate-gradient iterations, operator passes (applications
    of ``A`` or ``A^T`` per sample), the worst relative harmful residual and whether it met the
    tolerance."""

    iterations: int
    passes: int
    residual: float
    converged: bool


def sparse_matrix(op: TorchLinearOperator, *, check: bool = True) -> sp.csr_matrix | None:
    """``A`` as an exact SciPy CSR matrix (float64) when ``op`` is a 2-D convolution between
    diagonal factors (per-channel scalings, reshapes); ``None`` for anything else or when the
    matrix does not reproduce the operator on random vectors to ``1e-12``."""
    factors = op.factors if isinstance(op, ComposedOperator) else [op]
    convs = [i for i, f in enumerate(factors) if isinstance(f, ConvOperator)]
    if len(convs) != 1 or not all(isinstance(f, (ConvOperator, ChannelScaleOperator, ReshapeOperator))
                                  for f in factors):
        return None
    conv = factors[convs[0]]
    assert isinstance(conv, ConvOperator)
    if conv.d != 2:
        return None
    a = _conv_csr(conv)
    left = _diagonal(factors[:convs[0]], op.in_shape)
    right = _diagonal(factors[convs[0] + 1:], conv.out_shape)
    if left is not None:
        a = a @ sp.diags(left)
    if right is not None:
        a = sp.diags(right) @ a
    a = sp.csr_matrix(a)
    if check and not _matches(a, op):
        return None
    return a


def _diagonal(factors: list[TorchLinearOperator], shape: tuple[int, ...]) -> np.ndarray | None:
    """The diagonal of a product of diagonal factors (scalings; reshapes keep the flat order)."""
    if not factors:
        return None
    f64 = [f.astype(torch.float64) for f in factors]
    ones = torch.ones(1, *f64[0].in_shape, dtype=torch.float64, device=f64[0].device)
    for f in f64:
        ones = f._matvec(ones)
    return ones.reshape(-1).cpu().numpy()


def _conv_csr(conv: ConvOperator) -> sp.csr_matrix:
    """The convolution's matrix from its kernel: an image of input indices is padded with the
    operator's own padding mode (reflect/replicate/circular map a padded pixel to its source;
    zero padding to -1) and unfolded like the input, giving the input read by every tap."""
    c_in, h, w = conv.in_shape
    c_out, c_in_g = conv.weight.shape[:2]
    idx = torch.arange(c_in * h * w, dtype=torch.float64).view(1, c_in, h, w)
    flat_pad = [v for pair in reversed(conv._pad_lr) for v in pair]
    if conv.padding_mode == "zeros":
        idx = F.pad(idx, flat_pad, value=-1.0)
    else:
        idx = F.pad(idx, flat_pad, mode=conv.padding_mode)
    taps = F.unfold(idx, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)[0]  # (c_in*kk, L)
    positions = taps.shape[1]
    kk = math.prod(conv.kernel_size)
    weight = conv.weight.detach().to("cpu", torch.float64).reshape(c_out, c_in_g * kk)
    per_group = c_out // conv.groups
    rows, cols, vals = [], [], []
    for g in range(conv.groups):
        tg = taps[g * c_in_g * kk:(g + 1) * c_in_g * kk]  # (c_in_g*kk, L)
        tap, pos = torch.nonzero(tg >= 0, as_tuple=True)
        src = tg[tap, pos].long()
        out_ch = torch.arange(g * per_group, (g + 1) * per_group)
        rows.append((out_ch[:, None] * positions + pos[None, :]).reshape(-1))
        cols.append(src[None, :].expand(per_group, -1).reshape(-1))
        vals.append(weight[g * per_group:(g + 1) * per_group][:, tap].reshape(-1))
    m, n = c_out * positions, c_in * h * w
    # COO -> CSR sums duplicates (reflect padding can read one pixel through two taps).
    return sp.csr_matrix((torch.cat(vals).numpy(), (torch.cat(rows).numpy(), torch.cat(cols).numpy())),
                         shape=(m, n))


def _matches(a: sp.csr_matrix, op: TorchLinearOperator) -> bool:
    """Does ``a`` reproduce ``op`` and its adjoint on random vectors (float64, relative 1e-12)?"""
    op64 = op.astype(torch.float64) if op.dtype != torch.float64 else op
    gen = torch.Generator(device="cpu").manual_seed(3)
    x = torch.randn(2, *op.in_shape, generator=gen, dtype=torch.float64)
    y = torch.randn(2, *op.out_shape, generator=gen, dtype=torch.float64)
    ax = op64._matvec(x.to(op64.device)).reshape(2, -1).cpu().numpy()
    aty = op64._rmatvec(y.to(op64.device)).reshape(2, -1).cpu().numpy()
    ok = True
    for got, want in ((a @ x.reshape(2, -1).numpy().T, ax.T), (a.T @ y.reshape(2, -1).numpy().T, aty.T)):
        ok &= bool(np.linalg.norm(got - want) <= 1e-12 * max(float(np.linalg.norm(want)), 1e-300))
    return ok


class ConvProjector:
    """The orthogonal projector onto ``N(A)`` for a convolutional stem ``A`` (see the module
    docstring); build it with :func:`build_conv_projector`. ``setup_seconds`` and
    ``border_size`` (``|B|``) say what the one-off factorisation cost."""

    def __init__(self, op: TorchLinearOperator, grid: tuple[int, int, int], radius: int, symbol_inv: torch.Tensor,
                 border: np.ndarray, e_blocks: Blocks, lu: tuple[torch.Tensor, torch.Tensor] | None,
                 setup_seconds: float) -> None:
        self.operator = op.astype(torch.float64) if op.dtype != torch.float64 else op
        self.grid = grid
        self.radius = radius
        self._symbol_inv = symbol_inv  # (H, W//2+1, C, C) complex
        self._border = torch.as_tensor(border, device=self.operator.device)
        self._e_blocks = e_blocks
        self._lu = lu
        self.border_size = int(border.size)
        self.setup_seconds = setup_seconds

    # -- the preconditioner -----------------------------------------------------------------
    def _circ_solve(self, r: torch.Tensor) -> torch.Tensor:
        """``C^{-1} r`` for a batch on the output grid, by FFT."""
        c, h, w = self.grid
        f = torch.fft.rfft2(r.reshape(-1, c, h, w))  # (B, C, H, W//2+1)
        f = torch.einsum("hwij,bjhw->bihw", self._symbol_inv, f)
        return torch.fft.irfft2(f, s=(h, w)).reshape(r.shape[0], -1)

    def _precondition(self, r: torch.Tensor) -> torch.Tensor:
        """``G^{-1} r`` (Woodbury: the circulant solve corrected on the border)."""
        z = self._circ_solve(r)
        if self._lu is None:
            return z
        c = self.grid[0]
        zb = z[:, self._border].T.reshape(-1, c, z.shape[0])  # (P, C, batch)
        t = _block_times(self._e_blocks, zb).reshape(-1, z.shape[0])
        s = torch.linalg.lu_solve(self._lu[0], self._lu[1], t).T
        u = torch.zeros_like(z)
        u[:, self._border] = s
        return z - self._circ_solve(u)

    # -- the projection ------------------------------------------------------------------
    def harmful(self, delta: torch.Tensor, *, tol: float, scale: torch.Tensor,
                maxiter: int = 50) -> tuple[torch.Tensor, ProjectorInfo]:
        """The harmful part ``A^+ A delta`` of a batch (any float dtype; computed in float64 and
        returned in ``delta``'s dtype), and how it went. ``scale`` is per sample (e.g.
        ``||A|| ||delta||``); converged means ``||A (delta - harmful)|| <= tol * scale`` for all."""
        op = self.operator
        bsz = delta.shape[0]
        d = delta.to(torch.float64)
        target = (tol * scale.to(torch.float64)).to(d.device)
        b = op._matvec(d).reshape(bsz, -1)
        passes = 1
        y = torch.zeros_like(b)
        r = b.clone()
        res = r.norm(dim=1)
        z = self._precondition(r)
        p = z.clone()
        rz = (r * z).sum(dim=1)
        it = 0
        tiny = torch.finfo(torch.float64).tiny
        while bool((res > target).any()) and it < maxiter:
            it += 1
            atp = op._rmatvec(p.reshape(bsz, *op.out_shape))
            q = op._matvec(atp).reshape(bsz, -1)
            passes += 2
            pq = (p * q).sum(dim=1)
            active = res > target
            alpha = torch.where(active & (pq > tiny), rz / pq.clamp_min(tiny), torch.zeros_like(pq))
            y = y + alpha[:, None] * p
            r = r - alpha[:, None] * q
            res = r.norm(dim=1)
            if not bool((res > target).any()):
                break  # converged: the next search direction is not needed
            z = self._precondition(r)
            rz_new = (r * z).sum(dim=1)
            beta = torch.where(rz.abs() > tiny, rz_new / torch.where(rz.abs() > tiny, rz, torch.ones_like(rz)),
                               torch.zeros_like(rz))
            p = z + beta[:, None] * p
            rz = rz_new
        harmful = op._rmatvec(y.reshape(bsz, *op.out_shape))
        # The true residual, not the recursive one: this is what is promised.
        true_res = (b - op._matvec(harmful).reshape(bsz, -1)).norm(dim=1)
        passes += 2
        rel = true_res / scale.to(torch.float64).to(d.device).clamp_min(tiny)
        worst = float(rel.max()) if rel.numel() else 0.0
        converged = bool((true_res <= target).all())
        return harmful.to(delta.dtype), ProjectorInfo(it, passes, worst, converged)


def build_conv_projector(op: TorchLinearOperator, *, border_limit: int = DEFAULT_BORDER_LIMIT,
                         matrix: sp.csr_matrix | None = None) -> ConvProjector | None:
    """A :class:`ConvProjector` for ``op`` when it is a 2-D convolutional stem with fewer outputs
    than inputs, between per-channel scalings, whose border set has at most ``border_limit``
    unknowns; ``None`` otherwise (the caller then keeps its general solver)."""
    start = time.perf_counter()
    if op.m >= op.n:
        return None  # A A^T is singular (more outputs than inputs): not this method's case
    factors = op.factors if isinstance(op, ComposedOperator) else [op]
    convs = [f for f in factors if isinstance(f, ConvOperator)]
    if len(convs) != 1 or convs[0].d != 2:
        return None
    conv = convs[0]
    a = matrix if matrix is not None else sparse_matrix(op)
    if a is None or not _channelwise(factors):
        return None
    c, h, w = conv.out_shape
    radius, border = _geometry(conv)
    centre = (h // 2) * w + w // 2
    nb = border.size * c
    if 2 * radius + 1 > min(h, w) or nb > border_limit or centre in set(border.tolist()):
        return None
    stencil = _stencil(a, radius, (c, h, w))
    kernel = _torus_kernel(stencil, radius, h, w)  # (C, C, H, W): C y[p] = sum_D k[D] y[p + D]
    symbol = torch.fft.fft2(torch.as_tensor(kernel)).conj()  # Hermitian C x C per frequency
    symbol = symbol.permute(2, 3, 0, 1)[:, :w // 2 + 1]
    lam, vec = torch.linalg.eigh(symbol)
    if float(lam.min()) <= _SINGULAR * float(lam.max()):
        # Rows dependent at some frequency (e.g. more channels out than a window's polyphase
        # inputs): G is singular there and a regularised inverse makes CG crawl; CGLS is better.
        return None
    inv = (vec / lam.unsqueeze(-2).to(vec.dtype)) @ vec.mH
    device = op.device
    if nb == 0:
        return ConvProjector(op, (c, h, w), radius, inv.to(device), border, [], None,
                             time.perf_counter() - start)
    # (C^{-1})_BB from the inverse circulant's kernel (symbol inv, filled to all frequencies by
    # Hermitian symmetry: S(-k) = conj(S(k)) entrywise for a real kernel).
    full_inv = torch.zeros(h, w, c, c, dtype=torch.complex128)
    full_inv[:, :w // 2 + 1] = inv
    kx = torch.arange(w // 2 + 1, w)
    full_inv[:, kx] = inv[(-torch.arange(h)) % h][:, (-kx) % w].conj()
    h_kernel = torch.fft.ifft2(full_inv.conj().permute(2, 3, 0, 1)).real.numpy()  # (C, C, H, W)
    del full_inv
    idx = _flat_indices(border, c, h, w)  # ordered (position, channel)
    pos_i, pos_j = border // w, border % w
    di = (pos_i[None, :] - pos_i[:, None]) % h
    dj = (pos_j[None, :] - pos_j[:, None]) % w
    k_bb = np.ascontiguousarray(h_kernel[:, :, di, dj].transpose(2, 0, 3, 1)).reshape(nb, nb)
    a_b = a[idx]
    e_bb = sp.csr_matrix(a_b @ a_b.T) - _circulant_block(stencil, radius, border, (c, h, w))
    blocks = _blocks(e_bb, radius, border, (c, h, w))
    cap = _block_times(blocks, torch.as_tensor(k_bb).view(border.size, c, nb)).reshape(nb, nb)
    del k_bb
    cap.diagonal().add_(1.0)
    lu, piv, _ = torch.linalg.lu_factor_ex(cap)
    del cap
    pivots = lu.diagonal().abs()
    if not bool(torch.isfinite(pivots).all()) or float(pivots.min()) <= _SINGULAR * float(pivots.max()):
        return None  # the border correction is (numerically) singular: G is, or nearly is
    blocks = [(ok.to(device), q.to(device), blk.to(device)) for ok, q, blk in blocks]
    return ConvProjector(op, (c, h, w), radius, inv.to(device), idx, blocks, (lu.to(device), piv.to(device)),
                         time.perf_counter() - start)


def _channelwise(factors: list[TorchLinearOperator]) -> bool:
    """Are the scalings around the convolution constant within each channel (so that
    ``A A^T`` is block Toeplitz in the interior)? Reshapes keep the flat order."""
    i = next(k for k, f in enumerate(factors) if isinstance(f, ConvOperator))
    for side, shape in ((factors[:i], factors[i].in_shape), (factors[i + 1:], factors[i].out_shape)):
        diag = _diagonal(side, shape)
        if diag is not None:
            per = diag.reshape(shape[0], -1)
            if not np.array_equal(per, np.broadcast_to(per[:, :1], per.shape)):
                return False
    return True


def _geometry(conv: ConvOperator) -> tuple[int, np.ndarray]:
    """The stencil radius of ``A A^T`` (windows ``r`` outputs apart still overlap) and the border
    positions: outputs within ``r`` of an edge (the torus wraps there) or whose window reads
    padding (their rows of ``A A^T`` may differ from the stencil). Outside this set every row of
    ``A A^T`` is the stencil, so ``E = G - C`` is supported on border x border."""
    _, h_o, w_o = conv.out_shape
    radius = 0
    touches = []
    for axis, size in enumerate((h_o, w_o)):
        eff = conv.dilation[axis] * (conv.kernel_size[axis] - 1) + 1
        radius = max(radius, (eff - 1) // conv.stride[axis])
        first = np.arange(size) * conv.stride[axis] - conv._pad_lr[axis][0]
        # Reflect/replicate/circular padding re-reads pixels within the pad width of an edge:
        # windows over those pixels share them with the padded windows, so they count too.
        band = 0 if conv.padding_mode == "zeros" else max(conv._pad_lr[axis]) + 1
        touches.append((first < band) | (first + eff > conv.in_shape[1 + axis] - band))
    ii, jj = np.divmod(np.arange(h_o * w_o), w_o)
    near = (ii < radius) | (ii >= h_o - radius) | (jj < radius) | (jj >= w_o - radius)
    return radius, np.flatnonzero(near | touches[0][ii] | touches[1][jj])


def _flat_indices(positions: np.ndarray, c: int, h: int, w: int) -> np.ndarray:
    """Flat output indices ``ch * H * W + p`` for every border position and channel, position-major."""
    return (positions[:, None] + (np.arange(c) * h * w)[None, :]).reshape(-1)


def _stencil(a: sp.csr_matrix, radius: int, grid: tuple[int, int, int]) -> np.ndarray:
    """The ``(C, C, 2r+1, 2r+1)`` stencil of ``G = A A^T``, read at the central output position."""
    c, h, w = grid
    hw = h * w
    i0, j0 = h // 2, w // 2
    rows = np.arange(c) * hw + i0 * w + j0
    g = sp.coo_matrix(a[rows] @ a.T)
    cc, q = g.col // hw, g.col % hw
    di, dj = q // w - i0, q % w - j0
    st = np.zeros((c, c, 2 * radius + 1, 2 * radius + 1))
    np.add.at(st, (g.row, cc, di + radius, dj + radius), g.data)
    return st


def _circulant_block(stencil: np.ndarray, radius: int, border: np.ndarray,
                     grid: tuple[int, int, int]) -> sp.csr_matrix:
    """``C_BB``, the torus stencil's matrix on the border unknowns (position-major order), sparse."""
    c, h, w = grid
    where = np.full(h * w, -1)
    where[border] = np.arange(border.size)
    pi, pj = border // w, border % w
    rows, cols, vals = [], [], []
    blk_r, blk_c = np.meshgrid(np.arange(c), np.arange(c), indexing="ij")
    for a in range(-radius, radius + 1):
        for b in range(-radius, radius + 1):
            q = where[((pi + a) % h) * w + (pj + b) % w]
            ok = np.flatnonzero(q >= 0)
            rows.append((ok[:, None, None] * c + blk_r[None]).reshape(-1))
            cols.append((q[ok][:, None, None] * c + blk_c[None]).reshape(-1))
            vals.append(np.broadcast_to(stencil[:, :, a + radius, b + radius], (ok.size, c, c)).reshape(-1))
    n = border.size * c
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))


Blocks = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _blocks(e_bb: sp.csr_matrix, radius: int, border: np.ndarray, grid: tuple[int, int, int]) -> Blocks:
    """``E_BB`` as ``C x C`` blocks, one list entry per stencil offset: ``(rows, cols, blocks)``
    with block ``k`` coupling border position ``rows[k]`` to ``cols[k]``. Products with it are
    ``(2r+1)^2`` batched dense matmuls, ten times faster here than a scalar sparse loop."""
    c, h, w = grid
    where = np.full(h * w, -1)
    where[border] = np.arange(border.size)
    pi, pj = border // w, border % w
    lane = np.arange(c)
    tiny = 1e-13 * float(abs(e_bb).max()) if e_bb.nnz else 0.0
    out: Blocks = []
    for a in range(-radius, radius + 1):
        for b in range(-radius, radius + 1):
            q = where[((pi + a) % h) * w + (pj + b) % w]
            ok = np.flatnonzero(q >= 0)
            if ok.size == 0:
                continue
            rows = (ok[:, None, None] * c + lane[None, :, None]).repeat(c, axis=2)
            cols = (q[ok][:, None, None] * c + lane[None, None, :]).repeat(c, axis=1)
            blk = np.asarray(e_bb[rows.reshape(-1), cols.reshape(-1)]).reshape(ok.size, c, c)
            # Where a border row equals the stencil (no padding, no wrap at this offset) E's block
            # is round-off: dropping it changes M by ~eps ||G||, which CG absorbs.
            keep = np.abs(blk).max(axis=(1, 2)) > tiny
            if keep.any():
                out.append((torch.as_tensor(ok[keep]), torch.as_tensor(q[ok][keep]), torch.as_tensor(blk[keep])))
    return out


def _block_times(blocks: Blocks, z: torch.Tensor) -> torch.Tensor:
    """``E_BB z`` for ``z`` of shape ``(P, C, K)`` (border position, channel, columns)."""
    out = torch.zeros_like(z)
    for ok, q, blk in blocks:
        out.index_add_(0, ok, torch.bmm(blk, z[q]))
    return out


def _torus_kernel(stencil: np.ndarray, radius: int, h: int, w: int) -> np.ndarray:
    """The stencil laid on the ``H x W`` torus: ``k[:, :, di mod H, dj mod W]``."""
    c = stencil.shape[0]
    k = np.zeros((c, c, h, w))
    for a in range(-radius, radius + 1):
        for b in range(-radius, radius + 1):
            k[:, :, a % h, b % w] += stencil[:, :, a + radius, b + radius]
    return k
