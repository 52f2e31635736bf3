"""Evaluation of a language model on a text: mean next-token negative log-likelihood and perplexity.

The definition (``lora-ref eval`` and :func:`evaluate_tokens`):

1. The text's tokens, encoded with no special tokens added: t_0, t_1, …, t_{N−1}.
2. Cut into consecutive, non-overlapping windows of ``seq`` tokens; the last, shorter window counts when it has
   at least 2 tokens (a window of 1 token predicts nothing).
3. Within each window the model reads the tokens left to right and predicts every token from the ones before it
   *in the same window*: a window of n tokens gives n − 1 predictions; its first token is context only.
4. loss = the mean over all predicted positions of −log p(t_i | window's earlier tokens), in nats;
   perplexity = exp(loss).

``tokens`` in the result counts the predicted positions (N minus the number of windows, when the last window
is kept), the denominator of the mean. Non-overlapping windows are the cheap convention: each token is scored
once, but tokens early in a window see little context, so the figure is higher than a sliding-window evaluation
with a stride would give (transformers' "Perplexity of fixed-length models" guide discusses the trade-off).
Comparable numbers need the same ``seq``.
"""

from __future__ import annotations

import math

import numpy as np

from lora_ref.autograd.tensor import no_grad

__all__ = ["evaluate_tokens", "window_nll", "windows"]

#: logits elements (batch × time × vocabulary) computed at once; bounds the memory of a batch of windows
MAX_LOGITS = 1 << 24


def windows(ids, seq: int) -> list[np.ndarray]:
    """Consecutive windows of ``seq`` tokens of ``ids`` (1-D); a last window of at least 2 tokens is kept."""
    if isinstance(seq, bool) or not isinstance(seq, (int, np.integer)) or seq < 2:
        raise ValueError(f"seq must be an integer >= 2 (a window predicts its tokens after the first), got {seq!r}")
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    out = [ids[i:i + seq] for i in range(0, ids.size, seq)]
    return [w for w in out if w.size >= 2]


def window_nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per-window sums of −log softmax(logits)[next token]: ``logits`` (B, T, V) float, ``ids`` (B, T) → (B,) float64.

    Position t's logits predict token t + 1, so the last position predicts nothing. log-sum-exp is taken after
    subtracting the row maximum (no overflow), the sums are accumulated in float64.
    """
    z = logits[:, :-1, :]  # (B, T-1, V)
    target = ids[:, 1:]  # (B, T-1)
    m = z.max(axis=-1, keepdims=True)  # (B, T-1, 1)
    lse = np.log(np.exp(z - m).sum(axis=-1, dtype=np.float64)) + m[..., 0]  # (B, T-1)
    picked = np.take_along_axis(z, target[..., None], axis=-1)[..., 0]  # (B, T-1)
    return (lse - picked).sum(axis=-1, dtype=np.float64)


def evaluate_tokens(model, ids, seq: int = 128, *, progress: bool = False) -> dict:
    """Mean next-token NLL of ``model`` on ``ids`` (1-D token ids) in windows of ``seq`` (see the module docstring).

    Returns ``{"loss", "perplexity", "tokens", "windows", "text_tokens", "seq"}``: ``loss`` in nats per predicted
    token, ``tokens`` the number of predicted positions, ``text_tokens`` the length of ``ids``. Raises
    ``ValueError`` when ``seq`` exceeds the model's ``max_position_embeddings`` or ``ids`` has fewer than 2
    tokens. Full windows run in batches (at most :data:`MAX_LOGITS` logits at once); the model runs in eval
    mode under ``no_grad``, its training flag restored afterwards.
    """
    limit = model.config.max_position_embeddings
    if isinstance(seq, (int, np.integer)) and not isinstance(seq, bool) and seq > limit:
        raise ValueError(f"seq {seq} is longer than the model's context (max_position_embeddings={limit})")
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise ValueError(f"ids must be a 1-D integer array, got {ids.dtype} with shape {ids.shape}")
    wins = windows(ids, seq)
    if not wins:
        raise ValueError(f"the text has {ids.size} token(s); evaluation needs at least 2")
    V = model.config.vocab_size
    per_batch = max(1, MAX_LOGITS // (seq * V))
    groups: list[np.ndarray] = []
    full = [w for w in wins if w.size == seq]
    for i in range(0, len(full), per_batch):
        groups.append(np.stack(full[i:i + per_batch]))  # (b, seq)
    if wins[-1].size != seq:
        groups.append(wins[-1][None, :])  # (1, n)
    total, count = 0.0, 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(g.size for g in groups), unit="tok", desc="eval", leave=False)
    was_training = model.training
    model.eval()
    try:
        for g in groups:
            with no_grad():
                logits = np.asarray(model(g).data)  # (b, n, V)
            total += float(window_nll(logits, g).sum())
            count += g.shape[0] * (g.shape[1] - 1)
            if bar is not None:
                bar.update(g.size)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count, "windows": len(wins),
            "text_tokens": int(ids.size), "seq": int(seq)}
