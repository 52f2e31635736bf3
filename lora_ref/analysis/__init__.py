"""Analysis: parameter counts, the memory model and our NumPy memory profile, cached experiment runs, the real-LLM experiment (chapters 4, 9 to 12)."""
