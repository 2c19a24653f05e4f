"""The paper's layer sets H^(l) (Definition 2, Lemmas 1.1-1.6) at a given sample.

``H^(l) = {delta : f(z + delta) = f(z)}`` for one layer ``f`` at its input ``z`` (one sample,
no batch axis). Each kind of layer gets its own typed set:

* :class:`ZeroSet` (Lemma 1.1): an injective layer ignores nothing, ``H = {0}``. Injective
  here: ``Sigmoid``, ``Tanh``, ``LeakyReLU`` (slope > 0), ``ELU`` (alpha > 0), ``SELU``, and
  eval-mode ``BatchNorm`` whose scales ``weight / sqrt(var + eps)`` are all non-zero
  (:data:`INJECTIVE_LAYERS`).
* :class:`ReluSet` (Lemma 1.2): a polyhedron fixed by the sign pattern of ``z``.
* :class:`SoftmaxSet` (Lemma 1.3): constants along the softmax axis, ``span(1)``.
* :class:`SubspaceSet`: a nullspace from the linear core (:func:`harmless.harmless_subspace`),
  for average pooling (Lemma 1.4), any linear layer (Theorem 1), a BatchNorm with a zero
  scale, and two linear layers in a row (Lemma 1.6, :func:`two_linear_set`).
* :class:`MaxPoolSet` (Lemma 1.5): per window, every entry at most the window's maximum and
  the maximum still reached; a union of polyhedra, not convex.

Every set has ``contains(delta)`` (per sample, ``(B, *shape) -> (B,)`` bool),
``sample(n, generator=)`` (members, ``(n, *shape)``), ``dim`` (the dimension of the subspace
or of the polyhedron's affine hull; ``None`` for the non-convex max-pooling set) and a
``description``. :func:`layer_set` picks the set for a module.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import torch
from torch import nn

import harmless
from harmless.errors import InputError, TrainingModeWarning, UnsupportedLayerError
from harmless.linalg.operators import TorchLinearOperator
from harmless.nonlinear._common import (
    Shape,
    check_batch,
    check_count,
    check_rtol,
    check_sample,
    check_scale,
    default_generator,
    first_argmax,
    maxpool_windows,
    window_values,
)

#: Layers that are injective functions (Lemma 1.1, Theorem 2): their harmless set is {0}.
#: LeakyReLU needs a positive slope and ELU a positive alpha (otherwise two inputs share an
#: output); BatchNorm (eval) needs every scale weight / sqrt(running_var + eps) non-zero.
INJECTIVE_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class LayerSet(abc.ABC):
    """A layer's harmless set ``H^(l)`` at one sample ``z`` (shape ``shape``, dtype ``dtype``)."""

    #: Which lemma/kind: ``injective``, ``relu``, ``softmax``, ``subspace``, ``max-pool``.
    kind: str = ""
    #: Whether the set is convex (all but max pooling).
    convex: bool = True

    def __init__(self, shape: Sequence[int], dtype: torch.dtype) -> None:
        self.shape: Shape = tuple(int(s) for s in shape)
        self.dtype = dtype

    @property
    def ambient_dim(self) -> int:
        """The number of entries of the layer's input."""
        return int(torch.Size(self.shape).numel())

    @property
    @abc.abstractmethod
    def dim(self) -> int | None:
        """Dimension of the subspace or of the polyhedron's affine hull (``None``: not convex)."""

    @property
    @abc.abstractmethod
    def description(self) -> str:
        """One line: what the set is, which lemma, its size."""

    @abc.abstractmethod
    def contains(self, delta: torch.Tensor) -> torch.Tensor:
        """Per sample of ``delta`` ``(B, *shape)``: is it in the set? ``(B,)`` bool."""

    @abc.abstractmethod
    def sample(self, n: int, *, generator: torch.Generator | None = None, scale: float = 1.0) -> torch.Tensor:
        """``n`` members of the set, ``(n, *shape)``; ``scale`` sets the size of the free part."""

    def _batch(self, delta: torch.Tensor) -> torch.Tensor:
        return check_batch(delta, self.shape)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dim={self.dim})"


class ZeroSet(LayerSet):
    """Lemma 1.1: an injective layer; the only harmless perturbation is ``0``."""

    kind = "injective"

    def __init__(self, shape: Sequence[int], dtype: torch.dtype = torch.float64, *, layer: str = "layer") -> None:
        super().__init__(shape, dtype)
        self.layer = layer

    @property
    def dim(self) -> int:
        return 0

    @property
    def description(self) -> str:
        return f"{{0}} (Lemma 1.1): {self.layer} is injective, every non-zero change of its input changes its output"

    def contains(self, delta: torch.Tensor) -> torch.Tensor:
        d = self._batch(delta)
        return (d.reshape(d.shape[0], -1) == 0).all(dim=1)

    def sample(self, n: int, *, generator: torch.Generator | None = None, scale: float = 1.0) -> torch.Tensor:
        check_count(n)
        check_scale(scale)
        return torch.zeros(n, *self.shape, dtype=self.dtype)


class ReluSet(LayerSet):
    """Lemma 1.2: ``relu(z + delta) == relu(z)`` iff ``delta_i = 0`` where ``z_i > 0`` and
    ``delta_i <= -z_i`` where ``z_i <= 0``: a polyhedron whose affine hull is the span of the
    coordinates with ``z_i <= 0`` (``dim`` of them).

    Membership is exact by default (``rtol=0``): both tests are comparisons of floating-point
    numbers with ``-z_i``, which is exact, and a member leaves ``relu(z + delta)`` bitwise equal
    to ``relu(z)``. A positive ``rtol`` accepts deviations of ``rtol * max|z|`` (for a ``delta``
    that carries round-off of its own).
    """

    kind = "relu"

    def __init__(self, z: torch.Tensor) -> None:
        z = check_sample(z)
        super().__init__(z.shape, z.dtype)
        self.z = z
        self.free = z <= 0  # Lemma 1.2's convention: z_i = 0 is inactive (may move down)

    @property
    def dim(self) -> int:
        return int(self.free.sum())

    @property
    def description(self) -> str:
        return (f"ReLU polyhedron (Lemma 1.2): {self.dim} of {self.ambient_dim} units with z <= 0 may move by any "
                f"delta_i <= -z_i; the {self.ambient_dim - self.dim} positive ones must not move")

    def contains(self, delta: torch.Tensor, *, rtol: float = 0.0) -> torch.Tensor:
        d = self._batch(delta).to(self.dtype)
        tol = check_rtol(rtol) * float(self.z.abs().max())
        ok_active = torch.where(self.free, True, d.abs() <= tol)
        ok_free = torch.where(self.free, d <= -self.z + tol, True)
        return (ok_active & ok_free).reshape(d.shape[0], -1).all(dim=1)

    def sample(self, n: int, *, generator: torch.Generator | None = None, scale: float = 1.0) -> torch.Tensor:
        """Positive units fixed; each free unit at ``-z_i - scale * |g_i|`` (``g`` standard
        normal), and exactly at the boundary ``-z_i`` (the unit just reaches 0) with
        probability 1/4, so boundary points are sampled too."""
        check_count(n)
        scale = check_scale(scale)
        gen = default_generator(generator)
        g = torch.randn(n, *self.shape, generator=gen, dtype=torch.float64).abs().to(self.dtype)
        at_boundary = torch.rand(n, *self.shape, generator=gen) < 0.25
        g = torch.where(at_boundary, torch.zeros_like(g), g)
        out = torch.where(self.free, -self.z - scale * g, torch.zeros_like(g))
        return out


class SoftmaxSet(LayerSet):
    """Lemma 1.3: softmax along ``axis`` ignores adding the same constant to every entry of a
    slice, ``H = span(1)`` per slice (``dim`` = number of slices; 1 for a vector).

    Membership: the part of ``delta`` that varies along the axis is at most ``rtol`` times
    ``delta``'s norm (default ``100 * eps`` of the set's dtype); softmax(z + c) equals
    softmax(z) only to round-off, as ``z + c`` is rounded."""

    kind = "softmax"

    def __init__(self, z: torch.Tensor, axis: int = -1) -> None:
        z = check_sample(z)
        super().__init__(z.shape, z.dtype)
        if isinstance(axis, bool) or not isinstance(axis, int) or not -z.ndim <= axis < z.ndim:
            raise InputError(f"axis must be an int in [{-z.ndim}, {z.ndim}) for a sample of shape {tuple(z.shape)}")
        self.axis = axis % z.ndim
        self.z = z

    @property
    def dim(self) -> int:
        return self.ambient_dim // self.shape[self.axis]

    @property
    def description(self) -> str:
        return (f"span(1) along axis {self.axis} (Lemma 1.3): softmax ignores a constant added to all "
                f"{self.shape[self.axis]} entries of a slice; dim {self.dim} of {self.ambient_dim}")

    def contains(self, delta: torch.Tensor, *, rtol: float | None = None) -> torch.Tensor:
        d = self._batch(delta).to(self.dtype)
        tol = 100 * torch.finfo(self.dtype).eps if rtol is None else check_rtol(rtol)
        varying = d - d.mean(dim=self.axis + 1, keepdim=True)
        flat_var = varying.reshape(d.shape[0], -1).norm(dim=1)
        return flat_var <= tol * d.reshape(d.shape[0], -1).norm(dim=1)

    def sample(self, n: int, *, generator: torch.Generator | None = None, scale: float = 1.0) -> torch.Tensor:
        """One ``N(0, scale^2)`` constant per slice, repeated along the axis (exactly constant)."""
        check_count(n)
        scale = check_scale(scale)
        gen = default_generator(generator)
        shape = list(self.shape)
        shape[self.axis] = 1
        c = torch.randn(n, *shape, generator=gen, dtype=torch.float64).to(self.dtype) * scale
        return c.expand(n, *self.shape).clone()


class SubspaceSet(LayerSet):
    """A nullspace computed by the linear core (:class:`harmless.HarmlessSubspace`): average
    pooling (Lemma 1.4), a linear layer (Theorem 1), two linear layers (Lemma 1.6). It does
    not depend on the sample; ``space`` is the core's object."""

    kind = "subspace"

    def __init__(self, space: harmless.HarmlessSubspace, *, lemma: str = "Theorem 1", layer: str = "layer") -> None:
        super().__init__(space.input_shape, space.dtype)
        self.space = space
        self.lemma = lemma
        self.layer = layer

    @property
    def dim(self) -> int:
        return self.space.dim

    @property
    def description(self) -> str:
        return (f"nullspace ({self.lemma}) of {self.layer}: dim {self.dim} of {self.ambient_dim}, any size "
                f"(rank by {self.space.dim_method})")

    def contains(self, delta: torch.Tensor, *, rtol: float | None = None) -> torch.Tensor:
        return self.space.contains(self._batch(delta), rtol=rtol)

    def sample(self, n: int, *, generator: torch.Generator | None = None, scale: float = 1.0) -> torch.Tensor:
        """Uniform directions in the nullspace, of norm ``scale``."""
        check_count(n)
        scale = check_scale(scale)
        if self.dim == 0:
            return torch.zeros(n, *self.shape, dtype=self.dtype)
        return self.space.sample(n, generator=default_generator(generator)) * scale


class MaxPoolSet(LayerSet):
    """Lemma 1.5 for ``nn.MaxPool2d`` at ``z`` ``(C, H, W)``: for every window ``p`` with
    maximum ``c_p``, every entry obeys ``delta_i <= c_p - z_i`` and at least one entry reaches
    it (``delta_j == c_p - z_j``: the window's maximum is still attained). A union of
    polyhedra (one per choice of attaining entries), not convex: ``dim`` is ``None``.

    Windows may overlap (then an entry obeys the bound of every window it is in); entries in
    no window are free. Ties (several entries equal to ``c_p``) are handled: any of them may
    keep the maximum. Membership compares ``delta_i`` with ``c_p - z_i`` as computed in the
    set's dtype, exactly by default (``rtol=0``; a positive ``rtol`` allows
    ``rtol * max|z|``); the pooled output of a member equals the original to round-off (the
    entry that reaches ``c_p`` is ``z_j + (c_p - z_j)``, rounded).
    """

    kind = "max-pool"
    convex = False

    def __init__(self, pool: nn.MaxPool2d, z: torch.Tensor) -> None:
        z = check_sample(z, "z")
        super().__init__(z.shape, z.dtype)
        self.z = z
        self.windows = maxpool_windows(pool, self.shape)  # (C, K, L)
        flat = z.reshape(1, -1)
        vals = window_values(flat, self.windows, float("-inf"))[0]  # (C, K, L)
        self.maxima = vals.amax(dim=1)  # c_p, (C, L)
        # The bound c_p - z_i of each window entry, and per input entry the tightest one.
        self._gap = torch.where(self.windows >= 0, self.maxima.unsqueeze(1) - vals,
                                torch.full_like(vals, float("inf")))
        n = z.numel()
        bound = torch.full((n,), float("inf"), dtype=z.dtype)
        valid = self.windows >= 0
        bound.scatter_reduce_(0, self.windows[valid], self._gap[valid], reduce="amin")
        self.bound = bound  # u_i = min over windows containing i of (c_p - z_i); inf: in no window
        # Entries that can attain their window's maximum without breaking another window.
        self._candidate = valid & (self._gap == bound[self.windows.clamp_min(0)])
        self.ties = int(((vals == self.maxima.unsqueeze(1)) & valid).sum(dim=1).gt(1).sum())

    @property
    def dim(self) -> None:
        return None

    @property
    def n_windows(self) -> int:
        return int(self.maxima.numel())

    @property
    def description(self) -> str:
        return (f"max-pooling set (Lemma 1.5): {self.n_windows} windows, each entry at most its window's maximum and "
                f"the maximum still attained; a union of polyhedra, not convex ({self.ties} windows with tied maxima)")

    def contains(self, delta: torch.Tensor, *, rtol: float = 0.0) -> torch.Tensor:
        d = self._batch(delta).to(self.dtype)
        tol = check_rtol(rtol) * float(self.z.abs().max())
        dv = window_values(d.reshape(d.shape[0], -1), self.windows, 0.0)  # (B, C, K, L)
        slack = torch.where(self.windows >= 0, dv - self._gap, torch.full_like(dv, float("-inf")))
        below = (slack <= tol).reshape(d.shape[0], -1).all(dim=1)
        attained = (slack.amax(dim=2) >= -tol).reshape(d.shape[0], -1).all(dim=1)
        return below & attained

    def sample(self, n: int, *, generator: torch.Generator | None = None, scale: float = 1.0) -> torch.Tensor:
        """Per sample: every entry ``scale * |g|`` below its bound (entries in no window:
        ``scale * g``), then one random attaining entry per window set exactly to its bound."""
        check_count(n)
        scale = check_scale(scale)
        gen = default_generator(generator)
        size = self.z.numel()
        g = torch.randn(n, size, generator=gen, dtype=torch.float64).to(self.dtype) * scale
        covered = torch.isfinite(self.bound)
        out = torch.where(covered, self.bound.where(covered, torch.zeros_like(self.bound)) - g.abs(), g)
        # A random attaining entry per window, among those whose tightest bound is this window's.
        scores = torch.rand(n, *self._candidate.shape, generator=gen)
        scores = torch.where(self._candidate, scores, torch.full_like(scores, -1.0))
        pick = first_argmax(scores, dim=2)  # (n, C, L)
        flat_idx = torch.gather(self.windows.unsqueeze(0).expand(n, -1, -1, -1), 2, pick.unsqueeze(2)).squeeze(2)
        flat_idx = flat_idx.reshape(n, -1)
        out.scatter_(1, flat_idx, self.bound[flat_idx])
        return out.reshape(n, *self.shape)


def _eval_copy(layer: nn.Module, *, warn: bool = True) -> nn.Module:
    """An eval-mode copy: a freshly built Linear or pooling layer is in training mode, which
    changes nothing for it; only BatchNorm and Dropout differ, and layer_set warns for those."""
    import copy

    if warn and layer.training and any(isinstance(m, (*_BATCHNORMS, nn.Dropout)) for m in layer.modules()):
        import warnings

        warnings.warn(f"{type(layer).__name__} is in training mode; its set is that of eval mode",
                      TrainingModeWarning, stacklevel=3)
    return copy.deepcopy(layer).eval()


def _linear_space(layer: nn.Module | TorchLinearOperator, shape: Shape,
                  dtype: torch.dtype) -> harmless.HarmlessSubspace:
    return harmless.harmless_subspace(layer, shape, dtype=dtype)


def _bn_scale(bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    if bn.running_var is None:
        raise UnsupportedLayerError(f"{type(bn).__name__} without running statistics is not a fixed map")
    scale = 1.0 / torch.sqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    return scale


def layer_set(layer: nn.Module, z: torch.Tensor, *, name: str | None = None) -> LayerSet:
    """``H^(l)`` of ``layer`` at its input ``z`` (one sample, no batch axis).

    ReLU, Softmax, MaxPool2d and the injective activations are recognised by type; any other
    layer that the linear core folds as a whole (Linear, Conv, AvgPool, Flatten, BatchNorm
    with a zero scale, ...) gets its nullspace. Anything else is an
    :class:`~harmless.errors.UnsupportedLayerError` naming it.
    """
    import warnings

    if not isinstance(layer, nn.Module):
        raise InputError(f"layer must be a torch.nn.Module, got {type(layer).__name__}")
    z = check_sample(z)
    label = name or type(layer).__name__
    if layer.training and any(isinstance(m, (*_BATCHNORMS, nn.Dropout)) for m in layer.modules()):
        warnings.warn(f"{label} is in training mode; its set is that of eval mode (running statistics)",
                      TrainingModeWarning, stacklevel=2)
    if isinstance(layer, nn.ReLU):
        return ReluSet(z)
    if isinstance(layer, nn.Softmax):
        if layer.dim is None:
            raise UnsupportedLayerError(f"{label}: Softmax(dim=None) has no fixed axis; give dim explicitly")
        # The module's dim counts the batch axis; a sample has none.
        axis = layer.dim - 1 if layer.dim >= 0 else layer.dim
        if not -z.ndim <= axis < z.ndim:
            raise InputError(f"{label}: Softmax(dim={layer.dim}) does not fit a sample of shape {tuple(z.shape)}")
        return SoftmaxSet(z, axis)
    if isinstance(layer, nn.MaxPool2d):
        return MaxPoolSet(layer, z)
    if isinstance(layer, (nn.MaxPool1d, nn.MaxPool3d, nn.AdaptiveMaxPool2d)):
        raise UnsupportedLayerError(f"{label} ({type(layer).__name__}): only nn.MaxPool2d has a set here")
    if isinstance(layer, (nn.Sigmoid, nn.Tanh, nn.SELU)):
        return ZeroSet(z.shape, z.dtype, layer=label)
    if isinstance(layer, nn.LeakyReLU):
        if layer.negative_slope > 0:
            return ZeroSet(z.shape, z.dtype, layer=label)
        raise UnsupportedLayerError(f"{label}: LeakyReLU with slope {layer.negative_slope} <= 0 is not injective "
                                    "and has no set here")
    if isinstance(layer, nn.ELU):
        if layer.alpha > 0:
            return ZeroSet(z.shape, z.dtype, layer=label)
        raise UnsupportedLayerError(f"{label}: ELU with alpha {layer.alpha} <= 0 is not injective and has no set here")
    if isinstance(layer, _BATCHNORMS) and bool((_bn_scale(layer) != 0).all()):
        return ZeroSet(z.shape, z.dtype, layer=label)
    run = harmless.linear_run(_eval_copy(layer, warn=False), tuple(z.shape), dtype=z.dtype)
    if run.stop_kind != "output":
        raise UnsupportedLayerError(f"{label} ({type(layer).__name__}) has no known harmless set: it is not one of "
                                    "ReLU, Softmax, MaxPool2d, the injective activations, nor a linear layer "
                                    f"({run.stop_reason or run.stop_kind})")
    lemma = "Lemma 1.4" if isinstance(layer, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)) else "Theorem 1"
    space = _linear_space(run.operator, tuple(z.shape), z.dtype)
    if space.dim == 0:
        return ZeroSet(z.shape, z.dtype, layer=label)
    return SubspaceSet(space, lemma=lemma, layer=label)


class TwoLinearSet(SubspaceSet):
    """Lemma 1.6: two linear layers ``A2 A1``; ``P = P^(0) ∪ P^(1) = N(A2 A1)``.

    ``first_dim`` is ``dim N(A1)`` (``P^(0)``), ``dim`` is ``dim N(A2 A1)``; the difference is
    ``dim(N(A2) ∩ C(A1))``, what the second layer adds."""

    def __init__(self, space: harmless.HarmlessSubspace, first: harmless.HarmlessSubspace) -> None:
        super().__init__(space, lemma="Lemma 1.6", layer="A2 A1")
        self.first = first

    @property
    def first_dim(self) -> int:
        return self.first.dim

    @property
    def description(self) -> str:
        return (f"N(A2 A1) (Lemma 1.6): dim {self.dim} of {self.ambient_dim}; the first layer alone ignores "
                f"dim {self.first_dim}, the second adds {self.dim - self.first_dim} (N(A2) ∩ C(A1))")


def _as_operator(layer: nn.Module | TorchLinearOperator, shape: Shape, dtype: torch.dtype) -> TorchLinearOperator:
    if isinstance(layer, TorchLinearOperator):
        if layer.in_shape != shape:
            raise InputError(f"operator expects inputs {layer.in_shape}, got {shape}")
        return layer if layer.dtype == dtype else layer.astype(dtype)
    if not isinstance(layer, nn.Module):
        raise InputError(f"expected an nn.Module or a TorchLinearOperator, got {type(layer).__name__}")
    run = harmless.linear_run(_eval_copy(layer), shape, dtype=dtype)
    if run.stop_kind != "output":
        raise UnsupportedLayerError(f"{type(layer).__name__} is not linear as a whole "
                                    f"({run.stop_reason or run.stop_kind}); Lemma 1.6 needs linear layers")
    return run.operator


def two_linear_set(first: nn.Module | TorchLinearOperator, second: nn.Module | TorchLinearOperator,
                   input_shape: Sequence[int], *, dtype: torch.dtype = torch.float64) -> TwoLinearSet:
    """Lemma 1.6 for ``second(first(x))``: ``N(A2 A1)`` by the core's operator algebra
    (``A2 @ A1``) and :func:`harmless.harmless_subspace`. Layers may be modules the core folds
    (``nn.Linear``, ``nn.Conv2d``, ...) or :class:`~harmless.TorchLinearOperator` objects."""
    shape = tuple(int(s) for s in input_shape)
    a1 = _as_operator(first, shape, dtype)
    a2 = _as_operator(second, a1.out_shape, dtype)
    return TwoLinearSet(harmless.harmless_subspace(a2 @ a1, shape), harmless.harmless_subspace(a1, shape))
