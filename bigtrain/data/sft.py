"""Supervised fine-tuning records: conversations -> token ids with a loss mask -> batches.

Records are ``.jsonl`` lines holding a conversation under ``data.messages_field`` (a list of
``{"role", "content"}``, at least one ``assistant`` message), or a prompt and a response
(``data.prompt_field``, ``data.response_field``). A conversation is rendered with the tokenizer's
chat template by transformers' ``apply_chat_template`` (jinja2), and the rendered text is
tokenized as a whole without added special tokens, as ``apply_chat_template(tokenize=True)``
does. The tokens trained on are the assistant turns': the text each assistant message adds to
the conversation before it rendered with ``add_generation_prompt=True`` (its content and the
template's end-of-turn marker: the model learns to answer, then to stop). A token overlapping
such a span is a target (transformers' rule for ``return_assistant_tokens_mask``). A
prompt/response record is the conversation ``[user: prompt, assistant: response]`` when the
tokenizer has a chat template, else the plain text ``prompt + response + eos``, the response and
eos being the targets. A record without a response, or a conversation the template does not
render turn by turn, raises :class:`DataError` naming the file and line (``data.on_bad_record:
skip`` counts and skips it).

A prepared set (``bigtrain-sft/1``) is a directory: ``tokens.bin`` (every record's ids back to
back), ``targets.bin`` (uint8 per token: 1 = a response token), ``offsets.npy`` (int64, N + 1),
the tokenizer's files and ``manifest.json``, built by :func:`bigtrain.data.cache.build_set` and
cached by the content of the inputs and the tokenizer (chat template included).

:class:`SFTStream` serves rows of at most ``seq_len`` tokens (longer records are cut). A token's
label is the record's next token when that one is a target, else -100. Without packing a row is
one record, and each micro-batch is padded to its longest row (``attention_mask``). With packing,
records are packed into rows once, by best-fit decreasing (:func:`pack_records`), and a row
carries ``position_ids`` that restart at 0 at every record (and at its padding) and no attention
mask: transformers then builds a block-diagonal causal mask from the restarts (its packed-sequence
format, ``masking_utils.find_packed_sequence_indices``; flash attention uses them as sequence
boundaries), so no record attends to another one. Rows are then ordered like every other sample
(``SampleOrder``: seeded shuffle, exact resume).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigtrain.data.cache import build_set, file_entry, key_digest
from bigtrain.data.errors import BadRecords, DataError
from bigtrain.data.order import SampleOrder
from bigtrain.data.shards import MANIFEST, check_files, load_manifest, sha256_file, token_dtype
from bigtrain.data.sources import content_fingerprint, jsonl_records, resolve_files
from bigtrain.data.stream import PositionalStream
from bigtrain.data.tokenizer import HFTokenizer, load_tokenizer

FORMAT = "bigtrain-sft/1"
IGNORE = -100


@dataclass(frozen=True)
class Fields:
    """The record fields (``data.messages_field``, ``data.prompt_field``, ``data.response_field``)."""

    messages: str = "messages"
    prompt: str = "prompt"
    response: str = "response"


def read_sft_records(files: Sequence[Path], fields: Fields, bad: BadRecords) -> Iterator[tuple[Any, str]]:
    """Yield (a list of messages, or a (prompt, response) pair; "file:line") per usable record."""
    for f in map(Path, files):
        if f.suffix != ".jsonl":
            raise DataError(f"{f}: sft records must be .jsonl (one JSON object per line)")
        for where, rec in jsonl_records(f, bad):
            if not isinstance(rec, dict):
                bad(where, "expected a JSON object")
            elif fields.messages in rec:
                messages = rec[fields.messages]
                problem = _messages_problem(messages, fields.messages)
                if problem:
                    bad(where, problem)
                else:
                    yield [{"role": m["role"], "content": m["content"]} for m in messages], where
            elif not isinstance(rec.get(fields.prompt), str):
                bad(where, f"expected a '{fields.messages}' list of {{role, content}} messages, or a string "
                           f"'{fields.prompt}' and '{fields.response}'")
            elif not isinstance(rec.get(fields.response), str) or not rec[fields.response]:
                bad(where, f"no response: expected a non-empty string '{fields.response}' beside '{fields.prompt}'")
            else:
                yield (rec[fields.prompt], rec[fields.response]), where


def _messages_problem(messages: Any, field: str) -> str | None:
    if not isinstance(messages, list) or not messages:
        return f"'{field}' must be a non-empty list of {{role, content}} messages"
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"'{field}'[{k}] must be an object with a string 'role' and a string 'content'"
    if not any(m["role"] == "assistant" for m in messages):
        return f"no response: '{field}' has no assistant message"
    if messages[0]["role"] == "assistant":
        return f"'{field}'[0] is the assistant's (a conversation starts with a system or user message)"
    return None


class Renderer:
    """Text and target spans of records, with a Hugging Face tokenizer's chat template (if any)."""

    def __init__(self, tokenizer: HFTokenizer):
        self.tokenizer = tokenizer
        self._hf = None
        eos = tokenizer.special.get("eos_token")
        self.eos_text = eos if eos is not None and tokenizer.eos_id >= 0 else None

    @property
    def has_template(self) -> bool:
        return self.tokenizer.chat_template is not None

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if self._hf is None:
            from transformers import PreTrainedTokenizerFast

            self._hf = PreTrainedTokenizerFast.from_pretrained(self.tokenizer.directory, local_files_only=True)
        return self._hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def text_and_spans(self, record: Any, where: str) -> tuple[str, list[tuple[int, int]]]:
        """The record's text and the character spans of its response(s); DataError (as is) if the
        template does not render the conversation turn by turn."""
        if isinstance(record, tuple) and not self.has_template:
            prompt, response = record
            if self.eos_text is None:
                raise DataError(f"{self.tokenizer.directory}: the tokenizer names no eos_token to end the "
                                f"responses of prompt/response records with (and has no chat template)")
            return prompt + response + self.eos_text, [(len(prompt), len(prompt) + len(response) + len(self.eos_text))]
        messages = record if isinstance(record, list) else [{"role": "user", "content": record[0]},
                                                            {"role": "assistant", "content": record[1]}]
        text = self.render(messages, add_generation_prompt=False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            through = self.render(messages[: i + 1], add_generation_prompt=False)
            if not (through.startswith(before) and text.startswith(through)):
                raise DataError(f"{where}: the chat template does not render this conversation turn by turn (message "
                                f"{i} does not extend the text before it), so its response tokens cannot be found")
            spans.append((len(before), len(through)))
        return text, spans

    def encode(self, record: Any, where: str) -> tuple[list[int], np.ndarray]:
        """Token ids and their targets (1: overlaps a response span)."""
        text, spans = self.text_and_spans(record, where)
        enc = self.tokenizer.backend.encode(text, add_special_tokens=False)
        offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
        targets = np.zeros(len(enc.ids), dtype=np.uint8)
        for start, end in spans:
            targets |= (offsets[:, 1] > start) & (offsets[:, 0] < end)
        return enc.ids, targets


def prepare_sft(files: Sequence[Path], tokenizer: HFTokenizer, out_dir: Path, fields: Fields = Fields(),
                on_bad_record: str = "error", log=print) -> dict[str, Any]:
    """Render and tokenize the records of ``files`` into a prepared set at ``out_dir``; its manifest."""
    bad = BadRecords(skip=on_bad_record == "skip")
    renderer = Renderer(tokenizer)
    ids, targets, has_chat = [], [], False
    for record, where in read_sft_records(files, fields, bad):
        if isinstance(record, list) and not renderer.has_template:
            raise DataError(f"{tokenizer.directory}: the tokenizer has no chat template (tokenizer_config.json "
                            f"'chat_template' or chat_template.jinja) to render the '{fields.messages}' records of "
                            f"{where.rsplit(':', 1)[0]}")
        has_chat |= isinstance(record, list)
        try:
            x, t = renderer.encode(record, where)
        except DataError as err:
            bad(where, str(err).removeprefix(f"{where}: "))
            continue
        if not t.any():
            bad(where, "the response renders to no tokens")
            continue
        ids.append(x)
        targets.append(t)
    if not ids:
        raise DataError(f"{files[0]}: no usable sft records")
    if bad.count:
        log(f"data: {bad.summary()}")
    dtype = token_dtype(tokenizer.vocab_size)
    lengths = np.array([len(x) for x in ids], dtype=np.int64)

    def write(tmp: Path) -> dict[str, Any]:
        np.concatenate([np.asarray(x, dtype=dtype) for x in ids]).tofile(tmp / "tokens.bin")
        np.concatenate(targets).tofile(tmp / "targets.bin")
        np.save(tmp / "offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        tokenizer.save_files(tmp)
        return {"format": FORMAT, "records": len(ids), "dtype": dtype.str, "tokens": int(lengths.sum()),
                "target_tokens": int(sum(int(t.sum()) for t in targets)), "max_record_tokens": int(lengths.max()),
                "chat_template": renderer.has_template, "tokenizer_sha256": tokenizer.fingerprint,
                "tokenizer_file": tokenizer.main_file, "bad_records_skipped": bad.count,
                "sources": [{"path": str(f), "bytes": Path(f).stat().st_size, "sha256": sha256_file(Path(f))}
                            for f in files],
                "files": {n: file_entry(tmp / n)
                          for n in ("tokens.bin", "targets.bin", "offsets.npy", *tokenizer.file_names)}}

    return build_set(Path(out_dir), write, replace=True)


def prepare_sft_cached(path, tokenizer: HFTokenizer, cache_root: Path, fields: Fields = Fields(),
                       on_bad_record: str = "error", log=print) -> Path:
    """The prepared set of the records at ``path`` (file, directory or glob), built into
    ``cache_root/<content hash>`` unless it already is there."""
    files = resolve_files(path)
    key = {"format": FORMAT, "inputs": content_fingerprint(files, memo_dir=cache_root),
           "tokenizer": tokenizer.fingerprint,
           "fields": [fields.messages, fields.prompt, fields.response], "on_bad_record": on_bad_record}
    root = Path(cache_root) / key_digest(key)
    if (root / MANIFEST).is_file():
        log(f"data: using prepared sft records {root} (cached by content hash)")
        return root
    manifest = prepare_sft(files, tokenizer, root, fields, on_bad_record, log)
    log(f"data: {manifest['records']:,} sft records, {manifest['tokens']:,} tokens "
        f"({manifest['target_tokens']:,} response tokens) -> {root}")
    return root


def open_sft(root: str | Path, verify: str = "size") -> dict[str, Any]:
    root = Path(root)
    manifest = load_manifest(root, FORMAT, "a prepared sft set")
    check_files(root, [{"file": name, **entry} for name, entry in manifest["files"].items()], verify)
    return manifest


def pack_records(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Record ids grouped into rows of at most ``capacity`` tokens, by best-fit decreasing (each
    record, longest first, goes into the fullest row it fits in); records keep their file order
    within a row, rows are ordered by their first record. Deterministic."""
    rows: list[list[int]] = []
    by_room: dict[int, list[int]] = {}  # free tokens -> rows with that much room
    rooms: list[int] = []  # the distinct free amounts, sorted (at most capacity of them)
    for i in np.argsort(-np.asarray(lengths), kind="stable"):
        n = int(lengths[i])
        k = bisect.bisect_left(rooms, n)
        if k == len(rooms):
            row, room = len(rows), capacity
            rows.append([])
        else:
            room = rooms[k]
            row = by_room[room].pop()
            if not by_room[room]:
                del by_room[room]
                rooms.pop(k)
        rows[row].append(int(i))
        room -= n
        if room > 0:
            if room not in by_room:
                bisect.insort(rooms, room)
                by_room[room] = []
            by_room[room].append(row)
    return sorted(sorted(r) for r in rows)


class SFTStream(PositionalStream):
    """Rows of one record (``attention_mask``) or of packed records (``position_ids``), with
    ``input_ids``, ``labels`` (-100 but on response tokens), ``sample`` (row ids) and ``position``."""

    def __init__(self, root: str | Path, seq_len: int, global_batch: int, micro_batch: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, packing: bool = False, shuffle: bool = True,
                 shuffle_buffer: int = 16384):
        super().__init__(global_batch, micro_batch, rank, world_size)
        self.root, self.seq_len, self.seed, self.packing = Path(root), seq_len, seed, packing
        self.manifest = open_sft(self.root)
        self.pad_id = max(0, load_tokenizer(self.root / self.manifest["tokenizer_file"]).pad_id)
        offsets = np.load(self.root / "offsets.npy")
        self.lengths = np.minimum(np.diff(offsets), seq_len)
        rows = pack_records(self.lengths, seq_len) if packing else [[i] for i in range(len(self.lengths))]
        self.row_records = np.array([i for r in rows for i in r], dtype=np.int64)
        self.row_starts = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
        self.order = SampleOrder(len(rows), seed, shuffle_buffer=shuffle_buffer, shuffle=shuffle)
        self._arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}

    def _open(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._arrays is None:
            self._arrays = (np.memmap(self.root / "tokens.bin", dtype=np.dtype(self.manifest["dtype"]), mode="r"),
                            np.memmap(self.root / "targets.bin", dtype=np.uint8, mode="r"),
                            np.load(self.root / "offsets.npy", mmap_mode="r"))
        return self._arrays

    @property
    def num_samples(self) -> int:
        return self.order.num_samples

    @property
    def truncated(self) -> int:
        """Records longer than ``seq_len`` (cut)."""
        offsets = np.load(self.root / "offsets.npy", mmap_mode="r")
        return int((np.diff(offsets) > self.seq_len).sum())

    @property
    def mean_row_tokens(self) -> float:
        """Tokens per row (not counting padding), averaged over the set."""
        return float(self.lengths.sum()) / self.num_samples

    def fingerprint(self) -> dict[str, Any]:
        return {"records": self.manifest["files"]["tokens.bin"]["sha256"], "seed": self.seed,
                "shuffle": self.order.shuffle, "shuffle_buffer": self.order.shuffle_buffer, "seq_len": self.seq_len,
                "packing": self.packing}

    def records_of(self, row: int) -> np.ndarray:
        return self.row_records[self.row_starts[row]:self.row_starts[row + 1]]

    def record(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, labels) of record ``i``, cut to ``seq_len``."""
        tokens, targets, offsets = self._open()
        start, n = int(offsets[i]), int(self.lengths[i])
        ids = np.asarray(tokens[start:start + n], dtype=np.int64)
        labels = np.full(n, IGNORE, dtype=np.int64)
        labels[:-1] = np.where(np.asarray(targets[start + 1:start + n]) > 0, ids[1:], IGNORE)
        return ids, labels

    def prompt_ids(self, i: int) -> list[int]:
        """Record ``i``'s tokens before its first response token (what a model answers)."""
        ids, labels = self.record(i)
        first = int(np.flatnonzero(labels != IGNORE)[0]) + 1 if (labels != IGNORE).any() else len(ids)
        return ids[:first].tolist()

    def build(self, positions: np.ndarray) -> dict[str, torch.Tensor]:
        rows = [self.order.sample_at(int(p)) for p in positions]
        parts = [[self.record(int(i)) for i in self.records_of(r)] for r in rows]
        width = max(sum(len(ids) for ids, _ in p) for p in parts)
        x = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        y = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        where = torch.zeros((len(rows), width), dtype=torch.long)  # attention mask, or position ids
        for k, p in enumerate(parts):
            at = 0
            for ids, labels in p:
                x[k, at:at + len(ids)] = torch.from_numpy(ids)
                y[k, at:at + len(ids)] = torch.from_numpy(labels)
                where[k, at:at + len(ids)] = torch.arange(len(ids)) if self.packing else 1
                at += len(ids)
            if self.packing:  # the padding is one more sequence of its own
                where[k, at:] = torch.arange(width - at)
        batch = {"input_ids": x, "labels": y, "sample": torch.tensor(rows), "position": torch.from_numpy(positions)}
        batch["position_ids" if self.packing else "attention_mask"] = where
        return batch
