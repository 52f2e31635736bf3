"""``lora-ref count``: parameter counts and the memory model for a preset or a config.json."""

from __future__ import annotations

import json
import sys

from lora_ref.adapters.targets import HELP as TARGETS_HELP
from lora_ref.adapters.targets import targets_arg

EXAMPLES = """\
examples:
  lora-ref count --model llama-3-8b --r 16 --targets all-linear
  lora-ref count --model gpt3-175b --r 1 --targets q_proj,v_proj --json
  lora-ref count --model gpt3-175b --targets q_proj=2,v_proj=2            (per-target ranks)
  lora-ref count --model path/to/config.json --r 8 --targets q_proj,v_proj --quant nf4 --double-quant \\
                 --batch 4 --seq 2048 --dtype bf16 --grad-checkpointing
  lora-ref count --measure --json       (train the tutorial model one step per method; measured vs predicted)

--model is a preset (gpt3-175b, roberta-base, roberta-large, deberta-v2-xxlarge, gpt2, gpt2-medium, gpt2-large,
llama-3-8b, llama-3-70b, mistral-7b) or a Hugging Face config.json (llama, mistral, gpt2, bert, roberta,
deberta-v2). --targets takes module names or the Llama-style roles q_proj, k_proj, v_proj, o_proj, gate_proj,
up_proj, down_proj (mapped onto each family's own modules), or all-linear (every linear layer but the head).
With --json, stdout is one JSON document: base_params, trainable_params, bits_per_quantized_param (null without
--quant) and memory (bytes per term per method, training), plus inference memory and the per-module counts.
"""


def add_arguments(p) -> None:
    p.add_argument("--model", help="preset name or path of a config.json")
    p.add_argument("--r", type=int, default=8, help="LoRA rank for targets given without one (default 8)")
    p.add_argument("--targets", type=targets_arg, help=f"{TARGETS_HELP} (default q_proj,v_proj; with --measure "
                                                       "all-linear)")
    p.add_argument("--quant", choices=("nf4", "fp4"), help="add QLoRA with a 4-bit base of this type")
    p.add_argument("--double-quant", action="store_true", help="double quantization of the absmax constants")
    p.add_argument("--blocksize", type=int, default=64, help="4-bit blocksize (default 64)")
    p.add_argument("--batch", type=int, help="batch size B (default 1; with --measure 8)")
    p.add_argument("--seq", type=int, help="sequence length T (default 1024; with --measure 128)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                   help="dtype of the base weights and activations (default bf16)")
    p.add_argument("--grad-checkpointing", action="store_true", help="one checkpoint per block")
    p.add_argument("--attention", choices=("sdpa", "eager"), default="sdpa",
                   help="sdpa: fused attention keeps no T×T matrix (default); eager keeps the probabilities")
    p.add_argument("--measure", action="store_true",
                   help="train the tutorial model one step each as full, lora and qlora (float32; qlora: NF4 with "
                        "double quantization); peak traced memory vs the memory model's prediction. --r, --targets, "
                        "--batch and --seq apply")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")


def _gb(b: int) -> str:
    return f"{b / 1e9:,.3f} GB" if b >= 1e8 else f"{b / 1e6:,.3f} MB"


def run(args) -> int:
    from lora_ref.errors import UsageError

    if args.measure:
        if args.double_quant and args.quant is None:
            raise UsageError("--double-quant needs --quant nf4 (or fp4)")
        from lora_ref.analysis.memory_measure import TUTORIAL_BATCH, TUTORIAL_SEQ, measure_all

        for flag in ("batch", "seq"):
            v = getattr(args, flag)
            if v is not None and v < 1:
                raise UsageError(f"--{flag} must be >= 1, got {v}")
        rows = measure_all(progress=sys.stderr, r=args.r, targets=args.targets or "all-linear",
                           batch=args.batch or TUTORIAL_BATCH, seq=args.seq or TUTORIAL_SEQ)
        if args.json:
            print(json.dumps({"measured": rows}))
        else:
            print(f"{'method':<8}{'predicted':>16}{'measured':>16}{'error':>10}")
            for row in rows:
                err = row["measured_bytes"] / row["predicted_bytes"] - 1
                print(f"{row['method']:<8}{_gb(row['predicted_bytes']):>16}{_gb(row['measured_bytes']):>16}"
                      f"{err:>+10.1%}")
        return 0

    if not args.model:
        raise UsageError("--model is required (a preset or a config.json), unless --measure is given")
    if args.double_quant and args.quant is None:
        raise UsageError("--double-quant needs --quant nf4 (or fp4)")
    if args.r < 1:
        raise UsageError(f"--r must be >= 1, got {args.r}")

    from lora_ref.analysis.counts import lora_plan, resolve_model
    from lora_ref.analysis.memory import QuantConfig, Setup, bits_per_quantized_param, inference_memory, training_memory

    args.targets = args.targets or "q_proj,v_proj"
    args.batch = 1 if args.batch is None else args.batch
    args.seq = 1024 if args.seq is None else args.seq
    spec = resolve_model(args.model)
    plan = lora_plan(spec, args.targets, args.r)
    setup = Setup(batch=args.batch, seq=args.seq, dtype=args.dtype, grad_checkpointing=args.grad_checkpointing,
                  attention=args.attention)
    quant = QuantConfig(args.quant, args.blocksize, args.double_quant) if args.quant else None
    methods = ("full", "lora") + (("qlora",) if quant else ())
    train = {m: training_memory(spec, m, setup, None if m == "full" else plan, quant) for m in methods}
    infer = {m: inference_memory(spec, m, setup, None if m == "full" else plan, quant) for m in methods}

    if args.json:
        doc = {
            "model": spec.name,
            "family": spec.family,
            "base_params": spec.total,
            "trainable_params": plan.trainable,
            "trainable_fraction": plan.trainable / spec.total,
            "bits_per_quantized_param": bits_per_quantized_param(quant) if quant else None,
            "memory": {m: e.as_dict() for m, e in train.items()},
            "inference_memory": {m: e.as_dict() for m, e in infer.items()},
            "setup": {"r": args.r, "targets": args.targets, "batch": args.batch, "seq": args.seq,
                      "dtype": args.dtype, "grad_checkpointing": args.grad_checkpointing,
                      "attention": args.attention, "quant": args.quant, "double_quant": args.double_quant,
                      "blocksize": args.blocksize if args.quant else None},
            "adapted": plan.rows(),
            "modules": spec.module_rows(),
        }
        print(json.dumps(doc))
        return 0

    print(f"{spec.name} ({spec.family}): {spec.total:,} parameters")
    if spec.source:
        print(f"  source: {spec.source}")
    print(f"LoRA {args.targets} (r={args.r}): {plan.trainable:,} trainable "
          f"({plan.trainable / spec.total:.4%} of the base, 1/{spec.total / plan.trainable:,.0f})")
    for row in plan.rows():
        print(f"  {row['module']:<32} r={row['r']:<4} A {row['lora_A']} B {row['lora_B']} × {row['count']}"
              f" = {row['params']:,}")
    if quant:
        print(f"{args.quant} blocksize {args.blocksize}{' + double quant' if args.double_quant else ''}: "
              f"{bits_per_quantized_param(quant):.9g} bits per quantized parameter (without per-tensor tables)")
    print(f"\ntraining memory (B={args.batch}, T={args.seq}, {args.dtype}, "
          f"{'gradient checkpointing' if args.grad_checkpointing else 'no checkpointing'}, {args.attention}):")
    for m, e in train.items():
        print(f"  {m}: {_gb(e.total)}")
        for t in e.terms:
            print(f"    {t.key:<16}{_gb(t.bytes):>16}   {t.formula}")
    print("inference memory (KV cache for T positions):")
    for m, e in infer.items():
        print(f"  {m}: {_gb(e.total)}   " + ", ".join(f"{t.key} {_gb(t.bytes)}" for t in e.terms))
    return 0
