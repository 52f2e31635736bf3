"""The memory of one training step of our own NumPy Llama, predicted op by op (the ledger of Setup(profile="lora_ref")).

:mod:`lora_ref.analysis.memory` predicts what PyTorch keeps. Our autograd (:mod:`lora_ref.autograd.tensor`) keeps something else,
and this module writes it down so that the same memory model can be checked against a measurement on this machine:

- every graph node keeps its output array (``.data``) until ``backward`` returns, and so does every constant that is
  a parent of a node (a frozen layer's output feeding a LoRA sum, a frozen weight, the embedding output);
- every backward closure keeps the extra arrays its rule reads (RMSNorm's x̂ and 1/rms, SwiGLU's σ(gate) and
  SiLU(gate), attention's probabilities B·H·T·S) until its node has been processed;
- a parameter's gradient appears when its node is processed (a copy of the computed one, so briefly twice);
- AdamW's m and v exist from the first step on; its update makes two parameter-sized temporaries.

So the peak of a step (after the first, with ``zero_grad`` done) above what is resident (weights, adapters,
AdamW's state) is the largest of: the moment each node's backward runs (all outputs + the closures not yet freed +
the gradients made so far + that rule's temporaries + the residual-stream gradient in flight), and the optimizer
update (all gradients + two temporaries of the largest trainable parameter). :func:`step_peak` simulates that walk
over the op list of :func:`forward_ops`, which mirrors ``Llama.forward`` with :class:`lora_ref.adapters.lora.LoraLinear` and
:class:`lora_ref.modeling.linear4bit.Linear4bit` layers in float32.

:func:`measure` trains the tutorial model for one step as full, lora or qlora and compares the peak traced by
``tracemalloc`` (which sees NumPy's and Numba's buffers) with the prediction: ``lora-ref count --measure``.
Taught in ``notebooks/04_counts.ipynb``.
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_ref.analysis.counts import ArchSpec, LoraPlan

FLOAT32_BYTES = 4  # bytes of one float32


@dataclass(frozen=True)
class Op:
    """One node of the graph: its output, what its closure keeps, what its backward makes."""

    name: str
    data: int = 0         # bytes of arrays kept alive until backward ends (the output, constants it holds)
    extra: int = 0        # bytes its backward closure keeps, freed when the node is processed
    grad: int = 0         # bytes of parameter gradients its backward produces (kept as leaf .grad)
    transient: int = 0    # peak bytes of temporaries while its backward runs (input gradients included)
    returns: int = 0      # bytes of the new gradient arrays it returns (alive until the next node has run)


def kernel_4bit_scratch(M: int, K: int, N: int) -> int:
    """Bytes the tiled 4-bit kernel (:func:`lora_ref.quant.kernels.matmul_4bit`, ``_t``) allocates besides its
    output, for an (M, K) activation against a 4-bit weight giving (M, N): A packed once into row panels of
    ``MR`` rows and K chunks of ``KC`` (:func:`lora_ref.kernels.matmul.pack_a`), and one (KC, NR) panel of dequantized
    weights per thread. Small products (M <= ``ROW_KERNEL_MAX_M``) use a row kernel without scratch."""
    from numba import get_num_threads

    from lora_ref.kernels import matmul
    from lora_ref.quant import kernels

    if M <= kernels.ROW_KERNEL_MAX_M:
        return 0
    MR, NR, KC = matmul.MR, matmul.NR, matmul.KC
    packed_a = -(-K // KC) * (-(-M // MR) * MR) * KC * FLOAT32_BYTES
    threads = min(get_num_threads(), -(-N // NR))
    return packed_a + threads * KC * NR * FLOAT32_BYTES


def four_bit_backward_bytes(M: int, n_in: int, n_out: int) -> int:
    """Peak bytes of dx = g·dequant(W) for a 4-bit (n_out, n_in) weight and M rows, output included.

    :func:`lora_ref.modeling.linear4bit.linear_4bit` picks by M (``impl="auto"``): from ``AUTO_DEQUANTIZE_ROWS`` rows on it
    dequantizes W to float32 and multiplies (the decoding holds about 17 bytes per weight at its peak: the
    uint8 codes, int64 block indices, the looked-up codes and scales; then W and dx), below that the tiled kernel
    with its scratch (:func:`kernel_4bit_scratch`).
    """
    try:
        from lora_ref.adapters.qlora import AUTO_DEQUANTIZE_ROWS
    except ImportError:
        AUTO_DEQUANTIZE_ROWS = None
    dx = M * n_in * FLOAT32_BYTES
    n = n_in * n_out
    if AUTO_DEQUANTIZE_ROWS is not None and M >= AUTO_DEQUANTIZE_ROWS:
        return max(17 * n, 4 * n + dx)
    return dx + kernel_4bit_scratch(M, n_out, n_in)


def fused_lora_enabled(fast: bool) -> bool:
    """Whether LoRA layers run as one in-place node (:func:`lora_ref.autograd.functional.lora_add`, a fast path)."""
    from lora_ref.autograd import functional

    return fast and hasattr(functional, "lora_add")


def _linear(name: str, n_in: int, n_out: int, BT: int, trains_weight: bool, bias: bool, r: int | None,
            four_bit: bool = False, fused_lora: bool = False) -> list[Op]:
    """A linear layer (float32, or 4-bit: the same arrays plus the kernel's scratch), optionally with a LoRA
    adapter of rank r: base(x) + (x·Aᵀ)·Bᵀ·s, as :class:`lora_ref.adapters.lora.LoraLinear` computes it (no dropout)."""
    ops = []
    w_grad = (n_in * n_out + (n_out if bias else 0)) * FLOAT32_BYTES if trains_weight else 0
    # backward: the input gradient g·W (BT·in) and, for a trained weight, gᵀ·x and its leaf copy
    base_tmp = BT * n_in * FLOAT32_BYTES + 2 * w_grad
    if four_bit:
        base_tmp = four_bit_backward_bytes(BT, n_in, n_out)
    ops.append(Op(f"{name}", data=BT * n_out * FLOAT32_BYTES, transient=base_tmp, grad=w_grad,
                  returns=BT * n_in * FLOAT32_BYTES + w_grad))
    if r and fused_lora:
        # one node adds s·(x·Aᵀ)·Bᵀ into the base output's buffer and keeps only x·Aᵀ; backward: s·g, d(x·Aᵀ), dx,
        # and the two adapter gradients with their leaf copies
        lora_grads = (r * n_in + n_out * r) * FLOAT32_BYTES
        ops.append(Op(f"{name}.lora (in place)", extra=BT * r * FLOAT32_BYTES, grad=lora_grads,
                      transient=BT * (n_out + r + n_in) * FLOAT32_BYTES + 2 * lora_grads, returns=BT * n_in * FLOAT32_BYTES + lora_grads))
    elif r:
        ops.append(Op(f"{name}.lora_A", data=BT * r * FLOAT32_BYTES, grad=r * n_in * FLOAT32_BYTES,
                      transient=BT * n_in * FLOAT32_BYTES + 2 * r * n_in * FLOAT32_BYTES, returns=(BT + r) * n_in * FLOAT32_BYTES))
        ops.append(Op(f"{name}.lora_B", data=BT * n_out * FLOAT32_BYTES, grad=n_out * r * FLOAT32_BYTES,
                      transient=BT * r * FLOAT32_BYTES + 2 * n_out * r * FLOAT32_BYTES, returns=(BT + n_out) * r * FLOAT32_BYTES))
        ops.append(Op(f"{name}.scaling", data=BT * n_out * FLOAT32_BYTES, transient=BT * n_out * FLOAT32_BYTES,
                      returns=BT * n_out * FLOAT32_BYTES))
        # the sum keeps its output; backward also adds the two input gradients of x (a new BT·in array)
        ops.append(Op(f"{name}.add", data=BT * n_out * FLOAT32_BYTES, transient=BT * n_in * FLOAT32_BYTES))
    return ops


def fast_paths_enabled() -> bool:
    """Whether lora_ref runs its fused Numba training kernels (:mod:`lora_ref.kernels.switch`) rather than the NumPy twins."""
    try:
        from lora_ref.kernels import switch as fast
    except ImportError:
        return False
    return fast.enabled()


def forward_ops(spec: ArchSpec, method: str, plan: LoraPlan | None, B: int, T: int,
                fast: bool | None = None) -> list[Op]:
    """The graph of one forward + loss of ``lora_ref.modeling.llama.Llama``, in execution order (llama family only).

    ``fast``: the fused kernels of :mod:`lora_ref.kernels.training` (RMSNorm keeps only 1/rms, SwiGLU nothing but
    its inputs, the attention softmax runs in place, rotary writes q contiguous) or the readable NumPy twins
    (default: whichever :mod:`lora_ref.kernels.switch` has switched on).
    """
    fast = fast_paths_enabled() if fast is None else fast
    fused_lora = fused_lora_enabled(fast)
    if spec.family != "llama":
        raise ValueError(f"the NumPy memory profile describes lora_ref's Llama, not {spec.family!r}")
    BT = B * T
    D, H, K, Dh, F, V = (spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim,
                         spec.intermediate_size, spec.vocab_size)
    Q, KV = H * Dh, K * Dh
    full = method == "full"
    ranks = {} if plan is None else {a.module: a.r for a in plan.adapted}
    lin = {m.name: m for m in spec.block_linears}
    ops: list[Op] = []
    # embedding: a node only when the table trains (its backward makes a V×D gradient, then its copy)
    emb_grad = V * D * FLOAT32_BYTES if full else 0
    ops.append(Op("embed_tokens", data=BT * D * FLOAT32_BYTES, grad=emb_grad, transient=2 * emb_grad, returns=emb_grad))
    rope = 2 * T * Dh * FLOAT32_BYTES  # cos and sin (T, Dh), shared by every block
    ops.append(Op("rope cos/sin", data=rope))
    for layer in range(spec.num_layers):
        block: list[tuple[int, Op]] = []  # (stage, op); stages order the block's ops for the first-block rule

        def linear(stage: int, short: str):
            m = lin[short]
            for op in _linear(f"{layer}.{short}", m.in_features, m.out_features, BT, full, m.bias,
                              ranks.get(short), four_bit=method == "qlora", fused_lora=fused_lora):
                block.append((stage, op))

        norm_w = D * FLOAT32_BYTES if full else 0
        # RMSNorm: output; closure 1/rms (BT) (the twin also x̂, BT·D); backward: dx (BT·D) (the twin also g·w and
        # x̂·mean(h·x̂)), the weight's gradient and its copy
        norm_extra = BT * FLOAT32_BYTES + (0 if fast else BT * D * FLOAT32_BYTES)
        norm_tmp = (1 if fast else 3) * BT * D * FLOAT32_BYTES + 2 * norm_w
        block.append((0, Op(f"{layer}.input_layernorm", data=BT * D * FLOAT32_BYTES, extra=norm_extra, grad=norm_w,
                            transient=norm_tmp, returns=BT * D * FLOAT32_BYTES + norm_w)))
        for short in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            linear(1, short)
        # RoPE on q and k: one node each, the rotated copy; backward dx (the twin: g·cos, g·sin, their sum)
        rot = 1 if fast else 3
        block.append((2, Op(f"{layer}.rotary q", data=BT * Q * FLOAT32_BYTES, transient=rot * BT * Q * FLOAT32_BYTES,
                            returns=BT * Q * FLOAT32_BYTES)))
        block.append((2, Op(f"{layer}.rotary k", data=BT * KV * FLOAT32_BYTES, transient=rot * BT * KV * FLOAT32_BYTES,
                            returns=BT * KV * FLOAT32_BYTES)))
        # attention: output (BT·Q); closure keeps the probabilities (B, H, T, T); backward: dP turned into dS in
        # place (the twin: dP, dP − Σ and dS, 3 × B·H·T²), a contiguous copy of the output gradient, dq, dk, dv
        probs = B * H * T * T * FLOAT32_BYTES
        # with G = H/K > 1 query heads per kv head, the twin's closure also keeps q regrouped to (B, K, G·T, Dh):
        # a copy, since its rotated q is laid out (B, T, H, Dh) in memory (the fast rotary writes it contiguous)
        q_copy = BT * Q * FLOAT32_BYTES if (H != K and not fast) else 0
        block.append((2, Op(f"{layer}.attention", data=BT * Q * FLOAT32_BYTES, extra=probs + q_copy,
                            transient=(1 if fast else 3) * probs + 2 * BT * Q * FLOAT32_BYTES + 2 * BT * KV * FLOAT32_BYTES,
                            returns=BT * (Q + 2 * KV) * FLOAT32_BYTES)))
        block.append((2, Op(f"{layer}.heads -> (B, T, H·Dh)", data=BT * Q * FLOAT32_BYTES, transient=BT * Q * FLOAT32_BYTES)))
        linear(3, "self_attn.o_proj")
        block.append((4, Op(f"{layer}.residual 1", data=BT * D * FLOAT32_BYTES)))
        block.append((5, Op(f"{layer}.post_attention_layernorm", data=BT * D * FLOAT32_BYTES, extra=norm_extra,
                            grad=norm_w, transient=norm_tmp, returns=BT * D * FLOAT32_BYTES + norm_w)))
        linear(6, "mlp.gate_proj")
        linear(6, "mlp.up_proj")
        # SwiGLU: output; the twin's closure keeps σ(gate) and SiLU(gate) (2 × BT·F); backward: d gate, d up
        # (and the twin's temporaries)
        block.append((7, Op(f"{layer}.swiglu", data=BT * F * FLOAT32_BYTES, extra=0 if fast else 2 * BT * F * FLOAT32_BYTES,
                            transient=(2 if fast else 4) * BT * F * FLOAT32_BYTES, returns=2 * BT * F * FLOAT32_BYTES)))
        linear(8, "mlp.down_proj")
        block.append((9, Op(f"{layer}.residual 2", data=BT * D * FLOAT32_BYTES)))
        if layer == 0 and not full:
            block = _first_lora_block(block, ranks, lin)
            if not any(stage <= 3 for stage, op in block if op.data):
                ops[0] = Op("embed_tokens")  # the embedding output feeds no node: freed after the first block
        ops += [op for _, op in block]
    ops.append(Op("norm", data=BT * D * FLOAT32_BYTES, extra=BT * FLOAT32_BYTES + (0 if fast else BT * D * FLOAT32_BYTES),
                  grad=D * FLOAT32_BYTES if full else 0, transient=(1 if fast else 3) * BT * D * FLOAT32_BYTES,
                  returns=BT * D * FLOAT32_BYTES + (D * FLOAT32_BYTES if full else 0)))
    head_grad = V * D * FLOAT32_BYTES if (full and not spec.tie_word_embeddings) else 0
    ops.append(Op("lm_head", data=BT * V * FLOAT32_BYTES, grad=head_grad, transient=BT * D * FLOAT32_BYTES + 2 * head_grad,
                  returns=BT * D * FLOAT32_BYTES + head_grad))
    # cross-entropy keeps log-sum-exp and the losses (2 × N float32; the twin: log-sum-exp, the kept rows as
    # int64 and the mask); its backward makes the softmax (B·T·V) (the twin through one more temporary)
    ops.append(Op("cross_entropy", extra=BT * 2 * FLOAT32_BYTES if fast else BT * (FLOAT32_BYTES + 8 + 1),
                  transient=(1 if fast else 2) * BT * V * FLOAT32_BYTES, returns=BT * V * FLOAT32_BYTES))
    return ops


def _first_lora_block(block: list[tuple[int, Op]], ranks: dict, lin: dict) -> list[tuple[int, Op]]:
    """The first block of a LoRA model: its input (a frozen embedding) needs no gradient, so nothing is recorded
    before the first adapted linear. Of the earlier tensors only the parents of later nodes stay: the input of
    that linear (its lora_A reads it) and the residual stream it will be added to."""
    stage_of = {1: ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), 3: ("self_attn.o_proj",),
                6: ("mlp.gate_proj", "mlp.up_proj"), 8: ("mlp.down_proj",)}
    first = min((st for st, names in stage_of.items() if any(n in ranks for n in names)), default=None)
    if first is None:
        return [(st, Op(op.name)) for st, op in block]
    input_stage = {1: 0, 3: 2, 6: 5, 8: 7}[first]  # the op whose output the first adapted linear reads
    out = []
    for st, op in block:
        if st >= first:
            out.append((st, op))
        elif st == input_stage and (st != 2 or op.name.endswith("H·Dh)")):
            out.append((st, Op(op.name, data=op.data)))  # kept as a parent, not a node
        elif st == 4 and first > 4:
            out.append((st, Op(op.name, data=op.data)))  # residual stream, a parent of the second residual
        else:
            out.append((st, Op(op.name)))
    return out


def trainable_params(spec: ArchSpec, method: str, plan: LoraPlan | None) -> tuple[int, int]:
    """(number of trainable parameters, size of the largest trainable tensor)."""
    if method == "full":
        sizes = [m.in_features * m.out_features for m in spec.block_linears]
        sizes += [spec.vocab_size * spec.hidden_size]
        return spec.total, max(sizes)
    sizes = [a.r * max(a.in_features, a.out_features) for a in plan.adapted]
    return plan.trainable, max(sizes)


def step_peak(spec: ArchSpec, method: str, plan: LoraPlan | None, B: int, T: int, fast: bool | None = None) -> dict:
    """The peak bytes one training step allocates above the resident state, and where it happens.

    Returns ``{"peak", "phase", "activations", "saved_for_backward", "gradients", "temporaries"}`` with the last
    four summing to ``peak``.
    """
    fast = fast_paths_enabled() if fast is None else fast
    ops = forward_ops(spec, method, plan, B, T, fast)
    data = sum(o.data for o in ops)
    extra = sum(o.extra for o in ops)
    residual_grad = B * T * spec.hidden_size * FLOAT32_BYTES  # the residual stream's gradient waits in the dict
    best = {"peak": -1}
    grads = 0
    stale = 0  # the previous node's returned gradients: still bound while the next node runs
    for o in reversed(ops):
        at = {"activations": data, "saved_for_backward": extra, "gradients": grads,
              "temporaries": o.transient + stale + residual_grad}
        total = sum(at.values())
        if total > best["peak"]:
            best = {"peak": total, "phase": f"backward of {o.name}", **at}
        extra -= o.extra
        grads += o.grad
        if o.returns:
            stale = o.returns
    n_train, largest = trainable_params(spec, method, plan)
    # AdamW: the twin makes √v and the update (two parameter-sized temporaries), the fused kernel none
    at = {"activations": 0, "saved_for_backward": 0, "gradients": n_train * FLOAT32_BYTES,
          "temporaries": 0 if fast else 2 * largest * FLOAT32_BYTES}
    if sum(at.values()) > best["peak"]:
        best = {"peak": sum(at.values()), "phase": "optimizer step", **at}
    return best
