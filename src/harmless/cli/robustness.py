"""``harmless robustness MODEL``: the four robustness categories of seed 002 over an ε grid, on
held-out test images (random flips, a held-out universal perturbation, per-sample attacks, the
accuracy that survives them), the category per ε by the stated rule and the critical radius ε*
of each rate."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from harmless.cli.common import add_no_train, integer_arg, resolve_model
from harmless.errors import InputError

#: The default grids: five radii each, so that MLP-5 on MNIST takes minutes on 2 cores.
DEFAULT_EPS: dict[str, tuple[float, ...]] = {"inf": (0.05, 0.1, 0.15, 0.2, 0.3), "2": (0.5, 1.0, 2.0, 3.0, 4.0)}


def _grid(values: list[str] | None, norm: str) -> tuple[float, ...]:
    """``--eps 0.05 0.1`` or ``--eps 0.05,0.1``: positive finite numbers, sorted (duplicates dropped)."""
    if values is None:
        return DEFAULT_EPS[norm]
    parts = [p for v in values for p in str(v).replace(",", " ").split()]
    if not parts:
        raise InputError("--eps needs at least one radius (e.g. --eps 0.05,0.1,0.2)")
    grid = []
    for p in parts:
        try:
            e = float(p)
        except ValueError:
            raise InputError(f"--eps must be positive numbers, got {p!r}") from None
        if not math.isfinite(e) or e <= 0:
            raise InputError(f"--eps must be positive numbers, got {p!r}")
        grid.append(e)
    return tuple(sorted(set(grid)))


def _check_args(args: argparse.Namespace) -> tuple[str, tuple[float, ...], int, int, int]:
    """Every argument checked before any model or data is loaded (a typo costs nothing)."""
    norm = str(args.norm).strip().lower()
    if norm not in ("inf", "2"):
        raise InputError(f"--norm must be inf or 2, got {args.norm!r}")
    grid = _grid(args.eps, norm)
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise InputError(f"--out {args.out} is a file; give a folder")
    n, craft = integer_arg(args.n, "--n"), integer_arg(args.craft, "--craft")
    return norm, grid, n, craft, integer_arg(args.seed, "--seed", 0)


def cmd_robustness(args: argparse.Namespace) -> int:
    import torch

    from harmless.data import as_tensors, load_dataset
    from harmless.errors import NoHarmlessSubspaceError, TooLargeError
    from harmless.experiments.robustness import TAU, Settings, category, critical_radius, measure_norm
    from harmless.linalg.subspace import harmless_subspace
    from harmless.models import DATASETS, is_zoo_spec, parse_spec
    from harmless.threads import one_torch_thread

    norm_text, grid, n, craft, seed = _check_args(args)
    norm: str | int = "inf" if norm_text == "inf" else 2
    dataset = args.data or (DATASETS[parse_spec(args.model).dataset].name if is_zoo_spec(args.model) else None)
    if dataset is None:
        raise InputError("--data is required for models outside the zoo (e.g. --data mnist)")
    model, shape = resolve_model(args.model, weights=args.weights, input_shape=args.input_shape,
                                 data_dir=args.data_dir, progress=not args.json)
    x, y = as_tensors(load_dataset(dataset, "test", data_dir=args.data_dir))
    if n + craft > x.shape[0]:
        raise InputError(f"--n {n} held-out plus --craft {craft} crafting images need {n + craft} test images, "
                         f"{dataset} has {x.shape[0]}")
    if tuple(x.shape[1:]) != tuple(shape):
        raise InputError(f"{dataset} has images of shape {tuple(x.shape[1:])}, but the model takes {tuple(shape)}")
    dtype = next((t.dtype for t in model.parameters() if t.is_floating_point()), torch.float32)
    # Held-out images first, crafting images right after them: disjoint by construction.
    x_eval, y_eval, x_craft = x[:n].to(dtype), y[:n], x[n:n + craft].to(dtype)
    st = Settings(eval_images=n, craft_images=craft, draws=10, uap_passes=3, sgd_steps=300, sgd_batch=50,
                  seed=seed)
    note = None
    try:
        space = harmless_subspace(model, shape)
    except (NoHarmlessSubspaceError, TooLargeError) as exc:
        space, note = None, f"no harmful-subspace UAP: {exc}"
    with one_torch_thread():
        res = measure_norm(model, x_eval, y_eval, x_craft, norm, grid, st, space=space, log=lambda _: None,
                           progress=None)
    eps = list(res.eps)
    rates = {"r4_random_flip": [r.random_flip for r in res.rows], "r3_uap_holdout": [r.uap_rate for r in res.rows],
             "r2_per_sample": [r.per_sample for r in res.rows], "r1_survives_all": [r.survive for r in res.rows]}
    critical = {}
    for key, vals in rates.items():
        falling = key.startswith("r1")
        value, where = critical_radius(eps, vals, 1 - TAU if falling else TAU, falling=falling)
        critical[key] = {"eps_star": value, "bracket": where}
    report: dict[str, object] = {
        "model": args.model, "data": dataset, "norm": norm_text, "eps": eps, "heldout_images": n,
        "crafting_images": craft, "heldout_indices": [0, n - 1], "crafting_indices": [n, n + craft - 1],
        "seed": seed, "tau": TAU,
        "rule": "category 4 if r4 >= tau, else 3 if r3 >= tau, else 2 if r2 >= tau, else 1",
        "rows": [{"eps": r.eps, "r4_random_flip": r.random_flip, "r3_uap_holdout": r.uap_rate, "r3_uap": r.uap_choice,
                  "uap_deepfool_holdout": r.uap_df_hold, "uap_sgd_holdout": r.uap_sgd_hold, "pgd": r.pgd,
                  "deepfool_within_eps": r.deepfool, "r2_per_sample": r.per_sample, "r1_survives_all": r.survive,
                  "uap_harmful_only_holdout": r.uap_harmful_hold, "category": r.category} for r in res.rows],
        "critical_radius": critical, "seconds": res.seconds,
    }
    assert all(r.category == category(r.per_sample, r.uap_rate, r.random_flip) for r in res.rows)
    if note:
        report["note"] = note
    text = _text(report, res.rows, space is not None and space.dim > 0)
    if args.out:
        _write(Path(args.out), report, text, res)
    print(json.dumps(report, indent=2) if args.json else text)
    return 0


def _text(report: dict, rows: list, harmful: bool) -> str:
    def p(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    name = "L_inf" if report["norm"] == "inf" else "L2"
    lines = [f"model: {report['model']}   data: {report['data']}: {report['heldout_images']} held-out test images "
             f"(indices {report['heldout_indices'][0]}-{report['heldout_indices'][1]}), UAPs crafted on "
             f"{report['crafting_images']} others ({report['crafting_indices'][0]}-{report['crafting_indices'][1]})",
             f"norm {name}; fooled = the prediction changes (x + delta clipped to [0, 1]); seed {report['seed']}",
             f"rule (tau = {report['tau']:g}): {report['rule']}", ""]
    header = ["eps", "r4 random", "r3 UAP held-out", "r2 PGD|DeepFool", "r1 survives"] + \
        (["UAP harmful-only"] if harmful else []) + ["category"]
    table = [[f"{r.eps:g}", p(r.random_flip), f"{p(r.uap_rate)} ({r.uap_choice})", p(r.per_sample), p(r.survive)]
             + ([p(r.uap_harmful_hold)] if harmful else []) + [str(r.category)] for r in rows]
    widths = [max(len(c) for c in col) for col in zip(header, *table)]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in table]
    lines.append("")
    for key, label in (("r4_random_flip", "r4 random flip"), ("r3_uap_holdout", "r3 UAP held-out"),
                       ("r2_per_sample", "r2 per-sample"), ("r1_survives_all", "r1 survives (falls to 1 - tau)")):
        c = report["critical_radius"][key]
        val = "not reached" if c["eps_star"] is None else f"{c['eps_star']:.3g}"
        lines.append(f"eps* {label}: {val} ({c['bracket']})")
    lines.append(f"category per eps: {', '.join(f'{r.eps:g} -> {r.category}' for r in rows)}")
    if "note" in report:
        lines.append(str(report["note"]))
    lines.append(f"({report['seconds']:.0f} s)")
    return "\n".join(lines)


def _write(out: Path, report: dict, text: str, res) -> None:
    from harmless.cache import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "robustness.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / "robustness.txt", text + "\n")


def add_parser(sub: argparse._SubParsersAction) -> None:
    rb = sub.add_parser("robustness", help="the four robustness categories over an eps grid: random, universal "
                                           "and per-sample perturbations on held-out test images")
    rb.add_argument("model", metavar="MODEL", help="zoo spec (mlp5:mnist) or package.module:factory")
    rb.add_argument("--eps", nargs="+", metavar="E",
                    help="radii in image units [0, 1] (default: inf 0.05,0.1,0.15,0.2,0.3; 2: 0.5,1,2,3,4)")
    rb.add_argument("--norm", default="inf", metavar="NORM", help="inf (default) or 2")
    rb.add_argument("--n", default="500", metavar="N", help="held-out test images, the first ones (default 500)")
    rb.add_argument("--craft", default="200", metavar="N",
                    help="images the UAPs are crafted on, the next ones after the held-out (default 200)")
    rb.add_argument("--seed", default="0", help="seed of the random draws, shuffles and PGD starts (default 0)")
    rb.add_argument("--data", metavar="NAME", help="data set of the images (default: the zoo model's)")
    rb.add_argument("--data-dir", help="user-supplied dataset folder (e.g. --data folder --data-dir DIR)")
    rb.add_argument("--weights", help="state-dict file for MODEL")
    rb.add_argument("--input-shape", help="C,H,W for models outside the zoo")
    rb.add_argument("--json", action="store_true", help="print JSON instead of text")
    rb.add_argument("--out", metavar="DIR", help="also write robustness.json and robustness.txt into DIR")
    add_no_train(rb)
    rb.set_defaults(func=cmd_robustness)
