"""Creating and verifying fingerprints: drawing exact harmless perturbations, calibrating the
decision on the model's own round-off, and the black-box verdict on a suspect."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from harmless import validation
from harmless.errors import HarmlessError, InputError, NoHarmlessSubspaceError
from harmless.fingerprint.exclusion import exclusion, injective_message, relative_norms
from harmless.fingerprint.fileformat import (
    CALIBRATION_MARGIN,
    DEFAULT_MAGNITUDE_RATIO,
    Fingerprint,
    FingerprintError,
)
from harmless.linalg.operators import DEFAULT_DENSE_LIMIT
from harmless.linalg.prefix import eval_mode
from harmless.linalg.subspace import HarmlessSubspace, harmless_subspace


@dataclass
class Verdict:
    """The outcome of :func:`verify_fingerprint`.

    ``statistic`` is the largest relative output change ``||f(x+delta) - f(x)|| / ||f(x)||``
    over probes and perturbations; ``same`` is ``statistic <= threshold``.
    ``first_layer_deviation`` estimates ``max_i ||(A' - A) delta_i|| / (||A|| ||delta_i||)``, how far
    the suspect's linear prefix ``A'`` is from the fingerprinted ``A`` along the fingerprint's
    directions (from the stored gains; ``None`` for version-1 fingerprints).
    ``reference_deviation`` (secondary, not used for the decision) is the largest relative
    difference between the suspect's outputs on the probes and the stored reference outputs.
    ``per_perturbation`` holds the largest relative change for each perturbation.
    ``hash_match`` is ``None`` unless the suspect's weights were available and hashed.
    """

    statistic: float
    threshold: float
    same: bool
    message: str
    reference_deviation: float
    per_perturbation: list[float]
    hash_match: bool | None = None
    first_layer_deviation: float | None = None
    dtype: str = "float32"

    def __bool__(self) -> bool:
        return self.same




def model_hash(model: nn.Module) -> str:
    """SHA-256 of ``model.state_dict()``: every tensor in key order, with its key and shape,
    as little-endian float64 bytes (so float32 and float64 copies of a model hash alike).

    Quantized tensors are dequantized first; non-tensor entries (packed parameters of
    quantized modules) are skipped.
    """
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            continue
        t = value.detach()
        if t.is_quantized:
            t = t.dequantize()
        digest.update(f"\0{key}:{tuple(t.shape)}\0".encode())
        digest.update(t.to("cpu", torch.float64).contiguous().numpy().astype("<f8").tobytes())
    return digest.hexdigest()


def _check_probes(probes: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(probes, torch.Tensor):
        raise InputError(f"probes must be a torch.Tensor, got {type(probes).__name__}")
    if probes.ndim == len(shape):
        probes = probes.unsqueeze(0)
    if tuple(probes.shape[1:]) != shape or probes.shape[0] < 1:
        raise InputError(f"probes must have shape (p, {', '.join(map(str, shape))}) with p >= 1, "
                         f"got {tuple(probes.shape)}")
    if not probes.is_floating_point() or not bool(torch.isfinite(probes).all()):
        raise InputError("probes must be finite floating-point images")
    return probes.detach().to("cpu", torch.float64).contiguous()


def _model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype, t.device
    return torch.float32, torch.device("cpu")


@torch.no_grad()
def _query(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dtype: torch.dtype,
           device: torch.device, batch: int) -> torch.Tensor:
    """Outputs of a black box on ``x`` (float64), sent as ``dtype`` on ``device``, back as float64."""
    outs = []
    for i in range(0, x.shape[0], batch):
        out = fn(x[i:i + batch].to(device=device, dtype=dtype))
        outs.append(torch.as_tensor(out).detach().to("cpu", torch.float64))
    return torch.cat(outs)



def create_fingerprint(model: nn.Module, input_shape: Sequence[int], probes: torch.Tensor, *, k: int = 8,
                       magnitude: float | None = None, exclude: Sequence[nn.Module] = (),
                       generator: torch.Generator | None = None, threshold: float | None = None,
                       exclude_mode: str = "joint", description: str = "",
                       dense_limit: int = DEFAULT_DENSE_LIMIT) -> Fingerprint:
    """Draw a fingerprint of ``model``: ``k`` random harmless perturbations of L2 norm ``magnitude``.

    ``probes`` are a few real inputs ``(p, *input_shape)`` (values as the model expects, e.g.
    images in [0, 1]). ``magnitude`` defaults to ``DEFAULT_MAGNITUDE_RATIO`` (100) times the
    largest probe norm. Perturbations are exact in float64: the model's linear prefix maps
    them to zero up to ~1e-16 relative (``harmful_residual``).

    ``exclude``: models the fingerprint must *not* be harmless for. The perturbations are then
    drawn uniformly from ``N(A) ⊖ (N(A) ∩ N(B1) ∩ ...)`` (``exclude_mode="joint"``, the paper's
    ``P1 - (P1 ∩ P2)``) or from ``N(A) ⊖ (N(A) ∩ N(B1) + N(A) ∩ N(B2) + ...)``
    (``"each"``), see :func:`exclusion_basis`; the intersections are exact nullspaces of
    stacked dense prefix matrices (each at most ``dense_limit`` entries).
    ``intersection_dims`` records ``dim N(A) ∩ N(Bi)``, ``excluded_dim`` the dimension removed
    and ``exclusion_margins`` the smallest ``||Bi delta|| / (||Bi|| ||delta||)`` per model
    (draws with a margin below 1e-10 are redrawn; an exact-zero margin has probability 0).

    Calibration: the model itself is queried in float64 and in float32; its largest statistic
    in each precision is its round-off (``roundoff``), and the threshold for a suspect queried
    in that precision is ``CALIBRATION_MARGIN`` (10) times it (``thresholds``). An explicit
    ``threshold`` is used for every precision instead. ``gains`` (per probe) let
    :func:`verify_fingerprint` estimate how far a suspect's first layer is from the model's.

    Raises :class:`~harmless.errors.NoHarmlessSubspaceError` when the model's linear prefix is
    injective (e.g. LeNet's padded convolution), and :class:`FingerprintError` when nothing of
    the harmless subspace is left after the exclusion.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    shape = validation.shape(input_shape)
    probes64 = _check_probes(probes, shape)
    k = validation.positive_int(k, "k")
    probe_norm = float(probes64.reshape(probes64.shape[0], -1).norm(dim=1).max())
    if magnitude is None:
        if probe_norm <= 0:
            raise InputError("the probes are all zero; pass magnitude= explicitly")
        magnitude = DEFAULT_MAGNITUDE_RATIO * probe_norm
    magnitude = validation.positive_number(magnitude, "magnitude")
    if threshold is not None:
        threshold = validation.positive_number(threshold, "threshold")
    exclude = list(exclude)
    for other in exclude:
        if not isinstance(other, nn.Module):
            raise InputError(f"exclude must hold torch.nn.Module objects, got {type(other).__name__}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)

    margins: list[float] = []
    space = harmless_subspace(model, shape, dtype=torch.float64, dense_limit=dense_limit)
    if exclude:
        found = exclusion(model, exclude, shape, exclude_mode, dense_limit)
        dims, excluded_dim, harmless_dim = found.dims, found.excluded_dim, found.harmless_dim
        if found.basis.shape[0] == 0:
            raise FingerprintError(
                f"nothing is left to draw a fingerprint from: the excluded part of N(A) ({excluded_dim} dims; "
                f"pairwise intersections N(A) ∩ N(Bi) of dims {dims}) fills all {harmless_dim} dimensions of "
                "the model's harmless subspace" + (" (try exclude_mode='joint')" if exclude_mode == "each" else ""))
        flat = found.basis.reshape(found.basis.shape[0], -1)
        nat = torch.from_numpy(found.null_rows)
        for _attempt in range(5):
            coef = torch.randn(k, flat.shape[0], generator=gen, dtype=torch.float64)
            delta = coef @ flat
            # One exact projection onto N(A) more, so that round-off of the basis does not leak.
            delta = (delta @ nat.T) @ nat
            delta = delta / delta.norm(dim=1, keepdim=True)
            # Each excluded prefix has unit norm: ||B d|| / ||d|| is the relative residual.
            margins = [float(relative_norms(b, delta).min()) for b in found.excluded]
            if min(margins) > 1e-10:
                break
        else:
            raise FingerprintError(f"could not draw perturbations harmful for every excluded model "
                                   f"(margins {margins}); use exclude_mode='each'")
        residual = float(relative_norms(found.prefix, delta).max())
        delta = (delta * magnitude).reshape(k, *shape).contiguous()
    else:
        if space.dim == 0:
            raise NoHarmlessSubspaceError(injective_message(space))
        dims, excluded_dim, harmless_dim = [], 0, space.dim
        delta = space.sample(k, generator=gen).to("cpu", torch.float64)
        delta = (delta * magnitude).reshape(k, *shape).contiguous()
        residual = float(space.harmful_residual(delta).max())

    model64 = _float64_copy(model)
    cpu = torch.device("cpu")
    perturbed_inputs = (probes64.unsqueeze(0) + delta.unsqueeze(1)).reshape(-1, *shape)
    ref = _query(model64, probes64, torch.float64, cpu, 256)
    pert = _query(model64, perturbed_inputs, torch.float64, cpu, 256).reshape(k, probes64.shape[0], *ref.shape[1:])
    # The model's own statistic in each precision is its round-off: the calibration.
    model32 = copy.deepcopy(model64).to(torch.float32)
    clean32 = _query(model32, probes64, torch.float32, cpu, 256)
    pert32 = _query(model32, perturbed_inputs, torch.float32, cpu, 256).reshape(pert.shape)
    roundoff = {"float64": float(fingerprint_statistic(ref, pert).max()),
                "float32": float(fingerprint_statistic(clean32, pert32).max())}
    if threshold is None:
        # A floor of 10 ulps: a model whose statistic is exactly 0 still tolerates round-off.
        thresholds = {name: CALIBRATION_MARGIN * max(value, 10 * torch.finfo(getattr(torch, name)).eps)
                      for name, value in roundoff.items()}
    else:
        thresholds = {name: float(threshold) for name in roundoff}
    return Fingerprint(probes=probes64, perturbations=delta, reference_outputs=ref, perturbed_outputs=pert,
                       input_shape=shape, model_hash=model_hash(model), magnitude=float(magnitude),
                       harmless_dim=int(harmless_dim), intersection_dims=dims, excluded_dim=excluded_dim,
                       exclusion_margins=margins, harmful_residual=residual,
                       threshold=thresholds["float32"], description=description, roundoff=roundoff,
                       thresholds=thresholds, gains=_gains(model64, space, probes64, gen),
                       operator_norm=float(space.operator_norm))


@torch.no_grad()
def _gains(model64: nn.Module, space: HarmlessSubspace, probes64: torch.Tensor, gen: torch.Generator,
           draws: int = 4) -> list[float]:
    """Per probe, the median over ``draws`` random harmful directions ``h`` (in the row space of
    A, small: ``||h|| = 1e-3 ||x||``) of ``||f(x + h) - f(x)|| / ||A h||``."""
    shape = tuple(probes64.shape[1:])
    out = []
    for x in probes64:
        r = torch.randn(draws, *shape, generator=gen, dtype=torch.float64)
        _, h = space.decompose(r)
        h = h / h.reshape(draws, -1).norm(dim=1).view(-1, *[1] * len(shape))
        h = h * (1e-3 * max(float(x.norm()), 1e-12))
        f0 = model64(x.unsqueeze(0)).reshape(1, -1)
        fh = model64(x.unsqueeze(0) + h).reshape(draws, -1)
        ah = space.operator.matvec(h).reshape(draws, -1).norm(dim=1)
        out.append(float(((fh - f0).norm(dim=1) / ah).median()))
    return out


def _float64_copy(model: nn.Module) -> nn.Module:
    """A float64 CPU copy in eval mode (the model itself is left as it was)."""
    return copy.deepcopy(model).to("cpu", torch.float64).eval()



def fingerprint_statistic(clean: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
    """Relative output changes ``||f(x_j + delta_i) - f(x_j)|| / (||f(x_j)|| + tiny)``, shape ``(k, p)``.

    ``clean`` is ``(p, *out)``, ``perturbed`` ``(k, p, *out)``.
    """
    k, p = perturbed.shape[:2]
    diff = (perturbed - clean.unsqueeze(0)).reshape(k, p, -1).norm(dim=2)
    base = clean.reshape(p, -1).norm(dim=1)
    return diff / (base + torch.finfo(torch.float64).tiny).unsqueeze(0)


def verify_fingerprint(fp: Fingerprint, suspect: nn.Module | Callable[[torch.Tensor], torch.Tensor], *,
                       threshold: float | None = None, input_dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None, batch: int = 256) -> Verdict:
    """Is ``suspect`` the fingerprinted model? Black-box: only its outputs are used.

    The suspect is queried on the probes ``x_j`` and on ``x_j + delta_i`` (sums formed in
    float64, then sent as ``input_dtype``: by default the dtype of the suspect's first
    floating parameter or buffer, float32 for a plain callable). The statistic is
    ``max_ij ||f(x_j + delta_i) - f(x_j)|| / ||f(x_j)||``; the verdict is "same" when it is
    at most ``threshold`` (default: the fingerprint's own, 1e-2 at the default magnitude).

    Calibration (version 2 fingerprints): the threshold for a suspect queried in ``dtype``
    is ``CALIBRATION_MARGIN`` (10) times the statistic of the fingerprinted model itself in
    that precision, measured when the fingerprint was made (``fp.roundoff``; MLP-5/MNIST at
    the default magnitude: about 2e-5 in float32, 3e-13 in float64, see
    ``results/fig5.md``). "Same" therefore means: the suspect's linear prefix moves the
    fingerprint no more than ten times the model's own round-off does, i.e. it agrees with
    the model's along the fingerprint's directions to within about ``first_layer_deviation``
    ~ 1e-6 (float32) relative; a one-step fine-tune of the first layer is "different".
    Queries in other precisions (float16, bfloat16) or with reduced-precision kernels (TF32
    on a GPU) have no calibration: pass ``threshold=``. Version 1 fingerprints keep their one
    stored threshold.

    "Same" certifies the suspect's first linear layer has (up to round-off) the same
    nullspace, not that its weights are equal: see the module docstring. The secondary
    ``reference_deviation`` (suspect vs stored outputs on the probes) tells a functionally
    identical copy (~0) from one with changed later layers; it is reported, not decided on.
    """
    if not isinstance(fp, Fingerprint):
        raise InputError(f"fp must be a Fingerprint, got {type(fp).__name__}")
    if not callable(suspect):
        raise InputError(f"suspect must be a torch.nn.Module or a callable, got {type(suspect).__name__}")
    if threshold is not None:
        threshold = validation.positive_number(threshold, "threshold")
    if isinstance(suspect, nn.Module):
        dtype0, device0 = _model_dtype_device(suspect)
    else:
        dtype0, device0 = torch.float32, torch.device("cpu")
    dtype = input_dtype if input_dtype is not None else dtype0
    thr = fp.threshold_for(dtype) if threshold is None else float(threshold)
    dev = torch.device(device) if device is not None else device0
    k, p = fp.k, fp.num_probes
    x = fp.probes.to(torch.float64)
    xd = (x.unsqueeze(0) + fp.perturbations.to(torch.float64).unsqueeze(1)).reshape(-1, *fp.input_shape)
    # A module is queried in eval mode, every module's training flag restored afterwards.
    context = eval_mode(suspect, warn=False) if isinstance(suspect, nn.Module) else contextlib.nullcontext()
    try:
        with context:
            clean = _query(suspect, x, dtype, dev, batch)
            pert = _query(suspect, xd, dtype, dev, batch)
    except HarmlessError:
        raise
    except Exception as exc:
        raise InputError(f"the suspect model failed on inputs of shape (B, {', '.join(map(str, fp.input_shape))}) "
                         f"as {dtype}: {exc}") from exc
    if clean.shape[0] != p or pert.shape[0] != k * p or tuple(pert.shape[1:]) != tuple(clean.shape[1:]):
        raise InputError(f"the suspect returned outputs of shapes {tuple(clean.shape)} / {tuple(pert.shape)}; "
                         "expected one output per input")
    pert = pert.reshape(k, p, *clean.shape[1:])
    rel = fingerprint_statistic(clean, pert)
    rel = torch.where(torch.isfinite(rel), rel, torch.full_like(rel, math.inf))
    stat = float(rel.max())
    per = [float(v) for v in rel.max(dim=1).values]
    deviation = None
    if fp.gains and fp.operator_norm > 0:
        # ||f'(x + d) - f'(x)|| ~ gain * ||A' d|| = gain * ||(A' - A) d||: solved for the deviation.
        diff = (pert - clean.unsqueeze(0)).reshape(k, p, -1).norm(dim=2)
        scale = torch.tensor(fp.gains, dtype=torch.float64).unsqueeze(0) * fp.operator_norm * \
            fp.perturbations.reshape(k, -1).norm(dim=1).unsqueeze(1)
        est = diff / scale.clamp_min(torch.finfo(torch.float64).tiny)
        deviation = float(torch.where(torch.isfinite(est), est, torch.full_like(est, math.inf)).max())
    if tuple(clean.shape[1:]) == tuple(fp.reference_outputs.shape[1:]):
        ref = fp.reference_outputs
        ref_dev = float(((clean - ref).reshape(p, -1).norm(dim=1)
                         / (ref.reshape(p, -1).norm(dim=1) + torch.finfo(torch.float64).tiny)).max())
    else:
        ref_dev = math.inf
    hash_match = None
    if isinstance(suspect, nn.Module):
        try:
            hash_match = model_hash(suspect) == fp.model_hash
        except Exception:
            hash_match = None
    same = stat <= thr
    msg = (f"{'SAME' if same else 'DIFFERENT'}: largest relative output change under the {k} fingerprint "
           f"perturbations is {stat:.3g} ({'<=' if same else '>'} threshold {thr:.3g}); outputs on the probes "
           f"differ from the reference by {ref_dev:.3g} (relative)"
           + (f"; estimated first-layer deviation along the fingerprint {deviation:.2g} (relative)"
              if deviation is not None else ""))
    if same:
        msg += ". 'Same' means the suspect's first linear layer has the fingerprinted model's nullspace"
    return Verdict(statistic=stat, threshold=thr, same=same, message=msg, reference_deviation=ref_dev,
                   per_perturbation=per, hash_match=hash_match, first_layer_deviation=deviation,
                   dtype=str(dtype).replace("torch.", ""))

