"""LoRA adapters: configuration and target matching, the LoRA layer and its merge arithmetic, QLoRA over 4-bit bases, PEFT adapter files (chapters 3 and 7)."""
