"""AdamW with fp32 state (and fp32 master copies of bf16/fp16 parameters), its parameter groups,
the warmup + cosine learning-rate schedule and gradient clipping: the update and why the master
copies, docs/math.md section 7. References: AdamW (arXiv 1711.05101), Adam (1412.6980). Matches
`torch.optim.AdamW` (bitwise), transformers' `get_cosine_schedule_with_warmup` and
`torch.nn.utils.clip_grad_norm_`."""
from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn

from minidiff.errors import UserError


def state_dtype(p: torch.Tensor) -> torch.dtype:
    """fp32 for bf16/fp16 parameters (and fp32 ones); the parameter's own dtype when wider."""
    return p.dtype if torch.finfo(p.dtype).bits >= 32 else torch.float32


class AdamW(torch.optim.Optimizer):
    """AdamW with multi-tensor (`torch._foreach_*`) updates. Per-parameter state: `step` (a Python
    int: bias corrections need no device sync), fp32 `exp_avg`, `exp_avg_sq` and, for bf16/fp16
    parameters, `master`."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        if not 0.0 <= lr < math.inf:
            raise UserError(f"learning rate must be finite and >= 0, got {lr!r}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise UserError(f"AdamW betas must lie in [0, 1), got {tuple(betas)!r}")
        if not 0.0 <= eps < math.inf:
            raise UserError(f"AdamW eps must be finite and >= 0, got {eps!r}")
        if not 0.0 <= weight_decay < math.inf:
            raise UserError(f"weight decay must be finite and >= 0, got {weight_decay!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            dtype = state_dtype(p)
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            if dtype != p.dtype:
                state["master"] = p.detach().to(dtype, copy=True)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, eps, (beta1, beta2) = group["lr"], group["weight_decay"], group["eps"], group["betas"]
            weights, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            lowp_params, lowp_masters = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("minidiff.optim.AdamW does not support sparse gradients")
                state = self._init_state(p)
                state["step"] += 1
                steps.append(state["step"])
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                master = state.get("master")  # bf16/fp16 parameter: the update goes to its fp32 master
                weights.append(p if master is None else master)
                grads.append(p.grad if master is None else p.grad.to(master.dtype))
                if master is not None:
                    lowp_params.append(p)
                    lowp_masters.append(master)
            if not weights:
                continue
            # p <- p (1 - lr wd)
            if wd != 0.0:
                torch._foreach_mul_(weights, 1.0 - lr * wd)
            # m <- beta1 m + (1 - beta1) g   (= lerp(m, g, 1 - beta1))
            torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
            # v <- beta2 v + (1 - beta2) g^2
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
            # step size lr / (1 - beta1^t);  denominator sqrt(v) / sqrt(1 - beta2^t) + eps
            step_sizes = [-(lr / (1.0 - beta1**t)) for t in steps]
            bias_correction2_sqrt = [(1.0 - beta2**t) ** 0.5 for t in steps]
            denominators = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_div_(denominators, bias_correction2_sqrt)
            torch._foreach_add_(denominators, eps)
            # p <- p - step_size * m / denominator
            torch._foreach_addcdiv_(weights, exp_avgs, denominators, step_sizes)
            if lowp_params:  # round the fp32 masters into the low-precision parameters
                torch._foreach_copy_(lowp_params, lowp_masters)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a `state_dict()`, state kept fp32 (torch's default casts it to a bf16 parameter's dtype)."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups)
        ):
            raise UserError("optimizer state does not match the model's parameter groups "
                            f"({[len(s['params']) for s in saved_groups]} saved vs "
                            f"{[len(g['params']) for g in self.param_groups]} now)")
        param_of = {pid: p for s, g in zip(saved_groups, self.param_groups) for pid, p in zip(s["params"], g["params"])}
        self.state = defaultdict(dict)
        for pid, saved in state_dict["state"].items():
            p = param_of[pid]
            restored = {}
            for key, value in saved.items():
                if torch.is_tensor(value):
                    if value.shape != p.shape:
                        raise UserError(f"optimizer state {key!r} has shape {list(value.shape)} for a parameter "
                                        f"of shape {list(p.shape)}; the checkpoint belongs to another model")
                    value = value.to(device=p.device, dtype=state_dtype(p), copy=True)
                restored[key] = value
            self.state[p] = restored
        for saved, group in zip(saved_groups, self.param_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into a decayed group (matrices) and an undecayed one
    (norm weights, biases, embeddings). Tied parameters appear once; empty groups are dropped."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # a tied tensor comes once
        if p.requires_grad:  # no decay for vectors (norm weights, biases) and embedding tables
            (no_decay if p.ndim < 2 or id(p) in embeddings else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _check_lr_schedule(warmup: int, total: int, peak_lr: float, min_lr: float) -> None:
    if warmup < 0:
        raise UserError(f"warmup steps must be >= 0, got {warmup}")
    if total <= warmup:
        raise UserError(f"total steps ({total}) must exceed the warmup steps ({warmup})")
    if not peak_lr >= 0.0:
        raise UserError(f"peak learning rate must be >= 0, got {peak_lr!r}")
    if not 0.0 <= min_lr <= peak_lr:
        raise UserError(f"minimum learning rate must lie in [0, peak lr {peak_lr}], got {min_lr!r}")


def warmup_cosine(step: int, *, warmup: int, total: int, peak_lr: float, min_lr: float = 0.0) -> float:
    """The learning rate of optimizer step `step` (0-based): 0 -> peak linearly, then cosine to min."""
    _check_lr_schedule(warmup, total, peak_lr, min_lr)
    if step < warmup:
        return peak_lr * step / warmup
    # min + (peak - min) (1 + cos(pi progress)) / 2,  progress = (step - warmup) / (total - warmup) <= 1
    progress = min(1.0, (step - warmup) / (total - warmup))
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine(torch.optim.lr_scheduler.LRScheduler):
    """warmup_cosine for every parameter group, its initial lr as peak: after `lr_schedule.step()`
    follows each `optimizer.step()`, the k-th optimizer step (k = 0, 1, ...) runs with warmup_cosine(k)."""

    def __init__(self, optimizer, *, warmup: int, total: int, min_lr: float = 0.0, last_epoch: int = -1):
        for group in optimizer.param_groups:
            _check_lr_schedule(warmup, total, group.get("initial_lr", group["lr"]), min_lr)
        self.warmup, self.total, self.min_lr = warmup, total, min_lr
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [warmup_cosine(self.last_epoch, warmup=self.warmup, total=self.total, peak_lr=base,
                              min_lr=self.min_lr) for base in self.base_lrs]


@torch.no_grad()
def grad_norm(params) -> torch.Tensor:
    """total = ||(g_1, ..., g_n)||_2 over every gradient, as a device tensor (no host sync)."""
    params = [params] if torch.is_tensor(params) else list(params)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    # per-tensor norms (in fp32 at least, even for bf16 grads), then the norm of those norms
    wide = torch.promote_types(grads[0].dtype, torch.float32)
    norms = torch._foreach_norm(grads, 2, dtype=wide)
    return torch.linalg.vector_norm(torch.stack([n.to(grads[0].device, wide) for n in norms]), 2)


@torch.no_grad()
def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """g_i <- g_i min(1, max_norm / (total + 1e-6)), total = grad_norm(params), which it returns
    (before clipping; no host sync; a non-finite norm passes through)."""
    params = [params] if torch.is_tensor(params) else list(params)
    total = grad_norm(params)
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    by_kind = defaultdict(list)  # one _foreach call per device and dtype
    for grad in (p.grad for p in params if p.grad is not None):
        by_kind[(grad.device, grad.dtype)].append(grad)
    for (device, dtype), grads in by_kind.items():
        torch._foreach_mul_(grads, scale.to(device, dtype))
    return total
