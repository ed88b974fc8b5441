"""Tokenizers: bigtrain's own SentencePiece model, or a Hugging Face checkpoint's.

:class:`Tokenizer` (``tokenizer.model``) is trained on the corpus with identity normalisation, no
dummy prefix, byte fallback and ``\\n`` as its own piece, so ``decode(encode(text)) == text`` for
any UTF-8 text. :class:`HFTokenizer` is a fast tokenizer as Hugging Face saves it next to a model
(``tokenizer.json`` + ``tokenizer_config.json``), read with the ``tokenizers`` library (no torch):
what fine-tuning a pretrained checkpoint must tokenize with. :func:`load_tokenizer` opens either;
:func:`open_tokenizer` opens ``data.tokenizer.path`` with one-line :class:`DataError` messages.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Union

import sentencepiece as spm

from bigtrain.data.errors import DataError

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# Control pieces (never produced by encoding text) for BERT-style tasks: ids 4, 5, 6.
SPECIAL_PIECES = ("<mask>", "<cls>", "<sep>")


class Tokenizer:
    """bigtrain's SentencePiece model (``tokenizer.model``)."""

    kind = "sentencepiece"
    main_file = "tokenizer.model"

    def __init__(self, model_proto: bytes):
        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
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

    def masking_ids(self) -> tuple[int, list[int]]:
        """(the mask id, the ids never masked) for masked-LM; KeyError without ``<mask>``."""
        mask = self.piece_id("<mask>")
        control = [self.piece_id(p) for p in SPECIAL_PIECES]
        ids = {self.sp.unk_id(), self.sp.bos_id(), self.eos_id, self.pad_id, *control}
        return mask, sorted(i for i in ids if i >= 0)

    def word_starts(self) -> list[str]:
        """Each id's piece (whole-word masking reads word boundaries from them)."""
        return [self.sp.id_to_piece(i) for i in range(self.vocab_size)]

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

    @property
    def file_names(self) -> list[str]:
        return [self.main_file]

    def save_files(self, directory: str | Path) -> list[Path]:
        """Write the tokenizer's :attr:`file_names` into ``directory``; return their paths."""
        self.save(Path(directory) / self.main_file)
        return [Path(directory) / self.main_file]


HF_CONFIGS = ("tokenizer_config.json", "special_tokens_map.json")  # special tokens, by role
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers >= 4.47 saves a chat template
HF_FILES = ("tokenizer.json", *HF_CONFIGS, CHAT_TEMPLATE_FILE)
_ROLES = ("eos_token", "sep_token", "pad_token", "bos_token", "cls_token", "mask_token", "unk_token")


class HFTokenizer:
    """A Hugging Face fast tokenizer directory. Text is encoded without the model's special tokens
    (bigtrain packs documents itself, separated by ``eos_id``: the eos token, else the sep token)."""

    kind = "hf"
    main_file = "tokenizer.json"

    def __init__(self, directory: str | Path):
        from tokenizers import Tokenizer as Backend

        self.directory = Path(directory)
        main = self.directory / self.main_file
        if not main.is_file():
            raise FileNotFoundError(f"{self.directory}: no {self.main_file} (bigtrain reads Hugging Face fast "
                                    f"tokenizers; AutoTokenizer.from_pretrained(dir).save_pretrained(dir) writes one)")
        self.backend = Backend.from_file(str(main))
        self.special = {}  # role -> token text, from tokenizer_config.json / special_tokens_map.json
        self.chat_template: str | None = None  # the default chat template, if the tokenizer has one
        for name in reversed(HF_CONFIGS):
            path = self.directory / name
            if path.is_file():
                config = json.loads(path.read_text())
                if name == HF_CONFIGS[0]:
                    self.chat_template = _default_template(config.get("chat_template"))
                for role in _ROLES:
                    value = config.get(role)
                    value = value.get("content") if isinstance(value, dict) else value
                    if isinstance(value, str):
                        self.special[role] = value
        if (self.directory / CHAT_TEMPLATE_FILE).is_file():
            self.chat_template = (self.directory / CHAT_TEMPLATE_FILE).read_text()

    def _role_id(self, *roles: str) -> int:
        for role in roles:
            if role in self.special and self.backend.token_to_id(self.special[role]) is not None:
                return self.backend.token_to_id(self.special[role])
        return -1

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        """-1 when the tokenizer names neither an eos nor a sep token."""
        return self._role_id("eos_token", "sep_token")

    @property
    def pad_id(self) -> int:
        return self._role_id("pad_token", "eos_token", "sep_token")

    def piece_id(self, piece: str) -> int:
        idx = self.backend.token_to_id(piece)
        if idx is None:
            raise KeyError(f"tokenizer has no piece {piece!r}")
        return idx

    def masking_ids(self) -> tuple[int, list[int]]:
        """(the mask token's id, the ids never masked: every special token) for masked-LM; KeyError
        when the tokenizer names no mask token."""
        mask = self._role_id("mask_token")
        if mask < 0:
            raise KeyError("tokenizer names no mask_token")
        ids = {self._role_id(role) for role in _ROLES}
        ids |= {i for i, token in self.backend.get_added_tokens_decoder().items() if token.special}
        return mask, sorted(i for i in ids if i >= 0)

    @property
    def fingerprint(self) -> str:
        blob = (self.directory / self.main_file).read_bytes() + json.dumps(self.special, sort_keys=True).encode()
        if self.chat_template is not None:
            blob += self.chat_template.encode()
        return hashlib.sha256(blob).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], threads: int = 1, special: bool = False) -> list[list[int]]:
        """``special``: with the model's own special tokens (BERT: ``[CLS] text [SEP]``)."""
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=special)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    @property
    def file_names(self) -> list[str]:
        return [name for name in HF_FILES if (self.directory / name).is_file()]

    def save_files(self, directory: str | Path) -> list[Path]:
        written = [Path(directory) / name for name in self.file_names]
        for path in written:
            shutil.copyfile(self.directory / path.name, path)
        return written


def _default_template(value) -> str | None:
    """``tokenizer_config.json``'s ``chat_template``: a string, or a list of {name, template} (the
    one named "default")."""
    if isinstance(value, list):
        value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"), None)
    return value if isinstance(value, str) else None


AnyTokenizer = Union[Tokenizer, HFTokenizer]  # noqa: UP007 (a runtime alias)


def load_tokenizer(path: str | Path) -> AnyTokenizer:
    """A SentencePiece ``.model`` file, or a Hugging Face tokenizer (its ``tokenizer.json``, or a
    directory holding one, such as a model directory); a directory holding ``tokenizer.model``
    only opens that."""
    path = Path(path)
    if path.is_dir():
        if (path / HFTokenizer.main_file).is_file():
            return HFTokenizer(path)
        if (path / Tokenizer.main_file).is_file():
            return Tokenizer.load(path / Tokenizer.main_file)
        raise FileNotFoundError(f"{path}: holds no tokenizer.json (Hugging Face) or tokenizer.model (SentencePiece)")
    if path.name == HFTokenizer.main_file:
        return HFTokenizer(path.parent)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such tokenizer file")
    return Tokenizer.load(path)


def open_tokenizer(path: str) -> AnyTokenizer:
    """``data.tokenizer.path`` opened, or a one-line DataError; it must name an eos (or sep)
    token, which separates the packed documents."""
    try:
        tokenizer = load_tokenizer(path)
    except (OSError, RuntimeError, ValueError) as err:
        raise DataError(f"data.tokenizer.path: {err}") from None
    if tokenizer.eos_id < 0:
        raise DataError(f"data.tokenizer.path: {path}: the tokenizer names no eos_token or sep_token "
                        f"(bigtrain separates documents with it)")
    return tokenizer


def sample_lines(documents: Iterable[str], max_bytes: int) -> Iterator[str]:
    """The non-blank lines of ``documents`` in order, until ``max_bytes`` (each line's length + 1)
    are used: the sample a tokenizer trains on. Draws no document beyond the one that fills it."""
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
    return train_on_lines(sample_lines(documents, max_bytes), vocab_size, model_type, threads)


def train_on_lines(lines: Iterable[str], vocab_size: int, model_type: str = "bpe", threads: int = 1) -> Tokenizer:
    """Train a SentencePiece model on every one of ``lines`` (a sample, e.g. from :func:`sample_lines`)."""
    buf = io.BytesIO()
    try:
        _train_sentencepiece(lines, buf, vocab_size, model_type, threads)
    except RuntimeError as err:  # SentencePiece's own words for a vocabulary that cannot be trained
        needed = re.search(r"required_chars\. (\d+) vs (\d+)", str(err))
        if needed:
            raise DataError(f"data.tokenizer.vocab_size: {vocab_size} is too small for this text (it needs at "
                            f"least {needed.group(2)}: its characters and 256 byte pieces)") from None
        if "Vocabulary size too high" in str(err):
            limit = re.search(r"value <= (\d+)", str(err))
            raise DataError(f"data.tokenizer.vocab_size: {vocab_size} is more pieces than this text holds "
                            f"(at most {limit.group(1) if limit else '?'}); lower it") from None
        raise
    return Tokenizer(buf.getvalue())


def _train_sentencepiece(lines: Iterable[str], buf: io.BytesIO, vocab_size: int, model_type: str,
                         threads: int) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
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
