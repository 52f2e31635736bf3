"""The book's "check your implementation" examples, run against PEFT and bitsandbytes (CPU) live.

Every case those libraries compute the way lora_ref does passes; each divergence case fails exactly where, and by
how much, its description says.
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from lora_ref.reference.check import check
from lora_ref.reference.vectors import write_vectors

pytestmark = pytest.mark.interop
EXAMPLES = Path(__file__).resolve().parents[2] / "book" / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def vectors(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("vi") / "vectors"
    write_vectors(out)
    return out


def test_bitsandbytes_cpu_matches_the_cpu_cases_and_differs_on_the_cuda_divergences(vectors):
    results = _load("check_bitsandbytes_cpu").bitsandbytes_results(vectors)
    rows = {r.name: r for r in check(vectors, results)}
    manifest = json.loads((vectors / "manifest.json").read_text())
    quant_cases = [c for c in manifest["cases"] if c["op"] == "quantize_4bit"]
    assert set(rows) == {c["name"] for c in quant_cases}
    for c in quant_cases:
        r = rows[c["name"]]
        if c["params"]["rounding"] == "cpu":
            # the CPU cases name bitsandbytes' CPU path as their oracle and pass at their tolerance (FP4's are
            # compared as numbers: its CPU kernels give FP4 code 8 either sign of zero, by shape)
            assert c["oracle"] == "bitsandbytes_cpu" and r.passed, r.line()
        elif c["name"].startswith("divergence_"):
            assert not rows[c["name"]].passed, f"{c['name']} was meant to show a CPU/CUDA difference"
    # the zero block: CPU bytes 0x77 and +0.0 where CUDA has 0x00 and -0.0, and nothing else differs
    got = results["divergence_bnb_zero_block_cuda/outputs/packed"]
    exp = load_file(str(vectors / "quant.safetensors"))["divergence_bnb_zero_block_cuda/outputs/packed"]
    assert set(np.flatnonzero(got != exp)) == set(range(32, 64))
    assert np.all(got[32:64] == 0x77) and np.all(exp[32:64] == 0x00)


def test_peft_matches_every_case_but_its_two_known_bugs(vectors):
    results = _load("check_peft").peft_results(vectors)
    rows = {r.name: r for r in check(vectors, results)}
    manifest = json.loads((vectors / "manifest.json").read_text())
    peft_cases = {c["name"] for c in manifest["cases"] if c["oracle"] == "peft"}
    divergences = {"divergence_peft_rslora_combination", "divergence_peft_4bit_merge_bias_scaling"}
    # every case whose oracle is PEFT (the two DARE cases replay their masks in tests/oracles/), and the two bugs
    assert set(rows) == (peft_cases - {"combine_dare_linear", "combine_dare_ties"}) | divergences
    failing = {n for n, r in rows.items() if not r.passed}
    assert failing == {"divergence_peft_rslora_combination", "divergence_peft_4bit_merge_bias_scaling"}, \
        [rows[n].line() for n in failing]
    tensors = {}
    for f in ("merge.safetensors", "lora.safetensors"):
        tensors.update(load_file(str(vectors / f)))
    # rsLoRA: PEFT's combined update is sqrt(8) times lora_ref's
    ours = tensors["divergence_peft_rslora_combination/outputs/delta_W"]
    theirs = results["divergence_peft_rslora_combination/outputs/delta_W"]
    np.testing.assert_allclose(theirs, np.sqrt(8) * ours, rtol=1e-5, atol=1e-6)
    # bias: PEFT's 4-bit merge adds lora_B.bias without the scaling s
    name = "divergence_peft_4bit_merge_bias_scaling"
    b, bB = tensors[f"{name}/inputs/bias"], tensors[f"{name}/inputs/lora_B_bias"]
    s = json.loads((vectors / "manifest.json").read_text())
    s = next(c for c in s["cases"] if c["name"] == name)["params"]["scaling"]
    np.testing.assert_allclose(tensors[f"{name}/outputs/merged_bias"], b + s * bB, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(results[f"{name}/outputs/merged_bias"], b + bB, rtol=1e-6, atol=1e-7)
