"""Shared test settings: thread pools pinned, hypothesis profile without deadlines (jitted code compiles once)."""

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "lora_ref",
    deadline=None,
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "40")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.load_profile("lora_ref")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_dir():
    """An HF folder (config.json, float32 model.safetensors, tokenizer files) of SmolLM2-135M-Instruct.

    Placeholder: the folder named by $LORA_REF_TEST_SMOLLM2 (the session fixture that fetches and imports the model
    replaces this)."""
    from pathlib import Path

    return Path(os.environ["LORA_REF_TEST_SMOLLM2"])
