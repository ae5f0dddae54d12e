"""Absorbing-state (masked) diffusion: schedules, the forward process, the NELBO, likelihoods.
References: MDLM (arXiv 2406.07524: the NELBO, the schedules, stratified t), LLaDA (2502.09992:
the l/L likelihood estimator), ARDM (2110.02037) and RADD (2406.03736): the any-order identity.
Derivations, and the test of each identity: docs/math.md. The model never predicts <mask>: its
logit leaves every softmax.

    loss, n = nelbo_loss(model, ids, tok.mask_id, maskable=labels != -100)
    logp = mc_loglik(model, prompt_ids, answer_ids, tok.mask_id)

The losses here read dense logits at the masked positions; minidiff/speed/chunked_loss.py passes
`nelbo_loss` a cross-entropy that computes the same values without the [N, V] logits."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minidiff.errors import UserError
from minidiff.model import model_device

DEFAULT_MC_SAMPLES = 128  # Monte-Carlo samples per answer when a caller names none (every script's default)

# --- Schedules: alpha(t) = P(token still itself at time t), from ~1 at t=0 to ~0 at t=1; each
# gives mask_prob(t) = 1 - alpha(t) in closed form (no cancellation at small t). docs/math.md, 2.


class Schedule:
    """alpha(t) and the NELBO weight w(t) = -alpha'(t) / (1 - alpha(t)) from a subclass's
    mask_prob(t) = 1 - alpha(t) and alpha_prime(t)."""

    def alpha(self, t):
        # alpha(t) = 1 - P(masked at t)
        return 1.0 - self.mask_prob(t)

    def weight(self, t):
        # w(t) = -alpha'(t) / (1 - alpha(t))
        return -self.alpha_prime(t) / self.mask_prob(t)


@dataclass
class LinearSchedule(Schedule):
    """alpha(t) = 1 - t: weight 1/t (dllm's default, what Diffutron ran)."""

    def mask_prob(self, t):
        # 1 - alpha(t) = t
        return torch.as_tensor(t)

    def alpha_prime(self, t):
        # alpha'(t) = -1
        return -torch.ones_like(torch.as_tensor(t))


@dataclass
class CosineSchedule(Schedule):
    """alpha(t) = 1 - cos(pi/2 (1 - t)): weight (pi/2) cot(pi t / 2)."""

    def mask_prob(self, t):
        # 1 - alpha(t) = cos(pi/2 (1 - t)) = sin(pi t / 2)
        return torch.sin(torch.as_tensor(t) * (math.pi / 2))

    def alpha_prime(self, t):
        # alpha'(t) = -(pi/2) sin(pi/2 (1 - t)) = -(pi/2) cos(pi t / 2)
        return -(math.pi / 2) * torch.cos(torch.as_tensor(t) * (math.pi / 2))


@dataclass
class LogLinearSchedule(Schedule):
    """MDLM's LogLinearNoise: sigma(t) = -log(1 - (1-eps) t), alpha(t) = exp(-sigma(t)) = 1 - (1-eps) t."""

    eps: float = 1e-3

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


# --- Time sampling and the forward (masking) process.


def _draw_device(generator, device):
    if device is not None:
        return torch.device(device)
    return generator.device if generator is not None else torch.device("cpu")


def sample_t(batch: int, eps: float = 1e-3, stratified: bool = False, generator=None, device=None):
    """Diffusion times [batch] in [eps, 1): iid (dllm), or one in each of `batch` equal strata
    (MDLM's `_sample_t` with antithetic_sampling)."""
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
    """Forward process q(x_t | x0), one time per row (t [B]): (xt [B, S], is_masked [B, S] bool).
    Positions not maskable (SFT prompt, padding) never change."""
    schedule = get_schedule(schedule)
    maskable = _maskable_or_all(x0, maskable)
    # P(masked) = 1 - alpha(t), per row
    mask_prob = schedule.mask_prob(t).to(torch.float32).reshape(-1, 1)  # [B, 1] (or [1, 1])
    u = torch.rand(x0.shape, generator=generator, device=x0.device)  # [B, S]
    is_masked = (u < mask_prob) & maskable  # [B, S]
    xt = torch.where(is_masked, torch.full_like(x0, mask_id), x0)
    return xt, is_masked


def masked_cross_entropy(model, xt, is_masked, x0, weights, *, attention_mask=None, excluded_id=None):
    """(sum_i w_i CE_i, CE [N]) at the masked positions of xt [B, S], from dense logits [N, V] in >= fp32,
    excluded_id (<mask>) out of the softmax unless None; weights [B, S] or broadcastable, read where masked."""
    logits = model(xt, attention_mask, logits_at=is_masked)  # [N, V]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if excluded_id is not None:
        logits = logits.masked_fill(torch.arange(logits.shape[-1], device=logits.device) == excluded_id, float("-inf"))
    # CE_i = -log p(x0_i | x_t)
    token_ce = F.cross_entropy(logits, x0[is_masked], reduction="none")  # [N]
    weight = torch.as_tensor(weights, device=xt.device).expand(is_masked.shape)[is_masked]  # [N]
    return (weight.to(token_ce) * token_ce).sum(), token_ce


# --- The training objective (docs/math.md, sections 2 and 6).


def nelbo_normalizer(maskable, normalize: str = "sequence", attention_mask=None) -> torch.Tensor:
    """What `nelbo_loss` divides the batch's weighted CE sum by (0-d float32, no host copy):
    "token": the batch's maskable-token count; "sequence": its number of rows."""
    if normalize not in ("sequence", "token"):
        raise UserError(f"normalize={normalize!r} is not known; expected 'sequence' or 'token'")
    maskable = _maskable_or_all(maskable, maskable, attention_mask)  # [B, S]
    if normalize == "token":
        return maskable.sum().clamp(min=1).to(torch.float32)
    return maskable.new_full((), maskable.shape[0], dtype=torch.float32)


def nelbo_loss(model, x0, mask_id: int, *, maskable=None, attention_mask=None, schedule="linear",
               normalize: str = "sequence", stratified: bool = False, eps: float = 1e-3, t=None,
               generator=None, cross_entropy=masked_cross_entropy):
    """One Monte-Carlo draw of the continuous-time NELBO: (loss, num_masked). x0 [B, S] clean ids;
    maskable [B, S] bool (default every position, never padding under an attention_mask); t [B] (or a
    number) overrides the drawn times; cross_entropy: as `masked_cross_entropy`. An empty draw gives a
    zero that still backpropagates."""
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
    # loss = sum_b weight_b / denominator * sum_{i masked in row b} CE_i
    loss, _ = cross_entropy(model, xt, is_masked, x0, (weight / denominator)[:, None],
                            attention_mask=attention_mask, excluded_id=mask_id)
    return loss, is_masked.sum()


# --- Likelihoods: the exact NELBO and the likelihood of an answer (docs/math.md, sections 3-4).

MAX_EXACT_LENGTH = 16  # 2^16 - 1 masks: the longest sequence the exact sums enumerate


def masked_ce_per_row(model, x0, is_masked, mask_id: int, attention_mask=None, *,
                      cross_entropy=masked_cross_entropy):
    """C(M_b) = sum_{i masked in row b} -log p(x0_i | x0 with M_b masked) per row: [B] float64,
    for x0 [B, S] and the masks is_masked [B, S]."""
    xt = torch.where(is_masked, torch.full_like(x0, mask_id), x0)  # [B, S]
    _, token_ce = cross_entropy(model, xt, is_masked, x0, torch.zeros((), dtype=torch.float64),
                                attention_mask=attention_mask, excluded_id=mask_id)  # [N]
    per_position = torch.zeros(x0.shape, dtype=torch.float64, device=x0.device)  # [B, S]
    return per_position.masked_scatter(is_masked, token_ce.double()).sum(1)


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
    """The NELBO of one sequence x0 [S], exactly, by enumerating the 2^L - 1 masks of its L <= 16
    maskable positions:  sum_{M != {}} (|M|-1)! (L-|M|)! / L! * C(M)  (the same for every schedule)."""
    x0 = torch.as_tensor(x0, dtype=torch.long).reshape(-1)  # [S]
    maskable = _maskable_or_all(x0, None if maskable is None else torch.as_tensor(maskable).reshape(-1))
    positions = maskable.nonzero().flatten()  # [L]
    L = positions.numel()
    if L > MAX_EXACT_LENGTH:
        raise UserError(f"exact_nelbo enumerates 2^L masks and accepts at most {MAX_EXACT_LENGTH} "
                        f"maskable positions; this sequence has {L}")
    device = model_device(model)
    x0, positions = x0.to(device), positions.to(device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, 2**L - 1, batch_size):
        subsets, weight = all_masks(L, range(start, min(start + batch_size, 2**L - 1)), device)  # [b, L], [b]
        is_masked = torch.zeros(subsets.shape[0], x0.numel(), dtype=torch.bool, device=device)
        is_masked[:, positions] = subsets  # [b, S]
        # sum_M weight(M) C(M)
        total += (weight * masked_ce_per_row(model, x0.expand(len(weight), -1), is_masked, mask_id)).sum()
    return float(total)


def draw_answer_masks(L: int, num_samples: int, offset, draws: range | None = None, generator=None):
    """LLaDA's draws j in `draws` (default all num_samples) for an answer of L tokens, given the
    offset k ~ U{0..L-1} [1] drawn once per answer: (masked [c, L] bool, weight L / l_j [c] float64).
    Drawing range after range consumes the generator as drawing them all at once."""
    draws = range(num_samples) if draws is None else draws
    j = torch.arange(draws.start, draws.stop, device=offset.device)  # [c]
    # l_j = ((k + floor(j L / n)) mod L) + 1: each uniform on 1..L, together covering 1..L evenly
    num_masked = (offset + (j * L) // num_samples) % L + 1  # [c]
    # a uniform l-subset: the answer positions holding the l smallest uniform scores
    scores = torch.rand(len(draws), L, generator=generator, device=offset.device)  # [c, L]
    ranks = scores.argsort(dim=1).argsort(dim=1)
    return ranks < num_masked[:, None], L / num_masked.double()


@torch.no_grad()
def mc_loglik(model, prompt_ids, answer_ids, mask_id: int, *, num_samples: int = DEFAULT_MC_SAMPLES,
              batch_size: int = 32, generator=None) -> float:
    """LLaDA's Monte-Carlo estimate of log p(answer | prompt) (`get_log_likelihood.py`), a lower
    bound in expectation: -mean_j (L / l_j) C(M_j), M_j l_j answer positions (the prompt never).
    L = 1 is exact for any num_samples. Forwards of batch_size rows."""
    answer = torch.as_tensor(answer_ids, dtype=torch.long).reshape(-1)
    L = answer.numel()
    if L == 0:
        raise UserError("an answer to score is empty; expected at least one answer token")
    sequence = torch.cat([torch.as_tensor(prompt_ids, dtype=torch.long).reshape(-1), answer])  # [S]
    if L == 1:  # the one mask is the whole answer: exact
        return -exact_nelbo(model, sequence, mask_id, torch.arange(sequence.numel()) == sequence.numel() - 1)
    device = model_device(model)
    # k ~ U{0..L-1}, once per answer, before its masks
    offset = torch.randint(L, (1,), generator=generator, device=_draw_device(generator, None))
    sequence, total = sequence.to(device), torch.zeros((), dtype=torch.float64, device=device)
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
