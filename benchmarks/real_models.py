"""Models written the ways people write them: what the engine finds, against a brute-force
oracle, and what its perturbations do to each model's own float64 output.

Run: ``python benchmarks/real_models.py`` (about a minute on 2 cores). The models are the
patterns of ``tests/test_real_models.py`` (timm's BatchNormAct2d stem, inline normalisation,
a functional conv, torchvision's FrozenBatchNorm2d, a ViT patch embedding with class token
and position embedding, a Hugging Face style encoder at ``layer=``, a token-wise MLP at 197
tokens), seeded, untrained. Prints a markdown table.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import test_real_models as patterns

import harmless

F64 = torch.float64


def cases() -> list[tuple[str, torch.nn.Module, tuple[int, ...], str | None, int]]:
    torch.manual_seed(0)
    stem = patterns.MobileNetStem(4, 3)
    patterns._randomise_bn(stem.bn1, torch.Generator().manual_seed(1))
    stem.eval()
    s64 = copy.deepcopy(stem).double()
    bn = s64.bn1
    out = [("timm BatchNormAct2d stem (Hardswish)", stem, (3, 12, 12), None,
            patterns.oracle_dim(lambda x: F.batch_norm(s64.conv_stem(x), bn.running_mean, bn.running_var, bn.weight,
                                                       bn.bias, False, 0.0, bn.eps), (3, 12, 12)))]
    inline = patterns.InlineNormalised("operators").eval()
    i64 = copy.deepcopy(inline).double()
    out.append(("inline (x - mean) / std, then Linear", inline, (3, 4, 4), None,
                patterns.oracle_dim(lambda x: i64.fc(x.reshape(x.shape[0], -1)), (3, 4, 4))))
    fconv = patterns.FunctionalConv().eval()
    w = fconv.weight.detach().double()
    out.append(("F.conv2d(x, w, stride=2)", fconv, (3, 7, 7), None,
                patterns.oracle_dim(lambda x: F.conv2d(x, w, stride=2), (3, 7, 7))))
    frozen = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 2, stride=2, bias=False), patterns.FrozenBatchNorm2d(4),
                                 torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(36, 2)).eval()
    out.append(("conv + torchvision FrozenBatchNorm2d", frozen, (3, 6, 6), None,
                patterns.oracle_dim(copy.deepcopy(frozen[0]).double(), (3, 6, 6))))
    vit = patterns.PatchEmbedViT().eval()
    out.append(("ViT patch embed + cls token + pos embed", vit, (3, 16, 16), None,
                patterns.oracle_dim(copy.deepcopy(vit.proj).double(), (3, 16, 16))))
    bert = patterns.BertLike().eval()
    wb = bert.layer[0].output.dense.weight.detach().double()
    out.append(("HF-style encoder (untraceable), layer.0.output.dense", bert, (5, 8), "layer.0.output.dense",
                patterns.oracle_dim(lambda h: h @ wb.T, (5, 16))))
    mlp = torch.nn.Sequential(torch.nn.Linear(24, 16), torch.nn.GELU(), torch.nn.Linear(16, 3)).eval()
    wm = mlp[0].weight.detach().double()
    out.append(("token-wise Linear, T = 197", mlp, (197, 24), None,
                patterns.oracle_dim(lambda h: h @ wm.T, (197, 24))))
    return out


def main() -> None:
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread; untrained seeded models\n")
    print("| model pattern | run ends | dim (oracle) | method | Δout harmless ×1 | ×10⁴ | Δout random | s |")
    print("|---|---|---:|---|---:|---:|---:|---:|")
    for name, model, shape, layer, truth in cases():
        t0 = time.perf_counter()
        space = harmless.harmless_subspace(model, shape, layer=layer)
        run = space.run
        assert run is not None
        ends = f"{run.stop_kind}" + (" (lower bound)" if space.dim_is_lower_bound else "")
        dim = f"{'≥ ' if space.dim_is_lower_bound else ''}{space.dim} ({truth})"
        if space.dim:
            a, b, c = patterns.measure_on_model(model, space, shape, layer, n=4)
            changes = f"{a:.1e} | {b:.1e} | {c:.2f}"
        else:
            changes = "– | – | –"
        print(f"| {name} | {ends} | {dim} | {space.dim_method} | {changes} | {time.perf_counter() - t0:.1f} |")


if __name__ == "__main__":
    main()
