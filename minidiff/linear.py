"""Small-row products at their bound: y = x W^T + b through oneDNN's matmul on the CPU.

References: oneDNN (the matmul primitive PyTorch ships as `torch.ops.mkldnn`); the roofline
model (Williams, Waterman and Patterson, CACM 2009) for the bound. Measurements and the
formulations tried: docs/benchmarks.md ("Roofline"), `python benchmarks/roofline.py --products`.

    y = linear(x, weight, bias)     # = F.linear(x, weight, bias), up to fp32 rounding
    Linear(768, 2304)               # an nn.Linear whose forward is `linear`

A sampling step multiplies few rows (M <= 32: one block of one or a few sequences) by large
weights, the 256k-token decoder [V, H] above all. Such a product should run at its bound,
max(2 M K N / peak FLOP/s, bytes of W / read bandwidth). In fp32 on the CPU, PyTorch's F.linear
calls MKL's sgemm, which on the AMD EPYC (Zen 4) this was measured on takes 2.8-4.6x its bound
at M = 8 and 1.5-2.1x at M = 32 ((W @ x^T)^T, a pre-transposed weight and vocabulary chunks do
no better); oneDNN's matmul on the same plain [N, K] weight takes 2.6-3.7x and 1.2-1.6x (one
product, the MLP's Wo at M = 8, was 8% slower than F.linear), and on the decoder from M = 32 to
512 it was 1.1-1.6x faster. A single row (M = 1) stays with F.linear: MKL's
matrix-vector product runs on one thread, while oneDNN spreads it over all of them, which on a
busy 2-core machine made the layers' small products up to 10x slower.

oneDNN's op has no autograd formula, so `linear` uses it only where no gradient can flow: fp32
CPU tensors, no autocast, and grad mode off or no input requiring grad (sampling, evaluation,
the inside of an autograd.Function's forward such as chunked_loss). Everything else is
F.linear, unchanged. `torch.backends.mkldnn.enabled = False` turns the oneDNN path off.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """True where oneDNN's fp32 matmul may stand in for F.linear: CPU, fp32, no gradient."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if torch.compiler.is_compiling():
        return False  # torch.compile chooses its own kernels for F.linear
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return False
    if torch.is_autocast_enabled("cpu"):
        return False  # F.linear would run in the autocast dtype
    if x.numel() <= x.shape[-1]:
        return False  # one row: MKL's matrix-vector product, on one thread (see the module docstring)
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b for x [..., K], weight [N, K], bias [N] or None -> [..., N] (F.linear's
    contract); oneDNN's matmul where `_onednn_applies`, else F.linear."""
    if _onednn_applies(x, weight, bias):
        # y = x W^T + b, oneDNN reading W [N, K] as it is stored (no repacking)   [..., N]
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state-dict keys) whose product is `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
