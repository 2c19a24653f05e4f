"""The paper's harmless sets beyond the linear prefix (Lemma 1, Lemmas 1.1-1.6, Theorem 2).

* Layer sets ``H^(l)`` at a sample (:mod:`harmless.nonlinear.layer_sets`): :func:`layer_set`
  picks :class:`ZeroSet` (injective layers, Lemma 1.1), :class:`ReluSet` (Lemma 1.2),
  :class:`SoftmaxSet` (Lemma 1.3), :class:`SubspaceSet` (average pooling, Lemma 1.4; linear
  layers), :class:`MaxPoolSet` (Lemma 1.5, not convex); :func:`two_linear_set` (Lemma 1.6).
* Input sets ``P^(l)`` of ReLU networks at a sample (:mod:`harmless.nonlinear.network`):
  :class:`ReluNetwork` / :func:`harmless_set` give the exact convex piece that contains 0
  (:class:`HarmlessPiece`: ``dim``, ``extent``, ``contains``, ``certify``, ``sample``). The
  union over other activation regions is not computed.
* Theorem 2's extremes (:mod:`harmless.nonlinear.extremes`): :func:`extreme_bias_shift` puts a
  chosen ReLU's pre-activations all positive or all non-positive at a sample by a bias shift.
"""

from __future__ import annotations

from harmless.nonlinear.extremes import EXTREMES, BiasShift, extreme_bias_shift
from harmless.nonlinear.layer_sets import (
    INJECTIVE_LAYERS,
    LayerSet,
    MaxPoolSet,
    ReluSet,
    SoftmaxSet,
    SubspaceSet,
    TwoLinearSet,
    ZeroSet,
    layer_set,
    two_linear_set,
)
from harmless.nonlinear.network import OUTPUT_RTOL, Certificate, HarmlessPiece, ReluNetwork, harmless_set

__all__ = [
    "INJECTIVE_LAYERS", "LayerSet", "MaxPoolSet", "ReluSet", "SoftmaxSet", "SubspaceSet", "TwoLinearSet", "ZeroSet",
    "layer_set", "two_linear_set", "OUTPUT_RTOL", "Certificate", "HarmlessPiece", "ReluNetwork", "harmless_set",
    "EXTREMES", "BiasShift", "extreme_bias_shift",
]
