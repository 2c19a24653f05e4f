"""Privatising image files: the work behind ``harmless privatize``.

Reads images (files, folders), privatises them in batches, writes for each one the exact
float64 result (safetensors, model output unchanged to round-off) and an 8-bit PNG (rounded
with the greedy rounding that stays closest to the harmless set), plus a side-by-side figure
(original | privatised | attacker's reconstruction) and a JSON + markdown report.

Every file is written atomically; an output path that is one of the inputs is refused; a
run that was interrupted resumes, skipping images whose outputs are already complete.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from harmless.cache import atomic_path, atomic_write_bytes, atomic_write_text
from harmless.errors import InputError
from harmless.linalg.subspace import HarmlessSubspace
from harmless.plotting import save_figure, show_image
from harmless.privacy.tiles import Tiling, per_image_norms

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass
class ImageRecord:
    """What happened to one input image."""

    source: str
    exact: str
    png: str
    status: str  # "privatised" or "skipped (already done)"
    box_violation: float
    output_deviation: float  # ||A (x_hat - x)||, float64
    png_output_deviation_naive: float  # ||A (q - x)|| after plain 8-bit rounding
    png_output_deviation: float  # after the rounding that stays closest to the harmless set
    ssim: float
    distance_bound: float  # certified ||x_hat - x_hat*|| to the exact optimum of the QP


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files named directly or found (recursively, sorted) in named folders."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
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
    arr = read_uint8(path)  # its natural mode: grayscale or RGB
    if arr.shape[0] != channels:
        have, want = ("grayscale", "RGB (3 channels)") if arr.shape[0] == 1 else ("RGB", "grayscale (1 channel)")
        raise InputError(f"{path}: a {have} image, but the model expects {want}")
    if arr.shape[1:] != (height, width):
        raise InputError(f"{path}: the image is {arr.shape[2]}x{arr.shape[1]}, the model expects {width}x{height}")
    return torch.as_tensor(arr, dtype=torch.float64) / 255.0


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
    if whole.dim == 0:
        raise InputError("the model's linear prefix is injective: there is no harmless perturbation to hide behind")
    if len(whole.input_shape) != 3:
        raise InputError(f"privatize works on images (C, H, W); the model takes {whole.input_shape}")
    out_dir = Path(out_dir)
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

    out_dir.mkdir(parents=True, exist_ok=True)
    records: list[ImageRecord] = []
    todo = [s for s in sources if not all(p.exists() for p in _outputs(s, out_dir))]
    for src in sources:
        if src not in todo:
            exact, png = _outputs(src, out_dir)
            records.append(ImageRecord(str(src), str(exact), str(png), "skipped (already done)",
                                       *([float("nan")] * 6)))
    gen = torch.Generator().manual_seed(seed)
    shown: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    bar = tqdm(total=len(todo), desc="privatize", unit="image", disable=not progress or None)
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        x = torch.stack([read_image(p, whole.input_shape) for p in batch]).to(space.dtype)
        if method == "paper":
            res = privatize_paper(space, split(x), generator=gen)
            label = res.method
        else:
            label = f"decoy-{decoy_image if isinstance(decoy_image, str) else 'image'}"
            d = make_decoy(decoy_image if isinstance(decoy_image, str) else decoy_image[0], x, generator=gen)
            res = privatize_decoy(space, split(x), split(d))
        quant = quantize_harmless(space, res.x_hat, split(x))
        x_hat, x_8bit = merge(res.x_hat), merge(quant.improved)
        quality = ssim(x, x_hat)
        box = res.box_violation.reshape(-1, per_image).amax(1)
        deviations = [per_image_norms(v, per_image) for v in (res.output_deviation, quant.naive_deviation,
                                                          quant.improved_deviation,
                                                          res.info["projection"].distance_bound)]
        for i, src in enumerate(batch):
            exact, png = _outputs(src, out_dir)
            with atomic_path(exact) as tmp:
                save_file({"x_hat": x_hat[i].contiguous(), "x_hat_8bit": x_8bit[i].contiguous()},
                          str(tmp), metadata={"source": src.name, "method": label})
            atomic_write_bytes(png, _png_bytes(x_8bit[i]))
            out_dev, naive_dev, png_dev, bound = (float(v[i]) for v in deviations)
            records.append(ImageRecord(str(src), str(exact), str(png), "privatised", float(box[i]), out_dev,
                                       naive_dev, png_dev, float(quality[i]), bound))
        if len(shown) < 6:
            take = min(6 - len(shown), len(batch))
            recon = merge(tv_attack(space, split(x_hat[:take]), images=None if tiles is None else merge))
            shown += [(x[i], x_hat[i], recon[i]) for i in range(take)]
        bar.update(len(batch))
    bar.close()

    report = {"method": method, "decoy": decoy if method == "decoy" else None, "input_shape": list(whole.input_shape),
              "harmless_dim": whole.dim, "tile": tiles.tile if tiles is not None else None,
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
        if r.status == "privatised":
            lines.append(f"| {Path(r.source).name} | {r.status} | {r.box_violation:.1e} | {r.output_deviation:.1e} | "
                         f"{r.png_output_deviation_naive:.2e} → {r.png_output_deviation:.2e} | {r.ssim:.3f} | "
                         f"{r.distance_bound:.1e} |")
        else:
            lines.append(f"| {Path(r.source).name} | {r.status} | | | | | |")
    atomic_write_text(out_dir / "report.md", "\n".join(lines) + "\n")
    if shown:
        _figure(shown, out_dir / "side_by_side.png")
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


def load_privatized(path: str | Path) -> torch.Tensor:
    """The exact float64 privatised image from a ``.privatized.safetensors`` file."""
    return load_file(str(path))["x_hat"]
