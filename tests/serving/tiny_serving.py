"""What the server tests share: a tiny chat model folder with three adapters and a corrupt one, a server on it in a
thread, the reference text of ``lora-ref generate``, and small raw-HTTP helpers (urllib, no third-party client)."""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lora_ref.adapters.lora import LoraConfig, inject_lora
from lora_ref.adapters.peft_files import save_adapter
from lora_ref.modeling.generate import stop_token_ids
from lora_ref.modeling.llama import Llama
from lora_ref.modeling.tokenizer import load_tokenizer
from lora_ref.serving.server import BackgroundServer, create
from lora_ref.testing.tiny_models import write_tiny_chat_model

SERVED = "tiny"
ADAPTERS = {  # different ranks and targets
    "a": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "b": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    "c": dict(r=8, lora_alpha=8, target_modules=["o_proj", "up_proj", "down_proj"]),
}


@dataclass
class Tiny:
    model: Path
    adapters: dict[str, Path]
    corrupt: Path


def write_tiny(root: Path) -> Tiny:
    """The tiny chat model (context 8192, so a request may run long enough to be cancelled mid-way) and adapters."""
    model_dir = write_tiny_chat_model(root / SERVED, rng=np.random.default_rng(0), max_position_embeddings=8192)
    base = Llama.from_pretrained(model_dir)
    rng = np.random.default_rng(1)
    adapters = {}
    for name, kw in ADAPTERS.items():
        m = inject_lora(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **kw), rng=rng)
        for pname, p in m.named_parameters():
            if "lora_B" in pname:
                p.data *= 4.0  # strong adapters: each visibly changes the greedy text
        adapters[name] = save_adapter(m, root / "adapters" / name)
    corrupt = root / "adapters" / "corrupt"
    shutil.copytree(adapters["a"], corrupt)
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # truncated
    return Tiny(model_dir, adapters, corrupt)


@contextlib.contextmanager
def serving(tiny: Tiny, adapters=("a", "b", "c"), *, max_batch=4, max_adapters=4, shutdown_timeout=10.0):
    """(server, engine) for ``tiny`` with ``adapters`` loaded, in a background thread on 127.0.0.1."""
    model = Llama.from_pretrained(tiny.model)
    tok = load_tokenizer(tiny.model)
    engine, app = create(model, tok, stop_ids=stop_token_ids(tiny.model, tok), served_name=SERVED,
                         max_batch=max_batch, max_adapters=max_adapters, rng=np.random.default_rng(0), threads=1)
    try:
        for name in adapters:
            engine.load_adapter(name, tiny.adapters[name]).result()
        with BackgroundServer(app, shutdown_timeout=shutdown_timeout) as server:
            yield server, engine
    finally:
        engine.close()


def generate_text(model: Path, adapter: Path | None, *, chat: str | None = None, prompt: str | None = None,
                  max_tokens: int) -> str:
    """The text ``lora-ref generate --greedy --json`` prints for the same model, adapter and max tokens."""
    import io

    from lora_ref.cli import main

    argv = ["generate", "--model", str(model), "--greedy", "--max-new-tokens", str(max_tokens), "--json",
            "--threads", "1"]
    argv += ["--chat", chat] if chat is not None else ["--prompt", prompt]
    if adapter is not None:
        argv += ["--adapter", str(adapter)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return json.loads(out.getvalue())["text"]


def post(url: str, body, *, raw: bool = False, timeout: float = 120) -> tuple[int, object]:
    """POST ``body`` (a JSON-able object, or bytes as they are) → (status, parsed JSON or text)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    if raw:
        return status, text
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def get(url: str, timeout: float = 60):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read().decode())


def openai_client(url: str):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)


def wait_for(predicate, what: str, tries: int = 3000, pause: float = 0.02):
    """Poll ``predicate`` until it is true (bounded; the bound is a hang guard, not a speed requirement)."""
    import time

    for _ in range(tries):
        if predicate():
            return
        time.sleep(pause)
    raise AssertionError(f"gave up waiting for {what}")
