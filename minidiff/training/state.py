"""Training checkpoints: save and restore the complete state of a run, atomically and verified
(what a checkpoint holds and why: docs/training.md, "Resume").

    tmp = begin_checkpoint(ckpt_root, step)     # fresh .tmp-step-XXXXXX (rank 0)
    write_rng(tmp, rank, generator)             # every rank: its own rng-rank-R.pt
    finish_checkpoint(tmp, step, model, optimizer, lr_schedule, state, keep_last)   # rank 0: rename
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from minidiff.errors import UserError
from minidiff.plumbing import files

STEP_DIR = re.compile(r"^step-(\d+)$")
MANIFEST = "checkpoint.json"
REQUIRED_FILES = ("trainable.safetensors", "optimizer.pt", "state.json", MANIFEST)
FORMAT_VERSION = 1


class DamagedCheckpoint(Exception):
    """A checkpoint whose files cannot be trusted or read; the resume skips it."""


def rng_state(generator: torch.Generator | None) -> dict:
    """Every random state of this process: python, numpy, torch CPU, CUDA, the masking generator."""
    np_state, py_state = np.random.get_state(), random.getstate()
    return {"python": [py_state[0], list(py_state[1]), py_state[2]],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "generator": generator.get_state() if generator is not None else None,
            "generator_device": generator.device.type if generator is not None else None}


def set_rng_state(state: dict, generator: torch.Generator | None, fallback_seed: int = 0) -> None:
    """Restore what rng_state returned: CUDA for the GPUs present; the masking generator only if saved from the
    same device type, else reseeded with `fallback_seed` (docs/training.md, "Resuming on another device")."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for index, cuda_state in enumerate(state["cuda"][:gpus]):
        torch.cuda.set_rng_state(cuda_state, index)
    if generator is None or state["generator"] is None:
        return
    saved_type = state["generator_device"]
    if saved_type == generator.device.type:
        generator.set_state(state["generator"])
        return
    generator.manual_seed(fallback_seed)
    warnings.warn(f"the checkpoint's masking generator was on {saved_type} and this run's is on "
                  f"{generator.device.type}; it is reseeded from the run seed (the loop reseeds it "
                  f"before every micro-batch, so the masks are unchanged)", stacklevel=2)


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def candidates(ckpt_root: str | Path) -> list[tuple[int, Path]]:
    """Every step-XXXXXX directory under ckpt_root as (step, path), oldest first, whatever its contents."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), child) for child in root.iterdir()
                  if (m := STEP_DIR.match(child.name)) and child.is_dir())


def list_checkpoints(ckpt_root: str | Path) -> list[tuple[int, Path]]:
    return [(step, path) for step, path in candidates(ckpt_root) if all((path / f).is_file() for f in REQUIRED_FILES)]


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    found = list_checkpoints(ckpt_root)
    return found[-1][1] if found else None


def write_manifest(folder: Path) -> None:
    """checkpoint.json: size and BLAKE2b of every file in `folder`, written last."""
    listed = {f.name: {"bytes": f.stat().st_size, "blake2b": files.file_hash(f)}
              for f in sorted(folder.iterdir()) if f.is_file() and f.name != MANIFEST}
    files.write_json(folder / MANIFEST, {"format_version": FORMAT_VERSION, "files": listed}, indent=1)


def verify_checkpoint(path: str | Path) -> str | None:
    """None when checkpoint.json lists exactly the files present, every required one among them, each with
    the size and hash it has now; otherwise the reason, as a phrase."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        listed = manifest["files"]
        if manifest.get("format_version") != FORMAT_VERSION or not isinstance(listed, dict):
            return f"{MANIFEST} is of another format"
    except FileNotFoundError:
        return f"it has no {MANIFEST} (an interrupted save)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"its {MANIFEST} is unreadable"
    present = {f.name for f in path.iterdir() if f.is_file() and f.name != MANIFEST}
    missing = [name for name in REQUIRED_FILES if name != MANIFEST and name not in listed]
    if missing or present != set(listed):
        return f"its files {sorted(present)} differ from those {MANIFEST} lists ({sorted(listed)})"
    for name, entry in sorted(listed.items()):
        size = (path / name).stat().st_size
        if size != entry.get("bytes"):
            return f"{name} has {size} bytes where {entry.get('bytes')} were written"
        if files.file_hash(path / name) != entry.get("blake2b"):
            return f"{name} does not match the hash recorded when it was written"
    return None


def read_state(path: str | Path) -> dict:
    try:
        state = json.loads((Path(path) / "state.json").read_text(encoding="utf-8"))
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError("no step")
        return state
    except (OSError, ValueError) as err:
        raise DamagedCheckpoint(f"its state.json cannot be read ({err})") from None


def begin_checkpoint(ckpt_root: str | Path, step: int) -> Path:
    """Create (afresh) `.tmp-step-XXXXXX`, the one name every rank computes (files.temporary_path, shared)."""
    return files.temporary_directory(Path(ckpt_root) / step_dir_name(step), shared=True)


def write_rng(tmp: Path, rank: int, generator: torch.Generator | None) -> None:
    if not tmp.is_dir():
        raise UserError(f"rank {rank} cannot see the checkpoint folder {tmp} that rank 0 created; "
                        "--out must be on a filesystem that every node shares")
    torch.save(rng_state(generator), tmp / f"rng-rank-{rank}.pt")


def finish_checkpoint(tmp: Path, step: int, model, optimizer, lr_schedule, state: dict,
                      keep_last: int | None) -> Path:
    """Write weights, optimizer and state.json into `tmp`, rename it to step-XXXXXX, prune old ones."""
    # the parameters with requires_grad (named_parameters lists a tied tensor once), on the CPU
    trainable = {name: p.detach().to("cpu").contiguous() for name, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, str(tmp / "trainable.safetensors"), metadata={"format": "pt"})
    torch.save({"optimizer": optimizer.state_dict(),
                "scheduler": lr_schedule.state_dict() if lr_schedule is not None else None}, tmp / "optimizer.pt")
    files.write_json(tmp / "state.json", {"step": step, **state}, indent=1)
    for f in tmp.iterdir():  # make the contents durable before the manifest vouches for them
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    write_manifest(tmp)
    files.fsync_dir(tmp)
    final = tmp.parent / step_dir_name(step)
    if final.exists():  # the same step written again (e.g. re-run after a crash): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    files.fsync_dir(tmp.parent)
    if keep_last:
        for _, old in candidates(tmp.parent)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def check_shapes(path: Path, model) -> None:
    """UserError unless the checkpoint's trainable tensors have this model's names and shapes (header only)."""
    try:
        with safe_open(str(path / "trainable.safetensors"), framework="pt") as f:
            saved = {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as err:  # safetensors raises its own error types for a damaged header
        raise DamagedCheckpoint(f"trainable.safetensors cannot be read ({err})") from None
    wanted = {n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    if saved == wanted:
        return
    different = [n for n in wanted if n in saved and saved[n] != wanted[n]]
    detail = (f"{different[0]} is {saved[different[0]]} there and {wanted[different[0]]} here" if different else
              f"it holds {len(saved)} trainable tensors and this model {len(wanted)}")
    raise UserError(f"the checkpoint {path} was trained with other LoRA settings or another model ({detail}); "
                    "resume with the original --model, --lora-r, --lora-targets and --full/--lora")


def load_training_state(path: str | Path, model, optimizer, lr_schedule, rank: int,
                        generator: torch.Generator | None, fallback_seed: int = 0) -> dict:
    """Load weights, optimizer, lr schedule and this rank's random states onto the model's device; returns
    state.json. An unreadable file raises DamagedCheckpoint; another model's checkpoint UserError."""
    path = Path(path)
    check_shapes(path, model)
    try:
        weights = load_file(str(path / "trainable.safetensors"))
        opt = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
        rng_file = path / f"rng-rank-{rank}.pt"
        rng = torch.load(rng_file, weights_only=True, map_location="cpu") if rng_file.is_file() else None
    except Exception as err:  # safetensors / torch.load errors on a damaged file
        raise DamagedCheckpoint(f"a file cannot be read ({type(err).__name__}: {str(err)[:120]})") from None
    state = read_state(path)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(opt["optimizer"])
    if lr_schedule is not None and opt["scheduler"] is not None:
        lr_schedule.load_state_dict(opt["scheduler"])
    if rng is not None:
        set_rng_state(rng, generator, fallback_seed)
    return state


def weights_hash(model) -> str:
    """BLAKE2b over every parameter and buffer except LoRA's (names, dtypes, shapes, bytes, in name order)."""
    digest = files.new_digest()
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" in name:
            continue
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
