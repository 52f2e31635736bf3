"""Continuous batching: one compute thread runs a :class:`~lora_ref.serving.batch.BatchDecoder` for many requests.

A server receives requests at any moment, each for its own adapter and with its own sampling settings. Running
them one after another wastes the batch: a decode step costs about the same for one row as for eight, because it
is bound by reading the weights, not by arithmetic. Waiting for a whole batch to finish before starting the next
("static batching") wastes it too, since the rows end at different lengths. *Continuous batching* (Orca, Yu et
al. 2022, "iteration-level scheduling"; vLLM's scheduler) re-forms the batch at every step:

1. requests waiting in the queue take the free rows: each is *prefilled* (its prompt run once, its KV cache
   filled, its first token sampled);
2. one *decode* step runs every active row together, each row with its own adapter, position and KV cache
   (:meth:`BatchDecoder.decode`), and each row samples its next token with its own settings and generator;
3. a row that ends (end-of-sequence token, a stop string, ``max_tokens``, or its client gone) is freed at once,
   and the next waiting request takes it at the next step.

Everything that touches the model runs in ONE thread, the compute thread this class starts: the decoder, the
adapter set and the thread pools of Numba and the BLAS (``lora_ref/threads.py``: the pools never nest, so the
compute must not be spread over several Python threads either). Other threads (the HTTP server's event loop)
talk to it only through a locked queue: :meth:`Engine.submit`, :meth:`Engine.cancel`,
:meth:`Engine.load_adapter`, :meth:`Engine.unload_adapter`. Results come back through each request's ``sink``,
a callable the compute thread calls with :class:`Event` s (the server hands them to its event loop).

Adapters are *registered* by name with their folder and *resident* when their weights are in the decoder's
:class:`~lora_ref.serving.batch.AdapterSet`. At most ``max_adapters`` are resident: a request for a registered
adapter that is not resident loads it from its folder, evicting the least recently used resident adapter that no
running row uses (S-LoRA, Sheng et al. 2023, keeps all adapters in host memory and pages the hot ones into GPU
memory the same way); if every resident adapter is in use, the request waits until a row frees one.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from lora_ref.modeling.generate import TextStream
from lora_ref.modeling.llama import _is_int, _is_number, sample_next_token

__all__ = ["Engine", "Event", "Request", "SamplingParams", "sample_token"]


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops.

    ``temperature`` 0 is greedy (argmax, as ``lora-ref generate``); above 0 the next token is drawn from
    softmax(logits / temperature), among the ``top_k`` most likely tokens (``None``: all) and within the smallest
    set of most likely tokens whose probability reaches ``top_p`` (nucleus sampling, Holtzman et al. 2020; 1: all).
    ``seed`` seeds the request's own ``np.random.Generator`` (``None``: the engine draws one). Generation ends after
    ``max_tokens`` tokens, at an end-of-sequence token (unless ``ignore_eos``), or when the text contains one of
    ``stop`` (the stop string and what follows it are not returned, as in OpenAI's API).
    """

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or not 0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k must be an integer >= 1 or None, got {self.top_k!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a tuple of non-empty strings, got {self.stop!r}")


def sample_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator | None) -> int:
    """One token id from one row of logits (V,) under ``params``.

    Greedy is ``argmax`` (the first index on ties), exactly as :func:`lora_ref.modeling.llama.sample_next_token`.
    Without ``top_p`` the draw *is* ``sample_next_token`` (temperature, top-k, one ``rng.random()``), so a seeded
    request samples the same text as ``lora-ref generate --temperature T --top-k K --seed S``. With ``top_p < 1``
    the probabilities (after temperature and top-k) are sorted, the tokens after the first whose cumulative
    probability reaches ``top_p`` are dropped (as transformers' ``TopPLogitsWarper``: at least one token stays), and
    the draw is the inverse CDF over the rest in index order, one ``rng.random()`` per token as well.
    """
    logits = np.asarray(logits)
    if params.temperature == 0:
        return int(np.argmax(logits))
    if params.top_p >= 1:
        return int(sample_next_token(logits[None, :], temperature=params.temperature, top_k=params.top_k,
                                     rng=rng)[0])
    z = logits.astype(np.float64) / params.temperature
    if params.top_k is not None and params.top_k < z.size:
        kth = np.sort(z)[-params.top_k]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")  # most likely first
    before = np.cumsum(p[order]) - p[order]  # probability of the tokens ranked above each one
    keep = np.zeros(p.size, dtype=bool)
    keep[order[before < params.top_p]] = True  # the first token always stays (before = 0)
    p = np.where(keep, p, 0.0)
    cdf = np.cumsum(p)
    u = rng.random() * cdf[-1]
    return int(np.argmax(cdf > u))


@dataclass
class Event:
    """What the compute thread tells a request's sink: new text (and its token ids), and at the end why it ended.

    ``finish_reason`` is ``None`` while generating, then ``"stop"`` (end-of-sequence token or stop string),
    ``"length"`` (``max_tokens``), ``"cancelled"`` (:meth:`Engine.cancel`, or the engine shut down) or ``"error"``
    (then ``error`` says what went wrong). ``completion_tokens`` counts the tokens generated so far (the
    end-of-sequence token excluded).
    """

    text: str
    token_ids: list[int]
    completion_tokens: int
    finish_reason: str | None = None
    error: str | None = None


@dataclass(eq=False)
class Request:
    """One generation request and its state in the engine (the fields after ``sink`` belong to the compute thread)."""

    id: int
    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    sink: Callable[[Event], None]
    cancelled: bool = False
    row: int | None = None
    rng: np.random.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # decoded text so far
    sent: int = 0  # characters of ``text`` already sent to the sink
    sent_tokens: int = 0  # tokens already sent
    stream: TextStream | None = None
    finished: bool = False


class Engine:
    """A continuous-batching scheduler around one decoder, run by one compute thread (see the module docstring).

    ``decoder`` is a :class:`~lora_ref.serving.batch.BatchDecoder` over the model and ``adapters`` (its
    :class:`~lora_ref.serving.batch.AdapterSet`); ``tokenizer`` decodes the generated tokens (``decode(ids)``);
    ``stop_ids`` are the end-of-sequence ids (:func:`lora_ref.modeling.generate.stop_token_ids`); ``context`` is
    the model's ``max_position_embeddings``. ``max_batch`` rows run at once (at most the decoder's); at most
    ``max_adapters`` adapters are resident. Between two decode steps, waiting requests are prefilled until about
    ``prefill_budget`` prompt tokens have run (at least one request). ``rng`` draws the seeds of requests that
    give none. ``threads`` sets Numba's and the BLAS's thread counts in the compute thread (``None``: as they
    are); a decode step of a single row runs on one thread (:func:`lora_ref.threads.limited`), as
    :func:`lora_ref.modeling.generate.generate_tokens` does by default (``lora-ref generate`` and ``chat`` keep
    their ``--threads`` instead; measured figures in ``limited``'s docstring).

    Adapters already in ``adapters`` when the engine starts are resident but not registered (no folder to reload
    them from): :meth:`register_adapter` each one, or load them with :meth:`load_adapter`.
    """

    def __init__(self, decoder, adapters, tokenizer, *, stop_ids=(), context: int, max_batch: int,
                 max_adapters: int, rng: np.random.Generator, threads: int | None = None,
                 prefill_budget: int = 512):
        if not _is_int(max_batch) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if not _is_int(max_adapters) or max_adapters < 1:
            raise ValueError(f"max_adapters must be an integer >= 1, got {max_adapters!r}")
        if not _is_int(context) or context < 2:
            raise ValueError(f"context must be an integer >= 2, got {context!r}")
        if not _is_int(prefill_budget) or prefill_budget < 1:
            raise ValueError(f"prefill_budget must be an integer >= 1, got {prefill_budget!r}")
        if not isinstance(rng, np.random.Generator):
            raise ValueError("rng must be a np.random.Generator")
        self.decoder = decoder
        self.adapters = adapters
        self.tokenizer = tokenizer
        self.stop_ids = frozenset(int(i) for i in stop_ids)
        self.context = int(context)
        self.max_batch = int(max_batch)
        self.max_adapters = int(max_adapters)
        self.threads = threads
        self.prefill_budget = int(prefill_budget)
        self._rng = rng
        self._ids = itertools.count(1)

        self._cv = threading.Condition()  # guards everything below until the compute thread's own state
        self._waiting: collections.deque[Request] = collections.deque()
        self._commands: collections.deque = collections.deque()
        self._folders: dict[str, Path] = {}  # registered adapters
        self._stopping = False
        self._counts = {"completed": 0, "cancelled": 0, "errors": 0, "evictions": 0, "loads": 0, "peak_running": 0}
        self._running_count = 0
        self._resident: list[str] = []

        # the compute thread's own state
        self._running: list[Request] = []
        self._free_rows = list(range(self.max_batch - 1, -1, -1))  # pop() gives row 0 first
        self._last_used: dict[str, int] = {}  # adapter -> step counter at its last use (LRU)
        self._in_use: collections.Counter = collections.Counter()  # adapter -> rows using it
        self._unload_when_idle: set[str] = set()
        self._clock = itertools.count()
        self._thread: threading.Thread | None = None

    # ---- the API for other threads ---------------------------------------------------------------------------
    def start(self) -> "Engine":
        """Start the compute thread (once)."""
        if self._thread is not None:
            raise RuntimeError("the engine is already started")
        self._resident = list(self.adapters.names())
        self._thread = threading.Thread(target=self._run, name="lora_ref-engine", daemon=True)
        self._thread.start()
        return self

    def register_adapter(self, name: str, folder) -> None:
        """Know adapter ``name`` as ``folder`` (already resident or loaded on first use), without loading it now."""
        with self._cv:
            self._folders[name] = Path(folder)

    def adapter_names(self) -> list[str]:
        """The registered adapters, in registration order."""
        with self._cv:
            return list(self._folders)

    def adapter_folder(self, name: str) -> Path | None:
        with self._cv:
            return self._folders.get(name)

    def submit(self, prompt_ids, adapter: str | None, params: SamplingParams, sink: Callable[[Event], None]) -> Request:
        """Queue a request; ``sink`` receives its :class:`Event` s from the compute thread. Returns the request (give it
        to :meth:`cancel`). An unknown adapter, an empty prompt or one that leaves no room for ``max_tokens`` in the
        context raises ``ValueError`` here, before anything is queued."""
        ids = [int(i) for i in np.asarray(prompt_ids, dtype=np.int64).reshape(-1)]
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) + params.max_tokens > self.context:
            raise ValueError(f"the prompt ({len(ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds the "
                             f"model's context of {self.context} tokens")
        with self._cv:
            if self._stopping:
                raise RuntimeError("the engine is shutting down")
            if adapter is not None and adapter not in self._folders:
                raise ValueError(f"no adapter named {adapter!r} is loaded")
            req = Request(next(self._ids), ids, adapter, params, sink)
            self._waiting.append(req)
            self._cv.notify()
        return req

    def cancel(self, req: Request) -> None:
        """Stop ``req`` at the next step and free its row (its sink gets a last event, ``"cancelled"``)."""
        with self._cv:
            req.cancelled = True
            self._cv.notify()

    def load_adapter(self, name: str, folder) -> concurrent.futures.Future:
        """Register adapter ``name`` from ``folder`` and load it now, in the compute thread (evicting the least
        recently used idle adapter if ``max_adapters`` are resident). The future's result is ``None``; a name
        already registered, or a folder the adapter set refuses, sets ``ValueError`` on it (and nothing is
        registered)."""
        return self._command(self._do_load, name, Path(folder))

    def unload_adapter(self, name: str) -> concurrent.futures.Future:
        """Forget adapter ``name``: new requests for it are refused at once; its weights leave memory when no
        running row uses it any more. An unknown name sets ``KeyError`` on the future."""
        with self._cv:
            if name not in self._folders:
                fut = concurrent.futures.Future()
                fut.set_exception(KeyError(name))
                return fut
            del self._folders[name]
        return self._command(self._do_unload, name)

    def stats(self) -> dict:
        """Counters for monitoring and tests: rows running, requests waiting, resident adapters, totals."""
        with self._cv:
            return {"running": self._running_count, "waiting": len(self._waiting), "max_batch": self.max_batch,
                    "max_adapters": self.max_adapters, "adapters_resident": list(self._resident),
                    "adapters_registered": list(self._folders), **self._counts}

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no request runs or waits (or ``timeout`` seconds pass); True if idle."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self._running_count or self._waiting:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(left)
            return True

    def close(self, timeout: float | None = None) -> None:
        """Stop: refuse new requests, cancel the ones running or waiting, end the compute thread."""
        with self._cv:
            self._stopping = True
            for r in self._waiting:
                r.cancelled = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the compute thread -----------------------------------------------------------------------------------
    def _command(self, fn, *args) -> concurrent.futures.Future:
        fut = concurrent.futures.Future()
        with self._cv:
            if self._stopping:
                fut.set_exception(RuntimeError("the engine is shutting down"))
                return fut
            self._commands.append((fn, args, fut))
            self._cv.notify()
        return fut

    def _run(self) -> None:
        if self.threads is not None:
            from lora_ref.threads import set_threads

            set_threads(self.threads)  # Numba's count is per thread: set it in the thread that computes
        while True:
            with self._cv:
                while not (self._commands or self._waiting or self._running or self._stopping):
                    self._cv.wait()
                commands = list(self._commands)
                self._commands.clear()
                stopping = self._stopping
            for fn, args, fut in commands:
                try:
                    fut.set_result(fn(*args))
                except Exception as e:  # reported to the caller; the engine goes on
                    fut.set_exception(e)
            if stopping:
                self._shutdown()
                return
            self._reap_cancelled()
            self._admit()
            if self._running:
                self._step()
            self._publish()

    def _publish(self) -> None:
        with self._cv:
            self._running_count = len(self._running)
            self._counts["peak_running"] = max(self._counts["peak_running"], self._running_count)
            self._resident = list(self.adapters.names())
            self._cv.notify_all()

    def _shutdown(self) -> None:
        for r in list(self._running):
            self._finish(r, "cancelled")
        with self._cv:
            waiting = list(self._waiting)
            self._waiting.clear()
        for r in waiting:
            self._emit(r, Event("", [], 0, "cancelled"))
            self._count("cancelled")
        self._publish()

    def _count(self, key: str) -> None:
        with self._cv:
            self._counts[key] += 1

    def _emit(self, req: Request, event: Event) -> None:
        try:
            req.sink(event)
        except Exception:  # a sink that fails (its client is gone) must not stop the engine: drop the request
            req.cancelled = True

    def _reap_cancelled(self) -> None:
        for r in [r for r in self._running if r.cancelled]:
            self._finish(r, "cancelled")
        with self._cv:
            gone = [r for r in self._waiting if r.cancelled]
            for r in gone:
                self._waiting.remove(r)
        for r in gone:
            self._emit(r, Event("", [], 0, "cancelled"))
            self._count("cancelled")

    # adapters
    def _do_load(self, name: str, folder: Path) -> None:
        with self._cv:
            if name in self._folders:
                raise ValueError(f"an adapter named {name!r} is already loaded")
        if name in self.adapters.names():  # unloaded by name but still held by a running row
            raise ValueError(f"adapter {name!r} is still in use by running requests; load it again when they end")
        if not self._make_room():
            raise ValueError(f"all {self.max_adapters} adapters held in memory (--max-adapters) are in use by "
                             f"running requests; try again when one ends")
        self.adapters.load(name, folder)  # ValueError on a bad folder: nothing registered
        self._count("loads")
        self._last_used[name] = next(self._clock)
        with self._cv:
            self._folders[name] = folder

    def _do_unload(self, name: str) -> None:
        if name not in self.adapters.names():
            return  # registered but not resident: forgetting it was all
        if self._in_use[name]:
            self._unload_when_idle.add(name)
        else:
            self.adapters.unload(name)
            self._last_used.pop(name, None)

    def _make_room(self) -> bool:
        """Evict least recently used idle adapters until one more fits; False if every resident one is in use."""
        while len(self.adapters.names()) >= self.max_adapters:
            idle = [n for n in self.adapters.names() if not self._in_use[n]]
            if not idle:
                return False
            victim = min(idle, key=lambda n: self._last_used.get(n, -1))
            self.adapters.unload(victim)
            self._last_used.pop(victim, None)
            self._unload_when_idle.discard(victim)
            self._count("evictions")
        return True

    def _ensure_resident(self, req: Request) -> bool | None:
        """Make the request's adapter resident: True if it is, False to retry later, None if it failed."""
        name = req.adapter
        if name is None or name in self.adapters.names():
            if name in self._unload_when_idle:  # unloaded while this request waited
                self._fail(req, f"adapter {name!r} was unloaded")
                return None
            return True
        with self._cv:
            folder = self._folders.get(name)
        if folder is None:
            self._fail(req, f"adapter {name!r} was unloaded")
            return None
        if not self._make_room():
            return False
        try:
            self.adapters.load(name, folder)
        except (ValueError, OSError) as e:
            self._fail(req, f"cannot load adapter {name!r} from {folder}: {e}")
            return None
        self._count("loads")
        return True

    # scheduling
    def _admit(self) -> None:
        """Prefill waiting requests into free rows, in arrival order, until about ``prefill_budget`` prompt tokens
        have run (at least one request), so the running rows get their next decode step soon even when many
        requests arrive at once. A request whose adapter cannot be made resident yet stays waiting, and later ones
        may pass it."""
        with self._cv:
            waiting = list(self._waiting)
        spent = 0
        for req in waiting:
            if not self._free_rows or spent >= self.prefill_budget:
                return
            with self._cv:
                if self._stopping:
                    return
            if req.cancelled:
                continue  # reaped at the next iteration
            ok = self._ensure_resident(req)
            if ok is False:
                continue
            with self._cv:
                self._waiting.remove(req)
                if ok:  # counted as running from the moment it leaves the queue (wait_idle must not see a gap)
                    self._running_count += 1
            if ok is None:
                continue
            self._prefill(req)
            spent += len(req.prompt_ids)
            self._publish()

    def _prefill(self, req: Request) -> None:
        req.row = self._free_rows.pop()
        if req.adapter is not None:
            self._in_use[req.adapter] += 1
            self._last_used[req.adapter] = next(self._clock)
        self._running.append(req)
        seed = req.params.seed
        if req.params.temperature > 0:
            req.rng = np.random.default_rng(int(self._rng.integers(2 ** 63)) if seed is None else seed)
        req.stream = TextStream(self.tokenizer)
        try:
            logits = self.decoder.prefill(req.row, req.prompt_ids, req.adapter)
        except Exception as e:
            self._finish(req, "error", f"prefill failed: {type(e).__name__}: {e}")
            return
        self._take(req, np.asarray(logits).reshape(-1))

    def _step(self) -> None:
        from lora_ref.threads import limited

        rows = [r.row for r in self._running]
        tokens = [r.tokens[-1] for r in self._running]
        for r in self._running:
            if r.adapter is not None:
                self._last_used[r.adapter] = next(self._clock)
        try:
            with limited(1 if len(rows) == 1 else None):
                logits = np.asarray(self.decoder.decode(rows, tokens))
        except Exception as e:
            for r in list(self._running):
                self._finish(r, "error", f"decode failed: {type(e).__name__}: {e}")
            return
        for r, row_logits in zip(list(self._running), logits):
            self._take(r, row_logits)

    def _take(self, req: Request, logits: np.ndarray) -> None:
        """Sample the request's next token from ``logits`` (V,), send the text it completes, end it if it is done."""
        p = req.params
        token = sample_token(logits, p, req.rng)
        if token in self.stop_ids and not p.ignore_eos:
            req.text += req.stream.finish()
            self._cut_at_stop(req)
            self._finish(req, "stop")
            return
        req.tokens.append(token)
        req.text += req.stream.push(token)
        if len(req.tokens) >= p.max_tokens:
            req.text += req.stream.finish()
        if self._cut_at_stop(req):
            self._finish(req, "stop")
            return
        if len(req.tokens) >= p.max_tokens:
            self._finish(req, "length")
            return
        hold = max((j for s in p.stop for j in range(1, len(s)) if req.text.endswith(s[:j])), default=0)
        upto = len(req.text) - hold
        if upto > req.sent:
            self._emit(req, Event(req.text[req.sent:upto], req.tokens[req.sent_tokens:], len(req.tokens)))
            req.sent, req.sent_tokens = upto, len(req.tokens)

    @staticmethod
    def _cut_at_stop(req: Request) -> bool:
        """Cut the text before the first stop string in it (text already sent is never taken back); True if cut."""
        stops = req.params.stop
        if not stops:
            return False
        start = max(0, req.sent - max(len(s) for s in stops))
        hits = [i for i in (req.text.find(s, start) for s in stops) if i >= 0]
        if not hits:
            return False
        req.text = req.text[:max(min(hits), req.sent)]
        return True

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        if req.finished:
            return
        req.finished = True
        if reason in ("stop", "length"):
            self._count("completed")
        else:
            self._count("cancelled" if reason == "cancelled" else "errors")
        self._emit(req, Event(req.text[req.sent:] if reason in ("stop", "length") else "",
                              req.tokens[req.sent_tokens:], len(req.tokens), reason, error))
        req.sent = len(req.text)
        if req in self._running:
            self._running.remove(req)
            try:
                self.decoder.free(req.row)
            finally:
                self._free_rows.append(req.row)
                if req.adapter is not None:
                    self._in_use[req.adapter] -= 1
                    if not self._in_use[req.adapter] and req.adapter in self._unload_when_idle:
                        self._unload_when_idle.discard(req.adapter)
                        self.adapters.unload(req.adapter)
                        self._last_used.pop(req.adapter, None)

    def _fail(self, req: Request, message: str) -> None:
        req.finished = True
        self._count("errors")
        self._emit(req, Event("", [], 0, "error", message))
