"""Where tensors live and in what precision: the one place the trainer and every script pick
their device, autocast context and matmul settings, and move batches to the device.

References: PyTorch's automatic mixed precision (torch.autocast) and TF32 notes; the bf16
training recipe of Diffutron (arXiv 2603.20466); torchrun's LOCAL_RANK convention.

    device = resolve_device(args.device)                # "cuda" -> cuda:LOCAL_RANK under torchrun
    precision = inference_precision(args.dtype, device)  # weights dtype + autocast for inference
    model = precision.prepare(model)
    with precision.autocast():
        logits = model(ids)

Inference `--dtype`: float32; bfloat16 (bf16 weights, fp32 LayerNorms and residual stream, bf16
autocast); auto = bfloat16 where the GPU or CPU has native bf16, else float32; float16 is refused.
Training: fp32 weights, bf16 autocast on a CUDA card with bf16, fp32 on the CPU. Every mode:
docs/training.md ("Devices and precision"); what each costs: docs/benchmarks.md.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from minidiff.errors import UserError
from minidiff.speed.packed import pack_weights

INFERENCE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(name: str | None = None, local_rank: int | None = None) -> torch.device:
    """The torch.device a `--device` value means. None: CUDA when available, else cpu. A bare
    "cuda": cuda:LOCAL_RANK when this process sees several GPUs, cuda:0 when it sees exactly one
    (launchers that give each rank its own CUDA_VISIBLE_DEVICES)."""
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {name!r} is not a device name; expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and device.index is None:
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        device = torch.device("cuda", 0 if visible == 1 else local_rank)
    return device


def check_available(device: torch.device) -> None:
    """One sentence when the device cannot be used on this machine."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device} was asked for but this machine has no usable CUDA GPU; "
                            "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {device} does not exist: this machine has {torch.cuda.device_count()} GPU(s) "
                            f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    elif device.type == "mps":
        raise UserError("--device mps is not supported: minidiff keeps its likelihood sums and sampling noise "
                        "in float64, which Apple's MPS backend lacks; use --device cpu")
    elif device.type != "cpu":
        raise UserError(f"--device {device} is not supported; expected cpu or cuda[:N]")


def cuda_has_bf16(device: torch.device) -> bool:
    """True on a CUDA device with compute capability >= 8.0 (not V100 or T4), or without CUDA.
    The device is checked first, so a GPU this machine lacks is one sentence, not a CUDA error."""
    if not torch.cuda.is_available():
        return True
    check_available(device)
    return torch.cuda.get_device_capability(device)[0] >= 8


def enable_tf32(device: torch.device) -> None:
    """TF32 tensor-core matmuls and convolutions on CUDA (fp32 range, 10-bit mantissa inputs),
    through the one API family Inductor reads: setting `fp32_precision` as well would make
    `torch.get_float32_matmul_precision()` raise (docs/devices.md, "TF32")."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True


def autocast(device: torch.device, enabled: bool = True, dtype: torch.dtype = torch.bfloat16):
    """torch.autocast on `device` in `dtype` when enabled, else a no-op context."""
    return torch.autocast(device_type=device.type, dtype=dtype) if enabled else nullcontext()


def training_autocast(device: torch.device, bf16: bool):
    """Training: bf16 autocast on CUDA when asked; the CPU always trains in fp32."""
    return autocast(device, enabled=bf16 and device.type == "cuda")


def check_training_precision(device: torch.device, bf16: bool) -> None:
    """One sentence when bf16 training is asked for on a GPU without native bf16."""
    if bf16 and device.type == "cuda" and not cuda_has_bf16(device):
        raise UserError(f"{device} ({torch.cuda.get_device_name(device)}) has no native bf16; "
                        "train in fp32 with --no-bf16")


def _inputs_to_fp32(module, args):
    return tuple(a.float() if torch.is_tensor(a) else a for a in args)


@dataclass(frozen=True)
class Precision:
    """How an inference run holds its weights and computes (see the module docstring)."""

    device: torch.device
    weights: torch.dtype  # dtype of the linear layers and embeddings
    autocast_dtype: torch.dtype | None  # None: no autocast
    pack: bool = False  # CPU: packed copies of the linear weights (minidiff/speed/packed.py)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Cast the weights (LayerNorms stay fp32), move the model to the device, and on the CPU
        pack its linear weights if asked (the model is then meant to be read only)."""
        model = model.to(device=self.device, dtype=self.weights)
        if self.weights != torch.float32:
            for module in model.modules():
                if isinstance(module, torch.nn.LayerNorm):
                    module.float()
                    module.register_forward_pre_hook(_inputs_to_fp32)
        if self.pack and self.device.type == "cpu":
            pack_weights(model)
        return model

    def autocast(self):
        return autocast(self.device, self.autocast_dtype is not None, self.autocast_dtype or torch.bfloat16)

    def describe(self) -> str:
        mode = f"{str(self.autocast_dtype).replace('torch.', '')} autocast" if self.autocast_dtype else "no autocast"
        packed = " (packed)" if self.pack and self.device.type == "cpu" else ""
        return f"{str(self.weights).replace('torch.', '')} weights{packed}, {mode}"


def add_precision_flags(parser) -> None:
    """--dtype and --no-packed-weights, the inputs of `inference_precision` (sample.py, evaluate.py)."""
    parser.add_argument("--no-packed-weights", action="store_true",
                        help="multiply with the linear weights as stored: no packed copy of them for the CPU's "
                             "oneDNN (saves as many bytes again as those weights, 1.2 GB at mmBERT-base in fp32; "
                             "the few-row products of sampling run slower)")
    parser.add_argument("--dtype", default="auto",
                        help="auto (CUDA: fp32 weights + bf16 autocast; CPU: as bfloat16 where it has avx512_bf16 "
                             "or amx_bf16, else fp32) | float32 | bfloat16 (bf16 weights, fp32 LayerNorms and "
                             "residual stream, bf16 autocast); float16 is refused")


def inference_precision(dtype: str | None, device: torch.device, pack: bool = False) -> Precision:
    """The Precision a `--dtype` value means on `device` (None = "auto"); pack: Precision.pack."""
    dtype = dtype or "auto"
    if dtype not in INFERENCE_DTYPES:
        raise UserError(f"--dtype {dtype!r} is unknown; expected auto, float32 or bfloat16")
    if dtype == "float16":
        raise UserError("--dtype float16 is not supported (activations can exceed fp16's range); "
                        "use bfloat16 or float32")
    if dtype == "auto" and device.type == "cpu" and cpu_has_native_bf16():
        dtype = "bfloat16"
    if device.type == "cuda" and not cuda_has_bf16(device):
        if dtype == "bfloat16":
            raise UserError(f"--dtype bfloat16: {device} ({torch.cuda.get_device_name(device)}) has no native "
                            "bf16; use --dtype float32 (or auto, which chooses it there)")
        return Precision(device, torch.float32, None, pack)
    if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda"):
        return Precision(device, torch.bfloat16, torch.bfloat16, pack)
    return Precision(device, torch.float32, None, pack)


NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86: bf16 dot products (Zen 4, Cooper Lake), AMX tiles


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none: macOS, Windows)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bf16 in hardware (elsewhere oneDNN emulates it: `auto` keeps fp32)."""
    return any(flag in cpu_flags() for flag in NATIVE_BF16_FLAGS)


def to_device(batch: dict, device: torch.device) -> dict:
    """Every tensor of a batch on `device` (asynchronous from pinned memory on CUDA)."""
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


class Prefetcher:
    """Iterates a batches.Batches-like source with the next batch already on its way to the device.
    On CUDA the batch is pinned and copied one step ahead on a side stream, overlapping the previous
    step's compute; the compute stream waits for that copy before using the batch.
    state_dict() is the source's position before the batch held in advance (resume point)."""

    def __init__(self, source, device: torch.device):
        self.source, self.device = source, device
        self._copies = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._fetch()

    def _fetch(self) -> None:
        self._state, batch = self.source.state_dict(), next(self.source)
        if self._copies is None:
            self._next = to_device(batch, self.device)
            return
        # page-locked host memory, so the non_blocking copy is truly async
        batch = {k: (v.pin_memory() if torch.is_tensor(v) else v) for k, v in batch.items()}
        with torch.cuda.stream(self._copies):
            self._next = to_device(batch, self.device)
        self._copied = self._copies.record_event()

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = self._next
        if self._copies is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(self._copied)
            for value in batch.values():
                if torch.is_tensor(value):  # allocated on the side stream, used on this one
                    value.record_stream(compute)
        self._fetch()
        return batch

    def state_dict(self) -> dict:
        return self._state
