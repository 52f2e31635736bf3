"""``lora-ref finetune``: fine-tune a model with full training, LoRA or QLoRA, on the user's data or the tutorial's.

Two ways in. With ``--data FILE`` (and ``--model DIR``, or the tutorial model when ``--model`` is not given),
:func:`finetune_data` trains on the user's own ``.txt`` / ``.jsonl`` file, read by
:mod:`lora_ref.training.datasets` (loss masks for chat and prompt–completion records). Without ``--data``,
:func:`finetune` trains the pretrained tutorial model on the tutorial's fine-tuning corpus (the tour and the notebooks
call it). Both return the trained model, its :class:`~lora_ref.training.loop.History` and a summary dict.
"""

from __future__ import annotations

from lora_ref.training.finetune import (  # noqa: F401  (the command's library, also imported from here)
    DATA_BATCH,
    DATA_LR,
    DEFAULT_LR,
    DEFAULT_TARGETS,
    METHODS,
    finetune,
    finetune_data,
    model_folder,
    prepare_model,
    save_finetuned,
)

EXAMPLES = """\
examples:
  lora-ref finetune --model path/to/hf-folder --data chats.jsonl --method lora --targets q_proj,v_proj \\
                    --steps 200 --seq 512 --batch 4 --eval-data held_out.jsonl --out runs/my-lora
  lora-ref finetune --model path/to/hf-folder --data notes.txt --method qlora --targets all-linear --out runs/q
  lora-ref finetune --model path/to/hf-folder --data pairs.jsonl --method full --lr 2e-5 --out runs/full
  lora-ref finetune --method lora --r 8 --alpha 16 --targets q_proj,v_proj --out runs/lora   (tutorial model)
  lora-ref finetune --method lora --quick --steps 20 --json          # no --out: train and report only

--model is a Hugging Face model folder (config.json + model.safetensors or shards, with tokenizer.json for a real
model); without it, the pretrained tutorial model (lora_ref.training.tutorial; trained once and cached, --quick uses the
quick-recipe base). --data is the training file:
  .txt     plain text: tokenized once, cut into consecutive windows of --seq tokens (default 128), loss on every
           token (the same windows and loss as 'lora-ref eval');
  .jsonl   one JSON object per line, either {"messages": [{"role": "user", "content": ...}, ...]}: the model's
           chat template applied, loss on the assistant turns only (their content and end-of-turn token); or
           {"prompt": "...", "completion": "..."}: joined raw (no template; put the separating space or newline in
           the text), the end-of-sequence token appended, loss on the completion only (TRL's SFTTrainer
           conventions; a prompt and completion given as lists of messages use the chat template). A record longer
           than --seq tokens is refused, not truncated; without --seq, the longest record sets it.
Without --data, the tutorial model trains on the tutorial's fine-tuning corpus (Python source).

full trains every weight; lora freezes the base and trains adapters of rank --r with scaling --alpha/--r on
--targets (comma-separated module names, NAME=RANK for a rank of its own, or all-linear: every linear layer but the
output head, the same syntax as 'lora-ref count'); qlora does the same on a base whose linear layers (not the
embeddings or lm_head) are quantized in memory to NF4 with double quantization, blocksize 64. AdamW with a linear
warmup (5% of the steps, rounded down) and a cosine decay to lr/10, gradient clipping at 1.0; batches are drawn in
random order, each example once per epoch, seeded by --seed. --eval-data (a .txt or .jsonl file read the same way) is scored
before and after training: the mean next-token loss over its target tokens.

--out receives the adapter in PEFT's format (adapter_config.json + adapter_model.safetensors; PeftModel loads it
on the same base) for lora and qlora, or a model folder (config.json + model.safetensors + the base's tokenizer and
generation files; transformers loads it) for full, plus trainer_state.json (the loss history). It must be missing
or empty, and it appears complete or not at all. With --json, stdout is one JSON document with the losses, the
trainable parameter count and the time. The progress bar (stderr) shows the loss of each step."""

def add_arguments(p) -> None:
    from lora_ref.adapters.targets import HELP as TARGETS_HELP
    from lora_ref.adapters.targets import targets_arg

    p.add_argument("--method", required=True, choices=METHODS, help="full, lora or qlora")
    p.add_argument("--model", default=None, help="model folder (default: the tutorial model)")
    p.add_argument("--data", default=None, help="training data: .txt, or .jsonl chat / prompt-completion records")
    p.add_argument("--eval-data", default=None, help="data scored before and after training (.txt or .jsonl)")
    p.add_argument("--r", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha; scaling = alpha / r (default 16)")
    p.add_argument("--targets", type=targets_arg, default=DEFAULT_TARGETS,
                   help=f"modules to adapt: {TARGETS_HELP} (default {DEFAULT_TARGETS})")
    p.add_argument("--rslora", action="store_true", help="scale by alpha / sqrt(r) (rank-stabilized LoRA)")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout on the adapter input (default 0)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default with --data: 2e-4 lora/qlora, 2e-5 full; tutorial corpus: "
                        "3e-3 lora/qlora, 1e-3 full)")
    p.add_argument("--batch", type=int, default=None,
                   help=f"sequences per batch (default {DATA_BATCH} with --data, 16 on the tutorial corpus)")
    p.add_argument("--seq", type=int, default=None,
                   help="tokens per sequence (with --data: .txt windows, default 128; .jsonl: the longest record "
                        "allowed, default the longest there is; at most the model's context. Tutorial corpus: "
                        "default 128, its context)")
    p.add_argument("--seed", type=int, default=0, help="seed of the adapter init, dropout and batches (default 0)")
    p.add_argument("--quick", action="store_true", help="start from the quick-recipe tutorial base (cached in under "
                                                        "a minute)")
    p.add_argument("--out", default=None, help="folder for the adapter / model (missing or empty)")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.add_argument("--modules-to-save", default=None, metavar="NAMES",
                   help="lora/qlora: comma-separated modules trained in full and saved with the adapter "
                        "(PEFT's modules_to_save), e.g. embed_tokens,lm_head")


def _modules_to_save(args):
    from lora_ref.errors import UsageError

    if not getattr(args, "modules_to_save", None):
        return None
    names = [n.strip() for n in args.modules_to_save.split(",")]
    if args.method == "full" or not all(names):
        raise UsageError("--modules-to-save takes comma-separated module names and applies to lora and qlora")
    return names


def run(args) -> int:
    import json
    import math
    import sys

    from lora_ref.errors import UsageError
    from lora_ref.files.outputs import check_out_dir

    if args.r < 1:
        raise UsageError(f"--r must be >= 1, got {args.r}")
    if not math.isfinite(args.alpha) or args.alpha <= 0:
        raise UsageError(f"--alpha must be a positive number, got {args.alpha}")
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr must be a positive number, got {args.lr}")
    if args.batch is not None and args.batch < 1:
        raise UsageError(f"--batch must be >= 1, got {args.batch}")
    if not 0.0 <= args.dropout < 1.0:
        raise UsageError(f"--dropout must lie in [0, 1), got {args.dropout}")
    user_data = args.data is not None
    if not user_data:
        if args.model is not None:
            raise UsageError("--model needs --data FILE (the training data for that model)")
        if args.eval_data is not None:
            raise UsageError("--eval-data needs --data FILE (without --data, the tutorial corpus has its own "
                             "validation split)")
        if args.seq is not None and not 1 <= args.seq <= 128:
            raise UsageError(f"--seq must lie in 1..128 (the tutorial model's context), got {args.seq}")
    else:
        if args.quick and args.model is not None:
            raise UsageError("--quick selects the quick tutorial base; it does not apply with --model")
        if args.seq is not None and args.seq < 2:
            raise UsageError(f"--seq must be >= 2 (a token and the next one), got {args.seq}")
    if args.out is not None:
        check_out_dir(args.out)  # refuse before training

    if user_data:
        folder = model_folder(args.model, quick=args.quick, progress=not args.json)
        if args.seq is not None:
            from lora_ref.modeling.llama import LlamaConfig

            context = LlamaConfig.from_json_file(folder / "config.json").max_position_embeddings
            if args.seq > context:
                raise UsageError(f"--seq {args.seq} is longer than the model's context ({context} tokens, "
                                 "max_position_embeddings)")
        model, hist, summary, folder = finetune_data(
            args.method, args.data, model=args.model, eval_data=args.eval_data, r=args.r, alpha=args.alpha,
            targets=args.targets, use_rslora=args.rslora, dropout=args.dropout, steps=args.steps, lr=args.lr,
            batch=DATA_BATCH if args.batch is None else args.batch, seq=args.seq, seed=args.seed,
            quick=args.quick, modules_to_save=_modules_to_save(args))
    else:
        folder = None
        model, hist, summary = finetune(args.method, r=args.r, alpha=args.alpha, targets=args.targets,
                                        use_rslora=args.rslora, dropout=args.dropout, steps=args.steps, lr=args.lr,
                                        batch=16 if args.batch is None else args.batch,
                                        seq=128 if args.seq is None else args.seq, seed=args.seed, quick=args.quick,
                                        modules_to_save=_modules_to_save(args))
    if args.out is not None:
        save_finetuned(model, args.method, args.out, source_folder=folder,
                       state={**hist.to_dict(), "summary": summary})
    summary["out"] = args.out
    if args.json:
        sys.stdout.write(json.dumps(summary) + "\n")
    elif user_data:
        evals = (f"; eval loss {summary['eval_loss_before']:.4f} → {summary['eval_loss_after']:.4f} nats/token"
                 if summary["eval_loss_before"] is not None else "")
        sys.stdout.write(
            f"{args.method}: {summary['trainable_parameters']:,} trainable parameters, {args.steps} steps on "
            f"{summary['examples']:,} {summary['data_kind']} examples ({summary['seconds_per_step']:.2f} s/step); "
            f"training loss {summary['train_loss_first']:.4f} (first step) → {summary['train_loss_last']:.4f} "
            f"(last){evals}" + (f"; wrote {args.out}" if args.out else "") + "\n")
    else:
        sys.stdout.write(
            f"{args.method}: {summary['trainable_parameters']:,} trainable parameters, {args.steps} steps in "
            f"{summary['seconds']:.0f} s; validation loss {summary['val_loss_before']:.3f} → "
            f"{summary['val_loss_after']:.3f} nats/byte" + (f"; wrote {args.out}" if args.out else "") + "\n")
    return 0
