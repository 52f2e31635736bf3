"""What the model-reading commands (``generate``, ``chat``, ``eval``) share: the ``--model``/``--adapter`` flags,
turning a ``--model`` value into a folder, and loading model + adapter + tokenizer with early, one-line errors.

Every ``--model`` value goes through :func:`model_folder`, and only there.
"""

from __future__ import annotations

from pathlib import Path

MODEL_HELP = "model folder (config.json + model.safetensors, tokenizer files) or a known model's name"


def add_model_arguments(p) -> None:
    p.add_argument("--model", required=True, metavar="M", help=MODEL_HELP)
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a PEFT LoRA adapter folder to apply (adapter_config.json + adapter_model.safetensors)")


def model_folder(spec) -> Path:
    """The folder of a ``--model`` value: a model folder as given, or a known model's name, fetched on first use
    (:func:`lora_ref.files.models.resolve_model`)."""
    from lora_ref.files.models import resolve_model

    return Path(resolve_model(spec))


_LINEAR = {  # module name within a layer -> (in, out) from the config
    "self_attn.q_proj": lambda c: (c.hidden_size, c.num_attention_heads * c.head_dim),
    "self_attn.k_proj": lambda c: (c.hidden_size, c.num_key_value_heads * c.head_dim),
    "self_attn.v_proj": lambda c: (c.hidden_size, c.num_key_value_heads * c.head_dim),
    "self_attn.o_proj": lambda c: (c.num_attention_heads * c.head_dim, c.hidden_size),
    "mlp.gate_proj": lambda c: (c.hidden_size, c.intermediate_size),
    "mlp.up_proj": lambda c: (c.hidden_size, c.intermediate_size),
    "mlp.down_proj": lambda c: (c.intermediate_size, c.hidden_size),
}


def linear_shape(config, module: str) -> tuple[int, int] | None:
    """(in_features, out_features) of the linear layer ``module`` (a transformers name) of a Llama with
    ``config``, or ``None`` if the model has no such layer."""
    if module == "lm_head":
        return config.hidden_size, config.vocab_size
    parts = module.split(".")
    if len(parts) != 5 or parts[:2] != ["model", "layers"] or not parts[2].isdigit():
        return None
    if int(parts[2]) >= config.num_hidden_layers:
        return None
    rule = _LINEAR.get(".".join(parts[3:]))
    return None if rule is None else rule(config)


def check_adapter_fits(config, adapter_dir) -> None:
    """Refuse an adapter trained for another model, from the config and the adapter's file alone.

    Reads only ``adapter_config.json`` and ``adapter_model.safetensors`` (small), and compares every ``lora_A``
    (r, in) and ``lora_B`` (out, r) with the layer shapes ``config`` implies, so a mismatch is reported before
    the base checkpoint is read. :func:`lora_ref.adapters.peft_files.load_adapter` checks everything again on the model.
    """
    from lora_ref.adapters.peft_files import PREFIX, WEIGHTS_NAME, _read_weights, read_adapter_config

    adapter_dir = Path(adapter_dir)
    read_adapter_config(adapter_dir)  # a missing or corrupt config fails here, naming the file
    tensors = _read_weights(adapter_dir)
    for key, a in sorted(tensors.items()):
        for part, axis in ((".lora_A.weight", 1), (".lora_B.weight", 0)):
            if not (key.startswith(PREFIX) and key.endswith(part)):
                continue
            module = key[len(PREFIX):-len(part)]
            shape = linear_shape(config, module)
            if shape is None:
                raise ValueError(f"adapter {adapter_dir} is for another model: it adapts {module}, which this model "
                                 f"({config.num_hidden_layers} layers) does not have")
            want = shape[0] if axis == 1 else shape[1]
            if a.ndim != 2 or a.shape[axis] != want:
                raise ValueError(f"adapter {adapter_dir} is for another model: {key} in {WEIGHTS_NAME} has shape "
                                 f"{tuple(a.shape)}, but this model's {module} is {shape[0]} -> {shape[1]}")


def load_model(folder: Path, adapter=None, *, command: str):
    """(model, tokenizer) of a model folder, with ``adapter`` applied (frozen, active) when given.

    The adapter is checked against the folder's ``config.json`` before the weights are read. A folder without
    ``tokenizer.json`` uses the byte tokenizer, which needs a model with vocabulary 256.
    """
    from lora_ref.files.outputs import require_dir
    from lora_ref.modeling.llama import CONFIG_FILE, Llama, LlamaConfig
    from lora_ref.modeling.tokenizer import ByteTokenizer, load_tokenizer

    folder = require_dir(folder, "checkpoint folder")
    config = LlamaConfig.from_json_file(folder / CONFIG_FILE)
    tokenizer = load_tokenizer(folder)
    if isinstance(tokenizer, ByteTokenizer) and config.vocab_size != ByteTokenizer.vocab_size:
        raise ValueError(f"{folder}: vocab_size is {config.vocab_size}, but {command} uses the byte-level tokenizer "
                         f"(vocabulary 256) for a folder without tokenizer.json")
    if adapter is not None:
        require_dir(adapter, "adapter folder")
        check_adapter_fits(config, adapter)
    model = Llama.from_pretrained(folder)
    if adapter is not None:
        from lora_ref.adapters.peft_files import load_adapter

        load_adapter(model, adapter)
    model.eval()
    return model, tokenizer
