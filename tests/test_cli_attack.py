"""`harmless attack`: the report on a tiny factory model and a folder data set (no download),
the file form (IMAGES... --out DIR: written files re-loaded reproduce the success and the
logits), and one clear line with exit code 2 for every bad argument."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import WIDE_FACTORY, factory_and_folder, one_error_line, run
from safetensors.torch import load_file

from harmless.cli import EXIT_USER_ERROR, main

FACTORY = WIDE_FACTORY + (
    "def injective():\n"  # 64 -> 80: no harmless subspace
    "    torch.manual_seed(0)\n"
    "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 80), nn.ReLU(), nn.Linear(80, 3)).eval()\n"
)


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, list[str]]:
    """A factory module and a folder data set of 3 classes x 4 grayscale 8x8 PNGs."""
    return factory_and_folder(tmp_path, monkeypatch, FACTORY, "atkmodels", background=True)


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


# ---------------------------------------------------------------------------------------------
# The file form: harmless attack MODEL IMAGES... --out DIR.


@pytest.fixture
def images(tmp_path: Path, setup: tuple[str, list[str]]) -> tuple[str, Path, list[str]]:
    """Four grayscale 8x8 PNGs in their own folder (background rows at 0, as in MNIST); returns
    the factory module's name, the folder and the arguments the file form needs."""
    from PIL import Image

    name, _ = setup
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        img = (rng.random((8, 8)) * 255).astype(np.uint8)
        img[:2] = 0
        Image.fromarray(img, mode="L").save(folder / f"digit{i}.png")
    return name, folder, ["--input-shape", "1,8,8"]


def _factory_model(name: str):
    import importlib

    return importlib.import_module(name).wide()


def _read_png(path: Path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).to(torch.float64)[None] / 255.0


@pytest.mark.integration
@pytest.mark.parametrize("norm", ["inf", "2"])
def test_attack_files_writes_what_reproduces(capsys, tmp_path, images, norm: str) -> None:
    name, folder, common = images
    out = tmp_path / "out"
    code, text, err = run(capsys, "attack", f"{name}:wide", str(folder), "--attack", "pgd", "--eps", "0.5",
                          "--norm", "2", "--steps", "10", "--out", str(out), "--smallest-norm", norm, *common)
    assert code == 0, err
    assert "wrote" in text and "labels: the model's predictions" in text
    rep = json.loads((out / "report.json").read_text())
    assert (out / "report.md").read_text().startswith("# harmless attack report")
    assert rep["smallest_norm"] == (2 if norm == "2" else "inf") and len(rep["images"]) == 4
    model = _factory_model(name)
    m64 = copy.deepcopy(model).double()
    for rec in rep["images"]:
        stem = rec["stem"]
        assert sorted(rec["files"]) == sorted([f"{stem}.adv.safetensors", f"{stem}.adv.png", f"{stem}.small.png"])
        assert all((out / f).is_file() for f in rec["files"])
        x = _read_png(folder / f"{stem}.png")
        t = load_file(str(out / f"{stem}.adv.safetensors"))
        assert t["x_adv"].dtype == torch.float32 and t["x_small"].dtype == torch.float64  # the model's dtype; exact
        assert torch.equal(t["delta"], t["x_adv"] - x.float())  # the attack's δ, as stored
        # the images the attack saw are in the model's dtype (float32): δ_small is from those
        assert torch.equal(t["delta_small"], t["x_small"] - x.float().double())
        with torch.no_grad():
            pred_before = int(model(x.float()[None]).argmax(1))
            pred_adv = int(model(t["x_adv"][None]).argmax(1))
            f_adv, f_small = m64(t["x_adv"].double()[None]), m64(t["x_small"][None])
            pred_8 = int(model(_read_png(out / f"{stem}.adv.png").float()[None]).argmax(1))
            pred_s8 = int(model(_read_png(out / f"{stem}.small.png").float()[None]).argmax(1))
        assert rec["label"] == rec["pred_before"] == pred_before  # untargeted on the model's own prediction
        assert rec["pred_after"] == pred_adv and rec["success"] == (pred_adv != rec["label"])
        assert float((f_small - f_adv).norm() / f_adv.norm()) <= 1e-10  # the same output, re-loaded
        assert rec["success_small"] == rec["success"] and rec["label_kept"]
        assert rec["success_8bit"] == (pred_8 != rec["label"])
        assert rec["success_small_8bit"] == (pred_s8 != rec["label"])
        # the certificates: the LP's gap; the QP's distance bound (as loose as 1e-5 on degenerate
        # images, where the interior point stalls: see test_smallest_equivalent)
        assert rec["optimality_bound"] <= (1e-6 if norm == "inf" else 1e-4) and 0 <= rec["rho"] <= 1
        key = "shrink_linf" if norm == "inf" else "shrink_l2"
        assert rec[key] is None or rec[key] <= 1
        assert abs(rec["linf"] - float(t["delta"].abs().max())) <= 1e-6
    assert any(r["success"] for r in rep["images"])
    # the outputs exist now: a second run refuses them, --overwrite replaces them
    again = ["attack", f"{name}:wide", str(folder), "--attack", "fgsm", "--eps", "0.1", "--out", str(out), *common]
    code, _, err = run(capsys, *again)
    assert code == EXIT_USER_ERROR and "already exists; use --overwrite" in one_error_line(err)
    code, _, err = run(capsys, *again, "--overwrite", "--json")
    assert code == 0, err


@pytest.mark.integration
def test_attack_files_with_given_labels(capsys, tmp_path, images) -> None:
    name, folder, common = images
    labels = tmp_path / "labels.txt"
    labels.write_text("0\n1\n2\n0\n")
    for given in ("0,1,2,0", str(labels)):
        out = tmp_path / f"out{len(given)}"
        code, text, err = run(capsys, "attack", f"{name}:wide", str(folder), "--attack", "deepfool", "--labels",
                              given, "--out", str(out), "--json", *common)
        assert code == 0, err
        rep = json.loads(text)
        assert rep["labels"] == "given" and rep["out"] == str(out / "report.json")
        assert [r["label"] for r in json.loads((out / "report.json").read_text())["images"]] == [0, 1, 2, 0]


@pytest.mark.integration
def test_attack_test_set_with_out_and_linf(capsys, tmp_path, setup) -> None:
    name, common = setup
    out = tmp_path / "tout"
    code, text, err = run(capsys, "attack", f"{name}:wide", "--attack", "fgsm", "--eps", "0.1", "--n", "3",
                          "--smallest-norm", "inf", "--out", str(out), "--json", *common)
    assert code == 0, err
    rep = json.loads(text)
    assert rep["smallest_norm"] == "inf" and rep["smallest_output_diff_max"] <= 1e-12
    assert rep["smallest_optimality_bound_max"] <= 1e-6
    written = sorted(p.name for p in out.glob("test*.adv.safetensors"))
    assert written == [f"test0000{i}.adv.safetensors" for i in range(3)]


def test_file_form_refusals(capsys, tmp_path, images) -> None:
    """Every bad argument of the file form: one line, exit 2."""
    from PIL import Image

    name, folder, common = images
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    Image.fromarray(np.zeros((4, 16), dtype=np.uint8), mode="L").save(wrong / "flat.png")
    out = str(tmp_path / "o")
    base = ["attack", f"{name}:wide", "--attack", "fgsm", "--eps", "0.1"]
    cases = [
        ([str(tmp_path / "missing.png"), "--out", out], "neither an image file nor a folder"),
        ([str(wrong), "--out", out], "the model expects 8x8"),
        ([str(folder), "--out", str(folder)], "contains the input"),
        ([str(folder / "digit0.png"), "--out", str(folder)], "contains the input"),
        ([str(folder), "--out", out, "--labels", "0,1,5,0"], "--labels must be < 3"),
        ([str(folder), "--out", out, "--labels", "0,1"], "--labels has 2 labels but there are 4 images"),
        ([str(folder), "--out", out, "--labels", "0,1,-1,0"], "--labels must be >= 0"),
        ([str(folder), "--out", out, "--labels", "0,1,x,0"], "neither"),
        ([str(folder), "--out", out, "--labels", str(tmp_path / "nolabels.txt")], "no such file"),
        ([str(folder)], "--out DIR is required with IMAGES"),
        ([str(folder), "--out", out, "--n", "3"], "--n applies to the test-set form"),
        ([str(folder), "--out", out, "--data", "mnist"], "--data applies to the test-set form"),
        ([str(folder), "--out", out, "--smallest-norm", "1"], "--smallest-norm must be 2 or inf"),
        ([str(folder), "--overwrite"], "--overwrite applies with --out"),
        (["--labels", "1,2"], "--labels applies to IMAGES"),
    ]
    for extra, words in cases:
        code, stdout, err = run(capsys, *base, *extra, *common)
        assert code == EXIT_USER_ERROR and stdout == "", (extra, err)
        assert words in one_error_line(err), (extra, err)
    labels_file = tmp_path / "bad.txt"
    labels_file.write_text("1 2 three 0")
    code, _, err = run(capsys, *base, str(folder), "--out", out, "--labels", str(labels_file), *common)
    assert code == EXIT_USER_ERROR and "--labels must be integers" in one_error_line(err)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "report.json").write_text("{}")  # a file the run would write
    code, _, err = run(capsys, *base, str(folder), "--out", out, *common)
    assert code == EXIT_USER_ERROR and "report.json already exists" in one_error_line(err)
    assert not list(Path(out).glob("*.png"))  # nothing written


@pytest.mark.slow
@pytest.mark.integration
def test_attack_files_on_mlp5_linf(capsys, tmp_path) -> None:
    """The zoo's MLP-5 (cached checkpoint; skipped where it is not cached) on two MNIST-like PNGs:
    the L∞ smallest equivalent of an L2 PGD example, written and re-loaded."""
    from PIL import Image

    from harmless.models import checkpoint_paths, load_model

    if not all(p.exists() for p in checkpoint_paths("mlp5:mnist")):
        pytest.skip("mlp5:mnist is not cached (harmless models train mlp5:mnist)")
    rng = np.random.default_rng(2)
    for i in range(2):
        img = np.zeros((28, 28), dtype=np.uint8)
        img[6:22, 10:18] = (rng.random((16, 8)) * 255).astype(np.uint8)  # a stroke on black, as in MNIST
        Image.fromarray(img, mode="L").save(tmp_path / f"d{i}.png")
    out = tmp_path / "out"
    code, text, err = run(capsys, "attack", "mlp5:mnist", str(tmp_path / "d0.png"), str(tmp_path / "d1.png"),
                          "--attack", "pgd", "--eps", "2.0", "--norm", "2", "--smallest-norm", "inf",
                          "--out", str(out), "--no-train", "--json")
    assert code == 0, err
    rep = json.loads((out / "report.json").read_text())
    model = load_model("mlp5:mnist", allow_training=False)
    m64 = copy.deepcopy(model).double()
    for rec in rep["images"]:
        t = load_file(str(out / f"{rec['stem']}.adv.safetensors"))
        with torch.no_grad():
            f_adv, f_small = m64(t["x_adv"].double()[None]), m64(t["x_small"][None])
        assert float((f_small - f_adv).norm() / f_adv.norm()) <= 1e-10
        assert rec["label_kept"] and rec["optimality_bound"] <= 1e-6
        assert float(t["delta_small"].abs().max()) <= float(t["delta"].abs().max()) + 1e-12
