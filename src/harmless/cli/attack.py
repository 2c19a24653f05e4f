"""``harmless attack MODEL``: an adversarial attack on test images, and its harmless view
(harmless fraction, smallest equivalent example)."""

from __future__ import annotations

import argparse
import json

from harmless.cli.common import add_no_train, resolve_model
from harmless.errors import InputError

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


def add_parser(sub: argparse._SubParsersAction) -> None:
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
    add_no_train(at)
    at.set_defaults(func=cmd_attack)
