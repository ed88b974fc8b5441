"""The streaming reader: sample order, rank x worker partitioning, exact resume (also on another
world size), mixtures, document boundaries, input formats and bad records."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from bigtrain.config import DataSection
from bigtrain.data.errors import DataError
from bigtrain.data.order import Mixture, SampleOrder
from bigtrain.data.prepare import prepare, prepare_sources
from bigtrain.data.stream import (
    CausalLMStream,
    StatefulLoader,
    document_ids,
    position_ids,
)
from bigtrain.data.tokenizer import Tokenizer
from conftest import count_opens, read_jsonl, run_cli, train_args

SEQ = 32


def data_cfg(path, cache, **kw) -> DataSection:
    return DataSection(path=str(path) if not isinstance(path, list) else path, cache_dir=str(cache),
                       val_fraction=0.05, tokenizer={"vocab_size": 512, **kw.pop("tokenizer", {})}, **kw)


@pytest.fixture(scope="module")
def prepared(tiny_text, tmp_path_factory):
    return prepare(data_cfg(tiny_text, tmp_path_factory.mktemp("cache")), log=lambda _m: None)


def stream(data, rank=0, world=1, global_batch=16, micro=4, seed=0, **kw):
    return CausalLMStream([data] if not isinstance(data, list) else data, SEQ, global_batch, micro,
                          rank, world, seed, **kw)


def read_steps(loader: StatefulLoader, steps: int) -> list[list[tuple[int, int]]]:
    """(position, sample) pairs of each of ``steps`` optimizer steps on this rank."""
    out = []
    for _ in range(steps):
        rows = []
        for _ in range(loader.stream.accum):
            b = loader.next()
            rows += list(zip(b["position"].tolist(), b["sample"].tolist()))
        out.append(rows)
    return out


def merge_ranks(per_rank: list[list[list[tuple[int, int]]]]) -> list[list[tuple[int, int]]]:
    """Global (position-sorted) steps from every rank's steps."""
    return [sorted(sum((r[s] for r in per_rank), [])) for s in range(len(per_rank[0]))]


# -- the order ------------------------------------------------------------------------------

def test_every_epoch_is_a_permutation_and_seeks_match_sequential_reads():
    order = SampleOrder(10_007, seed=3, chunk_size=1000, shuffle_buffer=512)
    e0, e1 = order.samples(0, 10_007), order.samples(10_007, 10_007)
    assert sorted(e0.tolist()) == list(range(10_007)) == sorted(e1.tolist())
    assert (e0 != e1).mean() > 0.9  # another epoch, another order
    fresh = SampleOrder(10_007, seed=3, chunk_size=1000, shuffle_buffer=512)
    assert fresh.samples(7_777, 50).tolist() == e0[7_777:7_827].tolist()  # a seek, no replay
    assert SampleOrder(10_007, seed=3, chunk_size=1000, shuffle_buffer=512).samples(0,
                                                                                    100).tolist() == e0[:100].tolist()
    assert (SampleOrder(10_007, seed=4, chunk_size=1000, shuffle_buffer=512).samples(0, 100) != e0[:100]).any()
    # bounded buffer: a block of 512 positions draws from at most 2 chunks (locality)
    assert len(set((e0[:512] // 1000).tolist())) <= 2
    assert SampleOrder(50, seed=0, shuffle=False).samples(45, 10).tolist() == [45, 46, 47, 48, 49, 0, 1, 2, 3, 4]


def test_mixture_follows_weights_and_each_source_advances_in_order():
    mix = Mixture([3.0, 1.0], seed=0, block=1000)
    located = [mix.locate(p) for p in range(10_000)]
    sources = np.array([s for s, _ in located])
    assert (sources == 0).mean() == pytest.approx(0.75)
    for k in (0, 1):
        assert [i for s, i in located if s == k] == list(range(int((sources == k).sum())))
    with pytest.raises(ValueError, match="weights"):
        Mixture([0.0, 0.0], seed=0)


# -- partitioning and resume ---------------------------------------------------------------------

def test_two_ranks_by_two_workers_read_every_sample_once_per_epoch(prepared):
    n = stream(prepared).num_samples
    steps = -(-n // 16) + 1
    per_rank = []
    for rank in (0, 1):
        s = stream(prepared, rank=rank, world=2, global_batch=16, micro=4)
        per_rank.append(read_steps(StatefulLoader(s, num_workers=2, prefetch_factor=2), steps))
    pairs = [p for step in merge_ranks(per_rank) for p in step]
    positions = [p for p, _ in pairs]
    assert positions == list(range(steps * 16))  # no gaps, no overlaps between ranks and workers
    epoch0 = [s for p, s in pairs if p < n]
    assert sorted(epoch0) == list(range(n))
    # the same global order as one process without workers
    single = read_steps(StatefulLoader(stream(prepared)), steps)
    assert merge_ranks(per_rank) == [sorted(step) for step in single]


@pytest.mark.parametrize("world_after", [2, 1])
def test_resume_at_any_step_continues_the_same_order(prepared, world_after):
    uninterrupted = read_steps(StatefulLoader(stream(prepared)), 12)
    loaders = [StatefulLoader(stream(prepared, rank=r, world=2), num_workers=2, prefetch_factor=2) for r in (0, 1)]
    first = merge_ranks([read_steps(lo, 5) for lo in loaders])
    states = [lo.state_dict() for lo in loaders]
    assert states[0] == states[1] and states[0]["position"] == 5 * 16
    state = json.loads(json.dumps(states[0]))  # as stored in a checkpoint
    resumed = []
    for r in range(world_after):
        lo = StatefulLoader(stream(prepared, rank=r, world=world_after), num_workers=2 if r == 0 else 0)
        lo.load_state_dict(state)
        resumed.append(read_steps(lo, 7))
    assert first + merge_ranks(resumed) == [sorted(step) for step in uninterrupted]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_loader_that_stages_the_next_batch_hands_out_the_same_batches_and_state(prepared, workers):
    """The device prefetch (on CUDA) reads one micro-batch ahead: the loop must still get the same
    batches, and a checkpoint the state of what it was handed, not of what is in flight. On CPU the
    copy is a no-op and the staging is the same code."""
    plain = StatefulLoader(stream(prepared, micro=4))
    staged = StatefulLoader(stream(prepared, micro=4), num_workers=workers, prefetch_factor=2,
                            device=torch.device("cpu"))
    for step in range(3):
        for _ in range(plain.stream.accum):
            a, b = plain.next(), staged.next()
            assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
        assert staged.state_dict() == plain.state_dict()
        assert staged.state_dict()["position"] == (step + 1) * 16  # the batch in flight is not counted
    state = staged.state_dict()
    later = [staged.next() for _ in range(3)]  # run on past the checkpoint, one more staged
    staged.load_state_dict(state)  # the resume drops what was staged
    again = [staged.next() for _ in range(3)]
    assert all(torch.equal(x["position"], y["position"]) and torch.equal(x["input_ids"], y["input_ids"])
               for x, y in zip(later, again))
    staged.seek(0)
    assert staged.next()["position"].tolist() == list(range(4))
    staged.close()


def test_state_is_only_defined_between_steps_and_rejects_other_data(prepared, tiny_text, tmp_path):
    lo = StatefulLoader(stream(prepared))
    lo.next()
    with pytest.raises(RuntimeError, match="step boundaries"):
        lo.state_dict()
    lo.next(), lo.next(), lo.next()
    state = lo.state_dict()
    other = StatefulLoader(stream(prepared, seed=1))
    with pytest.raises(DataError, match=r"different data \(seed: 0 -> 1\)"):
        other.load_state_dict(state)


def test_same_seed_same_batches_across_runs(prepared):
    a = StatefulLoader(stream(prepared, seed=5)).next()
    b = StatefulLoader(stream(prepared, seed=5), num_workers=2, prefetch_factor=2).next()
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert torch.equal(a["input_ids"][:, 1:], a["labels"][:, :-1])  # labels are the inputs shifted


# -- mixtures, documents ---------------------------------------------------------------------------

def test_mixture_of_two_sources_shares_one_tokenizer(tiny_text, tmp_path):
    text = tiny_text.read_text()
    half = tmp_path / "b.jsonl"
    half.write_text("".join(json.dumps({"text": p}) + "\n" for p in text[: len(text) // 3].split("\n\n")))
    cfg = DataSection(sources=[{"path": str(tiny_text), "weight": 3}, {"path": str(half), "weight": 1}],
                      cache_dir=str(tmp_path / "cache"), val_fraction=0.05, tokenizer={"vocab_size": 512})
    a, b = prepare_sources(cfg, log=lambda _m: None)
    assert a.manifest["tokenizer"]["sha256"] == b.manifest["tokenizer"]["sha256"]
    s = stream([a, b], weights=[3, 1], global_batch=1000, micro=1000)  # one mixture block: exact shares
    batch = s.micro_batch_at(0)
    counts = Counter(batch["source"].tolist())
    assert counts[0] == 750 and counts[1] == 250
    # a source prepared with another tokenizer is refused, naming its manifest
    other = prepare(data_cfg(half, tmp_path / "cache2", tokenizer={"vocab_size": 400}), log=lambda _m: None)
    with pytest.raises(DataError, match=r"manifest.json: prepared with a different tokenizer"):
        stream([a, other])
    with pytest.raises(DataError, match="prepared with a different tokenizer"):
        prepare(data_cfg(other.root, tmp_path / "c3", tokenizer={"path": str(a.tokenizer_path)}), log=lambda _m: None)


def test_a_mixture_trains_its_tokenizer_on_a_sample_of_every_source(tiny_text, tmp_path, monkeypatch):
    other = tmp_path / "other.txt"
    other.write_text(tiny_text.read_text()[:300_000].replace(" the ", " zyzzyva "))
    cfg = DataSection(sources=[{"path": str(tiny_text), "weight": 1}, {"path": str(other), "weight": 1}],
                      cache_dir=str(tmp_path / "cache"), val_fraction=0.05, tokenizer={"vocab_size": 512})
    opens = count_opens(monkeypatch, tiny_text, other)
    a, b = prepare_sources(cfg, log=lambda _m: None)
    assert opens == {tiny_text: 2, other: 2}  # the content hash, then one pass for the sample and the encoding
    assert a.manifest["tokenizer"]["sha256"] == b.manifest["tokenizer"]["sha256"]
    alone = prepare(data_cfg(tiny_text, tmp_path / "cache", tokenizer={"vocab_size": 512}), log=lambda _m: None)
    assert alone.root != a.root  # another tokenizer, another set
    mixed, first_only = Tokenizer.load(a.tokenizer_path), Tokenizer.load(alone.tokenizer_path)
    assert len(mixed.encode(" zyzzyva")) < len(first_only.encode(" zyzzyva"))  # learnt from the second source
    assert [d.root for d in prepare_sources(cfg, log=lambda _m: None)] == [a.root, b.root]  # cached
    # a source given as a prepared directory, anywhere in the mixture, gives the others its tokenizer
    given = DataSection(sources=[{"path": str(other)}, {"path": str(alone.root)}], cache_dir=str(tmp_path / "cache"),
                        val_fraction=0.05, tokenizer={"vocab_size": 512})
    c, d = prepare_sources(given, log=lambda _m: None)
    assert d.root == alone.root and c.manifest["tokenizer"]["sha256"] == alone.manifest["tokenizer"]["sha256"]


def test_document_boundaries_restart_positions():
    eos = 2
    tokens = torch.tensor([[5, 6, 2, 7, 8, 9, 2, 4]])
    docs = document_ids(tokens, eos)
    assert docs.tolist() == [[0, 0, 0, 1, 1, 1, 1, 2]]
    assert position_ids(docs).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]


def test_stream_yields_document_ids_on_request(prepared):
    b = stream(prepared, with_documents=True).micro_batch_at(0)
    eos = prepared.manifest["tokenizer"]["eos_id"]
    ids = b["input_ids"]
    for row in range(ids.shape[0]):
        ends = (ids[row] == eos).nonzero().flatten().tolist()
        assert b["document_ids"][row, -1].item() == len([e for e in ends if e < ids.shape[1] - 1])
        for e in ends:
            if e + 1 < ids.shape[1]:
                assert b["position_ids"][row, e + 1].item() == 0


# -- inputs and bad records ------------------------------------------------------------------------

def test_parquet_tsv_and_hf_inputs_give_the_same_documents(tiny_text, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    paras = [p for p in tiny_text.read_text()[:200_000].split("\n\n") if p]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paras))
    pq.write_table(pa.table({"text": paras, "id": list(range(len(paras)))}), tmp_path / "a.parquet")
    with open(tmp_path / "a.tsv", "w", newline="") as fh:
        import csv
        w = csv.writer(fh, delimiter="\t")
        w.writerow(["id", "text"])
        w.writerows([i, p] for i, p in enumerate(paras))
    datasets.Dataset.from_dict({"text": paras}).save_to_disk(str(tmp_path / "saved"))
    tok = None
    tokens = {}
    for name, reader in [("a.jsonl", "native"), ("a.parquet", "native"), ("a.tsv", "native"), ("saved", "native"),
                         ("a.jsonl", "hf"), ("a.parquet", "hf")]:
        extra = {"tokenizer": {"path": str(tok)}} if tok else {}
        d = prepare(data_cfg(tmp_path / name, tmp_path / f"c-{name}-{reader}", reader=reader, **extra),
                    log=lambda _m: None)
        tok = tok or d.tokenizer_path
        assert d.manifest["documents"] == len(paras), (name, reader)
        tokens[(name, reader)] = np.concatenate([np.asarray(m) for m in d.memmaps("train")])
    first = next(iter(tokens.values()))
    for key, t in tokens.items():
        assert np.array_equal(t, first), key


def test_bad_records_fail_or_are_skipped_and_counted(tmp_path, tiny_text):
    paras = [p for p in tiny_text.read_text()[:100_000].split("\n\n") if p]
    lines = [json.dumps({"text": p}) for p in paras]
    lines[3] = '{"text": oops}'
    lines[7] = '{"body": "no text field"}'
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:4: not valid JSON"):
        prepare(data_cfg(bad, tmp_path / "c1"), log=lambda _m: None)
    logs = []
    d = prepare(data_cfg(bad, tmp_path / "c2", on_bad_record="skip"), log=logs.append)
    assert d.manifest["documents"] == len(paras) - 2
    assert d.manifest["stats"]["bad_records_skipped"] == 2
    assert any("skipped 2 bad records" in m and "bad.jsonl:4" in m for m in logs)
    tsv = tmp_path / "bad.tsv"
    tsv.write_text("text\tlabel\nfine\t1\nextra\tcolumn\there\n")
    with pytest.raises(DataError, match=r"bad.tsv:3: 3 columns, the header has 2"):
        prepare(data_cfg(tsv, tmp_path / "c3"), log=lambda _m: None)
    with pytest.raises(DataError, match=r"bad.tsv:1: header has no column 'body'"):
        prepare(data_cfg(tsv, tmp_path / "c4", text_field="body"), log=lambda _m: None)


# -- through the trainer: real processes ----------------------------------------------------------------

def sample_order(run_dir) -> dict[int, list[tuple[int, int]]]:
    """step -> sorted (position, sample) pairs over all ranks; the last write of a step wins."""
    steps: dict[int, dict[int, list]] = {}
    for f in sorted(run_dir.glob("samples-rank*.jsonl")):
        rank = int(f.stem.removeprefix("samples-rank"))
        for rec in read_jsonl(f):
            steps.setdefault(rec["step"], {}).setdefault(rank, [])
            steps[rec["step"]][rank].extend(zip(rec["position"], rec["sample"]))
    return {s: sorted(sum(r.values(), [])) for s, r in steps.items()}


@pytest.mark.dist
@pytest.mark.slow
def test_trainer_resumes_2_ranks_on_1_with_the_same_samples(tmp_path, cache_dir, tiny_text):
    common = ["strategy.name=ddp", "data.log_samples=true", "train.eval_every=0", "train.sample_tokens=0",
              "data.num_workers=1", "data.shuffle_buffer=64"]
    ref = tmp_path / "ref"
    proc = run_cli(*train_args(ref, cache_dir, tiny_text, "train.max_steps=8", *common))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    proc = run_cli(*train_args(run, cache_dir, tiny_text, "train.max_steps=3", *common), "--nproc", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((run / "checkpoints" / "step-3" / "trainer_state.json").read_text())
    assert state["data"]["position"] == 3 * 8
    proc = run_cli(*train_args(run, cache_dir, tiny_text, "train.max_steps=8", *common))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    got, want = sample_order(run), sample_order(ref)
    assert sorted(got) == list(range(8))
    assert got == want


# -- HF streaming datasets, used directly -------------------------------------------------------------

def hf_json_stream(path):
    import datasets

    return datasets.load_dataset("json", data_files=[str(path)], split="train", streaming=True)


def test_hf_iterable_dataset_resumes_exactly_and_splits_by_rank(prepared, tiny_text, tmp_path):
    import json as _json

    from bigtrain.data.hf_stream import HFTokenStream
    from bigtrain.data.tokenizer import Tokenizer

    tok = Tokenizer.load(prepared.tokenizer_path)
    paras = [p for p in tiny_text.read_text()[:150_000].split("\n\n") if p]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(_json.dumps({"text": p, "id": i}) + "\n" for i, p in enumerate(paras)))

    def stream(rank=0, world=1):
        return HFTokenStream(hf_json_stream(src), tok, seq_len=SEQ, micro_batch=4, accum=2, rank=rank, world_size=world)

    ref = stream()
    want = [ref.next()["input_ids"] for _ in range(10)]
    first = stream()
    got = [first.next()["input_ids"] for _ in range(4)]
    state = _json.loads(_json.dumps(first.state_dict()))
    again = stream()
    again.load_state_dict(state)
    got += [again.next()["input_ids"] for _ in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    # two ranks read disjoint halves of the documents: together, every token once
    total = sum(len(tok.encode(p)) + 1 for p in paras)
    seen = 0
    for rank in (0, 1):
        s = stream(rank, 2)
        with pytest.raises(StopIteration, match="ran out of documents"):
            while True:
                seen += s.next()["input_ids"].numel() + 4
    assert total - 2 * 4 * (SEQ + 1) < seen <= total
    s = stream(0, 2)
    s.next(), s.next()
    with pytest.raises(DataError, match="saved by 2 ranks, this run has 1"):
        stream().load_state_dict(s.state_dict())


def test_path_and_sources_together_are_one_line_config_error():
    from bigtrain.config import ConfigError, load_config
    from conftest import TEST_CONFIG

    with pytest.raises(ConfigError, match=r"set either data.path \(one source\) or data.sources"):
        load_config(TEST_CONFIG, ["data.path=a.txt", "data.sources=[{path: b.txt, weight: 2}]"])
    cfg = load_config(TEST_CONFIG, ["data.sources=[{path: a.txt, weight: 2}, {path: b.jsonl}]"])
    assert cfg.data.weights == [2.0, 1.0] and [s.path for s in cfg.data.source_sections()] == ["a.txt", "b.jsonl"]
