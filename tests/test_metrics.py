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
    x = torch.rand(10, 1, 2, 2, dtype=torch.float64)
    y = model(x).argmax(1)
    assert delta_accuracy(model, x, x.clone(), y) == 0.0


def _lpips_or_skip():
    from harmless.errors import DataUnavailableError
    from harmless.metrics.perceptual import LPIPS

    try:
        return LPIPS("alex")
    except DataUnavailableError as exc:  # offline and not cached
        pytest.skip(str(exc))


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


def test_lpips_heads_equal_official():
    from harmless.errors import DataUnavailableError
    from harmless.metrics.perceptual import official_heads

    model = _lpips_or_skip()
    try:
        ref = official_heads("alex")
    except DataUnavailableError as exc:
        pytest.skip(str(exc))
    for ours, theirs in zip(model.heads, ref):
        assert torch.equal(ours.detach(), theirs)
