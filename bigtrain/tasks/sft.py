"""``task: sft``: supervised fine-tuning of a pretrained causal LM (``model.pretrained``, gpt2 or
llama) on conversations or prompt/response records.

``data.path`` holds the training records and ``data.val_path`` the held-out ones (``.jsonl``; see
``bigtrain/data/sft.py`` for the fields, the chat template and which tokens are targets). Rank 0
renders, tokenizes and caches them in the job (transformers' ``apply_chat_template`` needs the
runtime's dependencies; the launcher only checks that the files exist), then every rank opens
the prepared sets. The loss is the next-token cross-entropy over response tokens only, averaged
over a micro-batch's response tokens; ``val_loss`` sums it over every evaluated response token.
``data.packing`` packs several records per ``train.seq_len`` row, each attending only to itself
(restarting ``position_ids``); otherwise a row is one record and micro-batches are padded. At the
end the model answers the first validation record's prompt (``train.sample_tokens``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bigtrain.config import ConfigError
from bigtrain.data.cache import default_cache_dir
from bigtrain.data.errors import DataError
from bigtrain.data.sft import Fields, SFTStream, open_sft, prepare_sft_cached
from bigtrain.data.tokenizer import HFTokenizer, load_tokenizer, open_tokenizer
from bigtrain.models import build_causal_lm, flops_per_token
from bigtrain.sample import sample_ids
from bigtrain.tasks.base import HeldOutSetTask, TargetTokenTask, check_vocabulary, target_token_losses

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")  # the stream gives the mask or the positions


def sft_logits(model: nn.Module, batch) -> torch.Tensor:
    """The logits of a batch. Packed rows carry restarting ``position_ids`` and no attention mask,
    from which transformers builds a block-diagonal causal mask, but only when the forward keeps
    no KV cache (``use_cache=False``; with a cache, even in training, records would attend to the
    records before them: ``tests/test_sft.py`` checks both architectures and attention kernels)."""
    return model(**{k: batch[k] for k in MODEL_INPUTS if k in batch}, use_cache=False).logits


def _response_losses(model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    return target_token_losses(sft_logits(model, batch), batch["labels"])


class SFTTask(HeldOutSetTask, TargetTokenTask):
    auto_class = "AutoModelForCausalLM"

    def prepare(self) -> None:
        if self.cfg.data.packing:
            check_packing_support()
        roots = self.on_main(self._prepare_sets)
        self.train_root, self.val_root = Path(roots[0]), Path(roots[1]) if roots[1] else None
        self.manifest = open_sft(self.train_root)
        self.tokenizer = load_tokenizer(self.train_root / self.manifest["tokenizer_file"])
        stream = self.train_stream()
        self.tokens_per_sample = max(1, round(stream.mean_row_tokens))
        rows = f"{stream.num_samples:,} rows (packed)" if stream.packing else "one record per row"
        self.log(f"data: {self.manifest['records']:,} sft records, {self.manifest['target_tokens']:,} response tokens, "
                 f"{rows}, {stream.mean_row_tokens:.0f} tokens per row on average")
        if stream.truncated:
            self.log(f"data: {stream.truncated:,} records are longer than train.seq_len ({self.cfg.train.seq_len}) "
                     f"tokens and are cut")

    def _prepare_sets(self) -> tuple[str, str | None]:
        data = self.cfg.data
        if data.path is None:
            raise DataError(f"data.path: not set (.jsonl records with '{data.messages_field}', or "
                            f"'{data.prompt_field}' and '{data.response_field}')")
        tokenizer = open_tokenizer(data.tokenizer.path)
        if not isinstance(tokenizer, HFTokenizer):
            raise DataError(f"data.tokenizer.path: {data.tokenizer.path}: sft needs the pretrained model's Hugging "
                            f"Face tokenizer (a directory with tokenizer.json)")
        cache = Path(data.cache_dir or default_cache_dir()) / "sft"
        fields = Fields(data.messages_field, data.prompt_field, data.response_field)
        kwargs = dict(fields=fields, on_bad_record=data.on_bad_record, log=self.log)
        train = prepare_sft_cached(data.path, tokenizer, cache, **kwargs)
        val = prepare_sft_cached(data.val_path, tokenizer, cache, **kwargs) if data.val_path else None
        return str(train), str(val) if val else None

    def stream(self, root: Path, global_batch: int, train: bool) -> SFTStream:
        cfg, info = self.cfg, self.info
        return SFTStream(root, cfg.train.seq_len, global_batch, cfg.train.micro_batch_size, info.rank,
                         info.world_size, cfg.seed, packing=cfg.data.packing, shuffle=train and cfg.data.shuffle,
                         shuffle_buffer=cfg.data.shuffle_buffer)

    def build_model(self) -> nn.Module:
        model = build_causal_lm(self.cfg.model, self.tokenizer.vocab_size, self.cfg.train.seq_len,
                                structure_only=self.weights_from_rank0)
        check_vocabulary(model, self.tokenizer.vocab_size, self.train_root / self.manifest["tokenizer_file"])
        positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 0)
        if positions and self.cfg.train.seq_len > positions:
            raise ConfigError(f"train.seq_len: {self.cfg.train.seq_len} tokens are more than the positions of "
                              f"{self.cfg.model.pretrained} ({positions})")
        return model

    token_losses = staticmethod(_response_losses)

    def flops_per_sample(self, model):
        return flops_per_token(model, self.cfg.train.seq_len) * self.tokens_per_sample

    def sample(self, strategy) -> str | None:
        """The model's answer to the first validation record's prompt (else the first training record's)."""
        t = self.cfg.train
        if not t.sample_tokens:
            return None
        records = SFTStream(self.val_root or self.train_root, t.seq_len, 1, 1, shuffle=False)
        prompt = records.prompt_ids(0)
        answer = sample_ids(strategy, self.cfg, prompt, t.sample_tokens, stop_ids=(self.tokenizer.eos_id,))
        return self.tokenizer.decode(prompt) + self.tokenizer.decode(answer)

    def summary(self, val_loss):
        return [] if val_loss is None else [f"val loss on response tokens {val_loss:.4f} nats"]


def check_packing_support() -> None:
    """data.packing relies on transformers building a block-diagonal causal mask from restarting
    position ids (``masking_utils.find_packed_sequence_indices``); older versions would let packed
    records attend to each other."""
    import transformers

    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        raise ConfigError(f"data.packing: transformers {transformers.__version__} does not separate packed records "
                          f"by their position ids (upgrade transformers, or set data.packing=false)") from None
