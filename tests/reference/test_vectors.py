"""Reference vectors: deterministic bytes, the checker catches what it should, the published set is current."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lora_ref.reference.check import check
from lora_ref.reference.vectors import write_vectors

PUBLISHED = Path(__file__).parents[1] / "vectors"


@pytest.fixture(scope="module")
def vectors(tmp_path_factory):
    out = tmp_path_factory.mktemp("v") / "vectors"
    write_vectors(out)
    return out


def _all_outputs(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({k: v for k, v in load_file(str(f)).items() if "/outputs/" in k})
    return out


def test_two_runs_give_identical_bytes(vectors, tmp_path):
    again = tmp_path / "again"
    write_vectors(again)
    names = sorted(p.name for p in vectors.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (vectors / name).read_bytes() == (again / name).read_bytes(), name


def test_manifest_layout_and_coverage(vectors):
    manifest = json.loads((vectors / "manifest.json").read_text())
    assert set(manifest) == {"version", "cases"}
    cases = manifest["cases"]
    assert len(cases) >= 30, len(cases)
    assert len({c["op"] for c in cases}) >= 10
    for c in cases:
        assert set(c) == {"name", "op", "file", "tolerance", "oracle", "description", "params"}
        tol = c["tolerance"]
        assert tol == "exact" or (set(tol) - {"max_mismatched"} in ({"atol", "rtol"}, set())
                                  and tol.get("rtol", 0) <= 1e-3 and 0 <= tol.get("max_mismatched", 0) <= 64), c["name"]
        keys = load_file(str(vectors / c["file"]))
        assert any(k.startswith(f"{c['name']}/outputs/") for k in keys), c["name"]


def test_vectors_pass_against_themselves(vectors):
    rows = check(vectors, _all_outputs(vectors))
    assert rows and all(r.passed for r in rows), [r.line() for r in rows if not r.passed]
    assert len(rows) == len(json.loads((vectors / "manifest.json").read_text())["cases"])


def test_a_perturbed_output_is_caught_and_named(vectors, tmp_path):
    outs = _all_outputs(vectors)
    key = "tiny_llama_logits/outputs/logits"
    outs[key] = outs[key].copy()
    outs[key].flat[5] += 1e-2
    exact = "nf4_quantize_cuda_float32/outputs/packed"
    outs[exact] = outs[exact].copy()
    outs[exact][0] ^= 1
    save_file(outs, str(tmp_path / "results.safetensors"))
    rows = {r.name: r for r in check(vectors, tmp_path / "results.safetensors")}
    assert not rows["tiny_llama_logits"].passed and not rows["nf4_quantize_cuda_float32"].passed
    assert sum(not r.passed for r in rows.values()) == 2
    # the CLI says FAIL with the case name and exits non-zero
    proc = subprocess.run([sys.executable, str(vectors / "check.py"), str(vectors), str(tmp_path / "results.safetensors")],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert any(line.startswith("FAIL tiny_llama_logits") for line in proc.stdout.splitlines())


def test_negative_zero_is_not_positive_zero_under_exact(vectors, tmp_path):
    outs = _all_outputs(vectors)
    key = "divergence_bnb_zero_block_cuda/outputs/dequantized"
    flipped = outs[key].copy()
    assert np.any(np.signbit(flipped) & (flipped == 0))
    flipped[flipped == 0] = 0.0  # +0.0 where CUDA gives -0.0 (what the CPU path does)
    rows = check(vectors, {key: flipped})
    assert [r.passed for r in rows] == [False]


def test_nothing_matched_is_an_error(vectors, tmp_path):
    save_file({"unrelated": np.zeros(2, np.float32)}, str(tmp_path / "r.safetensors"))
    proc = subprocess.run([sys.executable, str(vectors / "check.py"), str(vectors), str(tmp_path / "r.safetensors")],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "no case" in proc.stderr


def test_standalone_checker_imports_only_numpy_and_safetensors():
    import lora_ref.reference.check as mod

    tree = ast.parse(Path(mod.__file__).read_text())
    top = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            top.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            top.add((node.module or "").split(".")[0])
    assert "lora_ref" not in top
    assert top - set(sys.stdlib_module_names) <= {"numpy", "safetensors", "ml_dtypes", "__future__"}


def _published_machine_kind() -> bool:
    """Whether this machine is of the kind the published set was written on: x86-64 with AVX-512, where OpenBLAS runs
    its AVX-512 kernels. Elsewhere float32 products (OpenBLAS's AVX2 kernel sums in another order) and some of
    NumPy's own float32 loops (``rope_llama3``, a float32 ``**`` and divisions, no product) round differently in the
    last bits."""
    from llvmlite import binding

    from lora_ref.kernels.blas import SMALL_KERNEL_CORES, blas_core

    return bool(binding.get_host_cpu_features().get("avx512f", False)) and blas_core() in SMALL_KERNEL_CORES


def test_published_set_is_reproduced_byte_for_byte(vectors):
    """On the machine kind that wrote it, the published set is the generator's output byte for byte (it is current).
    On another kind: the same files, the manifest, README and checker byte for byte, the same tensors with
    byte-identical inputs, and outputs that pass the manifest's tolerance of every case ("exact" ones bit for bit)."""
    assert PUBLISHED.is_dir(), "tests/vectors/ (the published set) is missing"
    names = sorted(p.name for p in vectors.iterdir())
    assert names == sorted(p.name for p in PUBLISHED.iterdir())
    stale = "tests/vectors/{} is stale: regenerate with 'lora-ref vectors --out ...'"
    if _published_machine_kind():
        for name in names:
            assert (vectors / name).read_bytes() == (PUBLISHED / name).read_bytes(), stale.format(name)
        return
    for name in names:
        if not name.endswith(".safetensors"):
            assert (vectors / name).read_bytes() == (PUBLISHED / name).read_bytes(), stale.format(name)
            continue
        got, want = load_file(str(vectors / name)), load_file(str(PUBLISHED / name))
        assert sorted(got) == sorted(want), stale.format(name)
        for key, w in want.items():
            assert got[key].dtype == w.dtype and got[key].shape == w.shape, f"{name} {key}"
            if "/inputs/" in key:
                assert got[key].tobytes() == w.tobytes(), f"{name} {key}: inputs are drawn the same everywhere"
    results = check(PUBLISHED, vectors)
    cases = json.loads((PUBLISHED / "manifest.json").read_text())["cases"]
    assert len(results) == len(cases)
    failed = [r for r in results if not r.passed]
    assert not failed, failed


def test_cli_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    proc = subprocess.run([sys.executable, "-m", "lora_ref.cli", "vectors", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "not empty" in proc.stderr and "Traceback" not in proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_cli_check_json_is_one_document(vectors):
    import json as _json

    proc = subprocess.run([sys.executable, "-m", "lora_ref", "check", str(vectors),
                           str(vectors / "autograd.safetensors"), "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    doc = _json.loads(proc.stdout)
    assert doc["failed"] == 0 and doc["passed"] == len(doc["cases"]) > 0
