"""Analyses that run the library on a real pretrained model (the book's chapter on a real LLM)."""
