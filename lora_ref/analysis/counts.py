"""Parameter counts of real architectures, and how many of them LoRA trains.

An architecture is described by an :class:`ArchSpec`: the linear layers of one transformer block (the same in every
block), the other parameters of a block (norms), and the parameters outside the blocks (embeddings, positions, the
final norm, the output head). Specs come from a Hugging Face ``config.json`` (:func:`spec_from_config`: llama,
mistral, gpt2, bert, roberta, deberta-v2) or from a named preset (:func:`spec_from_preset`, :data:`PRESETS`),
including GPT-3 175B as its paper describes it.

LoRA on a linear layer W (out, in) adds ``lora_A`` (R, in) and ``lora_B`` (out, R): R·(in + out) trainable parameters
(Hu et al. 2021, §4.1). Adapting every matched module in every block gives

    |Θ| = Σ_blocks Σ_targets r_t · (in_t + out_t)                                   (LoRA §5.1: 2·L̂·d·r for d×d)

Targets are named like PEFT's ``target_modules``: the module's own name (``q_proj``, ``c_attn``, ``query``,
``attention.output.dense``; a suffix on whole name components) or one of the Llama-style *roles* ``q_proj``, ``k_proj``,
``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj`` that every family maps onto its own modules; or
``"all-linear"``, which is every linear layer except the output head (PEFT's ``_maybe_include_all_linear_layers`` in ``peft/tuners/tuners_utils.py``).

GPT-2's fused ``c_attn``
------------------------
GPT-2 computes q, k and v with one ``Conv1D`` of shape (in=D, out=3D) named ``c_attn``. PEFT can only adapt the whole
fused matrix: targeting ``c_attn`` gives r·(D + 3D) = 4rD per block. loralib (the LoRA paper's code) adapts parts of it
with ``MergedLinear(enable_lora=[True, False, True])``: one (R, D) A and one (D, R) B for each enabled part, i.e.
r·(D + D) = 2rD per part; for q and v together that is also 4rD. So ``c_attn`` and ``["q_proj", "v_proj"]`` give the
same count on GPT-2 (393,216 for GPT-2 medium at r = 4), while ``q_proj`` alone gives half of it and has no PEFT
equivalent. Here the roles ``q_proj``/``k_proj``/``v_proj`` on GPT-2 count loralib's parts.

Shapes use the glossary letters: D model width, H heads, K kv heads, R rank, V vocab; L blocks and F the MLP
width (``intermediate_size``) as in the papers.
Taught in ``notebooks/04_counts.ipynb``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class LinearSpec:
    """One linear layer: weight (out_features, in_features), optional bias (out_features,).

    ``name`` is the module path inside a block (e.g. ``self_attn.q_proj``) or in the model (``lm_head``);
    ``roles`` are the Llama-style names it carries: one for an ordinary projection, three for a fused qkv.
    """

    name: str
    in_features: int
    out_features: int
    bias: bool = False
    roles: tuple[str, ...] = ()

    @property
    def params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class ParamSpec:
    """A parameter that is not a linear weight (embedding table, norm scale or bias, convolution kernel)."""

    name: str
    shape: tuple[int, ...]
    kind: str = "other"  # "embedding", "norm", "position", "conv", "other"

    @property
    def params(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ArchSpec:
    """The parameter layout of a transformer, plus the sizes the memory model needs.

    Attributes
    ----------
    family : "llama" (also mistral), "gpt2", "gpt3", "bert" (bert/roberta), "deberta-v2".
    hidden_size D, num_layers L, num_heads H, num_kv_heads K, head_dim, intermediate_size F, vocab_size V.
    block_linears : the linear layers of one block (identical in every block).
    block_params : other parameters of one block (norms).
    linears : linear layers outside the blocks (``lm_head`` if untied, ``pooler.dense``).
    params : other parameters outside the blocks (embeddings, positions, final norm, ...).
    head : name of the output head (``lm_head``) or None for encoders; with tied embeddings the head exists as an
        operation (it produces the logits) but owns no parameters.
    tie_word_embeddings : whether the head reuses the token embedding.
    mlp : "swiglu" (three matrices) or "gelu" (two); norm : "rms" or "layer"; causal : decoder or encoder.
    """

    name: str
    family: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    mlp: str
    norm: str
    causal: bool
    block_linears: tuple[LinearSpec, ...]
    block_params: tuple[ParamSpec, ...]
    linears: tuple[LinearSpec, ...]
    params: tuple[ParamSpec, ...]
    head: str | None
    source: str = ""

    # -- totals -------------------------------------------------------------------------------------------------
    @property
    def block_total(self) -> int:
        """Parameters of one block."""
        return sum(m.params for m in self.block_linears) + sum(p.params for p in self.block_params)

    @property
    def total(self) -> int:
        """All parameters, each shared tensor counted once (like ``sum(p.numel() for p in model.parameters())``)."""
        return (self.num_layers * self.block_total + sum(m.params for m in self.linears)
                + sum(p.params for p in self.params))

    def all_linears(self) -> list[tuple[LinearSpec, int]]:
        """Every linear layer with how many times it occurs: (spec, L) for block linears, (spec, 1) for the rest."""
        return [(m, self.num_layers) for m in self.block_linears] + [(m, 1) for m in self.linears]

    @property
    def linear_weight_params(self) -> int:
        """Weights (not biases) of every linear layer except the head: what bitsandbytes quantizes to 4 bit."""
        return sum(m.in_features * m.out_features * n for m, n in self.all_linears() if m.name != self.head)

    def module_rows(self) -> list[dict]:
        """One row per parameter-owning module: name, shape of its weight, params each, occurrences, total."""
        rows = []
        for m, n in self.all_linears():
            rows.append({"module": m.name, "kind": "linear", "shape": [m.out_features, m.in_features],
                         "bias": m.bias, "params_each": m.params, "count": n, "params": m.params * n})
        for p in self.block_params:
            rows.append({"module": p.name, "kind": p.kind, "shape": list(p.shape), "bias": False,
                         "params_each": p.params, "count": self.num_layers, "params": p.params * self.num_layers})
        for p in self.params:
            rows.append({"module": p.name, "kind": p.kind, "shape": list(p.shape), "bias": False,
                         "params_each": p.params, "count": 1, "params": p.params})
        return rows


# ---------------------------------------------------------------------------------------------------------------
# Architectures, one builder per family. Names follow the transformers modules so that counts can be compared
# with PEFT's on the same model.
# ---------------------------------------------------------------------------------------------------------------

def _llama(name: str, D: int, L: int, H: int, K: int, head_dim: int, F: int, V: int, ctx: int, tied: bool,
           attention_bias: bool = False, mlp_bias: bool = False, source: str = "") -> ArchSpec:
    q, kv = H * head_dim, K * head_dim
    lin = (
        LinearSpec("self_attn.q_proj", D, q, attention_bias, ("q_proj",)),
        LinearSpec("self_attn.k_proj", D, kv, attention_bias, ("k_proj",)),
        LinearSpec("self_attn.v_proj", D, kv, attention_bias, ("v_proj",)),
        LinearSpec("self_attn.o_proj", q, D, attention_bias, ("o_proj",)),
        LinearSpec("mlp.gate_proj", D, F, mlp_bias, ("gate_proj",)),
        LinearSpec("mlp.up_proj", D, F, mlp_bias, ("up_proj",)),
        LinearSpec("mlp.down_proj", F, D, mlp_bias, ("down_proj",)),
    )
    norms = (ParamSpec("input_layernorm.weight", (D,), "norm"), ParamSpec("post_attention_layernorm.weight", (D,), "norm"))
    glob = [ParamSpec("embed_tokens.weight", (V, D), "embedding"), ParamSpec("norm.weight", (D,), "norm")]
    heads = () if tied else (LinearSpec("lm_head", D, V, False),)
    return ArchSpec(name, "llama", D, L, H, K, head_dim, F, V, ctx, tied, "swiglu", "rms", True,
                    lin, norms, heads, tuple(glob), "lm_head", source)


def _gpt(name: str, family: str, D: int, L: int, H: int, F: int, V: int, ctx: int, tied: bool = True,
         source: str = "") -> ArchSpec:
    """GPT-2 (fused ``c_attn``) or GPT-3 as its paper describes it (the same block, q/k/v/o as separate D×D)."""
    if family == "gpt2":
        attn = (LinearSpec("attn.c_attn", D, 3 * D, True, ("q_proj", "k_proj", "v_proj")),
                LinearSpec("attn.c_proj", D, D, True, ("o_proj",)))
        mlp = (LinearSpec("mlp.c_fc", D, F, True, ("up_proj",)), LinearSpec("mlp.c_proj", F, D, True, ("down_proj",)))
    else:
        attn = tuple(LinearSpec(f"attn.{r}", D, D, True, (r,)) for r in ("q_proj", "k_proj", "v_proj", "o_proj"))
        mlp = (LinearSpec("mlp.fc", D, F, True, ("up_proj",)), LinearSpec("mlp.proj", F, D, True, ("down_proj",)))
    norms = tuple(ParamSpec(f"{n}.{w}", (D,), "norm") for n in ("ln_1", "ln_2") for w in ("weight", "bias"))
    glob = (ParamSpec("wte.weight", (V, D), "embedding"), ParamSpec("wpe.weight", (ctx, D), "position"),
            ParamSpec("ln_f.weight", (D,), "norm"), ParamSpec("ln_f.bias", (D,), "norm"))
    heads = () if tied else (LinearSpec("lm_head", D, V, False),)
    return ArchSpec(name, family, D, L, H, H, D // H, F, V, ctx, tied, "gelu", "layer", True,
                    attn + mlp, norms, heads, glob, "lm_head", source)


def _encoder_block(D: int, F: int, q_names: tuple[str, str, str]) -> tuple[tuple[LinearSpec, ...], tuple[ParamSpec, ...]]:
    lin = (
        LinearSpec(f"attention.self.{q_names[0]}", D, D, True, ("q_proj",)),
        LinearSpec(f"attention.self.{q_names[1]}", D, D, True, ("k_proj",)),
        LinearSpec(f"attention.self.{q_names[2]}", D, D, True, ("v_proj",)),
        LinearSpec("attention.output.dense", D, D, True, ("o_proj",)),
        LinearSpec("intermediate.dense", D, F, True, ("up_proj",)),
        LinearSpec("output.dense", F, D, True, ("down_proj",)),
    )
    norms = tuple(ParamSpec(f"{n}.LayerNorm.{w}", (D,), "norm") for n in ("attention.output", "output")
                  for w in ("weight", "bias"))
    return lin, norms


def _bert(name: str, D: int, L: int, H: int, F: int, V: int, ctx: int, type_vocab: int, pooler: bool = True,
          source: str = "") -> ArchSpec:
    """BERT / RoBERTa encoder (``BertModel``/``RobertaModel``: no task head; the pooler is included by default)."""
    lin, norms = _encoder_block(D, F, ("query", "key", "value"))
    glob = [ParamSpec("embeddings.word_embeddings.weight", (V, D), "embedding"),
            ParamSpec("embeddings.position_embeddings.weight", (ctx, D), "position")]
    if type_vocab:
        glob.append(ParamSpec("embeddings.token_type_embeddings.weight", (type_vocab, D), "embedding"))
    glob += [ParamSpec("embeddings.LayerNorm.weight", (D,), "norm"), ParamSpec("embeddings.LayerNorm.bias", (D,), "norm")]
    heads = (LinearSpec("pooler.dense", D, D, True),) if pooler else ()
    return ArchSpec(name, "bert", D, L, H, H, D // H, F, V, ctx, True, "gelu", "layer", False,
                    lin, norms, heads, tuple(glob), None, source)


def _deberta_v2(name: str, cfg: dict, source: str = "") -> ArchSpec:
    """DeBERTa-v2/v3 encoder (``DebertaV2Model``), following transformers' ``modeling_deberta_v2``."""
    D, L, H, F, V = (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
                     cfg["intermediate_size"], cfg["vocab_size"])
    ctx = cfg.get("max_position_embeddings", 512)
    lin, norms = _encoder_block(D, F, ("query_proj", "key_proj", "value_proj"))
    pos_att = cfg.get("pos_att_type") or []
    if isinstance(pos_att, str):
        pos_att = [x.strip() for x in pos_att.lower().split("|") if x.strip()]
    if cfg.get("relative_attention", False) and not cfg.get("share_att_key", False):
        extra = []
        if "c2p" in pos_att:
            extra.append(LinearSpec("attention.self.pos_key_proj", D, D, True))
        if "p2c" in pos_att:
            extra.append(LinearSpec("attention.self.pos_query_proj", D, D, True))
        lin = lin + tuple(extra)
    emb = cfg.get("embedding_size", D) or D
    glob = [ParamSpec("embeddings.word_embeddings.weight", (V, emb), "embedding")]
    if cfg.get("position_biased_input", True):
        glob.append(ParamSpec("embeddings.position_embeddings.weight", (ctx, emb), "position"))
    if cfg.get("type_vocab_size", 0) > 0:
        glob.append(ParamSpec("embeddings.token_type_embeddings.weight", (cfg["type_vocab_size"], emb), "embedding"))
    linears: list[LinearSpec] = []
    if emb != D:
        linears.append(LinearSpec("embeddings.embed_proj", emb, D, False))
    glob += [ParamSpec("embeddings.LayerNorm.weight", (D,), "norm"), ParamSpec("embeddings.LayerNorm.bias", (D,), "norm")]
    if cfg.get("relative_attention", False):
        max_rel = cfg.get("max_relative_positions", -1)
        if max_rel < 1:
            max_rel = ctx
        buckets = cfg.get("position_buckets", -1)
        size = buckets if buckets > 0 else max_rel
        glob.append(ParamSpec("encoder.rel_embeddings.weight", (2 * size, D), "position"))
        if "layer_norm" in [x.strip() for x in str(cfg.get("norm_rel_ebd", "none")).lower().split("|")]:
            glob += [ParamSpec("encoder.LayerNorm.weight", (D,), "norm"), ParamSpec("encoder.LayerNorm.bias", (D,), "norm")]
    k = cfg.get("conv_kernel_size", 0)
    if k > 0:
        glob += [ParamSpec("encoder.conv.conv.weight", (D, D, k), "conv"), ParamSpec("encoder.conv.conv.bias", (D,), "conv"),
                 ParamSpec("encoder.conv.LayerNorm.weight", (D,), "norm"), ParamSpec("encoder.conv.LayerNorm.bias", (D,), "norm")]
    return ArchSpec(name, "deberta-v2", D, L, H, H, D // H, F, V, ctx, True, "gelu", "layer", False,
                    lin, norms, tuple(linears), tuple(glob), None, source)


# ---------------------------------------------------------------------------------------------------------------
# config.json -> ArchSpec
# ---------------------------------------------------------------------------------------------------------------

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "gpt2", "gpt3", "bert", "roberta", "xlm-roberta", "deberta-v2")


def spec_from_config(cfg: dict, name: str | None = None) -> ArchSpec:
    """Build an :class:`ArchSpec` from a Hugging Face ``config.json`` dictionary.

    ``model_type`` selects the family: llama and mistral (SwiGLU decoders with grouped-query attention), gpt2,
    bert / roberta / xlm-roberta (encoders without a task head), deberta-v2 (also v3). ``gpt3`` is accepted with
    GPT-2's keys (``n_embd``, ``n_layer``, ``n_head``, ``n_positions``) for the GPT-3 preset. Missing keys take the
    transformers defaults of that family. Raises ``ValueError`` for another model_type or a missing size.
    """
    mt = cfg.get("model_type")
    name = name or cfg.get("_name_or_path") or str(mt)
    src = cfg.get("_source", "")
    try:
        if mt in ("llama", "mistral"):
            D, H = cfg["hidden_size"], cfg["num_attention_heads"]
            K = cfg.get("num_key_value_heads") or H
            head_dim = cfg.get("head_dim") or D // H
            return _llama(name, D, cfg["num_hidden_layers"], H, K, head_dim, cfg["intermediate_size"],
                          cfg["vocab_size"], cfg.get("max_position_embeddings", 2048),
                          bool(cfg.get("tie_word_embeddings", False)), bool(cfg.get("attention_bias", False)),
                          bool(cfg.get("mlp_bias", False)), src)
        if mt in ("gpt2", "gpt3"):
            D = cfg.get("n_embd", 768)
            F = cfg.get("n_inner") or 4 * D
            return _gpt(name, mt, D, cfg.get("n_layer", 12), cfg.get("n_head", 12), F, cfg.get("vocab_size", 50257),
                        cfg.get("n_positions", 1024), bool(cfg.get("tie_word_embeddings", True)), src)
        if mt in ("bert", "roberta", "xlm-roberta"):
            return _bert(name, cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
                         cfg["intermediate_size"], cfg["vocab_size"], cfg.get("max_position_embeddings", 512),
                         cfg.get("type_vocab_size", 2), bool(cfg.get("add_pooling_layer", True)), src)
        if mt == "deberta-v2":
            return _deberta_v2(name, cfg, src)
    except KeyError as e:
        raise ValueError(f"config for {name!r} (model_type {mt!r}) has no {e.args[0]!r}") from None
    raise ValueError(f"unsupported model_type {mt!r} in config {name!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")


def load_config(path: str | os.PathLike) -> dict:
    """Read a ``config.json`` (a file, or a folder holding one) as a dict; ``ValueError`` naming the file if bad."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        cfg = json.loads(p.read_text())
    except FileNotFoundError:
        raise ValueError(f"no such config file: {p}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{p} does not hold a JSON object")
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# Presets: HF config.json contents (the keys that matter), with where each came from (the model's config.json on the Hugging Face Hub, named per preset).
# ---------------------------------------------------------------------------------------------------------------

PRESETS: dict[str, dict] = {
    "gpt3-175b": {"model_type": "gpt3", "n_embd": 12288, "n_layer": 96, "n_head": 96, "n_positions": 2048,
                  "vocab_size": 50257, "tie_word_embeddings": True,
                  "_source": "GPT-3 paper Table 2.1 (d=12288, 96 layers, 96 heads of 128, ctx 2048); d_ffn = 4d per the "
                             "LoRA paper; GPT-2's BPE vocabulary and block with biases, tied embeddings"},
    "roberta-base": {"model_type": "roberta", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                     "intermediate_size": 3072, "vocab_size": 50265, "max_position_embeddings": 514,
                     "type_vocab_size": 1, "_source": "FacebookAI/roberta-base config.json (RobertaModel with pooler)"},
    "roberta-large": {"model_type": "roberta", "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                      "intermediate_size": 4096, "vocab_size": 50265, "max_position_embeddings": 514,
                      "type_vocab_size": 1, "_source": "FacebookAI/roberta-large config.json (RobertaModel with pooler)"},
    "deberta-v2-xxlarge": {"model_type": "deberta-v2", "hidden_size": 1536, "num_hidden_layers": 48,
                           "num_attention_heads": 24, "intermediate_size": 6144, "vocab_size": 128100,
                           "max_position_embeddings": 512, "relative_attention": True, "position_buckets": 256,
                           "max_relative_positions": -1, "norm_rel_ebd": "layer_norm", "share_att_key": True,
                           "pos_att_type": "p2c|c2p", "conv_kernel_size": 3, "position_biased_input": False,
                           "type_vocab_size": 0,
                           "_source": "microsoft/deberta-v2-xxlarge config.json (DebertaV2Model)"},
    "gpt2": {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024,
             "vocab_size": 50257, "_source": "openai-community/gpt2 config.json"},
    "gpt2-medium": {"model_type": "gpt2", "n_embd": 1024, "n_layer": 24, "n_head": 16, "n_positions": 1024,
                    "vocab_size": 50257, "_source": "openai-community/gpt2-medium config.json"},
    "gpt2-large": {"model_type": "gpt2", "n_embd": 1280, "n_layer": 36, "n_head": 20, "n_positions": 1024,
                   "vocab_size": 50257, "_source": "openai-community/gpt2-large config.json"},
    "llama-3-8b": {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
                   "max_position_embeddings": 8192, "tie_word_embeddings": False,
                   "_source": "meta-llama/Meta-Llama-3-8B config.json"},
    "llama-3-70b": {"model_type": "llama", "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
                    "num_key_value_heads": 8, "intermediate_size": 28672, "vocab_size": 128256,
                    "max_position_embeddings": 8192, "tie_word_embeddings": False,
                    "_source": "meta-llama/Meta-Llama-3-70B config.json"},
    "mistral-7b": {"model_type": "mistral", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 32000,
                   "max_position_embeddings": 32768, "tie_word_embeddings": False,
                   "_source": "mistralai/Mistral-7B-v0.1 config.json"},
}


def spec_from_preset(name: str) -> ArchSpec:
    """The :class:`ArchSpec` of a preset; ``ValueError`` listing the known presets for an unknown name."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)} "
                         f"(or give the path of a config.json)")
    return spec_from_config(PRESETS[name], name=name)


def resolve_model(model: str) -> ArchSpec:
    """A preset name, or the path of a config.json (or of a folder holding one)."""
    if model in PRESETS:
        return spec_from_preset(model)
    if model.endswith(".json") or os.sep in model or Path(model).is_dir():
        return spec_from_config(load_config(model), name=model)
    return spec_from_preset(model)  # raises with the list of known presets


# ---------------------------------------------------------------------------------------------------------------
# LoRA trainable parameters
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Adapted:
    """One adapted (part of a) linear layer: A (R, in), B (out, R) with R = ``r``, in ``count`` places."""

    module: str
    part: str | None  # the role of a fused module's part (loralib MergedLinear), else None
    in_features: int
    out_features: int
    r: int
    count: int

    @property
    def params(self) -> int:
        return self.r * (self.in_features + self.out_features) * self.count


@dataclass(frozen=True)
class LoraPlan:
    """Which modules a LoRA config adapts in an architecture, and with which rank."""

    spec: ArchSpec
    adapted: tuple[Adapted, ...] = field(default_factory=tuple)

    @property
    def trainable(self) -> int:
        return sum(a.params for a in self.adapted)

    def rows(self) -> list[dict]:
        return [{"module": a.module + (f"[{a.part}]" if a.part else ""), "r": a.r,
                 "lora_A": [a.r, a.in_features], "lora_B": [a.out_features, a.r], "count": a.count,
                 "params": a.params} for a in self.adapted]


def _check_rank(r) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")


def parse_targets(targets: str | list[str] | tuple[str, ...] | dict[str, int], r: int) -> dict[str, int]:
    """Targets as ``{name: rank}``: a list/str like ``"q_proj,v_proj=4"`` (entries without ``=R`` take ``r``)."""
    _check_rank(r)
    if isinstance(targets, dict):
        items = list(targets.items())
    else:
        if isinstance(targets, str):
            targets = [t for t in targets.split(",")]
        items = []
        for t in targets:
            t = t.strip()
            if not t:
                continue
            if "=" in t:
                n, _, v = t.partition("=")
                try:
                    items.append((n.strip(), int(v)))
                except ValueError:
                    raise ValueError(f"target {t!r}: the rank after '=' must be an integer") from None
            else:
                items.append((t, r))
    if not items:
        raise ValueError("no LoRA targets given")
    out: dict[str, int] = {}
    for n, v in items:
        if v < 1:
            raise ValueError(f"target {n!r}: rank must be >= 1, got {v}")
        if n in out and out[n] != v:
            raise ValueError(f"target {n!r} given twice with ranks {out[n]} and {v}")
        out[n] = v
    return out


def _matches(module_name: str, target: str) -> bool:
    """PEFT's list rule: the name equals the target or ends with '.' + target (whole components)."""
    return module_name == target or module_name.endswith("." + target)


def lora_plan(spec: ArchSpec, targets: str | list[str] | dict[str, int], r: int = 8) -> LoraPlan:
    """Resolve LoRA targets on an architecture.

    Parameters
    ----------
    targets : ``"all-linear"`` (every linear layer but the output head; the pooler of an encoder is included, as in
        PEFT on a model without a task head), or names with optional per-target ranks
        (``["q_proj", "v_proj"]``, ``"q_proj=1,v_proj=2"``, ``{"q_proj": 1}``). A name matches a module name
        (suffix on whole components) or a Llama-style role (see the module docstring).
    r : the rank of targets given without one.

    Raises ``ValueError`` if a target matches nothing (naming what exists) or if one module gets two ranks.
    """
    if isinstance(targets, str) and targets.strip().lower() == ALL_LINEAR:
        _check_rank(r)
        adapted = [Adapted(m.name, None, m.in_features, m.out_features, r, n)
                   for m, n in spec.all_linears() if m.name != spec.head]
        return LoraPlan(spec, tuple(adapted))
    ranks = parse_targets(targets, r)
    if ALL_LINEAR in (t.lower() for t in ranks):
        raise ValueError("'all-linear' cannot be combined with other targets")
    whole: dict[str, tuple[LinearSpec, int, int]] = {}   # module name -> (spec, count, r)
    parts: dict[str, dict[str, int]] = {}                # fused module name -> {role: r}
    used = {t: False for t in ranks}
    for m, n in spec.all_linears():
        for t, rt in ranks.items():
            by_name = _matches(m.name, t)
            by_role = t in m.roles and not by_name
            if not (by_name or by_role):
                continue
            used[t] = True
            if by_name or len(m.roles) == 1:
                if m.name in whole and whole[m.name][2] != rt:
                    raise ValueError(f"module {m.name!r} is matched with ranks {whole[m.name][2]} and {rt}")
                whole[m.name] = (m, n, rt)
            else:
                parts.setdefault(m.name, {})[t] = rt
    missing = [t for t, u in used.items() if not u]
    if missing:
        names = sorted({m.name for m, _ in spec.all_linears()} | {ro for m, _ in spec.all_linears() for ro in m.roles})
        raise ValueError(f"LoRA target(s) {missing} match no linear layer of {spec.name} ({spec.family}); "
                         f"available: {', '.join(names)}")
    adapted: list[Adapted] = []
    for m, n in spec.all_linears():
        if m.name in whole and m.name in parts:
            raise ValueError(f"module {m.name!r} is targeted both whole and by its parts {sorted(parts[m.name])}")
        if m.name in whole:
            adapted.append(Adapted(m.name, None, m.in_features, m.out_features, whole[m.name][2], n))
        elif m.name in parts:
            if len(set(parts[m.name].values())) > 1:
                raise ValueError(f"fused module {m.name!r}: loralib's MergedLinear has one rank for all parts, "
                                 f"got {parts[m.name]}")
            part_out = m.out_features // len(m.roles)
            for role in m.roles:
                if role in parts[m.name]:
                    adapted.append(Adapted(m.name, role, m.in_features, part_out, parts[m.name][role], n))
    return LoraPlan(spec, tuple(adapted))


def lora_trainable(spec: ArchSpec, targets: str | list[str] | dict[str, int], r: int = 8) -> int:
    """Number of LoRA parameters (``lora_A`` + ``lora_B``) for ``targets`` at rank ``r``; see :func:`lora_plan`."""
    return lora_plan(spec, targets, r).trainable


# ---------------------------------------------------------------------------------------------------------------
# The LoRA paper's trainable-parameter counts (Hu et al. 2021, arXiv 2106.09685 v2, Tables 2-4 and Appendix)
# ---------------------------------------------------------------------------------------------------------------

_LORA_PAPER_ROWS = (
    # model, table, targets, r, printed (millions, as printed), config source, note when not reproduced
    ("roberta-base", "T2", "q_proj,v_proj", 8, "0.3", "T9: r_q = r_v = 8", ""),
    ("roberta-large", "T2", "q_proj,v_proj", 8, "0.8", "T9: r_q = r_v = 8", ""),
    ("deberta-v2-xxlarge", "T2", "q_proj,v_proj", 8, "4.7", "T10: r = 8",
     "T10's r = 8 gives 2.4M; the 4.7M needs r = 16, which the repo's deberta_v2_xxlarge scripts use"),
    ("deberta-v2-xxlarge", "T2", "q_proj,v_proj", 16, "4.7", "repo examples/NLU: --lora_r 16", ""),
    ("gpt2-medium", "T3", "q_proj,v_proj", 4, "0.35", "T11: r_q = r_v = 4 (MergedLinear on c_attn)",
     "r = 4 on q and v gives 0.39M; 0.35M is the PreLayer baseline's budget (H.2: r = 4 'matches the parameter "
     "count of another baseline'); the released 1.5 MB checkpoint holds 393,216 float32 values"),
    ("gpt2-large", "T3", "q_proj,v_proj", 4, "0.77", "T11: r_q = r_v = 4",
     "r = 4 on q and v gives 0.74M; 0.77M is the PreLayer baseline's budget"),
    ("gpt3-175b", "T4", "q_proj,v_proj", 1, "4.7", "D.4: r_q = r_v = 1", ""),
    ("gpt3-175b", "T15", "v_proj", 2, "4.7", "T15: r_v = 2", ""),
    ("gpt3-175b", "T15", "q_proj,v_proj", 2, "9.4", "T15: r_q = r_v = 2", ""),
    ("gpt3-175b", "T15", "q_proj,k_proj,v_proj,o_proj", 1, "9.4", "T15: r = 1 on four types", ""),
    ("gpt3-175b", "T5", "q_proj", 8, "18", "T5: r = 8 on one type (the 18M budget)", ""),
    ("gpt3-175b", "T5", "q_proj,k_proj", 4, "18", "T5: r = 4 on two types", ""),
    ("gpt3-175b", "T5", "q_proj,k_proj,v_proj,o_proj", 2, "18", "T5: r = 2 on four types", ""),
    ("gpt3-175b", "T15", "q_proj,v_proj", 4, "18.8", "T15: r_q = r_v = 4", ""),
    ("gpt3-175b", "T4", "q_proj,v_proj", 8, "37.7", "D.4: r_q = r_v = 8", ""),
    ("gpt3-175b", "T15", "q_proj,k_proj,v_proj,o_proj", 4, "37.7", "T15: r = 4 on four types", ""),
    ("gpt3-175b", "T15", "q_proj,v_proj", 64, "301.9", "T15: r_q = r_v = 64", ""),
    ("gpt3-175b", "T15", "q_proj,k_proj,v_proj,o_proj", 64, "603.8", "T15: r = 64 on four types",
     "r = 64 on four types gives 603.98M; 603.8M is a misprint (a dropped digit)"),
)


def _printed_matches(count: int, printed: str) -> bool:
    """Does ``printed`` (millions, as the paper prints it) equal ``count`` rounded or truncated to its digits?"""
    digits = len(printed.partition(".")[2])
    value = count / 1e6
    scale = 10**digits
    return printed in (f"{value:.{digits}f}", f"{math.floor(value * scale) / scale:.{digits}f}")


def lora_paper_counts() -> list[dict]:
    """Each LoRA-paper count with the count its stated configuration gives and whether that matches."""
    rows = []
    for model, table, targets, r, printed, config, note in _LORA_PAPER_ROWS:
        count = lora_trainable(spec_from_preset(model), targets, r)
        ok = _printed_matches(count, printed)
        rows.append({"model": model, "table": table, "targets": targets, "r": r, "printed": printed + "M",
                     "config": config, "count": count, "reproduced": ok, "reason": "" if ok else note})
    return rows


LORA_PAPER_COUNTS = lora_paper_counts()
