"""Input sets P^(l) of ReLU networks at a sample (Lemma 1, Theorem 2): the exact convex piece.

For a network of affine layers (``nn.Linear``, ``nn.Conv2d``, ``nn.Flatten``,
:class:`harmless.nn.Normalize`, eval ``BatchNorm``, ... anything the linear core folds as a
whole), ``nn.ReLU`` and ``nn.MaxPool2d`` in an ``nn.Sequential``, the set of input
perturbations ``delta`` that leave the output of layer ``L`` unchanged at a sample ``x`` is
a union of polyhedra, one per activation region. :class:`HarmlessPiece` is the one that
contains ``delta = 0``, computed exactly:

* **inequalities** ``G delta <= h``: the activation pattern of every ReLU and the argmax of
  every max-pooling window before ``L`` is kept (units with ``z > 0`` stay ``>= 0``, units with
  ``z <= 0`` stay ``<= 0``, each window's first maximal entry stays maximal). On this region
  the network up to ``L`` is affine, ``z_L(x + delta) = z_L(x) + J_L delta``;
* **equalities and inequalities of layer L** (the change at ``L``'s input lies in ``H``,
  Lemmas 1.2/1.5, or ``L`` is affine): for an affine ``L`` its output change ``J delta = 0``;
  for a ReLU the active units' change is 0 and the inactive ones stay ``<= 0``; for max pooling
  the maximal entry's change is 0 and the others stay at most the maximum.

So every ``delta`` in the piece leaves layer ``L``'s output, and everything after it, unchanged
in exact arithmetic (the network is affine on the piece). ``P^(l) ⊆ P^(l+1)``: the pieces of
consecutive layers are nested (the same tie rule everywhere).

What is **not** computed: the other pieces of the union (reached by flipping a unit's sign or
moving a window's argmax, e.g. a unit exactly at 0 may also turn on; Lemma 1's ``P`` is the
union over all layers and regions, exponential in general). Nothing here is a global statement
about perturbations outside the piece.

All algebra is in float64 on a float64 copy of the model, dense in the input dimension ``n``
(fine for MNIST-sized inputs; the Jacobian has ``n`` columns per layer).

Cost (LeNet on MNIST: ~2 s per image for all 13 layers on one core, 10-20x less than one SVD and
one LP over all tight rows per piece, ``benchmarks/bench_lemma1.py``), with the same dimensions:
``all_pieces`` links each piece to the one below it (nested in it), so asked in layer order a
piece tries the lower piece's inward direction first, which proves most tight rows strict without
an LP; a least-squares direction proves most of the rest, and the HiGHS LP runs only on the rows
left (:func:`_strict_rows`, checked, with the full LP as the fallback). ``E`` of full rank (the
conv layers before the first tied max pooling) is certified by one Cholesky factorisation of its
sparse Gram matrix instead of an SVD, the rank alone comes from singular values without vectors
where no basis is needed, an injective affine layer after an affine or max-pool layer reuses the
piece below, and the leading affine layers' Jacobian and pieces are computed once per network.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import scipy.linalg
import scipy.sparse
import torch
import torch.nn.functional as F
from torch import nn

import harmless
from harmless.errors import InputError, TrainingModeWarning, UnsupportedLayerError, VerificationError
from harmless.linalg.operators import TorchLinearOperator
from harmless.nonlinear._common import (
    Shape,
    check_batch,
    check_count,
    check_sample,
    check_scale,
    default_generator,
    first_argmax,
    maxpool_windows,
    window_values,
)

#: Relative change of the float64 network output below which ``certify`` calls it unchanged.
OUTPUT_RTOL = 1e-9

#: |G_i d| / ||G_i|| below this (d a unit direction inside the affine hull) is round-off: d is
#: parallel to row i's hyperplane.
_PARALLEL = 1e-12


def _left_singular(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All left singular vectors of ``a`` ``(n, k)`` (a square ``(n, n)`` ``U``) and its singular
    values. With ``k >= n`` the thin SVD already has a square ``U``; asking LAPACK for the full one
    would also build the ``(k, k)`` right factor, which at a LeNet pool layer (k ~ 5,000) cost
    ~10x the rest of the piece."""
    a = np.ascontiguousarray(a)
    u, s, _ = scipy.linalg.svd(a, full_matrices=a.shape[1] < a.shape[0])
    return u, s


#: Cholesky of ``E^T E - mu I`` with ``mu`` this times ``||E^T E||_1`` (>= sigma_max(E)^2) certifies
#: ``sigma_min(E) >= ~1e-3 sigma_max(E)``: far above the SVD's rank threshold ``max(m, n) eps
#: sigma_max`` and above the Gram matrix's round-off (<= m n eps sigma_max^2, ~1e-9 at LeNet's conv1).
_CHOLESKY_SHIFT = 1e-6

#: A tight row is strict at y when ``G_i y <= -_STRICT ||y||`` (rows of unit norm), and is at 0 when
#: ``|G_i y| <= _AT_ZERO ||y||``: both far above the round-off of ``G_i y`` (~ k eps ||y||).
_STRICT = 1e-8
_AT_ZERO = 1e-10

#: ``||E d|| <= _IN_HULL sigma_max(E)`` for a unit ``d``: ``d`` lies in ``{E d = 0}`` to round-off.
_IN_HULL = 1e-12


def _full_rank(e: np.ndarray) -> bool:
    """Whether ``e`` ``(m, n)`` has rank ``n`` with a wide margin, by one Cholesky factorisation of
    its (shifted) Gram matrix: ``True`` only where the SVD would also call it full rank; ``False``
    (not certified) sends the caller to the SVD. The Gram matrix is formed sparse where ``e`` is
    (a conv layer's Jacobian rows hold ~25 of 784 entries): ~50x cheaper than the SVD at LeNet's conv1."""
    m, n = e.shape
    if m < n or n == 0:
        return False
    if np.count_nonzero(e) < 0.1 * e.size:
        sparse = scipy.sparse.csr_matrix(e)
        gram = np.asarray((sparse.T @ sparse).toarray())
    else:
        gram = e.T @ e
    bound = float(np.abs(gram).sum(axis=0).max())
    if not bound > 0 or not np.isfinite(bound):
        return False
    gram[np.diag_indices(n)] -= _CHOLESKY_SHIFT * bound
    try:
        scipy.linalg.cholesky(gram, lower=True, overwrite_a=True, check_finite=False)
    except np.linalg.LinAlgError:
        return False
    return True


def _strict_by_lp(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For the cone ``{y : a y <= 0}`` (``a`` ``(t, k)``, unit rows): which rows can be strict
    (``< 0``) somewhere in it, and a ``y`` that makes all of them strict, by one HiGHS LP:
    max sum(s) s.t. ``a y + s <= 0``, ``0 <= s <= 1``. Any row that can be made strict gets
    ``s = 1`` at the optimum (the cone is closed under addition), an implicit equality ``s = 0``.
    Unbounded coordinates of ``y`` come back large; only its direction matters."""
    import scipy.optimize  # here, not at import time: `import harmless` should not pay for it

    t, k = a.shape
    res = scipy.optimize.linprog(np.concatenate([np.zeros(k), -np.ones(t)]),
                                 A_ub=scipy.sparse.hstack([scipy.sparse.csr_matrix(a), scipy.sparse.eye(t)]).tocsr(),
                                 b_ub=np.zeros(t), bounds=[(None, None)] * k + [(0, 1)] * t, method="highs")
    if res.status != 0:
        raise VerificationError(f"the implicit-equality LP failed: {res.message}")
    return res.x[k:] >= 0.5, res.x[:k]


def _strict_start(a: np.ndarray, hint: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """A point ``y`` of the cone ``{y : a y <= 0}`` (to round-off) and the rows it makes strict,
    without an LP: from ``hint`` (the inward direction of the nested piece one layer down, already
    in this cone in exact arithmetic), else from the least-squares solution of ``a y = -1``; the
    rows it leaves non-strict are projected out (``y`` moved into their null space) until none is
    violated. Every row it calls strict is strict (a certificate); the rest go to the LP."""
    t, k = a.shape
    best: tuple[np.ndarray, np.ndarray] = (np.zeros(k), np.zeros(t, dtype=bool))
    starts: list[np.ndarray | None] = [hint] if hint is not None else []
    starts.append(None)  # the least-squares start, made only if the hint leaves rows undecided
    for y in starts:
        if y is None:
            y = np.linalg.lstsq(a, -np.ones(t), rcond=None)[0]
        for _ in range(8):
            norm = float(np.linalg.norm(y))
            if not norm > 0:
                break
            v = a @ y
            strict = v <= -_STRICT * norm
            rest = ~strict
            if not np.any(v[rest] > _AT_ZERO * norm):
                if strict.sum() > best[1].sum():
                    best = (y / norm, strict)
                break
            y = y - np.linalg.lstsq(a[rest], v[rest], rcond=None)[0]
        if best[1].all():
            break
    return best


def _strict_rows(a: np.ndarray, hint: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Which rows of the cone ``{y : a y <= 0}`` (unit rows) can be strict, and a unit ``y`` of
    the cone strict on all of them: :func:`_strict_start` proves most rows strict without an LP,
    the LP (:func:`_strict_by_lp`) runs on the rest only. The rows proven strict can be left out
    of it: with ``y1`` strict on them and ``y2`` from the LP on the rest, ``y1 + eps y2`` is in the
    cone and strict on both for ``eps`` small enough. The result is checked; where the check fails
    the LP runs on all rows, as before."""
    y1, strict = _strict_start(a, hint)
    rest = np.flatnonzero(~strict)
    y = y1
    if rest.size:
        lp_strict, y2 = _strict_by_lp(a[rest])
        strict = strict.copy()
        strict[rest[lp_strict]] = True
        n2 = float(np.linalg.norm(y2))
        if lp_strict.any() and n2 > 0:
            y2 = y2 / n2
            if np.any(y1):
                v1, v2 = a @ y1, a @ y2
                grow = (v2 > 0) & (v1 < 0)
                eps = 0.5 * min(1.0, float(np.min(-v1[grow] / v2[grow]))) if grow.any() else 1.0
                y = y1 + eps * y2
            else:
                y = y2
    if strict.any():
        v = a @ y
        norm = float(np.linalg.norm(y))
        if not (norm > 0 and np.all(v[strict] < 0) and np.all(v[~strict] <= _AT_ZERO * norm)):
            strict, y = _strict_by_lp(a)  # round-off defeated the shortcut: the full LP, as before
    return strict, y

@dataclass
class _Step:
    name: str
    kind: str  # "affine", "relu" or "max-pool"
    module: nn.Module
    in_shape: Shape
    out_shape: Shape
    operator: TorchLinearOperator | None = None
    windows: torch.Tensor | None = None


@dataclass
class _Constraints:
    """``E delta = 0`` and ``G delta <= h`` (dense, float64, rows over the flat input)."""

    E: np.ndarray
    G: np.ndarray
    h: np.ndarray

    @staticmethod
    def empty(n: int) -> _Constraints:
        return _Constraints(np.zeros((0, n)), np.zeros((0, n)), np.zeros(0))


@dataclass
class _StepTrace:
    keep: _Constraints  # the pattern of this step kept (empty for affine steps)
    last: _Constraints  # this step's output unchanged


@dataclass
class Certificate:
    """Per sample of a batch of perturbations: the piece's constraints checked, and the model run.

    ``equality_residual``: ``||M delta|| / (sigma_max(M) ||delta||)`` (M: the equalities,
    implicit ones included); ``max_violation``: the largest ``(G delta - h)_i / (|h_i| +
    ||G_i|| ||delta||)`` (<= 0 inside); ``contains``: both within ``rtol``;
    ``layer_change``/``output_change``: ``||f(x + delta) - f(x)|| / ||f(x)||`` at layer ``L``'s
    output and at the network's output, by running the float64 model; ``output_unchanged``:
    ``output_change <= 1e-9``.
    """

    equality_residual: torch.Tensor
    max_violation: torch.Tensor
    contains: torch.Tensor
    layer_change: torch.Tensor
    output_change: torch.Tensor
    output_unchanged: torch.Tensor


class ReluNetwork:
    """A ReLU network (``nn.Sequential`` of affine layers, ``nn.ReLU`` and ``nn.MaxPool2d``;
    nested ``nn.Sequential`` are flattened) prepared for per-sample harmless sets.

    Settings here, data in the calls: ``piece(sample, layer)`` for one sample,
    ``pieces(x, layer)`` for a batch (one piece per sample), ``all_pieces(sample)`` for every
    layer from one forward pass. ``rtol`` is the default tolerance of membership tests.
    """

    def __init__(self, model: nn.Module, input_shape: Sequence[int], *, rtol: float = 1e-9) -> None:
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        shape = tuple(int(s) for s in input_shape) if isinstance(input_shape, (tuple, list, torch.Size)) else None
        if not shape or any(s < 1 for s in shape):
            raise InputError(f"input_shape must be a non-empty sequence of positive ints, got {input_shape!r}")
        if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not 0 < rtol < 1:
            raise InputError(f"rtol must be a number in (0, 1), got {rtol!r}")
        if model.training:
            warnings.warn("the model is in training mode; its harmless sets are those of eval mode. Call "
                          "model.eval() to silence this warning.", TrainingModeWarning, stacklevel=2)
        self.input_shape: Shape = shape
        self.rtol = float(rtol)
        # A float64 copy in eval mode: the caller's model (and its mode, dtype) stays untouched.
        self.model = copy.deepcopy(model).double().eval()
        self.steps = self._plan(self.model)
        self._injective: dict[int, bool] = {}  # per affine step, filled when first needed
        self._prefix_jacobian: dict[int, torch.Tensor] = {}  # the leading affine steps' (sample-independent)
        self._prefix_pieces: dict[int, HarmlessPiece] = {}  # and their pieces

    @property
    def n(self) -> int:
        return int(math.prod(self.input_shape))

    @property
    def layer_names(self) -> list[str]:
        """The layers, in order (dotted module names); ``layer=`` takes one of these or an index."""
        return [s.name for s in self.steps]

    # -- the plan ----------------------------------------------------------------------
    @staticmethod
    def _leaves(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
        if not isinstance(model, nn.Sequential) or type(model).forward is not nn.Sequential.forward:
            raise UnsupportedLayerError(
                f"{prefix or 'the model'} ({type(model).__name__}) is not an nn.Sequential with its plain forward; "
                "harmless sets of networks need a chain of layers")
        out = []
        for name, child in model.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(child, nn.Sequential):
                out.extend(ReluNetwork._leaves(child, full))
            else:
                out.append((full, child))
        return out

    def _plan(self, model: nn.Module) -> list[_Step]:
        leaves = self._leaves(model)
        if not leaves:
            raise InputError("the model has no layers")
        steps = []
        shape = self.input_shape
        for name, module in leaves:
            try:
                with torch.no_grad():
                    out_shape = tuple(module(torch.zeros(1, *shape, dtype=torch.float64)).shape[1:])
            except Exception as exc:
                raise InputError(f"layer {name!r} ({type(module).__name__}) does not accept inputs of shape "
                                 f"{shape}: {exc}") from exc
            if isinstance(module, nn.ReLU):
                steps.append(_Step(name, "relu", module, shape, out_shape))
            elif isinstance(module, nn.MaxPool2d):
                if module.return_indices:
                    raise UnsupportedLayerError(f"layer {name!r}: MaxPool2d(return_indices=True) is not supported")
                steps.append(_Step(name, "max-pool", module, shape, out_shape, windows=maxpool_windows(module, shape)))
            else:
                run = harmless.linear_run(module, shape, dtype=torch.float64)
                if run.stop_kind != "output":
                    raise UnsupportedLayerError(
                        f"layer {name!r} ({type(module).__name__}) is neither ReLU, MaxPool2d nor affine "
                        f"({run.stop_reason or run.stop_kind}); the exact pieces here are for ReLU networks")
                steps.append(_Step(name, "affine", module, shape, out_shape, operator=run.operator))
            shape = out_shape
        return steps

    def _index(self, layer: str | int | None) -> int:
        if layer is None:
            return len(self.steps) - 1
        if isinstance(layer, bool):
            raise InputError(f"layer must be a name, an index or None, got {layer!r}")
        if isinstance(layer, int):
            if not -len(self.steps) <= layer < len(self.steps):
                raise InputError(f"layer index {layer} is out of range for {len(self.steps)} layers")
            return layer % len(self.steps)
        if isinstance(layer, str):
            if layer not in self.layer_names:
                raise InputError(f"no layer named {layer!r}; the layers are {', '.join(self.layer_names)}")
            return self.layer_names.index(layer)
        raise InputError(f"layer must be a name, an index or None, got {type(layer).__name__}")

    # -- the forward pass with the Jacobian --------------------------------------------
    def _sample64(self, sample: torch.Tensor) -> torch.Tensor:
        z = check_sample(sample, "sample")
        if tuple(z.shape) != self.input_shape:
            raise InputError(f"sample must have shape {self.input_shape} (one sample, no batch axis), "
                             f"got {tuple(z.shape)}")
        return z.to(torch.float64)

    @torch.no_grad()
    def _trace(self, x: torch.Tensor, upto: int) -> list[_StepTrace]:
        n = self.n
        z = x
        jt = torch.eye(n, dtype=torch.float64).reshape(n, *self.input_shape)  # d z / d x_j, one row per j
        traces = []
        prefix = True  # up to the first ReLU or max pooling the Jacobian is the same for every sample
        for i, step in enumerate(self.steps[: upto + 1]):
            if step.kind == "affine":
                assert step.operator is not None
                z = step.module(z.unsqueeze(0))[0]
                if prefix and i in self._prefix_jacobian:
                    jt = self._prefix_jacobian[i]
                else:
                    jt = step.operator.matvec(jt)
                    if prefix:
                        self._prefix_jacobian[i] = jt
                j = jt.reshape(n, -1).T.numpy()
                if prefix:
                    j.flags.writeable = False  # shared by every sample's piece: nobody may write to it
                traces.append(_StepTrace(_Constraints.empty(n), _Constraints(j, np.zeros((0, n)), np.zeros(0))))
            elif step.kind == "relu":
                prefix = False
                zf = z.reshape(-1).numpy()
                j = jt.reshape(n, -1).T.numpy()
                act = zf > 0  # Lemma 1.2: z = 0 counts as inactive
                keep = _Constraints(np.zeros((0, n)), np.vstack([-j[act], j[~act]]),
                                    np.concatenate([zf[act], -zf[~act]]))
                last = _Constraints(j[act], j[~act], -zf[~act])
                traces.append(_StepTrace(keep, last))
                mask = torch.as_tensor(act).reshape(1, *step.in_shape)
                z = F.relu(z)
                jt = jt * mask
            else:
                prefix = False
                assert step.windows is not None
                w = step.windows
                z_row = z.reshape(1, -1)
                vals = window_values(z_row, w, float("-inf"))[0]  # (C, K, L)
                kstar = first_argmax(vals, dim=1)  # (C, L)
                jstar = torch.gather(w, 1, kstar.unsqueeze(1)).squeeze(1)  # flat index of each window's max
                others = (w >= 0) & (torch.arange(w.shape[1]).view(1, -1, 1) != kstar.unsqueeze(1))
                rows_i = w[others]
                rows_j = jstar.unsqueeze(1).expand_as(w)[others]
                j = jt.reshape(n, -1).T.numpy()
                zn = z_row[0].numpy()
                g = j[rows_i.numpy()] - j[rows_j.numpy()]
                h = zn[rows_j.numpy()] - zn[rows_i.numpy()]
                nontrivial = np.any(g != 0, axis=1)  # a zero row with h >= 0 says nothing
                g, h = g[nontrivial], h[nontrivial]
                keep = _Constraints(np.zeros((0, n)), g, h)
                last = _Constraints(j[np.unique(jstar.reshape(-1).numpy())], g, h)
                traces.append(_StepTrace(keep, last))
                z_out = step.module(z.unsqueeze(0))[0]
                picked = z.reshape(-1)[jstar.reshape(-1)].reshape(z_out.shape)
                if not torch.equal(picked, z_out):
                    raise VerificationError(f"layer {step.name!r}: the window maxima read here differ from MaxPool2d's")
                z = z_out
                jt = jt.reshape(n, -1)[:, jstar.reshape(-1)].reshape(n, *step.out_shape)
        return traces

    def _assemble(self, x: torch.Tensor, traces: list[_StepTrace], index: int, dtype: torch.dtype,
                  inner: HarmlessPiece | None = None) -> HarmlessPiece:
        parts = [t.keep for t in traces[:index]] + [traces[index].last]
        e_blocks = [p.E for p in parts if p.E.shape[0]]
        e = e_blocks[0] if len(e_blocks) == 1 else np.vstack([p.E for p in parts])  # one block: no copy
        g = [p.G for p in parts if p.G.shape[0]] or [np.zeros((0, self.n))]
        h = np.concatenate([p.h for p in parts])
        same = inner if inner is not None and self._keeps_hull(index) else None
        prefix = all(s.kind == "affine" for s in self.steps[: index + 1])
        if same is None and prefix:
            # The leading affine layers' pieces are the same for every sample (E constant, no
            # inequalities): the first one built is reused.
            same = self._prefix_pieces.get(index)
        piece = HarmlessPiece(self, index, x, e, g, h, dtype, inner=inner, same=same)
        if prefix and same is None:
            self._prefix_pieces[index] = piece
        return piece

    def _keeps_hull(self, index: int) -> bool:
        """Whether the piece at ``index`` is the piece one layer down, for every sample: this layer
        is affine and injective (certified by :func:`_full_rank` on its matrix, once per network)
        and the one before is affine or max pooling (whose kept pattern is its own piece's
        inequalities). Then ``E_index = B E_(index-1)`` with ``B`` of full column rank: the same
        null space, and the same inequalities, so the same piece."""
        if index == 0 or self.steps[index].kind != "affine" or self.steps[index - 1].kind == "relu":
            return False
        if index not in self._injective:
            step = self.steps[index]
            n_in, n_out = math.prod(step.in_shape), math.prod(step.out_shape)
            ok = False
            if n_out >= n_in and n_in <= 4096 and step.operator is not None:
                eye = torch.eye(n_in, dtype=torch.float64).reshape(n_in, *step.in_shape)
                with torch.no_grad():
                    ok = _full_rank(step.operator.matvec(eye).reshape(n_in, -1).T.numpy())
            self._injective[index] = ok
        return self._injective[index]

    # -- public ------------------------------------------------------------------------
    def piece(self, sample: torch.Tensor, layer: str | int | None = None) -> HarmlessPiece:
        """The exact convex piece of ``P`` at layer ``layer`` (default: the network's output)
        for one sample of shape ``input_shape``; ``sample`` is not modified."""
        index = self._index(layer)
        x = self._sample64(sample)
        return self._assemble(x, self._trace(x, index), index, sample.dtype)

    def pieces(self, x: torch.Tensor, layer: str | int | None = None) -> list[HarmlessPiece]:
        """One piece per sample of the batch ``x`` ``(B, *input_shape)`` (the sets are per sample)."""
        batch = check_batch(x, self.input_shape, "x")
        return [self.piece(s, layer) for s in batch]

    def all_pieces(self, sample: torch.Tensor) -> list[HarmlessPiece]:
        """The piece at every layer (``layer_names`` order) for one sample, from one forward pass."""
        x = self._sample64(sample)
        traces = self._trace(x, len(self.steps) - 1)
        pieces: list[HarmlessPiece] = []
        for i in range(len(self.steps)):
            # Each piece knows the one below it (nested in it): asked in order, layer by layer, a
            # piece reuses what the one below found (its inward direction, or its whole hull).
            pieces.append(self._assemble(x, traces, i, sample.dtype, pieces[-1] if pieces else None))
        return pieces

    @torch.no_grad()
    def outputs(self, x: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index``'s output and the network's output for a float64 batch."""
        z = x
        at = None
        for i, step in enumerate(self.steps):
            z = step.module(z)
            if i == index:
                at = z
        assert at is not None
        return at, z


class HarmlessPiece:
    """The exact convex piece of the harmless input set ``P^(l)`` that contains ``delta = 0``
    at one sample ``x`` (see :mod:`harmless.nonlinear.network`): ``E delta = 0``,
    ``G delta <= h``. Every member leaves the output of layer ``layer``, hence the network's
    output, unchanged in exact arithmetic; other pieces of the union are not computed.

    ``dim`` is the dimension of its affine hull: ``n - rank(M)``, ``M`` the equalities plus
    the inequalities that are tight at 0 and cannot be made strict (implicit equalities, found
    by one HiGHS LP; only ties, e.g. a unit exactly at 0, can create them), the rank by
    SciPy's SVD with NumPy's threshold ``max(M.shape) * eps * sigma_max``.
    """

    def __init__(self, network: ReluNetwork, index: int, x: torch.Tensor, e: np.ndarray,
                 g: np.ndarray | Sequence[np.ndarray], h: np.ndarray, dtype: torch.dtype, *,
                 inner: HarmlessPiece | None = None, same: HarmlessPiece | None = None) -> None:
        self.network = network
        self.index = index
        self.layer: str = network.steps[index].name
        self.input_shape = network.input_shape
        self.x = x  # float64, a private copy
        self.E, self.h = e, h
        # G's row blocks, stacked only when G itself is asked for (membership, sampling, extents):
        # LeNet's ~9,000 x 784 per layer cost more to stack than the piece's dimension.
        self._g_blocks = [g] if isinstance(g, np.ndarray) else list(g)
        # inner: the piece one layer down (nested in this one), whose inward direction is tried
        # first here; same: a piece with the same affine hull and the same inequalities (this
        # layer is an injective affine map after an affine or max-pool layer), whose hull is reused.
        self._inner, self._same = inner, same
        self.dtype = dtype  # samples come back in the sample's dtype

    @cached_property
    def G(self) -> np.ndarray:
        """The inequality rows ``G`` of ``G delta <= h`` (dense, float64, ``(n_inequalities, n)``)."""
        blocks = self._g_blocks
        return blocks[0] if len(blocks) == 1 else np.vstack(blocks)

    @property
    def _g_parts(self) -> list[np.ndarray]:
        """``G`` itself once it has been stacked, else its row blocks (not stacked for this)."""
        return [self.G] if "G" in self.__dict__ else self._g_blocks

    @cached_property
    def _g_norms(self) -> np.ndarray:
        """``||G_i||`` per row."""
        return np.sqrt(np.concatenate([np.einsum("ij,ij->i", b, b) for b in self._g_parts]))

    def _g_times(self, d: np.ndarray) -> np.ndarray:
        """``d @ G.T`` for ``d`` ``(B, n)``, block by block."""
        return np.hstack([d @ b.T for b in self._g_parts])

    def _g_rows(self, rows: np.ndarray) -> np.ndarray:
        """``G[rows]`` (``rows`` sorted) without stacking all of ``G``."""
        parts = self._g_parts
        if len(parts) == 1:
            return parts[0][rows]
        out, start = [], 0
        for block in parts:
            stop = start + block.shape[0]
            lo, hi = np.searchsorted(rows, [start, stop])
            if hi > lo:
                out.append(block[rows[lo:hi] - start])
            start = stop
        return np.vstack(out) if out else np.zeros((0, self.n))

    @property
    def n(self) -> int:
        return self.network.n

    @property
    def n_equalities(self) -> int:
        return int(self.E.shape[0])

    @property
    def n_inequalities(self) -> int:
        return int(self.h.shape[0])

    def __repr__(self) -> str:
        return (f"HarmlessPiece(layer={self.layer!r}, dim={self.dim}, n={self.n}, equalities={self.n_equalities}, "
                f"inequalities={self.n_inequalities})")

    # -- the affine hull -----------------------------------------------------------------
    @cached_property
    def _equality_null(self) -> tuple[np.ndarray, int]:
        """``(N, rank(E))``: ``N`` ``(n, n - rank(E))`` orthonormal columns spanning
        ``{d : E d = 0}``. One SVD of the tall ``E^T`` (rank with NumPy's threshold
        ``max(E.shape) * eps * sigma_max``), except where it is not needed: ``E`` certified of
        full rank by :func:`_full_rank` (then ``N`` is empty), or a piece ``same`` with the same
        null space (this layer an injective affine map of the previous one's output)."""
        if self._same is not None:
            return self._same._equality_null
        if self.E.shape[0] == 0:
            return np.eye(self.n), 0
        if _full_rank(self.E):
            return np.zeros((self.n, 0)), self.n
        u, s = _left_singular(self.E.T)
        self.__dict__["_smax_e"] = float(s[0]) if s.size else 0.0  # the cached_property, for free
        tol = max(self.E.shape) * np.finfo(np.float64).eps * float(s[0]) if s.size else 0.0
        # The rank decided once per piece: where _rank_e came first (singular values alone, the
        # same threshold) its decision stands, so that dim and the basis always agree.
        rank = self.__dict__.get("_rank_e", int(np.sum(s > tol)))
        return np.ascontiguousarray(u[:, rank:]), rank

    @cached_property
    def _rank_e(self) -> int:
        """``rank(E)``, from the singular values alone where the null basis is not needed (a piece
        without tight rows, or one whose rows the piece below already proved strict): several
        times cheaper than the SVD with all left singular vectors."""
        if "_equality_null" in self.__dict__ or self._same is not None:
            return self._equality_null[1]
        if self.E.shape[0] == 0:
            return 0
        if _full_rank(self.E):
            return self.n
        s = scipy.linalg.svdvals(self.E)
        self.__dict__["_smax_e"] = float(s[0]) if s.size else 0.0
        tol = max(self.E.shape) * np.finfo(np.float64).eps * float(s[0]) if s.size else 0.0
        return int(np.sum(s > tol))

    @cached_property
    def _smax_e(self) -> float:
        """``sigma_max(E)`` (0 without equalities)."""
        return float(scipy.linalg.svdvals(self.E)[0]) if self.E.size else 0.0

    @cached_property
    def implicit_equalities(self) -> np.ndarray:
        """Indices of inequality rows that hold with equality on the whole piece."""
        return self._tangent[0]

    @cached_property
    def _tangent(self) -> tuple[np.ndarray, np.ndarray | None]:
        """``(implicit, inward)``: the implicit equalities, and a direction ``d`` of the affine
        hull with ``G_i d < 0`` on every other row tight at 0 (``None`` when no row is tight:
        then 0 is in the piece's relative interior). Where 0 lies on the piece's boundary (ties
        in a max-pool window of zeros, LeNet's background), a random hull direction leaves the
        piece at once; ``sample`` steers into it along ``inward``.

        The rows that can be strict are found by :func:`_strict_rows`: most are proven strict
        by the inward direction of the piece one layer down (nested in this one, so already a
        direction into this piece) or by a least-squares direction, and one HiGHS LP decides
        the rest (only ties, e.g. a unit exactly at 0, can make a row implicit)."""
        if self._same is not None:
            return self._same._tangent
        tight = np.flatnonzero(self.h <= 0)
        if tight.size == 0:
            return tight, None
        gt = self._g_rows(tight)
        gt = gt / np.linalg.norm(gt, axis=1, keepdims=True)
        inner = self._inner
        below = inner._tangent[1] if inner is not None and "_tangent" in inner.__dict__ else None
        if below is not None and self._rank_e < self.n and np.all(gt @ below <= -_STRICT):
            # The piece below's inward direction (a unit vector, computed already: layers in order)
            # is strict on every tight row here and lies in this piece's hull (nested pieces; checked
            # to round-off): no implicit equality, and no null basis or LP needed.
            if np.linalg.norm(self.E @ below) <= _IN_HULL * self._smax_e:
                return tight[:0], below
        null = self._equality_null[0]
        # Work in the null space of E (d = N y): the LP shrinks from n + |E| to dim N rows and
        # columns. A tight row that vanishes there lies in E's row space: implicit by itself.
        gy = gt @ null
        free = np.linalg.norm(gy, axis=1) > _PARALLEL * max(1, null.shape[1]) ** 0.5
        if not np.any(free):
            return tight, None
        hint = None if below is None else null.T @ below
        strict_free, y = _strict_rows(gy[free], hint)
        strict = np.zeros(tight.size, dtype=bool)
        strict[np.flatnonzero(free)[strict_free]] = True
        inward = null @ y
        norm = float(np.linalg.norm(inward))
        return tight[~strict], (inward / norm if norm > 0 and strict.any() else None)

    @cached_property
    def _hull(self) -> tuple[int, float | None]:
        """The rank of ``M`` (equalities, implicit ones included) and the threshold of the last
        rank decision (``None``: that of ``E``, computed when asked). The rank is
        ``rank(E) + rank(G_I N)``, ``N`` spanning E's null space (exact in exact arithmetic; each
        by SVD with NumPy's threshold)."""
        if self._same is not None:
            return self._same._hull
        implicit = self.implicit_equalities
        if implicit.size == 0:
            return self._rank_e, None
        null, rank = self._equality_null
        if null.shape[1] == 0:
            return rank, None
        gi = self._g_rows(implicit)
        s = scipy.linalg.svdvals(np.ascontiguousarray((gi @ null).T))
        tol = max(gi.shape[0], null.shape[1]) * np.finfo(np.float64).eps * float(s[0]) if s.size else 0.0
        return rank + int(np.sum(s > tol)), tol

    @cached_property
    def _equations(self) -> tuple[np.ndarray, float]:
        """``M`` (equalities, implicit ones included) and an upper bound of its largest singular
        value, ``sqrt(sigma_max(E)^2 + sigma_max(G_I)^2)``: the equality residual's scale."""
        gi = self._g_rows(self.implicit_equalities)
        m = np.vstack([self.E, gi])
        smax = self._smax_e
        if gi.shape[0]:
            smax = float(np.hypot(smax, scipy.linalg.svdvals(gi)[0]))
        return m, smax

    @cached_property
    def _null_basis(self) -> np.ndarray:
        """``(n, dim)`` orthonormal columns spanning the affine hull (through 0)."""
        if self._same is not None:
            return self._same._null_basis
        null, rank_e = self._equality_null
        gi = self._g_rows(self.implicit_equalities)
        if gi.shape[0] == 0 or null.shape[1] == 0:
            return null
        inner_rank = self.rank - rank_e
        u, _ = _left_singular((gi @ null).T)
        return np.ascontiguousarray(null @ u[:, inner_rank:])

    @property
    def rank(self) -> int:
        """Rank of the equalities (implicit ones included)."""
        return self._hull[0]

    @property
    def rank_tolerance(self) -> float:
        """Singular values at most this counted as zero in the last rank decision (of ``E``, or of
        the implicit equalities inside E's null space): ``max(shape) * eps * sigma_max``."""
        tol = self._hull[1]
        return max(self.E.shape) * np.finfo(np.float64).eps * self._smax_e if tol is None else tol

    @property
    def dim(self) -> int:
        """Dimension of the piece's affine hull: ``n - rank``."""
        return self.n - self.rank

    def basis(self) -> torch.Tensor:
        """An orthonormal basis of the affine hull (through 0), ``(dim, *input_shape)`` float64."""
        return torch.as_tensor(np.ascontiguousarray(self._null_basis.T)).reshape(-1, *self.input_shape)

    @property
    def description(self) -> str:
        return (f"exact convex piece of P at layer {self.layer!r} containing 0: affine hull of dim {self.dim} of "
                f"{self.n} ({self.n_equalities} equalities, rank {self.rank}; {self.n_inequalities} inequalities "
                "keep the activation pattern); the other pieces of the union over activation regions are not "
                "computed")

    # -- membership ----------------------------------------------------------------------
    def _flat(self, delta: torch.Tensor) -> np.ndarray:
        d = check_batch(delta, self.input_shape)
        return d.to(torch.float64).reshape(d.shape[0], -1).cpu().numpy()

    def _tol(self, delta: torch.Tensor, rtol: float | None) -> float:
        tol = self.network.rtol if rtol is None else float(rtol)
        if not 0 < tol < 1:
            raise InputError(f"rtol must be a number in (0, 1), got {rtol!r}")
        # A perturbation rounded to a coarser dtype moves by half an ulp per entry.
        return max(tol, 10 * torch.finfo(delta.dtype).eps) if delta.is_floating_point() else tol

    def _residuals(self, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m, smax = self._equations
        dn = np.linalg.norm(d, axis=1)
        tiny = np.finfo(np.float64).tiny
        if m.shape[0]:
            eq = np.linalg.norm(d @ m.T, axis=1) / np.maximum(smax * dn, tiny)
        else:
            eq = np.zeros(d.shape[0])
        if self.n_inequalities:
            scale = np.abs(self.h)[None, :] + self._g_norms[None, :] * dn[:, None]
            viol = ((self._g_times(d) - self.h[None, :]) / np.maximum(scale, tiny)).max(axis=1)
        else:
            viol = np.full(d.shape[0], -np.inf)
        eq[dn == 0] = 0.0
        return eq, viol

    def contains(self, delta: torch.Tensor, *, rtol: float | None = None) -> torch.Tensor:
        """Per sample of ``delta`` ``(B, *input_shape)``: are the piece's constraints satisfied to
        ``rtol`` (default the network's, 1e-9; at least 10 eps of ``delta``'s dtype)?"""
        d = self._flat(delta)
        tol = self._tol(delta, rtol)
        eq, viol = self._residuals(d)
        return torch.as_tensor((eq <= tol) & (viol <= tol))

    def certify(self, delta: torch.Tensor, *, rtol: float | None = None) -> Certificate:
        """The constraints checked (as ``contains``) and the float64 model run on ``x + delta``."""
        d = self._flat(delta)
        tol = self._tol(delta, rtol)
        eq, viol = self._residuals(d)
        x = self.x.unsqueeze(0)
        base_l, base_o = self.network.outputs(x, self.index)
        pert_l, pert_o = self.network.outputs(x + torch.as_tensor(d).reshape(-1, *self.input_shape), self.index)

        def rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            diff = (a - b).reshape(a.shape[0], -1).norm(dim=1)
            return diff / b.reshape(b.shape[0], -1).norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)

        out = rel(pert_o, base_o)
        return Certificate(torch.as_tensor(eq), torch.as_tensor(viol), torch.as_tensor((eq <= tol) & (viol <= tol)),
                           rel(pert_l, base_l), out, out <= OUTPUT_RTOL)

    # -- extent and sampling -------------------------------------------------------------
    def extent(self, direction: torch.Tensor, *, rtol: float | None = None) -> float:
        """The largest ``t >= 0`` with ``x + t * direction`` in the piece (``inf``: unbounded;
        ``0``: ``direction`` leaves the affine hull), by an LP (SciPy ``linprog``, HiGHS)."""
        import scipy.optimize

        if not isinstance(direction, torch.Tensor):
            raise InputError(f"direction must be a torch.Tensor, got {type(direction).__name__}")
        d = self._flat(direction.unsqueeze(0))
        if not np.any(d):
            raise InputError("direction must be non-zero")
        eq, _ = self._residuals(d)
        if eq[0] > self._tol(direction, rtol):
            return 0.0
        gd = self._g_times(d)[0]
        # A row with |G_i d| at round-off level is one whose hyperplane contains d (in exact
        # arithmetic G_i d = 0, e.g. G_i in the row space of E): it never stops the step.
        tol = self._tol(direction, rtol)
        rows = gd > tol * self._g_norms * np.linalg.norm(d[0])
        if not np.any(rows):
            return math.inf
        res = scipy.optimize.linprog([-1.0], A_ub=gd[rows, None], b_ub=self.h[rows], bounds=[(0, None)],
                                     method="highs")
        if res.status == 3:
            return math.inf
        if res.status != 0:
            raise VerificationError(f"the extent LP failed: {res.message}")
        return float(res.x[0])

    def sample(self, n: int, *, generator: torch.Generator | None = None, scale: float | None = None) -> torch.Tensor:
        """``n`` members: a random unit direction ``d`` in the affine hull (tilted into the piece
        where 0 lies on its boundary, see ``_tangent``), times ``u * t_max(d)`` with
        ``u ~ U(0, 1)`` and ``t_max`` the largest step that stays in the piece (the ratio test on
        ``G d``); along directions where the piece is unbounded, ``scale * |N(0, 1)|``
        (default ``scale``: ``||x||``, or 1 for ``x = 0``). Returned in the sample's dtype."""
        check_count(n)
        if scale is None:
            scale = float(self.x.norm()) or 1.0
        else:
            scale = check_scale(scale)
        gen = default_generator(generator)
        if self.dim == 0:
            return torch.zeros(n, *self.input_shape, dtype=self.dtype)
        basis = self._null_basis
        coef = torch.randn(n, basis.shape[1], generator=gen, dtype=torch.float64).numpy()
        d = coef @ basis.T
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        inward = self._tangent[1]
        if inward is not None:
            # 0 on the boundary: d <- inward + eps * d, eps per sample half the largest that keeps
            # every strict tight row (G_i inward < 0) non-increasing, so the step enters the piece.
            implicit = np.zeros(self.n_inequalities, dtype=bool)
            implicit[self.implicit_equalities] = True
            rows = (self.h <= 0) & ~implicit
            g_rows = self._g_rows(np.flatnonzero(rows))
            g_in = g_rows @ inward  # < 0
            g_d = d @ g_rows.T
            with np.errstate(divide="ignore", invalid="ignore"):
                room = np.where(g_d > 0, -g_in[None, :] / g_d, np.inf).min(axis=1)
            eps = 0.5 * np.minimum(room, 1.0)
            d = inward[None, :] + eps[:, None] * d
            d /= np.linalg.norm(d, axis=1, keepdims=True)
        gd = self._g_times(d)  # (n, q)
        # As in extent(): |G_i d| at round-off level means d lies in that row's hyperplane.
        stops = gd > _PARALLEL * self._g_norms[None, :]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(stops, self.h[None, :] / gd, np.inf)
        tmax = ratio.min(axis=1) if ratio.shape[1] else np.full(n, np.inf)
        u = torch.rand(n, generator=gen, dtype=torch.float64).numpy()
        far = torch.randn(n, generator=gen, dtype=torch.float64).abs().numpy() * scale
        t = np.where(np.isfinite(tmax), u * np.where(np.isfinite(tmax), tmax, 0.0), far)
        return torch.as_tensor(d * t[:, None]).reshape(n, *self.input_shape).to(self.dtype)


def harmless_set(model: nn.Module, x: torch.Tensor, layer: str | int | None = None) -> list[HarmlessPiece]:
    """Per sample of ``x`` ``(B, *input_shape)``: the exact convex piece of the harmless input set
    at ``layer`` (a module name or index; default the network's output) that contains 0.

    A shortcut for ``ReluNetwork(model, x.shape[1:]).pieces(x, layer)``; build the
    :class:`ReluNetwork` once when analysing many batches."""
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        raise InputError("x must be a batch of samples, a tensor of shape (B, *input_shape)")
    batch = check_batch(x, tuple(x.shape[1:]), "x")
    return ReluNetwork(model, tuple(batch.shape[1:])).pieces(batch, layer)
