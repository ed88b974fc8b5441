"""``task: image_classification``: CNN baselines (ResNet) on labelled image sets.

``data.path`` holds ``train/`` and ``val/`` (optionally ``test/``) image sets
(``bigtrain/data/images.py``: uint8 arrays + manifest), written by
``data.download: digits|synthetic-images|mnist`` when missing, or class folders of image files
converted once into cached sets (``bigtrain/data/image_sources.py``). Training images are augmented
(random crop with reflect padding, flip: ``data.augment``, ``data.flip``; mixup and cutmix:
``data.mixup_alpha``, ``data.cutmix_alpha``, soft targets) from (seed, position); evaluation uses
the hard labels. Every split is normalized with the train set's per-channel statistics. A ``test/``
set is evaluated beside ``val/`` (``test_loss``, ``test_accuracy``). ``model.sync_batchnorm``: see
:mod:`bigtrain.models.sync_batchnorm`.
"""

from __future__ import annotations

import torch
from torch import nn

from bigtrain.data.images import ImageStream, image_splits, open_images
from bigtrain.models import build_resnet, training_flops
from bigtrain.models.resnet import to_channels_last
from bigtrain.models.sync_batchnorm import convert_sync_batchnorm
from bigtrain.tasks.base import ClassificationTask, first_eval_batches


class ImageClassificationTask(ClassificationTask):
    auto_class = "AutoModelForImageClassification"
    test_root = None

    @staticmethod
    def logits_and_labels(model, batch):
        return model(pixel_values=batch["images"]).logits.float(), batch["labels"]

    def prepare(self) -> None:
        data = self.cfg.data
        splits = self.on_main(lambda: {k: str(v) for k, v in image_splits(
            data.path, data.download, self.log, data.cache_dir, data.val_fraction, data.image_size).items()})
        self.train_root, self.val_root, self.test_root = splits["train"], splits.get("val"), splits.get("test")
        self.manifest = open_images(self.train_root)

    def stream(self, root: str, global_batch: int, train: bool) -> ImageStream:
        cfg, info = self.cfg, self.info
        return ImageStream(root, global_batch, cfg.train.micro_batch_size, info.rank, info.world_size, cfg.seed,
                           augment=train and cfg.data.augment, flip=cfg.data.flip, shuffle=train and cfg.data.shuffle,
                           shuffle_buffer=cfg.data.shuffle_buffer, normalize_with=self.train_root,
                           mixup_alpha=cfg.data.mixup_alpha if train else 0.0,
                           cutmix_alpha=cfg.data.cutmix_alpha if train else 0.0)

    def eval_sets(self):
        sets = super().eval_sets()
        if self.test_root is not None and sets:
            stream = self.stream(self.test_root, self.cfg.train.micro_batch_size * self.info.world_size, train=False)
            sets.append(first_eval_batches(stream, self.cfg.train.eval_batches))
        return sets

    def eval_metrics(self, sums):
        metrics = super().eval_metrics(sums)
        if len(sums) > 1:
            test = sums[1]
            metrics.update(test_loss=float(test[0] / test[1]), test_accuracy=float(test[2] / test[1]))
        return metrics

    def build_model(self) -> nn.Module:
        _, channels, h, w = self.manifest["shape"]
        model = build_resnet(self.cfg.model, channels, self.manifest["num_classes"], min(h, w),
                             self.manifest.get("classes"))
        if self.cfg.model.sync_batchnorm and self.info.world_size > 1:
            model = convert_sync_batchnorm(model, self.info.device)
        if not self.cfg.model.channels_last:
            return model
        return to_channels_last(model, weights=self.cfg.strategy.name in ("single", "ddp"))

    def flops_per_sample(self, model):
        _, c, h, w = self.manifest["shape"]
        return training_flops(model, pixel_values=torch.zeros((1, c, h, w), device=next(model.parameters()).device))
