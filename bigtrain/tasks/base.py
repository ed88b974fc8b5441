"""The interface between the training loop and what it trains."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bigtrain import dist
from bigtrain.config import RunConfig
from bigtrain.data.errors import DataError
from bigtrain.data.stream import PositionalStream
from bigtrain.data.tokenizer import AnyTokenizer
from bigtrain.dist import DistInfo
from bigtrain.models.gpt import rank0_loads_pretrained

Batch = dict[str, torch.Tensor]
HF_CONFIG = "hf_config.json"


IGNORE_INDEX = -100  # a label no loss counts (padding rows of the last evaluation batch)


def first_eval_batches(stream: PositionalStream, max_batches: int | str) -> Iterable[Batch]:
    """This rank's share of the first global batches of an eval ``stream`` (global batch = micro
    batch x world size): up to ``max_batches`` of them, at most one pass (a partial last batch is
    dropped), at least one; ``"all"``: :func:`every_eval_sample`."""
    if max_batches == "all":
        yield from every_eval_sample(stream)
        return
    for index in range(min(max_batches, max(1, stream.num_samples // stream.global_batch))):
        yield stream.micro_batch_at(index)


def padded_share(n: int, micro: int, rank: int, world: int) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """Every one of ``n`` samples once, in global batches of ``micro x world``: this rank's
    (positions, valid) per batch. The last global batch is completed with padding rows (position
    0, not valid), so every rank runs the same number of forwards (sharded engines need that)."""
    per = micro * world
    for b in range(-(-n // per)):
        positions = b * per + rank * micro + np.arange(micro)
        valid = positions < n
        yield np.where(valid, positions, 0), valid


def every_eval_sample(stream: PositionalStream) -> Iterable[Batch]:
    """The whole (unshuffled) eval set through ``stream.build``, each sample once; padding rows
    get labels ``IGNORE_INDEX``."""
    for positions, valid in padded_share(stream.num_samples, stream.micro_batch, stream.rank, stream.world_size):
        batch = stream.build(positions)
        if not valid.all():
            batch["labels"][torch.from_numpy(~valid)] = IGNORE_INDEX
        yield batch


def target_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The cross-entropy (fp32) summed over the target tokens (labels other than ``IGNORE_INDEX``),
    and their count."""
    labels = labels.reshape(-1)
    total = F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels, ignore_index=IGNORE_INDEX,
                            reduction="sum")
    return total, (labels != IGNORE_INDEX).sum()


def lm_metrics(losses: list[float], weights: list[float]) -> dict[str, float]:
    """``val_loss`` (the sources' losses weighted like the mixture), ``val_ppl``, and per source
    ``val_loss_<k>`` when there are several."""
    val = sum(w * v for w, v in zip(weights, losses)) / sum(weights)
    out = {"val_loss": val, "val_ppl": math.exp(min(val, 50))}
    if len(losses) > 1:
        out.update({f"val_loss_{k}": v for k, v in enumerate(losses)})
    return out


def check_vocabulary(model: nn.Module, tokenizer_vocab: int, where: Path) -> None:
    """The model embeds every id the tokenizer produces, or a one-line DataError."""
    if model.config.vocab_size < tokenizer_vocab:
        raise DataError(f"data.tokenizer: {where} has {tokenizer_vocab} tokens, more than the model's "
                        f"vocabulary ({model.config.vocab_size})")


class Task:
    """Subclasses set the class attributes and implement the methods that raise here."""

    auto_class = ""  # the transformers Auto class an export reloads with
    tokens_per_sample = 0  # > 0: a text task (throughput in tokens, a tokenizer in the run)

    def __init__(self, cfg: RunConfig, info: DistInfo, log: Callable[[str], None]):
        self.cfg, self.info, self.log = cfg, info, log
        self.tokenizer: AnyTokenizer | None = None

    # -- data ----------------------------------------------------------------------------
    def prepare(self) -> None:
        """Collective: rank 0 prepares (or finds) the data, then every rank opens it."""
        raise NotImplementedError

    def train_stream(self) -> PositionalStream:
        raise NotImplementedError

    def eval_sets(self) -> list[Iterable[Batch]]:
        """This rank's validation batches, one iterable per set (same count on every rank)."""
        raise NotImplementedError

    # -- model ---------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        raise NotImplementedError

    @property
    def weights_from_rank0(self) -> bool:
        """True on ranks that build ``model.pretrained`` without its weights (on the meta device):
        the strategy fills them from rank 0 (:func:`bigtrain.models.gpt.rank0_loads_pretrained`)."""
        return self.info.rank != 0 and rank0_loads_pretrained(self.cfg, self.info.world_size)

    @staticmethod
    def objective(model: nn.Module, batch: Batch) -> torch.Tensor:
        """The training loss of a micro-batch (on the device)."""
        raise NotImplementedError

    # -- distillation (tasks that support ``distill``: the objective split in two) -------
    @staticmethod
    def logits_and_labels(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits of a micro-batch ``[..., classes]`` and its labels ``[...]`` (``IGNORE_INDEX``:
        not a target); what a teacher's and the student's outputs are compared on."""
        raise NotImplementedError

    def label_loss(self, logits: torch.Tensor, labels: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The objective's loss from :meth:`logits_and_labels`' output (``objective`` = both)."""
        raise NotImplementedError

    @staticmethod
    def eval_stats(model: nn.Module, batch: Batch) -> torch.Tensor:
        """Sums over a validation batch, ``[loss_sum, count, ...]``; summed over batches and ranks."""
        raise NotImplementedError

    def eval_metrics(self, sums: list[torch.Tensor]) -> dict[str, float]:
        """Metrics from each eval set's summed :meth:`eval_stats`; must include ``val_loss``."""
        raise NotImplementedError

    def flops_per_sample(self, model: nn.Module) -> float:
        """Training FLOPs (forward + backward) per sample, for MFU."""
        raise NotImplementedError

    # -- run files -----------------------------------------------------------------------
    def save_run_files(self, run_dir: Path, model: nn.Module) -> tuple[Path, ...]:
        """Write what every checkpoint carries besides the weights: the model's Hugging Face
        config (``hf_config.json``, what export rebuilds the model from) and the tokenizer."""
        files = [run_dir / HF_CONFIG]
        if self.info.is_main:
            model.config.to_json_file(files[0])
        if self.tokenizer is not None:
            files += [run_dir / name for name in self.tokenizer.file_names]
            if self.info.is_main:
                self.tokenizer.save_files(run_dir)
        return tuple(files)

    def sample(self, strategy) -> str | None:
        """What the trained model produces at the end of a run, to show (collective: every rank
        calls; sharded engines run collective forwards). None: nothing to show."""
        return None

    def summary(self, val_loss: float | None) -> list[str]:
        """Closing lines of a finished run."""
        return []

    def on_main(self, make: Callable[[], object]) -> object:
        """Collective: see :func:`bigtrain.dist.run_on_main`."""
        return dist.run_on_main(make, self.info.is_main)


class HeldOutSetTask(Task):
    """Tasks trained on one prepared set and evaluated on another: their ``prepare`` sets
    ``train_root`` and ``val_root`` (None: no validation set)."""

    train_root = val_root = None

    def stream(self, root, global_batch: int, train: bool) -> PositionalStream:
        """This rank's stream over the set at ``root`` (``train``: shuffled, augmented)."""
        raise NotImplementedError

    def train_stream(self) -> PositionalStream:
        return self.stream(self.train_root, self.cfg.train.global_batch_size, train=True)

    def eval_sets(self):
        if self.val_root is None:
            return []
        stream = self.stream(self.val_root, self.cfg.train.micro_batch_size * self.info.world_size, train=False)
        return [first_eval_batches(stream, self.cfg.train.eval_batches)]


class TargetTokenTask(Task):
    """Tasks whose loss is the cross-entropy over target tokens (``labels`` other than
    ``IGNORE_INDEX``), averaged over a micro-batch's targets; ``val_loss`` and ``val_ppl``."""

    @staticmethod
    def token_losses(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The summed loss of a batch's target tokens, and their count: :func:`target_token_losses`."""
        raise NotImplementedError

    @classmethod
    def objective(cls, model, batch):
        total, count = cls.token_losses(model, batch)
        return total / count.clamp(min=1)

    @classmethod
    def eval_stats(cls, model, batch):
        total, count = cls.token_losses(model, batch)
        return torch.stack([total, count.to(total.dtype)])

    def eval_metrics(self, sums):
        return lm_metrics([float(s[0] / s[1].clamp(min=1)) for s in sums], self.cfg.data.weights)


class ClassificationTask(HeldOutSetTask):
    """Tasks that score class logits: cross-entropy (soft targets, label smoothing); ``val_loss`` and
    ``val_accuracy`` (hard labels, unsmoothed)."""

    @staticmethod
    def logits_and_labels(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 logits ``[batch, classes]`` and the labels of a micro-batch."""
        raise NotImplementedError

    def objective(self, model, batch):
        return self.label_loss(*self.logits_and_labels(model, batch), batch)

    def label_loss(self, logits, labels, batch):
        """Cross-entropy against the labels, or against the soft ``targets`` where the batch has them
        (mixup, cutmix), smoothed by ``train.label_smoothing``."""
        targets = batch["targets"].float() if "targets" in batch else labels
        return F.cross_entropy(logits, targets, label_smoothing=self.cfg.train.label_smoothing)

    @classmethod
    def eval_stats(cls, model, batch):
        logits, labels = cls.logits_and_labels(model, batch)
        loss = F.cross_entropy(logits, labels, reduction="sum", ignore_index=IGNORE_INDEX)
        valid = labels != IGNORE_INDEX
        correct = ((logits.argmax(-1) == labels) & valid).sum().to(loss.dtype)
        return torch.stack([loss, valid.sum().to(loss.dtype), correct])

    def eval_metrics(self, sums):
        total = sums[0]
        return {"val_loss": float(total[0] / total[1]), "val_accuracy": float(total[2] / total[1]),
                "val_samples": int(total[1])}
