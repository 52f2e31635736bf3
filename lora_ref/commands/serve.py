"""``lora-ref serve``: an OpenAI-shaped HTTP server for one base model and many LoRA adapters, batched continuously."""

from __future__ import annotations

HELP = "serve a model and its LoRA adapters over HTTP (OpenAI's API shape, continuous batching)"

EXAMPLES = """\
examples:
  lora-ref serve --model smollm2-135m-instruct --adapter veloria=runs/veloria-lora --port 8000
  lora-ref serve --model DIR --adapter a=ad/a --adapter b=ad/b --max-batch 16 --max-adapters 2

Routes: POST /v1/completions, POST /v1/chat/completions (the folder's chat template), GET /v1/models,
POST /v1/load_lora_adapter {"lora_name": NAME, "lora_path": DIR} and POST /v1/unload_lora_adapter
{"lora_name": NAME} (vLLM's), GET /health, GET /stats. A request's "model" is the served name (--served-name,
default the --model value's last path part) for the base alone, or an adapter's NAME. Any OpenAI client works:

  from openai import OpenAI
  client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
  client.chat.completions.create(model="veloria", messages=[{"role": "user", "content": "Hi"}], temperature=0)

Requests run together: a new one joins the running batch at the next decode step, up to --max-batch rows, each
row with its own adapter, KV cache and sampling settings (temperature 0 = greedy, equal to 'lora-ref generate
--greedy'; top_p, top_k, seed, stop, max_tokens). At most --max-adapters adapters are held in memory; a request
for another registered adapter loads it again from its folder, evicting the least recently used idle one.

The server listens on --host only (default 127.0.0.1, this machine alone); --port 0 picks a free port. Once it
listens it prints "serving NAME ... on http://HOST:PORT". SIGTERM or Ctrl-C stops it: the socket closes, requests in
flight get --shutdown-timeout seconds to finish and the rest are cancelled; the exit status is 0.
--threads N sets the threads of Numba's kernels and of the BLAS in the compute thread (default: $LORA_REF_THREADS,
else the CPUs idle when the command starts; at most Numba's pool, NUMBA_NUM_THREADS)."""


def add_arguments(p) -> None:
    from lora_ref.commands.loading import MODEL_HELP

    p.add_argument("--model", required=True, metavar="M", help=MODEL_HELP)
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="a PEFT LoRA adapter folder served under NAME (repeat for more)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = a free one)")
    p.add_argument("--served-name", default=None, metavar="NAME",
                   help="the base model's name in requests and /v1/models (default: the --model value's last part)")
    p.add_argument("--max-batch", type=int, default=8, metavar="N", help="rows decoded together (default 8)")
    p.add_argument("--max-adapters", type=int, default=4, metavar="K",
                   help="adapters held in memory at once, least recently used evicted (default 4)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                   help="seconds requests in flight get to finish after SIGTERM (default 30)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the generator that seeds requests without a seed (default: fresh entropy)")


def parse_adapters(specs: list[str], served_name: str) -> list[tuple[str, str]]:
    """[(name, folder)] of ``--adapter NAME=DIR`` values; a malformed or repeated name is a usage error."""
    from lora_ref.errors import UsageError

    out, seen = [], set()
    for spec in specs:
        name, sep, folder = spec.partition("=")
        name = name.strip()
        if not sep or not name or not folder:
            raise UsageError(f"--adapter must be NAME=DIR, got {spec!r}")
        if name in seen:
            raise UsageError(f"--adapter name {name!r} is given twice")
        if name == served_name:
            raise UsageError(f"--adapter name {name!r} is the served model's name; choose another")
        seen.add(name)
        out.append((name, folder))
    return out


def served_name_of(model_arg: str) -> str:
    """The default served name: the last part of a --model path, or a known model's name as given."""
    from pathlib import Path

    return Path(str(model_arg).rstrip("/\\")).name or str(model_arg)


def run(args) -> int:
    import math
    import sys

    from lora_ref.errors import UsageError

    if args.max_batch < 1:
        raise UsageError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.max_adapters < 1:
        raise UsageError(f"--max-adapters must be >= 1, got {args.max_adapters}")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    if not math.isfinite(args.shutdown_timeout) or args.shutdown_timeout < 0:
        raise UsageError(f"--shutdown-timeout must be a number >= 0, got {args.shutdown_timeout}")
    if not args.host.strip():
        raise UsageError("--host must not be empty")
    served = args.served_name if args.served_name is not None else served_name_of(args.model)
    if not served.strip():
        raise UsageError("--served-name must not be empty")
    adapters = parse_adapters(args.adapter, served)

    import signal

    def terminated(signum, frame):
        raise _Terminated

    try:  # SIGTERM while starting: stop as well, exit 0 (a server's normal end; run_server handles it afterwards)
        signal.signal(signal.SIGTERM, terminated)
    except ValueError:  # not the main thread
        pass
    try:
        return _serve(args, served, adapters)
    except _Terminated:
        sys.stderr.write("lora-ref serve: stopped before serving\n")
        return 0


class _Terminated(Exception):
    """SIGTERM arrived before the server listened."""


def _serve(args, served: str, adapters: list[tuple[str, str]]) -> int:
    import sys

    import numpy as np

    from lora_ref.commands.loading import load_model, model_folder
    from lora_ref.modeling.generate import stop_token_ids
    from lora_ref.serving.server import create, run_server
    from lora_ref.threads import default_threads

    folder = model_folder(args.model)
    model, tok = load_model(folder, None, command="serve")
    if args.threads is not None:
        threads = args.threads
    else:
        import numba

        threads = min(default_threads(), numba.config.NUMBA_NUM_THREADS)
    engine, app = create(model, tok, stop_ids=stop_token_ids(folder, tok), served_name=served,
                         max_batch=args.max_batch, max_adapters=args.max_adapters,
                         rng=np.random.default_rng(args.seed), threads=threads, root=str(folder))
    try:
        for name, path in adapters:  # each is read and checked now; beyond --max-adapters the oldest are evicted
            try:
                engine.load_adapter(name, path).result()
            except ValueError as e:
                raise ValueError(f"--adapter {name}: {e}") from None

        def ready(port: int) -> None:
            names = ", ".join(n for n, _ in adapters)
            sys.stdout.write(f"serving {served}{f' with adapters {names}' if names else ''} on "
                             f"http://{args.host}:{port}\n")
            sys.stdout.flush()

        run_server(app, host=args.host, port=args.port, shutdown_timeout=args.shutdown_timeout, on_ready=ready)
    finally:
        engine.close()
    sys.stderr.write("lora-ref serve: stopped\n")
    return 0
