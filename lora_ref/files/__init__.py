"""Files from outside lora_ref: GGUF import and the registry of known pretrained models."""
