"""The interface between the training loop and what it trains."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from bigtrain import dist
from bigtrain.config import RunConfig
from bigtrain.data.stream import PositionalStream
from bigtrain.data.tokenizer import Tokenizer
from bigtrain.dist import DistInfo

Batch = dict[str, torch.Tensor]
HF_CONFIG = "hf_config.json"


class Task:
    """Subclasses set the class attributes and implement the methods that raise here."""

    name = "task"
    auto_class = ""  # the transformers Auto class an export reloads with
    tokens_per_sample = 0  # > 0: a text task (throughput in tokens, a tokenizer in the run)

    def __init__(self, cfg: RunConfig, info: DistInfo, log: Callable[[str], None]):
        self.cfg, self.info, self.log = cfg, info, log
        self.tokenizer: Optional[Tokenizer] = None

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

    @staticmethod
    def objective(model: nn.Module, batch: Batch) -> torch.Tensor:
        """The training loss of a micro-batch (on the device)."""
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
            files.append(run_dir / "tokenizer.model")
            if self.info.is_main:
                self.tokenizer.save(files[-1])
        return tuple(files)

    def summary(self, val_loss: Optional[float]) -> list[str]:
        """Closing lines of a finished run."""
        return []

    def on_main(self, make: Callable[[], object]) -> object:
        """Collective: ``make()`` on rank 0, its (picklable) result on every rank; an exception
        it raises is raised on every rank (none waits for a result that never comes)."""
        result, error = None, None
        if self.info.is_main:
            try:
                result = make()
            except Exception as err:  # re-raised below, on every rank
                error = err
        result, error = dist.broadcast_object((result, error))
        if error is not None:
            raise error
        return result
