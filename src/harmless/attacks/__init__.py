"""Adversarial attacks, batched, in float32 and float64, Foolbox-3 style: configure once, call
on data, get one :class:`AttackResult`::

    attack = harmless.attacks.PGD(eps=8 / 255, steps=10, norm="inf")
    result = attack(model, x, y, generator=torch.Generator().manual_seed(0))
    result.x_adv, result.delta, result.success, result.y_pred

FGSM and PGD (L∞, L2) have a fixed budget ``eps``; DeepFool and Carlini–Wagner L2 look for
the smallest L2 perturbation that changes the prediction. :class:`SmallestEquivalent` maps any
adversarial example to the image nearest ``x`` that the model cannot tell from it.
"""

from __future__ import annotations

from harmless.attacks.base import Attack, AttackResult
from harmless.attacks.cw import CarliniWagnerL2
from harmless.attacks.deepfool import DeepFool
from harmless.attacks.gradient import FGSM, PGD
from harmless.attacks.harmless_view import EquivalenceReport, equivalent_check, harmless_fraction
from harmless.attacks.smallest import LPCertificate, SmallestEquivalent, SmallestEquivalentResult
from harmless.attacks.universal import PassRecord, SGDUniversal, UniversalPerturbation, UniversalResult, fooling_rate

__all__ = ["Attack", "AttackResult", "CarliniWagnerL2", "DeepFool", "EquivalenceReport", "FGSM", "LPCertificate", "PGD",
           "SmallestEquivalent", "SmallestEquivalentResult", "equivalent_check", "harmless_fraction",
           # universal perturbations (harmless.attacks.universal)
           "PassRecord", "SGDUniversal", "UniversalPerturbation", "UniversalResult", "fooling_rate"]
