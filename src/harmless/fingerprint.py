"""Model fingerprints from harmless perturbations (Chen et al., AAAI 2025, "Model Fingerprint").

A harmless perturbation ``delta`` of model A (``delta`` in the nullspace of A's linear
prefix) leaves A's outputs unchanged however large it is, ``f_A(x + delta) == f_A(x)``, while
another model B, whose first linear layer has a different nullspace, generally reacts
strongly to it. A set of ``k`` large harmless perturbations of A plus a few probe images is
therefore a *fingerprint* of A that can be checked with black-box queries only.

* :func:`create_fingerprint` draws the perturbations exactly (float64). With
  ``exclude=[B1, B2, ...]`` it draws only from the orthogonal complement, within ``N(A)``,
  of ``N(A) ∩ N(B1) ∩ ...`` (the paper's ``P1 - (P1 ∩ P2)``; ``exclude_mode="each"``: of
  every ``N(A) ∩ N(Bi)``), computed exactly from the SVD of the stacked prefix matrices.
* :func:`save_fingerprint` / :func:`load_fingerprint`: one ``.safetensors`` file (tensors +
  a JSON header in the safetensors metadata) with a SHA-256 checksum; loading never runs
  code and refuses unknown versions, tampered bytes and inconsistent shapes.
* :func:`verify_fingerprint` queries a suspect model on ``x`` and ``x + delta`` and decides
  "same" when the largest relative output change stays below a calibrated threshold.

What "same" certifies
---------------------
The statistic is zero exactly when every ``delta`` is harmless for the suspect, i.e. (for
generic ``delta``) when the suspect's first linear layer has the same nullspace as A's
(the suspect's linear prefix annihilates the fingerprint). It therefore does **not**
certify "same weights": the verdict stays "same" under

* a change of precision (float64 <-> float32) or device (only round-off changes);
* a permutation (or any invertible mixing, e.g. rescaling) of the first layer's output
  units, with the next layer adjusted: same function or not, the nullspace is unchanged;
* any change to layers *after* the first linear layer (fine-tuning with the first layer
  frozen, pruning/quantising later layers, replacing the head): the fingerprint cannot see
  past a first layer that annihilates it.

It turns "different" when the first layer's nullspace moves: retraining from another seed,
fine-tuning the first layer, pruning or quantising the first layer, another architecture.
An adversary who knows the fingerprint method can therefore keep the verdict "same" while
changing the model's behaviour (freeze the first layer), and conversely a stolen model
whose first layer is lightly fine-tuned is reported "different".
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from torch import nn

from harmless import validation
from harmless.cache import atomic_path, require_file_path
from harmless.errors import HarmlessError, InputError, NoHarmlessSubspaceError
from harmless.linalg.operators import DEFAULT_DENSE_LIMIT, MatrixOperator
from harmless.linalg.prefix import eval_mode
from harmless.linalg.rank import dense_svd_rank, svd_rank
from harmless.linalg.subspace import HarmlessSubspace, harmless_subspace

__all__ = [
    "DEFAULT_MAGNITUDE_RATIO",
    "DEFAULT_THRESHOLD",
    "FORMAT",
    "FORMAT_VERSION",
    "THRESHOLD_PER_RATIO",
    "Fingerprint",
    "FingerprintError",
    "FingerprintExistsError",
    "check_fingerprint_path",
    "Verdict",
    "create_fingerprint",
    "exclusion_basis",
    "exclusion_margin",
    "fingerprint_statistic",
    "intersection_basis",
    "load_fingerprint",
    "model_hash",
    "probe_images",
    "save_fingerprint",
    "verify_fingerprint",
]

FORMAT = "harmless-fingerprint"
FORMAT_VERSION = 2
#: Versions :func:`load_fingerprint` reads (1: one magnitude-proportional threshold, no
#: round-off calibration; 2: thresholds calibrated per precision, gains for the deviation estimate).
READABLE_VERSIONS = (1, 2)
#: A suspect is "same" when its statistic is at most this many times the fingerprinted model's
#: own round-off in the precision the suspect is queried in (measured when the fingerprint is made).
CALIBRATION_MARGIN = 10.0
#: Default ``||delta|| / max_j ||x_j||``: large enough that a model whose first layer does not
#: annihilate ``delta`` changes its output by far more than its own output norm.
DEFAULT_MAGNITUDE_RATIO = 100.0
#: Decision threshold on the statistic (largest relative output change), see
#: :func:`verify_fingerprint` for how it was calibrated.
DEFAULT_THRESHOLD = 1e-2
#: The default threshold is this times ``magnitude / max_j ||x_j||`` (both the same model's
#: float32 round-off and a different model's response are proportional to ``||delta||``).
THRESHOLD_PER_RATIO = DEFAULT_THRESHOLD / DEFAULT_MAGNITUDE_RATIO
_METADATA_KEY = "harmless_fingerprint"
_CHECKSUM_KEY = "checksum"
_TENSOR_NAMES = ("probes", "perturbations", "reference_outputs", "perturbed_outputs")


class FingerprintError(HarmlessError):
    """A fingerprint cannot be created, or a fingerprint file is unknown, corrupt or tampered with."""


class FingerprintExistsError(FingerprintError, FileExistsError):
    """:func:`save_fingerprint` would overwrite an existing file (and ``overwrite`` is False)."""


# ----------------------------------------------------------------------------- data


@dataclass
class Fingerprint:
    """A fingerprint of one model: probes, ``k`` harmless perturbations and reference outputs.

    Tensors are float64 on the CPU: ``probes`` ``(p, *input_shape)``, ``perturbations``
    ``(k, *input_shape)`` (each of L2 norm ``magnitude``), ``reference_outputs``
    ``(p, *out)`` = ``f(probes)`` and ``perturbed_outputs`` ``(k, p, *out)`` =
    ``f(probes + perturbations[i])``, both computed by the model in float64.
    """

    probes: torch.Tensor
    perturbations: torch.Tensor
    reference_outputs: torch.Tensor
    perturbed_outputs: torch.Tensor
    input_shape: tuple[int, ...]
    model_hash: str
    magnitude: float
    harmless_dim: int
    intersection_dims: list[int] = field(default_factory=list)
    excluded_dim: int = 0
    exclusion_margins: list[float] = field(default_factory=list)
    harmful_residual: float = 0.0
    threshold: float = DEFAULT_THRESHOLD
    dtype: str = "float64"
    version: int = FORMAT_VERSION
    description: str = ""
    #: The fingerprinted model's own statistic when queried in each precision (its round-off).
    roundoff: dict[str, float] = field(default_factory=dict)
    #: The decision threshold for a suspect queried in each precision.
    thresholds: dict[str, float] = field(default_factory=dict)
    #: Per probe, ``||f(x + h) - f(x)|| / ||A h||`` for small harmful ``h``: how strongly the
    #: layers after the linear prefix pass a change of its output on (the deviation estimate).
    gains: list[float] = field(default_factory=list)
    #: ``||A||`` of the fingerprinted model's linear prefix.
    operator_norm: float = 0.0

    def threshold_for(self, dtype: torch.dtype) -> float:
        """The threshold for a suspect queried in ``dtype`` (version 1 files: the one threshold)."""
        if not self.thresholds:
            return self.threshold
        name = str(dtype).replace("torch.", "")
        if name not in self.thresholds:
            raise InputError(f"the fingerprint has no threshold calibrated for {name} queries (only "
                             f"{', '.join(sorted(self.thresholds))}); pass threshold= explicitly")
        return self.thresholds[name]

    @property
    def k(self) -> int:
        """Number of perturbations."""
        return int(self.perturbations.shape[0])

    @property
    def num_probes(self) -> int:
        """Number of probe inputs."""
        return int(self.probes.shape[0])

    def header(self) -> dict[str, object]:
        """The JSON header stored in the file (everything but the tensors and the checksum)."""
        return {
            "format": FORMAT,
            "version": int(self.version),
            "input_shape": [int(s) for s in self.input_shape],
            "dtype": self.dtype,
            "model_hash": self.model_hash,
            "k": self.k,
            "num_probes": self.num_probes,
            "magnitude": float(self.magnitude),
            "harmless_dim": int(self.harmless_dim),
            "intersection_dims": [int(d) for d in self.intersection_dims],
            "excluded_dim": int(self.excluded_dim),
            "exclusion_margins": [float(v) for v in self.exclusion_margins],
            "harmful_residual": float(self.harmful_residual),
            "threshold": float(self.threshold),
            "description": self.description,
        } | ({} if self.version < 2 else {
            "roundoff": {k: float(v) for k, v in sorted(self.roundoff.items())},
            "thresholds": {k: float(v) for k, v in sorted(self.thresholds.items())},
            "gains": [float(g) for g in self.gains],
            "operator_norm": float(self.operator_norm),
        })

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors, contiguous float64 on the CPU."""
        return {name: getattr(self, name).detach().to("cpu", torch.float64).contiguous() for name in _TENSOR_NAMES}

    def checksum(self) -> str:
        """SHA-256 over the canonical header JSON and every tensor's name, shape and bytes."""
        return _checksum(self.header(), self.tensors())


def _canonical_json(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _checksum(header: dict[str, object], tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    digest.update(_canonical_json(header).encode("utf-8"))
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(f"\0{name}:{t.dtype}:{tuple(t.shape)}\0".encode())
        # Little-endian float64 bytes, whatever the host: the checksum is portable.
        digest.update(t.detach().to("cpu", torch.float64).contiguous().numpy().astype("<f8").tobytes())
    return digest.hexdigest()


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


# ----------------------------------------------------------------------------- helpers


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


def _prefix_matrix(space: HarmlessSubspace, limit: int) -> np.ndarray:
    """The dense ``(m, n)`` float64 matrix of a model's linear prefix, scaled to unit spectral
    norm: scaling never changes a nullspace, and it keeps a model with small weights from
    being drowned by another one's when the matrices are stacked."""
    a = space.operator.to_dense(limit=limit).to("cpu", torch.float64).numpy()
    norm = float(np.linalg.norm(a, 2)) if a.size else 0.0
    return a / norm if norm > 0 else a


def _null_rows(a: np.ndarray) -> np.ndarray:
    """Orthonormal rows spanning the nullspace of ``a``: the engine's dense SVD rank."""
    info = dense_svd_rank(MatrixOperator(torch.from_numpy(a)), limit=max(a.size, 1), bases=True)
    return info.null_basis


def intersection_basis(models: Sequence[nn.Module], input_shape: Sequence[int], *,
                       dense_limit: int = DEFAULT_DENSE_LIMIT) -> torch.Tensor:
    """An orthonormal basis ``(d, *input_shape)`` of ``N(A1) ∩ N(A2) ∩ ...``, the perturbations
    harmless for every model at once: the nullspace of the stacked prefix matrices
    ``[A1; A2; ...]`` from one float64 SVD (each block scaled to unit norm first)."""
    shape = validation.shape(input_shape)
    if not models:
        raise InputError("intersection_basis needs at least one model")
    mats = [_prefix_matrix(harmless_subspace(m, shape, dtype=torch.float64), dense_limit) for m in models]
    null = _null_rows(np.vstack(mats))
    return torch.from_numpy(np.ascontiguousarray(null)).reshape(-1, *shape)


def exclusion_basis(model: nn.Module, exclude: Sequence[nn.Module], input_shape: Sequence[int], *,
                    mode: str = "joint", dense_limit: int = DEFAULT_DENSE_LIMIT,
                    ) -> tuple[torch.Tensor, list[int], int, int]:
    """An orthonormal basis of the part of ``N(A)`` a fingerprint may be drawn from.

    ``mode="joint"`` (default, the paper's ``P1 - (P1 ∩ P2)``): ``N(A) ⊖ (N(A) ∩ N(B1) ∩ N(B2)
    ∩ ...)``, the orthogonal complement within ``N(A)`` of the perturbations harmless for all
    models at once (the nullspace of the stacked matrices ``[A; B1; B2; ...]``). No non-zero
    vector of it is harmless for *every* excluded model; a random one is harmful for each Bi
    with probability 1 (``N(A) ∩ N(Bi)`` is a proper subspace of measure zero).

    ``mode="each"``: ``N(A) ⊖ (I1 + I2 + ...)`` with ``Ii = N(A) ∩ N(Bi)``: every non-zero
    vector is *guaranteed* harmful for each Bi separately, but the sum of the intersections
    often fills ``N(A)`` with two or more excluded models (for MLP-5 on MNIST each ``Ii`` has
    dimension 784 - 512 = 272 of ``dim N(A) = 528``), leaving nothing to draw from.

    Returns ``(basis (d, *input_shape), [dim Ii for each Bi], dim of the excluded subspace,
    dim N(A))``. Each prefix matrix is built densely (at most ``dense_limit`` entries).
    """
    basis, dims, excluded_dim, na, _, _ = _exclusion(model, exclude, validation.shape(input_shape), mode, dense_limit)
    return basis, dims, excluded_dim, int(na.shape[0])


def _exclusion(model: nn.Module, exclude: Sequence[nn.Module], shape: tuple[int, ...], mode: str,
               dense_limit: int) -> tuple[torch.Tensor, list[int], int, np.ndarray, np.ndarray, list[np.ndarray]]:
    """:func:`exclusion_basis` plus what it computed on the way: ``N(A)``'s orthonormal rows and
    the unit-norm prefix matrices of A and of each Bi."""
    if mode not in ("joint", "each"):
        raise InputError(f"mode must be 'joint' or 'each', got {mode!r}")
    space = harmless_subspace(model, shape, dtype=torch.float64)
    a = _prefix_matrix(space, dense_limit)
    na = _null_rows(a)
    if na.shape[0] == 0:
        raise NoHarmlessSubspaceError(_injective_message(space))
    mats = []
    for other in exclude:
        b = _prefix_matrix(harmless_subspace(other, shape, dtype=torch.float64), dense_limit)
        if b.shape[1] != a.shape[1]:
            raise InputError(f"an excluded model's linear prefix takes {b.shape[1]} inputs, the model's {a.shape[1]}")
        mats.append(b)
    pieces = [_null_rows(np.vstack([a, b])) for b in mats]
    dims = [int(p.shape[0]) for p in pieces]
    if mode == "joint":
        if len(mats) == 1:
            s_rows = pieces[0]
        else:
            s_rows = _null_rows(np.vstack([a, *mats])) if mats else np.zeros((0, a.shape[1]))
    elif sum(dims):
        stacked = np.vstack([p for p in pieces if p.shape[0]])
        # Orthonormal basis of the sum of the intersections (they may overlap).
        u, sv, _ = scipy.linalg.svd(stacked.T, full_matrices=False, check_finite=False)
        s_rows = u[:, :svd_rank(sv, *stacked.shape)].T
    else:
        s_rows = np.zeros((0, a.shape[1]))
    # Work in N(A)'s coordinates: the excluded subspace S lies inside N(A), so its coordinates
    # C = S na^T have orthonormal rows, and N(A) ⊖ S is na's span of the nullspace of C.
    coords = s_rows @ na.T
    if coords.shape[0]:
        _, sv, vt = scipy.linalg.svd(coords, full_matrices=True, check_finite=False)
        keep = int(np.sum(sv > 0.5))  # singular values are exactly 1 (S inside N(A)): split at 1/2
        comp = vt[keep:]
    else:
        comp = np.eye(na.shape[0])
    basis = comp @ na
    return (torch.from_numpy(np.ascontiguousarray(basis)).reshape(-1, *shape), dims, int(s_rows.shape[0]),
            na, a, mats)


def exclusion_margin(delta: torch.Tensor, models: Sequence[nn.Module], input_shape: Sequence[int]) -> list[float]:
    """For each model B: ``min_i ||B delta_i|| / (||B|| ||delta_i||)`` over the perturbations,
    with ``B`` its linear prefix (0: some perturbation is harmless for B; ~1e-16 counts as 0)."""
    shape = validation.shape(input_shape)
    out = []
    for m in models:
        out.append(float(harmless_subspace(m, shape, dtype=torch.float64).harmful_residual(
            delta.to(torch.float64)).min()))
    return out


def _injective_message(space: HarmlessSubspace) -> str:
    m, n = space.output_dim, space.ambient_dim
    if space.dim_is_lower_bound and space.run is not None:
        # Never "injective" when the analysis merely stopped (a branch, an unknown step).
        return (f"cannot create a fingerprint: no harmless subspace was found, but the linear run stopped early "
                f"({space.run.stop_kind} at {space.run.stopped_at}: {space.run.stop_reason}), so the model may still "
                "have one that the analysis cannot see; `harmless analyze` shows the run step by step")
    return (f"cannot create a fingerprint: the model has no harmless subspace (its linear prefix maps {n} inputs "
            f"to {m} outputs injectively, so no non-zero perturbation is harmless). Fingerprints need a first "
            "linear layer with a nullspace, e.g. a fully-connected first layer narrower than the input.")


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


# ----------------------------------------------------------------------------- probes


def probe_images(dataset: str, n: int = 4, *, data_dir: str | None = None) -> torch.Tensor:
    """The first ``n`` test images of ``dataset`` (e.g. ``"mnist"``) as float64 in [0, 1]: the
    default probes of a fingerprint (real inputs, so ``f(x)`` is a meaningful reference)."""
    from harmless.data import as_tensors, load_dataset

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"the number of probes must be a positive int, got {n!r}")
    x, _ = as_tensors(load_dataset(dataset, "test", data_dir=data_dir), dtype=torch.float64)
    if x.shape[0] < n:
        raise InputError(f"{dataset} has only {x.shape[0]} test images, fewer than {n} probes")
    return x[:n].contiguous()


# ----------------------------------------------------------------------------- create


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
        basis, dims, excluded_dim, na, a, mats = _exclusion(model, exclude, shape, exclude_mode, dense_limit)
        harmless_dim = int(na.shape[0])
        if basis.shape[0] == 0:
            raise FingerprintError(
                f"nothing is left to draw a fingerprint from: the excluded part of N(A) ({excluded_dim} dims; "
                f"pairwise intersections N(A) ∩ N(Bi) of dims {dims}) fills all {harmless_dim} dimensions of "
                "the model's harmless subspace" + (" (try exclude_mode='joint')" if exclude_mode == "each" else ""))
        flat = basis.reshape(basis.shape[0], -1)
        nat = torch.from_numpy(na)
        for _attempt in range(5):
            coef = torch.randn(k, flat.shape[0], generator=gen, dtype=torch.float64)
            delta = coef @ flat
            # One exact projection onto N(A) more, so that round-off of the basis does not leak.
            delta = (delta @ nat.T) @ nat
            delta = delta / delta.norm(dim=1, keepdim=True)
            # Each prefix matrix has unit norm: ||B d|| / ||d|| is the relative residual.
            margins = [float((torch.from_numpy(b) @ delta.T).norm(dim=0).min()) for b in mats]
            if min(margins) > 1e-10:
                break
        else:
            raise FingerprintError(f"could not draw perturbations harmful for every excluded model "
                                   f"(margins {margins}); use exclude_mode='each'")
        residual = float((torch.from_numpy(a) @ delta.T).norm(dim=0).max())
        delta = (delta * magnitude).reshape(k, *shape).contiguous()
    else:
        if space.dim == 0:
            raise NoHarmlessSubspaceError(_injective_message(space))
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


# ----------------------------------------------------------------------------- storage


def check_fingerprint_path(path: str | Path, *, overwrite: bool = False, what: str = "fingerprint path") -> Path:
    """Where :func:`save_fingerprint` may write: a file path (not a folder) that does not exist
    yet, unless ``overwrite``. Called by :func:`save_fingerprint`, and by the command line
    before any work, so a bad ``--out`` fails at once rather than after the fingerprint is drawn."""
    path = require_file_path(path, what=what)
    if not overwrite and path.exists():
        raise FingerprintExistsError(f"refusing to overwrite existing file {path} "
                                     "(pass overwrite=True, or --overwrite on the command line)")
    return path


def save_fingerprint(fp: Fingerprint, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``fp`` to one ``.safetensors`` file, atomically.

    Tensors: ``probes``, ``perturbations``, ``reference_outputs``, ``perturbed_outputs``
    (float64). The safetensors metadata holds ``harmless_fingerprint`` (the JSON header of
    :meth:`Fingerprint.header`) and ``checksum`` (SHA-256 over that header and every
    tensor's bytes). An existing file is refused (:class:`FingerprintExistsError`, a
    :class:`FileExistsError` and a :class:`~harmless.errors.HarmlessError`) unless
    ``overwrite=True``.
    """
    from safetensors.torch import save

    path = check_fingerprint_path(path, overwrite=overwrite)
    _validate(fp.header(), fp.tensors())
    tensors = fp.tensors()
    metadata = {_METADATA_KEY: _canonical_json(fp.header()), _CHECKSUM_KEY: _checksum(fp.header(), tensors)}
    data = save(tensors, metadata=metadata)
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(data)
    return path


def _read_metadata(data: bytes, path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, parsed as plain JSON (no code runs)."""
    if len(data) < 8:
        raise FingerprintError(f"{path} is not a fingerprint file: too short for a safetensors header")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8 or size > 100_000_000:
        raise FingerprintError(f"{path} is not a fingerprint file: bad safetensors header length")
    try:
        header = json.loads(data[8:8 + size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FingerprintError(f"{path} is not a fingerprint file: unreadable safetensors header ({exc})") from exc
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or _METADATA_KEY not in meta:
        raise FingerprintError(f"{path} is not a harmless fingerprint (no '{_METADATA_KEY}' metadata)")
    return meta


def _validate(header: dict[str, object], tensors: dict[str, torch.Tensor]) -> None:
    """Shapes and dtypes consistent with the header, values finite."""
    missing = [n for n in _TENSOR_NAMES if n not in tensors]
    if missing:
        raise FingerprintError(f"fingerprint lacks tensor(s) {', '.join(missing)}")
    try:
        shape = tuple(int(s) for s in header["input_shape"])  # type: ignore[union-attr]
        k, p = int(header["k"]), int(header["num_probes"])  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError) as exc:
        raise FingerprintError(f"fingerprint header is missing or has a malformed field: {exc}") from exc
    for name in _TENSOR_NAMES:
        if tensors[name].dtype != torch.float64:
            raise FingerprintError(f"tensor {name!r} is {tensors[name].dtype}, expected float64")
        if not bool(torch.isfinite(tensors[name]).all()):
            raise FingerprintError(f"tensor {name!r} holds non-finite values")
    probes, pert = tensors["probes"], tensors["perturbations"]
    ref, out = tensors["reference_outputs"], tensors["perturbed_outputs"]
    if tuple(pert.shape) != (k, *shape):
        raise FingerprintError(f"inconsistent shapes: perturbations are {tuple(pert.shape)}, expected "
                               f"(k, *input_shape) = {(k, *shape)}")
    if tuple(probes.shape) != (p, *shape):
        raise FingerprintError(f"inconsistent shapes: probes are {tuple(probes.shape)}, expected "
                               f"(p, *input_shape) = {(p, *shape)}")
    if int(header.get("version", 1)) >= 2:  # type: ignore[call-overload]
        gains, thresholds = header.get("gains"), header.get("thresholds")
        if not isinstance(gains, list) or len(gains) != p or not isinstance(thresholds, dict) or not thresholds \
                or not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in thresholds.values()):
            raise FingerprintError("fingerprint header: gains must hold one value per probe and thresholds "
                                   "positive numbers")
    if ref.ndim < 1 or ref.shape[0] != p or tuple(out.shape) != (k, p, *ref.shape[1:]):
        raise FingerprintError(f"inconsistent shapes: reference outputs {tuple(ref.shape)} and perturbed outputs "
                               f"{tuple(out.shape)} do not match k = {k}, p = {p}")


def load_fingerprint(path: str | Path) -> Fingerprint:
    """Read and check a fingerprint written by :func:`save_fingerprint`.

    Refuses (:class:`FingerprintError`) a file that is not a fingerprint, an unknown format
    version, a checksum mismatch (any byte of the tensors or the header changed) and shapes
    inconsistent with the header. Only safetensors is parsed: nothing in the file can run code.
    """
    from safetensors.torch import load

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FingerprintError(f"cannot read fingerprint file {path}: {exc.strerror or exc}") from exc
    meta = _read_metadata(data, path)
    try:
        header = json.loads(meta[_METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise FingerprintError(f"{path}: the fingerprint header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise FingerprintError(f"{path} is not a harmless fingerprint (format {header.get('format')!r})"
                               if isinstance(header, dict) else f"{path}: malformed fingerprint header")
    if header.get("version") not in READABLE_VERSIONS:
        raise FingerprintError(f"{path}: unsupported fingerprint format version {header.get('version')!r} "
                               f"(this harmless reads versions {', '.join(map(str, READABLE_VERSIONS))})")
    try:
        tensors = load(data)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise FingerprintError(f"{path}: corrupt safetensors data ({exc})") from exc
    expected = meta.get(_CHECKSUM_KEY)
    if not isinstance(expected, str):
        raise FingerprintError(f"{path}: the fingerprint has no checksum")
    extra = sorted(set(tensors) - set(_TENSOR_NAMES))
    if extra:
        raise FingerprintError(f"{path}: unexpected tensor(s) {', '.join(extra)}")
    try:
        actual = _checksum(header, tensors)
    except (TypeError, ValueError) as exc:
        raise FingerprintError(f"{path}: malformed fingerprint header ({exc})") from exc
    if actual != expected:
        raise FingerprintError(f"{path}: checksum mismatch (the file was modified or is corrupt): "
                               f"expected {expected[:16]}..., got {actual[:16]}...")
    _validate(header, tensors)
    try:
        return Fingerprint(
            probes=tensors["probes"], perturbations=tensors["perturbations"],
            reference_outputs=tensors["reference_outputs"], perturbed_outputs=tensors["perturbed_outputs"],
            input_shape=tuple(int(s) for s in header["input_shape"]), model_hash=str(header["model_hash"]),
            magnitude=float(header["magnitude"]), harmless_dim=int(header["harmless_dim"]),
            intersection_dims=[int(d) for d in header.get("intersection_dims", [])],
            excluded_dim=int(header.get("excluded_dim", 0)),
            exclusion_margins=[float(v) for v in header.get("exclusion_margins", [])],
            harmful_residual=float(header.get("harmful_residual", 0.0)), threshold=float(header["threshold"]),
            dtype=str(header.get("dtype", "float64")), version=int(header["version"]),
            description=str(header.get("description", "")),
            roundoff={str(k): float(v) for k, v in dict(header.get("roundoff", {})).items()},
            thresholds={str(k): float(v) for k, v in dict(header.get("thresholds", {})).items()},
            gains=[float(g) for g in header.get("gains", [])],
            operator_norm=float(header.get("operator_norm", 0.0)))
    except (KeyError, TypeError, ValueError) as exc:
        raise FingerprintError(f"{path}: malformed fingerprint header ({exc})") from exc


# ----------------------------------------------------------------------------- verify


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
    except Exception as exc:  # noqa: BLE001 - a suspect that cannot take the inputs is a user error
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
        except Exception:  # noqa: BLE001 - a module whose state cannot be hashed: just no hash check
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
