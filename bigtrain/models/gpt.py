"""GPT-style causal language models built from Hugging Face ``transformers`` classes.

Using transformers' own GPT-2 and Llama classes keeps import from / export to Hugging Face
native (``from_pretrained`` / ``save_pretrained``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedModel
from transformers.utils import logging as hf_logging

from bigtrain.config import ConfigError, ModelSection
from bigtrain.models.params import numel


def hf_config(cfg: ModelSection, vocab_size: int, seq_len: int):
    """The transformers config for ``cfg`` (vocab from the tokenizer unless the config sets it)."""
    vocab = cfg.vocab_size or vocab_size
    positions = cfg.max_seq_len or seq_len
    if cfg.name == "gpt2":
        # GPT-2's tanh GELU as one kernel (forward and backward): gelu_new, the default, is the same
        # function (within 2.4e-7) as a chain of eight element-wise ops; benchmarks/gelu.py
        return GPT2Config(
            vocab_size=vocab, n_positions=positions, n_embd=cfg.d_model, n_layer=cfg.n_layer,
            n_head=cfg.n_head, n_inner=cfg.d_ff, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout, tie_word_embeddings=cfg.tie_embeddings, bos_token_id=1, eos_token_id=2,
            activation_function="gelu_pytorch_tanh",
        )
    d_ff = cfg.d_ff or 256 * ((int(8 * cfg.d_model / 3) + 255) // 256)
    return LlamaConfig(
        vocab_size=vocab, max_position_embeddings=positions, hidden_size=cfg.d_model,
        intermediate_size=d_ff, num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head or cfg.n_head, rope_theta=cfg.rope_theta,
        attention_dropout=cfg.dropout, tie_word_embeddings=cfg.tie_embeddings, bos_token_id=1, eos_token_id=2,
    )


FROM_PRETRAINED_ONLY = ("ignore_mismatched_sizes",)


def load_pretrained(auto_class, directory: str, structure_only: bool = False, **kwargs):
    """``auto_class.from_pretrained`` on a local Hugging Face directory, in fp32 (no Hub access).
    ``structure_only``: the model built from the directory's config on the meta device, without
    reading any weight (they arrive from rank 0: :func:`rank0_loads_pretrained`)."""
    path = Path(directory)
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.pretrained: {directory} is not a Hugging Face model directory (no config.json)")
    hf_logging.disable_progress_bar()  # one bar per rank, in every job log
    if structure_only:  # kwargs that only from_pretrained takes do not go into the config
        config_kwargs = {k: v for k, v in kwargs.items() if k not in FROM_PRETRAINED_ONLY}
        config = AutoConfig.from_pretrained(path, local_files_only=True, **config_kwargs)
        with torch.device("meta"):
            return auto_class.from_config(config, dtype=torch.float32)
    return auto_class.from_pretrained(path, local_files_only=True, dtype=torch.float32, **kwargs)


def rank0_loads_pretrained(cfg, world_size: int) -> bool:
    """Whether ``model.pretrained`` is read by rank 0 alone, the other ranks building the model on the
    meta device and receiving their shards from rank 0 (FSDP at 2+ ranks, full fine-tuning of a
    Transformer: causal LM, SFT, masked LM or classifier, whose new head rank 0 initialises): no
    rank but 0 ever holds the whole model."""
    return (cfg.strategy.name == "fsdp" and cfg.strategy.fsdp.pretrained_from == "rank0" and world_size > 1
            and bool(cfg.model.pretrained) and cfg.model.lora is None
            and cfg.task in ("causal_lm", "sft", "masked_lm", "sequence_classification"))


def build_causal_lm(cfg: ModelSection, vocab_size: int, seq_len: int, structure_only: bool = False) -> PreTrainedModel:
    """A freshly initialised model (seed the RNG first), or ``cfg.pretrained`` loaded from a local dir
    (``structure_only``: see :func:`load_pretrained`)."""
    if cfg.pretrained:
        return load_pretrained(AutoModelForCausalLM, cfg.pretrained, structure_only=structure_only)
    return AutoModelForCausalLM.from_config(hf_config(cfg, vocab_size, seq_len), dtype=torch.float32)


def flops_per_token(model: PreTrainedModel, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul params + attention scores (PaLM, appendix B).

    Lookup tables (token embeddings when untied, position embeddings) do no matmuls; a tied
    embedding counts once, as the output projection.
    """
    cfg = model.config
    n = sum(numel(p) for p in model.parameters())
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is None or out.weight is not inp.weight:
        n -= numel(inp.weight)
    wpe = getattr(getattr(model, model.base_model_prefix, model), "wpe", None)
    if wpe is not None:
        n -= numel(wpe.weight)
    n_layer = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    d = getattr(cfg, "hidden_size", None) or cfg.n_embd
    return 6 * n + 12 * n_layer * d * seq_len
