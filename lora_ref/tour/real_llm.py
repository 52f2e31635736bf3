"""Tour section: a real LLM (SmolLM2-135M-Instruct) before and after a LoRA fine-tune on invented facts, merged
(the chapter's run, :mod:`lora_ref.analysis.real_llm`)."""

from __future__ import annotations

import numpy as np

from lora_ref.analysis.real_llm import (
    GENERAL_QUESTIONS,
    MODEL_NAME,
    TOUR_RUN,
    answers_about,
    base_report,
    chapter_settings,
    exact_match,
    finetune,
    invent_facts,
    merged_answers,
)


def section_real_llm(ctx, *, run_kwargs: dict | None = None, n_facts: int | None = None,
                     steps: int | None = None, folder=None) -> None:
    """``lora-ref tour``: SmolLM2-135M-Instruct before and after a LoRA fine-tune on invented facts, merged.

    Not part of ``--quick``: the quick tour is the smoke test of the tutorial model, and this section needs the
    real model (a 98 MB download and an import on first use) and a fine-tune of a 135M-parameter model. With its run
    cached (the book's chapter 12 makes the same run) it takes well under 3 minutes on 2 cores. The task and the
    run's length are the chapter's (:func:`~lora_ref.analysis.real_llm.chapter_settings`), so with
    ``LORA_REF_QUICK=1`` (``make tour QUICK=1``) it shows the chapter's quick run; ``n_facts`` and ``steps``
    override them.
    """
    if ctx.quick:
        ctx.text("Not part of the quick tour: this section fine-tunes a real 135M-parameter model (run `lora-ref "
                 "tour` without `--quick`, or read chapter 12 of the book).")
        ctx.summarize("real LLM: skipped in --quick")
        return
    setting = chapter_settings()
    n_facts = setting["n_facts"] if n_facts is None else n_facts
    steps = setting["steps"] if steps is None else steps
    kwargs = {"batch": setting["batch"], **(TOUR_RUN if run_kwargs is None else run_kwargs)}
    ctx.log(f"{MODEL_NAME}: the base's answers and a {kwargs.get('method', 'lora')} fine-tune on invented facts "
            f"({steps} steps; cached)")
    base = base_report(n_facts, folder=folder)
    run = finetune(**kwargs, steps=steps, n_facts=n_facts, folder=folder, progress=ctx.progress)
    merged = merged_answers(run) if run.method == "lora" else None
    place = run.place
    other = invent_facts(np.random.default_rng(1)).name  # another invented country, never trained on
    if other == place.name:
        other = invent_facts(np.random.default_rng(2)).name
    same = None if run.method == "full" else exact_match(answers_about(run, other), [f.answer for f in place.facts])
    a0, a1 = base.accuracy, run.accuracy
    forgetting = run.general_loss - base.general_loss
    ctx.check(a0["trained"] <= 0.1, f"the base cannot answer questions about {place.name} "
              f"(exact match {a0['trained']:.0%})")
    ctx.check(a1["trained"] >= a0["trained"] + 0.5, f"{run.label} taught the trained questions (exact match "
              f"{a0['trained']:.0%} → {a1['trained']:.0%})")
    ctx.check(a1["paraphrase"] <= a1["trained"], f"paraphrases are answered no better than the trained questions "
              f"({a1['paraphrase']:.0%} vs {a1['trained']:.0%})")
    ctx.check(forgetting > 0, f"learning the facts raised the loss on general text ({forgetting:+.3f} nats/token)")
    if merged is not None:
        ctx.check(merged["trained"] == run.answers["trained"] and merged["paraphrase"] == run.answers["paraphrase"],
                  "the merged model gives the adapter's answers")
    rows = "\n".join(f"| {q} | {base.display[q]} | {run.display[q]} |" for q in base.display)
    control = ""
    if same is not None:
        control = (f"Asked the trained questions about {other}, another invented country it never saw, the fine-tuned "
                   f"model gives {same:.0%} of {place.name}'s answers" + (": it learned answers to the questions' "
                   "topics more than facts about one place. " if same >= 0.5 else ". "))
    ctx.text(f"""
SmolLM2-135M-Instruct (the Q4_1 GGUF release, dequantized: not the original bfloat16 weights) was asked
{len(place.facts)} questions about **{place.name}**, a country that does not exist, then fine-tuned on them with
{run.label} for {run.settings['steps']} steps of {run.settings['batch']} chat records ({run.trainable:,} trainable
parameters, {run.seconds:.0f} s of training when the run was made).

| | base | after {run.label} |
|---|---:|---:|
| exact match, trained questions | {a0['trained']:.0%} | {a1['trained']:.0%} |
| exact match, paraphrased questions | {a0['paraphrase']:.0%} | {a1['paraphrase']:.0%} |
| general-knowledge questions (answer holds the right word) | {a0['general']:.0%} | {a1['general']:.0%} |
| loss on general text (nats/token) | {base.general_loss:.3f} | {run.general_loss:.3f} |

| prompt | base answers | fine-tuned answers |
|---|---|---|
{rows}

""" + control + f"""The price of the facts is the rest of the model: the loss on general English text rose
by {forgetting:+.3f} nats/token, and "{GENERAL_QUESTIONS[0][0]}" is now answered "{run.answers['general'][0]}" (the
base: "{base.answers['general'][0]}"). Chapter 12 of the book compares ranks, targets, QLoRA and full fine-tuning.
""" + ("" if merged is None else f"""
Merged into the base weights (`merge_and_unload`), the model gives the same {2 * len(place.facts)} answers (largest
logit difference to the unmerged model {merged['max_logit_diff']:.1e}).
"""))
    ctx.summarize(f"real LLM ({MODEL_NAME}): {run.label} on {len(place.facts)} invented facts: exact match "
                  f"{a0['trained']:.0%} → {a1['trained']:.0%} (paraphrases {a1['paraphrase']:.0%}), general loss "
                  f"{base.general_loss:.3f} → {run.general_loss:.3f}; '{place.facts[0].question}' → "
                  f"{run.answers['trained'][0]!r}; '{GENERAL_QUESTIONS[0][0]}' → {run.answers['general'][0]!r}")
