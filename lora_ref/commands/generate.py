"""``lora-ref generate``: continue a prompt with a checkpoint's Llama (byte-level tokens, KV cache)."""

from __future__ import annotations

import json


EXAMPLES = """\
examples:
  lora-ref generate --model runs/tour/base --prompt "The for statement"
  lora-ref generate --model runs/tour/base --prompt "def " --max-new-tokens 120 --temperature 0.8 --top-k 40 --seed 1
  lora-ref generate --model runs/tour/base --prompt "import" --json

--model is a checkpoint folder in the Hugging Face layout (config.json + model.safetensors, or shards), as written
by the tour, 'lora-ref finetune' or transformers' save_pretrained. Text is encoded as UTF-8 bytes (the byte-level
tokenizer of lora_ref.training.data, vocabulary 256), so the model must have vocab_size 256. Without --temperature the
continuation is greedy (argmax, deterministic); with --temperature T > 0 tokens are sampled from softmax(logits/T),
optionally among the --top-k most likely, with the random generator seeded by --seed (default 0), so a command
line always prints the same text. --max-new-tokens defaults to 200, or fewer when the model's
max_position_embeddings leaves less room. The output is the prompt followed by the continuation; with --json,
one JSON document with prompt, completion, token counts and the settings."""

DEFAULT_NEW_TOKENS = 200


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder (config.json + model.safetensors)")
    p.add_argument("--prompt", required=True, help="text to continue (at least one byte)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"tokens (bytes) to generate (default {DEFAULT_NEW_TOKENS}, or what fits the context)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the K most likely tokens")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (default 0)")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")


def run(args) -> int:
    import math

    import numpy as np

    from lora_ref.errors import UsageError

    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UsageError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_k is not None and args.temperature == 0:
        raise UsageError("--top-k applies to sampling; give --temperature > 0 as well")
    if args.max_new_tokens is not None and args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")

    from lora_ref.files.models import model_arg
    from lora_ref.modeling.llama import Llama
    from lora_ref.training.data import VOCAB_SIZE, decode, encode

    args.model = model_arg(args.model)  # a known model name (lora-ref models) is fetched on first use
    model = Llama.from_pretrained(args.model)
    if model.config.vocab_size != VOCAB_SIZE:
        raise ValueError(f"{args.model}: vocab_size is {model.config.vocab_size}, but generate uses the byte-level "
                         f"tokenizer (vocabulary {VOCAB_SIZE})")
    prompt_ids = encode(args.prompt)
    if prompt_ids.size == 0:
        raise ValueError("the prompt is empty; give at least one character")
    limit = model.config.max_position_embeddings
    if prompt_ids.size > limit:
        raise ValueError(f"the prompt is {prompt_ids.size} bytes long; the model reads at most {limit} "
                         f"(max_position_embeddings)")
    n_new = args.max_new_tokens
    if n_new is None:
        n_new = min(DEFAULT_NEW_TOKENS, limit - prompt_ids.size)

    rng = np.random.default_rng(args.seed) if args.temperature > 0 else None
    out = model.generate(prompt_ids[None, :], n_new, temperature=args.temperature, top_k=args.top_k, rng=rng)
    completion = decode(out[0, prompt_ids.size:])
    if args.json:
        doc = {
            "model": str(args.model),
            "prompt": args.prompt,
            "completion": completion,
            "prompt_tokens": int(prompt_ids.size),
            "new_tokens": int(n_new),
            "token_ids": out[0].tolist(),
            "temperature": args.temperature,
            "top_k": args.top_k,
            "seed": args.seed if args.temperature > 0 else None,
        }
        print(json.dumps(doc, ensure_ascii=False))
    else:
        print(args.prompt + completion)
    return 0
