"""What every ``harmless`` command shares: the exit code of a user mistake, model loading
(and whether it may train), shapes, tables."""

from __future__ import annotations

import argparse
import contextvars
import re

from harmless.errors import InputError

EXIT_USER_ERROR = 2

# Whether a command may train a zoo model that is not in the cache (False under --no-train).
# main() sets it for the whole command, so every model the command loads (MODEL, --exclude,
# a suspect) obeys the flag without each command passing it on.
ALLOW_TRAINING: contextvars.ContextVar[bool] = contextvars.ContextVar("allow_training", default=True)


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
        allow_training = ALLOW_TRAINING.get()
    model = load_model(spec, weights=weights, data_dir=data_dir, progress=progress,
                       allow_training=allow_training)
    if input_shape is not None:
        return model, parse_shape(input_shape)
    if is_zoo_spec(spec):
        return model, tuple(DATASETS[parse_spec(spec).dataset].in_shape)
    raise InputError("--input-shape is required for models outside the zoo (e.g. --input-shape 3,32,32)")


def print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))


def add_no_train(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-train", action="store_true",
                        help="refuse (exit 2) instead of training a zoo model that is not in the cache")


def integer_arg(text: object, flag: str, least: int = 1) -> int:
    """A command-line integer ``>= least`` (1: positive, 0: non-negative); anything else is one
    line naming the flag (an InputError), not an argparse usage block."""
    try:
        value: int | None = int(str(text))
    except ValueError:
        value = None
    if value is None or value < least:
        kind = "a positive integer" if least == 1 else f"an integer >= {least}"
        raise InputError(f"{flag} must be {kind}, got {text!r}")
    return value
