"""AdamW, its parameter groups, the warmup + cosine learning-rate schedule and gradient clipping.

References: AdamW (arXiv 1711.05101), Adam (1412.6980). Matches `torch.optim.AdamW` (bitwise),
transformers' `get_cosine_schedule_with_warmup` and `torch.nn.utils.clip_grad_norm_`.

AdamW (Loshchilov & Hutter 2019), the update torch.optim.AdamW performs, for step t = 1, 2, ...:

    p   <- p - lr * wd * p                      decoupled weight decay (not through the gradient)
    m   <- beta1 m + (1 - beta1) g              first moment
    v   <- beta2 v + (1 - beta2) g^2            second moment
    p   <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)   bias-corrected step

State is fp32 whatever the parameter dtype. For a bf16/fp16 parameter the optimizer also keeps
an fp32 master copy of it: the update is applied to the master and the result rounded into the
parameter, so updates smaller than the parameter's rounding step (lr * 1 vs a bf16 ulp of
|p| / 256) accumulate instead of being lost. Cost: 12 bytes of state per such parameter
(m, v, master), 8 per fp32 parameter. No 8-bit or paged state.
"""
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
    """AdamW with multi-tensor (`torch._foreach_*`) updates and fp32 state.

    Per-parameter state: `step` (a Python int, so bias corrections need no device sync),
    `exp_avg`, `exp_avg_sq` (fp32) and, for low-precision parameters, `master` (fp32).
    `state_dict()` / `load_state_dict()` round-trip exactly (state stays fp32 on load).
    """

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
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
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
                if "master" in state:  # bf16/fp16 parameter: update the fp32 master
                    weights.append(state["master"])
                    grads.append(p.grad.to(state["master"].dtype))
                    lowp_params.append(p)
                    lowp_masters.append(state["master"])
                else:
                    weights.append(p)
                    grads.append(p.grad)
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
        """Restore a `state_dict()`; unlike torch's default, state tensors stay fp32 for
        bf16/fp16 parameters (torch would cast them to the parameter's dtype, rounding m, v
        and the master copy)."""
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
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():  # parameters() already yields a tied tensor once
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        # no decay for vectors (norm weights, biases) and embedding tables
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
    """The lr schedule: the learning rate used for optimizer step `step` (0-based).

    step < warmup:          peak * step / warmup                             (0 -> peak)
    warmup <= step <= total: min + (peak - min) * (1 + cos(pi * progress)) / 2,
                            progress = (step - warmup) / (total - warmup)    (peak -> min)
    step > total:           min
    """
    _check_lr_schedule(warmup, total, peak_lr, min_lr)
    if step < warmup:
        return peak_lr * step / warmup
    progress = min(1.0, (step - warmup) / (total - warmup))
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine(torch.optim.lr_scheduler.LRScheduler):
    """The lr schedule object: warmup_cosine applied to every parameter group, with that
    group's initial lr as peak.

    Call `lr_schedule.step()` after each `optimizer.step()`; the k-th optimizer step (k = 0, 1,
    ...) then runs with warmup_cosine(k). `state_dict()` / `load_state_dict()` resume it.
    """

    def __init__(self, optimizer, *, warmup: int, total: int, min_lr: float = 0.0, last_epoch: int = -1):
        for group in optimizer.param_groups:
            _check_lr_schedule(warmup, total, group.get("initial_lr", group["lr"]), min_lr)
        self.warmup, self.total, self.min_lr = warmup, total, min_lr
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [warmup_cosine(self.last_epoch, warmup=self.warmup, total=self.total, peak_lr=base,
                              min_lr=self.min_lr) for base in self.base_lrs]

    _get_closed_form_lr = get_lr


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
    device = grads[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device, wide) for n in norms]), 2)


@torch.no_grad()
def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """Scale all gradients together so their global 2-norm is at most max_norm.

    total = ||(g_1, ..., g_n)||_2;   g_i <- g_i * min(1, max_norm / (total + 1e-6))
    Returns `total` (before clipping) as a tensor; no host sync, non-finite norms pass through
    (check the returned value if you want to skip such steps).
    """
    params = [params] if torch.is_tensor(params) else list(params)
    grads = [p.grad for p in params if p.grad is not None]
    total = grad_norm(params)
    if not grads:
        return total
    # scale = min(1, max_norm / (total + 1e-6))
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for dev_dtype, group in _by_device_and_dtype(grads).items():
        torch._foreach_mul_(group, scale.to(*dev_dtype))
    return total


def _by_device_and_dtype(tensors) -> dict:
    groups = defaultdict(list)
    for t in tensors:
        groups[(t.device, t.dtype)].append(t)
    return groups
