"""Analysis: parameter counts, the memory model and our NumPy memory profile, cached experiment runs (chapters 4, 9 to 11)."""
