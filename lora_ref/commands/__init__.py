"""One module per ``lora-ref`` command; see ``lora_ref.cli``."""
