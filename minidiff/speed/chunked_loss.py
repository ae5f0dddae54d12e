"""The diffusion losses without the [N, V] logits: the vocabulary swept one chunk of rows at a time.

References: Liger-Kernel's fused linear cross-entropy (Hsu et al., arXiv 2410.10989) and Cut
Cross-Entropy (Wijmans et al., arXiv 2411.09009); here in plain PyTorch, with no custom kernel.
For head features f_i [H] at N selected rows, the decoder (W [V, H], b [V]), targets y_i, row
weights w_i and an optional excluded column m (<mask>, removed from the softmax):
    z_i = W f_i + b,  z_im = -inf;    loss = sum_i w_i (logsumexp(z_i) - z_i[y_i])
    d loss / d z_i = w_i (softmax(z_i) - onehot(y_i))  =: g_i
    d loss / d f_i = g_i W,   d loss / d W = sum_i g_i^T f_i,   d loss / d b = sum_i g_i
The forward pass computes the loss and these gradients in one sweep over chunks of rows of at
most `LOGITS_BUDGET_BYTES` of logits; backward only scales them. Under autocast the matmuls run
in the autocast dtype, each chunk's softmax in fp32; a frozen decoder (LoRA) gets no [V, H]
gradient. `nelbo_loss` and `masked_ce_per_row` are diffusion's, chunked (docs/math.md section 8).
"""
from __future__ import annotations

import torch

from minidiff import diffusion
from minidiff.model import ModernBertMLM
from minidiff.speed.packed import linear

# Bytes of logits one chunk may hold: 256 MiB = 262 rows of a 256,000-token fp32 vocabulary.
LOGITS_BUDGET_BYTES = 256 * 2**20


def rows_per_chunk(vocab_size: int, dtype: torch.dtype, budget_bytes: int | None = None) -> int:
    """How many rows of [*, vocab_size] logits in `dtype` (at least fp32) fit in the budget."""
    budget = LOGITS_BUDGET_BYTES if budget_bytes is None else budget_bytes
    itemsize = torch.promote_types(dtype, torch.float32).itemsize
    return max(1, budget // (vocab_size * itemsize))


def _decoder_for_matmuls(weight, bias):
    """The decoder cast once to the autocast dtype (autocast does not cache casts of frozen
    weights, so each chunk would recast all of [V, H]); unchanged without autocast."""
    device_type = weight.device.type
    dtype = torch.get_autocast_dtype(device_type)
    if not torch.is_autocast_enabled(device_type) or weight.dtype == dtype:
        return weight, bias
    return weight.to(dtype), None if bias is None else bias.to(dtype)


def _chunk_logits(features, weight, bias, excluded_column):
    # z = f W^T + b   [c, H] -> [c, V], in the autocast dtype under autocast (packed.linear: oneDNN on the CPU)
    logits = linear(features, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # softmax in >= fp32
    if excluded_column is not None:
        logits[:, excluded_column] = float("-inf")
    return logits


def _chunk_ce(logits, targets):
    """CE_i = logsumexp(z_i) - z_i[y_i] and the log-normaliser.  [c, V] -> [c], [c]"""
    log_norm = torch.logsumexp(logits, dim=1)  # [c]
    return log_norm - logits.gather(1, targets[:, None]).squeeze(1), log_norm


def _sweep(features, weight, bias, targets, row_weights, excluded_column, budget_bytes, needs=(False,) * 3):
    """(sum_i w_i CE_i, CE [N], (d loss / d features, weight, bias) where `needs` asks), chunk by chunk."""
    n, vocab = features.shape[0], weight.shape[0]
    need_features, need_weight, need_bias = needs
    dtype = torch.promote_types(features.dtype, torch.float32)
    weights = row_weights.to(dtype)  # [N]
    token_ce = torch.empty(n, dtype=dtype, device=features.device)  # [N]
    grad_features = torch.zeros_like(features) if need_features else None  # [N, H]
    grad_weight = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, dtype)) if need_weight else None
    grad_bias = torch.zeros(vocab, dtype=dtype, device=weight.device) if need_bias else None  # [V]
    step = rows_per_chunk(vocab, features.dtype, budget_bytes)
    matmul_weight, matmul_bias = _decoder_for_matmuls(weight, bias)
    for start in range(0, n, step):
        rows = slice(start, start + step)
        f, y = features[rows], targets[rows]  # [c, H], [c]
        logits = _chunk_logits(f, matmul_weight, matmul_bias, excluded_column)  # [c, V]
        token_ce[rows], log_norm = _chunk_ce(logits, y)
        if not any(needs):
            continue
        # g = w (softmax(z) - onehot(y)), in place over the logits   [c, V]
        grad_logits = logits.sub_(log_norm[:, None]).exp_()
        grad_logits[torch.arange(f.shape[0], device=f.device), y] -= 1.0
        grad_logits.mul_(weights[rows, None])
        if need_features:
            # d loss / d f = g W   [c, H]
            grad_features[rows] = (grad_logits.to(matmul_weight.dtype) @ matmul_weight).to(features.dtype)
        if need_weight:
            # d loss / d W += g^T f   [V, H]
            grad_weight += grad_logits.t().to(f.dtype) @ f
        if need_bias:
            # d loss / d b += sum_rows g   [V]
            grad_bias += grad_logits.sum(0)
    return (weights * token_ce).sum(), token_ce, (grad_features, grad_weight, grad_bias)


class _LinearCrossEntropy(torch.autograd.Function):
    """loss = sum_i w_i CE(W f_i + b, y_i); gradients computed in forward (`_sweep`), chunk by chunk."""

    @staticmethod
    def forward(ctx, features, weight, bias, targets, row_weights, excluded_column, budget_bytes):
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        loss, token_ce, grads = _sweep(features, weight, bias, targets, row_weights, excluded_column, budget_bytes,
                                       needs)
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(token_ce)
        return loss, token_ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_token_ce):
        # d out / d x = (d out / d loss) * (d loss / d x), the latter saved by forward
        scaled = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        return (*scaled, None, None, None, None)


def linear_cross_entropy(features, weight, bias, targets, row_weights, *, excluded_column=None,
                         budget_bytes: int | None = None):
    """(sum_i w_i CE_i, CE [N]) for logits z_i = W f_i + b that never exist all at once: features
    [N, H] (the head's output at the selected rows), weight [V, H] and bias [V] or None (the decoder;
    a tied weight gets its gradient like any other), targets [N], row_weights [N]. Only the loss
    carries a gradient. budget_bytes: logits per chunk (default LOGITS_BUDGET_BYTES)."""
    args = (features, weight, bias, targets, row_weights, excluded_column, budget_bytes)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (features, weight, bias)):
        return _LinearCrossEntropy.apply(*args)
    return _sweep(*args)[:2]


def decoder_cross_entropy(model, xt, selected, targets, weights, *, attention_mask=None, excluded_id=None):
    """(sum_i w_i CE_i, CE [N]) at the selected positions (bool [B, S]) of the model's input xt
    [B, S]; targets [B, S] and weights ([B, S] or broadcastable) are read where selected. A
    ModernBertMLM (possibly inside DistributedDataParallel) gives head features for
    `linear_cross_entropy`; any other model gives logits [N, V] (diffusion.masked_cross_entropy)."""
    inner = getattr(model, "module", model)  # DistributedDataParallel keeps the model in .module
    if not isinstance(inner, ModernBertMLM):
        return diffusion.masked_cross_entropy(model, xt, selected, targets, weights, attention_mask=attention_mask,
                                              excluded_id=excluded_id)
    targets = targets[selected]  # [N], row-major
    weights = torch.as_tensor(weights, device=xt.device).expand(selected.shape)[selected]  # [N]
    features = model(xt, attention_mask, logits_at=selected, decode=False)  # [N, H]
    return linear_cross_entropy(features, inner.decoder.weight, inner.decoder.bias, targets,
                                weights, excluded_column=excluded_id)


def nelbo_loss(model, x0, mask_id: int, **options):
    """diffusion.nelbo_loss, chunk by chunk: (loss, num_masked), same arguments, draws and value."""
    return diffusion.nelbo_loss(model, x0, mask_id, cross_entropy=decoder_cross_entropy, **options)


def masked_ce_per_row(model, x0, is_masked, mask_id: int, attention_mask=None):
    """diffusion.masked_ce_per_row, chunk by chunk: sum_{i masked in row b} CE_i per row [B] float64."""
    return diffusion.masked_ce_per_row(model, x0, is_masked, mask_id, attention_mask,
                                       cross_entropy=decoder_cross_entropy)
