"""``harmless attack MODEL [IMAGES...]``: an adversarial attack on test images or image files, and
its harmless view (harmless fraction, smallest equivalent example); with ``--out``, the
adversarial examples, their perturbations and smallest equivalents written per image, with a
report."""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from harmless.cli.common import add_no_train, integer_arg, resolve_model
from harmless.errors import InputError

if TYPE_CHECKING:  # torch and the attacks are imported when a command runs, not at start-up
    import torch
    from torch import nn

    from harmless.attacks import AttackResult, SmallestEquivalentResult

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

    if args.n is not None:
        if args.images:
            raise InputError("--n applies to the test-set form (no IMAGES); with IMAGES every image is attacked")
        args.n = integer_arg(args.n, "--n")
    args.seed = integer_arg(args.seed, "--seed", least=0)
    steps = None if args.steps is None else integer_arg(args.steps, "--steps")
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


# ---------------------------------------------------------------------------------------------
# The file form: IMAGES..., --labels, --out, checked before any model is loaded.

_OUT_SUFFIXES = (".adv.safetensors", ".adv.png", ".small.png")
_REPORTS = ("report.json", "report.md")


@dataclass
class _Files:
    """What the file form (or ``--out``) will read and write, known before the model is loaded."""

    sources: list[str]  # input paths (file form) or "<data> test #i" (test-set form)
    stems: list[str]
    labels: list[int] | None  # --labels, else None (the model's own predictions)
    out: Path | None
    overwrite: bool


def _smallest_norm(text: object) -> str | int:
    norm = str(text).strip().lower()
    if norm not in ("2", "inf"):
        raise InputError(f"--smallest-norm must be 2 or inf, got {text!r}")
    return "inf" if norm == "inf" else 2


def _parse_labels(text: str) -> list[int]:
    """``--labels 3,1,4`` or a text file of integers (separated by commas, spaces or lines)."""
    body = text
    if not re.fullmatch(r"[\s\d,+-]*", text):  # not a list: a file
        path = Path(text)
        if not path.is_file():
            raise InputError(f"--labels must be a comma list of class indices (3,1,4) or a file of them; "
                             f"{text!r} is neither (no such file)")
        try:
            body = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"--labels: cannot read {text!r} as text ({exc.__class__.__name__})") from None
    items = [t for t in re.split(r"[\s,]+", body.strip()) if t]
    if not items:
        raise InputError(f"--labels is empty (got {text!r})")
    try:
        labels = [int(t) for t in items]
    except ValueError:
        bad = next(t for t in items if not re.fullmatch(r"[+-]?\d+", t))
        raise InputError(f"--labels must be integers (class indices), got {bad!r}") from None
    if min(labels) < 0:
        raise InputError(f"--labels must be >= 0 (class indices), got {min(labels)}")
    return labels


def _files_from_args(args: argparse.Namespace) -> _Files | None:
    """The inputs and outputs of the run, every check that needs no model done here: missing
    files, --labels (format, count), --out (not a file, not holding an input, no output there
    already unless --overwrite). None for the plain test-set report without --out."""
    from harmless.cache import require_folder_path
    from harmless.privacy.job import collect_images

    if args.overwrite and args.out is None:
        raise InputError("--overwrite applies with --out")
    if not args.images:
        if args.labels is not None:
            raise InputError("--labels applies to IMAGES; the test-set form uses the data set's labels")
        if args.out is None:
            return None
        n = 100 if args.n is None else int(args.n)
        stems = [f"test{i:05d}" for i in range(n)]  # cut to the set's size once it is loaded
        return _Files(sources=[], stems=stems, labels=None, out=require_folder_path(args.out, what="--out"),
                      overwrite=bool(args.overwrite))
    if args.data is not None:
        raise InputError("--data applies to the test-set form (no IMAGES)")
    if args.out is None:
        raise InputError("--out DIR is required with IMAGES (the adversarial examples are written there)")
    out = require_folder_path(args.out, what="--out")
    sources = collect_images(args.images)  # a missing file or an empty folder: one line
    stems = [p.stem for p in sources]
    if len(set(stems)) != len(stems):
        dup = next(s for s in stems if stems.count(s) > 1)
        raise InputError(f"two inputs share the file name stem {dup!r}; their outputs would collide")
    labels = None
    if args.labels is not None:
        labels = _parse_labels(args.labels)
        if len(labels) != len(sources):
            raise InputError(f"--labels has {len(labels)} labels but there are {len(sources)} images")
    out_resolved = out.resolve()
    for src in sources:
        if src.resolve().parent == out_resolved:
            raise InputError(f"--out {out} contains the input {src}; choose an output folder without inputs")
    files = _Files(sources=[str(p) for p in sources], stems=stems, labels=labels, out=out,
                   overwrite=bool(args.overwrite))
    _check_outputs(files)
    return files


def _check_outputs(files: _Files) -> None:
    """Refuse to write over an existing output unless --overwrite (inputs are never written:
    none is in --out)."""
    if files.out is None or files.overwrite:
        return
    for name in [s + suffix for s in files.stems for suffix in _OUT_SUFFIXES] + list(_REPORTS):
        if (files.out / name).exists():
            raise InputError(f"{files.out / name} already exists; use --overwrite to replace it or another --out")


def cmd_attack(args: argparse.Namespace) -> int:
    import torch

    from harmless.attacks import SmallestEquivalent, harmless_fraction
    from harmless.data import as_tensors, load_dataset
    from harmless.errors import NoHarmlessSubspaceError, TooLargeError
    from harmless.linalg.subspace import harmless_subspace
    from harmless.models import DATASETS, is_zoo_spec, parse_spec

    attack = _attack_from_args(args)
    smallest_norm = _smallest_norm(args.smallest_norm)
    files = _files_from_args(args)
    seed = int(args.seed)
    if args.images:
        dataset = None
        if not is_zoo_spec(args.model) and args.input_shape is None:
            raise InputError("--input-shape is required for models outside the zoo (e.g. --input-shape 3,32,32)")
    else:
        dataset = args.data or (DATASETS[parse_spec(args.model).dataset].name if is_zoo_spec(args.model) else None)
        if dataset is None:
            raise InputError("--data is required for models outside the zoo (e.g. --data mnist)")
    model, shape = resolve_model(args.model, weights=args.weights, input_shape=args.input_shape,
                                 data_dir=args.data_dir, progress=not args.json)
    dtype = next((t.dtype for t in model.parameters() if t.is_floating_point()), torch.float32)
    if files is not None and files.sources:
        from harmless.privacy.job import read_image

        if len(shape) != 3:
            raise InputError(f"image files need a model that takes images (C, H, W); this one takes {tuple(shape)}")
        x = torch.stack([read_image(Path(p), shape) for p in files.sources]).to(dtype)
        with torch.no_grad():
            logits = model(x)
        if files.labels is not None:
            if max(files.labels) >= logits.shape[1]:
                raise InputError(f"--labels must be < {logits.shape[1]} (the model's number of classes), "
                                 f"got {max(files.labels)}")
            y = torch.tensor(files.labels, dtype=torch.int64)
        else:
            y = logits.argmax(1).cpu()  # untargeted on the model's own prediction
    else:
        n = 100 if args.n is None else int(args.n)
        assert dataset is not None
        x, y = as_tensors(load_dataset(dataset, "test", data_dir=args.data_dir))
        x, y = x[:n], y[:n]  # the first n test images (all of them if the set is smaller)
        if tuple(x.shape[1:]) != tuple(shape):
            raise InputError(f"{dataset} has images of shape {tuple(x.shape[1:])}, but the model takes "
                             f"{tuple(shape)}")
        x = x.to(dtype)
        if files is not None:
            files.stems = files.stems[:x.shape[0]]
            files.sources = [f"{dataset} test #{i}" for i in range(x.shape[0])]
    r = attack(model, x, y, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        pred = model(x).argmax(1).cpu()
    correct = pred == y
    clean = float(correct.double().mean())
    # The measures are taken where the attack did something: samples it turned from correct to
    # wrong (a misclassified sample counts as a success with δ = 0, which says nothing).
    ok = correct & r.success.cpu()

    def median(t: torch.Tensor) -> float | None:
        t = t[~t.isnan()] if t.is_floating_point() else t
        return float(t.double().median()) if t.numel() else None

    report: dict[str, object] = {
        "model": args.model, "data": dataset if dataset is not None else "files", "n": int(x.shape[0]),
        "attack": repr(attack), "labels": "given" if files is not None and files.labels is not None
        else ("the model's predictions" if args.images else "the data set's"),
        "clean_accuracy": clean, "success_rate": r.success_rate, "fooled": int(ok.sum()),
        "median_l2": median(r.l2.cpu()[ok]), "median_linf": median(r.linf.cpu()[ok]),
        "smallest_norm": "inf" if smallest_norm == "inf" else 2,
    }
    note = None
    s = rho = None
    try:
        space = harmless_subspace(model, shape)
        report["harmless_dim"], report["input_dim"] = int(space.dim), int(space.ambient_dim)
        if space.dim == 0:
            raise NoHarmlessSubspaceError("the linear prefix is injective")
        rho = harmless_fraction(space, r).cpu()
        report["rho_median"] = median(rho[ok])
        s = SmallestEquivalent(norm=smallest_norm)(model, space, r, x, progress=not args.json)
        report["smallest_shrink_l2_median"] = median(s.shrink_l2[ok])
        report["smallest_shrink_linf_median"] = median(s.shrink_linf[ok])
        report["smallest_output_diff_max"] = s.max_output_diff
        report["smallest_success_kept"] = s.success_kept
        # how far ‖δ_small‖ (in the chosen norm) may be above the exact minimum, certified
        report["smallest_optimality_bound_max"] = float(s.optimality_bound.max())
    except (NoHarmlessSubspaceError, TooLargeError) as exc:
        note = f"no harmless-subspace measures: {exc}"
        report["note"] = note
    written = None
    if files is not None and files.out is not None:
        written = _write_outputs(files, report, x, y, pred, r, rho, s, model)
        report["out"] = str(written)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    _print_report(args, report, int(correct.sum()), note, s)
    if written is not None:
        print(f"wrote {written} (and report.md, one .adv.safetensors, .adv.png and .small.png per image)")
    return 0


def _print_report(args: argparse.Namespace, report: dict[str, object], n_correct: int, note: str | None,
                  s: object) -> None:
    import math

    def fmt(v: object, spec: str = ".4g") -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    where = (f"first {report['n']} test images" if report["data"] != "files"
             else f"{report['n']} image files, labels: {report['labels']}")
    print(f"model: {args.model}   data: {report['data']}, {where}   attack: {report['attack']}")
    print(f"clean accuracy {fmt(100 * float(report['clean_accuracy']), '.1f')}%   success rate "  # type: ignore[arg-type]
          f"{fmt(100 * float(report['success_rate']), '.1f')}%")  # type: ignore[arg-type]
    print(f"fooled {report['fooled']} of the {n_correct} correctly classified: median ||delta||_2 "
          f"{fmt(report['median_l2'])}, median ||delta||_inf {fmt(report['median_linf'])} (these samples; "
          "likewise below)")
    if note is not None:
        print(note)
        return
    kept = report["smallest_success_kept"]
    norm = "L2" if report["smallest_norm"] == 2 else "L_inf"
    print(f"harmless subspace: dim {report['harmless_dim']} of {report['input_dim']}   "
          f"harmless fraction rho = ||P delta||^2/||delta||^2, median {fmt(report['rho_median'])}")
    print(f"smallest equivalent example ({norm}-nearest): ||delta_min||/||delta|| median "
          f"{fmt(report['smallest_shrink_l2_median'])} (L2), {fmt(report['smallest_shrink_linf_median'])} (L_inf); "
          f"success kept {fmt(100 * float(kept) if isinstance(kept, float) else None, '.1f')}%, "
          f"float64 output difference <= {fmt(report['smallest_output_diff_max'], '.1e')}, "
          f"certified {norm} excess over the optimum <= {fmt(report['smallest_optimality_bound_max'], '.1e')}")


def _write_outputs(files: _Files, report: dict[str, object], x: torch.Tensor, y: torch.Tensor,
                   pred: torch.Tensor, r: AttackResult, rho: torch.Tensor | None,
                   s: SmallestEquivalentResult | None, model: nn.Module) -> Path:
    """Per image ``<stem>.adv.safetensors`` (tensors ``x_adv`` and ``delta`` in the model's
    dtype, exactly as the attack returned them, and ``x_small``, ``delta_small`` in float64 where
    there is a smallest equivalent; metadata: one JSON key ``harmless.attack``), ``<stem>.adv.png``
    and ``<stem>.small.png`` (8-bit), then ``report.json`` and ``report.md``; each atomically.
    Whether the 8-bit rounding keeps the attack's success is measured on the model."""
    import torch
    from safetensors.torch import save_file

    from harmless.cache import atomic_path, atomic_write_bytes, atomic_write_text
    from harmless.data.formats import png_bytes

    assert files.out is not None
    _check_outputs(files)  # again: the folder may have changed while the model loaded
    out = files.out
    out.mkdir(parents=True, exist_ok=True)
    b = x.shape[0]

    def predict(v: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(v.to(x.dtype)).argmax(1).cpu()

    def eight_bit(v: torch.Tensor) -> torch.Tensor:
        return torch.round(v.double().clamp(0, 1) * 255.0) / 255.0

    adv_8 = eight_bit(r.x_adv.cpu())
    pred_adv_8 = predict(adv_8)
    pred_small_8 = predict(eight_bit(s.x_small)) if s is not None else None
    images: list[dict[str, object]] = []
    for i in range(b):
        stem = files.stems[i]
        rec: dict[str, object] = {
            "source": files.sources[i], "stem": stem, "label": int(y[i]), "pred_before": int(pred[i]),
            "pred_after": int(r.y_pred[i]), "success": bool(r.success[i]), "l2": float(r.l2[i]),
            "linf": float(r.linf[i]), "success_8bit": bool(pred_adv_8[i] != y[i]),
            "files": [stem + ".adv.safetensors", stem + ".adv.png"] + ([stem + ".small.png"] if s is not None else [])}
        tensors = {"x_adv": r.x_adv[i].detach().cpu().contiguous(), "delta": r.delta[i].detach().cpu().contiguous()}
        if s is not None:
            cert = s.certificate
            rec.update({
                "rho": float(rho[i]) if rho is not None else None, "smallest_norm": report["smallest_norm"],
                "shrink_l2": _num(s.shrink_l2[i]), "shrink_linf": _num(s.shrink_linf[i]),
                "small_l2": float(s.l2_after[i]), "small_linf": float(s.linf_after[i]),
                "optimality_bound": float(s.optimality_bound[i]), "solver_converged": bool(cert.converged[i]),
                "output_diff": float(s.output_diff[i]), "label_kept": bool(s.label_kept[i]),
                "success_small": bool(s.y_small[i] != y[i]),
                "success_small_8bit": bool(pred_small_8[i] != y[i]) if pred_small_8 is not None else None})
            tensors.update({"x_small": s.x_small[i].contiguous(), "delta_small": s.delta_small[i].contiguous()})
        meta = {"source": files.sources[i], "label": int(y[i]), "attack": str(report["attack"]),
                "model": str(report["model"])}
        # the PNGs first: the exact file is the record of the image
        atomic_write_bytes(out / f"{stem}.adv.png", png_bytes(r.x_adv[i]))
        if s is not None:
            atomic_write_bytes(out / f"{stem}.small.png", png_bytes(s.x_small[i]))
        with atomic_path(out / f"{stem}.adv.safetensors") as tmp:
            save_file(tensors, str(tmp), metadata={"harmless.attack": json.dumps(meta, sort_keys=True)})
        images.append(rec)
    full = dict(report, images=images)
    json_path = atomic_write_text(out / "report.json", json.dumps(full, indent=2))
    atomic_write_text(out / "report.md", _markdown(full))
    return json_path


def _num(v: object) -> float | None:
    f = float(v)  # type: ignore[arg-type]
    return None if f != f else f  # NaN (nothing to shrink) is null in JSON


def _markdown(report: dict[str, object]) -> str:
    def f(v: object, spec: str = ".3g") -> str:
        return "" if v is None else format(v, spec)

    norm = "L2" if report.get("smallest_norm") == 2 else "L∞"
    lines = ["# harmless attack report", "",
             f"model: `{report['model']}`; attack: `{report['attack']}`; labels: {report['labels']}; "
             f"success rate {100 * float(report['success_rate']):.1f} % of {report['n']} images"  # type: ignore[arg-type]
             + (f"; smallest equivalent: {norm}-nearest" if "harmless_dim" in report else ""),
             ""]
    if "note" in report:
        lines += [str(report["note"]), ""]
    lines += ["| image | label | pred before → after | success | 8-bit success | ‖δ‖₂ | ‖δ‖∞ | ρ | shrink L2 | "
              f"shrink L∞ | certified {norm} excess | small: success, 8-bit |",
              "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for rec in report["images"]:  # type: ignore[attr-defined]
        small = (f"{rec['success_small']}, {rec['success_small_8bit']}" if "success_small" in rec else "")
        lines.append(f"| {Path(str(rec['source'])).name} | {rec['label']} | "
                     f"{rec['pred_before']} → {rec['pred_after']} | "
                     f"{rec['success']} | {rec['success_8bit']} | {f(rec['l2'])} | {f(rec['linf'])} | "
                     f"{f(rec.get('rho'))} | {f(rec.get('shrink_l2'), '.4f')} | {f(rec.get('shrink_linf'), '.4f')} | "
                     f"{f(rec.get('optimality_bound'), '.1e')} | {small} |")
    return "\n".join(lines) + "\n"


class _IntermixedParser(argparse.ArgumentParser):
    """Options and IMAGES in any order (``attack MODEL --attack pgd --eps 0.1 a.png b.png``):
    plain argparse gives the optional positional IMAGES its empty match right after MODEL and
    then refuses the files as unrecognised; intermixed parsing reads the options first."""

    _inside = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inside:  # parse_known_intermixed_args calls this method itself
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def add_parser(sub: argparse._SubParsersAction) -> None:
    at = sub.add_parser("attack", help="attack image files (--out DIR writes the adversarial examples) or the first "
                                       "test images of the model's data set: success, norms, harmless fraction "
                                       "and the smallest equivalent example")
    at.add_argument("model", metavar="MODEL", help="zoo spec (mlp5:mnist) or package.module:factory")
    at.add_argument("images", nargs="*", metavar="IMAGES",
                    help="image files or folders (default: the first --n test images of the model's data set)")
    at.add_argument("--attack", required=True, metavar="ATTACK", help="pgd, fgsm, deepfool or cw")
    at.add_argument("--eps", metavar="E", help="budget of pgd and fgsm (required for them)")
    at.add_argument("--norm", metavar="NORM", help="inf (default) or 2, for pgd and fgsm")
    at.add_argument("--steps", metavar="N", help="iterations of pgd (default 40), deepfool (50) or cw (1000)")
    at.add_argument("--labels", metavar="L",
                    help="with IMAGES: their true classes, a comma list (3,1,4) or a file of integers; default: "
                         "the model's own predictions (untargeted: move each image off its predicted class)")
    at.add_argument("--out", metavar="DIR",
                    help="write per image <stem>.adv.safetensors (x_adv, delta in the model's dtype; x_small, "
                         "delta_small in float64), <stem>.adv.png, <stem>.small.png, and report.json/.md "
                         "(required with IMAGES; never a folder that holds an input)")
    at.add_argument("--overwrite", action="store_true", help="replace outputs already in --out")
    at.add_argument("--smallest-norm", default="2", metavar="NORM",
                    help="2 (default: the L2-nearest equivalent, a QP) or inf (L_inf-nearest, an LP per image)")
    at.add_argument("--n", metavar="N", help="number of test images, the first ones (default 100; not with IMAGES)")
    at.add_argument("--data", metavar="NAME", help="data set of the images (default: the zoo model's)")
    at.add_argument("--data-dir", help="user-supplied dataset folder (e.g. --data folder --data-dir DIR)")
    at.add_argument("--seed", default="0", help="seed of the random start (default 0)")
    at.add_argument("--weights", help="state-dict file for MODEL")
    at.add_argument("--input-shape", help="C,H,W for models outside the zoo")
    at.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_no_train(at)
    at.__class__ = _IntermixedParser  # the subparser is made by argparse; only its parsing changes
    at.set_defaults(func=cmd_attack)
