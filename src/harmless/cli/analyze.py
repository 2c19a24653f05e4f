"""``harmless analyze MODEL``: the linear run, the input-level harmless subspace (printed first,
in seconds), every linear layer's (``--layers`` limits or skips that table), and with
``--sample`` the exact convex pieces of the harmless input set at one sample, layer by layer."""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any

from harmless.cli.common import add_no_train, resolve_model
from harmless.errors import InputError

#: Sampled perturbations checked against the float64 model at the output piece of ``--sample``.
SAMPLE_CHECKS = 4
#: Seed of the random hull directions (extents) and of the checked samples: reruns agree.
SAMPLE_SEED = 0

SCOPE = ("one exact convex piece of the harmless set (the activation pattern and every max-pooling window's "
         "argmax of the sample kept), not the union over activation regions; nothing is claimed outside it")


def parse_layers(text: str) -> str | int | list[str]:
    """``--layers``: ``all``, ``none``, a count ``N`` (the first N linear layers) or names."""
    t = text.strip()
    if t in ("all", "none"):
        return t
    if t.isdigit():
        return int(t)
    names = [p.strip() for p in t.split(",")]
    if not t or any(not p for p in names) or t.startswith("-"):
        raise InputError(f"--layers must be 'all', 'none', a number of layers or layer names separated by commas, "
                         f"got {text!r}")
    return names


def parse_sample_arg(text: str) -> tuple[str, Any]:
    """``--sample``: ``test:N`` (the N-th test image of a zoo model's data set, from 0), or a file."""
    if text.startswith("test:"):
        index = text[len("test:"):]
        if not index.isdigit():
            raise InputError(f"--sample test:N needs a test-image index N >= 0, got {text!r}")
        return "test", int(index)
    path = Path(text)
    if not path.is_file():
        raise InputError(f"--sample: no such file: {text} (give an image file, a .npy array or test:N)")
    return "file", path


def load_sample(kind: str, where: Any, *, spec: str, shape: tuple[int, ...], data_dir: str | None) -> Any:
    """The sample as a float64 tensor of ``shape`` (no batch axis), with finite entries.

    Image files (PNG, JPEG, ...) are read as 8-bit grayscale or RGB (whichever the model's channel
    count asks for) and scaled to [0, 1], as the zoo's data sets are; a ``.npy`` file holds the
    model's input itself (float values of shape ``shape``, or ``(1, *shape)``)."""
    import numpy as np
    import torch

    from harmless import validation

    if kind == "test":
        from harmless.data import as_tensors, load_dataset
        from harmless.models import is_zoo_spec, parse_spec

        if not is_zoo_spec(spec):
            raise InputError("--sample test:N needs a zoo model (its data set names the test images); give an image "
                             "file or a .npy array for other models")
        ds = load_dataset(parse_spec(spec).dataset, "test", data_dir=data_dir)
        if where >= len(ds):
            raise InputError(f"--sample test:{where}: the {parse_spec(spec).dataset} test set has {len(ds)} images "
                             f"(0-{len(ds) - 1})")
        x, _ = as_tensors(torch.utils.data.Subset(ds, [where]), torch.float64)
        sample = x[0]
    elif where.suffix.lower() == ".npy":
        try:
            arr = np.load(where, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(f"{where}: cannot read a .npy array ({exc})") from exc
        if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.integer):
            raise InputError(f"{where}: expected a numeric array, got dtype {arr.dtype}")
        sample = torch.as_tensor(arr.astype(np.float64))
        if tuple(sample.shape) == (1, *shape):
            sample = sample[0]
    else:
        from harmless.data.formats import read_image

        if len(shape) != 3 or shape[0] not in (1, 3):
            raise InputError(f"an image file needs a model taking (1 or 3, H, W) inputs; this one takes {shape} "
                             "(give a .npy array)")
        img = read_image(where, "L" if shape[0] == 1 else "RGB")
        sample = torch.as_tensor(img, dtype=torch.float64) / 255.0
    if tuple(sample.shape) != shape:
        raise InputError(f"--sample has shape {tuple(sample.shape)}, the model takes {shape}")
    return validation.batch(sample.unsqueeze(0), shape, "--sample")[0]


def sample_report(model: Any, shape: tuple[int, ...], sample: Any) -> dict[str, Any]:
    """The exact convex piece at every layer for one sample: dimension, the extent along one seeded
    member's direction (a random direction of its affine hull tilted into the piece; HiGHS), and
    ``SAMPLE_CHECKS`` members of the output piece run through the float64 model (their output
    change and their part outside H^(0))."""
    import torch

    import harmless
    from harmless.nonlinear import ReluNetwork

    net = ReluNetwork(model, shape)
    gen = torch.Generator().manual_seed(SAMPLE_SEED)
    norm = float(sample.norm()) or 1.0
    rows = []
    pieces = net.all_pieces(sample)
    for step, piece in zip(net.steps, pieces):
        extent: float | None = None
        if piece.dim:
            # along a member's direction: a random hull direction tilted into the piece (where 0 is
            # on its boundary, as on MNIST's tied max-pool windows, an untilted one leaves at once)
            d = piece.sample(1, generator=gen).reshape(-1)
            if bool(d.any()):
                extent = max(0.0, piece.extent((d / d.norm()).reshape(shape)))  # never "-0"
        rows.append({"layer": piece.layer, "kind": step.kind, "dim": piece.dim, "n": piece.n,
                     "equalities": piece.n_equalities, "inequalities": piece.n_inequalities,
                     "extent": extent, "extent_rel": None if extent is None else extent / norm})
    out = pieces[-1]
    delta = out.sample(SAMPLE_CHECKS, generator=gen)
    cert = out.certify(delta)
    h0 = harmless.harmless_subspace(model, shape, dtype=torch.float64)
    flat = delta.reshape(SAMPLE_CHECKS, -1)
    outside = (delta - h0.project(delta)).reshape(SAMPLE_CHECKS, -1).norm(dim=1) / flat.norm(dim=1).clamp_min(1e-300)
    return {"scope": SCOPE, "sample_norm": float(sample.norm()), "h0_dim": h0.dim,
            "h0_lower_bound": h0.dim_is_lower_bound, "pieces": rows,
            "check": {"samples": SAMPLE_CHECKS, "max_output_change": float(cert.output_change.max()),
                      "all_members": bool(cert.contains.all()), "output_unchanged": bool(cert.output_unchanged.all()),
                      "outside_h0_min": float(outside.min()), "outside_h0_max": float(outside.max())}}


def _fmt_extent(row: dict[str, Any]) -> tuple[str, str]:
    e = row["extent"]
    if e is None:
        return "-", "-"
    if math.isinf(e):
        return "unbounded", "unbounded"
    return f"{e:.3g}", f"{row['extent_rel']:.3g}"


def print_sample_report(rep: dict[str, Any], label: str) -> None:
    from harmless.cli.common import print_table

    print(f"harmless input set at the sample {label} (||x|| = {rep['sample_norm']:.4g}): {rep['scope']}")
    rows = [[r["layer"], r["kind"], f"{r['dim']} of {r['n']}", *_fmt_extent(r)] for r in rep["pieces"]]
    print_table(rows, ["layer L (output kept)", "kind", "dim of the piece", "extent", "extent/||x||"])
    c = rep["check"]
    h0 = f"{'>= ' if rep['h0_lower_bound'] else ''}{rep['h0_dim']}"
    verdict = "ok" if c["output_unchanged"] and c["all_members"] else "FAILED: the piece is not trustworthy here"
    print(f"extent: the largest step inside the piece along one sampled member's direction (a random direction of its "
          f"affine hull, tilted into the piece; HiGHS LP). "
          f"Check ({verdict}): {c['samples']} sampled members of the output piece change the float64 output by at most "
          f"{c['max_output_change']:.2e} (relative); their part outside H^(0) (dim {h0}) is "
          f"{c['outside_h0_min']:.3f}-{c['outside_h0_max']:.3f} of their norm")


def cmd_analyze(args: argparse.Namespace) -> int:
    import torch

    from harmless.errors import TrainingModeWarning
    from harmless.linalg.report import headline, layer_rows, markdown_table, prefix_report, run_as_dict, steps_table
    from harmless.linalg.subspace import harmless_subspace

    # Every argument is checked before the model is loaded (loading may train a zoo model).
    layers = parse_layers(args.layers) if args.layers is not None else "all"
    sample_arg = parse_sample_arg(args.sample) if args.sample is not None else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TrainingModeWarning)
        model, shape = resolve_model(args.model, weights=args.weights, input_shape=args.input_shape,
                                     data_dir=args.data_dir, progress=not args.json)
    for w in caught:
        if issubclass(w.category, TrainingModeWarning) and sample_arg is not None:
            # Dropout and batch statistics make a training-mode model's output depend on more than
            # the sample: its per-sample sets are not defined, so say so rather than analyse eval mode.
            raise InputError(f"{args.model} is in training mode; --sample needs an eval-mode model (return "
                             "model.eval() from the factory)")
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    sample = load_sample(*sample_arg, spec=args.model, shape=shape, data_dir=args.data_dir) if sample_arg else None

    prefix, run = prefix_report(model, shape)
    if not args.json:
        print(f"model: {args.model}   input shape: {'x'.join(map(str, shape))}")
        print(f"linear prefix: {run.description}")
        print(f"linear run, each step checked against the model's own output (relative defect; tolerance "
              f"{run.tolerance:.0e}):" if run.layers else "linear run: empty")
        print(steps_table(run))
        print(f"input-level harmless subspace: {headline(prefix, run)}", flush=True)
    sample_rep = sample_report(model, shape, sample) if sample is not None else None
    if sample_rep is not None and not args.json:
        print()
        print_sample_report(sample_rep, args.sample)
        sys.stdout.flush()
    rows = layer_rows(model, shape, layers=layers, progress=None if not args.json else False)
    layer_space = None
    if args.layer:
        layer_space = harmless_subspace(model, shape, layer=args.layer, dtype=torch.float64)
    if args.json:
        payload: dict[str, Any] = {"model": args.model, "input_shape": list(shape), "linear_prefix": run.description,
                                   "run": run_as_dict(run), "input_level": prefix.as_dict(),
                                   "layers": [r.as_dict() for r in rows]}
        if layer_space is not None:
            payload["layer"] = {"name": args.layer, "input_shape": list(layer_space.input_shape),
                                "dim": layer_space.dim, "ambient_dim": layer_space.ambient_dim,
                                "method": layer_space.dim_method, "lower_bound": layer_space.dim_is_lower_bound}
        if sample_rep is not None:
            payload["sample"] = {"source": args.sample, **sample_rep}
        print(json.dumps(payload, indent=2))
        return 0
    if rows or layers == "all":
        print()
        print(markdown_table(prefix, rows), end="")
    if layer_space is not None:
        bound = ">= " if layer_space.dim_is_lower_bound else ""
        print(f"\nH^(l) at the input of {args.layer}: dim {bound}{layer_space.dim} of {layer_space.ambient_dim} "
              f"({layer_space.dim_method})")
        for note in layer_space.run.notes if layer_space.run else []:
            print(f"  note: {note}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    an = sub.add_parser("analyze", help="the harmless subspace of a model: linear prefix and every linear layer; "
                                        "with --sample the harmless set through ReLU/max-pool layers at one sample")
    an.add_argument("model", metavar="MODEL",
                    help="zoo spec (mlp5:mnist, resnet18:stem_stride=8), TorchScript file, or package.module:factory")
    an.add_argument("--input-shape", help="C,H,W of one input (zoo models know theirs)")
    an.add_argument("--weights", help="state-dict file (.pt with weights_only or .safetensors) for the model")
    an.add_argument("--layer", help="also report H^(l) at the input of this named layer")
    an.add_argument("--layers", metavar="none|N|NAME,...",
                    help="the per-layer table: all linear layers (default), none, the first N, or these names")
    an.add_argument("--sample", metavar="IMAGE|test:N",
                    help="also the exact convex piece of the harmless input set at this sample, per layer (ReLU / "
                         "max-pool chains): an image file (scaled to [0, 1]), a .npy array of the model's input, "
                         "or test:N, the N-th test image (from 0) of a zoo model's data set")
    an.add_argument("--data-dir", help="user-supplied dataset folder for zoo models that need one")
    an.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_no_train(an)
    an.set_defaults(func=cmd_analyze)
