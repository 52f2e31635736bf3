"""``lora-ref eval``: a model's mean next-token loss and perplexity on a text file."""

from __future__ import annotations

HELP = "a model's next-token loss and perplexity on a text file"

EXAMPLES = """\
examples:
  lora-ref eval --model smollm2-135m-instruct --data notes.txt
  lora-ref eval --model DIR --adapter runs/lora --data held_out.txt --seq 256 --json

--data is a UTF-8 text file. Its tokens (the model folder's tokenizer, no special tokens added; UTF-8 bytes for
a folder without tokenizer.json) are cut into consecutive windows of --seq tokens (default 128; a last window of
at least 2 tokens counts); within each window every token after the first is predicted from the ones before it.
The loss is the mean negative log-likelihood of those predictions in nats, the perplexity exp(loss).
--seq may not exceed the model's context (max_position_embeddings). --adapter applies a PEFT LoRA adapter; one
trained for another model is refused before the model is read.

Prints one line; with --json, one JSON document: loss, perplexity, tokens (the number of predicted positions,
the denominator of the mean: the text's tokens minus one per window), text_tokens, windows, seq and the inputs.
--threads N sets the threads of Numba's kernels and of the BLAS (default: $LORA_REF_THREADS, else the CPUs idle
when the command starts)."""

DEFAULT_SEQ = 128


def add_arguments(p) -> None:
    from lora_ref.commands.loading import add_model_arguments

    add_model_arguments(p)
    p.add_argument("--data", required=True, metavar="FILE", help="UTF-8 text file to evaluate on")
    p.add_argument("--seq", type=int, default=DEFAULT_SEQ, metavar="T",
                   help=f"tokens per window (default {DEFAULT_SEQ}; at most the model's context)")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")


def read_text(path) -> str:
    """The text of a UTF-8 file (a BOM is dropped), or ``ValueError`` naming the file."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"data file not found: {p}")
    try:
        return p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"data file is not UTF-8 text: {p} (byte {e.start})") from None


def run(args) -> int:
    import json
    import sys
    import time

    from lora_ref.commands.loading import load_model, model_folder
    from lora_ref.errors import UsageError
    from lora_ref.modeling.evaluation import evaluate_tokens
    from lora_ref.modeling.llama import CONFIG_FILE, LlamaConfig

    if args.seq < 2:
        raise UsageError(f"--seq must be >= 2 (a window predicts its tokens after the first), got {args.seq}")
    t0 = time.perf_counter()
    text = read_text(args.data)  # before any model work
    folder = model_folder(args.model)
    limit = LlamaConfig.from_json_file(folder / CONFIG_FILE).max_position_embeddings
    if args.seq > limit:
        raise UsageError(f"--seq {args.seq} is longer than the model's context ({limit} tokens)")
    model, tok = load_model(folder, args.adapter, command="eval")
    ids = tok.encode(text, add_special_tokens=False)
    if ids.size < 2:
        raise ValueError(f"{args.data} has {ids.size} token(s); eval needs at least 2")
    result = evaluate_tokens(model, ids, args.seq, progress=not args.json and sys.stderr.isatty())
    if args.json:
        doc = {"model": str(args.model), "adapter": None if args.adapter is None else str(args.adapter),
               "data": str(args.data), **result, "seconds": round(time.perf_counter() - t0, 3)}
        sys.stdout.write(json.dumps(doc) + "\n")
    else:
        sys.stdout.write(f"loss {result['loss']:.4f} nats/token, perplexity {result['perplexity']:.3f} over "
                         f"{result['tokens']:,} predicted tokens ({result['text_tokens']:,} tokens in "
                         f"{result['windows']} windows of up to {result['seq']})\n")
    return 0
