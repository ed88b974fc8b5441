"""Mixup and cutmix of training images, drawn from (seed, position) like the crop and flip.

Each training sample is mixed with a *partner*: a training image picked at random from the whole
set by the sample's own random stream (not another sample of the same micro-batch), so what a
sample becomes depends on its position alone, whatever the micro-batch size, the world size or a
resume. With both ``mixup_alpha`` and ``cutmix_alpha`` set, each sample takes one of the two with
probability 1/2. The mixing weight ``lam`` ~ Beta(alpha, alpha) is the share of the sample's own
label in its soft target ``lam x onehot(label) + (1 - lam) x onehot(partner's label)``; cutmix
pastes a box of the partner covering ``1 - lam`` of the image (``lam`` is then recomputed from the
clipped box, as in the paper).
"""

from __future__ import annotations

import math

import numpy as np


def mix(image: np.ndarray, partner: np.ndarray, rng: np.random.Generator, mixup_alpha: float,
        cutmix_alpha: float) -> tuple[np.ndarray, float]:
    """``image`` mixed with ``partner`` (float32 C x H x W arrays of the same shape): the mixed image
    and the weight of ``image``'s label."""
    cutmix = cutmix_alpha > 0 and (mixup_alpha == 0 or rng.random() < 0.5)
    alpha = cutmix_alpha if cutmix else mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    if not cutmix:
        return lam * image + (1.0 - lam) * partner, lam
    _, h, w = image.shape
    cut = math.sqrt(1.0 - lam)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    half_h, half_w = int(h * cut) // 2, int(w * cut) // 2
    top, bottom = max(cy - half_h, 0), min(cy + half_h, h)
    left, right = max(cx - half_w, 0), min(cx + half_w, w)
    mixed = image.copy()
    mixed[:, top:bottom, left:right] = partner[:, top:bottom, left:right]
    return mixed, 1.0 - (bottom - top) * (right - left) / (h * w)


def soft_targets(labels: np.ndarray, partner_labels: np.ndarray, lams: np.ndarray, num_classes: int) -> np.ndarray:
    """``lam x onehot(label) + (1 - lam) x onehot(partner label)``, float32 ``[batch, classes]``."""
    targets = np.zeros((len(labels), num_classes), dtype=np.float32)
    rows = np.arange(len(labels))
    targets[rows, partner_labels] += 1.0 - lams
    targets[rows, labels] += lams
    return targets
