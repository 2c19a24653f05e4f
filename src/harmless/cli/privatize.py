"""``harmless privatize MODEL INPUT...``: hide images behind harmless perturbations (the same
model output), written next to a report; in this process, or on Ray (``--ray [ADDRESS]``)."""

from __future__ import annotations

import argparse

from harmless.cli.common import add_no_train, resolve_model
from harmless.errors import InputError


def cmd_privatize(args: argparse.Namespace) -> int:
    from harmless.linalg.subspace import HarmlessSubspace, harmless_subspace
    from harmless.privacy.job import privatize_files
    from harmless.privacy.tiles import Tiling, tiling

    if args.workers is not None and args.ray is None:
        raise InputError("--workers needs --ray (the single-process run uses one worker)")
    if args.ray is not None:
        from harmless.privacy.distributed import import_ray

        import_ray()  # before the model is built: without Ray this is one line, at once
    model, shape = resolve_model(args.model, weights=args.weights, input_shape=args.input_shape,
                                 data_dir=args.data_dir)
    space: HarmlessSubspace | Tiling
    if args.tile is not None:
        space = tiling(model, shape, args.tile)
    else:
        space = harmless_subspace(model, shape)
    if args.ray is not None:
        from harmless.privacy.distributed import privatize_files_ray

        report = privatize_files_ray(space, args.inputs, args.out, method=args.method, decoy=args.decoy,
                                     batch_size=args.batch_size, seed=args.seed, workers=args.workers,
                                     address=args.ray or None)
    else:
        report = privatize_files(space, args.inputs, args.out, method=args.method, decoy=args.decoy,
                                 batch_size=args.batch_size, seed=args.seed)
    print(f"wrote {report} (and report.md, side_by_side.png, one .privatized.png/.safetensors per image)")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    pv = sub.add_parser("privatize", help="hide images behind harmless perturbations (same model output)")
    pv.add_argument("model", metavar="MODEL", help="zoo spec, TorchScript file or package.module:factory")
    pv.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders of images")
    pv.add_argument("--out", required=True, help="output folder (never one of the inputs' files)")
    pv.add_argument("--method", choices=["decoy", "paper"], default="decoy",
                    help="decoy: the same-output image closest to a decoy (convex, exact); paper: Algorithm 1")
    pv.add_argument("--decoy", default="grey",
                    help="grey, noise, shift (each image behind the input before it) or an image file")
    pv.add_argument("--tile", type=int, metavar="T",
                    help="solve tile by tile (T x T tiles): for large images and a first convolution with "
                         "kernel = stride = T and no padding; checked before use")
    pv.add_argument("--batch-size", type=int, default=16,
                    help="images read and written at a time (and handed to a Ray worker); the results do not "
                         "depend on it")
    pv.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                    help="run on Ray Data (pip install 'harmless[ray]'): a local Ray instance, or the cluster at "
                         "ADDRESS (e.g. auto, ray://head:10001; inputs and --out on storage every node sees); "
                         "the same bytes as without --ray")
    pv.add_argument("--workers", type=int, metavar="N",
                    help="Ray workers, one CPU and one copy of the model's dense data each (default: every CPU)")
    pv.add_argument("--seed", type=int, default=0)
    pv.add_argument("--weights", help="state-dict file for MODEL")
    pv.add_argument("--input-shape", help="C,H,W for models outside the zoo")
    pv.add_argument("--data-dir", help="user-supplied dataset folder")
    add_no_train(pv)
    pv.set_defaults(func=cmd_privatize)
