"""LoRA (Hu et al., arXiv 2106.09685) for the encoder's linears: the layer, applying, merging,
unmerging. Matches peft's `tuners/lora/layer.py` (`Linear`: init, scaling alpha / r, dropout,
merge); parameter names follow peft, so adapters cross in both directions. The equations, the
adapted linears and the names: docs/math.md section 7; peft's adapter files: plumbing/peft_io.py."""
from __future__ import annotations

import math

import torch
from torch import nn

from minidiff.errors import UserError

DEFAULT_TARGETS = ("Wqkv", "Wo", "Wi")


class LoRALinear(nn.Module):
    """A frozen linear plus a trainable rank-r correction. The base `weight` and `bias` are the
    wrapped linear's own Parameters, registered here so their keys stay `...Wqkv.weight`."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # [out, in], [out] or None
        self.r, self.alpha, self.dropout_p = r, alpha, dropout
        self.scaling = alpha / r  # plain LoRA, not rsLoRA's alpha / sqrt(r)
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


def target_linears(model: nn.Module, targets) -> list[tuple[str, nn.Module]]:
    """(full name, module) of every nn.Linear or LoRALinear inside model.model.layers whose
    last name component is one of `targets`; a target that matches nothing is a UserError."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise TypeError("apply_lora expects a ModernBertMLM (with model.model.layers)")
    prefix = next(name for name, m in model.named_modules() if m is layers)
    found, matched = [], set()
    for name, module in layers.named_modules():
        last = name.rsplit(".", 1)[-1]
        if last in targets and isinstance(module, (nn.Linear, LoRALinear)):
            found.append((f"{prefix}.{name}", module))
            matched.add(last)
    missing = [t for t in targets if t not in matched]
    if missing:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in layers.named_modules() if isinstance(m, nn.Linear)})
        raise UserError(f"LoRA target {missing[0]!r} matches no linear layer of the encoder; "
                        f"expected names among {names}")
    return found


def check_hyperparameters(r, alpha, dropout) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise UserError(f"LoRA rank r must be a positive integer, got {r!r}")
    if not alpha > 0:
        raise UserError(f"LoRA alpha must be positive, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"LoRA dropout must lie in [0, 1), got {dropout!r}")


def apply_lora(model: nn.Module, r: int, alpha: float, dropout: float = 0.0,
               targets=DEFAULT_TARGETS) -> nn.Module:
    """Replace the target linears of every encoder layer by LoRALinear (in place; returns the
    model); afterwards exactly the lora_A / lora_B weights require grad."""
    check_hyperparameters(r, alpha, dropout)
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if not targets:
        raise UserError("LoRA targets are empty; expected module names such as ('Wqkv', 'Wo', 'Wi')")
    if lora_modules(model):
        raise UserError("LoRA is already applied to this model; apply it once (or load_adapter into it)")
    for name, linear in target_linears(model, targets):
        parent_name, _, child = name.rpartition(".")
        adapted = LoRALinear(linear, r, alpha, dropout).train(linear.training)
        model.get_submodule(parent_name).register_module(child, adapted)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)
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
    """The merged base weights under the plain transformers keys, lora tensors left out (an ordinary
    checkpoint of a LoRA-trained model); the model is not changed."""
    state = {k: v for k, v in model.state_dict().items() if ".lora_A." not in k and ".lora_B." not in k}
    for name, m in lora_modules(model):
        if not m.merged:
            # W + (alpha / r) B A, without touching m.weight
            state[f"{name}.weight"] = (m.weight.detach().float() + m.delta_weight().detach()).to(m.weight.dtype)
    return state


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The lora_A / lora_B weights under minidiff's (= transformers-relative) names."""
    return {f"{name}.{part}.weight": getattr(m, part).weight.detach()
            for name, m in lora_modules(model) for part in ("lora_A", "lora_B")}
