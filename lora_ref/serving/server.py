"""An HTTP server with OpenAI's API shape in front of the continuous-batching :class:`~lora_ref.serving.engine.Engine`.

Routes (the request and response bodies are OpenAI's, so the official ``openai`` client works unchanged):

- ``POST /v1/completions``: continue ``prompt`` (a string, or a list of token ids), encoded as
  ``lora-ref generate --prompt`` does;
- ``POST /v1/chat/completions``: answer ``messages`` through the model folder's chat template, as
  ``lora-ref generate --chat`` and ``lora-ref chat`` do;
- ``GET /v1/models``: the base model (under its served name) and every loaded adapter (its ``parent`` the base);
- ``POST /v1/load_lora_adapter`` ``{"lora_name", "lora_path"}`` and ``POST /v1/unload_lora_adapter``
  ``{"lora_name"}``: vLLM's routes and bodies for adapters that come and go while serving (plain-text answers, as
  vLLM's);
- ``GET /health`` (200 while serving) and ``GET /stats`` (the engine's counters: rows running, requests waiting,
  resident adapters; not OpenAI's).

A request's ``model`` is the served name (the base alone) or an adapter's name. ``max_tokens`` (chat: also
``max_completion_tokens``; default: what the context leaves, as vLLM), ``temperature`` (0 = greedy; default 1,
as OpenAI's), ``top_p``, ``top_k`` (vLLM's extension), ``seed``,
``stop`` (a string or a list), ``ignore_eos`` (vLLM's), ``stream`` and ``stream_options.include_usage``. Streaming
answers are server-sent events, one ``data: {json}`` chunk per piece of text, then ``data: [DONE]``.

Errors have OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: 400 for malformed JSON, a field of
the wrong type or range, or a prompt that does not fit the context (code ``context_length_exceeded``); 404 for an
unknown model or adapter (``model_not_found``); 400 for an adapter folder that cannot be loaded (the server goes on
serving). A client that goes away mid-request (the handler is cancelled, or writing to it fails) cancels its
request, which frees its row at the engine's next step.

The stack is aiohttp's server (an asyncio event loop in the main thread); the model runs in the engine's one
compute thread, so the event loop only parses, tokenizes and writes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from pathlib import Path

from aiohttp import web

from lora_ref.serving.engine import Engine, Event, SamplingParams

__all__ = ["ApiError", "BackgroundServer", "build_app", "create", "run_server"]

_ENGINE = web.AppKey("engine", Engine)
_INFO = web.AppKey("info", dict)


class ApiError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> web.Response:
        return web.json_response({"error": {"message": self.message, "type": self.type, "param": self.param,
                                            "code": self.code}}, status=self.status)


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@web.middleware
async def _errors(request: web.Request, handler):
    """Every error as OpenAI's JSON body: ours, aiohttp's own (unknown route, wrong method), and unexpected ones."""
    try:
        return await handler(request)
    except ApiError as e:
        return e.response()
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return ApiError(e.status, e.reason or "error", type="not_found_error" if e.status == 404 else
                        "invalid_request_error").response()
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as e:  # a bug: say so in the body and on the server's log, keep serving
        logging.getLogger("lora_ref.serving").exception("error handling %s %s", request.method, request.path)
        return ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").response()


# ---- reading the request -----------------------------------------------------------------------------------------
async def _json_body(request: web.Request) -> dict:
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _bad(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    return body


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body: dict, key: str, default, lo: float, hi: float, *, lo_open: bool = False):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or not (lo < v if lo_open else lo <= v) or v > hi:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise _bad(f"{key} must be a number in {interval}, got {v!r}", key)
    return float(v)


def _integer(body: dict, key: str, lo: int | None = None):
    v = body.get(key)
    if v is None:
        return None
    if not _is_int(v) or (lo is not None and v < lo):
        raise _bad(f"{key} must be an integer{'' if lo is None else f' >= {lo}'}, got {v!r}", key)
    return v


def _sampling(body: dict, *, chat: bool, prompt_tokens: int, context: int) -> tuple[SamplingParams, bool, bool]:
    """(SamplingParams, stream, include_usage) from a request body, every field checked."""
    n = body.get("n")
    if n is not None and n != 1:
        raise _bad(f"n must be 1 (one choice per request), got {n!r}", "n")
    unsupported = ("logprobs", "top_logprobs", "tools") if chat else ("logprobs", "echo", "suffix")
    for key in unsupported:
        if body.get(key) not in (None, False):
            raise _bad(f"{key} is not supported by this server", key)
    if not chat and body.get("best_of") not in (None, 1):
        raise _bad("best_of must be 1 (one choice per request)", "best_of")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad(f"stream must be a boolean, got {stream!r}", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("stream_options must be an object", "stream_options")
    include_usage = bool((options or {}).get("include_usage", False))
    max_tokens = _integer(body, "max_tokens", 1)
    if chat and max_tokens is None:
        max_tokens = _integer(body, "max_completion_tokens", 1)
    room = context - prompt_tokens
    if room < 1:
        raise _bad(f"this model's maximum context length is {context} tokens; the prompt is {prompt_tokens} "
                   f"tokens, which leaves no room for an answer", "messages" if chat else "prompt",
                   "context_length_exceeded")
    if max_tokens is None:
        max_tokens = room
    elif max_tokens > room:
        raise _bad(f"this model's maximum context length is {context} tokens; the prompt is {prompt_tokens} "
                   f"tokens and max_tokens asks for {max_tokens} more", "max_tokens", "context_length_exceeded")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    top_k = body.get("top_k")
    if top_k is not None and (not _is_int(top_k) or not (top_k >= 1 or top_k in (0, -1))):
        raise _bad(f"top_k must be a positive integer, or -1 or 0 for all tokens, got {top_k!r}", "top_k")
    if top_k is not None and top_k < 1:
        top_k = None
    seed = _integer(body, "seed")
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stop = tuple(stop)
    else:
        raise _bad("stop must be a string or a list of strings", "stop")
    if any(s == "" for s in stop):
        raise _bad("stop strings must not be empty", "stop")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _bad(f"ignore_eos must be a boolean, got {ignore_eos!r}", "ignore_eos")
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                            stop=stop, ignore_eos=ignore_eos)
    return params, stream, include_usage


def _model(body: dict, app: web.Application) -> str | None:
    """The adapter a request's ``model`` names (None: the base)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model must be a non-empty string: the served model's name or a loaded adapter's", "model")
    if model == app[_INFO]["served_name"]:
        return None
    if model in app[_ENGINE].adapter_names():
        return model
    raise ApiError(404, f"the model {model!r} does not exist: serving {app[_INFO]['served_name']!r} and the adapters "
                        f"{app[_ENGINE].adapter_names()}", param="model", code="model_not_found")


def _completion_prompt(body: dict, tokenizer, vocab_size: int) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # one prompt in a list
    if isinstance(prompt, str):
        if not prompt:
            raise _bad("prompt must not be empty", "prompt")
        return [int(i) for i in tokenizer.encode(prompt, add_special_tokens=True)]
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        if not all(0 <= t < vocab_size for t in prompt):
            raise _bad(f"prompt token ids must lie in 0..{vocab_size - 1}", "prompt")
        return list(prompt)
    raise _bad("prompt must be a non-empty string or a non-empty list of token ids (one prompt per request)", "prompt")


def _chat_prompt(body: dict, tokenizer) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list of {role, content} objects", "messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(f"messages[{i}] must be an object with a string role", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise _bad(f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise _bad(f"messages[{i}].content must be a string or a list of text parts", "messages")
        clean.append({"role": m["role"], "content": content})
    if getattr(tokenizer, "chat_template", None) is None:
        raise _bad("this model has no chat template; use /v1/completions", "messages")
    try:
        return [int(i) for i in tokenizer.apply_chat_template(clean, add_generation_prompt=True, tokenize=True)]
    except ValueError as e:  # the template raised (e.g. roles it does not allow)
        raise _bad(str(e), "messages") from None


# ---- generating --------------------------------------------------------------------------------------------------
class _Stream:
    """Events of one engine request, handed from the compute thread to this event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def __call__(self, event: Event) -> None:  # called in the compute thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def events(self):
        while True:
            event = await self.queue.get()
            yield event
            if event.finish_reason is not None:
                return


def _submit(app, prompt_ids, adapter, params) -> tuple[object, _Stream]:
    stream = _Stream(asyncio.get_running_loop())
    try:
        req = app[_ENGINE].submit(prompt_ids, adapter, params, stream)
    except ValueError as e:  # the adapter was unloaded meanwhile
        raise ApiError(404, str(e), param="model", code="model_not_found") from None
    except RuntimeError as e:  # shutting down
        raise ApiError(503, str(e), type="server_error") from None
    return req, stream


async def _generate(request: web.Request, *, chat: bool):
    app = request.app
    body = await _json_body(request)
    adapter = _model(body, app)
    tokenizer, context = app[_INFO]["tokenizer"], app[_INFO]["context"]
    prompt_ids = _chat_prompt(body, tokenizer) if chat else _completion_prompt(body, tokenizer,
                                                                               app[_INFO]["vocab_size"])
    params, stream, include_usage = _sampling(body, chat=chat, prompt_tokens=len(prompt_ids), context=context)
    req, events = _submit(app, prompt_ids, adapter, params)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": body["model"]}
    try:
        if stream:
            return await _stream_response(request, events, head, chat, len(prompt_ids), include_usage)
        return await _whole_response(events, head, chat, len(prompt_ids))
    finally:
        app[_ENGINE].cancel(req)  # a no-op when it finished; frees the row when the client went away


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _whole_response(events: _Stream, head: dict, chat: bool, prompt_tokens: int) -> web.Response:
    text, last = [], None
    async for ev in events.events():
        text.append(ev.text)
        last = ev
    if last.finish_reason == "error":
        raise ApiError(500, last.error or "generation failed", type="server_error")
    if last.finish_reason == "cancelled":
        raise ApiError(503, "the request was cancelled (the server is shutting down)", type="server_error")
    choice = {"index": 0, "finish_reason": last.finish_reason, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": "".join(text)}
        obj = "chat.completion"
    else:
        choice["text"] = "".join(text)
        obj = "text_completion"
    return web.json_response({**head, "object": obj, "choices": [choice],
                              "usage": _usage(prompt_tokens, last.completion_tokens)})


async def _stream_response(request, events: _Stream, head: dict, chat: bool, prompt_tokens: int,
                           include_usage: bool) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)

    async def send(doc) -> None:
        data = doc if isinstance(doc, str) else json.dumps(doc, ensure_ascii=False)
        await resp.write(f"data: {data}\n\n".encode())

    def chunk(delta_text: str | None, finish_reason, first: bool = False) -> dict:
        if chat:
            delta = {"role": "assistant", "content": ""} if first else ({} if delta_text is None else
                                                                      {"content": delta_text})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": delta_text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**head, "choices": [choice], **({"usage": None} if include_usage else {})}

    try:
        await _send_events(send, chunk, events, head, chat, prompt_tokens, include_usage)
    except ConnectionResetError:  # the client went away: _generate cancels the request
        pass
    return resp


async def _send_events(send, chunk, events: _Stream, head: dict, chat: bool, prompt_tokens: int,
                       include_usage: bool) -> None:
    if chat:
        await send(chunk(None, None, first=True))
    async for ev in events.events():
        if ev.finish_reason in ("error", "cancelled"):
            message = ev.error if ev.finish_reason == "error" else "the request was cancelled (the server is " \
                                                                   "shutting down)"
            await send({"error": {"message": message, "type": "server_error", "param": None, "code": None}})
            break
        if ev.text:
            await send(chunk(ev.text, None))
        if ev.finish_reason is not None:
            await send(chunk(None if chat else "", ev.finish_reason))
            if include_usage:
                await send({**head, "choices": [], "usage": _usage(prompt_tokens, ev.completion_tokens)})
    await send("[DONE]")


# ---- routes ------------------------------------------------------------------------------------------------------
async def completions(request: web.Request):
    return await _generate(request, chat=False)


async def chat_completions(request: web.Request):
    return await _generate(request, chat=True)


async def models(request: web.Request):
    info, engine = request.app[_INFO], request.app[_ENGINE]
    data = [{"id": info["served_name"], "object": "model", "created": info["created"], "owned_by": "lora_ref",
             "root": info["root"], "parent": None, "max_model_len": info["context"]}]
    for name in engine.adapter_names():
        data.append({"id": name, "object": "model", "created": info["created"], "owned_by": "lora_ref",
                     "root": str(engine.adapter_folder(name)), "parent": info["served_name"]})
    return web.json_response({"object": "list", "data": data})


def _name(body: dict, key: str) -> str:
    v = body.get(key)
    if not isinstance(v, str) or not v.strip():
        raise _bad(f"{key} must be a non-empty string", key)
    return v


async def load_lora_adapter(request: web.Request):
    body = await _json_body(request)
    name, path = _name(body, "lora_name"), _name(body, "lora_path")
    if name == request.app[_INFO]["served_name"]:
        raise _bad(f"{name!r} is the base model's name; give the adapter another", "lora_name")
    try:
        await asyncio.wrap_future(request.app[_ENGINE].load_adapter(name, Path(path)))
    except (ValueError, OSError) as e:
        raise _bad(f"cannot load adapter {name!r}: {' '.join(str(e).split())}", "lora_path") from None
    except RuntimeError as e:
        raise ApiError(503, str(e), type="server_error") from None
    return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")


async def unload_lora_adapter(request: web.Request):
    body = await _json_body(request)
    name = _name(body, "lora_name")
    try:
        await asyncio.wrap_future(request.app[_ENGINE].unload_adapter(name))
    except KeyError:
        raise ApiError(404, f"the adapter {name!r} is not loaded", param="lora_name", code="model_not_found") from None
    except RuntimeError as e:
        raise ApiError(503, str(e), type="server_error") from None
    return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")


async def health(request: web.Request):
    return web.Response(text="ok")


async def stats(request: web.Request):
    return web.json_response(request.app[_ENGINE].stats())


def build_app(engine: Engine, tokenizer, *, served_name: str, context: int, vocab_size: int,
              root: str = "") -> web.Application:
    """The aiohttp application for ``engine`` (already started). ``tokenizer`` encodes prompts and renders chat
    templates; ``served_name`` is the base model's name in ``model`` fields; ``context`` the model's
    ``max_position_embeddings``."""
    app = web.Application(middlewares=[_errors], client_max_size=16 * 2 ** 20)
    app[_ENGINE] = engine
    app[_INFO] = {"tokenizer": tokenizer, "served_name": served_name, "context": int(context),
                  "vocab_size": int(vocab_size), "root": root, "created": int(time.time())}
    app.add_routes([
        web.post("/v1/completions", completions),
        web.post("/v1/chat/completions", chat_completions),
        web.get("/v1/models", models),
        web.post("/v1/load_lora_adapter", load_lora_adapter),
        web.post("/v1/unload_lora_adapter", unload_lora_adapter),
        web.get("/health", health),
        web.get("/stats", stats),
    ])
    return app


def create(model, tokenizer, *, stop_ids, served_name: str, max_batch: int, max_adapters: int, rng,
           threads: int | None = None, root: str = "") -> tuple[Engine, web.Application]:
    """A started :class:`Engine` over a :class:`~lora_ref.serving.batch.BatchDecoder` for ``model`` (a plain base
    Llama) and the application serving it. Load adapters with ``engine.load_adapter(name, folder).result()``;
    ``engine.close()`` when done."""
    from lora_ref.serving.batch import AdapterSet, BatchDecoder

    adapters = AdapterSet(model)
    context = model.config.max_position_embeddings
    engine = Engine(BatchDecoder(model, adapters, max_batch=max_batch), adapters, tokenizer, stop_ids=stop_ids,
                    context=context, max_batch=max_batch, max_adapters=max_adapters, rng=rng,
                    threads=threads).start()
    app = build_app(engine, tokenizer, served_name=served_name, context=context,
                    vocab_size=model.config.vocab_size, root=root)
    return engine, app


async def _start(app: web.Application, host: str, port: int, shutdown_timeout: float):
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    return runner, bound


async def _serve_until(app, host, port, shutdown_timeout, stop: asyncio.Event, on_ready) -> None:
    runner, bound = await _start(app, host, port, shutdown_timeout)
    try:
        on_ready(bound)
        await stop.wait()
    finally:
        # stop accepting, let the requests in flight finish for up to shutdown_timeout seconds, cancel the rest
        await runner.cleanup()


def run_server(app: web.Application, *, host: str, port: int, shutdown_timeout: float = 30.0, on_ready=None) -> None:
    """Serve ``app`` on ``host``:``port`` (0: a free port) until SIGTERM or SIGINT, then shut down gracefully:
    the listening socket closes at once, requests in flight get ``shutdown_timeout`` seconds to finish, the rest
    are cancelled. ``on_ready(port)`` is called once the socket listens. Returns normally (exit status 0)."""
    import signal

    async def main():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await _serve_until(app, host, port, shutdown_timeout, stop, on_ready or (lambda p: None))

    asyncio.run(main())


class BackgroundServer:
    """``app`` served from a thread of its own (tests, the load test, notebooks): ``with BackgroundServer(app) as
    s: s.url``. Leaving the block shuts it down as SIGTERM does in :func:`run_server`."""

    def __init__(self, app: web.Application, *, host: str = "127.0.0.1", port: int = 0,
                 shutdown_timeout: float = 10.0):
        import threading

        self.app, self.host, self.port, self.shutdown_timeout = app, host, port, shutdown_timeout
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="lora_ref-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _main(self) -> None:
        async def main():
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()

            def ready(port):
                self.port = port
                self._ready.set()

            await _serve_until(self.app, self.host, self.port, self.shutdown_timeout, self._stop, ready)

        try:
            asyncio.run(main())
        except BaseException as e:  # reported by start()
            self._error = e
            self._ready.set()

    def start(self) -> "BackgroundServer":
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join()

    def __enter__(self):
        return self.start()

    def __exit__(self, *_exc):
        self.stop()
