"""One bitsandbytes ``Linear4bit`` (NF4, double quantization, blocksize 64) inside a torch module, as transformers
loads a 4-bit layer, for the PEFT comparisons of tests/interop (imported by module name: pytest puts this folder on
``sys.path``)."""

import numpy as np


def bnb_net(W: np.ndarray, b: np.ndarray | None):
    """A torch module whose ``proj`` is bitsandbytes' NF4 layer quantized from ``W`` (out, in) with bias ``b``;
    ``is_loaded_in_4bit`` is set as transformers sets it, so PEFT wraps the layer in its bnb ``Linear4bit``."""
    import bitsandbytes as bnb
    import torch

    out_f, in_f = W.shape

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = bnb.nn.Linear4bit(in_f, out_f, bias=b is not None, compute_dtype=torch.float32,
                                          compress_statistics=True, quant_type="nf4")
            self.proj.weight = bnb.nn.Params4bit(torch.from_numpy(W.copy()), requires_grad=False,
                                                 compress_statistics=True, quant_type="nf4", blocksize=64)
            if b is not None:
                self.proj.bias = torch.nn.Parameter(torch.from_numpy(b.copy()), requires_grad=False)

        def forward(self, x):
            return self.proj(x)

    net = Net().to("cpu")  # quantizes the weight
    net.is_loaded_in_4bit = True
    return net
