"""Default probe images of a fingerprint: the first test images of a data set."""

from __future__ import annotations

import torch

from harmless.errors import InputError


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


