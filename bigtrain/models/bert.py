"""BERT-style encoders (masked-LM pretraining, sequence classification) built from Hugging Face
``transformers`` classes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import (
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    BertConfig,
    PreTrainedModel,
)

from bigtrain.config import ModelSection
from bigtrain.models.gpt import load_pretrained


def bert_config(cfg: ModelSection, vocab_size: int, seq_len: int, pad_id: int) -> BertConfig:
    return BertConfig(
        vocab_size=cfg.vocab_size or vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head, intermediate_size=cfg.d_ff or 4 * cfg.d_model,
        max_position_embeddings=cfg.max_seq_len or seq_len, hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout, type_vocab_size=1, pad_token_id=pad_id,
        tie_word_embeddings=cfg.tie_embeddings,
    )


def build_masked_lm(cfg: ModelSection, vocab_size: int, seq_len: int, pad_id: int,
                    structure_only: bool = False) -> PreTrainedModel:
    """A freshly initialised ``BertForMaskedLM`` (seed the RNG first), or ``cfg.pretrained``
    (``structure_only``: see :func:`bigtrain.models.gpt.load_pretrained`)."""
    if cfg.pretrained:
        return load_pretrained(AutoModelForMaskedLM, cfg.pretrained, structure_only=structure_only)
    return AutoModelForMaskedLM.from_config(bert_config(cfg, vocab_size, seq_len, pad_id), dtype=torch.float32)


def build_sequence_classifier(cfg: ModelSection, vocab_size: int, seq_len: int, pad_id: int,
                              labels: Sequence[str], structure_only: bool = False) -> PreTrainedModel:
    """A ``BertForSequenceClassification`` over ``labels``: ``cfg.pretrained``'s encoder (a fresh
    classification head when the checkpoint has none or another label count; ``structure_only``:
    see :func:`bigtrain.models.gpt.load_pretrained`), or freshly initialised (seed the RNG first)."""
    names = {"id2label": dict(enumerate(labels)), "label2id": {name: i for i, name in enumerate(labels)}}
    if cfg.pretrained:
        return load_pretrained(AutoModelForSequenceClassification, cfg.pretrained, structure_only=structure_only,
                               num_labels=len(labels), ignore_mismatched_sizes=True, **names)
    config = bert_config(cfg, vocab_size, seq_len, pad_id)
    config.update({"num_labels": len(labels), **names})
    return AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
