"""``lora-ref generate``: continue a prompt, or answer one chat message, with a model folder's own tokenizer."""

from __future__ import annotations

import json

HELP = "generate text from a checkpoint"

EXAMPLES = """\
examples:
  lora-ref generate --model smollm2-135m-instruct --chat "What is the capital of France? Answer in one sentence."
  lora-ref generate --model DIR --adapter runs/lora --prompt "Once upon a time" --max-new-tokens 60
  lora-ref generate --model DIR --chat "Tell me a story" --temperature 0.8 --top-k 40 --seed 1
  lora-ref generate --model runs/tour/base --prompt "def " --json

--model is a model folder in the Hugging Face layout (config.json + model.safetensors, or shards, and the
tokenizer files tokenizer.json / tokenizer_config.json), or a known model's name. A folder without
tokenizer.json is a byte-level model (the tutorial model): text is encoded as UTF-8 bytes. --adapter applies a
PEFT LoRA adapter; one trained for another model is refused before the model is read.

--prompt continues the text as given (encoded as transformers' tokenizer(text) does, special tokens included
where the tokenizer adds them). --chat sends the text as one user message through the folder's chat template
(with --system as the system message; the template may add its own default) and prints the assistant's answer.
Decoding is greedy by default (argmax; --greedy says so explicitly) and equals transformers'
generate(do_sample=False) token for token; --temperature T > 0 samples from softmax(logits/T), optionally among
the --top-k most likely tokens, with the generator seeded by --seed (default 0), so a command line always prints
the same text. Generation stops at the end-of-sequence token (generation_config.json's eos_token_id, else
config.json's, else the tokenizer's; the byte-level tutorial model has none) or after --max-new-tokens (default
200, or what the context leaves).

Tokens are printed as they are generated (after the prompt for --prompt). With --json nothing streams: stdout is
one JSON document with text and token_ids (the generated tokens only, the end token excluded), the prompt's
token count, why generation stopped ("eos" or "length") and the settings. --threads N sets the threads of
Numba's kernels and of the BLAS for the prompt and for every one-token step (default: $LORA_REF_THREADS, else the
CPUs idle when the command starts)."""

DEFAULT_NEW_TOKENS = 200


def add_arguments(p) -> None:
    from lora_ref.commands.loading import add_model_arguments

    add_model_arguments(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", default=None, help="text to continue")
    what.add_argument("--chat", default=None, metavar="TEXT", help="a user message, answered through the chat template")
    p.add_argument("--system", default=None, metavar="TEXT", help="system message for --chat")
    add_sampling_arguments(p)
    p.add_argument("--json", action="store_true", help="one JSON document on stdout, no streaming")


def add_sampling_arguments(p) -> None:
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"most tokens to generate (default {DEFAULT_NEW_TOKENS}, or what fits the context)")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (the default)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the K most likely tokens")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (default 0)")


def check_sampling_arguments(args) -> None:
    import math

    from lora_ref.errors import UsageError

    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UsageError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.greedy and args.temperature > 0:
        raise UsageError("--greedy and --temperature > 0 contradict each other; give one")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_k is not None and args.temperature == 0:
        raise UsageError("--top-k applies to sampling; give --temperature > 0 as well")
    if args.max_new_tokens is not None and args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")


def sampling_rng(args):
    import numpy as np

    return np.random.default_rng(args.seed) if args.temperature > 0 else None


def run(args) -> int:
    import sys

    from lora_ref.commands.loading import load_model, model_folder
    from lora_ref.errors import UsageError
    from lora_ref.modeling.generate import generate_tokens, stop_token_ids

    check_sampling_arguments(args)
    if args.system is not None and args.chat is None:
        raise UsageError("--system applies to --chat")
    folder = model_folder(args.model)
    model, tok = load_model(folder, args.adapter, command="generate")

    if args.chat is not None:
        messages = ([{"role": "system", "content": args.system}] if args.system is not None else []) \
            + [{"role": "user", "content": args.chat}]
        prompt_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    else:
        prompt_ids = tok.encode(args.prompt, add_special_tokens=True)
    if prompt_ids.size == 0:
        raise ValueError("the prompt is empty; give at least one character")
    limit = model.config.max_position_embeddings
    if prompt_ids.size > limit:
        raise ValueError(f"the prompt is {prompt_ids.size} tokens long; the model reads at most {limit} "
                         f"(max_position_embeddings)")
    n_new = args.max_new_tokens
    if n_new is None:
        n_new = min(DEFAULT_NEW_TOKENS, limit - prompt_ids.size)

    # decode on the threads the command was given (--threads, else the CPUs idle at the start), not on
    # generate_tokens' default of one thread (see lora_ref.threads.limited)
    tokens = generate_tokens(model, prompt_ids, n_new, temperature=args.temperature, top_k=args.top_k,
                             rng=sampling_rng(args), stop_ids=stop_token_ids(folder, tok), decode_threads=None)
    if args.json:
        ids = list(tokens)
        doc = {
            "model": str(args.model),
            "adapter": None if args.adapter is None else str(args.adapter),
            "prompt" if args.chat is None else "chat": args.prompt if args.chat is None else args.chat,
            "text": tok.decode(ids),
            "token_ids": ids,
            "prompt_tokens": int(prompt_ids.size),
            "new_tokens": len(ids),
            "max_new_tokens": int(n_new),
            "stop_reason": "length" if len(ids) == n_new else "eos",
            "temperature": args.temperature,
            "top_k": args.top_k,
            "seed": args.seed if args.temperature > 0 else None,
        }
        print(json.dumps(doc, ensure_ascii=False))
        return 0
    if args.chat is None:
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
    stream_text(tokens, tok, sys.stdout)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


def stream_text(tokens, tokenizer, out) -> list[int]:
    """Write the text of ``tokens`` (an iterator of ids) to ``out`` as it comes; return the ids."""
    from lora_ref.modeling.generate import TextStream

    stream = TextStream(tokenizer)
    for t in tokens:
        piece = stream.push(t)
        if piece:
            out.write(piece)
            out.flush()
    out.write(stream.finish())
    out.flush()
    return stream.tokens
