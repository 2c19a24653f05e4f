"""Tests of harmless.fingerprint: creation, exclusion, storage and verification.

Models are untrained seeded initialisations (``build_model``) or tiny hand-made MLPs, so the
tests need neither the model cache nor any data download: a fingerprint is a property of
the first layer's nullspace, not of training.
"""

from __future__ import annotations

import copy
import json
import pickle
import struct

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from harmless.errors import NoHarmlessSubspaceError
from harmless.fingerprint import (
    FORMAT_VERSION,
    Fingerprint,
    FingerprintError,
    create_fingerprint,
    exclusion_basis,
    intersection_basis,
    load_fingerprint,
    model_hash,
    save_fingerprint,
    verify_fingerprint,
)
from harmless.fingerprint.fileformat import _checksum  # the file format's own checksum, to forge files
from harmless.models import build_model

SHAPE = (1, 28, 28)


@pytest.fixture(autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def mlp():
    return build_model("mlp5:mnist", seed=0)


@pytest.fixture(scope="module")
def probes():
    return torch.rand(3, *SHAPE, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def fp(mlp, probes):
    return create_fingerprint(mlp, SHAPE, probes, k=4, generator=torch.Generator().manual_seed(1))


def _permuted(model: nn.Module, seed: int = 3) -> nn.Module:
    """fc1's hidden units permuted (rows + bias) and fc2's columns to match: same function.
    (Written here, not imported from the experiments: tests stand on the library alone.)"""
    m = copy.deepcopy(model)
    perm = torch.randperm(m.fc1.out_features, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        m.fc1.weight.copy_(m.fc1.weight[perm])
        m.fc1.bias.copy_(m.fc1.bias[perm])
        m.fc2.weight.copy_(m.fc2.weight[:, perm])
    return m.eval()


def _tiny(w1: torch.Tensor, seed: int = 0) -> nn.Module:
    """Flatten -> Linear(36, r) with weight w1 -> ReLU -> Linear(r, 3), on 1x6x6 inputs."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Flatten(), nn.Linear(36, w1.shape[0]), nn.ReLU(), nn.Linear(w1.shape[0], 3)).double()
    with torch.no_grad():
        m[1].weight.copy_(w1)
    return m.eval()


# ----------------------------------------------------------------------------- create


def test_fingerprint_is_harmless_and_large(fp, mlp, probes):
    assert fp.perturbations.shape == (4, *SHAPE) and fp.perturbations.dtype == torch.float64
    norms = fp.perturbations.reshape(4, -1).norm(dim=1)
    expected = 100 * float(probes.double().reshape(3, -1).norm(dim=1).max())
    assert torch.allclose(norms, torch.full_like(norms, expected), rtol=1e-12)
    assert fp.harmful_residual < 1e-13
    assert fp.harmless_dim == 784 - 256
    # The model's own float64 outputs did not move (reference vs perturbed outputs).
    rel = (fp.perturbed_outputs - fp.reference_outputs).abs().max() / fp.reference_outputs.abs().max()
    assert float(rel) < 1e-10
    assert fp.model_hash == model_hash(mlp)


def test_injective_first_layer_is_refused(probes):
    lenet = build_model("lenet:mnist", seed=0)
    with pytest.raises(NoHarmlessSubspaceError, match="no harmless subspace"):
        create_fingerprint(lenet, SHAPE, probes, k=2)


def test_bad_arguments(mlp, probes):
    from harmless.errors import InputError

    with pytest.raises(InputError):
        create_fingerprint(mlp, SHAPE, probes[:, :, :20], k=2)
    with pytest.raises(InputError):
        create_fingerprint(mlp, SHAPE, probes, k=0)
    with pytest.raises(InputError):
        create_fingerprint(mlp, SHAPE, probes, k=2, magnitude=-1.0)


# ----------------------------------------------------------------------------- verify


def test_verify_same_model_float32_float64_and_permuted(fp, mlp):
    v32 = verify_fingerprint(fp, mlp)
    # The threshold is 10x the model's own float32 round-off, measured when the fingerprint was made.
    assert v32.same and v32.statistic <= fp.roundoff["float32"] * (1 + 1e-9), v32.message
    assert fp.thresholds["float32"] == pytest.approx(10 * fp.roundoff["float32"])
    assert v32.hash_match is True
    v64 = verify_fingerprint(fp, copy.deepcopy(mlp).double())
    assert v64.same and v64.statistic < 1e-10, v64.message
    vp = verify_fingerprint(fp, _permuted(mlp))
    assert vp.same and vp.statistic < fp.threshold / 3, vp.message
    assert vp.hash_match is False  # other weights, same nullspace: the fingerprint says "same"
    assert vp.reference_deviation < 1e-5  # and the function is indeed the same


def test_verify_black_box_callable(fp, mlp):
    v = verify_fingerprint(fp, lambda x: mlp(x))
    assert v.same and v.hash_match is None


def test_verify_other_seed_is_different(fp):
    other = build_model("mlp5:mnist", seed=1)
    v = verify_fingerprint(fp, other)
    assert not v.same and v.statistic > 100 * fp.threshold, v.message
    assert "DIFFERENT" in v.message


def test_frozen_first_layer_counts_as_same(fp, mlp):
    """What the fingerprint certifies: the first layer's nullspace, not the whole model."""
    m = copy.deepcopy(mlp)
    with torch.no_grad():
        m.fc5.weight.mul_(-2.0)
    v = verify_fingerprint(fp, m)
    assert v.same and v.reference_deviation > 0.5


# ----------------------------------------------------------------------------- exclusion


def test_exclusion_removes_the_shared_part():
    g = torch.Generator().manual_seed(0)
    wa = torch.randn(20, 36, generator=g, dtype=torch.float64)
    wb = wa.clone()
    wb[:10] = torch.randn(10, 36, generator=g, dtype=torch.float64)  # B shares 10 of A's 20 rows
    a, b = _tiny(wa), _tiny(wb, seed=1)
    shape = (1, 6, 6)
    # Independent computation: scipy's null_space of the stacked matrices.
    inter = scipy.linalg.null_space(np.vstack([wa.numpy(), wb.numpy()]))
    assert inter.shape[1] == 36 - 30 == 6
    ib = intersection_basis([a, b], shape)
    assert ib.shape == (6, *shape)
    # Same subspace: the projectors agree.
    p1 = inter @ inter.T
    q = ib.reshape(6, -1).numpy()
    assert np.abs(p1 - q.T @ q).max() < 1e-10

    basis, dims, excluded, dim_a = exclusion_basis(a, [b], shape)
    assert dims == [6] and excluded == 6 and dim_a == 16 and basis.shape[0] == 10

    x = torch.rand(2, *shape, generator=g, dtype=torch.float64)
    fp = create_fingerprint(a, shape, x, k=5, exclude=[b], generator=g)
    assert fp.intersection_dims == [6] and fp.excluded_dim == 6
    d = fp.perturbations.reshape(5, -1)
    # Orthogonal to the shared part, harmless for A, clearly harmful for B.
    assert float((d.numpy() @ inter).__abs__().max()) < 1e-10 * float(d.norm(dim=1).max())
    rel_a = (d @ wa.T).norm(dim=1) / (torch.linalg.matrix_norm(wa, 2) * d.norm(dim=1))
    rel_b = (d @ wb.T).norm(dim=1) / (torch.linalg.matrix_norm(wb, 2) * d.norm(dim=1))
    assert float(rel_a.max()) < 1e-13
    assert float(rel_b.min()) > 1e-2
    assert min(fp.exclusion_margins) > 1e-2
    assert verify_fingerprint(fp, a).same
    assert not verify_fingerprint(fp, b).same

    # Without exclusion, a perturbation inside the intersection is harmless for both:
    # exactly the ones the exclusion removes.
    shared = torch.from_numpy(inter[:, 0]).reshape(1, *shape) * 1e3
    for m in (a, b):
        assert torch.allclose(m(x + shared), m(x), rtol=0, atol=1e-9)


def test_exclusion_of_everything_is_refused():
    g = torch.Generator().manual_seed(1)
    wa = torch.randn(20, 36, generator=g, dtype=torch.float64)
    a, a2 = _tiny(wa), _tiny(2 * wa, seed=3)  # same nullspace
    x = torch.rand(2, 1, 6, 6, generator=g, dtype=torch.float64)
    with pytest.raises(FingerprintError, match="nothing is left"):
        create_fingerprint(a, (1, 6, 6), x, k=2, exclude=[a2])


def test_exclude_each_mode_guarantees_every_model():
    g = torch.Generator().manual_seed(2)
    wa = torch.randn(12, 36, generator=g, dtype=torch.float64)
    # Each Bi keeps 6 of A's 12 rows and adds 16 new ones: dim N(A) ∩ N(Bi) = 36 - 12 - 16 = 8.
    wb1 = torch.cat([wa[:6], torch.randn(16, 36, generator=g, dtype=torch.float64)])
    wb2 = torch.cat([wa[6:], torch.randn(16, 36, generator=g, dtype=torch.float64)])
    a, b1, b2 = _tiny(wa), _tiny(wb1), _tiny(wb2)
    x = torch.rand(2, 1, 6, 6, generator=g, dtype=torch.float64)
    joint = create_fingerprint(a, (1, 6, 6), x, k=3, exclude=[b1, b2], generator=g)
    each = create_fingerprint(a, (1, 6, 6), x, k=3, exclude=[b1, b2], exclude_mode="each", generator=g)
    assert joint.intersection_dims == [8, 8] == each.intersection_dims
    # Joint: [A; B1; B2] has rank 36, nothing is harmless for all three; each: I1 + I2 has dim 16.
    assert joint.excluded_dim == 0 and each.excluded_dim == 16 and each.harmless_dim == 24
    assert min(each.exclusion_margins) > 1e-3 and min(joint.exclusion_margins) > 1e-10


# ----------------------------------------------------------------------------- storage


def test_roundtrip(fp, mlp, tmp_path):
    path = save_fingerprint(fp, tmp_path / "a.fp.safetensors")
    back = load_fingerprint(path)
    for name in ("probes", "perturbations", "reference_outputs", "perturbed_outputs"):
        assert torch.equal(getattr(back, name), getattr(fp, name))
    assert back.header() == fp.header() and back.checksum() == fp.checksum()
    assert verify_fingerprint(back, mlp).same


def test_overwrite_refused(fp, tmp_path):
    path = save_fingerprint(fp, tmp_path / "a.safetensors")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        save_fingerprint(fp, path)
    with pytest.raises(FingerprintError):  # a HarmlessError too: the CLI reports it in one line
        save_fingerprint(fp, path)
    assert path.read_bytes() == before
    save_fingerprint(fp, path, overwrite=True)


def _rewrite(path, *, header_edit=None, tensors_edit=None, fix_checksum=False):
    """Re-write a fingerprint file with its header/tensors edited (optionally re-checksummed)."""
    from safetensors import safe_open
    from safetensors.torch import save

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(meta["harmless_fingerprint"])
    if header_edit:
        header_edit(header)
    if tensors_edit:
        tensors_edit(tensors)
    meta["harmless_fingerprint"] = json.dumps(header)
    if fix_checksum:
        meta["checksum"] = _checksum(header, tensors)
    path.write_bytes(save(tensors, metadata=meta))


def test_flipped_tensor_byte_is_refused(fp, tmp_path):
    path = save_fingerprint(fp, tmp_path / "a.safetensors")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # the last bytes belong to a tensor
    path.write_bytes(bytes(data))
    with pytest.raises(FingerprintError, match="checksum mismatch"):
        load_fingerprint(path)


def test_edited_header_is_refused(fp, tmp_path):
    path = save_fingerprint(fp, tmp_path / "a.safetensors")
    _rewrite(path, header_edit=lambda h: h.update(threshold=1e6))
    with pytest.raises(FingerprintError, match="checksum mismatch"):
        load_fingerprint(path)


def test_unknown_version_is_refused(fp, tmp_path):
    path = save_fingerprint(fp, tmp_path / "a.safetensors")
    _rewrite(path, header_edit=lambda h: h.update(version=FORMAT_VERSION + 1), fix_checksum=True)
    with pytest.raises(FingerprintError, match="version"):
        load_fingerprint(path)


def test_inconsistent_shapes_are_refused(fp, tmp_path):
    path = save_fingerprint(fp, tmp_path / "a.safetensors")

    def drop_one(t):
        t["perturbations"] = t["perturbations"][:-1].contiguous()
    _rewrite(path, tensors_edit=drop_one, fix_checksum=True)  # checksum valid, k no longer matches
    with pytest.raises(FingerprintError, match="inconsistent shapes"):
        load_fingerprint(path)

    path2 = save_fingerprint(fp, tmp_path / "b.safetensors")
    _rewrite(path2, header_edit=lambda h: h.update(input_shape=[784]), fix_checksum=True)
    with pytest.raises(FingerprintError, match="inconsistent shapes"):
        load_fingerprint(path2)


class _Boom:
    def __reduce__(self):
        return (open, ("/nonexistent-dir/should-never-be-created", "w"))


def test_loading_never_executes_code(tmp_path):
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(FingerprintError):
        load_fingerprint(path)
    # A safetensors header announcing a huge length, and garbage: clear errors, no crash.
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(FingerprintError):
        load_fingerprint(path)
    with pytest.raises(FingerprintError, match="cannot read"):
        load_fingerprint(tmp_path / "missing.safetensors")


def test_fingerprint_dataclass_checksum_covers_tensors(fp):
    other = Fingerprint(**{**fp.__dict__, "perturbations": fp.perturbations.clone()})
    assert other.checksum() == fp.checksum()
    other.perturbations[0, 0, 0, 0] += 1e-12
    assert other.checksum() != fp.checksum()


def test_probe_images_validates_count():
    from harmless.errors import InputError
    from harmless.fingerprint import probe_images

    with pytest.raises(InputError):
        probe_images("mnist", 0)


# ----------------------------------------------------------------------------- calibration


def _fc1_noise(model: nn.Module, rel: float, seed: int = 0) -> nn.Module:
    m = copy.deepcopy(model)
    with torch.no_grad():
        w = m.fc1.weight
        w.add_(rel * w.norm() / w.numel() ** 0.5 * torch.randn(w.shape, generator=torch.Generator().manual_seed(seed)))
    return m.eval()


def _directional_deviation(fp: Fingerprint, suspect: nn.Module) -> float:
    """The truth the estimate aims at: max_i ||A' d_i|| / (||A|| ||d_i||) (A d_i = 0)."""
    import harmless

    op = harmless.harmless_subspace(suspect, SHAPE).operator
    d = fp.perturbations
    return float((op.matvec(d).reshape(d.shape[0], -1).norm(dim=1)
                  / (fp.operator_norm * d.reshape(d.shape[0], -1).norm(dim=1))).max())


def test_a_tiny_change_of_the_first_layer_is_different_and_its_size_is_estimated(fp, mlp):
    """Issue 11, item 1: 'same' is calibrated on the model's own round-off, so a first-layer
    change well above float32 round-off (one SGD step changed MLP-5's fc1 by 7e-6) is
    'different'; the verdict estimates how far the first layer moved along the fingerprint."""
    for rel in (1e-5, 1e-4, 1e-3):
        suspect = _fc1_noise(mlp, rel)
        v = verify_fingerprint(fp, suspect)
        truth = _directional_deviation(fp, suspect)
        assert not v.same, (rel, v.message)
        assert v.first_layer_deviation is not None
        assert truth / 3 <= v.first_layer_deviation <= 3 * truth, (rel, v.first_layer_deviation, truth)
    # Far below float32 round-off nothing can tell them apart: 'same'.
    assert verify_fingerprint(fp, _fc1_noise(mlp, 1e-9)).same


def test_thresholds_are_per_precision(fp, mlp):
    from harmless.errors import InputError

    assert fp.threshold_for(torch.float64) == fp.thresholds["float64"] < 1e-9 < fp.thresholds["float32"]
    # In float64 even a 1e-9 change of the first layer is visible.
    assert not verify_fingerprint(fp, _fc1_noise(copy.deepcopy(mlp).double(), 1e-7)).same
    with pytest.raises(InputError, match="float16"):
        verify_fingerprint(fp, mlp, input_dtype=torch.float16)
    assert verify_fingerprint(fp, mlp, threshold=1e-3).threshold == 1e-3


def test_version_1_fingerprints_still_load_and_keep_their_threshold(fp, mlp, tmp_path):
    old = copy.deepcopy(fp)
    old.version, old.roundoff, old.thresholds, old.gains, old.operator_norm = 1, {}, {}, [], 0.0
    old.threshold = 1e-2
    path = save_fingerprint(old, tmp_path / "v1.safetensors")
    loaded = load_fingerprint(path)
    assert loaded.version == 1 and loaded.thresholds == {} and loaded.threshold == 1e-2
    v = verify_fingerprint(loaded, mlp)
    assert v.threshold == 1e-2 and v.same and v.first_layer_deviation is None
