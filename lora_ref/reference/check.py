"""Check results against lora_ref reference vectors.

This module needs only NumPy and safetensors, so it also runs on its own, without lora_ref installed::

    python check.py VECTORS_DIR RESULTS

``VECTORS_DIR`` holds ``manifest.json`` and the safetensors files it names. ``RESULTS`` is a safetensors file, or a
folder of them, holding some or all ``<case>/outputs/<name>`` tensors. Each case with at least one output in
RESULTS gets one line, ``PASS`` or ``FAIL``, with its name, the largest absolute and relative errors and the
tolerance. The exit status is 1 if any case fails or nothing matched, else 0.

Tolerances (from the manifest): ``"exact"`` means equal bit for bit after casting the result to the expected
dtype (so −0.0 ≠ +0.0 and NaN equals only the same NaN); ``{"atol": a, "rtol": r}`` means
``|result − expected| <= a + r·|expected|`` for every element, computed in float64. Either may allow a few
misses: ``{"max_mismatched": k}`` (bit for bit) or ``{"atol": a, "rtol": r, "max_mismatched": k}`` pass when at
most k elements of each output fail the element test (the case's description says why its oracle needs that).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

try:  # bfloat16 results are stored as such by some tools; ml_dtypes teaches NumPy the dtype
    import ml_dtypes  # noqa: F401
except ImportError:  # pragma: no cover - the checker works without it for every other dtype
    pass


@dataclass
class CaseResult:
    name: str
    passed: bool
    max_abs: float
    max_rel: float
    tolerance: str
    detail: str = ""

    def line(self) -> str:
        status = "PASS" if self.passed else "FAIL"
        text = f"{status} {self.name} max_abs={self.max_abs:.3e} max_rel={self.max_rel:.3e} tol={self.tolerance}"
        return text + (f" ({self.detail})" if self.detail else "")


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises several types for damaged files
        raise ValueError(f"cannot read safetensors file {path.name}: {e}") from None


def load_manifest(vectors: str | os.PathLike) -> dict:
    root = Path(vectors)
    path = root / "manifest.json"
    if not path.is_file():
        raise ValueError(f"manifest.json not found in {root}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"manifest.json is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or "cases" not in manifest:
        raise ValueError("manifest.json has no 'cases' list")
    return manifest


def load_results(results: str | os.PathLike) -> dict[str, np.ndarray]:
    p = Path(results)
    if p.is_dir():
        files = sorted(p.glob("*.safetensors"))
        if not files:
            raise ValueError(f"no .safetensors files in {p}")
        out: dict[str, np.ndarray] = {}
        for f in files:
            out.update(_read_safetensors(f))
        return out
    if not p.exists():
        raise ValueError(f"results not found: {p}")
    return _read_safetensors(p)


def _tol_text(tol) -> str:
    if tol == "exact":
        return "exact"
    text = f"atol={tol['atol']:g},rtol={tol['rtol']:g}" if "atol" in tol else "bitwise"
    return text + (f",max_mismatched={int(tol['max_mismatched'])}" if "max_mismatched" in tol else "")


def compare(expected: np.ndarray, got: np.ndarray, tol) -> tuple[bool, float, float, str]:
    """(ok, max abs error, max relative error, detail) for one tensor."""
    if tuple(got.shape) != tuple(expected.shape):
        if got.size == expected.size:
            got = got.reshape(expected.shape)
        else:
            return False, float("inf"), float("inf"), f"shape {tuple(got.shape)} != expected {tuple(expected.shape)}"
    e64 = expected.astype(np.float64)
    g64 = got.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        diff = np.abs(g64 - e64)
        diff = np.where(np.isnan(e64) & np.isnan(g64), 0.0, diff)
        diff = np.where((e64 == g64) & np.isinf(e64), 0.0, diff)
        rel = diff / np.maximum(np.abs(e64), np.finfo(np.float64).tiny)
        rel = np.where(diff == 0, 0.0, rel)
    max_abs = float(np.nanmax(diff)) if diff.size else 0.0
    max_rel = float(np.nanmax(rel)) if rel.size else 0.0
    if np.any(np.isnan(diff)):
        max_abs = max_rel = float("nan")
    allowed = int(tol.get("max_mismatched", 0)) if isinstance(tol, dict) else 0
    if tol == "exact" or "atol" not in tol:
        cast = got.astype(expected.dtype)
        if cast.tobytes() == expected.tobytes():
            return True, max_abs, max_rel, ""
        n_bad = _count_unequal(cast, expected)
        return n_bad <= allowed, max_abs, max_rel, f"{n_bad} of {expected.size} elements differ bitwise"
    atol, rtol = float(tol["atol"]), float(tol["rtol"])
    with np.errstate(invalid="ignore"):
        bad = ~(diff <= atol + rtol * np.abs(e64))
    n_bad = int(np.count_nonzero(bad))
    return n_bad <= allowed, max_abs, max_rel, ("" if n_bad == 0 else f"{n_bad} of {bad.size} elements outside tolerance")


def _count_unequal(a: np.ndarray, b: np.ndarray) -> int:
    if a.size == 0:
        return 0
    aa = np.ascontiguousarray(a).reshape(-1).view(np.uint8).reshape(a.size, -1)
    bb = np.ascontiguousarray(b).reshape(-1).view(np.uint8).reshape(b.size, -1)
    return int(np.count_nonzero(np.any(aa != bb, axis=1)))


def check(vectors: str | os.PathLike, results: str | os.PathLike | dict) -> list[CaseResult]:
    """Compare every case that has outputs in ``results``; returns one CaseResult per matched case."""
    root = Path(vectors)
    manifest = load_manifest(root)
    got_all = results if isinstance(results, dict) else load_results(results)
    cache: dict[str, dict[str, np.ndarray]] = {}
    out: list[CaseResult] = []
    for case in manifest["cases"]:
        name, tol = case["name"], case["tolerance"]
        prefix = f"{name}/outputs/"
        present = [k for k in got_all if k.startswith(prefix)]
        if not present:
            continue
        fname = case["file"]
        if fname not in cache:
            fpath = root / fname
            if not fpath.is_file():
                raise ValueError(f"vector file {fname} named by manifest.json is missing from {root}")
            cache[fname] = _read_safetensors(fpath)
        expected = {k: v for k, v in cache[fname].items() if k.startswith(prefix)}
        ok, worst_abs, worst_rel, details = True, 0.0, 0.0, []
        for key, exp in expected.items():
            if key not in got_all:
                ok = False
                details.append(f"missing {key[len(prefix):]}")
                continue
            k_ok, a, r, d = compare(exp, np.asarray(got_all[key]), tol)
            ok &= k_ok
            worst_abs = a if np.isnan(a) else max(worst_abs, a)
            worst_rel = r if np.isnan(r) else max(worst_rel, r)
            if d:
                details.append(f"{key[len(prefix):]}: {d}")
        for key in present:
            if key not in expected:
                ok = False
                details.append(f"unknown output {key[len(prefix):]}")
        out.append(CaseResult(name, bool(ok), worst_abs, worst_rel, _tol_text(tol), "; ".join(details)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("vectors", help="folder with manifest.json and the vector files")
    parser.add_argument("results", help="a safetensors file or a folder of them with <case>/outputs/<name> keys")
    args = parser.parse_args(argv)
    return run(args.vectors, args.results)


def run(vectors, results, stream=None) -> int:
    stream = stream or sys.stdout
    try:
        rows = check(vectors, results)
    except ValueError as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    for r in rows:
        stream.write(r.line() + "\n")
    failed = sum(not r.passed for r in rows)
    if not rows:
        sys.stderr.write("error: no case of the manifest has outputs in the results\n")
        return 1
    stream.write(f"{len(rows) - failed} of {len(rows)} cases passed\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
