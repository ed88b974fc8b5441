"""``task: sequence_classification``: BERT classifiers on (text, label) records, fine-tuned from a
Hugging Face checkpoint (``model.pretrained``) or trained from scratch.

``data.path`` holds the training records and ``data.val_path`` the held-out ones (``.tsv`` with a
header row, or ``.jsonl``; fields ``data.text_field`` and ``data.label_field``). The label set is
``data.labels``, or the sorted distinct labels of the training records. Both are prepared once
into record sets (``bigtrain/data/classification.py``), cached by content hash under the data
cache. The text is tokenized with the checkpoint's tokenizer and its special tokens
(``[CLS] text [SEP]``), or with a SentencePiece model trained on the training texts and a leading
``<cls>``; records are cut to ``train.seq_len`` tokens and micro-batches padded to their longest.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bigtrain.data.cache import default_cache_dir
from bigtrain.data.classification import (
    ClassificationStream,
    open_records,
    prepare_cached,
    read_records,
    records_tokenizer,
)
from bigtrain.data.errors import BadRecords, DataError
from bigtrain.data.sources import resolve_files
from bigtrain.data.tokenizer import load_tokenizer, open_tokenizer, train_tokenizer
from bigtrain.models import build_sequence_classifier, training_flops
from bigtrain.tasks.base import ClassificationTask, check_vocabulary


class SequenceClassificationTask(ClassificationTask):
    auto_class = "AutoModelForSequenceClassification"

    @staticmethod
    def logits_and_labels(model, batch):
        return model(input_ids=batch["input_ids"],
                     attention_mask=batch["attention_mask"]).logits.float(), batch["labels"]

    def prepare(self) -> None:
        roots = self.on_main(self._prepare_record_sets)
        self.train_root, self.val_root = Path(roots[0]), Path(roots[1]) if roots[1] else None
        self.manifest = open_records(self.train_root)
        self.tokenizer = load_tokenizer(records_tokenizer(self.train_root, self.manifest))

    def _prepare_record_sets(self) -> tuple[str, str | None]:
        data = self.cfg.data
        if data.path is None:
            raise DataError("data.path: not set (.tsv or .jsonl records with fields data.text_field and "
                            "data.label_field)")
        cache = Path(data.cache_dir or default_cache_dir()) / "records"
        fields = dict(text_field=data.text_field, label_field=data.label_field, on_bad_record=data.on_bad_record,
                      log=self.log)
        if data.tokenizer.path:
            tokenizer = open_tokenizer(data.tokenizer.path)
        else:
            texts = (text for text, _, _ in read_records(resolve_files(data.path), data.text_field, data.label_field,
                                                          BadRecords(skip=True)))
            tokenizer = train_tokenizer(texts, data.tokenizer.vocab_size, data.tokenizer.model_type,
                                        data.tokenizer.sample_bytes, threads=os.cpu_count() or 1)
        train = prepare_cached(data.path, tokenizer, cache, data.labels, **fields)
        if data.val_path is None:
            return str(train), None
        val = prepare_cached(data.val_path, tokenizer, cache, open_records(train)["labels"], **fields)
        return str(train), str(val)

    def stream(self, root: Path, global_batch: int, train: bool) -> ClassificationStream:
        cfg, info = self.cfg, self.info
        return ClassificationStream(root, global_batch, cfg.train.micro_batch_size, info.rank, info.world_size,
                                    cfg.seed, max_len=cfg.train.seq_len, shuffle=train and cfg.data.shuffle,
                                    shuffle_buffer=cfg.data.shuffle_buffer)

    def build_model(self) -> nn.Module:
        model = build_sequence_classifier(self.cfg.model, self.tokenizer.vocab_size, self.cfg.train.seq_len,
                                          self.tokenizer.pad_id, self.manifest["labels"],
                                          structure_only=self.weights_from_rank0)
        check_vocabulary(model, self.tokenizer.vocab_size, records_tokenizer(self.train_root, self.manifest))
        return model

    def flops_per_sample(self, model):
        """At the mean record length (records are padded per micro-batch)."""
        offsets = np.load(self.train_root / "offsets.npy", mmap_mode="r")
        extra = 0 if self.manifest.get("special_tokens_added") else 1  # the <cls> the stream prepends
        length = max(1, min(self.cfg.train.seq_len, round(float(offsets[-1]) / (len(offsets) - 1)) + extra))
        device = next(model.parameters()).device
        ids = torch.zeros((1, length), dtype=torch.long, device=device)
        return training_flops(model, input_ids=ids, attention_mask=torch.ones_like(ids))

    def summary(self, val_loss):
        counts = dict(zip(self.manifest["labels"], self.manifest["label_counts"]))
        return [f"labels {counts} ({self.manifest['records']:,} training records)"]
