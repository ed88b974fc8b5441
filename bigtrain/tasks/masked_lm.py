"""``task: masked_lm``: BERT pretraining on the same prepared text as causal LMs.

Samples are packed token windows masked on the fly (``data.mask_prob``, ``data.whole_word_mask``;
see ``bigtrain/data/mlm.py``); the loss is the cross-entropy over the masked positions.
Validation masks the held-out split the same way, from its own positions, so every evaluation
of a run scores the same masked tokens.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from bigtrain.data.mlm import MaskedLMStream
from bigtrain.models import build_masked_lm, training_flops
from bigtrain.tasks.base import TargetTokenTask, first_eval_batches, target_token_losses
from bigtrain.tasks.causal_lm import CausalLMTask


def _masked_token_losses(model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return target_token_losses(logits, batch["labels"])


class MaskedLMTask(TargetTokenTask, CausalLMTask):
    auto_class = "AutoModelForMaskedLM"

    def stream_kwargs(self) -> dict:
        return {**super().stream_kwargs(), "mask_prob": self.cfg.data.mask_prob,
                "whole_word": self.cfg.data.whole_word_mask}

    def train_stream(self) -> MaskedLMStream:
        return MaskedLMStream(**self.stream_kwargs())

    def eval_sets(self):
        t, world = self.cfg.train, self.info.world_size
        sets = []
        for data in self.sources:
            stream = MaskedLMStream(**{**self.stream_kwargs(), "sources": [data], "weights": None, "split": "val",
                                       "shuffle": False, "global_batch": t.micro_batch_size * world})
            sets.append(first_eval_batches(stream, t.eval_batches))
        return sets

    def build_model(self) -> PreTrainedModel:
        return build_masked_lm(self.cfg.model, self.sources[0].vocab_size, self.cfg.train.seq_len,
                               self.tokenizer.pad_id, structure_only=self.weights_from_rank0)

    token_losses = staticmethod(_masked_token_losses)

    def flops_per_sample(self, model):
        ids = torch.zeros((1, self.cfg.train.seq_len), dtype=torch.long, device=next(model.parameters()).device)
        return training_flops(model, input_ids=ids)

    def sample(self, strategy):
        return None  # an encoder does not generate

    def summary(self, val_loss):
        return [] if val_loss is None else [f"val masked-token loss {val_loss:.4f} nats"]
