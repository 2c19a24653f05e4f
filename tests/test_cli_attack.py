"""`harmless attack`: the report on a tiny factory model and a folder data set (no download),
and one clear line with exit code 2 for every bad argument, before any model or data is loaded."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import one_error_line, run

from harmless.cli import EXIT_USER_ERROR, main

FACTORY = (
    "import torch\n"
    "from torch import nn\n"
    "def wide():\n"  # 64 inputs -> 16: a 48-dim harmless subspace
    "    torch.manual_seed(0)\n"
    "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3)).eval()\n"
    "def injective():\n"  # 64 -> 80: no harmless subspace
    "    torch.manual_seed(0)\n"
    "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 80), nn.ReLU(), nn.Linear(80, 3)).eval()\n"
)




@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, list[str]]:
    """A factory module and a folder data set of 3 classes x 4 grayscale 8x8 PNGs; returns the
    module's name and the common arguments."""
    from PIL import Image

    name = f"atkmodels_{abs(hash(str(tmp_path))) % 10**8}"  # a fresh module per test
    (tmp_path / f"{name}.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    rng = np.random.default_rng(0)
    for c in range(3):
        (tmp_path / "data" / f"class{c}").mkdir(parents=True)
        for i in range(4):
            img = (rng.random((8, 8)) * 255).astype(np.uint8)
            img[:2] = 0  # background pixels on the box, as in MNIST
            Image.fromarray(img, mode="L").save(tmp_path / "data" / f"class{c}" / f"img{i}.png")
    return name, ["--input-shape", "1,8,8", "--data", "folder", "--data-dir", str(tmp_path / "data")]


@pytest.mark.integration
@pytest.mark.parametrize("attack", [["--attack", "pgd", "--eps", "0.5", "--norm", "2", "--steps", "10"],
                                    ["--attack", "fgsm", "--eps", "0.1"],
                                    ["--attack", "deepfool"],
                                    ["--attack", "cw", "--steps", "50"]])
def test_attack_json_report(capsys, setup, attack: list[str]) -> None:
    name, common = setup
    code, out, err = run(capsys, "attack", f"{name}:wide", *attack, "--n", "10", "--json", *common)
    assert code == 0, err
    rep = json.loads(out)
    assert rep["n"] == 10 and rep["data"] == "folder"
    assert rep["harmless_dim"] == 48 and rep["input_dim"] == 64
    assert 0 < rep["success_rate"] <= 1 and rep["fooled"] > 0
    assert rep["median_l2"] > 0 and rep["median_linf"] > 0
    assert 0 <= rep["rho_median"] <= 1
    assert 0 < rep["smallest_shrink_l2_median"] <= 1
    assert rep["smallest_success_kept"] == 1.0
    assert rep["smallest_output_diff_max"] <= 1e-12


@pytest.mark.integration
def test_attack_text_report_and_seed(capsys, setup) -> None:
    name, common = setup
    args = ["attack", f"{name}:wide", "--attack", "pgd", "--eps", "0.2", "--steps", "5", "--n", "100", *common]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    assert "first 12 test images" in out  # the folder has 12: all of them
    for words in ("success rate", "median ||delta||_2", "harmless fraction rho", "dim 48 of 64",
                  "smallest equivalent example", "success kept 100.0%"):
        assert words in out, out
    assert run(capsys, *args)[1] == out  # seeded: the same report again
    code, out_json, _ = run(capsys, *args, "--json", "--seed", "3")
    assert code == 0 and not math.isnan(json.loads(out_json)["success_rate"])


@pytest.mark.integration
def test_attack_on_a_model_without_harmless_subspace(capsys, setup) -> None:
    name, common = setup
    code, out, err = run(capsys, "attack", f"{name}:injective", "--attack", "fgsm", "--eps", "0.1", *common)
    assert code == 0, err
    assert "no harmless-subspace measures" in out and "success rate" in out
    assert "smallest equivalent" not in out


@pytest.mark.integration
def test_attack_images_of_the_wrong_shape(capsys, setup) -> None:
    name, common = setup
    common = [a if a != "1,8,8" else "1,4,16" for a in common]
    code, _, err = run(capsys, "attack", f"{name}:wide", "--attack", "deepfool", *common)
    assert code == EXIT_USER_ERROR and "shape" in one_error_line(err)


# Every bad argument is refused before the model is loaded: the model named here does not exist,
# so an error about it would mean the argument was not checked first.
@pytest.mark.parametrize(("argv", "words"), [
    (["--attack", "foo"], "--attack must be one of pgd, fgsm, deepfool, cw"),
    (["--attack", "pgd"], "--eps is required"),
    (["--attack", "fgsm", "--eps", "0"], "--eps must be"),
    (["--attack", "pgd", "--eps", "-0.1"], "--eps must be"),
    (["--attack", "pgd", "--eps", "nan"], "--eps must be"),
    (["--attack", "pgd", "--eps", "inf"], "--eps must be"),
    (["--attack", "pgd", "--eps", "abc"], "--eps must be a number"),
    (["--attack", "pgd", "--eps", "0.1", "--norm", "3"], "--norm must be inf or 2"),
    (["--attack", "pgd", "--eps", "0.1", "--steps", "0"], "--steps must be a positive integer"),
    (["--attack", "pgd", "--eps", "0.1", "--steps", "2.5"], "--steps must be a positive integer"),
    (["--attack", "fgsm", "--eps", "0.1", "--steps", "3"], "--steps applies to"),
    (["--attack", "deepfool", "--eps", "0.1"], "--eps applies to"),
    (["--attack", "cw", "--norm", "2"], "--norm applies to"),
    (["--attack", "deepfool", "--n", "0"], "--n must be a positive integer"),
    (["--attack", "deepfool", "--n", "ten"], "--n must be a positive integer"),
    (["--attack", "deepfool", "--seed", "-1"], "--seed must be an integer >= 0"),
])
def test_bad_arguments_are_one_line(capsys, argv: list[str], words: str) -> None:
    code, out, err = run(capsys, "attack", "no_such_module_xyz:model", *argv, "--input-shape", "1,8,8")
    assert code == EXIT_USER_ERROR and out == ""
    assert words in one_error_line(err)


def test_factory_model_needs_data(capsys) -> None:
    code, _, err = run(capsys, "attack", "no_such_module_xyz:model", "--attack", "deepfool", "--input-shape", "1,8,8")
    assert code == EXIT_USER_ERROR and "--data is required" in one_error_line(err)


def test_attack_is_required(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["attack", "mlp5:mnist"])
    assert exc.value.code == 2
    assert "--attack" in capsys.readouterr().err
