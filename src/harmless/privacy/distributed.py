"""Privatising many images on Ray Data: ``harmless privatize ... --ray [ADDRESS]``.

The images a run still has to do (see :class:`~harmless.privacy.job.PrivatizeRun`) become a
Ray dataset of file paths; ``map_batches`` hands batches of them to a pool of actors, each of
which makes the dense data of the model's harmless subspace once and then privatises and
writes image after image (atomically, as the single-process job does). The driver collects the
records as batches finish (the progress bar), then writes the report and the figure.

The bytes written are those of :func:`~harmless.privacy.job.privatize_files` on the same
inputs, settings and machine: every image is solved on its own, on one torch thread, with a
generator seeded by its file name, so neither the batches, their order nor the number of
workers change a bit. A run resumes like the single-process one (finished images are skipped),
whichever engine wrote them.

Ray is optional (``pip install 'harmless[ray]'``). Without an address a local Ray instance is
started with one CPU per worker and stopped at the end; with one (``auto``,
``ray://host:10001``, ``host:6379``) the run joins that cluster, whose nodes must see the
input and output folders at the same paths and import the model's code. On other machines the
results hold to round-off, not to the bit (CPU kernels differ).
"""

from __future__ import annotations

import io
import logging
import math
import os
import pickle
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from harmless import validation
from harmless.errors import HarmlessError, InputError
from harmless.linalg.subspace import HarmlessSubspace
from harmless.privacy.job import ImageRecord, PrivatizeRun, Shown
from harmless.privacy.tiles import Tiling
from harmless.threads import one_torch_thread

__all__ = ["privatize_files_ray", "import_ray"]

_MISSING = "--ray needs Ray, which is not installed: install harmless[ray] (pip install 'harmless[ray]')"
_TEXT_FIELDS = ("source", "exact", "png", "status", "method")


def import_ray() -> ModuleType:
    """The ``ray`` module (with Ray Data), or an :class:`InputError` saying how to install it."""
    try:
        import ray
        import ray.data  # the extra installs both; an old bare ray lacks Ray Data
    except ImportError:
        raise InputError(_MISSING) from None
    return ray


def privatize_files_ray(space: HarmlessSubspace | Tiling, inputs: Sequence[str | Path], out_dir: str | Path, *,
                        method: str = "decoy", decoy: str = "grey", batch_size: int = 16, progress: bool = True,
                        seed: int = 0, workers: int | None = None, address: str | None = None) -> Path:
    """:func:`~harmless.privacy.job.privatize_files` on Ray Data with ``workers`` actors (default:
    every CPU of the machine, or of the cluster at ``address``); returns the JSON report's path.
    A Ray instance already running in this process (``ray.init`` done by the caller) is used as
    it is, and left running."""
    from tqdm import tqdm

    ray = import_ray()
    if workers is not None:
        validation.positive_int(workers, "workers")
    run = PrivatizeRun.plan(space, inputs, out_dir, method=method, decoy=decoy, batch_size=batch_size, seed=seed)
    records = list(run.done)
    shown: list[Shown] = []
    if run.todo:
        started = _connect(ray, address, workers)
        try:
            size = workers if workers is not None else max(1, int(ray.cluster_resources().get("CPU", 1)))
            size = min(size, -(-len(run.todo) // batch_size))  # no more actors than batches
            bar = tqdm(total=run.total_steps, desc=f"privatize ({size} Ray workers)", unit=run.unit,
                       disable=not progress or None)
            with _quiet(ray):
                for batch in _results(ray, run, size, batch_size):
                    new, rows = _decode(batch)
                    records += new
                    shown += rows
                    bar.update(len(new) * run.solver.per_image)
            bar.close()
        finally:
            if started:
                ray.shutdown()
    return run.finish(records, shown)


def _connect(ray: ModuleType, address: str | None, workers: int | None) -> bool:
    """Start a local Ray instance (``workers`` CPUs) or join the cluster at ``address``, unless
    this process already has one; returns whether it did (and so should stop it)."""
    if ray.is_initialized():
        return False
    quiet: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR}
    try:
        if address is None:
            # the workers import what this process can (a model factory beside the data, say)
            path = os.pathsep.join(p for p in sys.path if p)
            ray.init(num_cpus=workers if workers is not None else os.cpu_count() or 1,
                     runtime_env={"env_vars": {"PYTHONPATH": path}}, **quiet)
        else:
            ray.init(address=address, **quiet)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        where = "a local Ray instance" if address is None else f"the Ray cluster at {address!r}"
        raise InputError(f"could not start or reach {where}: {str(exc).splitlines()[0] if str(exc) else exc!r}") \
            from None
    return True


@contextmanager
def _quiet(ray: ModuleType) -> Iterator[None]:
    """Ray Data without its own progress bars (ours counts images; its per-operator bars would
    interleave with it), its notes on starting and finishing, and the deprecation warnings its
    own settings raise (nothing a user of ``harmless`` can act on); then as the caller had it."""
    with warnings.catch_warnings():
        # raised where Ray makes its context, and attributed to its callers
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        context = ray.data.DataContext.get_current()
        logger = logging.getLogger("ray.data")
        before = context.enable_progress_bars, context.print_on_execution_start, logger.level
        context.enable_progress_bars = context.print_on_execution_start = False
        logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            context.enable_progress_bars, context.print_on_execution_start = before[:2]
            logger.setLevel(before[2])


def _results(ray: ModuleType, run: PrivatizeRun, size: int, batch_size: int) -> Any:
    """The batches of records, as the actors finish them."""
    rows = [{"path": str(p)} for p in run.todo]
    blocks = -(-len(rows) // batch_size)  # one block per batch: the actors share the work evenly
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    out = ds.map_batches(_Worker, fn_constructor_kwargs={"run": run}, batch_size=batch_size, batch_format="numpy",
                         compute=ray.data.ActorPoolStrategy(size=size), num_cpus=1)
    return out.iter_batches(batch_size=None, batch_format="numpy")


class _Worker:
    """One actor of the pool: the run's solver, whose dense data it makes on its first image and
    keeps; each call privatises a batch of paths and returns their records (and figure rows)."""

    def __init__(self, run: PrivatizeRun) -> None:
        torch.set_num_threads(1)  # the bits depend on the thread count; see harmless.privacy.job
        # Ray hands over arrays read-only in shared memory; the worker's own copy is writable
        self.run: PrivatizeRun = pickle.loads(pickle.dumps(run))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            with one_torch_thread():
                records, rows = self.run.privatize([Path(str(p)) for p in batch["path"]])
        except HarmlessError as exc:
            # a user mistake (an unreadable image, say) travels as data: Ray would hand the driver
            # a wrapped traceback, where the command line owes the user one line
            return _encode([_FAILED], [], f"{type(exc).__name__}: {exc}")
        return _encode(records, rows, "")


_FAILED = ImageRecord("", "", "", "failed", "", *(math.nan,) * 6)


def _encode(records: Sequence[ImageRecord], rows: Sequence[Shown], error: str) -> dict[str, np.ndarray]:
    """A batch of :class:`_Worker` output: the records' fields, each shown image's figure row
    (packed; empty for the others) and the user error that stopped the batch (empty: none)."""
    figures = dict(rows)
    out: dict[str, np.ndarray] = {}
    for f in fields(ImageRecord):
        values = [getattr(r, f.name) for r in records]
        out[f.name] = np.array(values, dtype=object if f.name in _TEXT_FIELDS else np.float64)
    out["figure"] = np.array([_pack(figures[Path(r.source).name]) if Path(r.source).name in figures else b""
                              for r in records], dtype=object)
    out["error"] = np.array([error] * len(records), dtype=object)
    return out


def _user_error(kind: str, message: str) -> HarmlessError:
    """The user error a worker reported, as the :mod:`harmless.errors` class it was."""
    import harmless.errors

    cls = getattr(harmless.errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, HarmlessError):
        return cls(message)
    return HarmlessError(message)


def _pack(row: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    np.save(buf, torch.stack(row).numpy(), allow_pickle=False)
    return buf.getvalue()


def _decode(batch: dict[str, np.ndarray]) -> tuple[list[ImageRecord], list[Shown]]:
    """The records and figure rows of one batch of :class:`_Worker` output."""
    records: list[ImageRecord] = []
    shown: list[Shown] = []
    names = [f.name for f in fields(ImageRecord)]
    for error in batch["error"]:
        if error:
            kind, _, message = str(error).partition(": ")
            raise _user_error(kind, message)
    for i in range(len(batch["source"])):
        values = {k: (str(batch[k][i]) if k in _TEXT_FIELDS else float(batch[k][i])) for k in names}
        record = ImageRecord(**values)  # type: ignore[arg-type]
        records.append(record)
        packed = bytes(batch["figure"][i])
        if packed:
            stacked = torch.from_numpy(np.load(io.BytesIO(packed), allow_pickle=False))
            shown.append((Path(record.source).name, (stacked[0], stacked[1], stacked[2])))
    return records, shown
