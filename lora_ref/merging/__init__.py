"""Combining adapters and models: task arithmetic, TIES, DARE, SVD and concatenation, as PEFT's add_weighted_adapter (chapter 8)."""
