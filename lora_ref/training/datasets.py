"""The user's training data as token ids with loss masks: plain text, chat records, prompt–completion records.

Every example is a token sequence ``ids`` (L,) with a boolean ``mask`` (L,): ``mask[t]`` says that token ``t`` is a
training target, predicted by the model from ``ids[:t]``. The model reads ``x = ids[:-1]`` and is scored on
``y = ids[1:]`` where the mask is set; everywhere else the target is :data:`IGNORE_INDEX` (−100), which
:func:`lora_ref.autograd.functional.cross_entropy` leaves out of the mean, as ``torch.nn.functional.cross_entropy`` does. So
the loss of a batch is the mean negative log-likelihood over its *target tokens*, however the examples are padded.

Three kinds of file (:func:`load_data`):

``.txt`` — causal language modelling on the whole text. The text is tokenized once (no special tokens added) and
    cut into consecutive windows of ``seq`` tokens; a last window of at least 2 tokens counts. Every token but the
    first of its window is a target. This is the same windowing and the same number as ``lora-ref eval``'s
    loss, so :func:`mean_nll` on a text file *is* that evaluation loss.

``.jsonl`` with ``{"messages": [{"role": ..., "content": ...}, ...]}`` — chat records. The model folder's chat
    template renders the conversation; the loss covers the assistant turns only: each assistant message's content
    and the end-of-turn token that closes it (the tokenizer's ``eos_token``, ``<|im_end|>`` for ChatML models), so
    the model learns both the answers and when to stop. System and user turns, the template's role headers and
    anything after the end-of-turn token (ChatML's newline) are context only. How the turns are found is
    explained at :func:`chat_example`.

``.jsonl`` with ``{"prompt": ..., "completion": ...}`` — the loss covers the completion only, as TRL's
    ``SFTTrainer`` does for prompt–completion data (``completion_only_loss``). TRL's two forms are followed:

    - *standard*: both strings. They are joined **raw**, with no template and no separator (put the space or
      newline you want into the prompt or the completion), and the end-of-sequence token is appended to the
      completion if the tokenizer has one (TRL appends ``eos_token`` too), so the model learns to stop. To train
      a chat model through its template, write the record in the conversational form or as ``messages``.
    - *conversational*: both lists of messages (``"prompt": [{"role": "user", ...}]``, ``"completion":
      [{"role": "assistant", ...}]``). The conversation ``prompt + completion`` is a chat record whose loss
      covers the assistant turns of the completion.

    In the standard form the prompt and the completion are tokenized **separately** and the ids concatenated.
    TRL tokenizes ``prompt + completion`` as one string and masks the first ``len(tokenize(prompt))`` ids, warning
    when that is not a prefix of the whole ("Mismatch between tokenized prompt and the start of tokenized
    prompt+completion"); when the two tokenizations agree, the ids here are the same. When they do not (a BPE
    merge across the seam, e.g. a prompt ending in a space), separate tokenization keeps training equal to
    inference: at inference the model reads exactly ``encode(prompt)`` and continues from there.

Length. A record longer than ``seq`` tokens is **refused** (``ValueError`` naming its line), not truncated:
truncation would cut off the end of an answer, its end-of-turn token first, and teach the model answers that never
stop. Give a larger ``seq`` or shorten the record. Without ``seq``, a ``.jsonl`` file uses its longest record's
length (which must fit the model's context) and a ``.txt`` file windows of :data:`DEFAULT_TEXT_SEQ` tokens.

No special tokens are added to text (no BOS): ``.txt`` windows and standard prompt–completion records are the text's
own tokens, as ``lora-ref eval`` reads a file; chat templates write the special tokens they want themselves.

Batches (:func:`collate`) pad on the right to the longest example of the batch; the model is causal, so padding
after a sequence never changes what it computes for the sequence, and padded positions are ignored targets.
:func:`batch_indices` draws batches from an explicit generator: epochs of random permutations, so every example is
seen once per epoch, deterministically for a given seed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["DEFAULT_TEXT_SEQ", "IGNORE_INDEX", "Example", "TokenDataset", "batch_indices", "chat_example", "collate",
           "load_data", "mean_nll", "prompt_completion_example", "read_jsonl", "record_example", "text_examples"]

#: Target value left out of the loss (:func:`lora_ref.autograd.functional.cross_entropy`'s and torch's default).
IGNORE_INDEX = -100

#: Window length for ``.txt`` data when ``seq`` is not given (``lora-ref eval``'s default window).
DEFAULT_TEXT_SEQ = 128


@dataclass
class Example:
    """One training sequence: ``ids`` (L,) int64 and ``mask`` (L,) bool, ``mask[t]`` = token ``t`` is a target."""

    ids: np.ndarray
    mask: np.ndarray
    where: str = ""  # "line 3", "window 2": for messages

    def __post_init__(self):
        self.ids = np.asarray(self.ids, dtype=np.int64).reshape(-1)
        self.mask = np.asarray(self.mask, dtype=bool).reshape(-1)
        if self.ids.shape != self.mask.shape:
            raise ValueError(f"ids and mask differ in length: {self.ids.size} and {self.mask.size}")
        if self.mask.size and self.mask[0]:
            raise ValueError("the first token of a sequence cannot be a target (nothing precedes it)")
        if not self.mask.any():
            raise ValueError("the example has no target tokens (nothing to train on)")

    def __len__(self) -> int:
        return int(self.ids.size)

    @property
    def n_targets(self) -> int:
        return int(self.mask.sum())


@dataclass
class TokenDataset:
    """The examples of one data file, the sequence length they were cut or checked against, and their kind."""

    path: str
    kind: str  # "text", "chat", "prompt-completion", or "chat+prompt-completion" for a file with both
    seq: int
    examples: list[Example] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def n_targets(self) -> int:
        return sum(e.n_targets for e in self.examples)


# ----------------------------------------------------------------------------------------------------------------
# plain text
# ----------------------------------------------------------------------------------------------------------------
def text_examples(ids, seq: int) -> list[Example]:
    """Consecutive windows of ``seq`` tokens of a token stream (the last one kept if it has >= 2 tokens).

    Each window's tokens but its first are targets: a window of n tokens scores n − 1 predictions.
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    _check_seq(seq)
    if ids.size < 2:
        raise ValueError(f"the text has {ids.size} token(s); training needs at least 2")
    out = []
    for i, start in enumerate(range(0, ids.size, seq)):
        w = ids[start:start + seq]
        if w.size < 2:
            break
        mask = np.ones(w.size, dtype=bool)
        mask[0] = False
        out.append(Example(w, mask, f"window {i + 1}"))
    return out


# ----------------------------------------------------------------------------------------------------------------
# chat records
# ----------------------------------------------------------------------------------------------------------------
def _token_boundary(tokenizer, text: str, char: int, ids: np.ndarray, what: str) -> int:
    """Number of tokens of ``ids`` (the tokens of ``text``) that spell ``text[:char]``.

    ``text[:char]`` is tokenized on its own; if its tokens are the first tokens of ``ids``, token number ``n``
    starts exactly at character ``char``. Otherwise the tokenizer merged text across that point (a token straddles
    it) and no mask can put the boundary there.
    """
    prefix = tokenizer.encode(text[:char])
    n = prefix.size
    if n > ids.size or not np.array_equal(ids[:n], prefix):
        raise ValueError(f"{what} does not begin or end on a token boundary (the tokenizer merges text across it); "
                         "the loss mask cannot be placed there")
    return n


def chat_example(messages, tokenizer, *, train_from: int = 0) -> Example:
    """A chat conversation as an :class:`Example` whose targets are the assistant turns (from ``train_from`` on).

    How the assistant tokens are found. Chat templates differ (ChatML, Llama 3, Mistral ...), so instead of
    searching for a particular header, the template is asked where each turn begins and ends:

    1. ``full`` = the whole conversation rendered (``add_generation_prompt=False``) and ``ids`` its tokens;
    2. for assistant message ``i``: ``before`` = messages ``[:i]`` rendered *with* the generation prompt (what the
       model reads before it writes the answer, e.g. ``...<|im_start|>assistant\\n``), and ``through`` = messages
       ``[:i+1]`` rendered without it. Both must be prefixes of ``full`` (true for templates that render a
       conversation turn by turn; a template that rewrites earlier turns is refused). The answer is the text
       between ``len(before)`` and ``len(through)``, cut after the last end-of-turn token (``eos_token``) in it,
       so whatever the template writes after that token (ChatML's newline) is not trained;
    3. each character boundary becomes a token boundary by tokenizing the text before it: its tokens must be the
       first tokens of ``ids`` (:func:`_token_boundary`); the mask is set on the tokens in between.

    Tokens after the last target are dropped (they would be read but never scored). ``ValueError`` for a record
    without an assistant message (from ``train_from`` on), one that starts with the assistant (no prompt to answer),
    a folder without a chat template, or a template whose turns cannot be located.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("chat records need a chat template, and this model folder has none "
                         "(use a .txt file or prompt/completion strings)")
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list of {"role": ..., "content": ...} objects')
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f'message {i + 1} must be an object with string "role" and "content"')
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= train_from]
    if not turns:
        raise ValueError("the conversation has no assistant message (nothing to train on)"
                         if train_from == 0 else "the completion has no assistant message (nothing to train on)")
    if turns[0] == 0:
        raise ValueError("the conversation starts with an assistant message; put the user (or system) message it "
                         "answers before it")
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    ids = tokenizer.encode(full)
    eos = getattr(tokenizer, "special_tokens", {}).get("eos_token")
    mask = np.zeros(ids.size, dtype=bool)
    for i in turns:
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        if not (full.startswith(before) and full.startswith(through) and len(before) <= len(through)):
            raise ValueError(f"the chat template does not render the conversation up to message {i + 1} as the "
                             "beginning of the whole conversation, so the assistant turns cannot be located")
        start, stop = len(before), len(through)
        if eos:
            k = full.rfind(eos, start, stop)
            if k >= 0:
                stop = k + len(eos)
        a = _token_boundary(tokenizer, full, start, ids, f"assistant message {i + 1}")
        b = _token_boundary(tokenizer, full, stop, ids, f"assistant message {i + 1}")
        mask[a:b] = True
    if not mask.any():
        raise ValueError("the assistant messages render to no tokens (nothing to train on)")
    last = int(np.nonzero(mask)[0][-1])
    return Example(ids[:last + 1], mask[:last + 1])


def prompt_completion_example(prompt: str, completion: str, tokenizer) -> Example:
    """Standard prompt–completion: ``encode(prompt) + encode(completion) + [eos]``, targets on the completion + eos.

    The end-of-sequence id is appended if the tokenizer has one and the completion does not already end with it.
    If the prompt is empty, the first completion token has nothing before it and is not a target.
    """
    p = tokenizer.encode(prompt)
    c = tokenizer.encode(completion)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and not (c.size and c[-1] == eos):
        c = np.concatenate([c, [eos]]).astype(np.int64)
    ids = np.concatenate([p, c]).astype(np.int64)
    mask = np.concatenate([np.zeros(p.size, dtype=bool), np.ones(c.size, dtype=bool)])
    if mask.size:
        mask[0] = False
    if not mask.any():
        raise ValueError("the completion is empty (nothing to train on)")
    return Example(ids, mask)


def record_example(record, tokenizer) -> tuple[str, Example]:
    """One JSON record → (kind, :class:`Example`); kind is ``"chat"`` or ``"prompt-completion"``."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return "chat", chat_example(record["messages"], tokenizer)
    if "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            return "prompt-completion", prompt_completion_example(prompt, completion, tokenizer)
        if isinstance(prompt, list) and isinstance(completion, list):
            return "prompt-completion", chat_example(prompt + completion, tokenizer, train_from=len(prompt))
        raise ValueError('"prompt" and "completion" must both be strings or both be lists of messages')
    raise ValueError('a record needs "messages" (a list of {"role", "content"} objects) or "prompt" and '
                     f'"completion"; this one has keys {sorted(record)[:8]}')


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, object]]:
    """The records of a JSON Lines file as ``(line number, value)``; blank lines are skipped.

    ``ValueError`` naming the file and the line for a line that is not valid JSON; for a file that is empty, has
    only blank lines, or is not UTF-8.
    """
    path = Path(path)
    text = _read_text(path)
    records = []
    for n, line in enumerate(text.split("\n"), start=1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            records.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not records:
        raise ValueError(f"{path} has no records (only blank lines)")
    return records


def _read_text(path: Path) -> str:
    if not path.exists():
        raise ValueError(f"data file not found: {path}")
    if not path.is_file():
        raise ValueError(f"data path is not a file: {path}")
    raw = path.read_bytes()
    if not raw:
        raise ValueError(f"data file is empty: {path}")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start})") from None


# ----------------------------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------------------------
def _check_seq(seq) -> None:
    if isinstance(seq, bool) or not isinstance(seq, (int, np.integer)) or seq < 2:
        raise ValueError(f"the sequence length must be an integer >= 2, got {seq!r}")


def load_data(path: str | os.PathLike, tokenizer, *, seq: int | None = None,
              context: int | None = None) -> TokenDataset:
    """Read a ``.txt`` or ``.jsonl`` data file into a :class:`TokenDataset` (see the module docstring).

    Parameters
    ----------
    path : the data file; its suffix (``.txt`` or ``.jsonl``) says how to read it.
    tokenizer : from :func:`lora_ref.modeling.tokenizer.load_tokenizer` (an ``HFTokenizer`` or the byte tokenizer).
    seq : the sequence length: the window of a ``.txt`` file, the longest record allowed in a ``.jsonl`` file.
        None: :data:`DEFAULT_TEXT_SEQ` for text (or the context, if shorter), the longest record for ``.jsonl``.
    context : the model's context (``max_position_embeddings``); ``seq`` and every record must fit in it.

    Every problem is a one-line ``ValueError`` naming the file (and the line, for a record).
    """
    path = Path(path)
    if seq is not None:
        _check_seq(seq)
        if context is not None and seq > context:
            raise ValueError(f"sequence length {seq} is longer than the model's context ({context} tokens, "
                             "max_position_embeddings)")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        text = _read_text(path)
        if seq is None:
            seq = DEFAULT_TEXT_SEQ if context is None else min(DEFAULT_TEXT_SEQ, context)
        ids = tokenizer.encode(text)
        if ids.size < 2:
            raise ValueError(f"{path} holds {ids.size} token(s); training needs at least 2")
        return TokenDataset(str(path), "text", int(seq), text_examples(ids, int(seq)))
    if suffix != ".jsonl":
        raise ValueError(f"data file must be .txt (plain text) or .jsonl (chat or prompt/completion records), "
                         f"got {path.name}")
    kinds, examples = set(), []
    for n, record in read_jsonl(path):
        try:
            kind, ex = record_example(record, tokenizer)
        except ValueError as e:
            raise ValueError(f"{path} line {n}: {e}") from None
        limit = seq if seq is not None else context
        if limit is not None and len(ex) > limit:
            what = (f"the sequence length {seq} (--seq); give a larger --seq or shorten the record"
                    if seq is not None else f"the model's context ({context} tokens); shorten the record")
            raise ValueError(f"{path} line {n}: the record is {len(ex)} tokens long, more than {what} "
                             "(records are not truncated)")
        ex.where = f"line {n}"
        kinds.add(kind)
        examples.append(ex)
    if seq is None:
        seq = max(len(e) for e in examples)
    return TokenDataset(str(path), "+".join(sorted(kinds)), int(seq), examples)


# ----------------------------------------------------------------------------------------------------------------
# batches
# ----------------------------------------------------------------------------------------------------------------
def collate(examples: list[Example], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ``x`` and targets ``y``, int64 (B, T) with T = longest example − 1, padded on the right.

    ``x[b, t] = ids[t]`` and ``y[b, t] = ids[t + 1]`` where ``mask[t + 1]``, :data:`IGNORE_INDEX` elsewhere
    (masked positions and padding). ``pad_id`` only fills inputs after the end of a sequence, which a causal
    model never attends to from inside the sequence.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    T = max(len(e) for e in examples) - 1
    x = np.full((len(examples), T), pad_id, dtype=np.int64)
    y = np.full((len(examples), T), IGNORE_INDEX, dtype=np.int64)
    for b, e in enumerate(examples):
        n = len(e) - 1
        x[b, :n] = e.ids[:-1]
        y[b, :n] = np.where(e.mask[1:], e.ids[1:], IGNORE_INDEX)
    return x, y


def batch_indices(n: int, batch: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """An endless stream of index batches (``batch`` indices each) over ``n`` examples.

    Epochs are ``rng.permutation(n)`` one after another, cut into consecutive batches (a batch may span two epochs;
    with ``n < batch`` it holds an example more than once). The same generator state gives the same batches.
    """
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"batch_indices needs an explicit rng (np.random.Generator), got {type(rng).__name__}")
    if n < 1 or batch < 1:
        raise ValueError(f"need n >= 1 examples and batch >= 1, got n={n}, batch={batch}")
    buf = np.empty(0, dtype=np.int64)
    while True:
        while buf.size < batch:
            buf = np.concatenate([buf, rng.permutation(n)])
        yield buf[:batch]
        buf = buf[batch:]


def mean_nll(model, data: TokenDataset | list[Example], batch: int = 8, pad_id: int = 0) -> float:
    """Mean next-token negative log-likelihood (nats) over all target tokens of ``data``, in file order.

    For a ``.txt`` file this is ``lora-ref eval``'s loss: the windows of ``seq`` tokens, every predicted position
    counted once. For records, the loss on their target tokens (assistant turns, completions). Runs in eval mode
    (no dropout) without recording a graph; the model's training flag is restored.
    """
    from lora_ref.autograd import functional as F
    from lora_ref.autograd.tensor import no_grad

    examples = data.examples if isinstance(data, TokenDataset) else list(data)
    was_training = getattr(model, "training", True)
    model.eval()
    total, count = 0.0, 0
    try:
        with no_grad():
            for i in range(0, len(examples), batch):
                x, y = collate(examples[i:i + batch], pad_id)
                logits = model(x)  # (B, T, V)
                B, T, V = logits.shape
                k = int((y != IGNORE_INDEX).sum())
                total += float(F.cross_entropy(logits.reshape(B * T, V), y.reshape(-1)).data) * k
                count += k
    finally:
        model.train(was_training)
    return total / count
