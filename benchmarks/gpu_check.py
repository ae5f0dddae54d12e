"""The GPU check's preflight (benchmarks/gpu_check.sh runs it before `pytest -m cuda`): what must hold
before anything runs on the device, one line per requirement, exit status 1 if one is missing.

    python benchmarks/gpu_check.py                  # on cuda
    python benchmarks/gpu_check.py --device cpu     # the dry run

What each requirement catches: docs/devices.md ("On a new GPU, run this first").
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sysconfig
from pathlib import Path

import torch
from common import banner

from minidiff.errors import run_cli
from minidiff.plumbing.device import enable_tf32, resolve_device


def compiled_kernel(device: torch.device) -> str | None:
    """Compile and run gelu(a @ b) on the device, fp32 then bf16 autocast, against eager; None
    when both agree, else what went wrong (e.g. a TF32 API mix, a missing libcuda, no compiler)."""
    torch._dynamo.reset()
    a, b = torch.randn(64, 64, device=device), torch.randn(64, 64, device=device)
    f = torch.compile(lambda a, b: torch.nn.functional.gelu(a @ b), fullgraph=True)
    try:
        for dtype, tolerance in ((torch.float32, 1e-2), (torch.bfloat16, 5e-2)):  # TF32, bf16 products
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                got, want = f(a, b).float(), torch.nn.functional.gelu(a @ b).float()
            if not (got - want).abs().max() <= tolerance * want.abs().max():
                return f"the compiled kernel's {dtype} result differs from eager"
    except Exception as err:  # any failure inside the compiler is the finding
        return f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"
    return None


def requirements(device: torch.device) -> list[tuple[str, bool, str]]:
    """(requirement, met, detail) for each thing the tests need, in the order to fix them."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    rows = [("C compiler for torch.compile", compiler is not None, compiler or "none on PATH (install gcc)"),
            ("Python headers for torch.compile", headers.is_file(), f"{headers}" + ("" if headers.is_file() else
                                                                                  " missing (install python3-dev)"))]
    if device.type == "cuda":
        # the driver reports its CUDA version as 1000 major + 10 minor (12040 -> 12.4); 0: none loaded
        try:
            number = torch._C._cuda_getDriverVersion()
        except (AttributeError, RuntimeError):  # a CPU build of torch, or no driver it can load
            number = 0
        driver, runtime = (number // 1000, number % 1000 // 10), torch.version.cuda or "none (a CPU build)"
        rows += [("CUDA driver >= torch's CUDA runtime", runtime[0].isdigit() and driver >= tuple(
                      map(int, runtime.split(".")[:2])), f"driver {driver[0]}.{driver[1]}, torch's runtime {runtime}: "
                  "update the driver, or install a torch built for it (TORCH_INDEX_URL)"),
                 ("torch sees the GPU", torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count(),
                  f"{torch.cuda.device_count()} GPU(s) visible, {device} asked for"),
                 ("Triton installed", importlib.util.find_spec("triton") is not None, "pip install triton")]
        if not all(ok for _, ok, _ in rows):
            return rows  # nothing can run on the GPU yet
    failure = compiled_kernel(device)
    rows.append((f"a compiled kernel runs on {device} (fp32, bf16 autocast)", failure is None,
                 failure or "agrees with eager"))
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        rows.append(("free GPU memory >= 20 GiB", free >= 20 * 2**30, f"{free / 2**30:.0f} of {total / 2**30:.0f} GiB"))
    return rows


def preflight(device: torch.device) -> int:
    print(banner(device if device.type == "cuda" and torch.cuda.is_available() else None), flush=True)
    rows = requirements(device)
    for name, ok, detail in rows:
        print(f"[{'ok' if ok else 'MISSING'}] {name}: {detail}", flush=True)
    return 0 if all(ok for _, ok, _ in rows) else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu (the dry run)")
    device = resolve_device(p.parse_args(argv).device)
    enable_tf32(device)  # as every script does: the compiled kernel must live with it
    return preflight(device)


if __name__ == "__main__":
    run_cli(main)
