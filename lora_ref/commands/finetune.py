"""``lora-ref finetune``: fine-tune the tutorial model on Python source with full training, LoRA or QLoRA.

The library function behind it is :func:`lora_ref.training.finetune.finetune`.
"""

from __future__ import annotations

from lora_ref.training.finetune import DEFAULT_LR, METHODS, finetune, prepare_model  # noqa: F401  (the command's library)

HELP = "fine-tune the tutorial model with full, LoRA or QLoRA training"

EXAMPLES = """\
examples:
  lora-ref finetune --method lora --r 8 --alpha 16 --targets q_proj v_proj --out runs/lora
  lora-ref finetune --method qlora --r 8 --alpha 16 --targets all-linear --steps 200 --out runs/qlora
  lora-ref finetune --method full --steps 100 --out runs/full --json
  lora-ref finetune --method lora --quick --steps 20 --json          # no --out: train and report only

Starts from the pretrained tutorial model (lora_ref.training.tutorial; trained once and cached, --quick uses the
quick-recipe base) and trains on the fine-tuning corpus (the source of some standard-library modules, a different
domain than the pretraining prose) with AdamW, a cosine schedule and gradient clipping. full trains every weight;
lora freezes the base and trains adapters of rank --r with scaling --alpha/--r on --targets (module names or
'all-linear'); qlora does the same on a base whose linear layers (not the embeddings or lm_head) are quantized to
NF4 with double quantization, blocksize 64. --out receives the adapter in PEFT's format (adapter_config.json +
adapter_model.safetensors) for lora and qlora, or an HF checkpoint (config.json + model.safetensors) for full,
plus trainer_state.json (the loss history); it must be missing or empty. With --json, stdout is one JSON document
with the losses before and after, the trainable parameter count and the time."""

def add_arguments(p) -> None:
    p.add_argument("--method", required=True, choices=METHODS, help="full, lora or qlora")
    p.add_argument("--r", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha; scaling = alpha / r (default 16)")
    p.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"],
                   help="modules to adapt: names (q_proj v_proj ...) or all-linear (default q_proj v_proj)")
    p.add_argument("--rslora", action="store_true", help="scale by alpha / sqrt(r) (rank-stabilized LoRA)")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout on the adapter input (default 0)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3 full, 3e-3 lora/qlora)")
    p.add_argument("--batch", type=int, default=16, help="sequences per batch (default 16)")
    p.add_argument("--seq", type=int, default=128, help="bytes per sequence (default 128, the model's context)")
    p.add_argument("--seed", type=int, default=0, help="seed of the adapter init, dropout and batches (default 0)")
    p.add_argument("--quick", action="store_true", help="start from the quick-recipe base (cached in under a minute)")
    p.add_argument("--out", default=None, help="folder for the adapter / checkpoint (missing or empty)")
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
    from lora_ref.files.outputs import check_out_dir, write_json

    if args.r < 1:
        raise UsageError(f"--r must be >= 1, got {args.r}")
    if not math.isfinite(args.alpha) or args.alpha <= 0:
        raise UsageError(f"--alpha must be a positive number, got {args.alpha}")
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr must be a positive number, got {args.lr}")
    if args.batch < 1 or not 1 <= args.seq <= 128:
        raise UsageError(f"--batch must be >= 1 and --seq in 1..128 (the model's context), got {args.batch}, {args.seq}")
    if not 0.0 <= args.dropout < 1.0:
        raise UsageError(f"--dropout must lie in [0, 1), got {args.dropout}")
    if args.out is not None:
        check_out_dir(args.out)  # refuse before training

    model, hist, summary = finetune(args.method, r=args.r, alpha=args.alpha, targets=args.targets,
                                    use_rslora=args.rslora, dropout=args.dropout, steps=args.steps, lr=args.lr,
                                    batch=args.batch, seq=args.seq, seed=args.seed, quick=args.quick,
                                    modules_to_save=_modules_to_save(args))
    if args.out is not None:
        if args.method == "full":
            model.save_pretrained(args.out)
        else:
            from lora_ref.adapters.peft_files import save_adapter

            save_adapter(model, args.out)
        write_json(f"{args.out}/trainer_state.json", {**hist.to_dict(), "summary": summary})
    summary["out"] = args.out
    if args.json:
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        sys.stdout.write(
            f"{args.method}: {summary['trainable_parameters']:,} trainable parameters, {args.steps} steps in "
            f"{summary['seconds']:.0f} s; validation loss {summary['val_loss_before']:.3f} → "
            f"{summary['val_loss_after']:.3f} nats/byte" + (f"; wrote {args.out}" if args.out else "") + "\n")
    return 0
