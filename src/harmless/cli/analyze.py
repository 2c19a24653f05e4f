"""``harmless analyze MODEL``: the linear run, the input-level harmless subspace, every
linear layer's."""

from __future__ import annotations

import argparse
import json

from harmless.cli.common import add_no_train, resolve_model


def cmd_analyze(args: argparse.Namespace) -> int:
    import torch

    from harmless.linalg.report import headline, layer_report, markdown_table, run_as_dict, steps_table
    from harmless.linalg.subspace import harmless_subspace

    model, shape = resolve_model(args.model, weights=args.weights, input_shape=args.input_shape,
                                 data_dir=args.data_dir, progress=not args.json)
    prefix, rows, run = layer_report(model, shape, progress=None if not args.json else False)
    layer_space = None
    if args.layer:
        layer_space = harmless_subspace(model, shape, layer=args.layer, dtype=torch.float64)
    if args.json:
        payload = {"model": args.model, "input_shape": list(shape), "linear_prefix": run.description,
                   "run": run_as_dict(run), "input_level": prefix.as_dict(), "layers": [r.as_dict() for r in rows]}
        if layer_space is not None:
            payload["layer"] = {"name": args.layer, "input_shape": list(layer_space.input_shape),
                                "dim": layer_space.dim, "ambient_dim": layer_space.ambient_dim,
                                "method": layer_space.dim_method, "lower_bound": layer_space.dim_is_lower_bound}
        print(json.dumps(payload, indent=2))
        return 0
    print(f"model: {args.model}   input shape: {'x'.join(map(str, shape))}")
    print(f"linear prefix: {run.description}")
    print(f"linear run, each step checked against the model's own output (relative defect; tolerance "
          f"{run.tolerance:.0e}):" if run.layers else "linear run: empty")
    print(steps_table(run))
    print(f"input-level harmless subspace: {headline(prefix, run)}")
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
    an = sub.add_parser("analyze", help="the harmless subspace of a model: linear prefix and every linear layer")
    an.add_argument("model", metavar="MODEL",
                    help="zoo spec (mlp5:mnist, resnet18:stem_stride=8), TorchScript file, or package.module:factory")
    an.add_argument("--input-shape", help="C,H,W of one input (zoo models know theirs)")
    an.add_argument("--weights", help="state-dict file (.pt with weights_only or .safetensors) for the model")
    an.add_argument("--layer", help="also report H^(l) at the input of this named layer")
    an.add_argument("--data-dir", help="user-supplied dataset folder for zoo models that need one")
    an.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_no_train(an)
    an.set_defaults(func=cmd_analyze)
