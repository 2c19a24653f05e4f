"""`harmless robustness`: the report on a tiny factory model and a folder data set (no download),
the category per ε by the stated rule, files under --out, a model in training mode, and one
clear line with exit code 2 for every bad argument (most before any model or data is loaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import WIDE_FACTORY, factory_and_folder, one_error_line, run

from harmless.cli import EXIT_USER_ERROR
from harmless.experiments.robustness import TAU, category

FACTORY = WIDE_FACTORY + (
    "def training():\n"  # the same, handed over in training mode (with dropout)
    "    torch.manual_seed(0)\n"
    "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Dropout(0.5), nn.ReLU(), nn.Linear(16, 3)).train()\n"
)


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, list[str]]:
    """A factory module and a folder data set of 3 classes x 4 grayscale 8x8 PNGs."""
    return factory_and_folder(tmp_path, monkeypatch, FACTORY, "robmodels")


@pytest.mark.integration
@pytest.mark.parametrize("norm", ["inf", "2"])
def test_robustness_json_report(capsys, setup, tmp_path: Path, norm: str) -> None:
    name, common = setup
    eps = "0.3,0.05,0.1" if norm == "inf" else "0.5 2"
    out = tmp_path / "out"
    code, text, err = run(capsys, "robustness", f"{name}:wide", "--norm", norm, "--eps", *eps.split(), "--n", "6",
                          "--craft", "6", "--json", "--out", str(out), *common)
    assert code == 0, err
    rep = json.loads(text)
    assert rep["eps"] == sorted(float(e) for e in eps.replace(",", " ").split())  # sorted grid
    assert rep["heldout_images"] == 6 and rep["crafting_indices"] == [6, 11] and rep["tau"] == TAU
    for row in rep["rows"]:
        rates = [row[k] for k in ("r4_random_flip", "r3_uap_holdout", "r2_per_sample", "r1_survives_all")]
        assert all(0 <= r <= 1 for r in rates)
        assert row["category"] == category(row["r2_per_sample"], row["r3_uap_holdout"], row["r4_random_flip"])
        assert row["r3_uap_holdout"] in (row["uap_deepfool_holdout"], row["uap_sgd_holdout"])
        assert row["uap_harmful_only_holdout"] is not None  # the model has a harmless subspace
    assert set(rep["critical_radius"]) == {"r4_random_flip", "r3_uap_holdout", "r2_per_sample", "r1_survives_all"}
    assert json.loads((out / "robustness.json").read_text()) == rep
    assert "category per eps" in (out / "robustness.txt").read_text()


@pytest.mark.integration
def test_robustness_text_and_a_model_in_training_mode(capsys, setup) -> None:
    name, common = setup
    args = ["robustness", "--eps", "0.1", "0.2", "--n", "5", "--craft", "5", *common]
    code, out, err = run(capsys, *args[:1], f"{name}:wide", *args[1:])
    assert code == 0, err
    for words in ("rule (tau = 0.5)", "r4 random", "UAP harmful-only", "eps* r3 UAP held-out",
                  "category per eps: 0.1 ->"):
        assert words in out, out
    assert run(capsys, *args[:1], f"{name}:wide", *args[1:])[1].split("\n")[:-2] == out.split("\n")[:-2]  # seeded
    # A model in training mode: one warning line, then measured in eval mode (like the other commands).
    code, out, err = run(capsys, *args[:1], f"{name}:training", *args[1:])
    assert code == 0 and "category per eps" in out
    assert "training mode" in err and "Traceback" not in err


@pytest.mark.integration
def test_more_images_than_the_data_set_has(capsys, setup) -> None:
    name, common = setup
    code, out, err = run(capsys, "robustness", f"{name}:wide", "--n", "10", "--craft", "5", *common)
    assert code == EXIT_USER_ERROR and out == ""
    assert "need 15 test images, folder has 12" in one_error_line(err)


# Refused before the model is loaded: the model named here does not exist.
@pytest.mark.parametrize(("argv", "words"), [
    (["--eps", ""], "--eps needs at least one radius"),
    (["--eps", ","], "--eps needs at least one radius"),
    (["--eps", "0"], "--eps must be positive numbers"),
    (["--eps", "0.1", "-0.2"], "--eps must be positive numbers"),
    (["--eps", "nan"], "--eps must be positive numbers"),
    (["--eps", "inf"], "--eps must be positive numbers"),
    (["--eps", "abc"], "--eps must be positive numbers"),
    (["--norm", "1"], "--norm must be inf or 2"),
    (["--n", "0"], "--n must be a positive integer"),
    (["--n", "many"], "--n must be a positive integer"),
    (["--craft", "-3"], "--craft must be a positive integer"),
    (["--seed", "-1"], "--seed must be an integer >= 0"),
])
def test_bad_arguments_are_one_line(capsys, argv: list[str], words: str) -> None:
    code, out, err = run(capsys, "robustness", "no_such_module_xyz:model", *argv, "--input-shape", "1,8,8")
    assert code == EXIT_USER_ERROR and out == ""
    assert words in one_error_line(err)


def test_out_is_a_file(capsys, tmp_path: Path) -> None:
    f = tmp_path / "report"
    f.write_text("mine")
    code, _, err = run(capsys, "robustness", "no_such_module_xyz:model", "--out", str(f), "--input-shape", "1,8,8")
    assert code == EXIT_USER_ERROR and "is a file" in one_error_line(err)
    assert f.read_text() == "mine"


def test_factory_model_needs_data(capsys) -> None:
    code, _, err = run(capsys, "robustness", "no_such_module_xyz:model", "--input-shape", "1,8,8")
    assert code == EXIT_USER_ERROR and "--data is required" in one_error_line(err)
