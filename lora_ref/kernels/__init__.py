"""Compiled kernels (Numba) that take and return arrays, and the switch that turns the fast paths on. Never imports the autograd (chapter 6)."""
