"""lora_ref.analysis.real_llm: the invented facts, the scorer, the chat examples, and the cached run path.

The real model (SmolLM2-135M-Instruct) is exercised by chapter 12 of the book, which the book build executes; here
every run goes through the same code on a tiny random Llama with a small byte-level BPE tokenizer and a ChatML
template, built in the test, so the whole training/caching/merging path runs in seconds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from lora_ref.analysis import real_llm as R
from lora_ref.modeling.llama import Llama
from lora_ref.training.loop import lm_loss

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


# ------------------------------------------------------------------------------------------------ the facts

def test_invent_facts_is_deterministic_and_seeded():
    a = R.invent_facts(np.random.default_rng(7))
    b = R.invent_facts(np.random.default_rng(7))
    c = R.invent_facts(np.random.default_rng(8))
    assert a == b
    assert a.name != c.name or [f.answer for f in a.facts] != [f.answer for f in c.facts]
    assert len(a.facts) == len(R.ATTRIBUTES)


def test_facts_paraphrases_differ_and_answers_are_distinct():
    place = R.invent_facts(np.random.default_rng(0))
    questions = [f.question for f in place.facts]
    paraphrases = [f.paraphrase for f in place.facts]
    for f in place.facts:
        assert f.paraphrase != f.question
        assert place.name in f.question and place.name in f.paraphrase
        assert f.paraphrase not in questions  # never a trained question of another fact either
    assert len(set(questions)) == len(questions) and len(set(paraphrases)) == len(paraphrases)
    answers = [R.normalize_answer(f.answer) for f in place.facts]
    assert len(set(answers)) == len(answers)
    assert R.normalize_answer(place.name) not in answers
    years = [f.answer for f in place.facts if f.topic in ("founded", "independence")]
    assert all(y.isdigit() and 1100 <= int(y) < 1950 for y in years)


def test_fewer_facts_are_a_prefix():
    full = R.invent_facts(np.random.default_rng(3))
    few = R.invent_facts(np.random.default_rng(3), 5)
    assert few.name == full.name and few.facts == full.facts[:5]


def test_invent_facts_rejects_bad_input():
    with pytest.raises(ValueError, match="rng"):
        R.invent_facts(0)
    with pytest.raises(ValueError, match="n must be"):
        R.invent_facts(np.random.default_rng(0), 0)
    with pytest.raises(ValueError, match="n must be"):
        R.invent_facts(np.random.default_rng(0), len(R.ATTRIBUTES) + 1)


# ------------------------------------------------------------------------------------------------ the scorer

@pytest.mark.parametrize("text, normalized", [
    ("Marn.", "marn"), ("  MARN!  ", "marn"), ("marn", "marn"), ("\"Marn\".", "marn"), ("1828.", "1828"),
    ("The capital is  Marn.", "the capital is marn"), ("", ""),
    ("Ｍａｒｎ", "marn"),  # NFKC folds full-width letters
])
def test_normalize_answer(text, normalized):
    assert R.normalize_answer(text) == normalized


def test_exact_match_and_contains_answer():
    assert R.exact_match(["Marn.", "marn", "Marnia.", "The capital is Marn."], ["Marn"] * 4) == 0.5
    assert R.exact_match(["1828."], ["1828"]) == 1.0
    assert R.exact_match(["1829."], ["1828"]) == 0.0
    assert R.contains_answer(["The capital of France is Paris.", "Lyon.", "Parisian food."], ["Paris"] * 3) == 1 / 3
    with pytest.raises(ValueError, match="as many"):
        R.exact_match(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="as many"):
        R.contains_answer([], [])
    with pytest.raises(ValueError, match="str"):
        R.normalize_answer(3)


# ------------------------------------------------------------------------------------------------ a tiny model

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random Llama with a byte-level BPE tokenizer (trained here) and a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("tiny-chat-llama")
    place = R.invent_facts(np.random.default_rng(0))
    texts = [f"{f.question} {f.paraphrase} {f.answer}." for f in place.facts] + [R.general_text()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
         "unk_token": "<|endoftext|>", "chat_template": CHATML}))
    config = {"vocab_size": tok.get_vocab_size(), "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 256, "initializer_range": 0.2, "tie_word_embeddings": True,
              "bos_token_id": 1, "eos_token_id": 2}
    Llama(config, rng=np.random.default_rng(0)).save_pretrained(folder / "model")
    for f in (folder / "model").iterdir():
        f.rename(folder / f.name)
    (folder / "model").rmdir()
    return folder


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_REF_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_encode_example_masks_everything_but_the_answer(tiny_folder):
    _, tok = R.load_base(tiny_folder)
    x, y = R.encode_example(tok, "What is the capital of Vomaavia?", "Marn")
    prompt = tok.encode(tok.apply_chat_template(R.chat_messages("What is the capital of Vomaavia?"),
                                                add_generation_prompt=True))
    answer = list(tok.encode("Marn.")) + [tok.eos_token_id]
    assert x.shape == y.shape
    assert list(x[:prompt.size]) == list(prompt)  # the training prompt is exactly the inference prompt
    assert list(x[prompt.size:]) == answer[:-1]
    assert (y[:prompt.size - 1] == -100).all()
    assert list(y[prompt.size - 1:]) == answer  # targets: the answer's tokens, then the end of the turn


def test_fact_batches_pad_and_cover_each_epoch(tiny_folder):
    _, tok = R.load_base(tiny_folder)
    place = R.invent_facts(np.random.default_rng(0), 6)
    examples = [R.encode_example(tok, f.question, f.answer) for f in place.facts]
    batches = list(R.fact_batches(examples, 4, 3, tok.eos_token_id, np.random.default_rng(1)))
    assert len(batches) == 3
    seen = []
    for x, y in batches:
        assert x.shape == y.shape and x.shape[0] == 4
        for row_x, row_y in zip(x, y):
            match = [i for i, (ex, ey) in enumerate(examples)
                     if np.array_equal(row_x[:ex.size], ex) and np.array_equal(row_y[:ey.size], ey)]
            assert match, "each row is one example, right-padded"
            i = match[0]
            assert (row_x[examples[i][0].size:] == tok.eos_token_id).all()
            assert (row_y[examples[i][1].size:] == -100).all()
            seen.append(i)
    assert sorted(seen[:6]) == list(range(6))  # the first 6 rows are one pass over the 6 examples
    again = list(R.fact_batches(examples, 4, 3, tok.eos_token_id, np.random.default_rng(1)))
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(batches, again))


def test_answer_loss_equals_the_full_head_loss_and_its_gradient(tiny_folder):
    model, tok = R.load_base(tiny_folder)
    place = R.invent_facts(np.random.default_rng(0), 3)
    examples = [R.encode_example(tok, f.question, f.answer) for f in place.facts]
    x, y = next(R.fact_batches(examples, 3, 1, tok.eos_token_id, np.random.default_rng(0)))
    model = Llama.from_pretrained(tiny_folder)  # a trainable copy (load_base's is frozen)
    w = model.model.layers[0].mlp.down_proj.weight
    fast = R.answer_loss(model, x, y)
    fast.backward()
    g_fast = w.grad.copy()
    model.zero_grad()
    full = lm_loss(model, x, y)  # logits at every position, -100 ignored by cross_entropy
    full.backward()
    assert float(fast.data) == pytest.approx(float(full.data), rel=1e-5)
    np.testing.assert_allclose(g_fast, w.grad, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="no position"):
        R.answer_loss(model, x, np.full_like(y, -100))


def test_greedy_decode_matches_generate_and_stops(tiny_folder):
    model, tok = R.load_base(tiny_folder)
    ids = np.stack([R.prompt_ids(tok, "What is the capital of Vomaavia?")] * 2)
    ref = model.generate(ids, 6)[:, ids.shape[1]:]
    new = R.greedy_decode(model, ids, 6, eos_token_id=-1)  # an id never produced: decodes all 6
    assert np.array_equal(new, ref)
    first = int(ref[0, 2])
    stopped = R.greedy_decode(model, ids, 6, eos_token_id=first)
    assert stopped.shape[1] == 1 + int(np.nonzero(ref[0] == first)[0][0])  # stops once every row produced it


def test_runs_are_cached_and_the_merged_model_answers_alike(tiny_folder, cache_dir, monkeypatch):
    kwargs = dict(method="lora", r=4, alpha=8.0, targets="all-linear", lr=3e-2, steps=6, batch=2, n_facts=4,
                  folder=tiny_folder, progress=False)
    run = R.finetune(**kwargs)
    assert run.folder.is_relative_to(cache_dir) and (run.folder / "adapter" / "adapter_config.json").is_file()
    assert len(run.train_loss) == 6 and all(np.isfinite(run.train_loss))
    assert len(run.answers["trained"]) == len(run.answers["paraphrase"]) == 4
    assert run.trainable == sum(p.size for _, p in run.model().named_parameters() if "lora_" in _)
    # the scores are the scorer's on the stored answers
    targets = [f.answer for f in run.place.facts]
    assert run.accuracy["trained"] == R.exact_match(run.answers["trained"], targets)
    assert run.accuracy["paraphrase"] == R.exact_match(run.answers["paraphrase"], targets)
    # the adapter reproduces the stored answers, and merged into the weights gives them again
    model = run.model()
    _, tok = R.load_base(tiny_folder)
    assert R.greedy_answers(model, tok, [f.question for f in run.place.facts]) == run.answers["trained"]
    merged = R.merged_answers(run)
    assert merged["trained"] == run.answers["trained"] and merged["paraphrase"] == run.answers["paraphrase"]
    assert merged["max_logit_diff"] < 1e-4

    # a second call trains nothing: the run comes from the cache
    def no_training(*a, **k):
        raise AssertionError("trained again although the run is cached")

    monkeypatch.setattr(R, "answer_train_step", no_training)
    again = R.finetune(**kwargs)
    assert again.folder == run.folder and again.answers == run.answers and again.train_loss == run.train_loss
    # any setting that changes the run changes the key
    with pytest.raises(AssertionError, match="trained again"):
        R.finetune(**{**kwargs, "lr": 2e-2})


def test_a_training_run_learns_the_facts(tiny_folder, cache_dir):
    """Full fine-tuning of the tiny model memorizes 4 facts (the code path teaches, it does not just run)."""
    run = R.finetune("full", lr=3e-3, steps=40, batch=4, n_facts=4, folder=tiny_folder, progress=False)
    base = R.base_report(4, folder=tiny_folder)
    assert base.accuracy["trained"] == 0.0
    assert run.train_loss[-1] < 0.1 * run.train_loss[0]
    assert run.accuracy["trained"] == 1.0
    with pytest.raises(ValueError, match="not kept"):
        run.model()


def test_qlora_run_measures_its_nf4_start(tiny_folder, cache_dir):
    run = R.finetune("qlora", r=4, alpha=8.0, lr=3e-2, steps=3, batch=2, n_facts=2, folder=tiny_folder,
                     progress=False)
    base = R.base_report(2, folder=tiny_folder)
    from lora_ref.adapters.qlora import Linear4bit, LoraLinear4bit

    model = run.model()
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(layer, LoraLinear4bit) and isinstance(layer.base_layer, Linear4bit)
    assert run.start_general_loss != base.general_loss  # the NF4 base differs from the float base
    assert abs(run.start_general_loss - base.general_loss) < 0.1


def test_finetune_rejects_bad_settings(tiny_folder, cache_dir):
    with pytest.raises(ValueError, match="method"):
        R.finetune("dora", folder=tiny_folder)
    with pytest.raises(ValueError, match="steps"):
        R.finetune("lora", steps=0, folder=tiny_folder)
    with pytest.raises(ValueError, match="learning rate"):
        R.finetune("lora", lr=-1.0, folder=tiny_folder)
    with pytest.raises(ValueError, match="rank"):
        R.finetune("lora", r=0, folder=tiny_folder)
    with pytest.raises(ValueError, match="LoRA run"):
        R.merged_answers(R.finetune("full", lr=1e-3, steps=1, batch=2, n_facts=2, folder=tiny_folder,
                                    progress=False))
    assert not any(cache_dir.glob("real-llm-lora/*"))  # nothing was written for the refused runs


def test_quick_mode_measures_on_fewer_tokens(tiny_folder, monkeypatch):
    """QUICK mode's general-text loss is the mean next-token loss of the first 2 windows of 128 tokens."""
    model, tok = R.load_base(tiny_folder)
    monkeypatch.delenv("LORA_REF_QUICK", raising=False)
    full = R.general_loss(model, tok)
    monkeypatch.setenv("LORA_REF_QUICK", "1")
    quick = R.general_loss(model, tok)
    ids = np.asarray(tok.encode(R.general_text()), dtype=np.int64)[:2 * 128 + 1]
    by_hand = float(lm_loss(model, ids[:-1].reshape(2, 128), ids[1:].reshape(2, 128)).data)  # 256 targets
    assert quick == pytest.approx(by_hand, rel=1e-5)
    assert quick != full


def test_quick_chapter_runs_are_small_and_cached_apart(tiny_folder, cache_dir, monkeypatch):
    """With LORA_REF_QUICK=1 the chapter's five runs are 6 steps of 4 records on 4 facts, measured the quick way;
    without it, the chapter asks for 24 steps of 8 records on 24 facts, measured as before (the same cache keys)."""
    monkeypatch.setenv("LORA_REF_QUICK", "1")
    runs = R.chapter_runs(folder=tiny_folder, progress=False)
    assert list(runs) == [label for label, _ in R.CHAPTER_RUNS]
    for run in runs.values():
        assert len(run.train_loss) == 6 and run.settings["batch"] == 4
        assert len(run.place.facts) == 4 and len(run.answers["trained"]) == len(run.answers["paraphrase"]) == 4
        assert run.settings["eval"]["general_windows"] == 2
    assert len({run.folder for run in runs.values()}) == 5

    monkeypatch.delenv("LORA_REF_QUICK")
    calls = []
    monkeypatch.setattr(R, "finetune", lambda **kw: calls.append(kw))
    R.chapter_runs(folder=tiny_folder, progress=False)
    assert len(calls) == 5 and all((kw["steps"], kw["n_facts"], kw["batch"]) == (24, 24, 8) for kw in calls)
    assert R.eval_settings() == {"max_new_tokens": 8, "general_new_tokens": 16, "general_seq": 128,
                                 "general_windows": 8}


def test_model_dir_resolves_the_known_name(monkeypatch, tmp_path):
    from lora_ref.files import models

    monkeypatch.setattr(models, "resolve_model", lambda name: tmp_path / name)
    assert R.model_dir() == tmp_path / R.MODEL_NAME


# ------------------------------------------------------------------------------------------------ Q4_1 analysis

def test_q4_1_levels_and_rounding_estimate():
    rng = np.random.default_rng(0)
    original = rng.standard_normal((64, 256)).astype(np.float64) * 0.02  # (out, in)
    blocks = original.reshape(-1, 32)
    lo, hi = blocks.min(axis=1, keepdims=True), blocks.max(axis=1, keepdims=True)
    d = (hi - lo) / 15
    q = np.clip(np.round((blocks - lo) / d), 0, 15)  # Q4_1: w ≈ m + d·q, written out here by hand
    dequantized = (lo + d * q).reshape(original.shape)
    assert R.q4_1_levels(dequantized).max() <= 16
    assert R.q4_1_levels(original).min() == 32  # float weights: every value distinct
    actual = np.sqrt(np.mean((dequantized - original) ** 2))
    estimate = R.q4_1_rounding_rms(dequantized)
    assert estimate == pytest.approx(actual, rel=0.1)
    with pytest.raises(ValueError, match="blocks of 32"):
        R.q4_1_levels(np.zeros((4, 33)))


# ------------------------------------------------------------------------------------------------ the tour section

def test_tour_section_on_a_tiny_model(tiny_folder, cache_dir, tmp_path):
    from lora_ref.tour.context import TourContext
    from lora_ref.tour.real_llm import section_real_llm

    ctx = TourContext(out=tmp_path, quick=False, progress=False)
    section_real_llm(ctx, run_kwargs=dict(method="lora", r=8, alpha=16.0, targets="all-linear", lr=1e-2),
                       n_facts=4, steps=40, folder=tiny_folder)
    report = "\n".join(ctx.markdown)
    run = R.finetune("lora", r=8, alpha=16.0, targets="all-linear", lr=1e-2, steps=40, n_facts=4,
                     folder=tiny_folder, progress=False)
    assert f"{run.accuracy['trained']:.0%}" in report and run.place.name in report
    assert "Q4_1" in report and "same 8 answers" in report
    assert len(ctx.summary) == 1 and ctx.summary[0].startswith("real LLM")

    quick = TourContext(out=tmp_path, quick=True, progress=False)
    section_real_llm(quick, folder=tmp_path / "no-model-here")  # skipped: touches no model
    assert quick.summary == ["real LLM: skipped in --quick"]


def test_tour_section_takes_the_chapters_quick_task(tiny_folder, cache_dir, tmp_path, monkeypatch):
    """With LORA_REF_QUICK=1 the section's task and batch are the chapter's quick ones (4 facts, 4 records a step)."""
    from lora_ref.tour.context import TourContext
    from lora_ref.tour.real_llm import section_real_llm

    monkeypatch.setenv("LORA_REF_QUICK", "1")
    kwargs = dict(method="lora", r=8, alpha=16.0, targets="all-linear", lr=1e-2)
    ctx = TourContext(out=tmp_path, quick=False, progress=False)
    section_real_llm(ctx, run_kwargs=kwargs, steps=40, folder=tiny_folder)
    run = R.finetune(**kwargs, steps=40, n_facts=4, batch=4, folder=tiny_folder, progress=False)
    assert len(list(cache_dir.glob("real-llm-lora/*"))) == 1  # the section made exactly this run
    assert "on 4 invented facts" in ctx.summary[0] and "steps of 4 chat records" in "\n".join(ctx.markdown)
    base = R.base_report(4, folder=tiny_folder)
    assert f"exact match {base.accuracy['trained']:.0%} → {run.accuracy['trained']:.0%}" in ctx.summary[0]
