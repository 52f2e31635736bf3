"""The byte tokenizer, the two corpora and their split, the batch sampler and the validation windows."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_ref.training import data


# ---------------------------------------------------------------------------------------------- tokenizer
@given(st.text())
def test_encode_decode_round_trip(text):
    ids = data.encode(text)
    assert ids.dtype == np.int64 and ids.ndim == 1
    assert ids.size == len(text.encode("utf-8"))
    assert data.decode(ids) == text


def test_encode_is_utf8_bytes():
    assert data.encode("aé\n").tolist() == [97, 0xC3, 0xA9, 10]
    assert data.ByteTokenizer().vocab_size == 256 == data.VOCAB_SIZE


def test_decode_replaces_invalid_utf8_and_rejects_bad_ids():
    assert data.decode([0xC3]) == "\ufffd"  # a lone lead byte
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        data.decode([65, 256])
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        data.decode([-1])
    with pytest.raises(ValueError, match="integer"):
        data.decode(np.array([65.0]))
    with pytest.raises(ValueError, match="str"):
        data.encode(b"bytes")


# ---------------------------------------------------------------------------------------------- split
def test_split_blocks_by_hand():
    train, val = data.split_blocks(np.arange(10), block=2, val_every=3)
    assert val.tolist() == [4, 5]  # block 2 of [0 1][2 3][4 5][6 7][8 9]
    assert train.tolist() == [0, 1, 2, 3, 6, 7, 8, 9]
    train, val = data.split_blocks(np.arange(13), block=2, val_every=3)
    assert val.tolist() == [4, 5, 10, 11]  # blocks 2 and 5; the short last block [12] is training
    assert train.tolist() == [0, 1, 2, 3, 6, 7, 8, 9, 12]


@pytest.fixture(scope="module")
def pre():
    return data.pretraining_corpus()


@pytest.fixture(scope="module")
def fine():
    return data.finetuning_corpus()


def test_pretraining_corpus_is_pydoc_split_90_10(pre):
    raw = data.pydoc_text().encode("utf-8")
    assert pre.train.dtype == np.uint8 and pre.val.dtype == np.uint8
    assert pre.train.size + pre.val.size == len(raw) > 300_000
    assert 0.09 < pre.val.size / len(raw) < 0.11
    # the val text is exactly the blocks 9, 19, 29, ... of the raw text
    B = data.SPLIT_BLOCK
    assert pre.val[:B].tobytes() == raw[9 * B:10 * B]
    assert pre.train[:9 * B].tobytes() == raw[:9 * B]
    assert b"assert" in raw[:2000]  # topics in sorted order: 'assert' comes first
    assert "The \u201cif\u201d statement" in data.pydoc_text() or 'The "if" statement' in data.pydoc_text()


def test_corpora_are_deterministic(pre, fine):
    again = data.pretraining_corpus()
    assert np.array_equal(again.train, pre.train) and np.array_equal(again.val, pre.val)
    assert again.fingerprint == pre.fingerprint
    assert data.finetuning_corpus().fingerprint == fine.fingerprint
    assert fine.fingerprint != pre.fingerprint


def test_finetuning_corpus_is_python_source(fine, pre):
    text = fine.train.tobytes().decode("utf-8")
    assert text.startswith("# Copyright 2007 Google, Inc.") or text.startswith('"""Abstract Base Classes')  # abc.py
    assert text.count("\ndef ") > 100 and text.count("import ") > 50
    assert 0.09 < fine.val.size / (fine.train.size + fine.val.size) < 0.11
    assert list(data.STDLIB_FILES) == sorted(data.STDLIB_FILES)
    # a different domain: the byte distributions differ clearly (total variation distance)
    p = np.bincount(pre.train, minlength=256) / pre.train.size
    q = np.bincount(fine.train, minlength=256) / fine.train.size
    assert 0.5 * np.abs(p - q).sum() > 0.1


def test_missing_stdlib_file_is_a_clear_error():
    with pytest.raises(ValueError, match="no_such_module.py"):
        data.stdlib_source_text(("no_such_module.py",))


def test_unigram_baseline_by_hand():
    uniform = np.repeat(np.arange(256, dtype=np.uint8), 4)
    c = data.Corpus("u", uniform, np.array([1, 2, 3], dtype=np.uint8))
    assert data.unigram_bits_per_byte(c) == pytest.approx(8.0, abs=1e-12)
    # train all zeros (n = 1000): p(0) = 1001 / 1256, so val of zeros costs -log2(1001/1256) bits/byte
    c = data.Corpus("z", np.zeros(1000, np.uint8), np.zeros(5, np.uint8))
    assert data.unigram_bits_per_byte(c) == pytest.approx(-np.log2(1001 / 1256), rel=1e-12)


# ---------------------------------------------------------------------------------------------- batches
def test_sample_batch_windows_and_shift():
    tokens = np.arange(1000) % 251
    x, y = data.sample_batch(tokens, 6, 17, np.random.default_rng(3))
    assert x.shape == y.shape == (6, 17) and x.dtype == y.dtype == np.int64
    assert np.array_equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    for row_x, row_y in zip(x, y):
        s = int(np.nonzero(np.arange(1000) % 251 == row_x[0])[0][0])  # candidate start
        starts = [s0 for s0 in range(s, 1000 - 17, 251) if np.array_equal(tokens[s0:s0 + 17], row_x)]
        assert starts and np.array_equal(tokens[starts[0] + 1:starts[0] + 18], row_y)
    x2, y2 = data.sample_batch(tokens, 6, 17, np.random.default_rng(3))
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    x3, _ = data.sample_batch(tokens, 6, 17, np.random.default_rng(4))
    assert not np.array_equal(x, x3)


def test_sample_batch_reaches_the_last_token():
    tokens = np.arange(20)
    seen = set()
    rng = np.random.default_rng(0)
    for _ in range(200):
        _, y = data.sample_batch(tokens, 4, 5, rng)
        seen.update(y.ravel().tolist())
    assert seen == set(range(1, 20))  # every target, the last token included


def test_sample_batch_bad_input():
    with pytest.raises(ValueError, match="rng"):
        data.sample_batch(np.arange(100), 2, 8, None)
    with pytest.raises(ValueError, match="seq"):
        data.sample_batch(np.arange(8), 2, 8, np.random.default_rng(0))
    with pytest.raises(ValueError, match="batch"):
        data.sample_batch(np.arange(100), 0, 8, np.random.default_rng(0))


def test_eval_batches_cover_without_overlap():
    tokens = np.arange(101)
    batches = list(data.eval_batches(tokens, batch=3, seq=10))
    xs = np.concatenate([x for x, _ in batches])
    ys = np.concatenate([y for _, y in batches])
    assert xs.shape == (10, 10)  # 100 // 10 windows
    assert np.array_equal(xs.ravel(), np.arange(100)) and np.array_equal(ys.ravel(), np.arange(1, 101))
    assert [len(x) for x, _ in batches] == [3, 3, 3, 1]
    few = list(data.eval_batches(tokens, batch=2, seq=10, max_batches=2))
    starts = np.concatenate([x[:, 0] for x, _ in few])
    assert starts.tolist() == [0, 30, 60, 90]  # evenly spread over the 10 windows
    with pytest.raises(ValueError, match="seq"):
        list(data.eval_batches(np.arange(5), batch=2, seq=10))
