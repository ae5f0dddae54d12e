"""LoRA adapters in peft's file layout: adapter_config.json + adapter_model.safetensors.

References: peft's `PeftModel.save_pretrained` / `from_pretrained`. The layer is minidiff/lora.py,
whose parameter names are peft's, so the files cross in both directions:

    save_adapter(model, "runs/cpt/adapter", base_model="jhu-clsp/mmBERT-base")
    load_adapter(load_model("jhu-clsp/mmBERT-base"), "runs/cpt/adapter")   # adds the LoRA layers
    PeftModel.from_pretrained(transformers_model, "runs/cpt/adapter")    # peft reads it too
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from minidiff.errors import UserError
from minidiff.lora import adapter_state_dict, apply_lora, check_hyperparameters, lora_modules, target_linears
from minidiff.plumbing.files import atomic_path, read_safetensors, write_json

PEFT_PREFIX = "base_model.model."  # peft's key prefix for a model wrapped without a task type
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# options beyond plain LoRA: each must be off (False, None, {} or []) in a config we load
BEYOND_PLAIN_LORA = ("use_dora", "use_rslora", "fan_in_fan_out", "lora_bias", "rank_pattern", "alpha_pattern",
                     "modules_to_save", "layers_to_transform", "layer_replication", "exclude_modules",
                     "target_parameters", "trainable_token_indices")


def save_adapter(model: nn.Module, directory, base_model: str | None = None) -> Path:
    """Write the adapter in peft's layout, each file atomically, weights first and config last."""
    modules = lora_modules(model)
    if not modules:
        raise UserError("the model has no LoRA layers; call apply_lora (or load_adapter) first")
    settings = {(m.r, m.alpha, m.dropout_p) for _, m in modules}
    if len(settings) != 1:
        raise UserError(f"LoRA layers disagree on (r, alpha, dropout): {sorted(settings)}; peft's layout needs one")
    r, alpha, dropout = settings.pop()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": None,
              "auto_mapping": {"base_model_class": "ModernBertForMaskedLM",
                               "parent_library": "transformers.models.modernbert.modeling_modernbert"},
              "base_model_name_or_path": base_model, "revision": None, "inference_mode": True,
              "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
              "target_modules": sorted({name.rsplit(".", 1)[-1] for name, _ in modules}), "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
              "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
              "rank_pattern": {}, "alpha_pattern": {}}
    tensors = {PEFT_PREFIX + k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    with atomic_path(directory / ADAPTER_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_json(directory / ADAPTER_CONFIG, config)
    return directory


def _read_adapter(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    if not config_path.is_file():
        raise UserError(f"adapter directory {directory} has no {ADAPTER_CONFIG}; expected a peft LoRA adapter")
    if not weights_path.is_file():
        extra = " (adapter_model.bin is pickled and never loaded: convert it to safetensors)" \
            if (directory / "adapter_model.bin").exists() else ""
        raise UserError(f"adapter directory {directory} has no {ADAPTER_WEIGHTS}{extra}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{config_path} is not valid JSON ({err})") from None
    return config, read_safetensors(weights_path)


def _plain_lora_settings(config: dict, directory: Path, base_model: str | None) -> tuple:
    """(r, alpha, dropout) of a plain LoRA adapter config trained on `base_model` (when given)."""
    where = directory / ADAPTER_CONFIG
    if config.get("peft_type") != "LORA":
        raise UserError(f"{where} has peft_type {config.get('peft_type')!r}; expected 'LORA'")
    for key in BEYOND_PLAIN_LORA:
        if config.get(key):
            raise UserError(f"{where} sets {key}={config[key]!r}; minidiff loads only plain LoRA adapters")
    if config.get("bias") not in (None, "none"):
        raise UserError(f"{where} sets bias={config['bias']!r}; minidiff loads only adapters with bias 'none'")
    named_base = config.get("base_model_name_or_path")
    # the same id or path, or the same final component (a hub id and its local copy)
    a, b = str(base_model).rstrip("/"), str(named_base).rstrip("/")
    if base_model is not None and named_base and a != b and a.rsplit("/", 1)[-1] != b.rsplit("/", 1)[-1]:
        raise UserError(f"adapter {directory} was trained on {named_base!r}, not on the base model {base_model!r}")
    r, alpha, dropout = config.get("r"), config.get("lora_alpha"), config.get("lora_dropout", 0.0) or 0.0
    check_hyperparameters(r, alpha, dropout)
    return r, alpha, dropout


def _adapter_tensors(tensors: dict, directory: Path) -> dict[str, torch.Tensor]:
    """peft keys base_model.model.<name>.lora_{A,B}.weight -> <name>.lora_{A,B}.weight."""
    state = {}
    for key, value in tensors.items():
        if not key.startswith(PEFT_PREFIX) or not re.search(r"\.lora_[AB]\.weight$", key):
            raise UserError(f"{directory / ADAPTER_WEIGHTS} holds {key!r}; expected "
                            f"'{PEFT_PREFIX}<module>.lora_A.weight' / '.lora_B.weight' keys only")
        state[key[len(PEFT_PREFIX):]] = value
    return state


def _expected_shapes(model: nn.Module, r: int, alpha: float, targets, where: Path) -> dict[str, tuple]:
    """{lora key: shape} the model has, or will have once LoRA is applied with these settings."""
    existing = lora_modules(model)
    if existing:
        if any(m.merged for _, m in existing):
            raise UserError("the model's LoRA layers are merged; call unmerge_lora(model) before load_adapter")
        alphas = {m.alpha for _, m in existing}
        if alphas != {alpha}:
            raise UserError(f"{where} has lora_alpha {alpha}, but the model's LoRA layers use {sorted(alphas)}")
        layers = [(name, m.in_features, m.out_features, m.r) for name, m in existing]
    else:
        layers = [(name, m.in_features, m.out_features, r) for name, m in target_linears(model, targets)]
    expected = {f"{name}.lora_A.weight": (rank, fan_in) for name, fan_in, _, rank in layers}
    return expected | {f"{name}.lora_B.weight": (fan_out, rank) for name, _, fan_out, rank in layers}


def _check_keys(state: dict, expected: dict, directory: Path) -> None:
    for key in sorted(expected):
        if key not in state:
            raise UserError(f"adapter {directory} lacks {PEFT_PREFIX + key}, which the model needs; "
                            "it was saved for a different base model or target list")
    for key in sorted(state):
        if key not in expected:
            raise UserError(f"adapter {directory} holds {PEFT_PREFIX + key}, which matches no LoRA layer of "
                            "the model; it was saved for a different base model or target list")
        if tuple(state[key].shape) != expected[key]:
            raise UserError(f"adapter tensor {PEFT_PREFIX + key} has shape {list(state[key].shape)}, but the "
                            f"model needs {list(expected[key])}; the adapter belongs to a different base model or rank")


def load_adapter(model: nn.Module, directory, base_model: str | None = None) -> nn.Module:
    """Load a peft LoRA adapter into the model in place (adding LoRA layers where it has none)."""
    directory = Path(directory)
    config, tensors = _read_adapter(directory)
    r, alpha, dropout = _plain_lora_settings(config, directory, base_model)
    state = _adapter_tensors(tensors, directory)
    targets = config.get("target_modules")  # the adapted module names; a regex or nothing: the keys' last names
    if isinstance(targets, str) or not targets:
        targets = sorted({key.rsplit(".", 2)[0].rsplit(".", 1)[-1] for key in state})
    targets = tuple(targets)
    _check_keys(state, _expected_shapes(model, r, alpha, targets, directory / ADAPTER_CONFIG), directory)
    if not lora_modules(model):
        apply_lora(model, r, alpha, dropout, targets)
    with torch.no_grad():
        for name, m in lora_modules(model):
            m.lora_A.weight.copy_(state[f"{name}.lora_A.weight"])
            m.lora_B.weight.copy_(state[f"{name}.lora_B.weight"])
    return model
