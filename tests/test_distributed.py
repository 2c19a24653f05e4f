"""Dataset-scale privatisation: every image's outputs independent of batches, order, resuming and
engine (this process, or Ray Data workers), byte for byte. The Ray tests need the optional extra
(``pip install 'harmless[ray]'``) and start a local Ray instance with 2 CPUs (slow: tens of
seconds); the rest run everywhere."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import one_error_line, run
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from harmless.errors import InputError
from harmless.linalg.subspace import harmless_subspace
from harmless.privacy.job import PrivatizeRun, load_privatized, privatize_files, read_image
from harmless.threads import one_torch_thread

SHAPE = (1, 8, 8)

# A model whose code every Ray worker can import (torch's own classes), seeded.
FACTORY = """
import torch
from torch import nn

def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 20), nn.ReLU(), nn.Linear(20, 3)).eval()
"""


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 20), nn.ReLU(), nn.Linear(20, 3)).eval()


@pytest.fixture(scope="module")
def space():
    return harmless_subspace(_model(), SHAPE)


def _images(folder: Path, count: int, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, SHAPE[1:], dtype=np.uint8), "L").save(folder / f"im{i}.png")
    return folder


def _contents(out: Path) -> dict[str, bytes]:
    """Every file of a run's output folder; the report's paths name the folder, so it is left out of them."""
    files = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    if "report.json" in files:
        files["report.json"] = files["report.json"].replace(str(out).encode(), b"<out>")
    return files


def _per_image(files: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in files.items() if k.endswith((".privatized.png", ".privatized.safetensors"))}


def _statuses(out: Path) -> list[str]:
    return [r["status"] for r in json.loads((out / "report.json").read_text())["images"]]


@pytest.mark.parametrize("decoy", ["noise", "shift"])
def test_outputs_do_not_depend_on_batches_or_resuming(space, tmp_path, decoy) -> None:
    inputs = _images(tmp_path / "in", 4)
    privatize_files(space, [inputs], tmp_path / "a", decoy=decoy, batch_size=4, progress=False)
    privatize_files(space, [inputs], tmp_path / "b", decoy=decoy, batch_size=1, progress=False)
    first = _contents(tmp_path / "a")
    assert first == _contents(tmp_path / "b")
    assert len(first) == 4 * 2 + 3  # .privatized.png/.safetensors per image, report.json/.md, the figure
    # interrupted: one image lost its exact file, another has a PNG cut short; a re-run redoes those two
    (tmp_path / "a" / "im1.privatized.safetensors").unlink()
    png = tmp_path / "a" / "im3.privatized.png"
    png.write_bytes(png.read_bytes()[:-20])
    privatize_files(space, [inputs], tmp_path / "a", decoy=decoy, batch_size=3, progress=False)
    assert _statuses(tmp_path / "a") == ["skipped (already done)", "privatised"] * 2
    assert _per_image(_contents(tmp_path / "a")) == _per_image(first)  # the figure shows the two redone
    # each image's output is its own: the model's output is unchanged, and the decoy is per image
    model = _model().double()
    hats = {}
    for i in range(4):
        x = read_image(inputs / f"im{i}.png", SHAPE).unsqueeze(0)
        hats[i] = load_privatized(tmp_path / "a" / f"im{i}.privatized.safetensors").unsqueeze(0)
        with torch.no_grad():
            assert torch.allclose(model(hats[i]), model(x), rtol=0, atol=1e-12)
    assert not torch.equal(hats[0], hats[1])


def test_a_run_pickles_and_solves_the_same_elsewhere(space, tmp_path) -> None:
    """What a Ray worker gets: the planned run, pickled without its dense data; it writes the
    same bytes as the run it came from."""
    inputs = _images(tmp_path / "in", 3)
    runs = [PrivatizeRun.plan(space, [inputs], tmp_path / name, decoy="noise", seed=3) for name in ("a", "b")]
    with one_torch_thread():
        runs[0].privatize(runs[0].todo[:1])  # its dense data exist now; they must not travel
    copy = pickle.loads(pickle.dumps(runs[1]))
    assert "problem" not in vars(copy.solver)
    with one_torch_thread():
        for run in (runs[0], copy):
            records, shown = run.privatize(run.todo[::-1])  # in another order
            assert [r.status for r in records] == ["privatised"] * len(records)
            run.finish(records, shown)
    a = {k: v for k, v in _contents(tmp_path / "a").items() if not k.startswith("report")}
    assert a == {k: v for k, v in _contents(tmp_path / "b").items() if not k.startswith("report")}


def test_the_seed_and_the_file_name_choose_the_noise(space, tmp_path) -> None:
    inputs = _images(tmp_path / "in", 2)
    _images(tmp_path / "same", 2)  # the same pixels again: only the names and the seed choose the decoys
    (tmp_path / "same" / "im0.png").rename(tmp_path / "same" / "other.png")
    for name, folder, seed in (("a", inputs, 0), ("b", tmp_path / "same", 0), ("c", inputs, 1)):
        privatize_files(space, [folder], tmp_path / name, decoy="noise", seed=seed, progress=False)
    a, b, c = (_contents(tmp_path / n) for n in "abc")
    assert a["im1.privatized.safetensors"] == b["im1.privatized.safetensors"]
    assert a["im0.privatized.safetensors"] != b["other.privatized.safetensors"]
    assert a["im1.privatized.safetensors"] != c["im1.privatized.safetensors"]


def test_outputs_of_earlier_versions_still_resume(space, tmp_path) -> None:
    """Exact files that kept source, method and metrics in three metadata keys."""
    inputs = _images(tmp_path / "in", 2)
    out = tmp_path / "out"
    privatize_files(space, [inputs / "im0.png"], out, progress=False)
    x_hat = load_privatized(out / "im0.privatized.safetensors")
    metrics = json.loads((out / "report.json").read_text())["images"][0]
    old = {k: metrics[k] for k in ("box_violation", "output_deviation", "png_output_deviation_naive",
                                    "png_output_deviation", "ssim", "distance_bound")}
    save_file({"x_hat": x_hat, "x_hat_8bit": x_hat.clone()}, str(out / "im0.privatized.safetensors"),
              metadata={"source": "im0.png", "method": "decoy-grey", "metrics": json.dumps(old)})
    privatize_files(space, [inputs], out, progress=False)
    images = json.loads((out / "report.json").read_text())["images"]
    assert [r["status"] for r in images] == ["skipped (already done)", "privatised"]
    assert images[0]["ssim"] == old["ssim"]


def test_shift_needs_two_images(space, tmp_path) -> None:
    inputs = _images(tmp_path / "in", 1)
    with pytest.raises(InputError, match="at least 2"):
        privatize_files(space, [inputs], tmp_path / "out", decoy="shift", progress=False)


def test_without_ray_the_flag_says_how_to_install_it(capsys, monkeypatch, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    _images(tmp_path / "in", 1)
    code, _, err = run(capsys, "privatize", "mlp5:mnist", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
                       "--ray")
    assert code == 2
    assert "install harmless[ray]" in one_error_line(err)
    assert not (tmp_path / "out").exists()


def test_workers_need_ray(capsys, tmp_path) -> None:
    code, _, err = run(capsys, "privatize", "mlp5:mnist", str(tmp_path), "--out", str(tmp_path / "out"),
                       "--workers", "2")
    assert code == 2 and "--workers needs --ray" in one_error_line(err)


# ---------------------------------------------------------------------------------------------
# On Ray.


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """A local Ray instance with 2 CPUs, whose workers can import the modules this process can
    and the model factory in the folder it yields."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    code = tmp_path_factory.mktemp("code")
    (code / "raymodels.py").write_text(FACTORY)
    path = os.pathsep.join([str(code), *(p for p in sys.path if p)])
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    sys.path.insert(0, str(code))
    yield code
    sys.path.remove(str(code))
    ray.shutdown()


@pytest.mark.slow
def test_ray_writes_the_bytes_of_the_single_process_run_and_resumes(local_ray, space, tmp_path) -> None:
    from harmless.privacy.distributed import privatize_files_ray

    decoy = "noise"  # random numbers: per image, whichever worker draws them ('shift': the command-line test)
    inputs = _images(tmp_path / "in", 5)
    privatize_files(space, [inputs], tmp_path / "single", decoy=decoy, progress=False)
    for workers, batch in ((1, 5), (2, 2)):
        out = tmp_path / f"ray{workers}"
        privatize_files_ray(space, [inputs], out, decoy=decoy, batch_size=batch, workers=workers, progress=False)
        assert _contents(out) == _contents(tmp_path / "single")
    # interrupted: outputs lost; the re-run on Ray redoes those and nothing else, to the same bytes
    out = tmp_path / "ray2"
    (out / "im0.privatized.safetensors").unlink()
    (out / "im4.privatized.png").unlink()
    data = (out / "im2.privatized.safetensors").read_bytes()
    (out / "im2.privatized.safetensors").write_bytes(data[:-8])  # cut short (by a copy, say)
    privatize_files_ray(space, [inputs], out, decoy=decoy, batch_size=2, workers=2, progress=False)
    assert _statuses(out) == ["privatised", "skipped (already done)", "privatised", "skipped (already done)",
                              "privatised"]
    assert _per_image(_contents(out)) == _per_image(_contents(tmp_path / "single"))


@pytest.mark.slow
def test_ray_reports_a_worker_s_user_error_in_one_line(local_ray, space, tmp_path) -> None:
    from harmless.privacy.distributed import privatize_files_ray

    inputs = _images(tmp_path / "in", 3)
    Image.fromarray(np.zeros((9, 9), dtype=np.uint8), "L").save(inputs / "im1.png")  # the wrong size
    with pytest.raises(InputError, match="the image is 9x9, the model expects 8x8"):
        privatize_files_ray(space, [inputs], tmp_path / "out", workers=2, batch_size=1, progress=False)


@pytest.mark.slow
def test_ray_from_the_command_line(local_ray, capsys, tmp_path) -> None:
    inputs = _images(tmp_path / "in", 3)
    common = ["privatize", "raymodels:model", str(inputs), "--input-shape", "1,8,8", "--decoy", "shift"]
    assert run(capsys, *common, "--out", str(tmp_path / "single"))[0] == 0
    code, out, err = run(capsys, *common, "--out", str(tmp_path / "ray"), "--ray", "--workers", "2")
    assert code == 0, err
    assert "report.json" in out
    assert _contents(tmp_path / "ray") == _contents(tmp_path / "single")


@pytest.mark.slow
def test_ray_starts_a_local_instance_of_its_own(tmp_path) -> None:
    """In a fresh process: ``--ray`` starts a local Ray (its workers import the model factory
    beside the data, as this process does) and stops it."""
    pytest.importorskip("ray")
    (tmp_path / "raymodels2.py").write_text(FACTORY)
    inputs = _images(tmp_path / "in", 2)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "harmless.cli", "privatize", "raymodels2:model", str(inputs), "--input-shape",
           "1,8,8", "--out", str(tmp_path / "out")]
    single = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    cmd[-1] = str(tmp_path / "ray")
    done = subprocess.run([*cmd, "--ray", "--workers", "1"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert _contents(tmp_path / "ray") == _contents(tmp_path / "out")
