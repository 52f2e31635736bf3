"""The continuous-batching engine on its own: scheduling, stopping rules, cancellation and the adapter LRU, with a
scripted decoder whose logits spell out a chosen token sequence (so every expected value is written down here),
and the nucleus sampler against a hand count."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from lora_ref.modeling.tokenizer import ByteTokenizer
from lora_ref.serving.engine import Engine, SamplingParams, sample_token

V = 256  # the byte tokenizer: token id = byte
EOS = 0


class ScriptedAdapters:
    """An adapter set that only keeps names; folders named '*corrupt*' are refused. Records the most resident."""

    def __init__(self):
        self._names: list[str] = []
        self.most = 0
        self.loads: list[str] = []

    def load(self, name, folder):
        if "corrupt" in str(folder):
            raise ValueError(f"{folder}: adapter_model.safetensors is truncated")
        assert name not in self._names
        self._names.append(name)
        self.loads.append(name)
        self.most = max(self.most, len(self._names))

    def unload(self, name):
        self._names.remove(name)

    def names(self):
        return list(self._names)


class ScriptedDecoder:
    """Row r, prefilled with prompt p, emits the bytes of SCRIPT[p] (then EOS) whatever the adapter; it records
    every decode call's rows and the adapters of the rows."""

    def __init__(self, adapters, script: dict[str, str], max_batch: int):
        self.adapters, self.script, self.max_batch = adapters, script, max_batch
        self.rows: dict[int, tuple[list[int], int, str | None]] = {}
        self.steps: list[list[int]] = []
        self.gate = None  # a threading.Event each decode step waits for, when set

    def _logits(self, row):
        out, pos, _ = self.rows[row]
        z = np.zeros(V, dtype=np.float32)
        z[out[pos] if pos < len(out) else EOS] = 1.0
        self.rows[row] = (out, pos + 1, self.rows[row][2])
        return z

    def prefill(self, row, token_ids, adapter):
        assert 0 <= row < self.max_batch and row not in self.rows
        assert adapter is None or adapter in self.adapters.names()
        prompt = bytes(token_ids).decode()
        self.rows[row] = (list(self.script[prompt].encode()), 0, adapter)
        return self._logits(row)

    def decode(self, rows, tokens):
        if self.gate is not None:
            self.gate.wait()
        self.steps.append(list(rows))
        for r in rows:
            assert self.rows[r][2] is None or self.rows[r][2] in self.adapters.names()
        return np.stack([self._logits(r) for r in rows])

    def free(self, row):
        del self.rows[row]


def make_engine(script, *, max_batch=4, max_adapters=2, prefill_budget=512):
    adapters = ScriptedAdapters()
    dec = ScriptedDecoder(adapters, script, max_batch)
    eng = Engine(dec, adapters, ByteTokenizer(), stop_ids=(EOS,), context=64, max_batch=max_batch,
                 max_adapters=max_adapters, rng=np.random.default_rng(0), prefill_budget=prefill_budget)
    return eng, dec, adapters


class Collect:
    def __init__(self):
        self.events = []
        self.done = threading.Event()

    def __call__(self, ev):
        self.events.append(ev)
        if ev.finish_reason is not None:
            self.done.set()

    @property
    def text(self):
        return "".join(e.text for e in self.events)

    @property
    def finish(self):
        return self.events[-1].finish_reason


def ids(text):
    return list(text.encode())


def run_all(eng, jobs):
    """Submit (prompt, adapter, params) jobs before the engine starts (so they are admitted together), run them."""
    sinks = []
    for prompt, adapter, params in jobs:
        s = Collect()
        eng.submit(ids(prompt), adapter, params, s)
        sinks.append(s)
    eng.start()
    assert eng.wait_idle(60)
    eng.close()
    return sinks


def test_rows_join_leave_and_stop_by_their_own_rules():
    script = {"p1": "hello world", "p2": "ab", "p3": "one STOP two", "p4": "xyzxyz", "p5": "late"}
    eng, dec, _ = make_engine(script, max_batch=3)
    sinks = run_all(eng, [("p1", None, SamplingParams(max_tokens=20)),      # ends at EOS after 11 tokens
                          ("p2", None, SamplingParams(max_tokens=20)),      # ends at EOS after 2
                          ("p3", None, SamplingParams(max_tokens=20, stop=("STOP",))),
                          ("p4", None, SamplingParams(max_tokens=4)),       # ends by length
                          ("p5", None, SamplingParams(max_tokens=20))])     # waits for a free row
    assert [s.text for s in sinks] == ["hello world", "ab", "one ", "xyzx", "late"]
    assert [s.finish for s in sinks] == ["stop", "stop", "stop", "length", "stop"]
    # the tokens of a stop string count as generated (as in vLLM), though its text is cut
    assert [s.events[-1].completion_tokens for s in sinks] == [11, 2, 8, 4, 4]
    # three rows at first; p4 took p2's row once p2 ended, p5 the next one freed
    assert dec.steps[0] == [0, 1, 2] and max(len(s) for s in dec.steps) == 3
    assert eng.stats()["peak_running"] == 3 and eng.stats()["completed"] == 5
    assert dec.rows == {}  # every row freed


def test_prefill_budget_lets_running_rows_step_between_prefills():
    """With a budget of 3 prompt tokens, each 3-token prompt is prefilled in its own iteration, followed by a decode
    step of the rows running so far: the batch grows by one row per step instead of stalling behind all prefills."""
    eng, dec, _ = make_engine({"p1a": "x" * 9, "p2a": "y" * 9, "p3a": "z" * 9}, max_batch=3, prefill_budget=3)
    sinks = run_all(eng, [(p, None, SamplingParams(max_tokens=20)) for p in ("p1a", "p2a", "p3a")])
    assert [s.text for s in sinks] == ["x" * 9, "y" * 9, "z" * 9]
    assert dec.steps[:3] == [[0], [0, 1], [0, 1, 2]]


def test_stop_string_is_held_back_until_it_cannot_start_a_stop():
    eng, _, _ = make_engine({"p": "abcab!ab"})
    s, = run_all(eng, [("p", None, SamplingParams(max_tokens=20, stop=("ab!",)))])
    assert s.text == "abc" and s.finish == "stop"
    # "ab" was held back while it could start "ab!": no event ever carried text past "abc"
    assert all("!" not in e.text and not e.text.endswith("ab") for e in s.events)


def test_max_tokens_ends_before_eos_and_ignore_eos_runs_on():
    eng, _, _ = make_engine({"p": "ab"})
    a, b = run_all(eng, [("p", None, SamplingParams(max_tokens=2)),
                         ("p", None, SamplingParams(max_tokens=4, ignore_eos=True))])
    assert (a.text, a.finish) == ("ab", "length")
    assert (b.text, b.finish) == ("ab\x00\x00", "length")  # the EOS byte, generated on as a token


def test_cancel_frees_the_row_at_the_next_step():
    eng, dec, _ = make_engine({"long": "x" * 60, "short": "y"}, max_batch=1)
    dec.gate = threading.Event()
    long_s, short_s = Collect(), Collect()
    req = eng.submit(ids("long"), None, SamplingParams(max_tokens=60), long_s)
    eng.submit(ids("short"), None, SamplingParams(max_tokens=5), short_s)
    eng.start()
    eng.cancel(req)
    dec.gate.set()
    assert long_s.done.wait(30) and short_s.done.wait(30)
    assert long_s.finish == "cancelled" and len(long_s.text) < 60
    assert (short_s.text, short_s.finish) == ("y", "stop")  # ran in the freed row
    assert eng.stats()["cancelled"] == 1
    eng.close()
    assert dec.rows == {}


def test_lru_bound_evicts_the_least_recently_used_idle_adapter():
    script = {"p": "ok"}
    eng, dec, adapters = make_engine(script, max_batch=4, max_adapters=2)
    for name in "abc":
        eng.register_adapter(name, f"/adapters/{name}")
    sinks = run_all(eng, [("p", "a", SamplingParams(max_tokens=5)), ("p", "b", SamplingParams(max_tokens=5)),
                          ("p", "c", SamplingParams(max_tokens=5)), ("p", "a", SamplingParams(max_tokens=5))])
    assert [s.text for s in sinks] == ["ok"] * 4
    assert adapters.most == 2  # never more than max_adapters resident
    # a, b and the second a ran together while c waited (both resident adapters in use); then c evicted the least
    # recently used one, b (the second a request kept a in use until its last step)
    assert adapters.loads == ["a", "b", "c"]
    assert adapters.names() == ["a", "c"]
    assert eng.stats()["evictions"] == 1


def test_load_and_unload_commands():
    eng, _, adapters = make_engine({"p": "ok"}, max_adapters=1)
    eng.start()
    eng.load_adapter("a", "/adapters/a").result(10)
    with pytest.raises(ValueError, match="truncated"):
        eng.load_adapter("bad", "/adapters/corrupt").result(10)
    with pytest.raises(ValueError, match="already loaded"):
        eng.load_adapter("a", "/adapters/a").result(10)
    eng.load_adapter("b", "/adapters/b").result(10)  # evicts a (max_adapters 1); a stays registered
    assert adapters.names() == ["b"] and eng.adapter_names() == ["a", "b"]
    s = Collect()
    eng.submit(ids("p"), "a", SamplingParams(max_tokens=3), s)  # loads a again
    assert s.done.wait(10) and s.text == "ok"
    eng.unload_adapter("a").result(10)
    with pytest.raises(ValueError, match="no adapter named 'a'"):
        eng.submit(ids("p"), "a", SamplingParams(max_tokens=3), Collect())
    with pytest.raises(KeyError):
        eng.unload_adapter("a").result(10)
    eng.close()


def test_close_cancels_what_runs_and_waits():
    eng, dec, _ = make_engine({"p": "z" * 60}, max_batch=1)
    dec.gate = threading.Event()
    a, b = Collect(), Collect()
    eng.submit(ids("p"), None, SamplingParams(max_tokens=60), a)
    eng.submit(ids("p"), None, SamplingParams(max_tokens=60), b)
    eng.start()
    closer = threading.Thread(target=eng.close, args=(30,))
    closer.start()
    for _ in range(10_000):  # until close() has marked the engine stopping (the compute thread waits at the gate)
        try:
            eng.submit(ids("p"), None, SamplingParams(max_tokens=1), Collect())
        except RuntimeError as e:
            assert "shutting down" in str(e)
            break
        closer.join(0.001)
    dec.gate.set()
    closer.join(30)
    assert a.finish == "cancelled" and b.finish == "cancelled"


def test_submit_refuses_what_cannot_fit():
    eng, _, _ = make_engine({})
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        eng.submit(ids("x" * 60), None, SamplingParams(max_tokens=5), Collect())
    with pytest.raises(ValueError, match="empty"):
        eng.submit([], None, SamplingParams(max_tokens=5), Collect())
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(max_tokens=1, top_p=0.0)


def test_top_p_keeps_the_smallest_set_that_reaches_p():
    # probabilities 0.5, 0.3, 0.15, 0.05 (temperature 1): top_p 0.75 keeps the first two (0.5 < 0.75 <= 0.8)
    logits = np.log(np.array([0.15, 0.5, 0.05, 0.3]))
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.75)
    rng = np.random.default_rng(0)
    draws = np.array([sample_token(logits, params, rng) for _ in range(4000)])
    assert set(draws) == {1, 3}
    assert abs((draws == 1).mean() - 0.5 / 0.8) < 0.03  # renormalized among the kept: 0.625
    # a tiny top_p keeps the most likely token only; temperature 0 is argmax whatever top_p says
    assert {sample_token(logits, SamplingParams(max_tokens=1, temperature=1.0, top_p=0.01), rng)
            for _ in range(50)} == {1}
    assert sample_token(logits, SamplingParams(max_tokens=1, top_p=0.1), None) == 1


def test_seeded_sampling_repeats_and_matches_generate_sampler():
    from lora_ref.modeling.llama import sample_next_token

    logits = np.random.default_rng(3).normal(size=50)
    p = SamplingParams(max_tokens=1, temperature=0.8, top_k=10)
    a = [sample_token(logits, p, r) for r in [np.random.default_rng(7)] for _ in range(20)]
    r = np.random.default_rng(7)
    b = [int(sample_next_token(logits[None], temperature=0.8, top_k=10, rng=r)[0]) for _ in range(20)]
    assert a == b
