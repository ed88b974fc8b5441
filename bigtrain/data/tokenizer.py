"""SentencePiece tokenizer: train on a corpus, load, encode/decode losslessly.

Trained with identity normalisation, no dummy prefix, byte fallback and ``\\n`` as its own
piece, so ``decode(encode(text)) == text`` for any UTF-8 text.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# Control pieces (never produced by encoding text) for BERT-style tasks: ids 4, 5, 6.
SPECIAL_PIECES = ("<mask>", "<cls>", "<sep>")


class Tokenizer:
    def __init__(self, model_proto: bytes):
        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        return cls(Path(path).read_bytes())

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    def piece_id(self, piece: str) -> int:
        """Id of a special piece such as ``<mask>``; KeyError if the model lacks it."""
        idx = self.sp.piece_to_id(piece)
        if idx == self.sp.unk_id() and piece != self.sp.id_to_piece(idx):
            raise KeyError(f"tokenizer has no piece {piece!r}")
        return idx

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.proto).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str], threads: int = 1) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode(list(ids))

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.proto)


def _training_lines(documents: Iterable[str], max_bytes: int) -> Iterator[str]:
    used = 0
    for doc in documents:
        for line in doc.split("\n"):
            if not line.strip():
                continue
            yield line
            used += len(line) + 1
            if used >= max_bytes:
                return


def train_tokenizer(documents: Iterable[str], vocab_size: int, model_type: str = "bpe",
                    max_bytes: int = 20_000_000, threads: int = 1) -> Tokenizer:
    """Train a SentencePiece model on (a prefix of) ``documents``."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_lines(documents, max_bytes),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        user_defined_symbols=["\n"],
        allow_whitespace_only_pieces=True,
        split_digits=True,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        control_symbols=list(SPECIAL_PIECES),
        max_sentence_length=1 << 16,
        num_threads=threads,
        minloglevel=2,
    )
    return Tokenizer(buf.getvalue())
