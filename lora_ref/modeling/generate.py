"""Text generation: a streaming token generator with a KV cache, stop tokens, and incremental detokenization.

A causal language model gives the distribution of the next token; generation is the loop around it
[Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration", for sampling and its truncations]:

1. **Prefill.** The whole prompt goes through the model once; every layer's keys and values are kept in a
   :class:`lora_ref.modeling.llama.KVCache`. Only the last position's logits are needed, so the head (a D × V product, the
   largest single matrix of a small model) runs on that position alone.
2. **Decode.** Pick a token from the last logits (:func:`lora_ref.modeling.llama.sample_next_token`: argmax when greedy,
   else a draw from softmax(logits / T) among the top-k), feed that single token back, read the earlier
   positions from the cache, repeat. Each step costs one position of work, not the whole sequence.
3. **Stop** at an end-of-sequence token (the ids of ``generation_config.json``'s ``eos_token_id``, else
   ``config.json``'s, else the tokenizer's ``eos_token``), which is not yielded, or after ``max_new_tokens``.

Greedy decoding here equals transformers' ``generate(do_sample=False)`` token for token (tested on
SmolLM2-135M-Instruct): same model, same argmax, same stop rule — transformers appends the end token to its
output, :func:`generate_tokens` does not yield it.

:class:`TextStream` turns the token stream into text as it comes. Decoding token by token does not work for
byte-level BPE: one character (``é``, an emoji) may span several tokens, and a lone piece decodes to U+FFFD.
``TextStream`` decodes the tokens not yet printed, and holds the text back while it ends in an incomplete
character (the approach of transformers' ``TextStreamer``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from lora_ref.autograd.tensor import no_grad
from lora_ref.modeling.llama import KVCache, _check_sampling, _is_int, sample_next_token

__all__ = ["TextStream", "generate", "generate_tokens", "stop_token_ids"]


def stop_token_ids(folder: str | os.PathLike, tokenizer=None) -> tuple[int, ...]:
    """The end-of-sequence ids of a model folder, as transformers' ``generate`` reads them.

    ``generation_config.json``'s ``eos_token_id`` (an int or a list) if present, else ``config.json``'s, else the
    tokenizer's ``eos_token_id``. A byte-level folder (no ``tokenizer.json``, ``tokenizer`` a
    :class:`~lora_ref.modeling.tokenizer.ByteTokenizer`) without ``generation_config.json`` has none: its
    ``config.json`` carries ``LlamaConfig``'s default ``eos_token_id`` (2), a byte the tutorial model was never
    taught to end with, so it generates to the length asked.
    """
    from lora_ref.modeling.tokenizer import ByteTokenizer

    folder = Path(folder)
    for name in ("generation_config.json", "config.json"):
        path = folder / name
        if not path.is_file():
            continue
        if name == "config.json" and isinstance(tokenizer, ByteTokenizer):
            return ()
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        eos = doc.get("eos_token_id") if isinstance(doc, dict) else None
        if eos is None:
            continue
        ids = eos if isinstance(eos, list) else [eos]
        if not all(_is_int(i) and i >= 0 for i in ids):
            raise ValueError(f"{path}: eos_token_id must be a non-negative integer or a list of them, got {eos!r}")
        return tuple(int(i) for i in ids)
    eos = getattr(tokenizer, "eos_token_id", None)
    return () if eos is None else (int(eos),)


def _last_logits(model, ids: np.ndarray, cache: KVCache) -> np.ndarray:
    """Logits (B, V) of the last position of ``ids`` (B, T), run through ``model`` with ``cache``.

    Runs the decoder stack on every position (their keys and values go into the cache) and the head only on the
    last one: for a 30-token prompt of SmolLM2 that skips 29 of 30 products with the 49,152 × 576 head.
    """
    ids = model.check_ids(ids, past=cache.length)
    h = model.model(ids, cache)  # (B, T, D)
    return np.asarray(model.lm_head(h[:, -1:, :]).data)[:, -1, :]  # (B, V)


def generate_tokens(model, prompt_ids, max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
                    rng: np.random.Generator | None = None, stop_ids: Sequence[int] = (),
                    decode_threads: int | None = 1) -> Iterator[int]:
    """Yield new token ids one at a time after ``prompt_ids`` (1-D, or (1, T)), as soon as each is chosen.

    Stops after ``max_new_tokens`` tokens, or at a token in ``stop_ids`` (not yielded). ``temperature=0`` is
    greedy; ``temperature > 0`` samples (restricted to the ``top_k`` most likely tokens when given) and needs an
    explicit ``rng``, so a seed reproduces the text. The prompt plus ``max_new_tokens`` must fit the model's
    ``max_position_embeddings`` (checked before any work). The model runs in eval mode under ``no_grad``; its
    training flag is restored when the generator finishes or is closed.

    The prompt runs with the threads in force; the one-token steps with ``decode_threads`` threads in Numba and
    the BLAS (default 1, see :func:`lora_ref.threads.limited`; ``None`` leaves the setting alone, as
    ``lora-ref generate`` and ``lora-ref chat`` do with the threads they were given). A model the
    compiled decoder covers (:func:`lora_ref.modeling.decode.unsupported` is None: float32 or 4-bit projections
    without LoRA) takes its one-token steps through :class:`lora_ref.modeling.decode.Decoder`, one compiled call
    per token; any other model runs the module graph with a :class:`KVCache`. Both give the same tokens.
    """
    if decode_threads is not None and (not _is_int(decode_threads) or decode_threads < 1):
        raise ValueError(f"decode_threads must be a positive integer or None, got {decode_threads!r}")
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    _check_sampling(temperature, top_k, rng)
    ids = np.asarray(prompt_ids)
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise ValueError(f"prompt_ids must be one sequence (T,) or (1, T), got shape {ids.shape}")
    ids = model.check_ids(ids)
    limit = model.config.max_position_embeddings
    if ids.shape[1] + max_new_tokens > limit:
        raise ValueError(f"sequence too long: {ids.shape[1]} prompt tokens + {max_new_tokens} new tokens exceed "
                         f"max_position_embeddings={limit}")
    stops = {int(s) for s in stop_ids}
    return _generate(model, ids, max_new_tokens, temperature, top_k, rng, stops, decode_threads)


def _generate(model, ids, max_new_tokens, temperature, top_k, rng, stops, decode_threads) -> Iterator[int]:
    from lora_ref.modeling.decode import unsupported
    from lora_ref.threads import limited

    was_training = model.training
    model.eval()
    try:
        if max_new_tokens > 0 and unsupported(model) is None:
            yield from _generate_compiled(model, ids, max_new_tokens, temperature, top_k, rng, stops, decode_threads)
            return
        cache = KVCache(model.config.num_hidden_layers)
        step = ids  # (1, T): the whole prompt first, then one token at a time
        for i in range(max_new_tokens):
            with no_grad(), limited(decode_threads if i > 0 else None):
                logits = _last_logits(model, step, cache)  # (1, V)
            token = int(sample_next_token(logits, temperature=temperature, top_k=top_k, rng=rng)[0])
            if token in stops:
                return
            yield token
            step = np.array([[token]], dtype=np.int64)
    finally:
        model.train(was_training)


def _generate_compiled(model, ids, max_new_tokens, temperature, top_k, rng, stops, decode_threads) -> Iterator[int]:
    """The same loop with :class:`lora_ref.modeling.decode.Decoder`'s one-token steps (one compiled call each)."""
    from lora_ref.modeling.decode import Decoder
    from lora_ref.threads import limited

    decoder = Decoder(model, ids.shape[1] + max_new_tokens)
    logits = decoder.prefill(ids[0])  # (V,), with the threads in force
    for i in range(max_new_tokens):
        token = int(sample_next_token(logits[None, :], temperature=temperature, top_k=top_k, rng=rng)[0])
        if token in stops:
            return
        yield token
        if i + 1 < max_new_tokens:
            with limited(decode_threads):
                logits = decoder.step(token)  # (V,)


def generate(model, prompt_ids, max_new_tokens: int, **kwargs) -> list[int]:
    """All of :func:`generate_tokens` as a list (the generated ids only, the stop token excluded)."""
    return list(generate_tokens(model, prompt_ids, max_new_tokens, **kwargs))


class TextStream:
    """Incremental detokenization: ``push(token)`` returns the text that became printable, ``finish()`` the rest.

    The concatenation of everything returned equals ``tokenizer.decode(all tokens)`` for byte-level BPE and the
    byte tokenizer. Text is held back while the decoded tail ends in U+FFFD (a character whose bytes have not all
    arrived); ``finish`` releases it as it decodes.
    """

    def __init__(self, tokenizer, *, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.tokens: list[int] = []
        self._start = 0  # first token not yet fully printed
        self._printed = 0  # characters of decode(tokens[_start:]) already returned

    def _text(self) -> str:
        return self.tokenizer.decode(self.tokens[self._start:], skip_special_tokens=self.skip_special_tokens)

    def push(self, token: int) -> str:
        self.tokens.append(int(token))
        text = self._text()
        if text.endswith("\ufffd"):
            return ""  # an incomplete character: wait for its other bytes
        new = text[self._printed:]
        if text.endswith("\n"):  # a safe point: start afresh so the decoded window stays short
            self._start, self._printed = len(self.tokens), 0
        else:
            self._printed = len(text)
        return new

    def finish(self) -> str:
        text = self._text()
        new = text[self._printed:]
        self._start, self._printed = len(self.tokens), 0
        return new
