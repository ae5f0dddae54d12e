"""Absorbing-state (masked) diffusion: schedules, the forward process, the NELBO, likelihoods.

References: MDLM (arXiv 2406.07524: the NELBO, the schedules, stratified t), LLaDA (2502.09992:
the l/L likelihood estimator), ARDM (2110.02037) and RADD (2406.03736): the any-order identity.
Forward process: each maskable token of x0 stays itself with probability alpha(t), else becomes
<mask>; t ~ U(eps, 1), one t per sequence. The continuous-time NELBO bounds -log p(x0):
    NELBO = E_t E_{x_t} [ w(t) * sum_{i masked} -log p(x0_i | x_t) ],   w(t) = -alpha'(t) / (1 - alpha(t))
Summed over the subsets M of masked positions it is exact and schedule-free (`exact_nelbo`):
    NELBO = sum_{M != {}} (|M|-1)! (L-|M|)! / L! * sum_{i in M} -log p(x0_i | x0 with M masked)
LLaDA's estimator (`mc_loglik`) draws |M| = l uniform in 1..L and M uniform of that size, and
scores (L / l) * sum_{i in M} CE. The model never predicts <mask>: its logit leaves every softmax.

    loss, n = nelbo_loss(model, ids, tok.mask_id, maskable=labels != -100)
    logp = mc_loglik(model, prompt_ids, answer_ids, tok.mask_id, num_samples=32)

The losses here read dense logits at the masked positions; minidiff/speed/chunked_loss.py computes
the same values without the [N, V] logits. Derivations: docs/math.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minidiff.errors import UserError

# ---------------------------------------------------------------------------------------------
# Schedules: alpha(t) = P(token still itself at time t), decreasing from ~1 at t=0 to ~0 at t=1.
# Each class gives mask_prob(t) = 1 - alpha(t) in closed form (no cancellation at small t).
# ---------------------------------------------------------------------------------------------


class Schedule:
    """alpha(t), alpha'(t) and the NELBO weight w(t) = -alpha'(t) / (1 - alpha(t))."""

    name = "schedule"

    def mask_prob(self, t):
        raise NotImplementedError

    def alpha_prime(self, t):
        raise NotImplementedError

    def alpha(self, t):
        # alpha(t) = 1 - P(masked at t)
        return 1.0 - self.mask_prob(t)

    def weight(self, t):
        # w(t) = -alpha'(t) / (1 - alpha(t))
        return -self.alpha_prime(t) / self.mask_prob(t)


@dataclass
class LinearSchedule(Schedule):
    """alpha(t) = 1 - t: mask probability t, weight 1/t (dllm's default, what Diffutron ran)."""

    name = "linear"

    def mask_prob(self, t):
        # 1 - alpha(t) = t
        return torch.as_tensor(t)

    def alpha_prime(self, t):
        # alpha'(t) = -1
        return -torch.ones_like(torch.as_tensor(t))


@dataclass
class CosineSchedule(Schedule):
    """alpha(t) = 1 - cos(pi/2 (1 - t)): mask probability sin(pi t / 2), weight (pi/2) cot(pi t / 2)."""

    name = "cosine"

    def mask_prob(self, t):
        # 1 - alpha(t) = cos(pi/2 (1 - t)) = sin(pi t / 2)
        return torch.sin(torch.as_tensor(t) * (math.pi / 2))

    def alpha_prime(self, t):
        # alpha'(t) = -(pi/2) sin(pi/2 (1 - t)) = -(pi/2) cos(pi t / 2)
        return -(math.pi / 2) * torch.cos(torch.as_tensor(t) * (math.pi / 2))


@dataclass
class LogLinearSchedule(Schedule):
    """MDLM's LogLinearNoise: total noise sigma(t) = -log(1 - (1-eps) t), alpha(t) = exp(-sigma(t)).

    So alpha(t) = 1 - (1-eps) t: linear with the mask probability capped at 1 - eps at t=1, and
    weight -alpha'/(1-alpha) = (1-eps) / ((1-eps) t) = 1/t, the same as the linear schedule.
    """

    eps: float = 1e-3
    name = "loglinear"

    def mask_prob(self, t):
        # 1 - alpha(t) = 1 - exp(-sigma(t)) = (1 - eps) t
        return (1.0 - self.eps) * torch.as_tensor(t)

    def alpha_prime(self, t):
        # alpha'(t) = -(1 - eps)
        return -(1.0 - self.eps) * torch.ones_like(torch.as_tensor(t))


SCHEDULES = {"linear": LinearSchedule, "cosine": CosineSchedule, "loglinear": LogLinearSchedule}


def get_schedule(schedule: str | Schedule = "linear") -> Schedule:
    """A schedule object from its name ("linear", "cosine", "loglinear"); objects pass through."""
    if isinstance(schedule, Schedule):
        return schedule
    if schedule not in SCHEDULES:
        raise UserError(f"unknown noise schedule {schedule!r}; expected one of {sorted(SCHEDULES)}")
    return SCHEDULES[schedule]()


# ---------------------------------------------------------------------------------------------
# Time sampling and the forward (masking) process.
# ---------------------------------------------------------------------------------------------


def _draw_device(generator, device):
    if device is not None:
        return torch.device(device)
    return generator.device if generator is not None else torch.device("cpu")


def sample_t(batch: int, eps: float = 1e-3, stratified: bool = False, generator=None, device=None):
    """Diffusion times [batch] in [eps, 1).

    iid (dllm):        t_i = eps + (1 - eps) u_i
    stratified (MDLM): t_i = eps + (1 - eps) (u_i + i) / n, one draw in each of n equal strata
    (MDLM's `_sample_t` with antithetic_sampling: `(u / n + arange(n) / n) % 1`).
    """
    u = torch.rand(batch, generator=generator, device=_draw_device(generator, device))  # [B]
    if stratified:
        # (u_i + i) / n: sample i lands in the stratum [i/n, (i+1)/n)
        u = (u + torch.arange(batch, device=u.device)) / batch
    # t = eps + (1 - eps) u
    return eps + (1.0 - eps) * u


def _maskable_or_all(x0, maskable, attention_mask=None):
    """Positions that may be masked: `maskable` and the real (attended) tokens, default all."""
    result = torch.ones_like(x0, dtype=torch.bool) if maskable is None else maskable.bool()
    if attention_mask is not None:
        result = result & attention_mask.bool()
    return result


def corrupt(x0, t, mask_id: int, maskable=None, generator=None, schedule="linear"):
    """Forward process q(x_t | x0): (xt [B, S], is_masked [B, S] bool).

    Each maskable token is replaced by mask_id independently with probability 1 - alpha(t_b)
    (t: [B], one time per sequence); positions not maskable (SFT prompt, padding) never change.
    """
    schedule = get_schedule(schedule)
    maskable = _maskable_or_all(x0, maskable)
    # P(masked) = 1 - alpha(t), per row
    mask_prob = schedule.mask_prob(t).to(torch.float32).reshape(-1, 1)  # [B, 1] (or [1, 1])
    u = torch.rand(x0.shape, generator=generator, device=x0.device)  # [B, S]
    is_masked = (u < mask_prob) & maskable  # [B, S]
    xt = torch.where(is_masked, torch.full_like(x0, mask_id), x0)
    return xt, is_masked


def token_cross_entropy(logits, targets, excluded_id: int | None):
    """-log softmax(logits)[target] per row, the column excluded_id (<mask>) removed from the
    softmax unless None: logits [N, V], targets [N] -> [N] in >= fp32."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if excluded_id is not None:
        is_excluded = torch.arange(logits.shape[-1], device=logits.device) == excluded_id  # [V]
        logits = logits.masked_fill(is_excluded, float("-inf"))
    return F.cross_entropy(logits, targets, reduction="none")


# ---------------------------------------------------------------------------------------------
# The training objective.
# ---------------------------------------------------------------------------------------------


def nelbo_normalizer(maskable, normalize: str = "sequence", attention_mask=None) -> torch.Tensor:
    """What `nelbo_loss` divides the batch's weighted CE sum by (0-d float32, no host copy).

    "token": the maskable-token count of the batch; "sequence": the number of rows (each row's
    sum is first divided by its own maskable count). A trainer that accumulates micro-batches
    weights micro-batch m by this number, so that sum_m loss_m * n_m / sum_m n_m is the loss
    of the whole batch.
    """
    if normalize not in ("sequence", "token"):
        raise UserError(f"normalize={normalize!r} is not known; expected 'sequence' or 'token'")
    maskable = _maskable_or_all(maskable, maskable, attention_mask)  # [B, S]
    if normalize == "token":
        return maskable.sum().clamp(min=1).to(torch.float32)
    return maskable.new_full((), maskable.shape[0], dtype=torch.float32)


def nelbo_draw(x0, mask_id: int, *, maskable=None, attention_mask=None, schedule="linear",
               normalize: str = "sequence", stratified: bool = False, eps: float = 1e-3, t=None,
               generator=None):
    """One draw of the NELBO's times and masks: (xt [B, S], is_masked [B, S], row weight [B] f64).

    The loss of the draw is sum_b weight_b * sum_{i masked in row b} CE_i, with
    normalize="sequence" (dllm): weight_b = w(t_b) / |maskable_b| / B (the mean over rows);
    normalize="token" (MDLM):    weight_b = w(t_b) / sum_b |maskable_b|.
    maskable [B, S] bool defaults to every position (never padding under an attention_mask);
    t [B] (or a number) overrides the drawn times.
    """
    schedule = get_schedule(schedule)
    maskable = _maskable_or_all(x0, maskable, attention_mask)  # [B, S]
    denominator = nelbo_normalizer(maskable, normalize).double()  # rows, or maskable tokens
    if t is None:
        t = sample_t(x0.shape[0], eps, stratified, generator, device=x0.device)  # [B]
    t = torch.as_tensor(t, dtype=torch.float32, device=x0.device).expand(x0.shape[0])  # [B]
    xt, is_masked = corrupt(x0, t, mask_id, maskable, generator, schedule)
    weight = schedule.weight(t).double()  # w(t_b)   [B]
    if normalize == "sequence":
        # w(t_b) / |maskable_b|: each row's per-token mean, before the mean over rows
        weight = weight / maskable.sum(1).clamp(min=1)
    # / B (sequence) or / sum_b |maskable_b| (token)
    return xt, is_masked, weight / denominator


def nelbo_loss(model, x0, mask_id: int, *, maskable=None, attention_mask=None, schedule="linear",
               normalize: str = "sequence", stratified: bool = False, eps: float = 1e-3, t=None,
               generator=None):
    """One Monte-Carlo draw of the continuous-time NELBO (MDLM; docs/math.md): (loss, num_masked).

    x0 [B, S] clean ids; the other arguments are `nelbo_draw`'s. An empty draw gives a zero that
    still backpropagates.
    """
    xt, is_masked, row_weight = nelbo_draw(
        x0, mask_id, maskable=maskable, attention_mask=attention_mask, schedule=schedule,
        normalize=normalize, stratified=stratified, eps=eps, t=t, generator=generator)
    logits = model(xt, attention_mask, logits_at=is_masked)  # [N, V] at the masked positions
    # CE_i = -log p(x0_i | x_t), the <mask> column out of the softmax
    token_ce = token_cross_entropy(logits, x0[is_masked], mask_id)  # [N]
    weight = row_weight[:, None].expand_as(x0)[is_masked]  # [N] each position's row weight
    # loss = sum_b weight_b sum_{i masked in row b} CE_i
    return (weight.to(token_ce) * token_ce).sum(), is_masked.sum()


# ---------------------------------------------------------------------------------------------
# Likelihoods: the exact NELBO and the likelihood of an answer.
# ---------------------------------------------------------------------------------------------

MAX_EXACT_LENGTH = 16  # 2^16 - 1 masks: the longest sequence the exact sums enumerate


def _model_device(model) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def masked_ce_per_row(model, x0, is_masked, mask_id: int, attention_mask=None):
    """C(M_b) = sum_{i masked in row b} -log p(x0_i | x0 with M_b masked) per row: [B] float64,
    for x0 [B, S] and the masks is_masked [B, S] (<mask> out of the softmax)."""
    xt = torch.where(is_masked, torch.full_like(x0, mask_id), x0)  # [B, S]
    logits = model(xt, attention_mask, logits_at=is_masked)  # [N, V]
    token_ce = token_cross_entropy(logits, x0[is_masked], mask_id).double()  # [N]
    per_position = torch.zeros(x0.shape, dtype=torch.float64, device=x0.device)  # [B, S]
    return per_position.masked_scatter(is_masked, token_ce).sum(1)


def all_masks(L: int, subsets: range | None = None, device=None):
    """The non-empty subsets M of L positions (the ones numbered `subsets`, default all 2^L - 1)
    with their weight in the exact NELBO: (masked [K, L] bool, (|M|-1)! (L-|M|)! / L! [K] float64)."""
    subsets = range(2**L - 1) if subsets is None else subsets
    # subset s is the number s + 1 written in bits over the positions
    codes = torch.arange(subsets.start + 1, subsets.stop + 1, device=device)[:, None]  # [K, 1]
    bits = (codes >> torch.arange(L, device=device)) & 1  # [K, L]
    # weight(m) = (m-1)! (L-m)! / L!, as exp of log-gammas in float64
    m = bits.sum(1).double()  # [K]
    return bits.bool(), torch.exp(torch.lgamma(m) + torch.lgamma(L - m + 1) - math.lgamma(L + 1))


@torch.no_grad()
def exact_nelbo(model, x0, mask_id: int, maskable=None, *, batch_size: int = 256) -> float:
    """The NELBO of one sequence x0 [S], exactly, by enumerating the 2^L - 1 masks (L <= 16).

        NELBO(x0) = sum_{M != {}} (|M|-1)! (L-|M|)! / L!  *  sum_{i in M} -log p(x0_i | x0 with M masked)

    over the subsets M of the L maskable positions. (|M|-1)!(L-|M|)!/L! = int_0^1 w(t) t^|M|
    (1-t)^(L-|M|) dt for the linear schedule, and the continuous NELBO is the same for every
    schedule. It equals the any-order-autoregressive NLL averaged over all orders.
    """
    x0 = torch.as_tensor(x0, dtype=torch.long).reshape(-1)  # [S]
    maskable = _maskable_or_all(x0, None if maskable is None else torch.as_tensor(maskable).reshape(-1))
    positions = maskable.nonzero().flatten()  # [L]
    L = positions.numel()
    if L > MAX_EXACT_LENGTH:
        raise UserError(f"exact_nelbo enumerates 2^L masks and accepts at most {MAX_EXACT_LENGTH} "
                        f"maskable positions; this sequence has {L}")
    device = _model_device(model)
    x0, positions = x0.to(device), positions.to(device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, 2**L - 1, batch_size):
        subsets, weight = all_masks(L, range(start, min(start + batch_size, 2**L - 1)), device)  # [b, L], [b]
        is_masked = torch.zeros(subsets.shape[0], x0.numel(), dtype=torch.bool, device=device)
        is_masked[:, positions] = subsets  # [b, S]
        # sum_M weight(M) C(M)
        total += (weight * masked_ce_per_row(model, x0.expand(len(weight), -1), is_masked, mask_id)).sum()
    return float(total)


def answer_sequence(prompt_ids, answer_ids):
    """(prompt + answer ids [S] long, L): the sequence whose last L tokens are the answer scored."""
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(-1)
    answer = torch.as_tensor(answer_ids, dtype=torch.long).reshape(-1)
    if answer.numel() == 0:
        raise UserError("an answer to score is empty; expected at least one answer token")
    return torch.cat([prompt, answer]), answer.numel()


def check_sample_counts(num_samples: int, batch_size: int) -> None:
    if num_samples < 1 or batch_size < 1:
        raise UserError(f"num_samples={num_samples} and batch_size={batch_size} must both be >= 1")


def stratum_offset(L: int, generator=None) -> torch.Tensor:
    """k ~ U{0 .. L-1} [1], drawn once per answer before its masks: it staggers their sizes
    (`draw_answer_masks`). On the generator's device (the CPU without one)."""
    return torch.randint(L, (1,), generator=generator, device=_draw_device(generator, None))


def draw_answer_masks(L: int, num_samples: int, offset, draws: range | None = None, generator=None):
    """LLaDA's draws j in `draws` (default all num_samples) for an answer of L tokens, offset k from
    `stratum_offset`: (masked [c, L] bool, weight L / l_j [c] float64).

    Draw j masks a uniform l_j-subset of the answer, l_j = ((k + floor(j L / n)) mod L) + 1: each
    l_j is uniform on 1..L and together they cover 1..L evenly. Drawing range after range consumes
    the generator as drawing them all at once, so memory can be set by the range, not by n.
    """
    draws = range(num_samples) if draws is None else draws
    j = torch.arange(draws.start, draws.stop, device=offset.device)  # [c]
    # l_j = ((k + floor(j L / n)) mod L) + 1
    num_masked = (offset + (j * L) // num_samples) % L + 1  # [c]
    # a uniform l-subset: the answer positions holding the l smallest uniform scores
    scores = torch.rand(len(draws), L, generator=generator, device=offset.device)  # [c, L]
    ranks = scores.argsort(dim=1).argsort(dim=1)
    return ranks < num_masked[:, None], L / num_masked.double()


@torch.no_grad()
def mc_loglik(model, prompt_ids, answer_ids, mask_id: int, *, num_samples: int = 32,
              batch_size: int = 32, generator=None) -> float:
    """LLaDA's Monte-Carlo estimate of log p(answer | prompt) (`get_log_likelihood.py`; docs/math.md).

    Sample j: l_j ~ U{1..L} (stratified over the samples), exactly l_j answer tokens masked, the
    prompt never; it scores v_j = (L / l_j) * sum_masked CE, the estimate is -mean_j v_j and its
    expectation -exact_nelbo over the answer positions, a lower bound on log p(answer | prompt).
    L = 1 is exact for any num_samples. Forwards of batch_size rows.
    """
    check_sample_counts(num_samples, batch_size)
    sequence, L = answer_sequence(prompt_ids, answer_ids)
    if L == 1:  # the one mask is the whole answer: exact
        return -exact_nelbo(model, sequence, mask_id, torch.arange(sequence.numel()) == sequence.numel() - 1)
    device = _model_device(model)
    sequence, offset = sequence.to(device), stratum_offset(L, generator)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, num_samples, batch_size):
        draws = range(start, min(start + batch_size, num_samples))
        masks, weight = draw_answer_masks(L, num_samples, offset, draws, generator)  # [b, L], [b]
        is_masked = torch.zeros(len(draws), sequence.numel(), dtype=torch.bool, device=device)
        is_masked[:, -L:] = masks.to(device)  # [b, S]
        # v_j = (L / l_j) C(M_j)
        ce = masked_ce_per_row(model, sequence.expand(len(draws), -1), is_masked, mask_id)  # [b]
        total += (weight.to(device) * ce).sum()
    # log p(answer | prompt) ~ -(1/n) sum_j v_j
    return -float(total) / num_samples
