"""Small-row products at their bound on the CPU: oneDNN's matmul, and packed weights for a model only read.

References: oneDNN (the matmul primitive PyTorch ships as `torch.ops.mkldnn`); the roofline
model (Williams, Waterman and Patterson, CACM 2009). A sampling step multiplies few rows by
large weights; such a product should run at max(2 M K N / peak FLOP/s, bytes of W / bandwidth).
Measurements and the formulations tried: docs/benchmarks.md ("Small-row products", "Roofline").

    y = linear(x, weight, bias)     # = F.linear(x, weight, bias): oneDNN on fp32 CPU rows, M > 1
    pack_weights(model)             # its CPU nn.Linear layers become PackedLinear, each with a
    with packed_weights(model): ... #   copy of W in oneDNN's blocked layout; unpack_weights undoes it

oneDNN's op has no autograd formula, so it runs only where no gradient can flow (CPU tensors,
grad mode off or no input requiring grad, not under torch.compile); everything else is F.linear.
Packing swaps the class of each CPU fp32/bf16 nn.Linear in place (as torch.nn.utils.parametrize
does), so parameters and state-dict keys stay; a CUDA model is never touched. The copy records
its weight's storage and version: an in-place change (optimizer step, load_state_dict, a merge),
a cast or a move makes the layer multiply with the weight itself (a write through `weight.data`
is not seen). Copies live beside the model: state_dict, deepcopy and pickling never see them.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


def _onednn_may_run(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """True where oneDNN's op (no autograd formula) may stand in for F.linear: not under
    torch.compile, oneDNN on, CPU tensors, no gradient can flow."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if torch.compiler.is_compiling():
        return False  # torch.compile chooses its own kernels for F.linear
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    if any(t.device.type != "cpu" for t in tensors):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """True where oneDNN's fp32 matmul on the plain weight may stand in for F.linear: CPU, fp32,
    no autocast, more than one row, no gradient."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if any(t.dtype != torch.float32 for t in tensors) or torch.is_autocast_enabled("cpu"):
        return False  # F.linear would run in the autocast dtype
    if x.numel() <= x.shape[-1]:
        return False  # one row: F.linear (MKL's matrix-vector product; docs/benchmarks.md)
    return _onednn_may_run(x, weight, bias)


def _product_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would multiply x in on the CPU: the autocast dtype, else x's."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b for x [..., K], weight [N, K], bias [N] or None -> [..., N] (F.linear's
    contract); oneDNN's matmul where `_onednn_applies`, else F.linear."""
    if _onednn_applies(x, weight, bias):
        # y = x W^T + b, oneDNN reading W [N, K] as it is stored (no repacking)   [..., N]
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


PACK_ROWS = 32  # oneDNN's layout hint for the packed copy (docs/benchmarks.md)

# layer -> (its class before packing, its weight's storage, dtype, shape and version when packed, the packed copy)
_PACKED: "weakref.WeakKeyDictionary[nn.Linear, tuple]" = weakref.WeakKeyDictionary()


def _weight_state(weight: torch.Tensor) -> tuple:
    return weight.data_ptr(), weight.dtype, tuple(weight.shape), weight._version


class PackedLinear(nn.Linear):
    """nn.Linear (same parameters, same state-dict keys) whose product is oneDNN's with the packed
    copy of its weight while that copy is current, else `linear` (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # under torch.compile: F.linear, and no look at the copy (dynamo cannot trace data_ptr)
        packed = None if torch.compiler.is_compiling() else self.packed_weight()
        if packed is not None and _product_dtype(x) == packed.dtype and _onednn_may_run(x, self.weight, self.bias):
            bias = None if self.bias is None else self.bias.to(packed.dtype)
            # y = x W^T + b with W in oneDNN's blocked layout   [..., N]
            return torch.ops.mkldnn._linear_pointwise(x.to(packed.dtype), packed, bias, "none", [], "")
        return linear(x, self.weight, self.bias)

    def packed_weight(self) -> torch.Tensor | None:
        """The packed copy of this layer's weight, or None (none made, or the weight changed)."""
        entry = _PACKED.get(self)
        return entry[2] if entry is not None and entry[1] == _weight_state(self.weight) else None


def _packable(module: nn.Module) -> bool:
    """A plain (or packed) nn.Linear whose weight oneDNN can pack: CPU, fp32 or bf16, with a
    version counter (not an inference-mode tensor)."""
    return (type(module) in (nn.Linear, PackedLinear) and module.weight.device.type == "cpu"
            and module.weight.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available() and not module.weight.is_inference())


@torch.no_grad()
def pack_weights(model: nn.Module) -> int:
    """Make every packable nn.Linear of `model` a PackedLinear holding a packed copy of its weight
    (made again where the weight changed since); returns the bytes the copies hold."""
    held = 0
    for module in filter(_packable, model.modules()):
        if not isinstance(module, PackedLinear) or module.packed_weight() is None:
            original = _PACKED[module][0] if module in _PACKED else type(module)
            weight = module.weight.detach()
            copy = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS)
            _PACKED[module] = (original, _weight_state(weight), copy)
            module.__class__ = PackedLinear
        held += module.weight.numel() * module.weight.element_size()
    return held


def unpack_weights(model: nn.Module) -> None:
    """Drop the packed copies of `model`'s layers and give each its class from before packing."""
    for module in model.modules():
        entry = _PACKED.pop(module, None)
        if entry is not None:
            module.__class__ = entry[0]


@contextmanager
def packed_weights(model: nn.Module):
    """`pack_weights(model)` on entry, `unpack_weights(model)` on exit."""
    pack_weights(model)
    try:
        yield model
    finally:
        unpack_weights(model)
