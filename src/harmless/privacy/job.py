"""Privatising image files: the work behind ``harmless privatize``.

Reads images (files, folders), privatises them in batches, writes for each one the exact
float64 result (safetensors, model output unchanged to round-off) and an 8-bit PNG (rounded
with the greedy rounding that stays closest to the harmless set), plus a side-by-side figure
(original | privatised | attacker's reconstruction) and a JSON + markdown report.

Every file is written atomically; an output path that is one of the inputs is refused; a
run that was interrupted resumes, skipping images whose outputs are already complete. Each
exact output records, in its safetensors metadata, the method that made it and its metrics:
a resumed run reports them from there, and refuses to mix in another method.

Each image's outputs depend on that image, the model, the settings and the seed only, never on
which images share its batch, their order, or how many processes share the work: every image
is solved on its own (batched solves agree only to ~1e-15), on one torch thread (results on
one and on two threads differ in the last bits), with its random numbers (``noise`` decoys,
the paper method's start) drawn from a generator seeded by the run's seed and the image's
file name. So a resumed run, or one spread over Ray workers (:mod:`harmless.privacy.distributed`),
writes the same bytes as one uninterrupted single-process run on the same machine
(:class:`PrivatizeRun` is the part they share).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from harmless import validation
from harmless.cache import atomic_path, atomic_write_bytes, atomic_write_text, require_folder_path
from harmless.data.formats import png_bytes
from harmless.errors import InputError
from harmless.linalg.subspace import HarmlessSubspace
from harmless.plotting import save_figure, show_image
from harmless.privacy.audit import TVAttack
from harmless.privacy.core import DecoyPrivatizer, PaperPrivatizer, PrivatizeResult, Quantizer, make_decoy
from harmless.privacy.problem import PrivacyProblem, ProblemCache
from harmless.privacy.tiles import Tiling, per_image_norms
from harmless.threads import one_torch_thread

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass
class ImageRecord:
    """What happened to one input image."""

    source: str
    exact: str
    png: str
    status: str  # "privatised" or "skipped (already done)"
    method: str  # what made the output: "paper", "decoy-grey", ..., "decoy-image:<file name>"
    box_violation: float
    output_deviation: float  # ||A (x_hat - x)||, float64
    png_output_deviation_naive: float  # ||A (q - x)|| after plain 8-bit rounding
    png_output_deviation: float  # after the rounding that stays closest to the harmless set
    ssim: float
    distance_bound: float  # certified ||x_hat - x_hat*|| to the exact optimum of the QP


_METRICS = ("box_violation", "output_deviation", "png_output_deviation_naive", "png_output_deviation", "ssim",
            "distance_bound")
_FIGURE = "side_by_side.png"
_TILE_CHUNK = 256  # tiles per QP solve in a tiled run: one progress step
_SHOWN = 6  # images in the side-by-side figure


def _own_output(path: Path) -> bool:
    """Whether ``path`` (found in a folder) is something an earlier run wrote there: a PNG
    whose exact twin records its source, or the figure beside a run report. Such files are
    not inputs, so the input folder can be ``--out`` again; anything else that merely looks
    like an output stays an input (and is never written over)."""
    if path.name == _FIGURE:
        return (path.parent / "report.json").is_file()
    if path.name.endswith(".privatized.png"):
        return _read_metadata(path.with_suffix(".safetensors")).get("source") is not None
    return False


#: The one safetensors metadata key of an exact output: a JSON object with ``source``, ``method``
#: and ``metrics``. One key, because safetensors writes several in a different order in every
#: process, and the bytes of an output must not depend on the process that wrote it.
_META_KEY = "harmless.privatize"


def _png_verifies(path: Path) -> bool:
    """Whether ``path`` is a whole PNG (its chunks' checksums hold)."""
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:  # absent, cut short or not a PNG
        return False


def _read_metadata(exact: Path) -> dict[str, str]:
    """The metadata of an exact output (``source``, ``method``, ``metrics``), read from its one
    key or, for outputs of earlier versions, from three keys; empty when absent or unreadable."""
    try:
        with safe_open(str(exact), framework="pt") as fh:
            raw = dict(fh.metadata() or {})
        if _META_KEY not in raw:
            return raw
        meta = json.loads(raw[_META_KEY])
        return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}
    except Exception:  # absent, truncated or foreign: not one of ours
        return {}


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files named directly or found (recursively, sorted) in named folders; in folders,
    the outputs of an earlier ``privatize`` run there are left out (see :func:`_own_output`)."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*")
                            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not _own_output(p))
        elif path.is_file():
            found.append(path)
        else:
            raise InputError(f"input {str(path)!r} is neither an image file nor a folder")
    if not found:
        raise InputError("no input images found")
    return found


def read_image(path: Path, input_shape: Sequence[int]) -> torch.Tensor:
    """One image as float64 ``(C, H, W)`` in [0, 1], checked against the model's input shape."""
    from harmless.data.formats import read_image as read_uint8

    channels, height, width = (int(s) for s in input_shape)
    arr = read_uint8(path)  # its natural mode: grayscale or RGB (a fresh, writable array)
    if arr.shape[0] != channels:
        want = "RGB (3 channels)" if channels == 3 else "grayscale (1 channel)"
        raise InputError(f"{path}: {_describe_mode(path, arr.shape[0])}, but the model expects {want}")
    if arr.shape[1:] != (height, width):
        raise InputError(f"{path}: the image is {arr.shape[2]}x{arr.shape[1]}, the model expects {width}x{height}")
    return torch.from_numpy(arr).to(torch.float64) / 255.0


# Pillow modes in words, with their article; anything else is named by its Pillow mode.
_MODE_WORDS = {"1": "a black-and-white", "L": "a grayscale", "P": "a palette", "RGB": "an RGB",
               "LA": "a grayscale+alpha",
               "PA": "a palette+alpha", "RGBA": "an RGBA", "RGBX": "an RGBX", "CMYK": "a CMYK", "YCbCr": "a YCbCr",
               "LAB": "a LAB", "HSV": "an HSV", "I;16": "a 16-bit grayscale", "I": "a 32-bit grayscale"}


def _describe_mode(path: Path, channels: int) -> str:
    """``"an RGBA image (read as RGB, 3 channels)"``: what the file is and what it was read as."""
    with Image.open(path) as im:
        mode = im.mode
    read_as = "grayscale, 1 channel" if channels == 1 else "RGB, 3 channels"
    if mode in ("L", "RGB"):
        return f"{_MODE_WORDS[mode]} image ({read_as})"
    return f"{_MODE_WORDS.get(mode, f'a {mode}')} image (converted to {read_as})"


def _outputs(src: Path, out_dir: Path) -> tuple[Path, Path]:
    return out_dir / f"{src.stem}.privatized.safetensors", out_dir / f"{src.stem}.privatized.png"


def privatize_files(space: HarmlessSubspace | Tiling, inputs: Sequence[str | Path], out_dir: str | Path, *,
                    method: str = "decoy", decoy: str = "grey", batch_size: int = 16, progress: bool = True,
                    seed: int = 0) -> Path:
    """Privatise every image in ``inputs`` into ``out_dir``; returns the JSON report's path.
    ``method``: ``"decoy"`` (:class:`~harmless.privacy.DecoyPrivatizer`; ``decoy``: ``"grey"``,
    ``"noise"``, ``"shift"`` (each image hides behind the input before it, the first behind the
    last) or an image file) or ``"paper"`` (:class:`~harmless.privacy.PaperPrivatizer`).
    ``space`` may be a :class:`~harmless.privacy.tiles.Tiling`: every QP is then solved tile by
    tile, which is what makes large images (224 px and more) tractable. ``batch_size`` images
    are read and written at a time (it does not change the results)."""
    from tqdm import tqdm

    run = PrivatizeRun.plan(space, inputs, out_dir, method=method, decoy=decoy, batch_size=batch_size, seed=seed)
    records = list(run.done)
    shown: list[Shown] = []
    # a tiled run counts tiles (a single 4000x4000 image is 10^5 tiles and many minutes); the bar
    # shows on a terminal only
    bar = tqdm(total=run.total_steps, desc="privatize", unit=run.unit, disable=not progress or None)
    with one_torch_thread():
        for start in range(0, len(run.todo), batch_size):
            batch = run.todo[start:start + batch_size]
            new, rows = run.privatize(batch, bar.update)
            records += new
            shown += rows
    bar.close()
    return run.finish(records, shown)


def image_generator(seed: int, name: str) -> torch.Generator:
    """The random generator of one image: seeded by the run's ``seed`` and the image's file
    ``name`` (unique in a run), so its draws do not depend on the other images or their order."""
    digest = hashlib.sha256(f"{int(seed)}\0{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


#: (original, privatised, the attacker's reconstruction) of one image, for the figure.
FigureRow = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
#: An image of the figure: its source file's name and its :data:`FigureRow`.
Shown = tuple[str, FigureRow]


@dataclass
class PrivatizeRun:
    """One run of :func:`privatize_files`, planned (settings checked, inputs collected, finished
    images found) and split into the steps every engine shares: :meth:`privatize` a list of the
    images still to do (in any grouping, order or process), then :meth:`finish` with all the
    records. A run pickles (the dense data of its subspace are made by each process that
    solves, once)."""

    solver: _BatchSolver
    out_dir: Path
    sources: list[Path]  # every input, in input order
    done: list[ImageRecord]  # the images an earlier run finished
    todo: list[Path]  # the images still to do, in input order
    method: str
    decoy: str

    @classmethod
    def plan(cls, space: HarmlessSubspace | Tiling, inputs: Sequence[str | Path], out_dir: str | Path, *,
             method: str = "decoy", decoy: str = "grey", batch_size: int = 16, seed: int = 0) -> PrivatizeRun:
        """Check the settings and the inputs, find what an earlier run finished, and make the
        output folder; nothing is solved yet."""
        _check_run(space.whole if isinstance(space, Tiling) else space, method, batch_size)
        folder = require_folder_path(out_dir)
        sources = _collect_inputs(inputs, folder)
        if method == "decoy" and decoy == "shift" and len(sources) < 2:
            raise InputError("decoy 'shift' hides each image behind another input: it needs at least 2 images")
        solver = _BatchSolver.make(space, method, decoy, int(seed))
        done, todo = _resume(sources, folder, solver.label)
        folder.mkdir(parents=True, exist_ok=True)
        return cls(solver, folder, sources, done, todo, method, decoy)

    @property
    def total_steps(self) -> int:
        """Progress steps of the images still to do: images, or tiles in a tiled run."""
        return len(self.todo) * self.solver.per_image

    @property
    def unit(self) -> str:
        return "tile" if self.solver.tiles else "image"

    def shown(self, src: Path) -> bool:
        """Whether ``src`` is one of the images of the figure: the first few still to do."""
        return src in self.todo[:_SHOWN]

    def decoy_source(self, src: Path) -> Path | None:
        """The image whose pixels are ``src``'s decoy (``shift``: the input before it, the first
        image's the last); ``None`` for every other decoy."""
        if not (isinstance(self.solver.decoy, str) and self.solver.decoy == "shift"):
            return None
        return self.sources[self._position[src] - 1]

    @cached_property
    def _position(self) -> dict[Path, int]:
        return {p: i for i, p in enumerate(self.sources)}

    def privatize(self, batch: Sequence[Path], progress: Callable[[int], object] = lambda k: None,
                  ) -> tuple[list[ImageRecord], list[Shown]]:
        """Privatise the images ``batch`` and write their outputs; returns their records and
        the figure rows of those that are :meth:`shown` (with their file names). ``progress(k)`` after every ``k``
        images (tiles, in a tiled run). Call it on one torch thread (:func:`one_torch_thread`)."""
        shape = self.solver.whole.input_shape
        records: list[ImageRecord] = []
        rows: list[Shown] = []
        for src in batch:
            x = read_image(src, shape).unsqueeze(0).to(self.solver.part.dtype)
            other = self.decoy_source(src)
            target = None if other is None else read_image(other, shape).unsqueeze(0).to(self.solver.part.dtype)
            solved = self.solver.solve(x, image_generator(self.solver.seed, src.name), progress, target=target)
            records.append(_write_outputs(src, self.out_dir, solved, 0, self.solver.label))
            if self.shown(src):
                rows.append((src.name, self.solver.figure_row(x[0], solved.x_hat[0])))
        return records, rows

    def finish(self, records: Sequence[ImageRecord], shown: Sequence[Shown]) -> Path:
        """Write the report (records in input order, whatever order they came in) and the
        figure (``shown``, in any order); returns the JSON report's path."""
        order = {p.stem: i for i, p in enumerate(self.sources)}
        ordered = sorted(records, key=lambda r: order[Path(r.source).stem])  # in input order, resumed or not
        json_path = _write_report(self.out_dir, ordered, self.solver, self.method, self.decoy)
        if shown:
            _figure([row for _, row in sorted(shown, key=lambda item: order[Path(item[0]).stem])],
                    self.out_dir / _FIGURE)
        return json_path


# ---------------------------------------------------------------------------------------------
# Settings, inputs and resuming.


def _check_run(whole: HarmlessSubspace, method: str, batch_size: object) -> None:
    """The settings of a run, checked before any file is read."""
    if method not in ("paper", "decoy"):
        raise InputError(f"method must be 'paper' or 'decoy', got {method!r}")
    validation.positive_int(batch_size, "batch_size")
    if whole.dim == 0:
        raise InputError("the model's linear prefix is injective: there is no harmless perturbation to hide behind")
    if len(whole.input_shape) != 3:
        raise InputError(f"privatize works on images (C, H, W); the model takes {whole.input_shape}")


def _collect_inputs(inputs: Sequence[str | Path], out_dir: Path) -> list[Path]:
    """The input images (see :func:`collect_images`), refused when two would write the same
    outputs or an output would overwrite an input."""
    sources = collect_images(inputs)
    stems = [p.stem for p in sources]
    if len(set(stems)) != len(stems):
        raise InputError("two inputs share a file name stem; their outputs would collide")
    resolved_inputs = {p.resolve() for p in sources}
    for src in sources:
        for out in _outputs(src, out_dir):
            if out.resolve() in resolved_inputs:
                raise InputError(f"output {out} would overwrite an input; choose another --out folder")
    return sources


def _resume(sources: list[Path], out_dir: Path, label: str) -> tuple[list[ImageRecord], list[Path]]:
    """The records of the images an earlier run finished (their metrics read back from their
    exact files) and the images still to do. Finished means both outputs are there and verify:
    the exact file's header and metadata read, and name the image; the PNG's data are whole.
    Outputs that do not verify (a file cut short by a crash, say) are made again. An image
    finished with another method is refused: mixing methods in one folder would make its
    report lie about half the images."""
    records: list[ImageRecord] = []
    todo: list[Path] = []
    for src in sources:
        exact, png = _outputs(src, out_dir)
        meta = _read_metadata(exact) if exact.exists() and png.exists() else {}
        if meta.get("source") != src.name or not _png_verifies(png):
            todo.append(src)
            continue
        if meta.get("method") != label:
            raise InputError(f"{exact} was made with {meta.get('method', 'an unknown method')!r}, this run asks "
                             f"for {label!r}; use another --out folder (or the earlier method to resume)")
        records.append(ImageRecord(str(src), str(exact), str(png), "skipped (already done)", label,
                                   **_stored_metrics(meta)))
    return records, todo


# ---------------------------------------------------------------------------------------------
# The per-batch solve.


@dataclass
class _Solved:
    """One batch, privatised: whole images ``x_hat`` (float64) and ``x_8bit``, and per image the
    values of :data:`_METRICS`."""

    x_hat: torch.Tensor
    x_8bit: torch.Tensor
    metrics: list[dict[str, float]]


_CONFIGURED = ("privatizer", "quantizer", "figure_attack")  # the _BatchSolver fields that keep a ProblemCache


@dataclass
class _BatchSolver:
    """Everything a run needs to privatise an image: the privatiser, the 8-bit rounding and the
    attack for the figure (configured once), the dense data of the subspace they solve on (made
    once per process), and, for a tiled run, how images split into tiles."""

    part: HarmlessSubspace  # the subspace every QP is solved on: the image's, or one tile's
    whole: HarmlessSubspace
    tiles: Tiling | None
    privatizer: PaperPrivatizer | DecoyPrivatizer
    decoy: str | torch.Tensor | None  # what decoy targets are made from (None: the paper's method)
    label: str  # what each output records as its method
    seed: int
    quantizer: Quantizer = field(default_factory=Quantizer)
    figure_attack: TVAttack = field(default_factory=TVAttack)

    @classmethod
    def make(cls, space: HarmlessSubspace | Tiling, method: str, decoy: str, seed: int) -> _BatchSolver:
        """The solver of a run whose settings :func:`_check_run` accepted."""
        if isinstance(space, Tiling):
            tiles: Tiling | None = space
            part, whole = space.part, space.whole
        else:
            tiles, part, whole = None, space, space
        kind: str | torch.Tensor | None = None
        if method == "paper":
            privatizer: PaperPrivatizer | DecoyPrivatizer = PaperPrivatizer()
            label = "paper"
        else:
            # a decoy image is read at the model's input size and known by its file name
            kind = decoy if decoy in ("grey", "noise", "shift") else read_image(Path(decoy), whole.input_shape)
            privatizer = DecoyPrivatizer()
            label = "decoy-" + (decoy if isinstance(kind, str) else f"image:{Path(decoy).name}")
        return cls(part, whole, tiles, privatizer, kind, label, seed)

    @cached_property
    def problem(self) -> PrivacyProblem:
        """The dense data every solve of the run shares, made on the first image (a resumed run
        with nothing left to do never needs them)."""
        return PrivacyProblem(self.part)

    def __getstate__(self) -> dict[str, object]:
        # the dense data are made again by each process that solves, not shipped to it; the
        # configured objects' caches of dense data (weak dictionaries, which do not pickle) are
        # empty here (every call passes self.problem) and start anew on arrival
        state = dict(self.__dict__)
        state.pop("problem", None)
        for key in _CONFIGURED:
            obj = copy.copy(state[key])
            vars(obj).pop("_problems", None)
            state[key] = obj
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        for key in _CONFIGURED:
            vars(state[key])["_problems"] = ProblemCache()
        self.__dict__.update(state)

    @property
    def per_image(self) -> int:
        return self.tiles.tiles_per_image if self.tiles is not None else 1

    def split(self, x: torch.Tensor) -> torch.Tensor:
        return self.tiles.split(x) if self.tiles is not None else x

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        return self.tiles.merge(x) if self.tiles is not None else x

    def solve(self, x: torch.Tensor, generator: torch.Generator, progress: Callable[[int], object], *,
              target: torch.Tensor | None = None) -> _Solved:
        """Privatise and round one whole image ``x`` ``(1, C, H, W)`` with its own random
        ``generator``; ``target``: its decoy, where the run's decoy is another image
        (``shift``). ``progress(k)`` after every ``k`` images (tiles, in a tiled run) are done."""
        from harmless.metrics import ssim

        xt = self.split(x)
        # decoys are made on the whole image ('noise' is about images, not tiles), then cut like it
        if self.decoy is None:
            targets = None
        else:
            targets = self.split(target if target is not None else make_decoy(self.decoy, x, generator=generator))
        # a tiled run solves a chunk of tiles at a time: one progress step each
        step = _TILE_CHUNK if self.tiles is not None else xt.shape[0]
        parts = [self._solve_chunk(xt[c0:c0 + step], None if targets is None else targets[c0:c0 + step], generator,
                                   progress, x.shape[0]) for c0 in range(0, xt.shape[0], step)]
        hat_t, q_t, box_t, dev_t, naive_t, qdev_t, bound_t = (torch.cat(v) for v in zip(*parts))
        x_hat, x_8bit = self.merge(hat_t), self.merge(q_t)
        quality = ssim(x, x_hat)
        box = box_t.reshape(-1, self.per_image).amax(1)
        norms = [per_image_norms(v, self.per_image) for v in (dev_t, naive_t, qdev_t, bound_t)]
        metrics = [dict(zip(_METRICS, (float(box[i]), *(float(v[i]) for v in norms[:3]), float(quality[i]),
                                       float(norms[3][i])))) for i in range(x.shape[0])]
        return _Solved(x_hat, x_8bit, metrics)

    def _solve_chunk(self, xc: torch.Tensor, tc: torch.Tensor | None, generator: torch.Generator,
                     progress: Callable[[int], object], images: int) -> tuple[torch.Tensor, ...]:
        if isinstance(self.privatizer, DecoyPrivatizer):
            res: PrivatizeResult = self.privatizer(self.problem, xc, target=tc)
        else:
            res = self.privatizer(self.problem, xc, generator=generator)
        quant = self.quantizer(self.problem, res.x_hat, xc)
        progress(xc.shape[0] if self.tiles is not None else images)
        return (res.x_hat, quant.improved, res.box_violation, res.output_deviation, quant.naive_deviation,
                quant.improved_deviation, res.projection.distance_bound)

    def figure_row(self, x: torch.Tensor, x_hat: torch.Tensor) -> FigureRow:
        """(original, privatised, the attacker's TV reconstruction) of one image ``(C, H, W)``."""
        merge = None if self.tiles is None else self.merge  # the prior ties neighbouring tiles together
        rec = self.figure_attack(self.problem, self.split(x_hat.unsqueeze(0)), images=merge)
        return x, x_hat, self.merge(rec.x_rec)[0]


# ---------------------------------------------------------------------------------------------
# Outputs and the report.


def _write_outputs(src: Path, out_dir: Path, solved: _Solved, i: int, label: str) -> ImageRecord:
    """The PNG and the exact file of image ``i`` of a solved batch, each written atomically; the
    PNG first: the exact file (with the method and metrics) marks the image as done."""
    exact, png = _outputs(src, out_dir)
    metrics = solved.metrics[i]
    atomic_write_bytes(png, png_bytes(solved.x_8bit[i]))
    with atomic_path(exact) as tmp:
        save_file({"x_hat": solved.x_hat[i].contiguous(), "x_hat_8bit": solved.x_8bit[i].contiguous()},
                  str(tmp), metadata={_META_KEY: json.dumps({"source": src.name, "method": label,
                                                             "metrics": json.dumps(metrics)})})
    return ImageRecord(str(src), str(exact), str(png), "privatised", label, **metrics)


def _write_report(out_dir: Path, records: list[ImageRecord], solver: _BatchSolver, method: str, decoy: str) -> Path:
    """``report.json`` and ``report.md`` in ``out_dir``; returns the JSON's path."""
    whole, tiles = solver.whole, solver.tiles
    report = {"method": method, "label": solver.label, "decoy": decoy if method == "decoy" else None,
              "input_shape": list(whole.input_shape), "harmless_dim": whole.dim,
              "tile": tiles.tile if tiles is not None else None, "images": [asdict(r) for r in records]}
    json_path = atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2))
    lines = ["# harmless privatize report", "",
             f"method: {method}" + (f" (decoy: {decoy})" if method == "decoy" else "")
             + f"; harmless dimension {whole.dim} of {whole.ambient_dim}"
             + (f"; solved tile by tile ({tiles.tile}x{tiles.tile})" if tiles is not None else ""), "",
             "| image | status | max box violation | ‖A(x̂−x)‖ | 8-bit ‖A(q−x)‖ naive → ours | SSIM to original "
             "| certified ‖x̂−x̂*‖ |",
             "|---|---|---:|---:|---:|---:|---:|"]
    lines += [_report_row(r) for r in records]
    atomic_write_text(out_dir / "report.md", "\n".join(lines) + "\n")
    return json_path


def _report_row(r: ImageRecord) -> str:
    """One image's row of ``report.md`` (blank metrics where an earlier run stored none)."""
    if math.isnan(r.ssim):
        return f"| {Path(r.source).name} | {r.status} | | | | | |"
    return (f"| {Path(r.source).name} | {r.status} | {r.box_violation:.1e} | {r.output_deviation:.1e} | "
            f"{r.png_output_deviation_naive:.2e} → {r.png_output_deviation:.2e} | {r.ssim:.3f} | "
            f"{r.distance_bound:.1e} |")


def _figure(rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 3, figsize=(6, 2 * len(rows)), squeeze=False)
    for r, imgs in enumerate(rows):
        for c, (img, title) in enumerate(zip(imgs, ("original", "privatised (same output)",
                                                    "attacker's reconstruction (TV)"))):
            ax = axes[r, c]
            show_image(ax, img)
            ax.axis("off")
            if r == 0:
                ax.set_title(title, fontsize=8)
    save_figure(fig, path, dpi=110)


def _stored_metrics(meta: dict[str, str]) -> dict[str, float]:
    """The metrics an earlier run stored with an output (NaN where it stored none)."""
    try:
        stored = json.loads(meta.get("metrics", "{}"))
    except ValueError:
        stored = {}
    return {k: float(stored.get(k, float("nan"))) if isinstance(stored, dict) else float("nan") for k in _METRICS}


def load_privatized(path: str | Path) -> torch.Tensor:
    """The exact float64 privatised image from a ``.privatized.safetensors`` file."""
    return load_file(str(path))["x_hat"]
