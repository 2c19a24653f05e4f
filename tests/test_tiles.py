import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from harmless.errors import InputError
from harmless.nn import Normalize
from harmless.privacy import AffineBoxProjector, DecoyPrivatizer
from harmless.privacy.tiles import tiling


def _stem_model(tile, channels=4, padding=0, stride=None, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        Normalize((0.4, 0.5, 0.6), (0.2, 0.3, 0.25)),
        nn.Conv2d(3, channels, tile, stride=stride or tile, padding=padding, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),  # any image size, a single tile included
        nn.Flatten(),
        nn.Linear(channels, 3),
    )


def _ready(model, shape):
    return model.double().eval()


@settings(max_examples=10, deadline=None)
@given(tile=st.integers(2, 5), rows=st.integers(1, 3), cols=st.integers(1, 3), channels=st.integers(1, 20),
       seed=st.integers(0, 1000))
def test_split_merge_round_trip_and_dimension(tile, rows, cols, channels, seed):
    shape = (3, rows * tile, cols * tile)
    model = _ready(_stem_model(tile, channels, seed=seed), shape)
    t = tiling(model, shape, tile)
    x = torch.rand(2, *shape, dtype=torch.float64)
    assert torch.equal(t.merge(t.split(x)), x)
    assert t.split(x).shape == (2 * rows * cols, 3, tile, tile)
    assert t.whole.dim == rows * cols * t.part.dim
    # the split agrees with torch's own window extraction (row-major over the grid)
    windows = torch.nn.functional.unfold(x, tile, stride=tile).transpose(1, 2).reshape(-1, 3 * tile * tile)
    assert torch.equal(windows, t.split(x).reshape(-1, 3 * tile * tile))


def test_tiled_projection_equals_the_whole_image_projection():
    """The oracle: the same QP solved on the whole 3x14x14 image with its dense factorisation."""
    shape, tile = (3, 14, 14), 7
    model = _ready(_stem_model(tile, channels=40), shape)
    t = tiling(model, shape, tile)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(3, *shape, generator=gen, dtype=torch.float64)
    x[:, :, :4] = 0.0  # a black band, as in real photos' shadows: pinned pixels
    x0 = x.clone()
    target = torch.rand(3, *shape, generator=gen, dtype=torch.float64) * 1.4 - 0.2
    project = AffineBoxProjector()
    whole_result, tiled_result = project(t.whole, x, target), project(t.part, t.split(x), t.split(target))
    whole, info_whole = whole_result.y, whole_result.info
    tiled, info_tiles = t.merge(tiled_result.y), tiled_result.info
    assert torch.equal(x, x0)
    bound = (info_tiles.distance_bound ** 2).reshape(3, -1).sum(1).sqrt() + info_whole.distance_bound
    assert float((tiled - whole).flatten(1).norm(dim=1).sub(bound).max()) <= 1e-6
    assert float(tiled.min()) >= -1e-12 and float(tiled.max()) <= 1 + 1e-12
    with torch.no_grad():
        assert float((model(tiled) - model(x)).abs().max()) <= 1e-10


def test_tiled_privatisation_is_harmless_for_the_whole_model():
    shape, tile = (3, 21, 14), 7
    model = _ready(_stem_model(tile, channels=64), shape)
    t = tiling(model, shape, tile)
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    r = DecoyPrivatizer(decoy="grey")(t.part, t.split(x))
    x_hat = t.merge(r.x_hat)
    assert float(r.mse.mean()) > 1e-3  # it does move the images
    assert float(t.whole.harmful_residual(x_hat - x).max()) <= 1e-12
    with torch.no_grad():
        assert float((model(x_hat) - model(x)).abs().max()) <= 1e-10


@pytest.mark.parametrize(("make", "shape", "tile", "match"), [
    (lambda: _stem_model(7, padding=3), (3, 14, 14), 7, "does not split"),          # padded stem
    (lambda: _stem_model(7, stride=6), (3, 14, 14), 7, "does not split"),           # overlapping windows
    (lambda: nn.Sequential(nn.Flatten(), nn.Linear(3 * 14 * 14, 20)), (3, 14, 14), 7, "does not split"),
    (lambda: _stem_model(7), (3, 15, 14), 7, "do not divide"),
    (lambda: _stem_model(7), (3, 14), 7, "image_shape"),
    (lambda: _stem_model(7), (3, 14, 14), 0, "tile"),
    (lambda: _stem_model(7), (3, 14, 14), 7.0, "tile"),
])
def test_bad_tilings(make, shape, tile, match):
    model = make().double().eval()
    with pytest.raises(InputError, match=match):
        tiling(model, shape, tile)


def test_split_and_merge_check_shapes():
    shape = (3, 14, 14)
    t = tiling(_ready(_stem_model(7), shape), shape, 7)
    with pytest.raises(InputError, match="images must have shape"):
        t.split(torch.rand(2, 3, 14, 7, dtype=torch.float64))
    with pytest.raises(InputError, match="tiles must have shape"):
        t.merge(torch.rand(3, 3, 7, 7, dtype=torch.float64))


def test_tiling_needs_only_the_prefix_to_run_on_a_tile() -> None:
    # a patchify stem with a classifier sized for the whole image: the head cannot run on a
    # tile, the prefix (the convolution) can, and splits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 7, stride=7), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 10)).eval()
    t = tiling(model, (1, 28, 28), 7)
    assert t.tiles_per_image == 16 and t.whole.dim == 16 * t.part.dim == 16 * (49 - 8)


def test_tiling_a_linear_first_layer_says_so() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    with pytest.raises(InputError, match=r"layer 1 \(Linear\) reads the whole image") as err:
        tiling(model, (1, 28, 28), 7)
    assert "mat1" not in str(err.value)


def test_tiling_a_zoo_model_with_stem_padding_0() -> None:
    from harmless.models import build_model

    t = tiling(build_model("resnet18:stem_kernel=4,stem_stride=4,stem_padding=0,stem_channels=16"), (3, 32, 32), 4)
    assert t.whole.dim == 64 * t.part.dim == 64 * (48 - 16)
    with pytest.raises(InputError, match="does not split"):  # the default padding (kernel // 2) overlaps
        tiling(build_model("resnet18:stem_kernel=4,stem_stride=4,stem_channels=16"), (3, 32, 32), 4)
