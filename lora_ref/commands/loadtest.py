"""``lora-ref loadtest``: a bounded load test of a running ``lora-ref serve`` (or any OpenAI-shaped server)."""

from __future__ import annotations

HELP = "send concurrent requests to a running server; report throughput, latency and errors"

EXAMPLES = """\
examples:
  lora-ref loadtest --url http://127.0.0.1:8000 --clients 32 --requests 200 --adapters a,b,c,d
  lora-ref loadtest --url http://127.0.0.1:8000 --clients 4 --requests 16 --max-tokens 16 --json

--clients coroutines send --requests streaming chat requests in all (each client takes the next request when
its last one ends), cycling through the --adapters names (adapter names, or the served base name; default
every model GET /v1/models lists) and a few short prompts (or --prompt, repeatable). Greedy decoding unless
--temperature > 0. It reports throughput (requests and generated tokens per second of wall time), latency p50
and p99 (request sent -> stream ended), time to the first text, and errors (HTTP errors, error events,
streams that end without a finish reason); every request is counted once, ok or error, none retried.
Exit status 1 when any request failed."""


def add_arguments(p) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default http://127.0.0.1:8000)")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    p.add_argument("--requests", type=int, default=200, help="requests in all (default 200)")
    p.add_argument("--adapters", default=None, metavar="A,B,...",
                   help="model names to cycle through (default: all that /v1/models lists)")
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT", help="a prompt (repeatable)")
    p.add_argument("--completions", action="store_true", help="use /v1/completions instead of chat")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds one request may take (default 3600)")
    p.add_argument("--json", action="store_true", help="the report as one JSON document")


def run(args) -> int:
    import json
    import math
    import sys

    from lora_ref.errors import UsageError
    from lora_ref.serving.loadtest import DEFAULT_PROMPTS, run_load_test

    if args.clients < 1 or args.requests < 1 or args.max_tokens < 1:
        raise UsageError("--clients, --requests and --max-tokens must be >= 1")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UsageError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if not math.isfinite(args.timeout) or args.timeout <= 0:
        raise UsageError(f"--timeout must be a positive number, got {args.timeout}")
    if not args.url.startswith(("http://", "https://")):
        raise UsageError(f"--url must start with http:// or https://, got {args.url!r}")
    models = None
    if args.adapters is not None:
        models = [m.strip() for m in args.adapters.split(",") if m.strip()]
        if not models:
            raise UsageError("--adapters must name at least one model")
    report = run_load_test(args.url, clients=args.clients, requests=args.requests, models=models,
                           prompts=args.prompt or DEFAULT_PROMPTS, chat=not args.completions,
                           max_tokens=args.max_tokens, temperature=args.temperature, timeout=args.timeout)
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print(report.summary())
        for m in report.error_messages:
            print(f"  {m}")
    if report.errors:
        sys.stderr.write(f"lora-ref loadtest: {report.errors} of {report.requests} requests failed\n")
        return 1
    return 0
