"""The ``harmless`` command-line tool.

Sits on top of everything else: it parses arguments, calls the library, prints. A user
mistake (a :class:`~harmless.errors.HarmlessError`) is one line on stderr and exit code 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextvars
import json
import logging
import re
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from harmless import __version__
from harmless.errors import HarmlessError, InputError

EXIT_USER_ERROR = 2

# Whether a command may train a zoo model that is not in the cache (False under --no-train).
# main() sets it for the whole command, so every model the command loads (MODEL, --exclude,
# a suspect) obeys the flag without each command passing it on.
_ALLOW_TRAINING: contextvars.ContextVar[bool] = contextvars.ContextVar("allow_training", default=True)


# ---------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------
def parse_shape(text: str) -> tuple[int, ...]:
    """``"3,32,32"`` -> ``(3, 32, 32)``; a clear error for anything else."""
    parts = re.split(r"[,x]", text.strip())
    shape = tuple(int(p) for p in parts) if all(p.strip().isdigit() for p in parts) else ()
    if not shape or any(s <= 0 for s in shape):
        raise InputError(f"--input-shape must be positive integers like 3,32,32, got {text!r}")
    return shape


def resolve_model(spec: str, *, weights: str | None, input_shape: str | None, data_dir: str | None,
                  progress: bool = True, allow_training: bool | None = None):
    """Load the model named by ``spec`` and decide its input shape (a zoo model knows it).
    ``allow_training`` (default: as the command line says, see ``--no-train``): whether a zoo
    model missing from the cache may be trained now."""
    from harmless.models import DATASETS, is_zoo_spec, load_model, parse_spec

    if allow_training is None:
        allow_training = _ALLOW_TRAINING.get()
    model = load_model(spec, weights=weights, data_dir=data_dir, progress=progress,
                       allow_training=allow_training)
    if input_shape is not None:
        return model, parse_shape(input_shape)
    if is_zoo_spec(spec):
        return model, tuple(DATASETS[parse_spec(spec).dataset].in_shape)
    raise InputError("--input-shape is required for models outside the zoo (e.g. --input-shape 3,32,32)")


def _print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))


# ---------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------
def cmd_data_list(args: argparse.Namespace) -> int:
    from harmless.data import list_datasets

    rows = []
    for d in list_datasets():
        size = ", ".join(f"{k} {v}" for k, v in d.size.items()) if d.size else "user-supplied"
        rows.append([d.name, size, "yes" if d.cached else "no", d.description])
    _print_table(rows, ["name", "size", "cached", "description"])
    return 0


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from harmless.data import fetch

    for name in args.names:
        path = fetch(name)
        print(f"{name}: {path}")
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from harmless.models import list_zoo

    rows = []
    for r in list_zoo():
        acc = f"{100 * r.test_accuracy:.2f}%" if r.test_accuracy is not None else "-"
        rows.append([r.spec, "yes" if r.cached else "no", acc, r.description])
    _print_table(rows, ["spec", "cached", "test acc", "description"])
    return 0


def cmd_models_train(args: argparse.Namespace) -> int:
    from harmless.models import get_model, train_zoo_model

    for spec in args.specs:
        # Each seed has its own cache entry, so another seed is reused like seed 0 is.
        if args.epochs is not None or args.force:
            tm = train_zoo_model(spec, data_dir=args.data_dir, epochs=args.epochs, seed=args.seed,
                                 progress=not args.quiet)
        else:
            tm = get_model(spec, data_dir=args.data_dir, progress=not args.quiet, seed=args.seed)
        name = tm.spec.key if tm.seed == 0 else f"{tm.spec.key} (seed {tm.seed})"
        if tm.trained:
            where = "from cache" if tm.from_cache else "trained"
            acc = "unknown" if tm.test_accuracy is None else f"{100 * tm.test_accuracy:.2f}%"
            print(f"{name}: {where}, test accuracy {acc} ({tm.checkpoint})")
        else:
            print(f"{name}: untrained (seeded random weights; pass --data-dir with CIFAR-10 to train)")
    return 0


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


def cmd_fingerprint_create(args: argparse.Namespace) -> int:
    import torch

    from harmless.fingerprint import check_fingerprint_path, create_fingerprint, probe_images, save_fingerprint
    from harmless.models import DATASETS, is_zoo_spec, parse_spec

    check_fingerprint_path(args.out, overwrite=args.overwrite, what="--out")  # before any work
    model, shape = resolve_model(args.model, weights=args.weights, input_shape=args.input_shape,
                                 data_dir=args.data_dir)
    dataset = args.probe_dataset or (DATASETS[parse_spec(args.model).dataset].name
                                     if is_zoo_spec(args.model) else None)
    if dataset is None:
        raise InputError("--probe-dataset is required for models outside the zoo (e.g. --probe-dataset mnist)")
    probes = probe_images(dataset, args.probes, data_dir=args.data_dir)
    exclude = [resolve_model(spec, weights=None, input_shape=args.input_shape, data_dir=args.data_dir)[0]
               for spec in args.exclude]
    fp = create_fingerprint(model, shape, probes, k=args.k, exclude=exclude,
                            generator=torch.Generator().manual_seed(args.seed), description=args.model)
    path = save_fingerprint(fp, args.out, overwrite=args.overwrite)
    dims = f", N(A) ∩ N(B) dims {fp.intersection_dims}" if fp.intersection_dims else ""
    print(f"wrote {path}: k = {fp.k}, {fp.num_probes} probes, harmless dim {fp.harmless_dim}{dims}, "
          f"threshold {fp.threshold:g}")
    return 0


def cmd_fingerprint_verify(args: argparse.Namespace) -> int:
    from harmless.fingerprint import load_fingerprint, verify_fingerprint

    fp = load_fingerprint(args.fingerprint)
    # The fingerprint stores its input shape: --input-shape is only needed to override it.
    stored = ",".join(map(str, fp.input_shape))
    suspect, shape = resolve_model(args.suspect, weights=args.weights, input_shape=args.input_shape or stored,
                                   data_dir=args.data_dir)
    if tuple(shape) != tuple(fp.input_shape):
        raise InputError(f"the suspect takes inputs {tuple(shape)}, the fingerprint {fp.input_shape}")
    verdict = verify_fingerprint(fp, suspect, threshold=args.threshold)
    print(verdict.message)
    return 0 if verdict.same else 1


def cmd_privatize(args: argparse.Namespace) -> int:
    from harmless.linalg.subspace import HarmlessSubspace, harmless_subspace
    from harmless.privacy.job import privatize_files
    from harmless.privacy.tiles import Tiling, tiling

    model, shape = resolve_model(args.model, weights=args.weights, input_shape=args.input_shape,
                                 data_dir=args.data_dir)
    space: HarmlessSubspace | Tiling
    if args.tile is not None:
        space = tiling(model, shape, args.tile)
    else:
        space = harmless_subspace(model, shape)
    report = privatize_files(space, args.inputs, args.out, method=args.method, decoy=args.decoy,
                             batch_size=args.batch_size, seed=args.seed)
    print(f"wrote {report} (and report.md, side_by_side.png, one .privatized.png/.safetensors per image)")
    return 0


# The attacks `harmless attack` offers; --eps and --norm belong to the fixed-budget ones, --steps
# to the iterative ones (FGSM is one step).
_ATTACKS = ("pgd", "fgsm", "deepfool", "cw")


def _attack_from_args(args: argparse.Namespace):
    """The configured attack, every argument checked before any model or data is loaded (so a
    typo costs nothing); a bad one is one line (InputError), not an argparse usage block."""
    from harmless import validation
    from harmless.attacks import FGSM, PGD, CarliniWagnerL2, DeepFool

    name = str(args.attack).strip().lower()
    if name not in _ATTACKS:
        raise InputError(f"--attack must be one of {', '.join(_ATTACKS)}, got {args.attack!r}")
    budget = name in ("pgd", "fgsm")
    if not budget:
        for flag, value in (("--eps", args.eps), ("--norm", args.norm)):
            if value is not None:
                raise InputError(f"{flag} applies to --attack pgd and fgsm; {name} finds the smallest L2 "
                                 "perturbation itself")
    if name == "fgsm" and args.steps is not None:
        raise InputError("--steps applies to pgd, deepfool and cw; fgsm takes one step")
    if budget and args.eps is None:
        raise InputError(f"--eps is required for --attack {name} (e.g. --eps 0.1 with --norm inf, "
                         "--eps 1.5 with --norm 2)")

    def number(text: str, flag: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise InputError(f"{flag} must be a number, got {text!r}") from None
        return validation.positive_number(value, flag)

    def integer(text: str, flag: str, least: int = 1) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < least:
            kind = "a positive integer" if least == 1 else "an integer >= 0"
            raise InputError(f"{flag} must be {kind}, got {text!r}")
        return value

    args.n, args.seed = integer(args.n, "--n"), integer(args.seed, "--seed", least=0)
    steps = None if args.steps is None else integer(args.steps, "--steps")
    if name == "deepfool":
        return DeepFool() if steps is None else DeepFool(steps=steps)
    if name == "cw":
        return CarliniWagnerL2() if steps is None else CarliniWagnerL2(steps=steps)
    eps = number(args.eps, "--eps")
    norm = "inf" if args.norm is None else str(args.norm).strip().lower()
    if norm not in ("inf", "2"):
        raise InputError(f"--norm must be inf or 2, got {args.norm!r}")
    norm_value: str | int = "inf" if norm == "inf" else 2
    if name == "fgsm":
        return FGSM(eps, norm=norm_value)
    return PGD(eps, steps=40 if steps is None else steps, norm=norm_value)


def cmd_attack(args: argparse.Namespace) -> int:
    import math

    import torch

    from harmless.attacks import SmallestEquivalent, harmless_fraction
    from harmless.data import as_tensors, load_dataset
    from harmless.errors import NoHarmlessSubspaceError, TooLargeError
    from harmless.linalg.subspace import harmless_subspace
    from harmless.models import DATASETS, is_zoo_spec, parse_spec

    attack = _attack_from_args(args)
    n, seed = int(args.n), int(args.seed)
    dataset = args.data or (DATASETS[parse_spec(args.model).dataset].name if is_zoo_spec(args.model) else None)
    if dataset is None:
        raise InputError("--data is required for models outside the zoo (e.g. --data mnist)")
    model, shape = resolve_model(args.model, weights=args.weights, input_shape=args.input_shape,
                                 data_dir=args.data_dir, progress=not args.json)
    x, y = as_tensors(load_dataset(dataset, "test", data_dir=args.data_dir))
    x, y = x[:n], y[:n]  # the first n test images (all of them if the set is smaller)
    if tuple(x.shape[1:]) != tuple(shape):
        raise InputError(f"{dataset} has images of shape {tuple(x.shape[1:])}, but the model takes {tuple(shape)}")
    dtype = next((t.dtype for t in model.parameters() if t.is_floating_point()), torch.float32)
    x = x.to(dtype)
    r = attack(model, x, y, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        correct = (model(x).argmax(1) == y).cpu()
    clean = float(correct.double().mean())
    # The measures are taken where the attack did something: samples it turned from correct to
    # wrong (a misclassified sample counts as a success with δ = 0, which says nothing).
    ok = correct & r.success.cpu()

    def median(t: torch.Tensor) -> float | None:
        t = t[~t.isnan()] if t.is_floating_point() else t
        return float(t.double().median()) if t.numel() else None

    report: dict[str, object] = {
        "model": args.model, "data": dataset, "n": int(x.shape[0]), "attack": repr(attack),
        "clean_accuracy": clean, "success_rate": r.success_rate, "fooled": int(ok.sum()),
        "median_l2": median(r.l2.cpu()[ok]), "median_linf": median(r.linf.cpu()[ok]),
    }
    note = None
    try:
        space = harmless_subspace(model, shape)
        report["harmless_dim"], report["input_dim"] = int(space.dim), int(space.ambient_dim)
        if space.dim == 0:
            raise NoHarmlessSubspaceError("the linear prefix is injective")
        report["rho_median"] = median(harmless_fraction(space, r).cpu()[ok])
        s = SmallestEquivalent()(model, space, r, x)
        report["smallest_shrink_l2_median"] = median(s.shrink_l2[ok])
        report["smallest_shrink_linf_median"] = median(s.shrink_linf[ok])
        report["smallest_output_diff_max"] = s.max_output_diff
        report["smallest_success_kept"] = s.success_kept
        report["smallest_distance_bound_max"] = float(s.distance_bound.max())
    except (NoHarmlessSubspaceError, TooLargeError) as exc:
        note = f"no harmless-subspace measures: {exc}"
        report["note"] = note
    if args.json:
        print(json.dumps(report, indent=2))
        return 0

    def fmt(v: object, spec: str = ".4g") -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    print(f"model: {args.model}   data: {dataset}, first {report['n']} test images   attack: {report['attack']}")
    print(f"clean accuracy {fmt(100 * clean, '.1f')}%   success rate {fmt(100 * r.success_rate, '.1f')}%")
    print(f"fooled {report['fooled']} of the {int(correct.sum())} correctly classified: median ||delta||_2 "
          f"{fmt(report['median_l2'])}, median ||delta||_inf {fmt(report['median_linf'])} (these samples; "
          "likewise below)")
    if note is not None:
        print(note)
        return 0
    print(f"harmless subspace: dim {report['harmless_dim']} of {report['input_dim']}   "
          f"harmless fraction rho = ||P delta||^2/||delta||^2, median {fmt(report['rho_median'])}")
    print(f"smallest equivalent example: ||delta_min||/||delta|| median {fmt(report['smallest_shrink_l2_median'])} "
          f"(L2), {fmt(report['smallest_shrink_linf_median'])} (L_inf); success kept "
          f"{fmt(100 * float(s.success_kept) if s.success_kept is not None else None, '.1f')}%, "
          f"float64 output difference <= {fmt(s.max_output_diff, '.1e')}, "
          f"certified distance to the optimum <= {fmt(report['smallest_distance_bound_max'], '.1e')}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from harmless.experiments import run_experiment

    # By default a fresh folder per run: the tracked results/ is written only when asked for.
    out = Path(args.out) if args.out else Path("reproduced") / time.strftime("%Y%m%d-%H%M%S")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a folder")
    print(f"harmless: writing to {out}/", file=sys.stderr)
    for name in args.experiments:
        for path in run_experiment(name, out_dir=out, quick=args.quick, data_dir=args.data_dir):
            print(f"wrote {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from harmless.experiments.demo import run_demo

    run_demo(out_dir=Path(args.out), quick=args.quick)
    return 0


# ---------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------
def _add_no_train(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-train", action="store_true",
                        help="refuse (exit 2) instead of training a zoo model that is not in the cache")


def _add_fingerprint_parser(sub: argparse._SubParsersAction) -> None:
    fpp = sub.add_parser("fingerprint", help="model fingerprints from harmless perturbations").add_subparsers(
        dest="fingerprint_command", metavar="ACTION")
    c = fpp.add_parser("create", help="draw a fingerprint of MODEL and save it (.safetensors)")
    c.add_argument("model", metavar="MODEL", help="zoo spec (mlp5:mnist), TorchScript file or package.module:factory")
    c.add_argument("--out", required=True, metavar="FP", help="fingerprint file to write")
    c.add_argument("--k", type=int, default=8, help="number of perturbations (default 8)")
    c.add_argument("--probes", type=int, default=4, help="number of probe images (default 4)")
    c.add_argument("--probe-dataset", help="dataset of the probe images (default: the zoo model's)")
    c.add_argument("--exclude", nargs="*", default=[], metavar="M",
                   help="models the fingerprint must not be harmless for (zoo specs or files)")
    c.add_argument("--seed", type=int, default=0, help="random seed of the perturbations (default 0)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing fingerprint file")
    c.add_argument("--weights", help="state-dict file for MODEL")
    c.add_argument("--input-shape", help="C,H,W for models outside the zoo")
    c.add_argument("--data-dir", help="user-supplied dataset folder")
    _add_no_train(c)
    c.set_defaults(func=cmd_fingerprint_create)
    v = fpp.add_parser("verify", help="is SUSPECT the fingerprinted model? exit 0: same, 1: different")
    v.add_argument("fingerprint", metavar="FP", help="fingerprint file")
    v.add_argument("suspect", metavar="SUSPECT", help="zoo spec, TorchScript file or package.module:factory")
    v.add_argument("--threshold", type=float, help="decision threshold (default: the fingerprint's)")
    v.add_argument("--weights", help="state-dict file for SUSPECT")
    v.add_argument("--input-shape", help="C,H,W (default: the shape stored in the fingerprint)")
    v.add_argument("--data-dir", help="user-supplied dataset folder")
    _add_no_train(v)
    v.set_defaults(func=cmd_fingerprint_verify)



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="harmless",
        description="Find, measure and use the harmless perturbations of deep networks: input changes "
                    "of any size that leave a model's output exactly unchanged.")
    p.add_argument("--version", action="version", version=f"harmless {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    data = sub.add_parser("data", help="list and fetch datasets").add_subparsers(dest="data_command", metavar="ACTION")
    d_list = data.add_parser("list", help="list the datasets and whether they are cached")
    d_list.set_defaults(func=cmd_data_list)
    d_fetch = data.add_parser("fetch", help="fetch datasets into the cache (checksums verified)")
    d_fetch.add_argument("names", nargs="+", metavar="NAME")
    d_fetch.set_defaults(func=cmd_data_fetch)

    models = sub.add_parser("models", help="list and train the model zoo").add_subparsers(
        dest="models_command", metavar="ACTION")
    m_list = models.add_parser("list", help="list zoo models, cached checkpoints and their test accuracy")
    m_list.set_defaults(func=cmd_models_list)
    m_train = models.add_parser("train", help="train zoo models (reused from cache when present)")
    m_train.add_argument("specs", nargs="+", metavar="SPEC", help="e.g. mlp5:mnist, lenet:fashion-mnist")
    m_train.add_argument("--data-dir", help="folder with a user-supplied dataset (CIFAR-10 python pickles)")
    m_train.add_argument("--epochs", type=int, help="override the default number of epochs (forces training)")
    m_train.add_argument("--seed", type=int, default=0,
                         help="training seed (default 0); each seed is cached separately, and a plain "
                              "MODEL always means seed 0")
    m_train.add_argument("--force", action="store_true", help="train even if a checkpoint is cached")
    m_train.add_argument("--quiet", action="store_true", help="no progress bar")
    m_train.set_defaults(func=cmd_models_train)

    an = sub.add_parser("analyze", help="the harmless subspace of a model: linear prefix and every linear layer")
    an.add_argument("model", metavar="MODEL",
                    help="zoo spec (mlp5:mnist, resnet18:stem_stride=8), TorchScript file, or package.module:factory")
    an.add_argument("--input-shape", help="C,H,W of one input (zoo models know theirs)")
    an.add_argument("--weights", help="state-dict file (.pt with weights_only or .safetensors) for the model")
    an.add_argument("--layer", help="also report H^(l) at the input of this named layer")
    an.add_argument("--data-dir", help="user-supplied dataset folder for zoo models that need one")
    an.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_no_train(an)
    an.set_defaults(func=cmd_analyze)

    _add_fingerprint_parser(sub)

    pv = sub.add_parser("privatize", help="hide images behind harmless perturbations (same model output)")
    pv.add_argument("model", metavar="MODEL", help="zoo spec, TorchScript file or package.module:factory")
    pv.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders of images")
    pv.add_argument("--out", required=True, help="output folder (never one of the inputs' files)")
    pv.add_argument("--method", choices=["decoy", "paper"], default="decoy",
                    help="decoy: the same-output image closest to a decoy (convex, exact); paper: Algorithm 1")
    pv.add_argument("--decoy", default="grey", help="grey, noise, shift (another input) or an image file")
    pv.add_argument("--tile", type=int, metavar="T",
                    help="solve tile by tile (T x T tiles): for large images and a first convolution with "
                         "kernel = stride = T and no padding; checked before use")
    pv.add_argument("--batch-size", type=int, default=16)
    pv.add_argument("--seed", type=int, default=0)
    pv.add_argument("--weights", help="state-dict file for MODEL")
    pv.add_argument("--input-shape", help="C,H,W for models outside the zoo")
    pv.add_argument("--data-dir", help="user-supplied dataset folder")
    _add_no_train(pv)
    pv.set_defaults(func=cmd_privatize)

    at = sub.add_parser("attack", help="attack the first test images of the model's data set: success, norms, "
                                       "harmless fraction and the smallest equivalent example")
    at.add_argument("model", metavar="MODEL", help="zoo spec (mlp5:mnist) or package.module:factory")
    at.add_argument("--attack", required=True, metavar="ATTACK", help="pgd, fgsm, deepfool or cw")
    at.add_argument("--eps", metavar="E", help="budget of pgd and fgsm (required for them)")
    at.add_argument("--norm", metavar="NORM", help="inf (default) or 2, for pgd and fgsm")
    at.add_argument("--steps", metavar="N", help="iterations of pgd (default 40), deepfool (50) or cw (1000)")
    at.add_argument("--n", default="100", metavar="N", help="number of test images, the first ones (default 100)")
    at.add_argument("--data", metavar="NAME", help="data set of the images (default: the zoo model's)")
    at.add_argument("--data-dir", help="user-supplied dataset folder (e.g. --data folder --data-dir DIR)")
    at.add_argument("--seed", default="0", help="seed of the random start (default 0)")
    at.add_argument("--weights", help="state-dict file for MODEL")
    at.add_argument("--input-shape", help="C,H,W for models outside the zoo")
    at.add_argument("--json", action="store_true", help="print JSON instead of text")
    _add_no_train(at)
    at.set_defaults(func=cmd_attack)

    rep = sub.add_parser("reproduce", help="reproduce the paper's results into results/")
    rep.add_argument("experiments", nargs="+", metavar="EXPERIMENT",
                     choices=["fig2", "table1", "fig3", "fig4", "fig5", "table2", "lemma1", "robustness", "all"],
                     help="fig2, table1, fig3, fig4 (equivalent adversarial spaces), fig5, table2, lemma1 "
                          "(harmless sets beyond the linear prefix), robustness (universal perturbations and "
                          "the four robustness categories) or all")
    rep.add_argument("--quick", action="store_true", help="fewer points and images (minutes instead of more)")
    rep.add_argument("--out", help="output folder (default: a fresh reproduced/YYYYMMDD-HHMMSS/; "
                                   "--out results replaces the tracked results)")
    rep.add_argument("--data-dir", help="a CIFAR-10 python-pickle folder to train the CIFAR models on")
    rep.set_defaults(func=cmd_reproduce)

    demo = sub.add_parser("demo", help="the main job: MNIST, MLP-5, its harmless subspace and exactness; then "
                                        "privatises a few real Fashion-MNIST and MNIST test images")
    demo.add_argument("--quick", action="store_true", help="fewer test images, shorter privacy optimisations")
    demo.add_argument("--out", default="results/demo", help="where figures go (default: results/demo)")
    demo.set_defaults(func=cmd_demo)
    return p


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      file: object = None, line: str | None = None) -> None:
    print(f"harmless: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        # A missing command (or action) is a usage error, like any other bad argument:
        # the help goes to stderr, so nothing on stdout looks like a result.
        parser.print_help(sys.stderr)
        return EXIT_USER_ERROR
    # The library reports progress (fetching data, training a model) through logging; the
    # tool shows it on stderr, one line each, and removes its handler again (main() may run
    # many times in one process, e.g. in tests).
    logger = logging.getLogger("harmless")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("harmless: %(message)s"))
    previous_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    token = _ALLOW_TRAINING.set(not getattr(args, "no_train", False))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = _one_line_warning
            return int(args.func(args) or 0)
    except HarmlessError as exc:
        print(f"harmless: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except FileNotFoundError as exc:
        print(f"harmless: error: {exc.strerror or 'not found'}: {exc.filename}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("harmless: interrupted", file=sys.stderr)
        return 130
    finally:
        _ALLOW_TRAINING.reset(token)
        logger.removeHandler(handler)
        logger.setLevel(previous_level)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
