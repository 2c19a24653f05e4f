"""The ``harmless`` command-line tool (one module per larger command: ``analyze``, ``attack``, ``privatize``).

Sits on top of everything else: it parses arguments, calls the library, prints. A user
mistake (a :class:`~harmless.errors.HarmlessError`) is one line on stderr and exit code 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from harmless import __version__
from harmless.cli import analyze, attack, privatize, robustness
from harmless.cli.common import (
    ALLOW_TRAINING,
    EXIT_USER_ERROR,
    add_no_train,
    parse_shape,
    print_table,
    resolve_model,
)
from harmless.errors import HarmlessError, InputError
from harmless.experiments import EXPERIMENTS

__all__ = ["EXIT_USER_ERROR", "build_parser", "main", "parse_shape", "resolve_model"]


# ---------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------
def cmd_data_list(args: argparse.Namespace) -> int:
    from harmless.data import list_datasets

    rows = []
    for d in list_datasets():
        size = ", ".join(f"{k} {v}" for k, v in d.size.items()) if d.size else "user-supplied"
        rows.append([d.name, size, "yes" if d.cached else "no", d.description])
    print_table(rows, ["name", "size", "cached", "description"])
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
    print_table(rows, ["spec", "cached", "test acc", "description"])
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
    add_no_train(c)
    c.set_defaults(func=cmd_fingerprint_create)
    v = fpp.add_parser("verify", help="is SUSPECT the fingerprinted model? exit 0: same, 1: different")
    v.add_argument("fingerprint", metavar="FP", help="fingerprint file")
    v.add_argument("suspect", metavar="SUSPECT", help="zoo spec, TorchScript file or package.module:factory")
    v.add_argument("--threshold", type=float, help="decision threshold (default: the fingerprint's)")
    v.add_argument("--weights", help="state-dict file for SUSPECT")
    v.add_argument("--input-shape", help="C,H,W (default: the shape stored in the fingerprint)")
    v.add_argument("--data-dir", help="user-supplied dataset folder")
    add_no_train(v)
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

    analyze.add_parser(sub)

    _add_fingerprint_parser(sub)

    privatize.add_parser(sub)

    attack.add_parser(sub)

    robustness.add_parser(sub)

    rep = sub.add_parser("reproduce", help="reproduce the paper's results into results/")
    rep.add_argument("experiments", nargs="+", metavar="EXPERIMENT",
                     choices=[*EXPERIMENTS, "all"],
                     help="fig2, table1, fig3, fig4 (equivalent adversarial spaces), fig5, table2, table2-overlap "
                          "(privacy at 224 px with an overlapping 7x7/s6 stem, matrix-free), lemma1 "
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
    token = ALLOW_TRAINING.set(not getattr(args, "no_train", False))
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
        ALLOW_TRAINING.reset(token)
        logger.removeHandler(handler)
        logger.setLevel(previous_level)

