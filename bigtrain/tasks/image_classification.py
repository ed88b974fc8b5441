"""``task: image_classification``: CNN baselines (ResNet) on labelled image sets.

``data.path`` holds ``train/`` and ``val/`` image sets (``bigtrain/data/images.py``: uint8 arrays +
manifest), written by ``data.download: digits|synthetic-images`` when missing. Training images
are augmented (random crop with reflect padding, flip; ``data.augment``) from (seed, position);
both splits are normalized with the train set's per-channel statistics.
"""

from __future__ import annotations

import torch
from torch import nn

from bigtrain.data.images import ImageStream, image_splits, open_images
from bigtrain.models import build_resnet, training_flops
from bigtrain.tasks.base import ClassificationTask


class ImageClassificationTask(ClassificationTask):
    auto_class = "AutoModelForImageClassification"

    @staticmethod
    def logits_and_labels(model, batch):
        return model(pixel_values=batch["images"]).logits.float(), batch["labels"]

    def prepare(self) -> None:
        data = self.cfg.data
        splits = self.on_main(lambda: {k: str(v) for k, v in image_splits(data.path, data.download, self.log).items()})
        self.train_root, self.val_root = splits["train"], splits.get("val")
        self.manifest = open_images(self.train_root)

    def stream(self, root: str, global_batch: int, train: bool) -> ImageStream:
        cfg, info = self.cfg, self.info
        return ImageStream(root, global_batch, cfg.train.micro_batch_size, info.rank, info.world_size, cfg.seed,
                           augment=train and cfg.data.augment, shuffle=train and cfg.data.shuffle,
                           shuffle_buffer=cfg.data.shuffle_buffer, normalize_with=self.train_root)

    def build_model(self) -> nn.Module:
        _, channels, h, w = self.manifest["shape"]
        return build_resnet(self.cfg.model, channels, self.manifest["num_classes"], min(h, w),
                            self.manifest.get("classes"))

    def flops_per_sample(self, model):
        _, c, h, w = self.manifest["shape"]
        return training_flops(model, pixel_values=torch.zeros((1, c, h, w), device=next(model.parameters()).device))
