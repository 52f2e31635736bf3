"""Planted bugs the property tests must catch: each is injected alone by monkeypatching, then the properties that
should notice it are run in-process, and each must fail within its default number of examples.

Why: a property test that passes on a correct implementation proves little until it is seen to fail on a wrong
one. These twelve bugs are the mistakes LoRA, merging and 4-bit code really ships with: factors in the wrong
layout, the wrong rsLoRA scaling, a dropped scaling, bfloat16 rounding in the wrong order, an unmerge that does
not invert the merge, TIES electing signs by count, DARE without its 1/p, a quantization threshold one code off,
a block boundary off by one, nibbles in the wrong order, a double-quantization offset recorded but not subtracted,
and a LoRA gradient scaled twice.

A bug is planted "everywhere": the library's module attribute is replaced, and so is every other name in a
lora_ref or test module bound to the same object (``from lora_ref.quant import quantize_4bit`` in a test module
sees the bug too), as if the source had been edited. Each property runs with the suite's hypothesis profile
(``tests/conftest.py``: derandomized, 40 examples unless the test sets its own); the runner counts the examples
up to the first failure and stops there (no shrinking), so the counts are reproducible.

``python tests/mutations/planted_bugs.py`` prints the table bug → property → examples to the first failure
(``--all`` also runs every example and counts the failing ones); ``tests/mutations/test_mutations.py`` asserts
the same in ``make test``.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

TESTS = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ patching
class Patcher:
    """setattr with undo; :meth:`everywhere` also rebinds every alias of the patched object in lora_ref and tests."""

    def __init__(self):
        self._undo: list[tuple[object, str, object]] = []

    def setattr(self, obj, name: str, value) -> None:
        self._undo.append((obj, name, obj.__dict__[name] if isinstance(obj, type) else getattr(obj, name)))
        setattr(obj, name, value)

    def everywhere(self, module, name: str, value) -> None:
        orig = getattr(module, name)
        self.setattr(module, name, value)
        for mod in list(sys.modules.values()):
            if mod is None or mod is module or not _ours(mod):
                continue
            for key, v in list(vars(mod).items()):
                if v is orig:
                    self.setattr(mod, key, value)

    def restore(self) -> None:
        while self._undo:
            obj, name, value = self._undo.pop()
            setattr(obj, name, value)


def _ours(mod) -> bool:
    name = getattr(mod, "__name__", "") or ""
    if name == "lora_ref" or name.startswith("lora_ref.") or name.startswith("_planted_bugs"):
        return True
    f = getattr(mod, "__file__", None)
    return bool(f) and Path(f).resolve().is_relative_to(TESTS)


# ------------------------------------------------------------------------------------------------ the bugs
def _factors_transposed(p: Patcher) -> None:
    """ΔW computed as (B·A)ᵀ and read back in W's (out, in) shape: a layout bug (row- vs column-major factors)."""
    from lora_ref.adapters import lora

    def delta_weight(lora_A, lora_B, scaling):
        A, B = np.asarray(lora_A, np.float32), np.asarray(lora_B, np.float32)
        wrong = np.ascontiguousarray((B @ A).T).reshape(B.shape[0], A.shape[1])
        return wrong * np.float32(scaling)

    p.everywhere(lora, "delta_weight", delta_weight)


def _rslora_alpha_over_r(p: Patcher) -> None:
    """rsLoRA layers scaled by α/r instead of α/√r (Kalajdzievski 2023)."""
    from lora_ref.adapters.lora import LoraLinear

    orig = LoraLinear.update_layer

    def update_layer(self, adapter_name, r, lora_alpha, *args, **kwargs):
        orig(self, adapter_name, r, lora_alpha, *args, **kwargs)
        self.scaling[adapter_name] = lora_alpha / r

    p.setattr(LoraLinear, "update_layer", update_layer)


def _scaling_dropped(p: Patcher) -> None:
    """ΔW = B·A, the scaling s = α/r forgotten in the merge."""
    from lora_ref.adapters import lora

    p.everywhere(lora, "delta_weight", lambda lora_A, lora_B, scaling: (
        np.asarray(lora_B, np.float32) @ np.asarray(lora_A, np.float32)))


def _bf16_rounding_order(p: Patcher) -> None:
    """bfloat16 merge rounding swapped: unsafe merges round ΔW first, safe merges do not (PEFT does the opposite)."""
    from lora_ref.adapters import lora

    orig = lora.merged_weight
    p.everywhere(lora, "merged_weight", lambda W, delta, dtype=np.float32, safe_merge=False: orig(
        W, delta, dtype, not safe_merge))


def _unmerge_not_inverse(p: Patcher) -> None:
    """unmerge subtracts B·A without the scaling, so it does not undo the merge."""
    from lora_ref.adapters.lora import LoraLinear

    orig = LoraLinear.unmerge_weight

    def unmerge_weight(self, adapter_name):
        s = self.scaling[adapter_name]
        self.scaling[adapter_name] = 1.0
        try:
            orig(self, adapter_name)
        finally:
            self.scaling[adapter_name] = s

    p.setattr(LoraLinear, "unmerge_weight", unmerge_weight)


def _ties_sign_by_count(p: Patcher) -> None:
    """TIES elects each entry's sign by counting tasks (sgn Σ sgn τ) instead of by mass (sgn Σ τ)."""
    from lora_ref.merging import combine as merge

    orig = merge.calculate_majority_sign_mask
    p.everywhere(merge, "calculate_majority_sign_mask", lambda stacked, method="total": orig(stacked, "frequency"))


def _dare_without_rescale(p: Patcher) -> None:
    """DARE drops entries but does not divide the kept ones by the keep probability p."""
    from lora_ref.merging import combine as merge

    orig = merge.random_pruning
    p.everywhere(merge, "random_pruning", lambda x, density, rng, rescale: orig(x, density, rng, False))


def _nf4_threshold_one_code_off(p: Patcher) -> None:
    """NF4's top decision threshold taken one code too low: the midpoint of codes 13 and 14 decides 14 vs 15."""
    from lora_ref.quant import nf4  # the decision tables' one home, read by the NumPy steps and the kernels

    for name in ("CUDA_NF4_T", "CPU_NF4_T"):
        t = getattr(nf4, name).copy()
        t[14] = t[13]
        p.setattr(nf4, name, t)


def _absmax_block_off_by_one(p: Patcher) -> None:
    """Block b's absmax taken over elements [b·bs + 1, (b + 1)·bs]: the block boundary one element late."""
    from lora_ref.quant import blockwise

    def absmax_blocks(flat, blocksize):
        n = flat.shape[0]
        nblocks = -(-n // blocksize)
        padded = np.zeros(nblocks * blocksize + 1, np.float32)
        padded[:n] = np.abs(flat)
        return padded[1:].reshape(nblocks, blocksize).max(axis=1)

    p.everywhere(blockwise, "absmax_blocks", absmax_blocks)


def _nibble_order_swapped(p: Patcher) -> None:
    """Two codes per byte with the first element in the LOW nibble (bitsandbytes puts it in the high one); packing
    and unpacking agree with each other, so a round trip alone does not see it."""
    from lora_ref.quant import blockwise

    def pack_nibbles(codes):
        n = codes.shape[0]
        padded = np.zeros(n + (n % 2), dtype=np.uint8)
        padded[:n] = codes
        return ((padded[1::2] << 4) | padded[0::2]).astype(np.uint8)

    def unpack_nibbles(packed, n):
        out = np.empty(2 * packed.shape[0], dtype=np.uint8)
        out[0::2] = packed & 0x0F
        out[1::2] = packed >> 4
        return out[:n]

    p.everywhere(blockwise, "pack_nibbles", pack_nibbles)
    p.everywhere(blockwise, "unpack_nibbles", unpack_nibbles)


def _double_quant_offset_not_subtracted(p: Patcher) -> None:
    """Double quantization records the mean of the scales as the offset but quantizes the scales uncentred, so the
    decode (code·absmax2 + offset) is off by the offset."""
    from lora_ref.quant import blockwise

    orig = blockwise.quantize_4bit

    def quantize_4bit(x, blocksize=64, quant_type="nf4", double_quant=False, rounding="cuda", impl="numpy"):
        packed, state = orig(x, blocksize, quant_type, False, rounding, impl)
        if not double_quant:
            return packed, state
        absmax = state.absmax
        offset = blockwise.cpu_mean_f32(absmax) if rounding == "cpu" else np.float32(np.mean(absmax, np.float64))
        q, state2 = blockwise.quantize_blockwise(absmax, blocksize=blockwise.NESTED_BLOCKSIZE, rounding=rounding,
                                                 impl=impl)  # the bug: absmax, not absmax - offset
        return packed, blockwise.QuantState(absmax=q, shape=state.shape, dtype=state.dtype, blocksize=blocksize,
                                            quant_type=quant_type, code=state.code, offset=float(offset),
                                            state2=state2)

    p.everywhere(blockwise, "quantize_4bit", quantize_4bit)


def _lora_grad_A_scaled_twice(p: Patcher) -> None:
    """The fused LoRA node's dL/dA multiplied by s twice (once through gs = s·g, once more as B's scaling)."""
    from lora_ref.autograd import functional as F
    from lora_ref.autograd import ops
    from lora_ref.autograd.tensor import Tensor

    def lora_add(base_out, x, lora_A, lora_B, scaling):
        x = ops._t(x)
        A, B = ops._t(lora_A, x), ops._t(lora_B, x)
        xd, ad, bd = x.data, A.data, B.data
        out = base_out.data
        x2 = xd.reshape(-1, xd.shape[-1])
        xa = x2 @ ad.T
        delta = xa @ bd.T
        delta *= delta.dtype.type(scaling)
        out += delta.reshape(out.shape)

        def backward(g):
            gs = g.reshape(-1, g.shape[-1]) * g.dtype.type(scaling)
            gb = (gs.T @ xa) if B.requires_grad else None
            gxa = gs @ bd
            ga = (gxa.T @ x2) * g.dtype.type(scaling) if A.requires_grad else None  # the bug: s twice
            gx = (gxa @ ad).reshape(xd.shape) if x.requires_grad else None
            return g, gx, ga, gb

        return Tensor._make(out, (base_out, x, A, B), backward)

    p.everywhere(F, "lora_add", lora_add)


# ------------------------------------------------------------------------------------------------ the catalog
@dataclass(frozen=True)
class Bug:
    name: str
    plant: Callable[[Patcher], None]
    #: the properties that must catch it: "file.py::test_name" or "file.py::test_name[param=value]"
    caught_by: tuple[str, ...]

    @property
    def description(self) -> str:
        return " ".join((self.plant.__doc__ or "").split())


LORA = "test_lora.py::"
MERGE = "test_merge.py::"
QUANT = "test_quant_properties.py::"
RULES = "test_rule_properties.py::"

BUGS = (
    Bug("factors transposed", _factors_transposed,
        (LORA + "test_merged_forward_equals_unmerged_forward", LORA + "test_delta_weight_is_scaled_product",
         LORA + "test_merging_several_adapters_adds_their_deltas")),
    Bug("rsLoRA α/r instead of α/√r", _rslora_alpha_over_r,
        (LORA + "test_delta_weight_is_scaled_product", LORA + "test_dora_forward_is_magnitude_times_direction",
         LORA + "test_layer_merge_equals_the_pure_merge_functions",
         RULES + "test_lora_gradients_equal_the_formulas[fast_path=True]")),
    Bug("scaling dropped", _scaling_dropped,
        (LORA + "test_merged_forward_equals_unmerged_forward", LORA + "test_delta_weight_is_scaled_product",
         LORA + "test_lora_bias_is_scaled_in_forward_and_merge")),
    Bug("bf16 rounding order in the merge", _bf16_rounding_order,
        (LORA + "test_bfloat16_merge_rounds_once_unsafe_twice_safe",
         LORA + "test_layer_merge_equals_the_pure_merge_functions")),
    Bug("unmerge does not invert merge", _unmerge_not_inverse,
        (LORA + "test_unmerge_after_merge_restores_float32_weight",)),
    Bug("TIES sign by count, not mass", _ties_sign_by_count,
        (RULES + "test_ties_elects_signs_by_mass",)),
    Bug("DARE without rescaling", _dare_without_rescale,
        (MERGE + "test_dare_masks_keep_a_density_fraction_and_rescale", RULES + "test_dare_linear_keeps_rescaled_entries")),
    Bug("NF4 threshold one code off", _nf4_threshold_one_code_off,
        (QUANT + "test_error_at_most_half_the_widest_gap",)),
    Bug("absmax block boundary off by one", _absmax_block_off_by_one,
        (QUANT + "test_error_at_most_half_the_widest_gap", QUANT + "test_quantize_of_dequantize_returns_the_same_codes")),
    Bug("nibble order swapped", _nibble_order_swapped,
        (QUANT + "test_pack_unpack_round_trip", QUANT + "test_odd_element_count_pads_with_the_code_of_zero")),
    Bug("double-quant offset not subtracted", _double_quant_offset_not_subtracted,
        (QUANT + "test_double_quant_extra_error_bound",)),
    Bug("LoRA dA scaled twice", _lora_grad_A_scaled_twice,
        (RULES + "test_lora_gradients_equal_the_formulas[fast_path=True]",)),
)


# ------------------------------------------------------------------------------------------------ running
class _Failed(BaseException):
    """Raised out of hypothesis at the first failing example, so it neither shrinks nor retries."""


@dataclass
class Outcome:
    test: str
    caught: bool
    examples: int  # examples run up to and including the first failure (or all of them, if none failed)
    error: str = field(default="")
    failing: int | None = None  # with stop_at_first=False: how many of the examples failed
    total: int | None = None


_modules: dict[Path, object] = {}


def _test_module(filename: str):
    """The test module with this (unique) basename, found anywhere under tests/; imported once."""
    paths = sorted(p for p in TESTS.rglob(filename) if "mutations" not in p.parts)
    if len(paths) != 1:
        raise LookupError(f"expected one tests/**/{filename}, found {[str(p) for p in paths]}")
    path = paths[0].resolve()
    if path not in _modules:
        for mod in list(sys.modules.values()):
            if getattr(mod, "__file__", None) and Path(mod.__file__).resolve() == path:
                _modules[path] = mod
                break
        else:
            name = f"_planted_bugs_targets.{path.stem}"
            spec = importlib.util.spec_from_file_location(name, path)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
            _modules[path] = mod
    return _modules[path]


def _parse(spec: str):
    filename, rest = spec.split("::")
    kwargs = {}
    if "[" in rest:
        rest, params = rest[:-1].split("[")
        for item in params.split(","):
            k, v = item.split("=")
            kwargs[k] = {"True": True, "False": False}.get(v, v)
    return filename, rest, kwargs


def run_property(spec: str, stop_at_first: bool = True) -> Outcome:
    """Run one property (with whatever bug is planted) up to its first failing example; or, with
    ``stop_at_first=False``, through all its examples, counting the failing ones (the failures are swallowed,
    so hypothesis neither shrinks nor stops)."""
    filename, name, kwargs = _parse(spec)
    fn = getattr(_test_module(filename), name)
    inner = fn.hypothesis.inner_test
    count, failing, first, error = 0, 0, 0, ""

    def counting(*args, **kw):
        nonlocal count, failing, first, error
        count += 1
        try:
            return inner(*args, **kw)
        except Exception as e:  # the property failed on this example
            text = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]
            if stop_at_first:
                raise _Failed(text) from e
            failing += 1
            first, error = first or count, error or text

    fn.hypothesis.inner_test = counting
    try:
        fn(**kwargs)
    except _Failed as f:
        return Outcome(spec, True, count, f.args[0])
    finally:
        fn.hypothesis.inner_test = inner
    if not stop_at_first:
        return Outcome(spec, failing > 0, first or count, error, failing, count)
    return Outcome(spec, False, count)


def run_bug(bug: Bug, stop_at_first: bool = True) -> list[Outcome]:
    p = Patcher()
    for spec in bug.caught_by:  # import the test modules first, so their bindings are rebound too
        _test_module(_parse(spec)[0])
    try:
        bug.plant(p)
        return [run_property(spec, stop_at_first) for spec in bug.caught_by]
    finally:
        p.restore()


def load_profile() -> None:
    """The suite's hypothesis profile, when run as a script (pytest loads tests/conftest.py itself)."""
    spec = importlib.util.spec_from_file_location("_planted_bugs_conftest", TESTS / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)


def table(results: dict[str, list[Outcome]]) -> str:
    full = any(o.total is not None for outs in results.values() for o in outs)
    head = "| planted bug | property | caught | examples to the first failure |"
    lines = [head + (" failing examples / run |" if full else ""), "|---|---|---|---|" + ("---|" if full else "")]
    for bug, outs in results.items():
        for o in outs:
            row = f"| {bug} | `{o.test}` | {'yes' if o.caught else 'NO'} | {o.examples} |"
            lines.append(row + (f" {o.failing} / {o.total} |" if full else ""))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """``--all``: run every example of each property and count the failing ones too."""
    load_profile()
    full = "--all" in argv
    results = {bug.name: run_bug(bug, stop_at_first=not full) for bug in BUGS}
    print(table(results))
    missed = [o.test for outs in results.values() for o in outs if not o.caught]
    return 1 if missed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(TESTS.parent))
    raise SystemExit(main(sys.argv[1:]))
