"""Data: a byte-level tokenizer, two offline corpora that ship with CPython, and a seeded batch sampler.

Byte-level tokens need no vocabulary file: a text is its UTF-8 bytes, so the vocabulary is the 256 byte values and
every string round-trips exactly. The two corpora come with every CPython 3.11+ installation, so nothing is
downloaded:

- **pretraining** (:func:`pretraining_corpus`): the English help text of ``pydoc_data.topics`` (the pages that
  ``help("if")`` shows; about 465 KB), topics joined in sorted order.
- **fine-tuning** (:func:`finetuning_corpus`): the source code of a fixed, sorted list of standard-library modules
  (:data:`STDLIB_FILES`, about 700 KB of Python), a different domain than the prose the model is pretrained on.

Each corpus is cut into blocks of :data:`SPLIT_BLOCK` bytes; every :data:`VAL_EVERY`-th block goes to validation
and the rest to training. The split is deterministic and spreads validation text over the whole corpus, so the
validation loss measures the same kind of text the model trains on. The exact bytes depend on the Python version
(the help text changes between releases); :attr:`Corpus.fingerprint` identifies them, and the artifact cache keys
on it.

Shapes: B batch, T time (sequence length).
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

VOCAB_SIZE = 256
SPLIT_BLOCK = 4096  # bytes per block of the train/validation split
VAL_EVERY = 10  # block i is validation when i % VAL_EVERY == VAL_EVERY - 1 (10% of the text)

# Standard-library modules that are single files in every CPython from 3.11 on (sorted; never reorder: the order
# is part of the corpus and so of the cache key).
STDLIB_FILES: tuple[str, ...] = (
    "abc.py", "argparse.py", "bisect.py", "calendar.py", "colorsys.py", "contextlib.py", "copy.py", "csv.py",
    "dataclasses.py", "difflib.py", "enum.py", "fnmatch.py", "fractions.py", "functools.py", "heapq.py",
    "keyword.py", "numbers.py", "operator.py", "queue.py", "random.py", "shlex.py", "statistics.py",
    "textwrap.py", "tokenize.py", "types.py", "weakref.py",
)


# ----------------------------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------------------------

def encode(text: str) -> np.ndarray:
    """UTF-8 bytes of ``text`` as token ids: int64 array (N,), values in [0, 256)."""
    if not isinstance(text, str):
        raise ValueError(f"encode expects a str, got {type(text).__name__}")
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)


def decode(ids) -> str:
    """Text of token ids (any integer array-like, values in [0, 256)); invalid UTF-8 becomes U+FFFD."""
    arr = np.asarray(ids)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"decode expects integer token ids, got dtype {arr.dtype}")
    arr = arr.reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= VOCAB_SIZE):
        raise ValueError(f"token ids must lie in [0, {VOCAB_SIZE}); got min {arr.min()}, max {arr.max()}")
    return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class ByteTokenizer:
    """The byte-level tokenizer as an object (``vocab_size``, ``encode``, ``decode``) for code that expects one."""

    vocab_size = VOCAB_SIZE

    def encode(self, text: str) -> np.ndarray:
        return encode(text)

    def decode(self, ids) -> str:
        return decode(ids)


# ----------------------------------------------------------------------------------------------------------------
# corpora
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Corpus:
    """A tokenized corpus split into training and validation tokens (uint8 arrays, one byte per token)."""

    name: str
    train: np.ndarray  # (N_train,) uint8
    val: np.ndarray  # (N_val,) uint8

    @property
    def fingerprint(self) -> str:
        """SHA-256 (hex, first 16 digits) of the name, the split and both token streams: the corpus's identity."""
        h = hashlib.sha256()
        h.update(f"{self.name}|{SPLIT_BLOCK}|{VAL_EVERY}|{self.train.size}|{self.val.size}|".encode())
        h.update(self.train.tobytes())
        h.update(self.val.tobytes())
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        return f"Corpus({self.name!r}, train={self.train.size:,} bytes, val={self.val.size:,} bytes)"


def split_blocks(tokens: np.ndarray, block: int = SPLIT_BLOCK, val_every: int = VAL_EVERY) -> tuple[np.ndarray, np.ndarray]:
    """Split a token stream into (train, val): block ``i`` of ``block`` tokens is validation iff ``i % val_every == val_every - 1``."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"split_blocks expects a 1-D token stream, got shape {tokens.shape}")
    if block < 1 or val_every < 2:
        raise ValueError(f"need block >= 1 and val_every >= 2, got block={block}, val_every={val_every}")
    starts = np.arange(0, tokens.size, block)
    is_val = (np.arange(starts.size) % val_every) == val_every - 1
    pieces = [tokens[s:s + block] for s in starts]
    train = np.concatenate([p for p, v in zip(pieces, is_val) if not v] or [tokens[:0]])
    val = np.concatenate([p for p, v in zip(pieces, is_val) if v] or [tokens[:0]])
    return train, val


def corpus_from_text(name: str, text: str) -> Corpus:
    """Tokenize ``text`` and split it with :func:`split_blocks`."""
    tokens = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    train, val = split_blocks(tokens)
    if val.size == 0:
        raise ValueError(f"corpus {name!r} is too small to split ({tokens.size} bytes; need > {SPLIT_BLOCK * (VAL_EVERY - 1)})")
    return Corpus(name, train.copy(), val.copy())


def pydoc_text() -> str:
    """The help topics of ``pydoc_data.topics``, in sorted topic order, separated by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip("\n") for k in sorted(topics)) + "\n"


def stdlib_source_text(files: tuple[str, ...] = STDLIB_FILES) -> str:
    """The source of the standard-library files ``files`` (names relative to the stdlib folder), concatenated."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for name in files:
        path = root / name
        if not path.is_file():
            raise ValueError(f"standard-library source file not found: {path} (is this a full CPython install?)")
        parts.append(path.read_text(encoding="utf-8"))
    return "\n\n".join(p.strip("\n") for p in parts) + "\n"


def pretraining_corpus() -> Corpus:
    """English prose: CPython's ``pydoc_data.topics`` help text (about 465 KB), split 90/10."""
    return corpus_from_text("pydoc_topics", pydoc_text())


def finetuning_corpus() -> Corpus:
    """Python source: the standard-library files in :data:`STDLIB_FILES` (about 700 KB), split 90/10."""
    return corpus_from_text("stdlib_source", stdlib_source_text())


def unigram_bits_per_byte(corpus: Corpus) -> float:
    """Cross-entropy (bits/byte) on ``corpus.val`` of the byte frequencies of ``corpus.train`` (add-one smoothed).

    The baseline a model must beat: what predicting each byte from its overall frequency alone achieves.
    """
    counts = np.bincount(corpus.train, minlength=VOCAB_SIZE).astype(np.float64) + 1.0
    logp = np.log2(counts / counts.sum())
    return float(-logp[corpus.val].mean())


# ----------------------------------------------------------------------------------------------------------------
# batches
# ----------------------------------------------------------------------------------------------------------------

def sample_batch(tokens: np.ndarray, batch: int, seq: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random windows of a token stream: inputs ``x`` (B, T) and next-token targets ``y`` (B, T), int64.

    Window ``b`` starts at ``s_b ~ U{0, ..., N - T - 1}`` (drawn from ``rng``); ``y[b, t] = x[b, t + 1]`` in the
    stream, i.e. ``y[b] = tokens[s_b + 1 : s_b + T + 1]``.
    """
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"sample_batch needs an explicit rng (np.random.Generator), got {type(rng).__name__}")
    tokens = np.asarray(tokens)
    if batch < 1 or seq < 1:
        raise ValueError(f"batch and seq must be >= 1, got batch={batch}, seq={seq}")
    if tokens.ndim != 1 or tokens.size < seq + 1:
        raise ValueError(f"need a 1-D token stream of at least seq + 1 = {seq + 1} tokens, got shape {tokens.shape}")
    starts = rng.integers(0, tokens.size - seq, size=batch)  # (B,)
    idx = starts[:, None] + np.arange(seq + 1)[None, :]  # (B, T + 1)
    window = tokens[idx].astype(np.int64)  # (B, T + 1)
    return window[:, :-1], window[:, 1:]


def eval_batches(tokens: np.ndarray, batch: int, seq: int, max_batches: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Deterministic, non-overlapping windows covering the stream (or ``max_batches`` batches evenly spread).

    Yields ``(x, y)`` pairs, int64 (B, T) each (the last batch may be smaller). Used for validation loss so that
    every evaluation sees the same text.
    """
    tokens = np.asarray(tokens)
    n_windows = (tokens.size - 1) // seq
    if n_windows < 1:
        raise ValueError(f"need at least seq + 1 = {seq + 1} tokens for one window, got {tokens.size}")
    starts = np.arange(n_windows) * seq
    n_batches = -(-n_windows // batch)
    if max_batches is not None and max_batches < n_batches:
        pick = np.linspace(0, n_windows - 1, max_batches * batch).round().astype(np.int64)  # evenly spread
        starts = starts[np.unique(pick)]
    for i in range(0, starts.size, batch):
        s = starts[i:i + batch]
        idx = s[:, None] + np.arange(seq + 1)[None, :]  # (B, T + 1)
        window = tokens[idx].astype(np.int64)
        yield window[:, :-1], window[:, 1:]
