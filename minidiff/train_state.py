"""Training checkpoints: save and restore the complete state of a run, atomically.

References: none (plumbing); exact resume is explained in docs/training.md ("Resume").

    tmp = begin_checkpoint(ckpt_root, step)     # fresh .tmp-step-XXXXXX (rank 0)
    write_rng(tmp, rank, generator)             # every rank: its own rng-rank-R.pt
    finish_checkpoint(tmp, step, model, optimizer, lr_schedule, state, keep_last)   # rank 0: rename
    path = latest_checkpoint(ckpt_root)         # newest complete DIR/checkpoints/step-XXXXXX or None
    state = load_training_state(path, model, optimizer, lr_schedule, rank, generator)  # -> state.json

Saving is split in three because under data parallelism every rank writes its own random
states between rank 0 creating the directory and rank 0 publishing it (the trainer puts a
barrier between the calls).

A checkpoint directory holds
    trainable.safetensors    the parameters that train (LoRA: the adapter tensors only)
    optimizer.pt             optimizer and lr-schedule state dicts, under the keys "optimizer"
                             and "scheduler" (torch.save; read back with
                             torch.load(weights_only=True), never plain unpickling)
    rng-rank-R.pt            every random state of rank R: torch CPU, CUDA, the masking generator
                             (tensors, with the device type it lives on), python and numpy
                             (as plain lists)
    state.json               step, data position (Batches.state_dict), config (TrainConfig's
                             fields; trainer.RENAMED_FIELDS maps the names older checkpoints
                             used), world size, total steps, eval losses so far

Resuming on another device type or number of GPUs: python, numpy and torch's CPU state are
restored everywhere; CUDA states only for the GPUs present; the masking generator's state only
when it was saved from the same device type (a CPU and a CUDA generator have different state
formats). Otherwise that generator is reseeded from the run seed with a warning. The training
loop reseeds the generator and torch's RNG from (seed, step, micro-batch) before every
micro-batch anyway, so the masks and dropout of the resumed run are the same either way.

It is first written to `.tmp-step-XXXXXX` and then renamed to `step-XXXXXX`: a rename is atomic,
so every `step-*` directory is complete and the previous one stays valid until the new one is.
"""
from __future__ import annotations

import json
import os
import warnings
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import files
from .errors import UserError

STEP_DIR = re.compile(r"^step-(\d+)$")
REQUIRED_FILES = ("trainable.safetensors", "optimizer.pt", "state.json")


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters with requires_grad (tied weights once), detached on the CPU."""
    out = {}
    for name, p in model.named_parameters():  # named_parameters lists a tied tensor once
        if p.requires_grad:
            out[name] = p.detach().to("cpu").contiguous()
    return out


def rng_state(generator: torch.Generator | None) -> dict:
    """Every random state of this process: python, numpy, torch CPU, CUDA, the masking generator."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generator": generator.get_state() if generator is not None else None,
        "generator_device": generator.device.type if generator is not None else None,
    }
    return state


def set_rng_state(state: dict, generator: torch.Generator | None, fallback_seed: int = 0) -> None:
    """Restore what rng_state returned, mapped onto this machine (module docstring): CUDA states
    for the GPUs present, the generator's state only from the same device type, else the
    generator is reseeded with `fallback_seed` and a warning says so."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda_states = list(state.get("cuda") or [])
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for index, cuda_state in enumerate(cuda_states[:gpus]):
        torch.cuda.set_rng_state(cuda_state, index)
    if generator is None or state.get("generator") is None:
        return
    # checkpoints written before the device type was recorded: infer it from the CUDA states
    saved_type = state.get("generator_device") or ("cuda" if cuda_states else "cpu")
    if saved_type == generator.device.type:
        generator.set_state(state["generator"])
        return
    generator.manual_seed(fallback_seed)
    warnings.warn(f"the checkpoint's masking generator was on {saved_type} and this run's is on "
                  f"{generator.device.type}; it is reseeded from the run seed (the loop reseeds it "
                  f"before every micro-batch, so the masks are unchanged)", stacklevel=2)


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(ckpt_root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ckpt_root as (step, path), oldest first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and child.is_dir() and all((child / f).is_file() for f in REQUIRED_FILES):
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    found = list_checkpoints(ckpt_root)
    return found[-1][1] if found else None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def begin_checkpoint(ckpt_root: str | Path, step: int) -> Path:
    """Create (afresh) the temporary directory `.tmp-step-XXXXXX` a checkpoint is written into."""
    tmp = Path(ckpt_root) / f".tmp-{step_dir_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)  # left over from a run killed while writing
    tmp.mkdir(parents=True)
    return tmp


def write_rng(tmp: Path, rank: int, generator: torch.Generator | None) -> None:
    torch.save(rng_state(generator), tmp / f"rng-rank-{rank}.pt")


def finish_checkpoint(tmp: Path, step: int, model, optimizer, lr_schedule, state: dict,
                      keep_last: int | None) -> Path:
    """Write weights, optimizer and state.json into `tmp`, rename it to step-XXXXXX, prune old ones."""
    save_file(trainable_state_dict(model), str(tmp / "trainable.safetensors"), metadata={"format": "pt"})
    torch.save({"optimizer": optimizer.state_dict(),
                "scheduler": lr_schedule.state_dict() if lr_schedule is not None else None},
               tmp / "optimizer.pt")
    files.write_json(tmp / "state.json", {"step": step, **state}, indent=1)
    for f in tmp.iterdir():  # make the contents durable before the rename publishes them
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    final = tmp.parent / step_dir_name(step)
    if final.exists():  # the same step written again (e.g. re-run after a crash): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(tmp.parent)
    if keep_last:
        for _, old in list_checkpoints(tmp.parent)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_training_state(path: str | Path, model, optimizer, lr_schedule, rank: int,
                        generator: torch.Generator | None, fallback_seed: int = 0) -> dict:
    """Load weights, optimizer, lr schedule and this rank's random states from a checkpoint
    (onto the model's device, whatever device wrote it); returns state.json (step, data
    position, ...). fallback_seed: see set_rng_state."""
    path = Path(path)
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    unknown = [n for n in weights if n not in params]
    if missing or unknown:
        raise UserError(
            f"checkpoint {path} does not match this model (missing {missing[:3]}, unexpected "
            f"{unknown[:3]}); resume with the same --model and LoRA settings as the original run"
        )
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    opt = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(opt["optimizer"])
    if lr_schedule is not None and opt["scheduler"] is not None:
        lr_schedule.load_state_dict(opt["scheduler"])
    rng_file = path / f"rng-rank-{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True, map_location="cpu"), generator, fallback_seed)
    return json.loads((path / "state.json").read_text(encoding="utf-8"))
