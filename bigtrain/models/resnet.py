"""ResNet image classifiers (the CNN baselines) from ``transformers``' ``ResNetForImageClassification``.

Sizes come from ``model.widths`` (channels per stage), ``model.depths`` (residual blocks per
stage) and ``model.layer_type`` (``basic``: ResNet-18/34 blocks; ``bottleneck``: ResNet-50+).
ResNet-18 is ``widths: [64, 128, 256, 512], depths: [2, 2, 2, 2]``; ResNet-50 is
``[256, 512, 1024, 2048]``, ``[3, 4, 6, 3]``, ``bottleneck``.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForImageClassification, PreTrainedModel, ResNetConfig

from bigtrain.config import ModelSection
from bigtrain.models.gpt import load_pretrained


def build_resnet(cfg: ModelSection, channels: int, num_classes: int) -> PreTrainedModel:
    """A freshly initialised classifier for ``num_classes`` (seed the RNG first), or ``cfg.pretrained``."""
    if cfg.pretrained:
        model = load_pretrained(AutoModelForImageClassification, cfg.pretrained)
        if model.config.num_labels != num_classes:
            raise ValueError(f"model.pretrained: {cfg.pretrained} classifies {model.config.num_labels} classes, "
                             f"the data has {num_classes}")
        return model
    config = ResNetConfig(num_channels=channels, embedding_size=cfg.widths[0], hidden_sizes=list(cfg.widths),
                          depths=list(cfg.depths), layer_type=cfg.layer_type, num_labels=num_classes)
    return AutoModelForImageClassification.from_config(config, dtype=torch.float32)
