"""The HTTP server on a tiny chat model, driven by the official ``openai`` client and by raw HTTP: greedy text equal
to ``lora-ref generate`` alone and in mixed batches, isolation between adapters, load/unload while serving, every
fault of the API (malformed JSON, bad fields, unknown model, too-long prompt, corrupt adapter, client gone
mid-request), and a short load test with no error and no lost request."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import socket
import urllib.parse

import numpy as np
import pytest
from tiny_serving import SERVED, generate_text, get, openai_client, post, serving, wait_for, write_tiny

N = 12  # max tokens of the equivalence requests
MESSAGES = {None: "What is the capital of France?", "a": "Hello! How can I help you today?",
            "b": "The quick brown fox", "c": "Paris is the capital"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def refs(tiny):
    """{(adapter, message): text of `lora-ref generate --chat MESSAGE --greedy --max-new-tokens N`}, every adapter
    with every message, so both what each adapter says and what the others would say are known."""
    out = {}
    for adapter in (None, "a", "b", "c"):
        for message in MESSAGES.values():
            out[adapter, message] = generate_text(tiny.model,
                                                  None if adapter is None else tiny.adapters[adapter],
                                                  chat=message, max_tokens=N)
    return out


def model_name(adapter):
    return SERVED if adapter is None else adapter


def chat(client, adapter, message, *, stream=False, max_tokens=N, **kw):
    r = client.chat.completions.create(model=model_name(adapter), messages=[{"role": "user", "content": message}],
                                       temperature=0, max_tokens=max_tokens, stream=stream, **kw)
    if not stream:
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage
    text, finish = [], None
    for chunk in r:
        for c in chunk.choices:
            text.append(c.delta.content or "")
            finish = c.finish_reason or finish
    return "".join(text), finish, None


def open_stream(url, body, path="/v1/chat/completions"):
    """A raw streaming request left open: (connection, response) after its first generated text arrived, so its
    row is running. (A chat stream's first data line, the assistant's role, is sent before the engine has taken the
    request into a row: returning after it made a test that then read the engine's running count flaky.)"""
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=300)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    while True:
        line = resp.readline()
        assert line, "the stream ended before any text"
        if not line.startswith(b"data: "):
            continue
        doc = json.loads(line[6:])
        assert "choices" in doc, doc  # an error event instead of text
        choice = doc["choices"][0]
        if choice.get("text") or choice.get("delta", {}).get("content"):
            return conn, resp


def blocker(url, adapter=None):
    """A long greedy stream on ``adapter`` that keeps a row busy until closed."""
    return open_stream(url, {"model": model_name(adapter), "messages": [{"role": "user", "content": "Hi"}],
                             "max_tokens": 8000, "temperature": 0, "ignore_eos": True, "stream": True})


def test_references_differ_between_adapters(refs):
    """The adapters are strong enough that each changes the greedy text: the equality tests below have teeth."""
    for message in MESSAGES.values():
        texts = [refs[adapter, message] for adapter in (None, "a", "b", "c")]
        assert len(set(texts)) == 4, texts


def test_greedy_alone_equals_generate(tiny, refs):
    with serving(tiny) as (server, engine):
        client = openai_client(server.url)
        for adapter, message in MESSAGES.items():
            text, finish, usage = chat(client, adapter, message)
            assert text == refs[adapter, message]
            assert usage.completion_tokens <= N and usage.prompt_tokens > 0
            assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
            assert finish == ("length" if usage.completion_tokens == N else "stop")
            stream_text, stream_finish, _ = chat(client, adapter, message, stream=True)
            assert (stream_text, stream_finish) == (text, finish)
        assert engine.stats()["peak_running"] == 1


def test_greedy_in_mixed_batches_equals_generate(tiny, refs):
    """Every adapter with every message, 16 requests at once (half streaming), joining a batch where a long
    request already runs: each text equals `lora-ref generate` for its own adapter — so no row saw another row's
    adapter."""
    with serving(tiny, max_batch=8) as (server, engine):
        client = openai_client(server.url)
        conn, _ = blocker(server.url, "a")
        jobs = [(adapter, message, i % 2 == 0) for i, (adapter, message) in enumerate(refs)]
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            got = list(pool.map(lambda j: chat(client, j[0], j[1], stream=j[2])[0], jobs))
        conn.close()
        assert got == [refs[adapter, message] for adapter, message, _ in jobs]
        assert engine.stats()["peak_running"] >= 2  # the blocker and at least one other shared the batch
        wait_for(lambda: engine.stats()["running"] == 0, "the blocker's row to be freed")


def test_completions_equal_generate_prompt(tiny):
    prompt = "The capital of France"
    want = generate_text(tiny.model, tiny.adapters["b"], prompt=prompt, max_tokens=N)
    with serving(tiny, adapters=("b",)) as (server, _):
        r = openai_client(server.url).completions.create(model="b", prompt=prompt, temperature=0, max_tokens=N)
        assert r.choices[0].text == want
        chunks = openai_client(server.url).completions.create(model="b", prompt=prompt, temperature=0,
                                                              max_tokens=N, stream=True,
                                                              stream_options={"include_usage": True})
        chunks = list(chunks)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want
        assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_sampling_is_seeded_and_stop_strings_cut(tiny):
    with serving(tiny, adapters=()) as (server, _):
        client = openai_client(server.url)

        def sample(seed):
            return client.chat.completions.create(model=SERVED, messages=[{"role": "user", "content": "Hello"}],
                                                  temperature=1.0, top_p=0.9, seed=seed,
                                                  max_tokens=16).choices[0].message.content

        assert sample(5) == sample(5)
        assert len({sample(s) for s in range(6)}) > 1
        full, _, _ = chat(client, None, "Hello", max_tokens=16)
        stop = full[3:5]
        cut, finish, _ = chat(client, None, "Hello", max_tokens=16, stop=[stop])
        assert cut == full[:full.index(stop)] and finish == "stop"


def test_models_lists_base_and_adapters(tiny):
    with serving(tiny, adapters=("a", "c")) as (server, _):
        data = get(server.url + "/v1/models")["data"]
        assert [m["id"] for m in data] == [SERVED, "a", "c"]
        assert data[1]["parent"] == SERVED and data[0]["max_model_len"] == 8192
        assert [m.id for m in openai_client(server.url).models.list()] == [SERVED, "a", "c"]
        import urllib.request

        with urllib.request.urlopen(server.url + "/health") as r:
            assert (r.status, r.read()) == (200, b"ok")


def test_load_and_unload_while_serving(tiny, refs):
    message = MESSAGES["b"]
    with serving(tiny, adapters=("a",), max_adapters=2) as (server, engine):
        client = openai_client(server.url)
        conn, resp = blocker(server.url, "a")  # a row on adapter a runs through all of this
        status, text = post(server.url + "/v1/load_lora_adapter",
                            {"lora_name": "b", "lora_path": str(tiny.adapters["b"])}, raw=True)
        assert status == 200 and "b" in text
        assert "b" in [m.id for m in client.models.list()]
        assert chat(client, "b", message)[0] == refs["b", message]
        # unloading a while its row runs: new requests for a are refused, the running row goes on
        assert post(server.url + "/v1/unload_lora_adapter", {"lora_name": "a"}, raw=True)[0] == 200
        import openai

        with pytest.raises(openai.NotFoundError):
            chat(client, "a", message)
        assert resp.readline()  # the blocker still streams
        conn.close()
        wait_for(lambda: engine.stats()["running"] == 0, "the blocker's row to be freed")
        wait_for(lambda: "a" not in engine.stats()["adapters_resident"], "adapter a to leave memory")
        # loaded again, and a third one: max_adapters 2 evicts the least recently used idle adapter
        assert post(server.url + "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": str(tiny.adapters["a"])},
                    raw=True)[0] == 200
        assert post(server.url + "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": str(tiny.adapters["c"])},
                    raw=True)[0] == 200
        stats = engine.stats()
        assert len(stats["adapters_resident"]) == 2 and stats["evictions"] == 1
        assert stats["adapters_registered"] == ["b", "a", "c"]
        for adapter in ("a", "b", "c"):  # an evicted adapter is read again from its folder when asked for
            assert chat(client, adapter, message)[0] == refs[adapter, message]
        assert len(engine.stats()["adapters_resident"]) == 2
        # a name already loaded, an unknown one
        status, body = post(server.url + "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": str(tiny.adapters["c"])})
        assert status == 400 and "already" in body["error"]["message"]
        status, body = post(server.url + "/v1/unload_lora_adapter", {"lora_name": "zzz"})
        assert status == 404 and body["error"]["code"] == "model_not_found"


def test_corrupt_adapter_is_refused_and_serving_goes_on(tiny, refs):
    with serving(tiny, adapters=("a",)) as (server, _):
        for path in (tiny.corrupt, tiny.model / "no-such-folder"):
            status, body = post(server.url + "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": str(path)})
            assert status == 400 and body["error"]["type"] == "invalid_request_error"
            assert body["error"]["param"] == "lora_path"
        assert [m["id"] for m in get(server.url + "/v1/models")["data"]] == [SERVED, "a"]
        assert chat(openai_client(server.url), "a", MESSAGES["a"])[0] == refs["a", MESSAGES["a"]]


BAD = [  # (path, body, status, param or None, code or None)
    ("/v1/chat/completions", b"{not json", 400, None, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, 400, "model", None),
    ("/v1/chat/completions", {"model": SERVED}, 400, "messages", None),
    ("/v1/chat/completions", {"model": SERVED, "messages": "hi"}, 400, "messages", None),
    ("/v1/chat/completions", {"model": SERVED, "messages": [{"role": "user", "content": 3}]}, 400, "messages", None),
    ("/v1/chat/completions", {"model": SERVED, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
     400, "temperature", None),
    ("/v1/chat/completions", {"model": SERVED, "messages": [{"role": "user", "content": "x"}], "temperature": 3},
     400, "temperature", None),
    ("/v1/chat/completions", {"model": SERVED, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
     400, "max_tokens", None),
    ("/v1/chat/completions", {"model": SERVED, "messages": [{"role": "user", "content": "x"}], "max_tokens": True},
     400, "max_tokens", None),
    ("/v1/chat/completions", {"model": SERVED, "messages": [{"role": "user", "content": "x"}], "top_p": 0},
     400, "top_p", None),
    ("/v1/chat/completions", {"model": SERVED, "messages": [{"role": "user", "content": "x"}], "stop": 5},
     400, "stop", None),
    ("/v1/chat/completions", {"model": SERVED, "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n", None),
    ("/v1/chat/completions", {"model": SERVED, "messages": [{"role": "user", "content": "x"}], "stream": "yes"},
     400, "stream", None),
    ("/v1/chat/completions", {"model": SERVED, "messages": [{"role": "user", "content": "x"}], "seed": 1.5},
     400, "seed", None),
    ("/v1/completions", {"model": SERVED, "prompt": ""}, 400, "prompt", None),
    ("/v1/completions", {"model": SERVED, "prompt": ["a", "b"]}, 400, "prompt", None),
    ("/v1/completions", {"model": SERVED, "prompt": [1, 10 ** 9]}, 400, "prompt", None),
    ("/v1/completions", {"model": SERVED, "prompt": "x", "top_k": 0.5}, 400, "top_k", None),
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model", "model_not_found"),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model",
     "model_not_found"),
    ("/v1/completions", {"model": SERVED, "prompt": "the " * 9000}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"model": SERVED, "prompt": "x", "max_tokens": 9000}, 400, "max_tokens",
     "context_length_exceeded"),
    ("/v1/load_lora_adapter", {"lora_name": "x"}, 400, "lora_path", None),
    ("/v1/load_lora_adapter", {"lora_name": SERVED, "lora_path": "/x"}, 400, "lora_name", None),
    ("/v1/unload_lora_adapter", b"{", 400, None, None),
    ("/v1/nothing-here", {}, 404, None, None),
]


@pytest.fixture(scope="module")
def shared_server(tiny):
    with serving(tiny, adapters=("a",)) as (server, engine):
        yield server, engine


@pytest.mark.parametrize("path, body, status, param, code", BAD)
def test_bad_requests_get_openai_error_bodies(shared_server, path, body, status, param, code):
    server, engine = shared_server
    got, doc = post(server.url + path, body)
    assert got == status
    assert set(doc) == {"error"} and set(doc["error"]) == {"message", "type", "param", "code"}
    assert doc["error"]["message"]
    assert doc["error"]["param"] == param and doc["error"]["code"] == code
    assert engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0  # nothing queued


def test_openai_client_sees_the_errors(shared_server):
    import openai

    client = openai_client(shared_server[0].url)
    with pytest.raises(openai.NotFoundError):
        chat(client, "missing", "x")
    with pytest.raises(openai.BadRequestError, match="context"):
        chat(client, None, "the " * 9000)
    assert chat(client, "a", "still serving")[1] in ("stop", "length")


def test_client_gone_mid_stream_frees_its_row(shared_server):
    server, engine = shared_server
    before = engine.stats()
    conn, resp = blocker(server.url)
    assert engine.stats()["running"] == 1
    conn.close()  # the client disconnects mid-stream
    wait_for(lambda: engine.stats()["running"] == 0, "the row to be freed")
    after = engine.stats()
    assert after["cancelled"] == before["cancelled"] + 1 and after["completed"] == before["completed"]


def test_client_gone_before_a_whole_answer_frees_its_row(shared_server):
    """Non-streaming: the handler is cancelled when the connection drops, and cancels the engine's request."""
    server, engine = shared_server
    before = engine.stats()
    u = urllib.parse.urlparse(server.url)
    body = json.dumps({"model": SERVED, "prompt": "x", "max_tokens": 8000, "ignore_eos": True}).encode()
    with socket.create_connection((u.hostname, u.port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        wait_for(lambda: engine.stats()["running"] == 1, "the request to start")
    wait_for(lambda: engine.stats()["running"] == 0, "the row to be freed")
    assert engine.stats()["cancelled"] == before["cancelled"] + 1


def test_short_load_test_has_no_error_and_loses_nothing(tiny):
    from lora_ref.serving.loadtest import run_load_test

    with serving(tiny, max_batch=8) as (server, engine):
        report = run_load_test(server.url, clients=8, requests=32, models=[SERVED, "a", "b", "c"], max_tokens=8)
        assert (report.ok, report.errors, report.error_messages) == (32, 0, [])
        assert report.by_model == {m: {"ok": 8, "errors": 0} for m in (SERVED, "a", "b", "c")}
        assert 32 <= report.completion_tokens <= 32 * 8
        assert report.latency_p50_s <= report.latency_p99_s and np.isfinite(report.throughput_rps)
        stats = engine.stats()
        assert (stats["completed"], stats["errors"], stats["cancelled"]) == (32, 0, 0)
        assert stats["peak_running"] > 1


def test_loadtest_command(tiny, capsys):
    from lora_ref.cli import main

    with serving(tiny, adapters=("a", "b")) as (server, engine):
        capsys.readouterr()
        assert main(["loadtest", "--url", server.url, "--clients", "3", "--requests", "6", "--adapters", "a,b",
                     "--max-tokens", "4", "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert (doc["ok"], doc["errors"], doc["requests"]) == (6, 0, 6)
        assert doc["by_model"] == {"a": {"ok": 3, "errors": 0}, "b": {"ok": 3, "errors": 0}}
        # a model the server does not have: every request fails, the command says so and exits 1
        assert main(["loadtest", "--url", server.url, "--clients", "2", "--requests", "2", "--adapters", "zz",
                     "--max-tokens", "2"]) == 1
        captured = capsys.readouterr()
        assert "2 of 2 requests failed" in captured.err and "HTTP 404" in captured.out
        assert engine.stats()["completed"] == 6
    assert main(["loadtest", "--clients", "0"]) == 2
