"""Small-row products at their bound: y = x W^T + b through oneDNN's matmul on the CPU.

References: oneDNN (the matmul primitive PyTorch ships as `torch.ops.mkldnn`); the roofline
model (Williams, Waterman and Patterson, CACM 2009) for the bound. Measurements and the
formulations tried: docs/benchmarks.md ("Roofline"), `python benchmarks/roofline.py --products`.

    y = linear(x, weight, bias)     # = F.linear(x, weight, bias), up to fp32 rounding
    Linear(768, 2304)               # an nn.Linear whose forward is `linear`

A sampling step multiplies few rows (M <= 32: one block of one or a few sequences) by large
weights, the 256k-token decoder [V, H] above all. Such a product should run at its bound,
max(2 M K N / peak FLOP/s, bytes of W / read bandwidth), the peak being the machine's fastest
kernel. On the AMD EPYC (Zen 4) this was measured on, one thread, fp32 (time / bound of the
decoder and the four layer products; docs/benchmarks.md, "Small-row products"):

    M rows                              1           8           32
    F.linear (MKL's sgemm)              2.2-2.9x    3.5-5.5x    1.7-2.4x
    oneDNN, plain W (`linear`, M > 1)   1.7-2.7x    3.0-3.7x    1.4-1.8x
    oneDNN, packed W (`pack_weights`)   1.7-3.0x    2.1-2.7x    1.2-1.4x

((W @ x^T)^T, a pre-transposed weight and vocabulary chunks do no better than F.linear at 8 and
32 rows.) A single row (M = 1) stays with F.linear unless packed: MKL's matrix-vector product
runs on one thread, while oneDNN spreads it over all of them, which on a busy 2-core machine
made the layers' small products up to 10x slower.

oneDNN's op has no autograd formula, so `linear` uses it only where no gradient can flow: fp32
CPU tensors, no autocast, and grad mode off or no input requiring grad (sampling, evaluation,
the inside of an autograd.Function's forward such as chunked_loss). Everything else is
F.linear, unchanged. `torch.backends.mkldnn.enabled = False` turns the oneDNN path off.

Packed weights (inference). oneDNN multiplies fastest with a copy of W laid out in its own
blocked format ("reordered", here for 32 rows); with such a copy the products of a sampling step
come closer to their bound, most at 8 to 32 rows: 1.2-1.6x faster than oneDNN on the plain weight
in fp32 (within 1.16-1.40x of the bound at 32 rows), 1.2-2.2x faster than F.linear in bf16
(docs/benchmarks.md, "Small-row products"). The copy holds as many bytes again as the weight, so
it is made only on request, for a model that is then only read (sample.py, evaluate.py, the
lm-eval harness):

    pack_weights(model)             # every Linear of model gets a packed copy of its weight
    with packed_weights(model): ... # the same, dropped on leaving
    unpack_weights(model)

A Linear uses its copy where oneDNN may run (CPU, no gradient) and the product's dtype (the
autocast dtype, else the input's) is the copy's, for any number of rows. The copy records its
weight's storage and version counter: any in-place change of the weight (an optimizer step,
load_state_dict, a LoRA merge), a cast or a move makes the layer ignore it and multiply with the
weight itself. A write through `weight.data` bypasses the version counter; do not write weights
that way while they are packed. The copies live beside the model, not in it: state_dict,
deepcopy and pickling never see them.
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
        return False  # one row: MKL's matrix-vector product, on one thread (see the module docstring)
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


PACK_ROWS = 32  # oneDNN's layout hint; measured as fast as a per-size layout from 4 to 512 rows

# Linear -> (the weight's storage, dtype, shape and version when packed; the packed copy)
_PACKED: "weakref.WeakKeyDictionary[Linear, tuple]" = weakref.WeakKeyDictionary()


def _weight_state(weight: torch.Tensor) -> tuple:
    return weight.data_ptr(), weight.dtype, tuple(weight.shape), weight._version


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state-dict keys) whose product is `linear`, or oneDNN's
    product with a packed copy of the weight while `pack_weights` holds one (module docstring)."""

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
        return entry[1] if entry is not None and entry[0] == _weight_state(self.weight) else None


def _packable(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (isinstance(module, Linear) and weight.device.type == "cpu"
            and weight.dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available()
            and not weight.is_inference())  # an inference-mode tensor has no version counter


@torch.no_grad()
def pack_weights(model: nn.Module) -> int:
    """Give every CPU fp32/bf16 Linear of `model` a packed copy of its weight (made again where the
    weight changed since); returns the bytes the copies hold (0 where none applies)."""
    held = 0
    for module in filter(_packable, model.modules()):
        if module.packed_weight() is None:
            weight = module.weight.detach()
            _PACKED[module] = (_weight_state(weight), torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS))
        held += module.weight.numel() * module.weight.element_size()
    return held


def unpack_weights(model: nn.Module) -> None:
    """Drop the packed copies of `model`'s Linears."""
    for module in model.modules():
        _PACKED.pop(module, None)


@contextmanager
def packed_weights(model: nn.Module):
    """`pack_weights(model)` on entry, `unpack_weights(model)` on exit."""
    pack_weights(model)
    try:
        yield model
    finally:
        unpack_weights(model)
