"""Find a model (local directory or hub id), read its weights, build a ModernBertMLM; save one.

References: ModernBERT (arXiv 2412.13663), mmBERT (2509.06888); the layout of transformers'
`ModernBertForMaskedLM.save_pretrained` and huggingface_hub's snapshot cache.

    load_model("path/or/hub-id", dtype=torch.bfloat16, device="cuda")  -> model in eval mode
    export(model, "runs/cpt", tokenizer=tok, lora=True)  -> a finished run's model folder (LoRA merged)
    python -m minidiff.plumbing.checkpoint convert DIR   # DIR/pytorch_model.bin -> DIR/model.safetensors

Weights are read with safetensors only; the converter (mmBERT ships only a pickled .bin) is the one
place a `.bin` is opened, with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import warnings
from pathlib import Path

import huggingface_hub
import safetensors
import safetensors.torch
import torch

from minidiff.errors import UserError, run_cli
from minidiff.lora import base_state_dict
from minidiff.model import ModelConfig, ModernBertMLM
from minidiff.plumbing import peft_io
from minidiff.plumbing.files import atomic_path, first_line, read_safetensors, write_json

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX_FILE = "pytorch_model.bin.index.json"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
# what a model directory needs from the hub (the pickled .bin only when no safetensors exist)
MODEL_FILES = [CONFIG_FILE, *TOKENIZER_FILES, "*.safetensors", WEIGHTS_INDEX_FILE]
PICKLE_FILES = [PICKLE_FILE, PICKLE_INDEX_FILE, "pytorch_model-*.bin"]
TIED_KEY, EMBEDDING_KEY = "decoder.weight", "model.embeddings.tok_embeddings.weight"
HEAD_KEYS = ("head.", "decoder.")


# ----------------------------------------------------------------------------- resolving
def _hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it only once, at import)."""
    set_now = [os.environ.get(name, "").strip().upper() for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")]
    return any(value in {"1", "ON", "YES", "TRUE"} for value in set_now) or huggingface_hub.constants.HF_HUB_OFFLINE


def _hub_cache_dir() -> str | None:
    """The hub cache the environment names now (HF_HUB_CACHE, else HF_HOME/hub), else the default."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return os.path.expanduser(os.environ[name])
    home = os.environ.get("HF_HOME")
    return os.path.join(os.path.expanduser(home), "hub") if home else None


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.endswith(os.sep) or os.sep + os.sep in name


def resolve_model_dir(name_or_path, revision: str | None = None, *, allow_patterns=None) -> Path:
    """`name_or_path` if a directory, else the hub snapshot of that id of the files in allow_patterns."""
    path = Path(os.path.expanduser(str(name_or_path)))
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"{name_or_path} is a file; expected a model directory (config.json + model.safetensors) "
                        "or a hub id")
    name = str(name_or_path)
    if _looks_like_path(name):
        raise UserError(f"model directory {name} does not exist")
    offline = _hub_offline()
    patterns = MODEL_FILES if allow_patterns is None else list(allow_patterns)

    def fetch(patterns):
        return Path(huggingface_hub.snapshot_download(name, revision=revision, allow_patterns=patterns,
                                                      cache_dir=_hub_cache_dir(), local_files_only=offline))

    where = f"in the hub cache {_hub_cache_dir() or '(default)'} (HF_HUB_OFFLINE=1)" if offline else "on the hub"
    try:
        directory = fetch(patterns)
        has_weights = (directory / WEIGHTS_FILE).exists() or (directory / WEIGHTS_INDEX_FILE).exists()
        if allow_patterns is None and not has_weights and not offline:
            directory = fetch(patterns + PICKLE_FILES)  # e.g. jhu-clsp/mmBERT-base: .bin only
    except Exception as err:  # validation, not found, gated, offline cache miss, network down
        rev = f" at revision {revision}" if revision else ""
        raise UserError(f"{name}{rev} is neither a local directory nor a model found {where} "
                        f"({type(err).__name__}: {first_line(err)})") from None
    return directory


# ----------------------------------------------------------------------------- reading weights
def _shards(index: Path) -> tuple[dict[str, str], list[str]]:
    """(weight_map {key: shard file}, the shard files in order) of a safetensors or pickle index."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return weight_map, sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{index} is not a weights index (expected JSON with a 'weight_map' of key -> shard "
                        "file)") from None


def _read_weights(directory: Path) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, name of the file it came from, for messages)."""
    single, index = directory / WEIGHTS_FILE, directory / WEIGHTS_INDEX_FILE
    if single.exists():
        return read_safetensors(single), str(single)
    if index.exists():
        (weight_map, shards), state = _shards(index), {}
        for shard in shards:
            state.update(read_safetensors(directory / shard))
        missing = sorted(set(weight_map) - set(state))
        if missing:
            raise UserError(f"{index} lists tensors its shards do not contain: {', '.join(missing[:5])}")
        return state, str(index)
    if (directory / PICKLE_FILE).exists() or (directory / PICKLE_INDEX_FILE).exists():
        raise UserError(f"{directory} has only a pickled {PICKLE_FILE}; convert it once with "
                        f"`python -m minidiff.plumbing.checkpoint convert {directory}` (writes {WEIGHTS_FILE})")
    raise UserError(f"{directory} has no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}")


def load_weights(directory) -> dict[str, torch.Tensor]:
    """All tensors of `directory`'s model.safetensors (or its shards, via the index), on the CPU."""
    return _read_weights(Path(directory))[0]


def read_config(directory) -> ModelConfig:
    file = Path(directory) / CONFIG_FILE
    if not file.is_file():
        raise UserError(f"{file} is missing; a model directory needs config.json next to its weights")
    try:
        return ModelConfig.from_dict(json.loads(file.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as err:
        raise UserError(f"{file} is not a valid ModernBERT config: {err}") from None


# ----------------------------------------------------------------------------- building the model
def _as_dtype(dtype) -> torch.dtype:
    if dtype is None or isinstance(dtype, torch.dtype):
        return torch.float32 if dtype is None else dtype
    named = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if str(dtype) not in named:
        raise UserError(f"dtype {dtype!r} is not supported; expected one of {', '.join(named)}")
    return named[str(dtype)]


def _check_state(state: dict, reference: dict, source: str, allow_missing: set[str]) -> None:
    """Same keys (up to `allow_missing`) and the same shapes as the model the config describes."""
    missing, unexpected = set(reference) - set(state) - allow_missing, set(state) - set(reference)
    for keys, what in ((missing, "is missing {} tensor(s) that config.json implies"),
                       (unexpected, "has {} tensor(s) a ModernBertForMaskedLM does not")):
        if keys:
            more = f" (and {len(keys) - 5} more)" if len(keys) > 5 else ""
            raise UserError(f"{source} {what.format(len(keys))}: {', '.join(sorted(keys)[:5])}{more}")
    for key, tensor in state.items():
        want = tuple(reference[key].shape)
        if tuple(tensor.shape) != want:
            raise UserError(f"tensor {key} in {source} has shape {list(tensor.shape)} but config.json implies "
                            f"{list(want)}")


def load_model(name_or_path, *, dtype=None, device=None, revision=None,
               allow_missing_head: bool = False) -> ModernBertMLM:
    """ModernBertMLM in eval mode; a headless checkpoint only with `allow_missing_head` (a random head)."""
    directory = resolve_model_dir(name_or_path, revision)
    config = read_config(directory)
    state, source = _read_weights(directory)
    dtype = _as_dtype(dtype)

    with torch.device("meta"):  # shapes only: no time spent on a random init we overwrite
        skeleton = ModernBertMLM(config)
    reference = skeleton.state_dict()
    # a headless ModernBertModel state (no `model.` prefix) on ModernBertMLM keys
    headless = not any(k.startswith("model.") for k in state) and "embeddings.tok_embeddings.weight" in state
    if headless:
        state = {f"model.{k}": v for k, v in state.items()}
    tied = config.tie_word_embeddings
    if tied:
        state.pop(TIED_KEY, None)  # transformers ties the decoder to the embeddings, whatever the file holds
    head_keys = {k for k in reference if k.startswith(HEAD_KEYS)}
    allow_missing = {TIED_KEY} if tied else set()
    if headless:
        if not allow_missing_head:
            raise UserError(f"{source} is a headless ModernBertModel checkpoint: the MLM head "
                            f"({', '.join(sorted(head_keys - allow_missing))}) is missing; use a ModernBertForMaskedLM "
                            "checkpoint, or load_model(..., allow_missing_head=True) for a random head")
        allow_missing |= head_keys
    _check_state(state, reference, source, allow_missing)

    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    if headless:  # the head must be initialised for real: build on the CPU, then copy the encoder in
        model = ModernBertMLM(config).to(dtype)
        model.load_state_dict(state, strict=False)
        warnings.warn(f"{source} has no MLM head: head.dense, head.norm and decoder.bias are randomly initialised",
                      stacklevel=2)
    else:
        model = skeleton
        if tied:
            state[TIED_KEY] = state[EMBEDDING_KEY]
        model.load_state_dict(state, strict=True, assign=True)
        if tied:  # one Parameter, not two sharing storage (optimizers and counts see it once)
            model.decoder.weight = model.model.embeddings.tok_embeddings.weight
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not leftover, f"not loaded: {leftover}"  # a bug here, not a user mistake
    return (model if device is None else model.to(device)).eval()


# ----------------------------------------------------------------------------- saving and converting
def save_pretrained(model: ModernBertMLM, directory: str | Path, state_dict: dict | None = None) -> None:
    """config.json + model.safetensors (`state_dict`, default the model's) in the transformers layout."""
    directory = Path(directory)  # atomic_path makes it where it is missing
    state = model.state_dict() if state_dict is None else state_dict
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if model.config.tie_word_embeddings:
        state.pop(TIED_KEY, None)
    # config first, the weights last: a directory with model.safetensors is complete
    write_json(directory / CONFIG_FILE, model.config.to_dict())
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        safetensors.torch.save_file(state, str(tmp), metadata={"format": "pt"})


def export(model, out_dir: str | Path, *, tokenizer=None, lora: bool = False, base_model: str | None = None) -> None:
    """A trained model, model.safetensors (merged) last: its presence means the run finished."""
    out = Path(out_dir)
    if tokenizer is not None:
        tokenizer.save(out)
    if lora:
        peft_io.save_adapter(model, out / "adapter", base_model=base_model)
    save_pretrained(model, out, state_dict=base_state_dict(model) if lora else model.state_dict())


def _torch_load(file: Path) -> dict:
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols; the error below says it all
            warnings.simplefilter("ignore")
            obj = torch.load(str(file), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{file} could not be read as a PyTorch state dict with weights_only=True: it holds Python "
                        "objects other than tensors, which minidiff refuses to unpickle") from None
    except Exception as err:  # zip/EOF errors: truncated or not a torch.save file
        raise UserError(f"{file} could not be read as a PyTorch state dict with weights_only=True (truncated or "
                        f"not a torch.save file: {first_line(err).split('. ')[0]})") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        raise UserError(f"{file} does not hold a flat state dict (expected a dict of name -> tensor)")
    return obj


def convert(directory, overwrite: bool = False) -> Path:
    """DIR/pytorch_model.bin (or its shards) -> DIR/model.safetensors, without a tied decoder.weight."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory} is not a directory; expected a model directory holding {PICKLE_FILE}")
    out = directory / WEIGHTS_FILE
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it")
    index = directory / PICKLE_INDEX_FILE
    if (directory / PICKLE_FILE).exists():
        state = _torch_load(directory / PICKLE_FILE)
    elif index.exists():
        state = {}
        for shard in _shards(index)[1]:
            if not (directory / shard).is_file():
                raise UserError(f"{index} names shard {shard}, which is not in {directory}")
            state.update(_torch_load(directory / shard))
    else:
        raise UserError(f"{directory} has no {PICKLE_FILE} to convert")

    tied = read_config(directory).tie_word_embeddings if (directory / CONFIG_FILE).is_file() else True
    dropped = tied and TIED_KEY in state and EMBEDDING_KEY in state
    if dropped:
        if not torch.equal(state[TIED_KEY], state[EMBEDDING_KEY]):
            warnings.warn(f"{TIED_KEY} differs from {EMBEDDING_KEY} although config ties them; "
                          "dropping it as transformers does")
        del state[TIED_KEY]
    state = {k: v.contiguous() for k, v in state.items()}
    with atomic_path(out) as tmp:  # published only once it reads back equal
        safetensors.torch.save_file(state, str(tmp), metadata={"format": "pt"})
        with safetensors.safe_open(str(tmp), framework="pt") as f:
            if set(f.keys()) != set(state):
                raise RuntimeError(f"round trip of {out.name} lost tensors")
            for key in f.keys():
                if not torch.equal(f.get_tensor(key), state[key]):
                    raise RuntimeError(f"round trip of {out.name} changed tensor {key}")
    size = out.stat().st_size / 2**20
    print(f"wrote {out} ({len(state)} tensors, {size:.1f} MiB){'; dropped the tied ' + TIED_KEY if dropped else ''}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minidiff.plumbing.checkpoint", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="turn DIR/pytorch_model.bin into DIR/model.safetensors")
    conv.add_argument("directory", help="model directory holding pytorch_model.bin (and config.json)")
    conv.add_argument("--overwrite", action="store_true", help="replace an existing model.safetensors")
    args = parser.parse_args(argv)  # "convert", the one command
    convert(args.directory, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    run_cli(main)
