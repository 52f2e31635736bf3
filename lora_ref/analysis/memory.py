"""A memory model for full fine-tuning, LoRA and QLoRA, training and inference, with every term shown.

Each estimate is a list of :class:`Term` (a name, a byte count and the formula that produced it); the total is their
sum. Nothing is hidden in a fudge factor: a term that is not modelled (the CUDA context, allocator fragmentation,
communication buffers) is not in the list, and the assumptions of each term are in its formula text.

Training, per method (P = all parameters, P_t = trainable parameters, s = bytes of the compute dtype):

==================  =====================================  =====================================================
term                full fine-tuning                       LoRA / QLoRA
==================  =====================================  =====================================================
weights             P·s                                    P·s  /  NF4: ½ B per linear weight + constants + tables,
                                                           embeddings, head, norms, biases in 16 bit
adapters            —                                      P_t · 4 (PEFT keeps adapters in float32)
gradients           P·s                                    P_t · 4
master weights      P·4 when s < 4 (mixed precision)       —
AdamW state         P·8 (m and v in float32)               P_t · 8
activations         what backward needs, per block × L      same, minus inputs of frozen linears that nothing else
                    (or L block inputs + one block with     needs, plus the LoRA branch (its input in the adapter
                    gradient checkpointing)                dtype and x·Aᵀ)
logits              B·T·V · (s + 4 + 4): the logits, the float32 log-softmax saved by the loss, its gradient
dequant buffer      —                                      QLoRA: the largest linear weight dequantized to s
==================  =====================================  =====================================================

Inference: weights (+ unmerged adapters), the KV cache 2·L·B·T·K·Dh·s, one block's working activations and the
last position's logits.

NF4 storage (QLoRA §3, bitsandbytes ``QuantState`` and ``quantize_4bit`` in
``bitsandbytes/functional.py``): per quantized tensor of n elements,
⌈n/2⌉ bytes of packed codes; ⌈n/64⌉ float32 absmax (0.5 bit per parameter), or with double quantization
⌈n/64⌉ uint8 codes + ⌈n/64/256⌉ float32 second-level absmax + a float32 offset (8/64 + 32/(64·256) = 0.127 bit);
plus the tables every tensor carries: the 16-entry 4-bit code (64 B) and, with double quantization, the 256-entry
8-bit dynamic map (1024 B).

Activations come in two *profiles*: ``"torch"`` (PyTorch eager autograd on transformers' modules; what a GPU
training run keeps) and ``"lora_ref"`` (our NumPy autograd, where every node of the graph keeps its output until
backward ends; :mod:`lora_ref.analysis.memory_profile`). Taught in ``notebooks/04_counts.ipynb``.
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_ref.analysis import memory_profile
from lora_ref.analysis.counts import ArchSpec, LoraPlan
from lora_ref.quant.blockwise import (  # the 4-bit facts' one home; the table sizes are re-exported here
    ALLOWED_BLOCKSIZES,
    NESTED_BLOCKSIZE,
    NESTED_CODE_TABLE_BYTES,  # noqa: F401
    NF4_CODE_TABLE_BYTES,  # noqa: F401
    QUANT_TYPES,
    storage_bytes,
)

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
METHODS = ("full", "lora", "qlora")
ATTENTION = ("sdpa", "eager")
PROFILES = ("torch", "lora_ref")


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of ``"fp32"``, ``"bf16"`` or ``"fp16"``; ``ValueError`` for anything else."""
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; known: fp32, bf16, fp16") from None


# ---------------------------------------------------------------------------------------------------------------
# NF4 storage
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QuantConfig:
    """4-bit storage of the frozen base: ``quant_type`` "nf4" or "fp4" (same storage), ``blocksize``, double quant."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = False
    nested_blocksize: int = NESTED_BLOCKSIZE

    def __post_init__(self):
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {self.quant_type!r}")
        if self.blocksize not in ALLOWED_BLOCKSIZES:
            raise ValueError(f"blocksize must be one of 32, 64, ..., 4096 (bitsandbytes), got {self.blocksize}")


def bits_per_quantized_param(q: QuantConfig) -> float:
    """Code bits plus the per-block constants, per parameter, without the per-tensor tables (QLoRA §3).

    4 + 32/blocksize (float32 absmax), or with double quantization 4 + 8/blocksize + 32/(blocksize·256):
    4.5 and 4.126953125 at blocksize 64 (the paper rounds 0.126953125 to 0.127). Counted by
    :func:`lora_ref.quant.blockwise.storage_bytes` over one group of weights that shares a second-level scale
    (``blocksize · nested_blocksize`` weights; one block without double quantization), leaving out what a tensor
    stores once (the offset, the tables).
    """
    n = q.blocksize * (q.nested_blocksize if q.double_quant else 1)
    b = storage_bytes(n, q.blocksize, q.double_quant, q.nested_blocksize)
    return 8 * (b["codes"] + b["scales"]) / n


def nf4_tensor_bytes(n: int, q: QuantConfig) -> dict[str, int]:
    """Exact bytes of one 4-bit tensor of ``n`` elements, as bitsandbytes stores it: codes, constants, tables
    (:func:`lora_ref.quant.blockwise.storage_bytes`; the constants are the scales and the offset)."""
    b = storage_bytes(n, q.blocksize, q.double_quant, q.nested_blocksize)
    return {"codes": b["codes"], "constants": b["scales"] + b["offset"], "tables": b["tables"]}


# ---------------------------------------------------------------------------------------------------------------
# estimates
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Term:
    """One line of a memory estimate."""

    key: str
    bytes: int
    formula: str

    @property
    def gb(self) -> float:
        return self.bytes / 1e9


@dataclass(frozen=True)
class MemoryEstimate:
    """The terms of one method in one mode ("training" or "inference"); ``total`` is their sum."""

    method: str
    mode: str
    terms: tuple[Term, ...]

    @property
    def total(self) -> int:
        return sum(t.bytes for t in self.terms)

    def as_dict(self) -> dict[str, int]:
        """``{term: bytes, ..., "total": bytes}`` (the JSON of ``lora-ref count``)."""
        d = {t.key: t.bytes for t in self.terms}
        d["total"] = self.total
        return d

    def __getitem__(self, key: str) -> int:
        for t in self.terms:
            if t.key == key:
                return t.bytes
        raise KeyError(f"no term {key!r} in the {self.method} {self.mode} estimate; terms: "
                       f"{', '.join(t.key for t in self.terms)}")

    def get(self, key: str, default: int = 0) -> int:
        try:
            return self[key]
        except KeyError:
            return default


@dataclass(frozen=True)
class Setup:
    """The run whose memory is estimated.

    batch B, seq T; ``dtype`` of the base weights and activations; ``grad_checkpointing`` (one checkpoint per
    block, as transformers does); ``attention`` "sdpa" (fused kernels: no T×T matrix is kept) or "eager"
    (the probabilities are kept); ``master_weights`` (float32 copy for 16-bit full fine-tuning; None = automatic);
    ``adapter_dtype`` of LoRA's A and B (PEFT: float32); ``lora_dropout`` (> 0 keeps a dropped copy of each
    adapted input and its mask); ``optimizer`` "adamw" (two float32 moments) or "sgd" (none);
    ``profile`` "torch" or "lora_ref" (see the module docstring); ``fast_paths`` (lora_ref profile only): lora_ref's
    fused training kernels or its readable NumPy twins (None: whichever :mod:`lora_ref.kernels.switch` has switched on).
    """

    batch: int = 1
    seq: int = 1024
    dtype: str = "bf16"
    grad_checkpointing: bool = False
    attention: str = "sdpa"
    master_weights: bool | None = None
    adapter_dtype: str = "fp32"
    lora_dropout: float = 0.0
    optimizer: str = "adamw"
    profile: str = "torch"
    fast_paths: bool | None = None

    def __post_init__(self):
        dtype_bytes(self.dtype)
        dtype_bytes(self.adapter_dtype)
        for name in ("batch", "seq"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {self.attention!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {PROFILES}, got {self.profile!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must lie in [0, 1), got {self.lora_dropout}")


def _fmt(n: int | float) -> str:
    return f"{n:,}" if isinstance(n, int) else f"{n:g}"


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")


# ------------------------------------------------------------------------------------------------ weights
def weight_terms(spec: ArchSpec, method: str, setup: Setup, plan: LoraPlan | None,
                 quant: QuantConfig | None) -> list[Term]:
    """The model's own weights (16-bit/32-bit or NF4) and, for LoRA/QLoRA, the adapters."""
    s = dtype_bytes(setup.dtype)
    terms: list[Term] = []
    if method == "qlora":
        q = quant or QuantConfig()
        codes = constants = tables = 0
        n_tensors = 0
        for m, count in spec.all_linears():
            if m.name == spec.head:
                continue
            b = nf4_tensor_bytes(m.in_features * m.out_features, q)
            codes += b["codes"] * count
            constants += b["constants"] * count
            tables += b["tables"] * count
            n_tensors += count
        n_q = spec.linear_weight_params
        rest = spec.total - n_q
        terms.append(Term("weights", rest * s, f"{_fmt(rest)} unquantized params (embeddings, head, norms, biases) "
                                               f"× {s} B ({setup.dtype})"))
        terms.append(Term("nf4_codes", codes, f"{_fmt(n_q)} linear weights × 4 bit"))
        dq = (f"double quant: ⌈n/{q.blocksize}⌉ uint8 + ⌈n/{q.blocksize * q.nested_blocksize}⌉ float32 + offset"
              if q.double_quant else f"⌈n/{q.blocksize}⌉ float32 absmax")
        terms.append(Term("nf4_constants", constants, f"{dq} per tensor "
                                                      f"(≈ {bits_per_quantized_param(q) - 4:g} bit/param)"))
        terms.append(Term("nf4_tables", tables, f"{_fmt(n_tensors)} tensors × "
                                                f"{tables // max(n_tensors, 1)} B code tables"))
    else:
        terms.append(Term("weights", spec.total * s, f"{_fmt(spec.total)} params × {s} B ({setup.dtype})"))
    if method in ("lora", "qlora"):
        if plan is None:
            raise ValueError(f"method {method!r} needs a LoRA plan (targets and ranks)")
        a = dtype_bytes(setup.adapter_dtype)
        terms.append(Term("adapters", plan.trainable * a,
                          f"{_fmt(plan.trainable)} LoRA params × {a} B ({setup.adapter_dtype})"))
    return terms


def optimizer_terms(spec: ArchSpec, method: str, setup: Setup, plan: LoraPlan | None) -> list[Term]:
    """Gradients, the float32 master copy (16-bit full fine-tuning) and AdamW's two moments."""
    s = dtype_bytes(setup.dtype)
    if method == "full":
        n, g = spec.total, s
        master = setup.master_weights if setup.master_weights is not None else s < 4
        what = "params"
    else:
        n, g = plan.trainable, dtype_bytes(setup.adapter_dtype)
        master = bool(setup.master_weights) and g < 4
        what = "LoRA params"
    terms = [Term("gradients", n * g, f"{_fmt(n)} {what} × {g} B")]
    if master:
        terms.append(Term("master_weights", n * 4, f"{_fmt(n)} {what} × 4 B (float32 copy for mixed precision)"))
    if setup.optimizer == "adamw":
        terms.append(Term("optimizer_state", n * 8, f"{_fmt(n)} {what} × 8 B (AdamW m and v in float32)"))
    return terms


# ------------------------------------------------------------------------------------------------ activations
def _adapted_roles(spec: ArchSpec, plan: LoraPlan | None) -> dict[str, int]:
    """Block linear name → rank of its LoRA (a fused module counts once with the rank of its parts)."""
    if plan is None:
        return {}
    block = {m.name for m in spec.block_linears}
    out: dict[str, int] = {}
    for a in plan.adapted:
        if a.module in block:
            out[a.module] = a.r
    return out


def torch_block_ledger(spec: ArchSpec, method: str, setup: Setup, plan: LoraPlan | None,
                       first: bool = False) -> list[tuple[str, int]]:
    """Bytes PyTorch's autograd keeps for one block of a transformers model, tensor by tensor.

    PyTorch saves a linear layer's input only when the weight needs a gradient, and a product's operands only for
    the operands that need one. So full fine-tuning keeps every linear input; LoRA/QLoRA keep what ``lora_A``
    needs for its gradient: the input cast to the adapter dtype (PEFT's ``_cast_input_dtype``: one copy per adapted
    module when the dtypes differ, the shared input itself when they are equal) and x·Aᵀ for ``lora_B``.
    Everything on the path of the input gradients is kept in every method: norm inputs, q/k/v and the attention
    output (fused kernel) or the probabilities (eager, with k and v repeated to H heads by ``repeat_kv``), the
    MLP activation's input and the operands of the gating product. No dropout in the base model.

    Checked to the byte against the tensors autograd saves for transformers' ``LlamaForCausalLM``, alone, with PEFT
    LoRA, and with PEFT LoRA on bitsandbytes NF4 layers (whose matmul keeps only the packed weight)
    (``tests/interop/test_counts_interop.py``); for GPT-2 and the encoders the same rules are applied, unchecked (their
    GELU and LayerNorm kernels save slightly different tensors, and their dropout masks are not counted).

    ``first``: the first block of a LoRA model, whose input (the frozen embedding's output) needs no gradient:
    autograd records nothing before the first adapted linear.
    """
    s = dtype_bytes(setup.dtype)
    a = dtype_bytes(setup.adapter_dtype)
    B, T = setup.batch, setup.seq
    BT = B * T
    D, H, K, Dh, F = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.intermediate_size
    Q, KV = H * Dh, K * Dh
    full = method == "full"
    adapted = _adapted_roles(spec, plan)
    by_role = {ro: m.name for m in spec.block_linears for ro in m.roles}
    rows: list[tuple[str, int]] = []
    recording = [full or not first]

    def keep(label: str, nbytes: int) -> None:
        if recording[0]:
            rows.append((label, nbytes))

    def linear_inputs(roles: tuple[str, ...], width: int, label: str, kept_anyway: bool = False) -> None:
        """The input shared by the linears of ``roles``: kept for their weights' or their LoRA A's gradients
        (``kept_anyway``: another operation keeps the same storage already)."""
        names = sorted({by_role[r] for r in roles if r in by_role})
        mine = [n for n in names if n in adapted]
        if mine:
            recording[0] = True
        if (full or (mine and a == s)) and not kept_anyway:
            keep(f"{label} (input of {', '.join(names)})", BT * width * s)
        if not full and a != s:
            for n in mine:
                keep(f"LoRA {n}: input cast to {setup.adapter_dtype}", BT * width * a)
        for n in mine:
            if setup.lora_dropout > 0:
                keep(f"LoRA {n}: dropped input and its mask", BT * width * (a + 1))
            n_parts = sum(1 for x in plan.adapted if x.module == n)
            keep(f"LoRA {n}: x·Aᵀ", BT * adapted[n] * n_parts * a)
            keep(f"LoRA {n}: the scaling α/r (a float64 scalar)", 8)

    for row in norm_ledger(spec, method, setup, "attention norm"):
        keep(*row)
    linear_inputs(("q_proj", "k_proj", "v_proj"), D, "normed hidden")
    if setup.attention == "eager":
        keep("q, and k, v repeated to H heads", 3 * BT * Q * s)
        keep("attention probabilities B·H·T² (float32 softmax and its cast)", B * H * T * T * (4 + s))
        keep("the score scaling 1/√Dh (a float64 scalar)", 8)
    else:
        keep("q, k, v (fused attention kernel)", BT * (Q + 2 * KV) * s)
        keep("attention output and log-sum-exp (fused kernel)", BT * Q * s + B * H * T * 4)
    # the fused kernel writes its output in (B, T, H, Dh) order, so o_proj's input is the same storage
    linear_inputs(("o_proj",), Q, "attention output, contiguous", kept_anyway=setup.attention == "sdpa")
    for row in norm_ledger(spec, method, setup, "MLP norm"):
        keep(*row)
    if spec.mlp == "swiglu":
        linear_inputs(("gate_proj", "up_proj"), D, "normed hidden")
        keep("gate output (SiLU input), SiLU output and up output", 3 * BT * F * s)
        linear_inputs(("down_proj",), F, "SiLU(gate) ⊙ up")
    else:
        linear_inputs(("up_proj",), D, "normed hidden")
        keep("GELU input", BT * F * s)
        linear_inputs(("down_proj",), F, "GELU output")
    return rows


def norm_ledger(spec: ArchSpec, method: str, setup: Setup, label: str) -> list[tuple[str, int]]:
    """What a norm keeps: transformers' LlamaRMSNorm upcasts to float32 and keeps the float32 input and 1/rms,
    plus the normalized value when its weight trains; nn.LayerNorm keeps its input, mean and 1/std."""
    s = dtype_bytes(setup.dtype)
    BT, D = setup.batch * setup.seq, spec.hidden_size
    if spec.norm == "rms":
        rows = [(f"{label}: float32 input and 1/rms", BT * D * 4 + BT * 4)]
        if method == "full":
            rows.append((f"{label}: normalized input (for the weight's gradient)", BT * D * s))
        return rows
    return [(f"{label}: input, mean and 1/std", BT * D * s + 2 * BT * 4)]


def activation_terms(spec: ArchSpec, method: str, setup: Setup, plan: LoraPlan | None) -> list[Term]:
    """Activations kept for backward, logits, and (QLoRA) the dequantization buffer."""
    if setup.profile == "lora_ref":
        return lora_ref_activation_terms(spec, method, setup, plan)
    s = dtype_bytes(setup.dtype)
    B, T, D, L, V = setup.batch, setup.seq, spec.hidden_size, spec.num_layers, spec.vocab_size
    def split(rows):  # (what the input gradients need, what the adapters' own gradients need)
        lora = sum(b for label, b in rows if label.startswith("LoRA "))
        return sum(b for _, b in rows) - lora, lora

    per_block, per_block_lora = split(torch_block_ledger(spec, method, setup, plan))
    # with frozen embeddings, nothing in the first block before its first adapter needs a gradient
    first_rows = torch_block_ledger(spec, method, setup, plan, first=True)
    first, first_lora = split(first_rows)
    # RoPE's cos and sin (shared by every block), kept once attention is recorded anywhere
    attention_recorded = L > 1 or any(label.startswith("q,") for label, _ in first_rows)
    rope = 2 * T * spec.head_dim * s if spec.family == "llama" and attention_recorded else 0
    if method == "full":
        first += B * T * 8  # the embedding keeps the token ids (int64) for its gradient
    terms: list[Term] = []
    if setup.grad_checkpointing:
        terms.append(Term("activations", L * B * T * D * s + per_block + rope,
                          f"{L} block inputs × B·T·D·{s} B + one block recomputed ({_fmt(per_block)} B)"
                          + (" + RoPE cos/sin" if rope else "")))
        lora_total = per_block_lora
    else:
        terms.append(Term("activations", (L - 1) * per_block + first + rope,
                          f"{L} blocks × {_fmt(per_block)} B per block"
                          + (f" (the first block {_fmt(first)} B: nothing before its first adapter trains)"
                             if first != per_block else "") + (" + RoPE cos/sin" if rope else "")))
        lora_total = (L - 1) * per_block_lora + first_lora
    if method != "full":
        # what the activations above are for in LoRA: the input gradients that carry the loss back through the
        # frozen layers to every adapter (QLoRA §2's "LoRA input gradients"); the adapters' own weight gradients
        # need only their inputs and x·Aᵀ
        terms.append(Term("lora_activations", lora_total,
                          f"per block {_fmt(per_block_lora)} B: each adapter's input "
                          f"({'a copy in ' + setup.adapter_dtype if setup.adapter_dtype != setup.dtype else 'shared'})"
                          f" and x·Aᵀ" + (" (one block, recomputed)" if setup.grad_checkpointing else "")))
    if spec.head is not None and spec.causal:
        final = sum(b for _, b in norm_ledger(spec, method, setup, "final norm"))
        if method == "full":
            final += B * T * D * s  # the head's input, for the head's gradient
        terms.append(Term("final_norm", final, "final norm" + (" and the head's input" if method == "full" else "")))
        terms.append(Term("logits", B * T * V * (s + 8) + B * T * 8 + 4,
                          f"B·T·V = {_fmt(B * T * V)} × ({s} B logits + 4 B float32 log-softmax + 4 B its "
                          f"gradient), and the int64 targets"))
    if method == "qlora":
        biggest = max(m.in_features * m.out_features for m in spec.block_linears)
        terms.append(Term("dequant_buffer", biggest * s, f"largest linear weight dequantized to {setup.dtype}"))
    return terms


# ------------------------------------------------------------------------------------------------ entry points
def training_memory(spec: ArchSpec, method: str, setup: Setup | None = None, plan: LoraPlan | None = None,
                    quant: QuantConfig | None = None) -> MemoryEstimate:
    """Every term of the memory one training step needs; ``total`` is their sum.

    The sum is an upper bound of the peak: gradients appear while activations are freed during backward, and
    PyTorch frees some activations early. ``plan`` (:func:`lora_ref.analysis.counts.lora_plan`) is required for LoRA and
    QLoRA; ``quant`` defaults to NF4 without double quantization for QLoRA.
    """
    _check_method(method)
    setup = setup or Setup()
    if method == "qlora" and quant is None:
        quant = QuantConfig()
    terms = weight_terms(spec, method, setup, plan, quant)
    terms += optimizer_terms(spec, method, setup, plan)
    if setup.profile == "lora_ref":  # the step's terms say which gradients exist at its peak
        terms = [t for t in terms if t.key != "gradients"]
    terms += activation_terms(spec, method, setup, plan)
    return MemoryEstimate(method, "training", tuple(terms))


def inference_memory(spec: ArchSpec, method: str, setup: Setup | None = None, plan: LoraPlan | None = None,
                     quant: QuantConfig | None = None) -> MemoryEstimate:
    """Memory to generate with a KV cache of ``setup.seq`` positions for ``setup.batch`` sequences.

    ``full`` and ``lora`` serve the (merged) 16-bit model; ``qlora`` serves the 4-bit base with its adapters
    unmerged. Working activations: one block's widest tensors for the prompt (prefill) and the last logits.
    """
    _check_method(method)
    setup = setup or Setup()
    s = dtype_bytes(setup.dtype)
    if method == "qlora":
        terms = weight_terms(spec, "qlora", setup, plan, quant or QuantConfig())
    else:
        terms = weight_terms(spec, "full", setup, None, None)
    B, T, L = setup.batch, setup.seq, spec.num_layers
    KV = spec.num_kv_heads * spec.head_dim
    if spec.causal:
        terms.append(Term("kv_cache", 2 * L * B * T * KV * s, f"2 (k, v) × {L} blocks × B·T·K·Dh = "
                                                              f"{_fmt(B * T * KV)} × {s} B"))
    D, F, Q = spec.hidden_size, spec.intermediate_size, spec.num_heads * spec.head_dim
    width = D + Q + 2 * KV + 2 * F
    work = B * T * width * s
    if setup.attention == "eager":
        work += B * spec.num_heads * T * T * s
    terms.append(Term("activations", work, f"one block at prefill: B·T·(D + H·Dh + 2·K·Dh + 2·F) × {s} B"
                                           + (" + B·H·T² scores" if setup.attention == "eager" else "")))
    if spec.head is not None and spec.causal:
        terms.append(Term("logits", B * spec.vocab_size * 4, "last position's logits B·V in float32"))
    return MemoryEstimate(method, "inference", tuple(terms))


# ---------------------------------------------------------------------------------------------------------------
# lora_ref's own float32 training step (Setup(profile="lora_ref")), from the op ledger of memory_profile
# ---------------------------------------------------------------------------------------------------------------


def lora_ref_activation_terms(spec: ArchSpec, method: str, setup, plan: LoraPlan | None):
    """The step terms for :func:`lora_ref.analysis.memory.training_memory` with ``Setup(profile="lora_ref")``.

    Float32 only; no gradient checkpointing (lora_ref's training step has none). The gradients term of the
    estimate is replaced by the gradients alive at the peak (see :func:`step_peak`).
    """
    if setup.dtype != "fp32" or setup.adapter_dtype != "fp32":
        raise ValueError("the lora_ref profile describes float32 training (dtype='fp32', adapter_dtype='fp32')")
    if setup.grad_checkpointing:
        raise ValueError("the lora_ref profile has no gradient checkpointing")
    p = memory_profile.step_peak(spec, method, plan, setup.batch, setup.seq, setup.fast_paths)
    where = p["phase"]
    return [
        Term("activations", p["activations"], f"every node's output, kept until backward ends (peak: {where})"),
        Term("saved_for_backward", p["saved_for_backward"], "closures not yet processed (x̂, σ, probabilities)"),
        Term("peak_gradients", p["gradients"], "parameter gradients made so far"),
        Term("temporaries", p["temporaries"], "the running rule's temporaries and the residual gradient"),
    ]


def predict_lora_ref_step(spec: ArchSpec, method: str, plan: LoraPlan | None, B: int, T: int, quant=None,
            fast: bool | None = None) -> dict:
    """Predicted bytes of a step of lora_ref's float32 training: ``resident`` (weights, adapters, AdamW state)
    and ``step`` (the peak above it), from :func:`lora_ref.analysis.memory.training_memory`."""
    setup = Setup(batch=B, seq=T, dtype="fp32", profile="lora_ref", fast_paths=fast)
    if method == "qlora" and quant is None:
        quant = QuantConfig("nf4", 64, double_quant=True)
    est = training_memory(spec, method, setup, plan, quant)
    step_keys = {"activations", "saved_for_backward", "peak_gradients", "temporaries"}
    resident = sum(t.bytes for t in est.terms if t.key not in step_keys)
    step = sum(t.bytes for t in est.terms if t.key in step_keys)
    return {"resident": resident, "step": step, "estimate": est}
