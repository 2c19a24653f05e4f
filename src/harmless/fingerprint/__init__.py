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

Layout: :mod:`.fileformat` (the file: header, tensors, checksum, save and load),
:mod:`.exclusion` (the linear algebra: intersections of nullspaces, what is left to draw
from), :mod:`.protocol` (creating and verifying), :mod:`.probes` (default probe images).
"""

from __future__ import annotations

from harmless.fingerprint.exclusion import (
    exclusion_basis,
    exclusion_margin,
    intersection_basis,
)
from harmless.fingerprint.fileformat import (
    CALIBRATION_MARGIN,
    DEFAULT_MAGNITUDE_RATIO,
    DEFAULT_THRESHOLD,
    FORMAT,
    FORMAT_VERSION,
    READABLE_VERSIONS,
    THRESHOLD_PER_RATIO,
    Fingerprint,
    FingerprintError,
    FingerprintExistsError,
    check_fingerprint_path,
    load_fingerprint,
    save_fingerprint,
)
from harmless.fingerprint.probes import probe_images
from harmless.fingerprint.protocol import (
    Verdict,
    create_fingerprint,
    fingerprint_statistic,
    model_hash,
    verify_fingerprint,
)

__all__ = [
    "CALIBRATION_MARGIN",
    "DEFAULT_MAGNITUDE_RATIO",
    "DEFAULT_THRESHOLD",
    "FORMAT",
    "FORMAT_VERSION",
    "READABLE_VERSIONS",
    "THRESHOLD_PER_RATIO",
    "Fingerprint",
    "FingerprintError",
    "FingerprintExistsError",
    "Verdict",
    "check_fingerprint_path",
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
