"""Privatising image files: the work behind ``harmless privatize``.

Reads images (files, folders), privatises them in batches, writes for each one the exact
float64 result (safetensors, model output unchanged to round-off) and an 8-bit PNG (rounded
with the greedy rounding that stays closest to the harmless set), plus a side-by-side figure
(original | privatised | attacker's reconstruction) and a JSON + markdown report.

Every file is written atomically; an output path that is one of the inputs is refused; a
run that was interrupted resumes, skipping images whose outputs are already complete. Each
exact output records, in its safetensors metadata, the method that made it and its metrics:
a resumed run reports them from there, and refuses to mix in another method.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from harmless.cache import atomic_path, atomic_write_bytes, atomic_write_text, require_folder_path
from harmless.errors import InputError
from harmless.linalg.subspace import HarmlessSubspace
from harmless.plotting import save_figure, show_image
from harmless.privacy.core import _check_positive
from harmless.privacy.tiles import Tiling, per_image_norms

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


def _read_metadata(exact: Path) -> dict[str, str]:
    """The safetensors metadata of an exact output; empty when absent or unreadable."""
    try:
        with safe_open(str(exact), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception:  # noqa: BLE001 - absent, truncated or foreign: not one of ours
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
_MODE_WORDS = {"1": "a black-and-white", "L": "a grayscale", "P": "a palette", "RGB": "an RGB", "LA": "a grayscale+alpha",
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


def _png_bytes(img: torch.Tensor) -> bytes:
    arr = np.round(img.detach().cpu().numpy() * 255.0).clip(0, 255).astype(np.uint8)
    pil = Image.fromarray(arr[0], mode="L") if arr.shape[0] == 1 else Image.fromarray(arr.transpose(1, 2, 0), "RGB")
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def _outputs(src: Path, out_dir: Path) -> tuple[Path, Path]:
    return out_dir / f"{src.stem}.privatized.safetensors", out_dir / f"{src.stem}.privatized.png"


def privatize_files(space: HarmlessSubspace | Tiling, inputs: Sequence[str | Path], out_dir: str | Path, *,
                    method: str = "decoy", decoy: str = "grey", batch_size: int = 16, progress: bool = True,
                    seed: int = 0) -> Path:
    """Privatise every image in ``inputs`` into ``out_dir``; returns the JSON report's path.
    ``space`` may be a :class:`~harmless.privacy.tiles.Tiling`: every QP is then solved tile by
    tile, which is what makes large images (224 px and more) tractable."""
    from tqdm import tqdm

    from harmless.metrics import ssim
    from harmless.privacy.audit import tv_attack
    from harmless.privacy.core import make_decoy, privatize_decoy, privatize_paper, quantize_harmless

    tiles = space if isinstance(space, Tiling) else None
    if tiles is not None:
        space, whole = tiles.part, tiles.whole
        split, merge, per_image = tiles.split, tiles.merge, tiles.tiles_per_image
    else:
        whole, per_image = space, 1
        split = merge = torch.nn.Identity()

    if method not in ("paper", "decoy"):
        raise InputError(f"method must be 'paper' or 'decoy', got {method!r}")
    _check_positive(batch_size, "batch_size", integer=True)
    if whole.dim == 0:
        raise InputError("the model's linear prefix is injective: there is no harmless perturbation to hide behind")
    if len(whole.input_shape) != 3:
        raise InputError(f"privatize works on images (C, H, W); the model takes {whole.input_shape}")
    out_dir = require_folder_path(out_dir)
    sources = collect_images(inputs)
    resolved_inputs = {p.resolve() for p in sources}
    stems = [p.stem for p in sources]
    if len(set(stems)) != len(stems):
        raise InputError("two inputs share a file name stem; their outputs would collide")
    for src in sources:
        for out in _outputs(src, out_dir):
            if out.resolve() in resolved_inputs:
                raise InputError(f"output {out} would overwrite an input; choose another --out folder")
    decoy_image: str | torch.Tensor = decoy
    if method == "decoy" and decoy not in ("grey", "noise", "shift"):
        decoy_image = read_image(Path(decoy), whole.input_shape).unsqueeze(0)
    # What each output records as its method; a decoy image is known by its file name.
    label = "paper" if method == "paper" else "decoy-" + (decoy if isinstance(decoy_image, str)
                                                          else f"image:{Path(decoy).name}")

    records: list[ImageRecord] = []
    todo = [s for s in sources if not all(p.exists() for p in _outputs(s, out_dir))]
    for src in sources:
        if src not in todo:
            exact, png = _outputs(src, out_dir)
            meta = _read_metadata(exact)
            if meta.get("method") != label:
                # Mixing methods in one folder would make its report lie about half the images.
                raise InputError(f"{exact} was made with {meta.get('method', 'an unknown method')!r}, this run asks "
                                 f"for {label!r}; use another --out folder (or the earlier method to resume)")
            records.append(ImageRecord(str(src), str(exact), str(png), "skipped (already done)", label,
                                       **_stored_metrics(meta)))
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shown: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    # Tiled: every tile is its own QP, so tiles are solved a chunk at a time and the bar counts
    # them (a single 4000x4000 image is 10^5 tiles and many minutes). It shows on a terminal only.
    step = _TILE_CHUNK if tiles is not None else None
    bar = tqdm(total=len(todo) * per_image, desc="privatize", unit="tile" if tiles is not None else "image",
               disable=not progress or None)
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        x = torch.stack([read_image(p, whole.input_shape) for p in batch]).to(space.dtype)
        xt = split(x)
        dt = None
        if method == "decoy":
            dt = split(make_decoy(decoy_image if isinstance(decoy_image, str) else decoy_image[0], x, generator=gen))
        parts: list[tuple[torch.Tensor, ...]] = []
        for c0 in range(0, xt.shape[0], step or xt.shape[0]):
            xc = xt[c0:c0 + (step or xt.shape[0])]
            if dt is None:
                res = privatize_paper(space, xc, generator=gen)
            else:
                res = privatize_decoy(space, xc, dt[c0:c0 + xc.shape[0]])
            quant = quantize_harmless(space, res.x_hat, xc)
            parts.append((res.x_hat, quant.improved, res.box_violation, res.output_deviation, quant.naive_deviation,
                          quant.improved_deviation, res.info["projection"].distance_bound))
            bar.update(xc.shape[0] if tiles is not None else len(batch))
        hat_t, q_t, box_t, dev_t, naive_t, qdev_t, bound_t = (torch.cat(v) for v in zip(*parts))
        x_hat, x_8bit = merge(hat_t), merge(q_t)
        quality = ssim(x, x_hat)
        box = box_t.reshape(-1, per_image).amax(1)
        deviations = [per_image_norms(v, per_image) for v in (dev_t, naive_t, qdev_t, bound_t)]
        for i, src in enumerate(batch):
            exact, png = _outputs(src, out_dir)
            out_dev, naive_dev, png_dev, bound = (float(v[i]) for v in deviations)
            metrics = dict(zip(_METRICS, (float(box[i]), out_dev, naive_dev, png_dev, float(quality[i]), bound)))
            # the PNG first: the exact file (with the method and metrics) marks the image as done
            atomic_write_bytes(png, _png_bytes(x_8bit[i]))
            with atomic_path(exact) as tmp:
                save_file({"x_hat": x_hat[i].contiguous(), "x_hat_8bit": x_8bit[i].contiguous()},
                          str(tmp), metadata={"source": src.name, "method": label, "metrics": json.dumps(metrics)})
            records.append(ImageRecord(str(src), str(exact), str(png), "privatised", label, **metrics))
        if len(shown) < 6:
            take = min(6 - len(shown), len(batch))
            recon = merge(tv_attack(space, split(x_hat[:take]), images=None if tiles is None else merge))
            shown += [(x[i], x_hat[i], recon[i]) for i in range(take)]
    bar.close()
    order = {stem: i for i, stem in enumerate(stems)}
    records.sort(key=lambda r: order[Path(r.source).stem])  # in input order, resumed or not

    report = {"method": method, "label": label, "decoy": decoy if method == "decoy" else None,
              "input_shape": list(whole.input_shape), "harmless_dim": whole.dim, "tile": tiles.tile if tiles is not None else None,
              "images": [asdict(r) for r in records]}
    json_path = atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2))
    lines = ["# harmless privatize report", "",
             f"method: {method}" + (f" (decoy: {decoy})" if method == "decoy" else "")
             + f"; harmless dimension {whole.dim} of {whole.ambient_dim}"
             + (f"; solved tile by tile ({tiles.tile}x{tiles.tile})" if tiles is not None else ""), "",
             "| image | status | max box violation | ‖A(x̂−x)‖ | 8-bit ‖A(q−x)‖ naive → ours | SSIM to original "
             "| certified ‖x̂−x̂*‖ |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in records:
        if not math.isnan(r.ssim):
            lines.append(f"| {Path(r.source).name} | {r.status} | {r.box_violation:.1e} | {r.output_deviation:.1e} | "
                         f"{r.png_output_deviation_naive:.2e} → {r.png_output_deviation:.2e} | {r.ssim:.3f} | "
                         f"{r.distance_bound:.1e} |")
        else:
            lines.append(f"| {Path(r.source).name} | {r.status} | | | | | |")
    atomic_write_text(out_dir / "report.md", "\n".join(lines) + "\n")
    if shown:
        _figure(shown, out_dir / _FIGURE)
    return json_path


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
