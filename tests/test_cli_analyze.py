"""``harmless analyze``: the input level first, ``--layers`` (none / N / names), ``--sample``
(the exact convex pieces at one sample, checked against the library) and its bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cli_helpers import one_error_line, run
from PIL import Image

from harmless.cli.common import EXIT_USER_ERROR
from harmless.nonlinear import ReluNetwork

CNN = ("import torch\nfrom torch import nn\n"
       "def build():\n"
       "    torch.manual_seed(0)\n"
       "    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),\n"
       "                         nn.Linear(18, 5), nn.ReLU(), nn.Linear(5, 3)){mode}\n")


@pytest.fixture
def factory(tmp_path, monkeypatch):
    """Write ``<name>.py`` with ``build()`` and return ``"<name>:build"``."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def make(name: str, source: str) -> str:
        (tmp_path / f"{name}.py").write_text(source)
        return f"{name}:build"

    return make


def table_rows(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln.startswith("| ") and not ln.startswith("| layer ")]


def test_layers_none_prints_the_input_level_and_no_table(capsys, factory) -> None:
    spec = factory("an_cnn1", CNN.format(mode=".eval()"))
    code, out, err = run(capsys, "analyze", spec, "--input-shape", "1,6,6", "--layers", "none")
    assert code == 0, err
    assert "input-level harmless subspace: dim" in out
    assert table_rows(out) == [] and "| layer |" not in out
    code, out, _ = run(capsys, "analyze", spec, "--input-shape", "1,6,6", "--layers", "none", "--json")
    assert code == 0 and json.loads(out)["layers"] == []


def test_layers_count_and_names(capsys, factory) -> None:
    spec = factory("an_cnn2", CNN.format(mode=".eval()"))
    code, out, _ = run(capsys, "analyze", spec, "--input-shape", "1,6,6", "--layers", "2")
    assert code == 0
    rows = table_rows(out)
    assert len(rows) == 3 and rows[0].startswith("| linear prefix |")  # the prefix row and two layers
    assert rows[1].startswith("| 0 |") and rows[2].startswith("| 4 |")
    code, out, _ = run(capsys, "analyze", spec, "--input-shape", "1,6,6", "--layers", "6,4", "--json")
    assert [r["name"] for r in json.loads(out)["layers"]] == ["4", "6"]  # a bare number would be a count
    code, out, _ = run(capsys, "analyze", spec, "--input-shape", "1,6,6", "--layers", "all", "--json")
    assert [r["name"] for r in json.loads(out)["layers"]] == ["0", "4", "6"]


@pytest.mark.parametrize("value, match", [("fc9", "no linear layer named 'fc9'"), ("a,,b", "--layers"),
                                          ("-1", "--layers")])
def test_layers_bad_value(capsys, factory, value, match) -> None:
    spec = factory("an_cnn3", CNN.format(mode=".eval()"))
    code, out, err = run(capsys, "analyze", spec, "--input-shape", "1,6,6", "--layers", value)
    assert code == EXIT_USER_ERROR and match in one_error_line(err)
    if value != "fc9":  # a malformed value is refused before the model is loaded; a name only after
        assert out == ""


def test_the_input_level_is_printed_before_the_table_is_computed(capsys, factory, monkeypatch) -> None:
    import harmless.linalg.report as report

    spec = factory("an_cnn4", CNN.format(mode=".eval()"))
    seen: list[str] = []
    real = report.layer_rows

    def spy(*args, **kwargs):
        seen.append(capsys.readouterr().out)  # what the user had already seen
        return real(*args, **kwargs)

    monkeypatch.setattr(report, "layer_rows", spy)
    code, out, _ = run(capsys, "analyze", spec, "--input-shape", "1,6,6")
    assert code == 0 and "input-level harmless subspace" in seen[0] and "| layer |" not in seen[0]
    assert "| layer |" in out


def test_sample_npy_agrees_with_the_library(capsys, factory, tmp_path) -> None:
    spec = factory("an_cnn5", CNN.format(mode=".eval()"))
    x = torch.rand(1, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    np.save(tmp_path / "x.npy", x.numpy())
    code, out, err = run(capsys, "analyze", spec, "--input-shape", "1,6,6", "--sample", str(tmp_path / "x.npy"),
                         "--layers", "none", "--json")
    assert code == 0, err
    rep = json.loads(out)["sample"]
    from an_cnn5 import build  # type: ignore[import-not-found]

    net = ReluNetwork(build(), (1, 6, 6))
    pieces = net.all_pieces(x)
    assert [r["layer"] for r in rep["pieces"]] == net.layer_names
    assert [r["dim"] for r in rep["pieces"]] == [p.dim for p in pieces]
    assert [r["kind"] for r in rep["pieces"]][:3] == ["affine", "relu", "max-pool"]
    assert rep["check"]["output_unchanged"] and rep["check"]["max_output_change"] < 1e-12
    assert "not the union" in rep["scope"]
    for r in rep["pieces"]:
        assert (r["extent"] is None) == (r["dim"] == 0)
    code, out, _ = run(capsys, "analyze", spec, "--input-shape", "1,6,6", "--sample", str(tmp_path / "x.npy"),
                       "--layers", "none")
    assert code == 0 and "not the union over activation regions" in out and "Check (ok)" in out
    assert "| layer |" not in out


def test_sample_image_file(capsys, factory, tmp_path) -> None:
    spec = factory("an_cnn6", CNN.format(mode=".eval()"))
    img = np.random.default_rng(0).integers(0, 256, (6, 6), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "x.png")
    code, out, err = run(capsys, "analyze", spec, "--input-shape", "1,6,6", "--sample", str(tmp_path / "x.png"),
                         "--layers", "none", "--json")
    assert code == 0, err
    from an_cnn6 import build  # type: ignore[import-not-found]

    x = torch.as_tensor(img, dtype=torch.float64).unsqueeze(0) / 255.0
    assert json.loads(out)["sample"]["pieces"][-1]["dim"] == ReluNetwork(build(), (1, 6, 6)).piece(x).dim


def test_sample_bad_inputs(capsys, factory, tmp_path) -> None:
    spec = factory("an_cnn7", CNN.format(mode=".eval()"))
    shape = ["--input-shape", "1,6,6", "--layers", "none"]
    Image.fromarray(np.zeros((5, 7), dtype=np.uint8)).save(tmp_path / "small.png")
    cases = {"shape (1, 5, 7)": str(tmp_path / "small.png")}
    bad = np.zeros((1, 6, 6))
    bad[0, 2, 3] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    cases["non-finite"] = str(tmp_path / "nan.npy")
    bad[0, 2, 3] = np.inf
    np.save(tmp_path / "inf.npy", bad)
    cases["non-finite "] = str(tmp_path / "inf.npy")
    np.save(tmp_path / "wrong.npy", np.zeros((2, 6, 6)))
    cases["shape (2, 6, 6)"] = str(tmp_path / "wrong.npy")
    cases["no such file"] = str(tmp_path / "missing.png")
    cases["test:N needs a zoo model"] = "test:0"
    cases["index N >= 0"] = "test:x"
    (tmp_path / "junk.png").write_bytes(b"not an image")
    cases["cannot read image"] = str(tmp_path / "junk.png")
    for match, value in cases.items():
        code, out, err = run(capsys, "analyze", spec, *shape, "--sample", value)
        assert code == EXIT_USER_ERROR, (match, out)
        assert match.strip() in one_error_line(err), match


def test_sample_layer_without_a_known_set(capsys, factory, tmp_path) -> None:
    spec = factory("an_sig", "from torch import nn\ndef build():\n"
                             "    return nn.Sequential(nn.Linear(4, 3), nn.Sigmoid(), nn.Linear(3, 2)).eval()\n")
    np.save(tmp_path / "x.npy", np.ones(4))
    code, _, err = run(capsys, "analyze", spec, "--input-shape", "4", "--sample", str(tmp_path / "x.npy"))
    line = one_error_line(err)
    assert code == EXIT_USER_ERROR and "'1' (Sigmoid)" in line and "ReLU" in line


def test_sample_model_in_training_mode(capsys, factory, tmp_path) -> None:
    spec = factory("an_train", CNN.format(mode=".train()"))
    np.save(tmp_path / "x.npy", np.zeros((1, 6, 6)))
    code, _, err = run(capsys, "analyze", spec, "--input-shape", "1,6,6", "--sample", str(tmp_path / "x.npy"))
    assert code == EXIT_USER_ERROR and "training mode" in one_error_line(err)
    # Without --sample the loader's eval switch stands, with its one-line warning.
    code, _, err = run(capsys, "analyze", spec, "--input-shape", "1,6,6", "--layers", "none")
    assert code == 0 and "harmless: warning:" in err and "training mode" in err


@pytest.mark.integration
@pytest.mark.network
def test_sample_test_image_of_mlp5(capsys) -> None:
    # Trains mlp5:mnist on first use (minutes on a busy machine), then seconds.
    code, out, err = run(capsys, "analyze", "mlp5:mnist", "--sample", "test:0", "--layers", "none", "--json")
    assert code == 0, err
    rep = json.loads(out)["sample"]
    dims = {r["layer"]: r["dim"] for r in rep["pieces"]}
    assert dims["fc1"] == rep["h0_dim"] == 528 and dims["fc5"] >= dims["relu1"] >= 528
    assert rep["check"]["output_unchanged"] and rep["check"]["outside_h0_min"] > 0.1
    code, _, err = run(capsys, "analyze", "mlp5:mnist", "--sample", "test:10000", "--layers", "none")
    assert code == EXIT_USER_ERROR and "10000 images" in one_error_line(err)


def test_sample_extents_on_tied_max_pool_windows_are_positive(capsys, factory, tmp_path) -> None:
    # A constant image of -1: the conv output is constant away from the border, so the max pool's
    # windows tie and 0 lies on the piece's boundary; a random hull direction leaves the piece at
    # once (extent "-0", printed before the fix), a direction tilted into the piece (a member's)
    # does not.
    spec = factory("an_cnn_tied", CNN.format(mode=".eval()"))
    np.save(tmp_path / "tied.npy", -np.ones((1, 6, 6)))
    code, out, err = run(capsys, "analyze", spec, "--input-shape", "1,6,6", "--sample", str(tmp_path / "tied.npy"),
                         "--layers", "none", "--json")
    assert code == 0, err
    rows = json.loads(out)["sample"]["pieces"]
    pooled = [r for r in rows if r["dim"] > 0 and r["kind"] in ("max-pool", "affine", "relu")]
    assert pooled, rows
    for r in pooled:
        assert r["extent"] is not None and r["extent"] > 0, r
    code, out, _ = run(capsys, "analyze", spec, "--input-shape", "1,6,6", "--sample", str(tmp_path / "tied.npy"),
                       "--layers", "none")
    assert code == 0 and "-0" not in out.replace("e-0", "")
