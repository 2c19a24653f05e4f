"""Models written the ways people write them (timm, torchvision, Hugging Face, hand-written
code), each against a brute-force dense oracle at a small size.

The oracle never uses :mod:`harmless.linalg`: the true linear part of each model's prefix is
written out by hand below (as a float64 function of the input), its matrix is built by
applying it to every basis vector, and its rank comes from NumPy. Every perturbation the
library hands out is then run through the model itself in float64: it must change the output
by a relative 1e-9 or less, while random perturbations of the same size change it by order 1.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from oracle import engine_settings, single_torch_thread  # noqa: F401  (fixture)
from torch import nn

import harmless
from harmless.cli import main
from harmless.errors import NoHarmlessSubspaceError, UnsupportedLayerError, VerificationError

F64 = torch.float64


# ---------------------------------------------------------------------------------------
# The oracle and the end-to-end check
# ---------------------------------------------------------------------------------------
def oracle_dim(linear_part: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...]) -> int:
    """``n - rank`` of the affine map ``linear_part`` (float64), by brute force."""
    n = math.prod(shape)
    with torch.no_grad():
        eye = torch.eye(n, dtype=F64).reshape(n, *shape)
        cols = linear_part(eye) - linear_part(torch.zeros(1, *shape, dtype=F64))
    return n - int(np.linalg.matrix_rank(cols.reshape(n, -1).numpy()))


def output_of(out: Any) -> torch.Tensor:
    if dataclasses.is_dataclass(out):
        out = out.last_hidden_state
    if isinstance(out, dict):
        out = out["last_hidden_state"]
    if isinstance(out, tuple):
        out = out[0]
    return out


def measure_on_model(model: nn.Module, space: harmless.HarmlessSubspace, shape: tuple[int, ...],
                     layer: str | None = None, n: int = 3) -> tuple[float, float, float]:
    """On ``n`` random inputs, with the float64 model: the largest relative output change under
    perturbations from ``space`` of 1 and 10^4 times the size of the input at the analysed
    point (the model's input, or ``layer``'s), and the smallest under random ones of size 1."""
    m64 = copy.deepcopy(model).double().eval()
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(n, *shape, generator=gen, dtype=F64)
    d = space.sample(n, generator=gen).to(F64)
    rand = torch.randn(n, *space.input_shape, generator=gen, dtype=F64)
    view = (-1,) + (1,) * len(space.input_shape)
    rand = rand / rand.reshape(n, -1).norm(dim=1).view(view)
    seen: list[torch.Tensor] = []

    def at_layer(delta: torch.Tensor | None):
        def hook(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
            if delta is None:
                seen.append(args[0].clone())  # the layer's own input: the size reference
                return None
            return (args[0] + delta, *args[1:])
        return hook

    def run(delta: torch.Tensor | None) -> torch.Tensor:
        if layer is None:
            return output_of(m64(x if delta is None else x + delta)).reshape(n, -1)
        handle = m64.get_submodule(layer).register_forward_pre_hook(at_layer(delta))
        try:
            return output_of(m64(x)).reshape(n, -1)
        finally:
            handle.remove()

    with torch.no_grad():
        base = run(None)
        size = (x if layer is None else seen[0]).reshape(n, -1).norm(dim=1)
        rel = [float(((run(d * (s * size).view(view)) - base).norm(dim=1) / base.norm(dim=1)).max())
               for s in (1.0, 1e4)]
        ctrl = float(((run(rand * size.view(view)) - base).norm(dim=1) / base.norm(dim=1)).min())
    return rel[0], rel[1], ctrl


def assert_harmless_on_model(model: nn.Module, space: harmless.HarmlessSubspace, shape: tuple[int, ...],
                             layer: str | None = None) -> None:
    """Perturbations from ``space`` (at 1 and 10^4 times the input's size) leave the float64
    model's output unchanged to 1e-9 (relative); random ones of the same size change it."""
    small, large, control = measure_on_model(model, space, shape, layer)
    assert small <= 1e-9 and large <= 1e-9, f"a harmless perturbation changed the output by {small:.1e} / {large:.1e}"
    assert control > 1e-3, "the control must move the output"


# ---------------------------------------------------------------------------------------
# Models in the patterns of timm, torchvision, Hugging Face and hand-written code
# ---------------------------------------------------------------------------------------
class BatchNormAct2d(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d``: a ``BatchNorm2d`` subclass that applies an activation."""

    def __init__(self, channels: int, act: type[nn.Module] = nn.SiLU) -> None:
        super().__init__(channels)
        self.drop = nn.Identity()
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, "expected a 4-D input")
        factor = 0.0 if self.momentum is None else self.momentum
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(x, self.running_mean if not self.training or self.track_running_stats else None,
                         self.running_var if not self.training or self.track_running_stats else None,
                         self.weight, self.bias, bn_training, factor, self.eps)
        return self.act(self.drop(x))


class MobileNetStem(nn.Module):
    """MobileNetV3/EfficientNet's stem: conv, then BatchNormAct2d with Hardswish."""

    def __init__(self, out_channels: int = 16, stride: int = 2) -> None:
        super().__init__()
        self.conv_stem = nn.Conv2d(3, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = BatchNormAct2d(out_channels, nn.Hardswish)
        self.classifier = nn.Linear(out_channels, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.bn1(self.conv_stem(x)).mean((2, 3)))


def _randomise_bn(bn: nn.BatchNorm2d, gen: torch.Generator) -> None:
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
        bn.weight.copy_(torch.randn(bn.num_features, generator=gen))
        bn.bias.copy_(torch.randn(bn.num_features, generator=gen))


@pytest.mark.parametrize("out_channels,stride,truth_dim_positive", [(16, 2, False), (4, 3, True)])
def test_batchnorm_subclass_with_activation_is_never_taken_for_batchnorm(
        out_channels: int, stride: int, truth_dim_positive: bool) -> None:
    torch.manual_seed(0)
    model = MobileNetStem(out_channels, stride)
    _randomise_bn(model.bn1, torch.Generator().manual_seed(1))
    model.eval()
    shape = (3, 12, 12)
    m64 = copy.deepcopy(model).double()
    truth = oracle_dim(lambda x: F.batch_norm(m64.conv_stem(x), m64.bn1.running_mean, m64.bn1.running_var,
                                              m64.bn1.weight, m64.bn1.bias, False, 0.0, m64.bn1.eps), shape)
    space = harmless.harmless_subspace(model, shape)
    assert space.dim == truth and (truth > 0) == truth_dim_positive
    assert space.run is not None and space.run.complete
    assert "Hardswish" in (space.run.stopped_at or "") and "not linear" in space.run.stop_reason
    assert [r.kind for r in space.run.layers][:2] == ["Conv2d", "batch_norm"]
    if truth:
        assert_harmless_on_model(model, space, shape)
    else:
        with pytest.raises(NoHarmlessSubspaceError, match="injective"):
            space.sample(1)


class InlineNormalised(nn.Module):
    """``forward`` normalises by hand, in one of the ways people write it."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.fc = nn.Linear(3 * 4 * 4, 20)
        self.head = nn.Linear(20, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "operators":
            x = (x - self.mean) / self.std
        elif self.how == "methods":
            x = x.sub(self.mean).div(self.std)
        elif self.how == "torch":
            x = torch.div(torch.sub(x, self.mean), self.std)
        elif self.how == "scale-shift":
            x = x * (1.0 / self.std) + (-self.mean / self.std)
        elif self.how == "negate":
            x = -x + 1.0
        x = x.reshape(x.shape[0], -1).contiguous()
        return self.head(torch.relu(self.fc(x)))


@pytest.mark.parametrize("how", ["operators", "methods", "torch", "scale-shift", "negate"])
def test_inline_normalisation_is_traced_through(how: str) -> None:
    torch.manual_seed(1)
    model = InlineNormalised(how).eval()
    shape = (3, 4, 4)
    m64 = copy.deepcopy(model).double()
    truth = oracle_dim(lambda x: m64.fc(x.reshape(x.shape[0], -1)), shape)  # normalisation is bijective
    space = harmless.harmless_subspace(model, shape)
    assert truth == 48 - 20 and space.dim == truth
    assert space.run is not None and space.run.complete and space.run.layers[-1].kind == "Linear"
    assert_harmless_on_model(model, space, shape)


class FunctionalConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 3, 3, 3))
        self.head = nn.Linear(6 * 3 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight, stride=2)
        return self.head(F.relu(x).flatten(1))


def test_functional_first_layer_gives_the_true_dimension() -> None:
    torch.manual_seed(2)
    model = FunctionalConv().eval()
    shape = (3, 7, 7)
    w = model.weight.detach().double()
    truth = oracle_dim(lambda x: F.conv2d(x, w, stride=2), shape)
    space = harmless.harmless_subspace(model, shape)
    assert truth > 0 and space.dim == truth and space.run is not None and space.run.complete
    assert_harmless_on_model(model, space, shape)


class FrozenBatchNorm2d(nn.Module):
    """torchvision's FrozenBatchNorm2d (buffers only, its own forward)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(4)
        self.register_buffer("weight", torch.randn(n, generator=gen))
        self.register_buffer("bias", torch.randn(n, generator=gen))
        self.register_buffer("running_mean", torch.randn(n, generator=gen))
        self.register_buffer("running_var", torch.rand(n, generator=gen) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + 1e-5).rsqrt()
        bias = b - rm * scale
        return x * scale + bias


def test_torchvision_frozen_batchnorm_is_folded() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 2, stride=2, bias=False), FrozenBatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 3 * 3, 2)).eval()
    shape = (3, 6, 6)
    conv = copy.deepcopy(model[0]).double()
    truth = oracle_dim(conv, shape)
    space = harmless.harmless_subspace(model, shape)
    assert space.dim == truth == 108 - 36 and space.dim_method == "structure"
    assert space.run is not None and space.run.complete and len(space.run.layers) >= 3
    assert_harmless_on_model(model, space, shape)


class TanhLinear(nn.Linear):
    """Looks like a Linear (a subclass), but its forward is not affine."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(super().forward(x))


class BatchNorm1d(nn.Module):
    """Named like a known layer, not one: it squares its input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


class UnknownAffine(nn.Module):
    """Affine, but through a call the engine does not represent (``torch.addmm``)."""

    def __init__(self, n: int, m: int, gen: torch.Generator) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(m, n, generator=gen))
        self.bias = nn.Parameter(torch.randn(m, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x, self.weight.T)


def test_modules_that_look_known_but_are_not_affine() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(TanhLinear(8, 3), nn.Linear(3, 2)).eval()
    space = harmless.harmless_subspace(model, (8,))
    w = model[0].weight.detach().double()
    assert space.dim == oracle_dim(lambda x: x @ w.T, (8,)) == 5
    assert space.run is not None and space.run.complete and "tanh" in (space.run.stopped_at or "")
    assert_harmless_on_model(model, space, (8,))

    squaring = nn.Sequential(BatchNorm1d(), nn.Linear(8, 2)).eval()
    run = harmless.linear_run(squaring, (8,))
    assert run.layers == [] and run.stop_kind == "nonlinear" and "not affine" in run.stop_reason


def test_unknown_affine_step_shortens_the_run_and_says_so() -> None:
    gen = torch.Generator().manual_seed(6)
    model = nn.Sequential(nn.Linear(8, 6), UnknownAffine(6, 3, gen), nn.ReLU(), nn.Linear(3, 2)).eval()
    space = harmless.harmless_subspace(model, (8,))
    m64 = copy.deepcopy(model).double()
    truth = oracle_dim(lambda x: m64[1](m64[0](x)), (8,))
    assert truth == 5 and space.dim == 2 < truth  # shorter, never larger
    assert space.dim_is_lower_bound and space.run is not None and space.run.stop_kind == "unsupported"
    assert "addmm" in (space.run.stopped_at or "")
    assert_harmless_on_model(model, space, (8,))


class OptionalArguments(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(10, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> Any:
        if attn_mask is not None:
            x = x + attn_mask
        return self.head(F.gelu(self.fc(x)))


def test_forward_with_optional_arguments_is_traced_with_their_defaults() -> None:
    torch.manual_seed(7)
    model = OptionalArguments().eval()
    space = harmless.harmless_subspace(model, (10,))
    assert space.dim == 6
    sub = harmless.harmless_subspace(model, (10,), layer="head")
    assert sub.dim == 2 and sub.input_shape == (4,)
    assert_harmless_on_model(model, space, (10,))


class PatchEmbedViT(nn.Module):
    """timm's ViT front end: patchify conv, flatten/transpose, class token, position embedding."""

    def __init__(self, img: int = 16, patch: int = 4, dim: int = 24) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, (img // patch) ** 2 + 1, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        x = x + self.fc(self.norm1(x))  # a residual block
        return self.head(x.mean(1))


def test_vit_patch_embedding_with_class_token_and_position_embedding() -> None:
    torch.manual_seed(8)
    model = PatchEmbedViT().eval()
    shape = (3, 16, 16)
    proj = copy.deepcopy(model.proj).double()
    truth = oracle_dim(proj, shape)  # the class token and the embedding are an injective affine map after it
    space = harmless.harmless_subspace(model, shape)
    assert truth == 16 * (48 - 24) and space.dim == truth and space.dim_method == "structure"
    assert [r.kind for r in space.run.layers] == ["Conv2d", "flatten", "transpose", "cat", "add"]  # type: ignore[union-attr]
    # The run ends at the residual branch: every element is harmless, and the tool says the
    # subspace could be larger (here it is not, but the analysis cannot show that).
    assert space.dim_is_lower_bound and space.run is not None and space.run.stop_kind == "branch"
    assert_harmless_on_model(model, space, shape)


class BertOutput(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.dense = nn.Linear(inter, hidden)
        self.dropout = nn.Dropout(0.1)
        self.LayerNorm = nn.LayerNorm(hidden)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertLayer(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.intermediate = nn.Linear(hidden, inter)
        self.act = nn.GELU()
        self.output = BertOutput(hidden, inter)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_attentions: bool = False) -> tuple[torch.Tensor, ...]:
        out = self.output(self.act(self.intermediate(hidden_states)), hidden_states)
        return (out, None) if output_attentions else (out,)


@dataclasses.dataclass
class EncoderOutput:
    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...]


class BertLike(nn.Module):
    """Hugging Face style: a ModuleList of layers, a dataclass output, and code torch.fx
    cannot trace as a whole (it iterates over a value computed from the input's shape)."""

    def __init__(self, hidden: int = 8, inter: int = 16, layers: int = 2) -> None:
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(hidden, inter) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        states = ()
        for _ in range(x.shape[1]):  # fx: a Proxy cannot be used in range()
            pass
        for layer in self.layer:
            x = layer(x)[0]
            states = states + (x,)
        return EncoderOutput(x, states)


def test_bert_style_encoder_at_layer_the_output_linear() -> None:
    torch.manual_seed(9)
    model = BertLike().eval()
    tokens, shape = 5, (5, 8)
    with pytest.raises(UnsupportedLayerError, match="cannot trace"):
        harmless.harmless_subspace(model, shape)
    layer = "layer.0.output.dense"
    space = harmless.harmless_subspace(model, shape, layer=layer)
    w = model.layer[0].output.dense.weight.detach().double()
    truth = oracle_dim(lambda h: h @ w.T, (tokens, 16))
    assert truth == tokens * (16 - 8) and space.dim == truth and space.input_shape == (tokens, 16)
    assert space.dim_method == "structure"
    assert space.run is not None and "layer.0.output" in space.run.scope and space.run.complete
    assert_harmless_on_model(model, space, shape, layer=layer)
    # A dataclass output is compared through its last_hidden_state (or output=).
    assert space.model_check is not None and space.model_check.passed


def test_tokenwise_linear_at_197_tokens_has_an_exact_dimension_without_a_dense_matrix() -> None:
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(24, 16), nn.GELU(), nn.Linear(16, 3)).eval()
    space = harmless.harmless_subspace(model, (197, 24), dense_limit=1000)
    w = model[0].weight.detach().double()
    truth = oracle_dim(lambda h: h @ w.T, (197, 24))
    assert truth == 197 * 8 and space.dim == truth and space.dim_method == "structure"
    assert_harmless_on_model(model, space, (197, 24))


def test_torchscript_is_refused_in_one_honest_line(tmp_path, capsys) -> None:
    model = torch.jit.script(nn.Sequential(nn.Linear(6, 3), nn.ReLU()).eval())
    with pytest.raises(UnsupportedLayerError, match="TorchScript"):
        harmless.harmless_subspace(model, (6,))
    path = tmp_path / "m.pt"
    model.save(str(path))
    assert main(["analyze", str(path), "--input-shape", "6"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([e for e in err if e.startswith("harmless: error:")]) == 1 and "TorchScript" in err[-1]


class DiffersFromItsTrace(nn.Module):
    """Computes something else when torch.fx traces it than when it runs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.fx._symbolic_trace.is_fx_tracing():
            x = x + x.roll(1, dims=1)  # not what the trace saw
        return torch.relu(self.fc(x))


def test_a_model_that_differs_from_its_trace_is_refused_not_answered() -> None:
    torch.manual_seed(11)
    space = harmless.harmless_subspace(DiffersFromItsTrace().eval(), (6,))
    with pytest.raises(VerificationError, match="changed by a relative"):
        space.sample(1)
    with pytest.raises(VerificationError):
        space.project(torch.randn(2, 6, dtype=F64))


def test_output_selection_for_tuples_and_dicts() -> None:
    class TupleOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> Any:
            h = torch.relu(self.fc(x))
            return {"features": h, "logits": h.sum(1, keepdim=True)}

    torch.manual_seed(12)
    model = TupleOut().eval()
    for output in (None, "features", lambda out: out["logits"]):
        space = harmless.harmless_subspace(model, (6,), output=output)
        space.sample(1)
        assert space.model_check is not None and space.model_check.passed
    with pytest.raises(harmless.InputError, match="selects nothing"):
        harmless.harmless_subspace(model, (6,), output="nope").sample(1)


def test_sample_is_bounded_when_no_rank_is_known(monkeypatch) -> None:
    """An injective prefix whose rank cannot be computed: sample() answers within a few
    rounds, says what is known, and does not call it injective."""
    from harmless.errors import TooLargeError

    def too_large(self: Any) -> Any:
        raise TooLargeError("no exact rank method fits (simulated)")

    monkeypatch.setattr(harmless.HarmlessSubspace, "rank_info", property(too_large))
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU()).eval()
    space = harmless.harmless_subspace(model, (4,), dense_limit=1)
    with pytest.raises(NoHarmlessSubspaceError, match="evidence, not a certificate") as exc:
        space.sample(2)
    assert "max(0, n - m) = 0" in str(exc.value)


def test_analyze_prints_steps_defects_and_an_honest_headline(tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "realmodels.py").write_text(
        "import torch\nfrom torch import nn\n"
        "class M(nn.Module):\n"
        "    def __init__(self):\n        super().__init__(); self.conv = nn.Conv2d(3, 4, 2, stride=2)\n"
        "        self.register_buffer('m', torch.tensor(0.5))\n"
        "    def forward(self, x):\n        x = self.conv((x - self.m) * 2.0)\n"
        "        return x + torch.tanh(x)\n"
        "def build():\n    torch.manual_seed(0)\n    return M().eval()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["analyze", "realmodels:build", "--input-shape", "3,6,6"]) == 0
    out = capsys.readouterr().out
    for step in ("sub", "mul", "conv"):
        assert f"  {step} " in out
    assert "stops at conv (Conv2d): its result is read by 2 later layers (a branch)" in out
    headline = next(line for line in out.splitlines() if line.startswith("input-level harmless subspace"))
    assert "dim >= 72 of 108" in headline and "may be larger" in headline and "injective" not in headline


# ---------------------------------------------------------------------------------------
# Random compositions of supported, unsupported and activation-carrying layers
# ---------------------------------------------------------------------------------------
class LinearReLU(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x))


class BatchNormAct1d(nn.BatchNorm1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(super().forward(x))


class ScaleShift(nn.Module):
    def __init__(self, n: int, gen: torch.Generator) -> None:
        super().__init__()
        self.register_buffer("s", torch.randn(n, generator=gen))
        self.register_buffer("b", torch.randn(n, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.s - self.b


#: name -> (affine?, whether it ends the affine prefix after its affine part)
_KINDS = ["linear", "linear_deficient", "batchnorm", "scale_shift", "dropout", "unknown_affine", "relu",
          "linear_relu", "bn_act", "tanh"]


def _layer(kind: str, n: int, gen: torch.Generator) -> tuple[nn.Module, int, bool, bool]:
    """(module, out features, its affine part is known to the truth, the affine prefix ends inside it)."""
    if kind in ("linear", "linear_deficient", "linear_relu", "unknown_affine"):
        m = int(torch.randint(1, 9, (1,), generator=gen))
        layer: nn.Module
        if kind == "unknown_affine":
            return UnknownAffine(n, m, gen), m, True, False
        layer = LinearReLU(n, m) if kind == "linear_relu" else nn.Linear(n, m)
        with torch.no_grad():
            layer.weight.copy_(torch.randint(-3, 4, (m, n), generator=gen).double())
            if kind == "linear_deficient" and m > 1:
                layer.weight[-1] = layer.weight[0] * 2 - layer.weight[1 % m]
        return layer, m, True, kind == "linear_relu"
    if kind in ("batchnorm", "bn_act"):
        bn = BatchNormAct1d(n) if kind == "bn_act" else nn.BatchNorm1d(n)
        with torch.no_grad():
            bn.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            bn.weight.copy_(torch.randn(n, generator=gen))
        return bn, n, True, kind == "bn_act"
    if kind == "scale_shift":
        return ScaleShift(n, gen), n, True, False
    if kind == "dropout":
        return nn.Dropout(0.5), n, True, False
    return (nn.ReLU() if kind == "relu" else nn.Tanh()), n, False, True


@engine_settings(25)
@given(kinds=st.lists(st.sampled_from(_KINDS), min_size=1, max_size=5), n=st.integers(2, 8),
       seed=st.integers(0, 10_000))
def test_random_compositions_never_exceed_the_truth(kinds: list[str], n: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    layers, truth_layers, width, ended = [], [], n, False
    for kind in kinds:
        layer, width, affine, ends = _layer(kind, width, gen)
        layers.append(layer)
        if not ended:
            if affine:
                truth_layers.append((layer, ends))
            ended = ends or not affine
    model = nn.Sequential(*layers).eval()
    m64 = copy.deepcopy(model).double()

    def truth_fn(x: torch.Tensor) -> torch.Tensor:
        for (layer, ends), copy_ in zip(truth_layers, m64):
            if isinstance(copy_, LinearReLU):
                x = F.linear(x, copy_.weight, copy_.bias)
            elif isinstance(copy_, BatchNormAct1d):
                x = nn.BatchNorm1d.forward(copy_, x)
            else:
                x = copy_(x)
        return x

    truth = oracle_dim(truth_fn, (n,))
    space = harmless.harmless_subspace(model, (n,))
    assert space.dim <= truth, f"{kinds}: {space.dim} > truth {truth}"
    assert space.run is not None
    if space.run.complete:
        assert space.dim == truth, f"{kinds}: a complete run must give the truth"
    else:
        assert space.run.stop_reason and space.dim_is_lower_bound
    if space.dim:
        d = space.sample(2, generator=torch.Generator().manual_seed(seed))
        x = torch.rand(2, n, dtype=F64)
        with torch.no_grad():
            base, moved = m64(x), m64(x + 1e3 * d)
        assert torch.allclose(moved, base, rtol=0, atol=1e-9 * (1 + float(base.abs().max())))


def test_contains_follows_the_perturbations_precision() -> None:
    """A harmless float64 perturbation rounded to float32 is still harmless to float32
    precision; a random float32 perturbation is not (issue 11, item 8)."""
    torch.manual_seed(13)
    space = harmless.harmless_subspace(nn.Sequential(nn.Linear(12, 5), nn.ReLU()).eval(), (12,))
    d = space.sample(4)
    assert bool(space.contains(d).all())
    assert bool(space.contains(d.float()).all())
    assert not bool(space.contains(torch.randn(4, 12)).any())
    assert not bool(space.contains(d.float(), rtol=1e-12).all())  # an explicit rtol is taken as given


def test_fingerprints_work_behind_inline_normalisation_and_never_call_a_stopped_run_injective() -> None:
    from harmless.fingerprint import create_fingerprint, verify_fingerprint

    torch.manual_seed(14)
    model = InlineNormalised("operators").eval()
    probes = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    fp = create_fingerprint(model, (3, 4, 4), probes, k=2)
    assert fp.harmless_dim == 28 and verify_fingerprint(fp, model).same

    class Skip(nn.Module):  # the input is read twice: the run is empty, and says why
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x + self.fc(x))

    with pytest.raises(NoHarmlessSubspaceError, match="stopped early") as exc:
        create_fingerprint(Skip().eval(), (6,), torch.rand(2, 6), k=2)
    assert "injective" not in str(exc.value)
