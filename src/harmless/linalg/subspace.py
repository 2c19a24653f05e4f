"""The harmless subspace of a model or operator: the nullspace of its linear prefix.

:func:`harmless_subspace` is the one public entry point: it validates the model, the input
shape and the dtype once, finds the linear run, and returns a :class:`HarmlessSubspace`
whose methods work matrix-free (CGLS with the operator and its adjoint) unless a dense
factorisation was affordable, in which case they use its exact orthonormal bases. A 2-D
convolutional stem with fewer outputs than inputs gets the fast projector of
:mod:`harmless.linalg.conv_projector` instead of CGLS (``project_method`` says which ran).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cached_property

import numpy as np
import scipy.linalg
import torch
from torch import nn

from harmless import validation
from harmless.errors import InputError, NoHarmlessSubspaceError, TooLargeError, VerificationError
from harmless.linalg.conv_projector import ConvProjector, build_conv_projector
from harmless.linalg.operators import (
    DEFAULT_DENSE_LIMIT,
    ComposedOperator,
    TokenwiseMatrixOperator,
    TorchLinearOperator,
)
from harmless.linalg.prefix import LinearRun, ModelCheck, check_on_model, linear_run
from harmless.linalg.rank import (
    DEFAULT_GRAM_LIMIT,
    RankResult,
    analyze_rank,
    gram_tol,
    right_singular_vectors,
    svd_rank,
)
from harmless.linalg.solvers import SolveInfo, row_space_component

#: CGLS operator passes (one image through A or A^T), summed over a subspace's projections, after
#: which it builds its fast convolutional-stem projector (about what that set-up costs at 224 px,
#: where CGLS takes ~1,000 passes per image: see ``HarmlessSubspace._harmful``).
FAST_PROJECTOR_AFTER_PASSES = 3000

_DEFAULT_RTOL = {torch.float64: 1e-13, torch.float32: 1e-6}


class HarmlessSubspace:
    """The nullspace ``N(A)`` of a linear operator ``A``, acting on inputs of ``input_shape``.

    Every perturbation ``delta`` with ``A delta = 0`` leaves the model's output unchanged,
    whatever its size. Methods take batches ``(B, *input_shape)`` and return tensors in the
    subspace's dtype on the input's device; inputs are never modified.

    ``dim`` is exact (``n - rank(A)``, Theorem 1); ``dim_method`` says how the rank was
    obtained (see :mod:`harmless.linalg.rank`).
    """

    def __init__(self, operator: TorchLinearOperator, *, run: LinearRun | None = None, rtol: float | None = None,
                 dense_limit: int = DEFAULT_DENSE_LIMIT, method: str = "auto") -> None:
        self.operator = operator
        self.run = run
        self.dtype = operator.dtype
        self.input_shape: tuple[int, ...] = operator.in_shape
        self.rtol = float(rtol if rtol is not None else _DEFAULT_RTOL[self.dtype])
        self._dense_limit = dense_limit
        self._method = method
        self.last_solve: SolveInfo | None = None
        #: How the last projection found the harmful part: ``injective``, ``tokenwise``, ``dense``
        #: (row basis of the SVD), ``conv-woodbury`` (the fast convolutional-stem projector, see
        #: :mod:`harmless.linalg.conv_projector`) or ``cgls``; ``None`` before the first.
        self.project_method: str | None = None
        #: CGLS operator passes (summed over calls) after which the fast convolutional-stem
        #: projector is built; 0 builds it on the first matrix-free projection.
        self.fast_projector_after = FAST_PROJECTOR_AFTER_PASSES
        self._cgls_passes = 0

    # -- sizes ---------------------------------------------------------------------------
    @property
    def ambient_dim(self) -> int:
        """``n``, the number of input entries."""
        return self.operator.n

    @property
    def output_dim(self) -> int:
        """``m``, the number of outputs of the linear prefix."""
        return self.operator.m

    @cached_property
    def rank_info(self) -> RankResult:
        """How the rank was found (method, singular values, gap), computed on first use."""
        return analyze_rank(self.operator, method=self._method, dense_limit=self._dense_limit, bases=False)

    @property
    def dim(self) -> int:
        """Dimension of the harmless subspace, ``n - rank(A)``."""
        return self.rank_info.dim

    @property
    def rank(self) -> int:
        """``rank(A)``."""
        return self.rank_info.rank

    @property
    def dim_method(self) -> str:
        """``dense-svd``, ``gram-cholesky``, ``gram-eigh``, ``structure`` or ``sweep-certificate``
        (see :mod:`harmless.linalg.rank` and :mod:`harmless.linalg.conv_certificate`)."""
        return self.rank_info.method

    @property
    def dim_is_lower_bound(self) -> bool:
        """True when the linear run stopped before the model's linear prefix ended (a branch,
        an unsupported step, a scope that could not be traced further): every element of this
        subspace is harmless, but the model's true harmless subspace may be larger."""
        return self.run is not None and not self.run.complete

    @property
    def known_dim(self) -> int | None:
        """``dim`` when an exact rank method fits, else ``None`` (never raises ``TooLargeError``)."""
        return self._exact_dim

    @cached_property
    def _exact_dim(self) -> int | None:
        """``dim`` when an exact rank method fits, else ``None`` (asked once: a failing rank
        analysis is not cached by ``rank_info`` and would otherwise be retried on every call)."""
        try:
            return self.dim
        except TooLargeError as exc:
            self._rank_failure = str(exc)
            return None

    @cached_property
    def model_check(self) -> ModelCheck | None:
        """The model's own output under harmless perturbations from this subspace, of relative
        size 1 and 1e4 (float64), at two probe inputs; ``None`` for operators and for an empty
        subspace. Computed once, before the first perturbation is handed out."""
        run = self.run
        if run is None or run.probe is None or self._known_injective:
            return None
        gen = torch.Generator(device="cpu").manual_seed(11)
        k = run.probe.inputs.shape[0]
        g = torch.randn(k, *self.input_shape, generator=gen, dtype=torch.float64)
        g = g.to(dtype=self.dtype, device=self.operator.device)
        h = g - self._harmful(g)
        h_norm = h.reshape(k, -1).norm(dim=1)
        if not bool((h_norm > 1e-8 * g.reshape(k, -1).norm(dim=1)).all()):
            return None  # no harmless direction found: nothing to hand out, nothing to check
        view = (-1,) + (1,) * len(self.input_shape)
        ctrl = torch.randn(k, *self.input_shape, generator=gen, dtype=torch.float64)
        ctrl = ctrl / ctrl.reshape(k, -1).norm(dim=1).view(view)
        return check_on_model(run.probe, (h / h_norm.view(view)).to("cpu", torch.float64), ctrl, rtol=self.rtol,
                              precise=self.dtype == torch.float64)

    def _verified(self) -> None:
        """Refuse to hand out perturbations when the model's own output disagrees."""
        check = self.model_check
        if check is not None and not check.passed:
            worst = max(check.changes)
            raise VerificationError(
                f"the model's output changed by a relative {worst:.1e} (tolerance {check.tolerance:.0e}, random "
                f"perturbations of the same size: {check.control:.1e}) under perturbations that its linear run "
                f"({self.run.description if self.run else '?'}) calls harmless; the model does not compute what "
                "its traced graph says (forward hooks? code that torch.fx specialised?). Nothing is returned; "
                "please report the model")

    @property
    def _known_injective(self) -> bool:
        """``rank == n`` when an exact rank method fits; ``False`` when none does (``n > m``
        operators then still have a nullspace; otherwise the matrix-free methods simply find none)."""
        if self.operator.n > self.operator.m:
            return False  # rank <= m < n: never injective, no rank needed
        return self._exact_dim == 0

    @cached_property
    def factorization(self) -> RankResult | None:
        """The subspace's one dense SVD with orthonormal bases of the row space and the
        nullspace (``RankResult.row_basis``/``null_basis``), computed once on first use, when
        the matrix has at most ``dense_limit`` entries; ``None`` otherwise (then every method
        works matrix-free). Applications reuse it rather than factorising again."""
        if self.operator.m * self.operator.n > self._dense_limit or self._method not in ("auto", "dense"):
            return None
        return analyze_rank(self.operator, method="dense", dense_limit=self._dense_limit, bases=True)

    @cached_property
    def operator_norm(self) -> float:
        """``||A||_2`` (exact from the SVD when available, else a power-iteration estimate)."""
        fact = self.factorization
        if fact is not None and fact.singular_values is not None and fact.singular_values.size:
            return float(fact.singular_values[0])
        return self.operator.norm_estimate()

    @cached_property
    def _tokenwise(self) -> tuple[list[TorchLinearOperator], torch.Tensor] | None:
        """``(Q factors, V)`` when ``A = B W Q`` with ``Q`` orthogonal (reshapes, permutations),
        ``W`` a token-wise matrix and ``B`` injective: then ``P_row(A) = Q^T (I kron V^T V) Q``
        with ``V`` the orthonormal row basis of the small weight, exact at any number of tokens."""
        factors = self.operator.factors if isinstance(self.operator, ComposedOperator) else [self.operator]
        i = next((k for k, f in enumerate(factors) if not f.orthogonal), None)
        core = factors[i] if i is not None else None
        if i is None or not isinstance(core, TokenwiseMatrixOperator) or \
                not all(f.injective for f in factors[i + 1:]):
            return None
        w = core.matrix.detach().to("cpu", torch.float64).numpy()
        _, sv, vt = scipy.linalg.svd(w, full_matrices=False, lapack_driver="gesdd", check_finite=False)
        v = torch.as_tensor(np.ascontiguousarray(vt[:svd_rank(sv, *w.shape)]), dtype=self.dtype,
                            device=self.operator.device)
        return factors[:i], v

    @cached_property
    def conv_projector(self) -> ConvProjector | None:
        """The fast exact projector for a 2-D convolutional stem with fewer outputs than inputs
        (block-circulant FFT solve plus a Woodbury correction on the border, one dense LU of the
        border's size per subspace), built on first matrix-free use; ``None`` where it does not
        apply. Each of its projections is checked (harmful residual) and CGLS takes over when
        the check fails."""
        if self._method not in ("auto", "structure"):
            return None
        return build_conv_projector(self.operator)

    @cached_property
    def _row_basis(self) -> torch.Tensor | None:
        """Orthonormal rows spanning the row space (dense path, when a nullspace exists)."""
        fact = self.factorization
        if fact is None or fact.row_basis is None:
            return None
        return torch.as_tensor(fact.row_basis, dtype=self.dtype, device=self.operator.device)

    def __repr__(self) -> str:
        return (f"HarmlessSubspace(input_shape={self.input_shape}, ambient_dim={self.ambient_dim}, "
                f"output_dim={self.output_dim}, dtype={self.dtype})")

    # -- validation ----------------------------------------------------------------------
    def _batch(self, delta: torch.Tensor, what: str = "delta") -> torch.Tensor:
        d = validation.batch(delta, self.input_shape, what)
        return d.to(dtype=self.dtype, device=self.operator.device)

    # -- the algorithms ------------------------------------------------------------------
    def _harmful(self, d: torch.Tensor) -> torch.Tensor:
        """Orthogonal projection onto the row space of A (the harmful part), validated input."""
        if self._known_injective:
            self.project_method = "injective"
            return d.clone()  # injective: every direction is harmful, no factorisation needed
        tokenwise = self._tokenwise
        if tokenwise is not None:
            self.project_method = "tokenwise"
            pre, v = tokenwise
            z = d
            for f in pre:
                z = f._matvec(z)
            z = (z @ v.T) @ v
            for f in reversed(pre):
                z = f._rmatvec(z)
            return z
        basis = self._row_basis
        if basis is not None:
            self.project_method = "dense"
            flat = d.reshape(d.shape[0], -1)
            return ((flat @ basis.T) @ basis).reshape(d.shape)
        norms = d.reshape(d.shape[0], -1).norm(dim=1)
        scale = norms * self.operator_norm
        # Ski rental: the fast projector's one-off set-up (a dense LU of the border, 30-130 s at
        # 224 px on 2 busy cores) costs about as much as CGLS on a few images there, so it is
        # built only once CGLS has spent that much on this subspace: whoever projects once never
        # pays it, a dataset pays at most about twice the best choice in hindsight.
        fast = self.conv_projector if self._cgls_passes >= self.fast_projector_after else None
        if fast is not None:
            z, fast_info = fast.harmful(d, tol=self.rtol, scale=scale)
            if fast_info.converged:  # checked against A itself; otherwise CGLS below
                self.project_method = "conv-woodbury"
                self.last_solve = SolveInfo(fast_info.iterations, fast_info.residual, True)
                return z
        z, info = row_space_component(self.operator, d, tol=self.rtol, scale=scale)
        self.project_method = "cgls"
        self.last_solve = info
        self._cgls_passes += 2 * info.iterations * d.shape[0]  # one pass: one image through A or A^T
        return z

    def project(self, delta: torch.Tensor) -> torch.Tensor:
        """The harmless part ``P delta`` of each perturbation (Theorem 4)."""
        d = self._batch(delta)
        self._verified()
        return (d - self._harmful(d)).to(delta.device)

    def decompose(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(harmless, harmful)`` with ``harmless + harmful == delta`` and the two orthogonal."""
        d = self._batch(delta)
        self._verified()
        harmful = self._harmful(d)
        return (d - harmful).to(delta.device), harmful.to(delta.device)

    def contains(self, delta: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
        """Per sample: is ``||A delta|| <= rtol * ||A|| * ||delta||``? (zero counts as harmless).

        The default ``rtol`` follows the coarser of the subspace's and the perturbation's
        precision: rounding a harmless float64 ``delta`` to float32 moves each entry by up to
        half a float32 ulp, so ``||A delta_32|| <= eps_32 / 2 * ||A|| * ||delta||``; such a
        perturbation is still counted as harmless (with a factor 10 of margin)."""
        d = self._batch(delta)
        if rtol is None:
            tol = self.rtol * 100
            if delta.is_floating_point() and torch.finfo(delta.dtype).eps > torch.finfo(self.dtype).eps:
                tol = max(tol, 10 * torch.finfo(delta.dtype).eps)
        else:
            tol = validation.fraction(rtol, "rtol")
        out = self.operator.matvec(d).reshape(d.shape[0], -1).norm(dim=1)
        return (out <= tol * self.operator_norm * d.reshape(d.shape[0], -1).norm(dim=1)).to(delta.device)

    def harmful_residual(self, delta: torch.Tensor) -> torch.Tensor:
        """Per sample ``||A delta|| / (||A|| ||delta||)``: 0 for exactly harmless perturbations."""
        d = self._batch(delta)
        out = self.operator.matvec(d).reshape(d.shape[0], -1).norm(dim=1)
        denom = self.operator_norm * d.reshape(d.shape[0], -1).norm(dim=1)
        return (out / denom.clamp_min(torch.finfo(self.dtype).tiny)).to(delta.device)

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` random harmless perturbations of unit L2 norm, uniform on the subspace's sphere."""
        n = validation.positive_int(n, "n")
        validation.generator(generator)
        if self._known_injective:
            raise NoHarmlessSubspaceError(self._injective_message())
        self._verified()
        gen = generator if generator is not None else torch.Generator(device="cpu").manual_seed(0)
        out = torch.empty(n, *self.input_shape, dtype=self.dtype, device=self.operator.device)
        todo = torch.arange(n)
        floor = 1e-3 * math.sqrt(self._dim_lower_bound / self.ambient_dim)
        # With a known dimension d > 0 a draw fails with probability ~ 0 (its harmless part has
        # a chi distribution with d degrees of freedom); with an unknown one, a few draws that
        # all fail are the evidence that there is (numerically) nothing to draw.
        rounds = 10 if self._exact_dim is not None else 3
        for _ in range(rounds):
            g = torch.randn(len(todo), *self.input_shape, generator=gen, dtype=torch.float64)
            g = g.to(dtype=self.dtype, device=self.operator.device)
            p = g - self._harmful(g)
            p_norm = p.reshape(len(todo), -1).norm(dim=1)
            # A draw (almost) inside the row space leaves a harmless part dominated by round-off:
            # draw again rather than normalise noise.
            ok = p_norm > floor * g.reshape(len(todo), -1).norm(dim=1)
            out[todo[ok.cpu()]] = p[ok] / p_norm[ok].view(-1, *([1] * len(self.input_shape)))
            todo = todo[~ok.cpu()]
            if len(todo) == 0:
                return out
        if self._exact_dim is None:
            raise NoHarmlessSubspaceError(
                f"no harmless direction found: in {rounds} rounds of random draws every projection was numerically "
                f"zero. The rank of this {self.output_dim} x {self.ambient_dim} prefix could not be computed "
                f"({getattr(self, '_rank_failure', 'too large')}), so this is evidence, not a certificate, that the "
                f"prefix is injective; the certified lower bound on the dimension is max(0, n - m) = "
                f"{max(0, self.ambient_dim - self.output_dim)}")
        raise NoHarmlessSubspaceError(f"could not draw harmless perturbations in {rounds} rounds: every draw lay "
                                      f"in the row space (dim {self._exact_dim})")

    @property
    def _dim_lower_bound(self) -> int:
        """``dim`` when an exact rank method fits, else ``n - m`` (at least 1)."""
        exact = self._exact_dim
        return exact if exact is not None else max(1, self.ambient_dim - self.output_dim)

    def basis(self) -> torch.Tensor:
        """An orthonormal basis of the subspace, shape ``(dim, *input_shape)`` (dense path)."""
        self._verified()
        if self.dim == 0:
            return torch.zeros(0, *self.input_shape, dtype=self.dtype, device=self.operator.device)
        info = self.factorization
        if info is None and self.rank_info.method == "gram-eigh":
            info = analyze_rank(self.operator, method="gram", bases=True)
        if info is None or info.null_basis is None:
            why = (f"method={self._method!r} avoids dense factorisations" if self._method not in ("auto", "dense")
                   else f"its {self.output_dim} x {self.ambient_dim} matrix exceeds dense_limit={self._dense_limit:,}")
            raise TooLargeError(f"basis() needs a dense factorisation, but {why}; use project() and sample(), which "
                                "are matrix-free, or pass method='auto' with a larger dense_limit")
        basis = torch.as_tensor(np.ascontiguousarray(info.null_basis), dtype=self.dtype,
                                device=self.operator.device)
        if info.method == "gram-eigh" and basis.shape[0]:
            # Gram eigenvectors are only sqrt(eps)-accurate: project them exactly, re-orthonormalise.
            basis = basis - self._harmful(basis.view(-1, *self.input_shape)).reshape(basis.shape[0], -1)
            basis = torch.linalg.qr(basis.T).Q.T
        return basis.reshape(-1, *self.input_shape)

    def _injective_message(self) -> str:
        if self.dim_is_lower_bound and self.run is not None:
            return (f"the linear run found ({self.output_dim} outputs from {self.ambient_dim} inputs, "
                    f"rank {self.rank}) "
                    f"is injective, but it stopped before the model's linear prefix ended ({self.run.stop_kind} at "
                    f"{self.run.stopped_at}: {self.run.stop_reason}): the model may have harmless perturbations "
                    "that this analysis cannot see")
        return (f"the linear prefix ({self.output_dim} outputs from {self.ambient_dim} inputs, rank {self.rank}) is "
                "injective: no non-zero perturbation is harmless. Use harmless.least_harmful(...) for the "
                "least harmful directions (Lemma 2).")


def _resolve_dtype(model: object, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return model.dtype if isinstance(model, TorchLinearOperator) else torch.float64
    dtype = validation.float_dtype(dtype)
    if isinstance(model, TorchLinearOperator) and dtype != model.dtype:
        raise InputError(f"dtype={dtype} differs from the operator's {model.dtype}; use operator.astype(dtype)")
    return dtype


def _as_operator_and_run(model: nn.Module | TorchLinearOperator, input_shape: Sequence[int], layer: str | None,
                         dtype: torch.dtype, output: object = None) -> tuple[TorchLinearOperator, LinearRun | None]:
    if isinstance(model, TorchLinearOperator):
        if layer is not None:
            raise InputError("layer= applies to models, not to operators")
        if tuple(input_shape) != model.in_shape:
            raise InputError(f"input_shape {tuple(input_shape)} does not match the operator's {model.in_shape}")
        return model, None
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module or a TorchLinearOperator, got {type(model).__name__}")
    run = linear_run(model, input_shape, layer=layer, dtype=dtype, output=output)
    return run.operator, run


def harmless_subspace(model: nn.Module | TorchLinearOperator, input_shape: Sequence[int], *,
                      layer: str | None = None, dtype: torch.dtype | None = None, method: str = "auto",
                      dense_limit: int = DEFAULT_DENSE_LIMIT, rtol: float | None = None,
                      output: object = None) -> HarmlessSubspace:
    """The harmless subspace of ``model`` for inputs of shape ``input_shape`` (no batch axis).

    With ``layer=None`` it is the nullspace of the model's linear prefix (the leading run of
    linear/affine layers, composed): perturbations in it leave the whole output unchanged.
    With ``layer="name"`` it is the paper's H^(l) at the input of that layer.

    ``dim`` is ``n - rank`` where the rank comes from a dense SVD when the matrix has at
    most ``dense_limit`` entries, and otherwise from the layer's structure (bijective factors
    dropped, disjoint conv windows decomposed block by block, a Cholesky certificate of full
    rank on the smaller Gram matrix, or the sweep certificate of a large zero-padded
    convolution); ``dim_method`` says which. ``project``/``decompose``/``sample``/``contains``
    never need the dense matrix.

    ``rtol`` is the relative harmful residual the matrix-free projection must reach
    (default 1e-13 in float64, 1e-6 in float32). ``dtype`` defaults to float64 for models and
    to the operator's own dtype for operators.

    Every step of the linear run is checked against the model's own output before this
    returns (``space.run.layers[i].defect``), and before the first perturbation is handed out
    the model itself is run on harmless perturbations (``space.model_check``); a failure
    raises :class:`~harmless.errors.VerificationError` instead of a wrong answer. ``output``
    selects the tensor to compare when the model returns a tuple, dict or dataclass.
    ``space.dim_is_lower_bound`` says when the run stopped early (the result is then a
    subspace of the true one).
    """
    shape = validation.shape(input_shape)
    dtype = _resolve_dtype(model, dtype)
    if method not in ("auto", "dense", "gram", "structure"):
        raise InputError(f"method must be auto, dense, gram or structure, got {method!r}")
    dense_limit = validation.positive_int(dense_limit, "dense_limit")
    if rtol is not None:
        rtol = validation.fraction(rtol, "rtol")
    op, run = _as_operator_and_run(model, shape, layer, dtype, output)
    return HarmlessSubspace(op, run=run, rtol=rtol, dense_limit=dense_limit, method=method)


def least_harmful(model: nn.Module | TorchLinearOperator, input_shape: Sequence[int], k: int = 1, *,
                  layer: str | None = None, dtype: torch.dtype | None = None,
                  dense_limit: int = DEFAULT_DENSE_LIMIT) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` least harmful unit directions and their gains ``||A v||`` (Lemma 2).

    These are the right singular vectors of the smallest *non-zero* singular values, i.e.
    the least harmful directions outside the harmless subspace; for an injective prefix
    (no harmless subspace) they are exactly Lemma 2's minimisers of ``||A v||``.
    Returns ``(vecs of shape (k, *input_shape), gains of shape (k,))``, gains ascending.
    """
    shape = validation.shape(input_shape)
    dtype = _resolve_dtype(model, dtype)
    k = validation.positive_int(k, "k")
    op, _ = _as_operator_and_run(model, shape, layer, dtype)
    if op.m * op.n <= dense_limit:
        sv, vt = right_singular_vectors(op, limit=dense_limit)
        rank = svd_rank(sv, op.m, op.n)
        if k > rank:
            raise InputError(f"k = {k} exceeds the rank {rank} of the linear prefix")
        vecs = torch.as_tensor(vt[rank - k: rank][::-1].copy(), dtype=dtype, device=op.device)
    else:
        vecs = _least_harmful_iterative(op, k)
    vecs = vecs.reshape(k, *shape)
    gains = op.matvec(vecs).reshape(k, -1).norm(dim=1)
    order = torch.argsort(gains)
    return vecs[order], gains[order]


def _least_harmful_iterative(op: TorchLinearOperator, k: int) -> torch.Tensor:
    """Smallest non-zero singular directions from the smaller Gram matrix (dense when it
    fits, Lanczos otherwise), zero eigenvalues (the nullspace) filtered out."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    op64 = op.astype(torch.float64) if op.dtype != torch.float64 else op
    wide = op.m < op.n
    size = op.m if wide else op.n
    if size <= DEFAULT_GRAM_LIMIT:
        g = (op64.to_cogram() if wide else op64.to_gram()).to("cpu").numpy()
        lam, vec = scipy.linalg.eigh(g, check_finite=False)
    else:
        a = op64.to_scipy()
        mv = (lambda y: a.matvec(a.rmatvec(y))) if wide else (lambda x: a.rmatvec(a.matvec(x)))
        want = min(k + 16, size - 1)
        lam, vec = eigsh(LinearOperator((size, size), matvec=mv, dtype=np.float64), k=want, which="SA", tol=1e-10)
        order = np.argsort(lam)
        lam, vec = lam[order], vec[:, order]
    keep = lam > gram_tol(max(float(np.max(lam)), 0.0), size)
    lam, vec = lam[keep], vec[:, keep]
    if lam.size < k:
        raise InputError(f"k = {k} exceeds the number of non-zero singular values found ({lam.size})")
    lam, vec = lam[:k], vec[:, :k]
    if wide:  # right singular vectors from left ones: v = A^T u / sigma
        vec = op64.to_scipy().rmatmat(vec) / np.sqrt(lam)
    vec = vec / np.linalg.norm(vec, axis=0, keepdims=True)
    return torch.as_tensor(np.ascontiguousarray(vec.T), dtype=op.dtype, device=op.device)
