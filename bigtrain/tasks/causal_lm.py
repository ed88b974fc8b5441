"""``task: causal_lm``: GPT-style next-token prediction on packed text (one source or a mixture)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bigtrain.data.prepare import prepare_sources
from bigtrain.data.shards import PreparedData, open_prepared
from bigtrain.data.stream import CausalLMStream, eval_batches
from bigtrain.data.tokenizer import load_tokenizer
from bigtrain.losses import cross_entropy
from bigtrain.models import build_causal_lm, flops_per_token
from bigtrain.sample import sample_text
from bigtrain.strategies.base import causal_lm_loss
from bigtrain.tasks.base import IGNORE_INDEX, Task, check_vocabulary, lm_metrics


class CausalLMTask(Task):
    auto_class = "AutoModelForCausalLM"

    def prepare(self) -> None:
        roots = self.on_main(lambda: [str(d.root) for d in prepare_sources(self.cfg.data, log=self.log)])
        self.sources: list[PreparedData] = [open_prepared(root, verify="size") for root in roots]
        self.tokenizer = load_tokenizer(self.sources[0].tokenizer_path)
        self.tokens_per_sample = self.cfg.train.seq_len

    def stream_kwargs(self) -> dict:
        cfg, info = self.cfg, self.info
        return dict(sources=self.sources, seq_len=cfg.train.seq_len, global_batch=cfg.train.global_batch_size,
                    micro_batch=cfg.train.micro_batch_size, rank=info.rank, world_size=info.world_size,
                    seed=cfg.seed, weights=cfg.data.weights, shuffle=cfg.data.shuffle,
                    shuffle_buffer=cfg.data.shuffle_buffer)

    def train_stream(self) -> CausalLMStream:
        return CausalLMStream(**self.stream_kwargs())

    def eval_sets(self):
        t = self.cfg.train
        return [({"input_ids": x, "labels": y} for x, y in eval_batches(
                    data, t.seq_len, t.micro_batch_size, t.eval_batches, self.info.rank, self.info.world_size))
                for data in self.sources]

    def build_model(self) -> nn.Module:
        model = build_causal_lm(self.cfg.model, self.sources[0].vocab_size, self.cfg.train.seq_len,
                                structure_only=self.weights_from_rank0)
        check_vocabulary(model, self.sources[0].vocab_size, self.sources[0].tokenizer_path)
        return model

    objective = staticmethod(causal_lm_loss)

    @staticmethod
    def logits_and_labels(model, batch):
        return model(input_ids=batch["input_ids"]).logits, batch["labels"]

    def label_loss(self, logits, labels, batch):
        return cross_entropy(logits, labels)

    @staticmethod
    def eval_stats(model, batch):
        """The loss summed over the batch's (non-padding) target tokens, and their count."""
        logits = model(input_ids=batch["input_ids"]).logits
        labels = batch["labels"].reshape(-1)
        total = F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels, reduction="sum",
                                ignore_index=IGNORE_INDEX)
        return torch.stack([total, (labels != IGNORE_INDEX).sum().to(total.dtype)])

    def eval_metrics(self, sums):
        return lm_metrics([float(s[0] / s[1]) for s in sums], self.cfg.data.weights)

    def flops_per_sample(self, model):
        return flops_per_token(model, self.cfg.train.seq_len) * self.cfg.train.seq_len

    def sample(self, strategy) -> str | None:
        t = self.cfg.train
        if not t.sample_tokens:
            return None
        return sample_text(strategy, self.tokenizer, self.cfg, t.sample_prompt, t.sample_tokens).strip("\n")

    @property
    def unigram_entropy(self) -> float:
        return float(self.sources[0].manifest["stats"]["val_unigram_entropy_nats"])

    def summary(self, val_loss: float | None) -> list[str]:
        if val_loss is None:
            return []
        entropy = self.unigram_entropy
        return [f"val loss {val_loss:.4f} nats vs unigram entropy {entropy:.4f} nats "
                f"(gap {entropy - val_loss:.3f} nats)"]
