"""Sequence classification records: tsv/jsonl, label sets, padding and bucketing, partitioning, bad input."""

import csv
import hashlib
import json

import pytest
from torch.utils.data import DataLoader

from bigtrain.data.classification import ClassificationStream, prepare_classification
from bigtrain.data.errors import DataError
from bigtrain.data.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_text):
    return train_tokenizer([tiny_text.read_text()], 512)


@pytest.fixture(scope="module")
def records(tiny_text):
    lines = [line for line in tiny_text.read_text().splitlines() if line.strip()][:400]
    # the label is whether the line ends with punctuation; lengths vary from 1 word to ~12
    return [(line, "punct" if line[-1] in ".,;:!?" else "plain") for line in lines]


def write_tsv(path, rows, header=("text", "label")):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t")
        w.writerow(header)
        w.writerows(rows)
    return path


def test_tsv_and_jsonl_round_trip_with_inferred_and_given_labels(tmp_path, tok, records):
    tsv = write_tsv(tmp_path / "r.tsv", records)
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text("".join(json.dumps({"sentence": t, "y": y}) + "\n" for t, y in records))
    a = prepare_classification([tsv], tok, tmp_path / "a", log=lambda _m: None)
    b = prepare_classification([jsonl], tok, tmp_path / "b", labels=["plain", "punct"], text_field="sentence",
                               label_field="y", log=lambda _m: None)
    assert a["labels"] == ["plain", "punct"] == b["labels"]  # inferred: sorted
    assert a["records"] == b["records"] == len(records)
    assert sum(a["label_counts"]) == len(records)
    s = ClassificationStream(tmp_path / "b", global_batch=len(records), micro_batch=len(records), shuffle=False,
                             add_cls=False)
    batch = s.micro_batch_at(0)
    for k in (0, 17, 399):
        n = batch["attention_mask"][k].sum().item()
        assert tok.decode(batch["input_ids"][k, :n].tolist()) == records[k][0]
        assert (batch["input_ids"][k, n:] == tok.pad_id).all()
        assert b["labels"][batch["labels"][k]] == records[k][1]


def test_bucketing_cuts_padding_but_keeps_each_steps_records(tmp_path, tok, records):
    prepare_classification([write_tsv(tmp_path / "r.tsv", records)], tok, tmp_path / "set", log=lambda _m: None)

    def run(bucket, world=1):
        ranks = [ClassificationStream(tmp_path / "set", global_batch=64, micro_batch=8, seed=1, bucket=bucket,
                                      rank=r, world_size=world) for r in range(world)]
        steps, padding = [], 0
        for step in range(5):
            seen = []
            for s in ranks:
                for m in range(s.accum):
                    b = s.micro_batch_at(step * s.accum + m)
                    padding += (b["attention_mask"] == 0).sum().item()
                    seen += b["sample"].tolist()
            steps.append(sorted(seen))
        return steps, padding

    plain_steps, plain_pad = run(False)
    bucket_steps, bucket_pad = run(True)
    assert bucket_steps == plain_steps
    assert bucket_pad < 0.5 * plain_pad, (bucket_pad, plain_pad)
    two_steps, two_pad = run(True, world=2)  # the step's global batch is sorted across ranks
    assert two_steps == plain_steps and two_pad == bucket_pad
    # micro-batch m of both ranks holds neighbouring lengths: rank-to-rank spread stays small
    a, b = (ClassificationStream(tmp_path / "set", global_batch=64, micro_batch=8, seed=1, bucket=True,
                                 rank=r, world_size=2) for r in (0, 1))
    for m in range(a.accum):
        la, lb = (s.micro_batch_at(m)["attention_mask"].sum(1) for s in (a, b))
        assert la.max() <= lb.min()  # rank 0 takes group 2m, rank 1 group 2m + 1


def test_numeric_labels_keep_their_order_and_manifest_checksums_sources(tmp_path, tok, records):
    rows = [(t, str(i % 12)) for i, (t, _) in enumerate(records[:60])]
    tsv = write_tsv(tmp_path / "n.tsv", rows)
    m = prepare_classification([tsv], tok, tmp_path / "set", log=lambda _m: None)
    assert m["labels"] == [str(i) for i in range(12)] and m["label_counts"] == [5] * 12
    assert m["format"] == "bigtrain-records/1" and m["tokenizer_sha256"] == tok.fingerprint
    assert m["sources"][0]["sha256"] == hashlib.sha256(tsv.read_bytes()).hexdigest()
    s = ClassificationStream(tmp_path / "set", global_batch=60, micro_batch=60, shuffle=False)
    assert s.micro_batch_at(0)["labels"].tolist() == [i % 12 for i in range(60)]
    given = prepare_classification([tsv], tok, tmp_path / "given", labels=range(12), log=lambda _m: None)
    assert given["labels"] == m["labels"]


@pytest.mark.parametrize("bucket", [False, True])
def test_two_ranks_two_workers_cover_every_record_once(tmp_path, tok, records, bucket):
    prepare_classification([write_tsv(tmp_path / "r.tsv", records)], tok, tmp_path / "set", log=lambda _m: None)
    seen = []
    for rank in (0, 1):
        s = ClassificationStream(tmp_path / "set", global_batch=40, micro_batch=10, rank=rank, world_size=2,
                                 bucket=bucket)
        it = iter(DataLoader(s, batch_size=None, num_workers=2, prefetch_factor=2))
        for _ in range(len(records) // 40 * 2):
            b = next(it)
            seen += list(zip(b["position"].tolist(), b["sample"].tolist()))
    assert sorted(p for p, _ in seen) == list(range(len(records)))
    assert sorted(s for _, s in seen) == list(range(len(records)))


def test_bad_labels_and_lines_name_file_and_line(tmp_path, tok, records):
    rows = list(records[:20])
    rows[4] = (rows[4][0], "maybe")
    tsv = write_tsv(tmp_path / "bad.tsv", rows)
    with pytest.raises(DataError, match=r"bad.tsv:6: label 'maybe' is not in the label set \['plain', 'punct'\]"):
        prepare_classification([tsv], tok, tmp_path / "x", labels=["plain", "punct"], log=lambda _m: None)
    logs = []
    m = prepare_classification([tsv], tok, tmp_path / "y", labels=["plain", "punct"], on_bad_record="skip",
                               log=logs.append)
    assert m["records"] == 19 and m["bad_records_skipped"] == 1 and "bad.tsv:6" in logs[0]
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"text": "a", "label": "x"}\n{"text": "b", label}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        prepare_classification([jsonl], tok, tmp_path / "z", log=lambda _m: None)
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()
