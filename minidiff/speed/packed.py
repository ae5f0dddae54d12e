"""Small-row products at their bound on the CPU: oneDNN's matmul, and packed weights for a model only read.

References: oneDNN (`torch.ops.mkldnn`'s matmul); the roofline model (Williams, Waterman and
Patterson, CACM 2009): a step's few rows times large weights should run at max(2 M K N / peak
FLOP/s, bytes of W / bandwidth). Measurements: docs/benchmarks.md ("Small-row products", "Roofline").

    y = linear(x, weight, bias)     # = F.linear(x, weight, bias): oneDNN on fp32 CPU rows, M > 1
    pack_weights(model)             # CPU nn.Linear layers become PackedLinear, each with a copy of W
    with packed_weights(model): ... #   in oneDNN's blocked layout; unpack_weights undoes it

oneDNN's op has no autograd formula: it runs only where no gradient can flow (CPU, not compiling).
Packing swaps the class in place (as torch.nn.utils.parametrize does): parameters and state-dict
keys stay. A copy records its weight's storage and version, so an in-place change, a cast or a move
makes the layer use the weight itself (a write through `weight.data` is not seen). Copies live
beside the model: state_dict, deepcopy and pickling never see them.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


def _onednn_may_run(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """True where oneDNN's op may stand in for F.linear: not compiling, CPU tensors, no gradient."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return (not torch.compiler.is_compiling()  # torch.compile chooses its own kernels for F.linear
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and all(t.device.type == "cpu" for t in tensors)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """As `_onednn_may_run`, and fp32 without autocast, more than one row (the plain weight)."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    # under autocast F.linear runs in the autocast dtype; one row: F.linear (MKL's matrix-vector product)
    return (all(t.dtype == torch.float32 for t in tensors) and not torch.is_autocast_enabled("cpu")
            and x.numel() > x.shape[-1] and _onednn_may_run(x, weight, bias))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x [..., K], weight [N, K], bias [N] or None) -> [..., N]; oneDNN where `_onednn_applies`."""
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
    """nn.Linear whose product is oneDNN's with the packed copy of its weight while it is current."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # under torch.compile: F.linear, and no look at the copy (dynamo cannot trace data_ptr)
        packed = None if torch.compiler.is_compiling() else self.packed_weight()
        # the dtype F.linear would multiply in on the CPU: the autocast dtype, else x's
        product_dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        if packed is not None and product_dtype == packed.dtype and _onednn_may_run(x, self.weight, self.bias):
            bias = None if self.bias is None else self.bias.to(packed.dtype)
            # y = x W^T + b with W in oneDNN's blocked layout   [..., N]
            return torch.ops.mkldnn._linear_pointwise(x.to(packed.dtype), packed, bias, "none", [], "")
        return linear(x, self.weight, self.bias)

    def packed_weight(self) -> torch.Tensor | None:
        """The packed copy of this layer's weight, or None (none made, or the weight changed)."""
        entry = _PACKED.get(self)
        return entry[2] if entry is not None and entry[1] == _weight_state(self.weight) else None


def _packable(module: nn.Module) -> bool:
    """A plain (or packed) nn.Linear whose CPU fp32/bf16 weight has a version (not inference mode)."""
    return (type(module) in (nn.Linear, PackedLinear) and module.weight.device.type == "cpu"
            and module.weight.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available() and not module.weight.is_inference())


@torch.no_grad()
def pack_weights(model: nn.Module) -> int:
    """Make every packable nn.Linear a PackedLinear with a current packed copy; returns its bytes."""
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
