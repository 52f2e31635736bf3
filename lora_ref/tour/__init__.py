"""The tour: the sections of `lora-ref tour`."""
