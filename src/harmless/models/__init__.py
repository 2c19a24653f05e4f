"""Models: the zoo's architectures, their specs, training/caching, and loading user models.

* :mod:`harmless.models.zoo`: ``MLP5``, ``LeNet``, ``resnet18``, ``resnet50``, ``vgg16``
  (every one starts ``Normalize`` -> first linear layer; see its docstring for module names).
* :mod:`harmless.models.registry`: ``parse_spec("resnet18:cifar10,stem_stride=8")``.
* :mod:`harmless.models.train`: ``get_model``, ``train_zoo_model``, ``list_zoo``.
* :mod:`harmless.models.loading`: ``load_model`` (zoo spec, TorchScript file or
  ``package.module:factory`` + weights), ``describe_model``.
"""

from __future__ import annotations

from harmless.models.checkpoint import CheckpointWarning, checkpoint_paths
from harmless.models.loading import (
    TrainingModeWarning,
    apply_state_dict,
    describe_model,
    load_model,
    load_state_dict_file,
)
from harmless.models.registry import (
    DATASETS,
    ZOO,
    DatasetInfo,
    ModelSpec,
    TrainConfig,
    build_model,
    is_zoo_spec,
    parse_spec,
    zoo_names,
)
from harmless.models.train import (
    TrainedModel,
    ZooRow,
    evaluate,
    get_model,
    list_zoo,
    train_loop,
    train_zoo_model,
)
from harmless.models.zoo import MLP5, VGG, LeNet, ResNet, first_layer, resnet18, resnet50, vgg16

__all__ = [
    "DATASETS",
    "ZOO",
    "CheckpointWarning",
    "DatasetInfo",
    "LeNet",
    "MLP5",
    "ModelSpec",
    "ResNet",
    "TrainConfig",
    "TrainedModel",
    "TrainingModeWarning",
    "VGG",
    "ZooRow",
    "apply_state_dict",
    "build_model",
    "checkpoint_paths",
    "describe_model",
    "evaluate",
    "first_layer",
    "get_model",
    "is_zoo_spec",
    "list_zoo",
    "load_model",
    "load_state_dict_file",
    "parse_spec",
    "resnet18",
    "resnet50",
    "train_loop",
    "train_zoo_model",
    "vgg16",
    "zoo_names",
]
