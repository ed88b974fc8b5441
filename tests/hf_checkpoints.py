"""Small Hugging Face checkpoints written with ``save_pretrained``, as they come from the Hub:
a GPT-2 with a byte-level BPE tokenizer, and BERTs with a WordPiece tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

# A chat template in the style of the Hub's (role headers, the answer ended by the eos token).
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}"
                 "{{ 'Assistant:\n' + m['content'] + eos_token }}"
                 "{% else %}{{ m['role'] | capitalize + ':\n' + m['content'] + '\n' }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{{ 'Assistant:\n' }}{% endif %}")


def hf_checkpoint(out: Path, text: str, model_vocab: int | None = None, chat_template: str | None = None,
                  dropout: float = 0.1, n_layer: int = 2, n_embd: int = 64) -> Path:
    """A GPT-2 (2 layers, d=64 unless given, heads of 32 dims up to d=64, of 64 above; GPT-2's dropout
    unless given) with a 400-token byte-level BPE tokenizer trained on ``text`` (and a ``chat_template``,
    which transformers saves as chat_template.jinja). Also benchmarks/pretrained_memory.py's checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(out)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=model_vocab or len(fast), n_layer=n_layer, n_head=max(2, n_embd // 64),
                        n_embd=n_embd, n_positions=128,
                        eos_token_id=fast.eos_token_id, bos_token_id=fast.eos_token_id, resid_pdrop=dropout,
                        embd_pdrop=dropout, attn_pdrop=dropout)
    GPT2LMHeadModel(config).save_pretrained(out)
    return out


def llama_checkpoint(out, vocab_size: int):
    """A Llama (2 layers, d=64, grouped-query attention) with random weights, written into ``out``
    (beside a tokenizer written there, e.g. by :func:`hf_checkpoint`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def bert_checkpoint(out: Path, texts: list[str], head: str = "", dropout: float = 0.1) -> Path:
    """A Hugging Face BERT directory with a WordPiece tokenizer trained on ``texts``, like a Hub
    checkpoint: the encoder alone, or with a ``head``: "mlm" (BertForMaskedLM) or "classifier"
    (BertForSequenceClassification, 2 labels); BERT's dropout unless given."""
    from tokenizers import (
        Tokenizer,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        BertForSequenceClassification,
        BertModel,
        PreTrainedTokenizerFast,
    )

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=1000, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]",
                                                                                       tok.token_to_id("[SEP]"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(out)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(fast), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=128, num_labels=2,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    model = {"": BertModel, "mlm": BertForMaskedLM, "classifier": BertForSequenceClassification}[head]
    model(config).save_pretrained(out)
    return out
