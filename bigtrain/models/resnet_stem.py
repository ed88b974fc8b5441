"""A ResNet with a CIFAR-style stem, as a ``transformers`` model (model type ``bigtrain_resnet``).

transformers' ``ResNetConfig`` always builds the ImageNet stem (7x7 convolution with stride 2, then
a 3x3 max-pool): a 28-32 px image reaches stage 1 at 7-8 px. ``stem: "cifar"`` replaces it with a 3x3
convolution with stride 1 and no pool, so stage 1 keeps the input's resolution. Everything else is
``ResNetForImageClassification``, weights and names included.

This file imports nothing but torch and transformers: ``save_pretrained`` copies it next to the
weights (``auto_map`` in config.json), and
``AutoModelForImageClassification.from_pretrained(DIR, trust_remote_code=True)`` loads the export
without bigtrain installed.
"""

from torch import nn
from transformers import ResNetConfig
from transformers.models.resnet.modeling_resnet import ResNetConvLayer, ResNetForImageClassification

STEMS = ("imagenet", "cifar")


class StemResNetConfig(ResNetConfig):
    """``ResNetConfig`` plus ``stem``: ``imagenet`` (transformers' own) or ``cifar``."""

    model_type = "bigtrain_resnet"

    def __init__(self, stem: str = "cifar", **kwargs):
        if stem not in STEMS:
            raise ValueError(f"stem: expected one of {', '.join(STEMS)} (got {stem!r})")
        self.stem = stem
        super().__init__(**kwargs)


class StemResNetForImageClassification(ResNetForImageClassification):
    """``ResNetForImageClassification`` whose stem follows ``config.stem``."""

    config_class = StemResNetConfig

    def __init__(self, config: StemResNetConfig):
        super().__init__(config)
        if config.stem == "cifar":
            embeddings = self.resnet.embedder
            embeddings.embedder = ResNetConvLayer(config.num_channels, config.embedding_size, kernel_size=3, stride=1,
                                                  activation=config.hidden_act)
            embeddings.pooler = nn.Identity()
            self.post_init()  # initialises the new convolution like the others


StemResNetConfig.register_for_auto_class()
StemResNetForImageClassification.register_for_auto_class("AutoModelForImageClassification")
