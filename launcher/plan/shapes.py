"""A causal LM's shape from the run config, and what follows from it by arithmetic: parameter
counts (total, per block, outside the blocks, in matmuls) and training FLOPs per token. No torch.

The counts follow the transformers classes bigtrain builds (``bigtrain/models/gpt.py``:
``GPT2LMHeadModel``, ``LlamaForCausalLM``) tensor by tensor; ``tests/test_plan.py`` checks them
against those classes built on the meta device.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from bigtrain.config import ConfigError, RunConfig

ARCHS = ("gpt2", "llama")


@dataclass(frozen=True)
class Shape:
    """What the planner needs to know about a model."""

    arch: str  # gpt2 | llama
    n_layer: int
    d_model: int
    n_head: int
    n_kv_head: int
    d_ff: int
    vocab: int
    positions: int  # gpt2's learned position table (llama: rotary, no parameters)
    tied: bool  # output projection shares the token embedding
    vocab_from: str = "model.vocab_size"  # where the vocabulary size came from (shown by `bigtrain plan`)
    gelu_chain: bool = False  # gpt2: its activation is a chain of element-wise ops (gelu_new), not one kernel

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def block_params(self) -> int:
        """Parameters of one transformer block."""
        h, f = self.d_model, self.d_ff
        if self.arch == "gpt2":  # ln_1, c_attn (h x 3h + bias), c_proj, ln_2, c_fc, c_proj: all with biases
            return 2 * h + (3 * h * h + 3 * h) + (h * h + h) + 2 * h + (h * f + f) + (f * h + h)
        kv = self.n_kv_head * self.head_dim  # llama: two RMSNorm gains, q/k/v/o and gate/up/down, no biases
        return 2 * h + h * h + 2 * h * kv + h * h + 3 * h * f

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.d_model

    @property
    def root_params(self) -> int:
        """Parameters outside the blocks: embeddings, final norm, an untied output projection."""
        h = self.d_model
        untied = 0 if self.tied else self.embedding_params
        if self.arch == "gpt2":
            return self.embedding_params + self.positions * h + 2 * h + untied
        return self.embedding_params + h + untied

    @property
    def params(self) -> int:
        return self.n_layer * self.block_params + self.root_params

    @property
    def matmul_params(self) -> int:
        """Weights that go through matmuls (what autocast keeps a low-precision copy of): the
        blocks' projection matrices and the output projection."""
        h, f = self.d_model, self.d_ff
        if self.arch == "gpt2":
            block = 4 * h * h + 2 * h * f
        else:
            block = 2 * h * h + 2 * h * self.n_kv_head * self.head_dim + 3 * h * f
        return self.n_layer * block + self.embedding_params

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, as the runtime counts them for MFU (``bigtrain.models.gpt.
        flops_per_token``): 6 x the parameters that do matmuls (lookup tables excluded; a tied
        embedding counts once, as the output projection) + 12 x layers x width x sequence."""
        n = self.params - (0 if self.tied else self.embedding_params)
        if self.arch == "gpt2":
            n -= self.positions * self.d_model
        return 6.0 * n + 12.0 * self.n_layer * self.d_model * seq_len

    def describe(self) -> str:
        heads = f"{self.n_head} heads" + (f" ({self.n_kv_head} kv)" if self.n_kv_head != self.n_head else "")
        return (f"{self.arch}, {self.params / 1e6:,.1f}M params ({self.n_layer} layers, d_model {self.d_model}, "
                f"{heads}, d_ff {self.d_ff}, vocab {self.vocab} from {self.vocab_from})")


# transformers activations computed by one kernel, which keeps only its input for backward; others
# (gelu_new, GPT-2 checkpoints' default, gelu_fast, quick_gelu) keep every intermediate in eager mode
ONE_KERNEL_ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "relu", "silu", "swish")


def shape_of(cfg: RunConfig) -> Shape:
    """The model ``cfg`` trains. ConfigError for models the planner does not know (bert, resnet,
    a pretrained checkpoint of another family)."""
    m = cfg.model
    if not cfg.packed_text or m.name not in ARCHS:
        raise ConfigError(f"model.name '{m.name}' (task {cfg.task}) is not planned; the planner knows the "
                          f"causal LMs ({', '.join(ARCHS)})")
    if m.pretrained:
        return _pretrained_shape(cfg)
    vocab, source = _vocab(cfg)
    h = m.d_model
    if m.name == "gpt2":
        d_ff = m.d_ff or 4 * h
    else:  # as bigtrain.models.gpt.hf_config
        d_ff = m.d_ff or 256 * ((int(8 * h / 3) + 255) // 256)
    kv = (m.n_kv_head or m.n_head) if m.name == "llama" else m.n_head
    return Shape(arch=m.name, n_layer=m.n_layer, d_model=h, n_head=m.n_head, n_kv_head=kv,
                 d_ff=d_ff, vocab=vocab, positions=m.max_seq_len or cfg.train.seq_len,
                 tied=m.tie_embeddings, vocab_from=source)


def _vocab(cfg: RunConfig) -> tuple[int, str]:
    """The model's vocabulary: model.vocab_size, else the tokenizer's (an existing one is read)."""
    if cfg.model.vocab_size:
        return cfg.model.vocab_size, "model.vocab_size"
    path = cfg.data.tokenizer.path
    if path:
        found = _tokenizer_size(Path(os.path.expanduser(path)))
        if found:
            return found, "data.tokenizer.path"
    return cfg.data.tokenizer.vocab_size, "data.tokenizer.vocab_size"


def _tokenizer_size(path: Path) -> int | None:
    """Tokens in a Hugging Face tokenizer (directory with tokenizer.json) or a SentencePiece .model."""
    try:
        if path.is_dir() and (path / "tokenizer.json").is_file():
            spec = json.loads((path / "tokenizer.json").read_text())
            vocab = spec.get("model", {}).get("vocab", {})
            ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
            ids += [t.get("id", 0) for t in spec.get("added_tokens", [])]
            return max(ids) + 1 if ids else None
        if path.is_file():
            import sentencepiece

            return sentencepiece.SentencePieceProcessor(model_file=str(path)).get_piece_size()
    except (OSError, ValueError, RuntimeError, ImportError):
        return None
    return None


def _pretrained_shape(cfg: RunConfig) -> Shape:
    """The shape in ``model.pretrained``/config.json (a transformers GPT-2 or Llama config)."""
    path = Path(os.path.expanduser(cfg.model.pretrained)) / "config.json"
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.pretrained: cannot read {path} ({err})") from None
    kind = spec.get("model_type")
    if kind == "gpt2":
        h = spec["n_embd"]
        return Shape(arch="gpt2", n_layer=spec["n_layer"], d_model=h, n_head=spec["n_head"], n_kv_head=spec["n_head"],
                     d_ff=spec.get("n_inner") or 4 * h, vocab=spec["vocab_size"], positions=spec["n_positions"],
                     tied=spec.get("tie_word_embeddings", True), vocab_from=str(path),
                     gelu_chain=spec.get("activation_function", "gelu_new") not in ONE_KERNEL_ACTIVATIONS)
    if kind == "llama":
        heads = spec["num_attention_heads"]
        return Shape(arch="llama", n_layer=spec["num_hidden_layers"], d_model=spec["hidden_size"], n_head=heads,
                     n_kv_head=spec.get("num_key_value_heads") or heads, d_ff=spec["intermediate_size"],
                     vocab=spec["vocab_size"], positions=spec.get("max_position_embeddings", 0),
                     tied=spec.get("tie_word_embeddings", False), vocab_from=str(path))
    raise ConfigError(f"model.pretrained {cfg.model.pretrained} is a '{kind}' model; the planner knows "
                      f"{', '.join(ARCHS)}")
