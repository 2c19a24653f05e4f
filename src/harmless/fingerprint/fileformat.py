"""The fingerprint file: one ``.safetensors`` file holding the tensors and a JSON header (in
the safetensors metadata) with a SHA-256 checksum over both. Loading parses only
safetensors and JSON (nothing in a file can run code) and refuses unknown versions,
tampered bytes and inconsistent shapes."""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harmless.cache import atomic_path, require_file_path
from harmless.errors import HarmlessError, InputError

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
        shape = tuple(int(s) for s in header["input_shape"])  # type: ignore[attr-defined]
        k, p = int(header["k"]), int(header["num_probes"])  # type: ignore[call-overload]
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
    except Exception as exc:
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


