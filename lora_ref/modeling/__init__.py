"""Modelling: neural-network modules, the Llama, its tokenizers and text generation (chapter 2)."""
