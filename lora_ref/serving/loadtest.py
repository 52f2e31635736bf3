"""A bounded load test for an OpenAI-shaped server: concurrent streaming clients, throughput, latency, errors.

``clients`` coroutines share one counter of ``requests``: each takes the next request number, sends a streaming
``POST /v1/chat/completions`` (or ``/v1/completions``) for model ``models[i % len(models)]`` with prompt
``prompts[i % len(prompts)]``, reads the server-sent events to ``data: [DONE]``, and records the latency (request
sent → last event), the time to the first piece of text, the tokens generated (the final ``usage`` chunk) and
whether it ended properly (a ``finish_reason``, then ``[DONE]``). A request that gets an HTTP error, an error
event, a broken stream or no finish reason counts as an error; none is retried, and every one of the
``requests`` is accounted for (``ok + errors == requests``), so a lost request shows.

Everything is bounded: a fixed number of requests, ``max_tokens`` each, and an overall ``timeout``.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = ["DEFAULT_PROMPTS", "LoadReport", "run_load_test"]

DEFAULT_PROMPTS = (
    "What is the capital of France? Answer in one sentence.",
    "Name three colours.",
    "Write one sentence about the sea.",
    "What is 2 + 2?",
    "Give me a short greeting.",
    "What do bees make?",
    "Say something about mountains.",
    "Which animal says moo?",
)


@dataclass
class LoadReport:
    """What a load test measured. Latencies in seconds; ``throughput_*`` per second of wall time."""

    url: str
    clients: int
    requests: int
    ok: int
    errors: int
    wall_s: float
    completion_tokens: int
    throughput_rps: float
    throughput_tokens_s: float
    latency_p50_s: float
    latency_p99_s: float
    first_text_p50_s: float
    first_text_p99_s: float
    by_model: dict = field(default_factory=dict)
    error_messages: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"{self.requests} requests from {self.clients} clients to {self.url} in {self.wall_s:.1f} s: "
                f"{self.ok} ok, {self.errors} errors; {self.throughput_rps:.2f} requests/s, "
                f"{self.throughput_tokens_s:.1f} generated tokens/s ({self.completion_tokens} tokens); latency p50 "
                f"{self.latency_p50_s:.2f} s, p99 {self.latency_p99_s:.2f} s; first text p50 "
                f"{self.first_text_p50_s:.2f} s, p99 {self.first_text_p99_s:.2f} s")


async def _one(session, url: str, model: str, prompt: str, *, chat: bool, max_tokens: int,
               temperature: float) -> dict:
    body = {"model": model, "max_tokens": max_tokens, "temperature": temperature, "stream": True,
            "stream_options": {"include_usage": True}}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    path = "/v1/chat/completions" if chat else "/v1/completions"
    t0 = time.perf_counter()
    first = None
    finish = None
    tokens = 0
    done = False
    async with session.post(url + path, json=body) as resp:
        if resp.status != 200:
            text = await resp.text()
            return {"error": f"HTTP {resp.status}: {text[:200]}"}
        buf = b""
        async for data in resp.content.iter_any():
            buf += data
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                if not event.startswith(b"data: "):
                    continue
                payload = event[len(b"data: "):]
                if payload == b"[DONE]":
                    done = True
                    continue
                doc = json.loads(payload)
                if "error" in doc:
                    return {"error": f"error event: {doc['error'].get('message')}"}
                for choice in doc.get("choices") or []:
                    piece = choice.get("delta", {}).get("content") if chat else choice.get("text")
                    if piece and first is None:
                        first = time.perf_counter() - t0
                    if choice.get("finish_reason"):
                        finish = choice["finish_reason"]
                if doc.get("usage"):
                    tokens = int(doc["usage"]["completion_tokens"])
    latency = time.perf_counter() - t0
    if not done or finish is None:
        return {"error": f"stream ended without {'[DONE]' if finish else 'a finish_reason'}"}
    return {"latency": latency, "first": latency if first is None else first, "tokens": tokens,
            "finish": finish}


async def _run(url, clients, requests, models, prompts, chat, max_tokens, temperature, timeout):
    import aiohttp

    counter = iter(range(requests))
    results: list[tuple[int, str, dict]] = []
    limits = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=limits, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async def client():
            for i in counter:  # the shared iterator hands out each request number once
                model = models[i % len(models)]
                try:
                    r = await _one(session, url, model, prompts[i % len(prompts)], chat=chat,
                                   max_tokens=max_tokens, temperature=temperature)
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
                    r = {"error": f"{type(e).__name__}: {e}"}
                results.append((i, model, r))

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - t0
    return results, wall


def run_load_test(url: str, *, clients: int = 32, requests: int = 200, models=None, prompts=DEFAULT_PROMPTS,
                  chat: bool = True, max_tokens: int = 32, temperature: float = 0.0,
                  timeout: float = 3600.0) -> LoadReport:
    """Send ``requests`` streaming requests from ``clients`` concurrent clients to the server at ``url`` (e.g.
    ``http://127.0.0.1:8000``) and measure (see the module docstring). ``models``: the model names to cycle
    through (adapter names or the served name; default: every model ``GET /v1/models`` lists). ``timeout`` bounds
    each request (seconds)."""
    import urllib.request

    if not isinstance(clients, int) or clients < 1:
        raise ValueError(f"clients must be a positive integer, got {clients!r}")
    if not isinstance(requests, int) or requests < 1:
        raise ValueError(f"requests must be a positive integer, got {requests!r}")
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty strings")
    url = url.rstrip("/")
    if models is None:
        with urllib.request.urlopen(url + "/v1/models", timeout=30) as r:
            models = [m["id"] for m in json.load(r)["data"]]
    models = list(models)
    if not models:
        raise ValueError("models must name at least one model")
    results, wall = asyncio.run(_run(url, clients, requests, models, prompts, chat, max_tokens, temperature,
                                     timeout))
    ok = [r for _, _, r in results if "error" not in r]
    errors = [f"request {i} ({m}): {r['error']}" for i, m, r in sorted(results, key=lambda t: t[0]) if "error" in r]
    lost = requests - len(results)
    if lost:
        errors.append(f"{lost} requests never finished")
    lat = np.array([r["latency"] for r in ok]) if ok else np.array([np.nan])
    first = np.array([r["first"] for r in ok]) if ok else np.array([np.nan])
    tokens = sum(r["tokens"] for r in ok)
    by_model = {}
    for _, m, r in results:
        d = by_model.setdefault(m, {"ok": 0, "errors": 0})
        d["errors" if "error" in r else "ok"] += 1
    return LoadReport(url=url, clients=clients, requests=requests, ok=len(ok), errors=requests - len(ok),
                      wall_s=wall, completion_tokens=tokens, throughput_rps=len(ok) / wall,
                      throughput_tokens_s=tokens / wall, latency_p50_s=float(np.percentile(lat, 50)),
                      latency_p99_s=float(np.percentile(lat, 99)), first_text_p50_s=float(np.percentile(first, 50)),
                      first_text_p99_s=float(np.percentile(first, 99)), by_model=by_model,
                      error_messages=errors[:20])
