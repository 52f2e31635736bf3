"""``lora-ref chat``: an interactive multi-turn chat with a model folder, in the terminal or through a pipe."""

from __future__ import annotations

HELP = "chat with a model in the terminal (multi-turn; Ctrl-D or /exit ends)"

EXAMPLES = """\
examples:
  lora-ref chat --model smollm2-135m-instruct
  lora-ref chat --model DIR --adapter runs/lora --system "You answer in one sentence."
  printf 'Hi!\\nWhat did I just say?\\n' | lora-ref chat --model DIR

Each line you type is a user message; the model's answer streams back as it is generated, and the whole
conversation (system message, your messages, its answers) goes into the next prompt through the folder's chat
template, so the model sees the history. /reset forgets the history, /exit or Ctrl-D (end of input) ends the
chat. When the history no longer fits the model's context, the oldest turns are dropped.

Decoding is greedy unless --temperature T > 0 (with --top-k and --seed, as in 'lora-ref generate'); each answer
stops at the end-of-sequence token or after --max-new-tokens (default 200), and ends with a newline. The
prompt marker "> " is written only when the input is a terminal, so piped input gives just the answers.
--threads N sets the threads of Numba's kernels and of the BLAS for the prompts and the answers (default:
$LORA_REF_THREADS, else the CPUs idle when the chat starts)."""

PROMPT = "> "


def add_arguments(p) -> None:
    from lora_ref.commands.generate import add_sampling_arguments
    from lora_ref.commands.loading import add_model_arguments

    add_model_arguments(p)
    p.add_argument("--system", default=None, metavar="TEXT", help="system message (the template may add a default)")
    add_sampling_arguments(p)


def fit_history(tok, system, turns, room: int):
    """Prompt ids for ``system`` + ``turns`` (a list of message dicts ending with a user message), dropping the
    oldest user/assistant pairs until the prompt leaves at least ``room`` positions; ``None`` if even the last
    message alone does not fit."""
    while True:
        messages = ([{"role": "system", "content": system}] if system is not None else []) + turns
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if ids.size <= room:
            return ids, turns
        if len(turns) <= 1:
            return None, turns
        turns = turns[2:]  # the oldest user message and its answer


def run(args) -> int:
    import sys

    from lora_ref.commands.generate import DEFAULT_NEW_TOKENS, check_sampling_arguments, sampling_rng, stream_text
    from lora_ref.commands.loading import load_model, model_folder
    from lora_ref.modeling.generate import generate_tokens, stop_token_ids
    from lora_ref.modeling.tokenizer import ByteTokenizer

    check_sampling_arguments(args)
    folder = model_folder(args.model)
    model, tok = load_model(folder, args.adapter, command="chat")
    if isinstance(tok, ByteTokenizer) or tok.chat_template is None:
        raise ValueError(f"{folder} has no chat template (tokenizer_config.json or chat_template.jinja); "
                         "use 'lora-ref generate --prompt' for a model without one")
    stops = stop_token_ids(folder, tok)
    rng = sampling_rng(args)
    limit = model.config.max_position_embeddings
    n_new = DEFAULT_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens
    n_new = min(n_new, limit - 1)
    interactive = sys.stdin.isatty()
    turns: list[dict] = []
    while True:
        if interactive:
            sys.stdout.write(PROMPT)
            sys.stdout.flush()
        line = sys.stdin.readline()
        if line == "":  # Ctrl-D / end of the pipe
            if interactive:
                sys.stdout.write("\n")
            return 0
        text = line.rstrip("\r\n")
        if text.strip() == "/exit":
            return 0
        if text.strip() == "/reset":
            turns = []
            continue
        if text.strip() == "":
            continue
        ids, kept = fit_history(tok, args.system, turns + [{"role": "user", "content": text}], limit - n_new)
        if ids is None:
            sys.stderr.write(f"lora-ref chat: that message is too long for the model's context of {limit} tokens "
                             f"with room for {n_new} new ones; try a shorter one\n")
            continue
        answer_ids = stream_text(generate_tokens(model, ids, n_new, temperature=args.temperature, top_k=args.top_k,
                                                 rng=rng, stop_ids=stops, decode_threads=None),  # --threads
                                 tok, sys.stdout)
        sys.stdout.write("\n")
        sys.stdout.flush()
        turns = kept + [{"role": "assistant", "content": tok.decode(answer_ids)}]
