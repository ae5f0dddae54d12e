"""LoRA (Hu et al. 2021) for the encoder's linears, with adapters in peft's file layout.

References: LoRA (arXiv 2106.09685). Matches peft's `tuners/lora/layer.py` (`Linear`: init,
scaling alpha / r, dropout, merge) and peft's adapter files (`adapter_config.json`,
`adapter_model.safetensors`).

A LoRA layer keeps the pretrained weight W frozen and learns a low-rank correction:

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T        A: [r, in], B: [out, r]

A starts kaiming-uniform (a = sqrt(5), as peft) and B at zero, so training starts from the
pretrained model exactly. Merging folds the correction into the weight, W <- W + (alpha/r) B A,
after which the layer is a plain linear again (unmerge subtracts it back).

Diffutron (2603.20466) adapts every per-layer linear: attn.Wqkv, attn.Wo, mlp.Wi and mlp.Wo
(the name "Wo" matches both, as peft's `target_modules` name matching does); the MLM head is
not adapted. Parameter names follow peft so adapters cross in both directions:
    model.layers.0.attn.Wqkv.weight         the frozen base weight (plain transformers key)
    model.layers.0.attn.Wqkv.lora_A.weight  [r, in]
    model.layers.0.attn.Wqkv.lora_B.weight  [out, r]
and in `adapter_model.safetensors` the same names behind peft's "base_model.model." prefix.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from torch import nn

from minidiff.errors import UserError
from minidiff.plumbing.files import atomic_path, write_json

DEFAULT_TARGETS = ("Wqkv", "Wo", "Wi")
PEFT_PREFIX = "base_model.model."  # peft's key prefix for a model wrapped without a task type
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class LoRALinear(nn.Module):
    """A frozen linear plus a trainable rank-r correction (see the module docstring).

    The base `weight` and `bias` are the wrapped linear's own Parameter objects (not copies),
    registered directly on this module so their state-dict keys stay `...Wqkv.weight`.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight  # [out, in]
        self.bias = base.bias  # [out] or None
        self.r = r
        self.alpha = alpha
        self.dropout_p = dropout
        # scaling = alpha / r  (plain LoRA, not rsLoRA's alpha / sqrt(r))
        self.scaling = alpha / r
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **like)  # A: [r, in]
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **like)  # B: [out, r]
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        # A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in));  B = 0, so B A = 0 at start
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) B A, in fp32: the correction merging adds to W.  [out, in]"""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # y = x W^T + b
        y = nn.functional.linear(x, self.weight, self.bias)  # [..., out]
        if self.merged:  # W already holds W + (alpha/r) B A
            return y
        # y += (alpha / r) * B(A(dropout(x)))
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        # W <- W + (alpha / r) B A   (computed in fp32, stored in W's dtype)
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        # W <- W - (alpha / r) B A
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, "
                f"dropout={self.dropout_p}, merged={self.merged}")


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """Every LoRALinear in the model with its module name (`model.layers.0.attn.Wqkv`)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def _layers(model: nn.Module) -> nn.Module:
    try:
        return model.model.layers
    except AttributeError:
        raise TypeError("apply_lora expects a ModernBertMLM (with model.model.layers)") from None


def _target_linears(model: nn.Module, targets) -> list[tuple[str, nn.Module]]:
    """(full name, module) of every nn.Linear or LoRALinear inside model.model.layers whose
    last name component is one of `targets`; a target that matches nothing is a UserError."""
    layers = _layers(model)
    prefix = next(name for name, m in model.named_modules() if m is layers)
    found, matched = [], set()
    for name, module in layers.named_modules():
        last = name.rsplit(".", 1)[-1]
        if last in targets and isinstance(module, (nn.Linear, LoRALinear)):
            found.append((f"{prefix}.{name}", module))
            matched.add(last)
    missing = [t for t in targets if t not in matched]
    if missing:
        raise UserError(
            f"LoRA target {missing[0]!r} matches no linear layer of the encoder; expected names "
            f"among {sorted({n.rsplit('.', 1)[-1] for n, m in layers.named_modules() if isinstance(m, nn.Linear)})}"
        )
    return found


def _check_hyperparameters(r, alpha, dropout) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise UserError(f"LoRA rank r must be a positive integer, got {r!r}")
    if not alpha > 0:
        raise UserError(f"LoRA alpha must be positive, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"LoRA dropout must lie in [0, 1), got {dropout!r}")


def _normalize_targets(targets) -> tuple[str, ...]:
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if not targets:
        raise UserError("LoRA targets are empty; expected module names such as ('Wqkv', 'Wo', 'Wi')")
    return targets


def apply_lora(model: nn.Module, r: int, alpha: float, dropout: float = 0.0,
               targets=DEFAULT_TARGETS) -> nn.Module:
    """Replace the target linears of every encoder layer by LoRALinear and freeze the rest.

    In place; returns the model. Afterwards exactly the lora_A / lora_B weights require grad
    (base weights, norms, embeddings and the head are frozen).
    """
    _check_hyperparameters(r, alpha, dropout)
    targets = _normalize_targets(targets)
    if lora_modules(model):
        raise UserError("LoRA is already applied to this model; apply it once (or load_adapter into it)")
    for name, linear in _target_linears(model, targets):
        parent_name, _, child = name.rpartition(".")
        model.get_submodule(parent_name).register_module(child, LoRALinear(linear, r, alpha, dropout).train(linear.training))
    for p in model.parameters():
        p.requires_grad_(False)
    for _, m in lora_modules(model):
        m.lora_A.weight.requires_grad_(True)
        m.lora_B.weight.requires_grad_(True)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (in place): W <- W + (alpha/r) B A."""
    for _, m in lora_modules(model):
        m.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo merge_lora (in place): W <- W - (alpha/r) B A."""
    for _, m in lora_modules(model):
        m.unmerge()
    return model


def lora_report(model: nn.Module) -> str:
    """'trainable 54,067,200 of 361,853,440 (14.94%)': parameters counted once even when tied."""
    distinct = {id(p): p for p in model.parameters()}.values()
    total = sum(p.numel() for p in distinct)
    trainable = sum(p.numel() for p in distinct if p.requires_grad)
    return f"trainable {trainable:,} of {total:,} ({100.0 * trainable / max(total, 1):.2f}%)"


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The merged base weights under the plain transformers keys, lora tensors left out.

    What `model.save_pretrained(dir, state_dict=...)` needs to export a LoRA-trained model as
    an ordinary checkpoint. The model itself is not changed.
    """
    state = {k: v for k, v in model.state_dict().items() if ".lora_A." not in k and ".lora_B." not in k}
    for name, m in lora_modules(model):
        if not m.merged:
            # W + (alpha / r) B A, without touching m.weight
            state[f"{name}.weight"] = (m.weight.detach().float() + m.delta_weight().detach()).to(m.weight.dtype)
    return state


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The lora_A / lora_B weights under minidiff's (= transformers-relative) names."""
    out = {}
    for name, m in lora_modules(model):
        out[f"{name}.lora_A.weight"] = m.lora_A.weight.detach()
        out[f"{name}.lora_B.weight"] = m.lora_B.weight.detach()
    return out


def _adapter_settings(model: nn.Module) -> dict:
    modules = lora_modules(model)
    if not modules:
        raise UserError("the model has no LoRA layers; call apply_lora (or load_adapter) first")
    settings = {(m.r, m.alpha, m.dropout_p) for _, m in modules}
    if len(settings) != 1:
        raise UserError(f"LoRA layers disagree on (r, alpha, dropout): {sorted(settings)}; peft's layout needs one")
    r, alpha, dropout = settings.pop()
    targets = sorted({name.rsplit(".", 1)[-1] for name, _ in modules})
    return {"r": r, "alpha": alpha, "dropout": dropout, "targets": targets}


def save_adapter(model: nn.Module, directory, base_model: str | None = None) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` in peft's layout.

    `PeftModel.from_pretrained(transformers_model, directory)` loads it; so does load_adapter.
    Files are written under temporary names and renamed, weights first and config last.
    """
    from safetensors.torch import save_file

    settings = _adapter_settings(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "auto_mapping": {
            "base_model_class": "ModernBertForMaskedLM",
            "parent_library": "transformers.models.modernbert.modeling_modernbert",
        },
        "base_model_name_or_path": base_model,
        "revision": None,
        "inference_mode": True,
        "r": settings["r"],
        "lora_alpha": settings["alpha"],
        "lora_dropout": settings["dropout"],
        "target_modules": settings["targets"],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    tensors = {PEFT_PREFIX + k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    with atomic_path(directory / ADAPTER_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_json(directory / ADAPTER_CONFIG, config)
    return directory


def _read_adapter(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    config_path = directory / ADAPTER_CONFIG
    weights_path = directory / ADAPTER_WEIGHTS
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
    try:
        tensors = load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise UserError(f"{weights_path} is not a readable safetensors file ({err})") from None
    return config, tensors


def _same_base(a: str, b: str) -> bool:
    """Equal ids/paths, or the same final component (a hub id and its local copy)."""
    a, b = a.rstrip("/"), b.rstrip("/")
    return a == b or a.rsplit("/", 1)[-1] == b.rsplit("/", 1)[-1]


def load_adapter(model: nn.Module, directory, base_model: str | None = None) -> nn.Module:
    """Load a peft LoRA adapter (saved by peft or by save_adapter) into the model, in place.

    If the model has no LoRA layers yet, they are added with the adapter's r, lora_alpha,
    lora_dropout and target_modules. Every key and shape is checked against the model before
    anything changes; `base_model`, when given, must agree with the adapter's
    `base_model_name_or_path`.
    """
    directory = Path(directory)
    config, tensors = _read_adapter(directory)
    where = directory / ADAPTER_CONFIG
    if config.get("peft_type") != "LORA":
        raise UserError(f"{where} has peft_type {config.get('peft_type')!r}; expected 'LORA'")
    # options beyond plain LoRA: each must be off (False, None, {} or [])
    for key in ("use_dora", "use_rslora", "fan_in_fan_out", "lora_bias", "rank_pattern", "alpha_pattern",
                "modules_to_save", "layers_to_transform", "layer_replication", "exclude_modules",
                "target_parameters", "trainable_token_indices"):
        if config.get(key):
            raise UserError(f"{where} sets {key}={config[key]!r}; minidiff loads only plain LoRA adapters")
    if config.get("bias") not in (None, "none"):
        raise UserError(f"{where} sets bias={config['bias']!r}; minidiff loads only adapters with bias 'none'")
    named_base = config.get("base_model_name_or_path")
    if base_model is not None and named_base and not _same_base(str(base_model), str(named_base)):
        raise UserError(f"adapter {directory} was trained on {named_base!r}, not on the base model {base_model!r}")
    r, alpha, dropout = config.get("r"), config.get("lora_alpha"), config.get("lora_dropout", 0.0) or 0.0
    _check_hyperparameters(r, alpha, dropout)

    # peft keys: base_model.model.<name>.lora_{A,B}.weight  ->  <name>.lora_{A,B}.weight
    state = {}
    for key, value in tensors.items():
        if not key.startswith(PEFT_PREFIX) or not re.search(r"\.lora_[AB]\.weight$", key):
            raise UserError(f"{directory / ADAPTER_WEIGHTS} holds {key!r}; expected "
                            f"'{PEFT_PREFIX}<module>.lora_A.weight' / '.lora_B.weight' keys only")
        state[key[len(PEFT_PREFIX):]] = value
    adapted = sorted({k.rsplit(".", 2)[0] for k in state})  # module names
    target_modules = config.get("target_modules")
    if isinstance(target_modules, str) or not target_modules:  # a regex (or nothing): use the keys
        targets = tuple(sorted({name.rsplit(".", 1)[-1] for name in adapted}))
    else:
        targets = tuple(target_modules)

    # the keys and shapes the model has (or will have once LoRA is applied)
    existing = lora_modules(model)
    if existing:
        if any(m.merged for _, m in existing):
            raise UserError("the model's LoRA layers are merged; call unmerge_lora(model) before load_adapter")
        alphas = {m.alpha for _, m in existing}
        if alphas != {alpha}:
            raise UserError(f"{where} has lora_alpha {alpha}, but the model's LoRA layers use {sorted(alphas)}")
        layers = [(name, m.in_features, m.out_features, m.r) for name, m in existing]
    else:
        layers = [(name, m.in_features, m.out_features, r) for name, m in _target_linears(model, targets)]
    expected = {}
    for name, fan_in, fan_out, rank in layers:
        expected[f"{name}.lora_A.weight"] = (rank, fan_in)
        expected[f"{name}.lora_B.weight"] = (fan_out, rank)
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

    if not existing:
        apply_lora(model, r, alpha, dropout, targets)
    with torch.no_grad():
        for name, m in lora_modules(model):
            m.lora_A.weight.copy_(state[f"{name}.lora_A.weight"])
            m.lora_B.weight.copy_(state[f"{name}.lora_B.weight"])
    return model
