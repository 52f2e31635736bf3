"""Reverse-mode automatic differentiation over NumPy arrays: the Tensor, primitives with one local rule each, fused composites, numerical gradient checks (chapter 1).

Importing the package imports :mod:`lora_ref.autograd.ops`, which installs the primitives as Tensor's operators, so a
Tensor is complete however it was imported (``lora_ref.autograd.tensor`` itself imports nothing from lora_ref).
"""

from lora_ref.autograd import ops  # noqa: F401  (installs Tensor's operators)
