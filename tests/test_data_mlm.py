"""Masked-LM batches on real text: 15% masked, 80/10/10, specials kept, whole words, exact resume."""

import pytest
import torch

from bigtrain.config import DataSection
from bigtrain.data.mlm import IGNORE, MaskedLMStream, word_ids, word_tables
from bigtrain.data.prepare import prepare
from bigtrain.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def prepared(tiny_text, tmp_path_factory):
    cfg = DataSection(path=str(tiny_text), cache_dir=str(tmp_path_factory.mktemp("c")), val_fraction=0.05,
                      tokenizer={"vocab_size": 512})
    return prepare(cfg, log=lambda _m: None)


def batch(prepared, **kw):
    s = MaskedLMStream([prepared], 128, 256, 256, seed=kw.pop("seed", 0), **kw)
    return s, s.micro_batch_at(0)


def test_masking_statistics_on_real_text(prepared):
    s, b = batch(prepared)
    masked = b["labels"] != IGNORE
    original = torch.where(masked, b["labels"], b["input_ids"])
    special = torch.isin(original, torch.tensor(s.special_ids))
    assert masked.float().sum() / (~special).sum() == pytest.approx(0.15, abs=0.01)
    assert not (masked & special).any()
    n = masked.sum().item()
    as_mask = (b["input_ids"][masked] == s.mask_id).sum().item() / n
    kept = (b["input_ids"][masked] == b["labels"][masked]).sum().item() / n
    assert as_mask == pytest.approx(0.8, abs=0.03)
    assert kept == pytest.approx(0.1, abs=0.03)  # random replacements may hit the same id: rare
    assert 1 - as_mask - kept == pytest.approx(0.1, abs=0.03)
    assert (b["input_ids"][~masked] == original[~masked]).all()
    replaced = b["input_ids"][masked & (b["input_ids"] != s.mask_id)]
    assert not torch.isin(replaced, torch.tensor(s.special_ids)).any()  # random tokens are never special


def test_masks_are_drawn_from_seed_and_position(prepared):
    _, a = batch(prepared)
    s2 = MaskedLMStream([prepared], 128, 256, 64, rank=1, world_size=2, seed=0)
    b = s2.micro_batch_at(0)  # positions 128..191 of the same global order
    assert torch.equal(b["input_ids"], a["input_ids"][128:192]) and torch.equal(b["labels"], a["labels"][128:192])
    _, c = batch(prepared, seed=1)
    assert not torch.equal(c["labels"], a["labels"])
    # resume at step 1 with another world size: the same masks as an uninterrupted run
    run = MaskedLMStream([prepared], 128, 32, 16, seed=0)
    expected = run.micro_batch_at(2)
    resumed = MaskedLMStream([prepared], 128, 32, 8, rank=0, world_size=2, seed=0)
    resumed.load_state_dict(run.state_dict(steps_done=1))
    got = resumed.micro_batch_at(0)
    assert torch.equal(got["input_ids"], expected["input_ids"][:8]) and torch.equal(got["labels"],
                                                                                    expected["labels"][:8])


def test_words_of_our_sentencepiece_pieces(prepared):
    tok = Tokenizer.load(prepared.tokenizer_path)
    ids = torch.tensor(tok.encode("First Citizen:\nBefore we  proceed"))
    words = word_ids(ids, *word_tables(tok))
    text = [tok.decode(ids[words == w].tolist()) for w in range(int(words.max()) + 1)]
    # a line's first word has no leading space; newlines and extra spaces are words of their own
    assert text == ["First", " Citizen:", "\n", "Before", " we", " ", " proceed"]


def test_whole_word_masking_masks_words_in_full(prepared):
    s, b = batch(prepared, whole_word=True)
    tok = Tokenizer.load(prepared.tokenizer_path)
    starts, ends = word_tables(tok)
    masked = b["labels"] != IGNORE
    original = torch.where(masked, b["labels"], b["input_ids"])
    special = torch.isin(original, torch.tensor(s.special_ids))
    words_seen = 0
    for row in range(original.shape[0]):
        words = word_ids(original[row], starts, ends)
        for w in torch.unique(words[masked[row]]):
            in_word = (words == w) & ~special[row]
            assert masked[row][in_word].all()
            words_seen += 1
    assert words_seen > 100
    assert masked.float().sum() / (~special).sum() == pytest.approx(0.15, abs=0.03)
