"""Linear maps as objects: a forward map, its exact adjoint, shapes, dtype and device.

Modelled on SciPy's ``LinearOperator`` but over torch tensors, so that batches, float32 /
float64 and CUDA all work: ``matvec`` takes ``(B, *in_shape)`` and returns
``(B, *out_shape)``; ``rmatvec`` is the adjoint, ``(B, *out_shape) -> (B, *in_shape)``.
Algorithms in :mod:`harmless.linalg` take operators, never matrices; a dense matrix is
built only on request (:meth:`TorchLinearOperator.to_dense`).

Biases never enter an operator: an affine layer ``x -> Ax + b`` changes its output by
``A delta`` whatever ``b`` is, so only ``A`` decides harmlessness.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from harmless.errors import InputError, TooLargeError

Shape = tuple[int, ...]

#: Above this many matrix entries :meth:`TorchLinearOperator.to_dense` refuses (float64: 400 MB).
DEFAULT_DENSE_LIMIT = 50_000_000


def _prod(shape: Sequence[int]) -> int:
    return int(math.prod(shape))


class TorchLinearOperator:
    """A linear map ``R^in_shape -> R^out_shape`` with an exact adjoint.

    Subclasses implement :meth:`_matvec` and :meth:`_rmatvec` on batched tensors that are
    already of the operator's dtype and device; the public methods validate once.
    """

    #: True when the map is a bijection of R^n (n == m and full rank), e.g. a per-channel
    #: scaling with non-zero scales or a reshape; such factors never change a nullspace's
    #: dimension, which lets composite operators reason about structure.
    bijective: bool = False
    #: True when the map is known to be injective (rank == n), e.g. a bijection or an
    #: embedding (concatenation with a constant); composing with an injective map on the
    #: left never changes a nullspace: N(B A) = N(A).
    injective: bool = False
    #: True when the map is known to be orthogonal (a reshape, a permutation of axes, a
    #: negation): projections through it need no solve, ``P_row(W Q) = Q^T P_row(W) Q``.
    orthogonal: bool = False

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], *, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        self.in_shape: Shape = tuple(int(s) for s in in_shape)
        self.out_shape: Shape = tuple(int(s) for s in out_shape)
        self.dtype = dtype
        self.device = torch.device(device)

    # -- sizes -------------------------------------------------------------------------
    @property
    def n(self) -> int:
        """Input dimension (number of columns)."""
        return _prod(self.in_shape)

    @property
    def m(self) -> int:
        """Output dimension (number of rows)."""
        return _prod(self.out_shape)

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n)`` as for a matrix."""
        return (self.m, self.n)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(in_shape={self.in_shape}, out_shape={self.out_shape}, "
                f"dtype={self.dtype})")

    # -- application -------------------------------------------------------------------
    def _check(self, x: torch.Tensor, shape: Shape, what: str) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise InputError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
        if tuple(x.shape[1:]) != shape:
            raise InputError(f"{what} must have shape (B, {', '.join(map(str, shape))}), "
                             f"got {tuple(x.shape)}")
        return x.to(dtype=self.dtype, device=self.device)

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        """``A x`` for a batch ``x`` of shape ``(B, *in_shape)``."""
        return self._matvec(self._check(x, self.in_shape, "input"))

    def rmatvec(self, y: torch.Tensor) -> torch.Tensor:
        """``A^T y`` for a batch ``y`` of shape ``(B, *out_shape)``."""
        return self._rmatvec(self._check(y, self.out_shape, "output"))

    def _matvec(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _rmatvec(self, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def gram(self, x: torch.Tensor) -> torch.Tensor:
        """``A^T A x``."""
        return self._rmatvec(self._matvec(x))

    def __matmul__(self, other: TorchLinearOperator) -> ComposedOperator:
        """``self @ other`` is the map ``x -> self(other(x))``."""
        return ComposedOperator([other, self])

    # -- algebra (as SciPy's LinearOperator) ---------------------------------------------
    @property
    def H(self) -> TorchLinearOperator:
        """The adjoint ``A^T`` as an operator (``A.H.H`` is ``A``)."""
        return AdjointOperator(self)

    @property
    def T(self) -> TorchLinearOperator:
        return self.H

    def __add__(self, other: TorchLinearOperator) -> TorchLinearOperator:
        """``(A + B) x = A x + B x``."""
        return SumOperator([(1.0, self), (1.0, other)])

    def __sub__(self, other: TorchLinearOperator) -> TorchLinearOperator:
        return SumOperator([(1.0, self), (-1.0, other)])

    def __mul__(self, scalar: float) -> TorchLinearOperator:
        """``(c A) x = c (A x)`` for a real number ``c``."""
        if isinstance(scalar, bool) or not isinstance(scalar, (int, float, np.floating, np.integer)):
            return NotImplemented
        return SumOperator([(float(scalar), self)])

    __rmul__ = __mul__

    def __neg__(self) -> TorchLinearOperator:
        return SumOperator([(-1.0, self)])

    # -- dense forms and conversions -------------------------------------------------
    def to_dense(self, *, limit: int = DEFAULT_DENSE_LIMIT, batch: int = 256) -> torch.Tensor:
        """The ``(m, n)`` matrix, built column block by column block from ``matvec``
        (or row blocks from ``rmatvec`` when that needs fewer applications)."""
        if self.m * self.n > limit:
            raise TooLargeError(
                f"the dense matrix of this operator has {self.m} x {self.n} = {self.m * self.n:,} "
                f"entries, above the limit of {limit:,}; use the matrix-free methods instead")
        if self.n <= self.m:
            return self._on_basis(self._matvec, self.in_shape, batch).T.contiguous()
        return self._on_basis(self._rmatvec, self.out_shape, batch).contiguous()

    def _on_basis(self, fn: Callable[[torch.Tensor], torch.Tensor], shape: Shape, batch: int) -> torch.Tensor:
        """``fn`` applied to every standard basis vector of ``R^shape``, one result per row."""
        size = _prod(shape)
        rows = []
        for start in range(0, size, batch):
            stop = min(start + batch, size)
            eye = torch.zeros(stop - start, size, dtype=self.dtype, device=self.device)
            eye[torch.arange(stop - start), torch.arange(start, stop)] = 1
            rows.append(fn(eye.view(-1, *shape)).reshape(stop - start, -1))
        return torch.cat(rows)

    def to_gram(self, *, batch: int = 256) -> torch.Tensor:
        """The ``(n, n)`` Gram matrix ``A^T A``, built from ``n`` operator applications."""
        g = self._on_basis(self.gram, self.in_shape, batch)
        return (g + g.T) / 2

    def to_cogram(self, *, batch: int = 256) -> torch.Tensor:
        """The ``(m, m)`` matrix ``A A^T``, built from ``m`` operator applications."""
        g = self._on_basis(lambda y: self._matvec(self._rmatvec(y)), self.out_shape, batch)
        return (g + g.T) / 2

    def astype(self, dtype: torch.dtype) -> TorchLinearOperator:
        """The same map with its coefficients in ``dtype`` (exact when widening)."""
        raise NotImplementedError(f"{type(self).__name__} cannot change dtype")

    def norm_estimate(self, *, iters: int = 50, generator: torch.Generator | None = None) -> float:
        """A lower bound on the spectral norm ``||A||_2`` by power iteration on ``A^T A``."""
        gen = generator or torch.Generator(device="cpu").manual_seed(0)
        v = torch.randn(1, *self.in_shape, generator=gen, dtype=torch.float64).to(self.dtype).to(self.device)
        v = v / v.norm()
        sigma = 0.0
        for _ in range(iters):
            w = self.gram(v)
            norm = float(w.norm())
            if norm == 0.0:
                return 0.0
            sigma = math.sqrt(norm)
            v = w / norm
        return sigma

    def to_scipy(self) -> Any:
        """This operator as a ``scipy.sparse.linalg.LinearOperator`` on flat float64 vectors."""
        from scipy.sparse.linalg import LinearOperator

        def apply(fn: Callable[[torch.Tensor], torch.Tensor], shape: Shape, x: np.ndarray) -> np.ndarray:
            x = np.asarray(x, dtype=np.float64)
            cols = x.reshape(x.shape[0], -1).T  # one batch entry per column
            t = torch.as_tensor(np.ascontiguousarray(cols)).reshape(-1, *shape)
            out = fn(t).to("cpu", torch.float64).reshape(cols.shape[0], -1).T.numpy()
            return out.reshape(-1) if x.ndim == 1 else out

        return LinearOperator(
            self.shape, dtype=np.float64,
            matvec=lambda v: apply(self.matvec, self.in_shape, v),
            rmatvec=lambda v: apply(self.rmatvec, self.out_shape, v),
            matmat=lambda v: apply(self.matvec, self.in_shape, v),
            rmatmat=lambda v: apply(self.rmatvec, self.out_shape, v))


# ---------------------------------------------------------------------------------------
# Concrete operators
# ---------------------------------------------------------------------------------------
class MatrixOperator(TorchLinearOperator):
    """A dense ``(m, n)`` matrix acting on flat vectors (e.g. ``nn.Linear``'s weight)."""

    def __init__(self, matrix: torch.Tensor, *, in_shape: Sequence[int] | None = None,
                 out_shape: Sequence[int] | None = None, dtype: torch.dtype = torch.float64) -> None:
        if matrix.ndim != 2:
            raise InputError(f"matrix must be 2-D, got shape {tuple(matrix.shape)}")
        m, n = matrix.shape
        in_shape = tuple(in_shape) if in_shape is not None else (n,)
        out_shape = tuple(out_shape) if out_shape is not None else (m,)
        if _prod(in_shape) != n or _prod(out_shape) != m:
            raise InputError("in_shape/out_shape do not match the matrix")
        super().__init__(in_shape, out_shape, dtype=dtype, device=matrix.device)
        self.matrix = matrix.detach().to(dtype).clone()

    def _matvec(self, x: torch.Tensor) -> torch.Tensor:
        return (x.reshape(x.shape[0], -1) @ self.matrix.T).reshape(x.shape[0], *self.out_shape)

    def _rmatvec(self, y: torch.Tensor) -> torch.Tensor:
        return (y.reshape(y.shape[0], -1) @ self.matrix).reshape(y.shape[0], *self.in_shape)

    def to_dense(self, *, limit: int = DEFAULT_DENSE_LIMIT, batch: int = 256) -> torch.Tensor:
        return self.matrix.clone()

    def astype(self, dtype: torch.dtype) -> MatrixOperator:
        return MatrixOperator(self.matrix, in_shape=self.in_shape, out_shape=self.out_shape, dtype=dtype)


class TokenwiseMatrixOperator(TorchLinearOperator):
    """A matrix ``W`` (m x d) applied to the last axis of every position of a ``(..., d)``
    input (a Linear on tokens): the operator is ``I_T kron W`` with ``T`` positions, so its
    rank is ``T * rank(W)`` without forming anything of size ``T``."""

    def __init__(self, matrix: torch.Tensor, in_shape: Sequence[int], *, dtype: torch.dtype = torch.float64) -> None:
        if matrix.ndim != 2:
            raise InputError(f"matrix must be 2-D, got shape {tuple(matrix.shape)}")
        in_shape = tuple(int(s) for s in in_shape)
        if len(in_shape) < 2 or in_shape[-1] != matrix.shape[1]:
            raise InputError(f"a token-wise matrix of shape {tuple(matrix.shape)} needs inputs "
                             f"(..., {matrix.shape[1]}), "
                             f"got {in_shape}")
        super().__init__(in_shape, (*in_shape[:-1], matrix.shape[0]), dtype=dtype, device=matrix.device)
        self.matrix = matrix.detach().to(dtype).clone()

    @property
    def positions(self) -> int:
        """``T``, the number of positions the matrix acts on."""
        return _prod(self.in_shape[:-1])

    def _matvec(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix.T

    def _rmatvec(self, y: torch.Tensor) -> torch.Tensor:
        return y @ self.matrix

    def astype(self, dtype: torch.dtype) -> TokenwiseMatrixOperator:
        return TokenwiseMatrixOperator(self.matrix, self.in_shape, dtype=dtype)


class ChannelScaleOperator(TorchLinearOperator):
    """Multiplies channel ``c`` (dimension 1) by ``scale[c]``: eval-mode BatchNorm, Normalize."""

    def __init__(self, scale: torch.Tensor, shape: Sequence[int], *, dtype: torch.dtype = torch.float64) -> None:
        super().__init__(shape, shape, dtype=dtype, device=scale.device)
        if scale.ndim != 1 or scale.numel() != self.in_shape[0]:
            raise InputError(f"scale has {scale.numel()} entries for {self.in_shape[0]} channels")
        self.scale = scale.detach().to(dtype).clone()
        self.bijective = self.injective = bool(torch.all(self.scale != 0))
        self._view = (1, -1) + (1,) * (len(self.in_shape) - 1)

    def _matvec(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(self._view)

    def _rmatvec(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.scale.view(self._view)

    def astype(self, dtype: torch.dtype) -> ChannelScaleOperator:
        return ChannelScaleOperator(self.scale, self.in_shape, dtype=dtype)


class ReshapeOperator(TorchLinearOperator):
    """A change of shape (Flatten, Unflatten, view, Identity): orthogonal, its own inverse's adjoint."""

    bijective = True
    injective = True
    orthogonal = True

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], *, dtype: torch.dtype = torch.float64,
                 device: torch.device | str = "cpu") -> None:
        if _prod(in_shape) != _prod(out_shape):
            raise InputError(f"cannot reshape {tuple(in_shape)} to {tuple(out_shape)}")
        super().__init__(in_shape, out_shape, dtype=dtype, device=device)

    def _matvec(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.out_shape)

    def _rmatvec(self, y: torch.Tensor) -> torch.Tensor:
        return y.reshape(y.shape[0], *self.in_shape)

    def astype(self, dtype: torch.dtype) -> ReshapeOperator:
        return ReshapeOperator(self.in_shape, self.out_shape, dtype=dtype, device=self.device)


class ConvOperator(TorchLinearOperator):
    """``nn.Conv1d/2d/3d`` without bias, any stride, padding (and ``padding_mode``),
    dilation and groups, on inputs of any spatial size.

    The adjoint is ``torch.nn.grad.conv*_input`` (a transposed convolution with the right
    output padding) for zero padding; for reflect/replicate/circular padding the padding
    step is itself linear and its adjoint comes from autograd.
    """

    _conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
    _conv_input = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input,  # type: ignore[attr-defined]
                   3: torch.nn.grad.conv3d_input}  # type: ignore[attr-defined]

    def __init__(self, weight: torch.Tensor, in_shape: Sequence[int], *, stride: Sequence[int],
                 padding: Sequence[int] | str, dilation: Sequence[int], groups: int = 1,
                 padding_mode: str = "zeros", dtype: torch.dtype = torch.float64) -> None:
        self._init = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, padding_mode=padding_mode)
        d = weight.ndim - 2
        if d not in self._conv:
            raise InputError(f"unsupported convolution weight of shape {tuple(weight.shape)}")
        in_shape = tuple(int(s) for s in in_shape)
        if len(in_shape) != d + 1:
            raise InputError(f"a {d}-D convolution needs input shape (C, {', '.join('S' * d)}), got {in_shape}")
        if in_shape[0] != weight.shape[1] * groups:
            raise InputError(f"convolution expects {weight.shape[1] * groups} input channels, got {in_shape[0]}")
        self.weight = weight.detach().to(dtype).clone()
        self.stride = tuple(stride)
        self.dilation = tuple(dilation)
        self.groups = int(groups)
        self.padding_mode = padding_mode
        self.kernel_size = tuple(weight.shape[2:])
        if isinstance(padding, str):
            if padding == "valid":
                padding = (0,) * d
            elif padding == "same":
                # PyTorch's 'same' pads total = dilation*(k-1), the extra one on the right.
                totals = [self.dilation[i] * (self.kernel_size[i] - 1) for i in range(d)]
                self._pad_lr = [(t // 2, t - t // 2) for t in totals]
                padding = None  # type: ignore[assignment]
            else:
                raise InputError(f"unknown padding {padding!r}")
        if padding is not None:
            self._pad_lr = [(int(p), int(p)) for p in padding]
        self.d = d
        # Zero padding that is symmetric goes straight into the convolution; anything else is
        # an explicit (linear) padding step followed by an unpadded convolution.
        self._symmetric_zero = padding_mode == "zeros" and all(a == b for a, b in self._pad_lr)
        out_spatial = []
        for i in range(d):
            size = in_shape[1 + i] + sum(self._pad_lr[i])
            eff = self.dilation[i] * (self.kernel_size[i] - 1) + 1
            if size < eff:
                raise InputError(f"input of spatial size {in_shape[1:]} is smaller than the kernel")
            out_spatial.append((size - eff) // self.stride[i] + 1)
        super().__init__(in_shape, (weight.shape[0], *out_spatial), dtype=dtype, device=weight.device)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        flat = [v for pair in reversed(self._pad_lr) for v in pair]
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return F.pad(x, flat, mode=mode)

    def _matvec(self, x: torch.Tensor) -> torch.Tensor:
        conv = self._conv[self.d]
        if self._symmetric_zero:
            return conv(x, self.weight, None, self.stride, [p for p, _ in self._pad_lr], self.dilation, self.groups)
        return conv(self._pad(x), self.weight, None, self.stride, 0, self.dilation, self.groups)

    def _rmatvec(self, y: torch.Tensor) -> torch.Tensor:
        if self._symmetric_zero:
            return self._conv_input[self.d]((y.shape[0], *self.in_shape), self.weight, y, self.stride,
                                            [p for p, _ in self._pad_lr], self.dilation, self.groups)
        padded_shape = [y.shape[0], self.in_shape[0]] + [
            self.in_shape[1 + i] + sum(self._pad_lr[i]) for i in range(self.d)]
        g = self._conv_input[self.d](padded_shape, self.weight, y, self.stride, 0, self.dilation, self.groups)
        _, pad_vjp = torch.func.vjp(self._pad, torch.zeros(y.shape[0], *self.in_shape, dtype=y.dtype,  # type: ignore[misc]
                                                           device=y.device))
        return pad_vjp(g)[0]

    def astype(self, dtype: torch.dtype) -> ConvOperator:
        return ConvOperator(self.weight, self.in_shape, dtype=dtype, **self._init)  # type: ignore[arg-type]

    def kernel_matrix(self) -> torch.Tensor:
        """The vectorised kernels as a ``(C_out, C_in * prod(k))`` matrix (groups expanded
        into a block-diagonal layout), whose rank Corollary 1 asks about."""
        c_out, c_in_g = self.weight.shape[:2]
        kk = _prod(self.kernel_size)
        full = torch.zeros(c_out, self.in_shape[0] * kk, dtype=self.dtype, device=self.device)
        per_group = c_out // self.groups
        for g in range(self.groups):
            rows = slice(g * per_group, (g + 1) * per_group)
            cols = slice(g * c_in_g * kk, (g + 1) * c_in_g * kk)
            full[rows, cols] = self.weight[rows].reshape(per_group, -1)
        return full


class FunctionOperator(TorchLinearOperator):
    """Any linear torch function (average pooling, a permutation of axes, padding, ...). The
    adjoint comes from autograd's vector-Jacobian product, which is exact for a linear map.

    ``bijective``/``injective`` are structural facts the caller vouches for (a permutation
    of axes is bijective, concatenation with a constant injective); they let the rank
    analysis skip such factors.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], in_shape: Sequence[int], *,
                 dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
                 out_shape: Sequence[int] | None = None, name: str = "function", bijective: bool = False,
                 injective: bool = False, orthogonal: bool = False) -> None:
        if out_shape is None:
            with torch.no_grad():
                out_shape = tuple(fn(torch.zeros(1, *in_shape, dtype=dtype, device=device)).shape[1:])
        super().__init__(in_shape, out_shape, dtype=dtype, device=device)
        if bijective and self.n != self.m:
            raise InputError(f"{name}: a bijection needs as many outputs as inputs ({self.m} vs {self.n})")
        self.fn = fn
        self.name = name
        self.bijective = bijective or orthogonal
        self.injective = injective or bijective or orthogonal
        self.orthogonal = orthogonal

    def __repr__(self) -> str:
        return f"FunctionOperator({self.name}, in_shape={self.in_shape}, out_shape={self.out_shape})"

    def _matvec(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def _rmatvec(self, y: torch.Tensor) -> torch.Tensor:
        x0 = torch.zeros(y.shape[0], *self.in_shape, dtype=y.dtype, device=y.device)
        _, vjp = torch.func.vjp(self.fn, x0)  # type: ignore[misc]
        return vjp(y)[0]

    def astype(self, dtype: torch.dtype) -> FunctionOperator:
        # fn must follow its input's dtype (pooling does; layers.py casts captured weights).
        return FunctionOperator(self.fn, self.in_shape, dtype=dtype, device=self.device, out_shape=self.out_shape,
                                name=self.name, bijective=self.bijective, injective=self.injective,
                                orthogonal=self.orthogonal)


class ComposedOperator(TorchLinearOperator):
    """``factors[-1] @ ... @ factors[0]``: the factors are applied in list order."""

    def __init__(self, factors: Sequence[TorchLinearOperator]) -> None:
        flat: list[TorchLinearOperator] = []
        for f in factors:
            flat.extend(f.factors if isinstance(f, ComposedOperator) else [f])  # type: ignore[has-type]
        if not flat:
            raise InputError("a composition needs at least one factor")
        for a, b in zip(flat, flat[1:]):
            if a.out_shape != b.in_shape:
                raise InputError(f"cannot compose: {a} gives {a.out_shape}, {b} expects {b.in_shape}")
            if a.dtype != b.dtype:
                raise InputError("cannot compose operators of different dtypes")
        super().__init__(flat[0].in_shape, flat[-1].out_shape, dtype=flat[0].dtype, device=flat[0].device)
        self.factors = flat
        self.bijective = all(f.bijective for f in flat)
        self.injective = all(f.injective for f in flat)
        self.orthogonal = all(f.orthogonal for f in flat)

    def __repr__(self) -> str:
        return " -> ".join(repr(f) for f in self.factors)

    def _matvec(self, x: torch.Tensor) -> torch.Tensor:
        for f in self.factors:
            x = f._matvec(x)
        return x

    def _rmatvec(self, y: torch.Tensor) -> torch.Tensor:
        for f in reversed(self.factors):
            y = f._rmatvec(y)
        return y

    def astype(self, dtype: torch.dtype) -> ComposedOperator:
        return ComposedOperator([f.astype(dtype) for f in self.factors])


def _same_space(ops: Sequence[TorchLinearOperator], what: str) -> None:
    for op in ops[1:]:
        if op.in_shape != ops[0].in_shape:
            raise InputError(f"cannot {what}: input shapes {ops[0].in_shape} and {op.in_shape} differ")
        if op.dtype != ops[0].dtype:
            raise InputError(f"cannot {what} operators of different dtypes ({ops[0].dtype}, {op.dtype})")


class AdjointOperator(TorchLinearOperator):
    """``A^T``: ``matvec`` is ``A``'s ``rmatvec`` and the other way round."""

    def __init__(self, op: TorchLinearOperator) -> None:
        super().__init__(op.out_shape, op.in_shape, dtype=op.dtype, device=op.device)
        self.op = op
        self.orthogonal = op.orthogonal
        self.bijective = op.bijective

    @property
    def H(self) -> TorchLinearOperator:
        return self.op

    def _matvec(self, x: torch.Tensor) -> torch.Tensor:
        return self.op._rmatvec(x)

    def _rmatvec(self, y: torch.Tensor) -> torch.Tensor:
        return self.op._matvec(y)

    def astype(self, dtype: torch.dtype) -> AdjointOperator:
        return AdjointOperator(self.op.astype(dtype))


class SumOperator(TorchLinearOperator):
    """``sum_i c_i A_i`` over operators with the same input and output shapes."""

    def __init__(self, terms: Sequence[tuple[float, TorchLinearOperator]]) -> None:
        ops = [op for _, op in terms]
        if not ops:
            raise InputError("a sum needs at least one operator")
        _same_space(ops, "add")
        for op in ops[1:]:
            if op.out_shape != ops[0].out_shape:
                raise InputError(f"cannot add: output shapes {ops[0].out_shape} and {op.out_shape} differ")
        super().__init__(ops[0].in_shape, ops[0].out_shape, dtype=ops[0].dtype, device=ops[0].device)
        self.terms = [(float(c), op) for c, op in terms]

    def _matvec(self, x: torch.Tensor) -> torch.Tensor:
        return sum(c * op._matvec(x) for c, op in self.terms)  # type: ignore[return-value]

    def _rmatvec(self, y: torch.Tensor) -> torch.Tensor:
        return sum(c * op._rmatvec(y) for c, op in self.terms)  # type: ignore[return-value]

    def astype(self, dtype: torch.dtype) -> SumOperator:
        return SumOperator([(c, op.astype(dtype)) for c, op in self.terms])


class StackedOperator(TorchLinearOperator):
    """``[A_1; A_2; ...]``: operators on the same input, outputs flattened and concatenated
    (``m = sum m_i``). Its nullspace is the intersection of theirs."""

    def __init__(self, ops: Sequence[TorchLinearOperator]) -> None:
        ops = list(ops)
        if not ops:
            raise InputError("a stack needs at least one operator")
        _same_space(ops, "stack")
        super().__init__(ops[0].in_shape, (sum(op.m for op in ops),), dtype=ops[0].dtype, device=ops[0].device)
        self.ops = ops
        self.injective = any(op.injective for op in ops)

    def _matvec(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([op._matvec(x).reshape(x.shape[0], -1) for op in self.ops], dim=1)

    def _rmatvec(self, y: torch.Tensor) -> torch.Tensor:
        out, start = None, 0
        for op in self.ops:
            part = op._rmatvec(y[:, start:start + op.m].reshape(y.shape[0], *op.out_shape))
            out = part if out is None else out + part
            start += op.m
        assert out is not None
        return out

    def astype(self, dtype: torch.dtype) -> StackedOperator:
        return StackedOperator([op.astype(dtype) for op in self.ops])


def vstack(ops: Sequence[TorchLinearOperator]) -> StackedOperator:
    """The operators stacked vertically (:class:`StackedOperator`): ``N(vstack) = ∩ N(A_i)``."""
    return StackedOperator(ops)
