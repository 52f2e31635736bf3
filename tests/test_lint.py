"""Lint and dead code, enforced rather than remembered: ruff (pyflakes, pycodestyle, import order; settings in
pyproject.toml) over the package, the tests and the book's code, and vulture over the package with a short
allow-list of names that are used where vulture cannot see (protocols, argparse, Numba intrinsics, public API
read by notebooks and users)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> why it stays although nothing in lora_ref, tests or the notebooks calls it
ALLOWED_UNUSED = {
    "find_spec": "importlib's finder protocol (lora_ref/__init__.py)",
    "create_module": "importlib's loader protocol",
    "exec_module": "importlib's loader protocol",
    "__getattr__": "module-level lazy names (PEP 562)",
    "__dir__": "module-level lazy names (PEP 562)",
    "error": "argparse.ArgumentParser.error, overridden in cli.py",
    "typingctx": "the signature Numba's @intrinsic requires",
    "signum": "the signature signal handlers have",
    "frame": "the signature signal handlers have",
    "fresh_output": "read with vars(type(layer)) by LoraLinear",
    "row_parallel": "read with type(m).__dict__ by lora_ref.modeling.llama.row_parts (declared, not inherited)",
    "tags": "jinja2 Extension protocol",
    "parse": "jinja2 Extension protocol",
    "_render": "called by name through jinja2's Extension.call_method",
    "task_type": "a PEFT LoraConfig field, written to adapter_config.json",
    "revision": "a PEFT LoraConfig field, written to adapter_config.json",
    "inference_mode": "a PEFT LoraConfig field, written to adapter_config.json",
    "enable_grad": "public API (lora_ref.enable_grad), the counterpart of no_grad",
    "is_leaf": "public Tensor API, as torch's",
    "pre_tokenizer": "a tokenizers.Tokenizer setter",
    "decoder": "a tokenizers.Tokenizer setter",
    "post_processor": "a tokenizers.Tokenizer setter",
}


def test_ruff_is_clean():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "lora_ref", "tests", "book"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _notebook_code(tmp_path: Path) -> Path:
    """The notebooks' code cells as one Python file, so names only notebooks use count as used."""
    out = tmp_path / "notebook_code.py"
    chunks = []
    for nb in sorted((ROOT / "notebooks").rglob("*.ipynb")):
        for cell in json.loads(nb.read_text(encoding="utf-8"))["cells"]:
            if cell["cell_type"] == "code":
                src = "".join(cell["source"])
                chunks.append("\n".join(line for line in src.splitlines() if not line.lstrip().startswith(("%", "!"))))
    out.write_text("\n\n".join(chunks) + "\n", encoding="utf-8")
    return out


def test_no_dead_code(tmp_path):
    allow = tmp_path / "allow.py"
    allow.write_text("".join(f"_.{name}  # {why}\n" for name, why in ALLOWED_UNUSED.items()))
    proc = subprocess.run([sys.executable, "-m", "vulture", "lora_ref", "tests", "book", str(_notebook_code(tmp_path)),
                           str(allow), "--min-confidence", "60", "--exclude", "_build"],
                          cwd=ROOT, capture_output=True, text=True)
    ours = [line for line in proc.stdout.splitlines() if line.startswith("lora_ref/")]
    assert not ours, "unused code in lora_ref (delete it, or allow it in tests/test_lint.py with the reason):\n" + "\n".join(ours)
