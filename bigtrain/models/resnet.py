"""ResNet image classifiers (the CNN baselines) from ``transformers``' ``ResNetForImageClassification``.

Sizes come from ``model.preset`` (``resnet18``, ``resnet34``: basic blocks; ``resnet50``:
bottleneck blocks; the torchvision layouts), or from ``model.widths`` (channels per stage),
``model.depths`` (residual blocks per stage) and ``model.layer_type``; ``model.width_mult`` and
``model.depth_mult`` scale either. ``model.stem`` picks the stem: ``imagenet`` (7x7 stride-2
convolution + max-pool, transformers' own: exports as a plain ``resnet``) or ``cifar`` (3x3 stride-1,
no pool, for 28-32 px images: :mod:`bigtrain.models.resnet_stem`, exported with its code);
``auto``: cifar up to 32 px, imagenet above.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification, PreTrainedModel, ResNetConfig

from bigtrain.config import ModelSection
from bigtrain.models.gpt import load_pretrained
from bigtrain.models.resnet_stem import StemResNetConfig, StemResNetForImageClassification

AutoConfig.register(StemResNetConfig.model_type, StemResNetConfig, exist_ok=True)
AutoModelForImageClassification.register(StemResNetConfig, StemResNetForImageClassification, exist_ok=True)

# name -> (stem width, stage widths, blocks per stage, block type): torchvision's ResNets
PRESETS = {
    "resnet18": (64, [64, 128, 256, 512], [2, 2, 2, 2], "basic"),
    "resnet34": (64, [64, 128, 256, 512], [3, 4, 6, 3], "basic"),
    "resnet50": (64, [256, 512, 1024, 2048], [3, 4, 6, 3], "bottleneck"),
}
CIFAR_STEM_MAX_PX = 32  # stem "auto": the CIFAR stem up to this image size


def scaled_width(width: int, mult: float) -> int:
    """``width x mult`` rounded to a multiple of 8 (at least 8); ``width`` itself at mult 1."""
    return width if mult == 1 else max(8, int(round(width * mult / 8)) * 8)


def architecture(cfg: ModelSection, image_size: int) -> dict:
    """The ``ResNetConfig`` keywords (plus ``stem``) that ``cfg`` asks for at ``image_size`` px."""
    if cfg.preset:
        stem_width, widths, depths, layer_type = PRESETS[cfg.preset]
    else:
        stem_width, widths, depths, layer_type = cfg.widths[0], cfg.widths, cfg.depths, cfg.layer_type
    stem = cfg.stem if cfg.stem != "auto" else "cifar" if image_size <= CIFAR_STEM_MAX_PX else "imagenet"
    return {"embedding_size": scaled_width(stem_width, cfg.width_mult),
            "hidden_sizes": [scaled_width(w, cfg.width_mult) for w in widths],
            "depths": [max(1, int(round(d * cfg.depth_mult))) for d in depths], "layer_type": layer_type,
            "downsample_in_first_stage": False, "stem": stem}


def build_resnet(cfg: ModelSection, channels: int, num_classes: int, image_size: int = 224,
                 labels: list[str] | None = None) -> PreTrainedModel:
    """A freshly initialised classifier for ``num_classes`` (seed the RNG first), or ``cfg.pretrained``.
    ``labels``: the class names (``id2label`` of the exported config)."""
    if cfg.pretrained:
        model = load_pretrained(AutoModelForImageClassification, cfg.pretrained)
        if model.config.num_labels != num_classes:
            raise ValueError(f"model.pretrained: {cfg.pretrained} classifies {model.config.num_labels} classes, "
                             f"the data has {num_classes}")
        return model
    arch = architecture(cfg, image_size)
    names = {} if labels is None else {"id2label": dict(enumerate(labels)),
                                       "label2id": {name: i for i, name in enumerate(labels)}}
    kwargs = {"num_channels": channels, "num_labels": num_classes, **names, **arch}
    if kwargs.pop("stem") == "imagenet":
        config = ResNetConfig(**kwargs)
    else:
        config = StemResNetConfig(stem="cifar", **kwargs)
    return AutoModelForImageClassification.from_config(config, dtype=torch.float32)


def to_channels_last(model: nn.Module, weights: bool = True) -> nn.Module:
    """``model`` with a pre-forward hook that gives its images NHWC memory layout, and (``weights``)
    its weights too (``model.channels_last``). The convolutions follow the images' layout either
    way; engines that shard or flatten parameters (FSDP, DeepSpeed) need them contiguous."""
    if weights:
        model.to(memory_format=torch.channels_last)

    def nhwc(_module, args, kwargs):
        if "pixel_values" in kwargs:
            kwargs["pixel_values"] = kwargs["pixel_values"].contiguous(memory_format=torch.channels_last)
        elif args:
            args = (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
        return args, kwargs

    model.register_forward_pre_hook(nhwc, with_kwargs=True)
    return model
