"""Reverse-mode automatic differentiation over NumPy arrays: the Tensor, primitives with one local rule each, fused composites, numerical gradient checks (chapter 1)."""
