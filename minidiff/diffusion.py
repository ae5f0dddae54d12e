"""Absorbing-state (masked) diffusion: schedules, forward corruption, losses, likelihoods.

References: MDLM (arXiv 2406.07524: the NELBO, the schedules, stratified t), LLaDA (2502.09992:
the l/L likelihood estimator), ARDM (2110.02037) and RADD (2406.03736): the any-order identity.
Matches kuleshov-group/mdlm `diffusion.py` (`_sample_t`, `LogLinearNoise`), LLaDA's
`get_log_likelihood.py` and dllm's MDLM trainer. Derivations: docs/math.md.

Every equation of the training objective and of likelihood scoring lives here (docs/math.md).

Forward process: each maskable token of x0 independently stays itself with probability
alpha(t) or becomes <mask> with probability 1 - alpha(t); t ~ U(eps, 1), one t per sequence.

Continuous-time NELBO (MDLM, Sahoo et al. 2024), an upper bound on -log p(x0):
    NELBO = E_t E_{x_t} [ w(t) * sum_{i masked} -log p(x0_i | x_t) ],   w(t) = -alpha'(t) / (1 - alpha(t))
The model never predicts <mask>: its logit is removed from every softmax here.

Summed over the subsets M of masked positions the same bound is exact and schedule-free:
    NELBO = sum_{M != {}} (|M|-1)! (L-|M|)! / L! * sum_{i in M} -log p(x0_i | x0 with M masked)
(`exact_nelbo`), which is the any-order-autoregressive NLL averaged over all L! orders. The
LLaDA estimator (`mc_loglik`) draws |M| = l uniform in 1..L and M uniform of that size and
scores (L / l) * sum_{i in M} CE: an unbiased, low-variance estimate of the same sum.

    loss, n = nelbo_loss(model, ids, tok.mask_id, maskable=labels != -100)
    loss.backward()
    logp = mc_loglik(model, prompt_ids, answer_ids, tok.mask_id, num_samples=32)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minidiff.errors import UserError
from minidiff.model import ModernBertMLM
from minidiff.plumbing.device import model_device
from minidiff.speed.chunked_loss import linear_cross_entropy

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


def _masked_ce(logits, targets, mask_id: int | None):
    """-log p(target), the <mask> logit removed from the softmax unless mask_id is None.
    logits [N, V] -> [N] (>= fp32). The dense form, for models that only give logits."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if mask_id is not None:
        is_mask_column = torch.arange(logits.shape[-1], device=logits.device) == mask_id  # [V]
        logits = logits.masked_fill(is_mask_column, float("-inf"))
    return F.cross_entropy(logits, targets, reduction="none")


def selected_positions(selected, ids):
    """For every True entry of a bool [B, S] in row-major order: its index in the flattened
    batch [N], its row [N] and the id of `ids` [B, S] there [N]. The one nonzero of a loss."""
    flat_index = selected.flatten().nonzero().squeeze(1)  # [N]
    return flat_index, flat_index // selected.shape[1], ids.flatten()[flat_index]


def decoder_cross_entropy(model, xt, selected, flat_index, targets, row_weights, *,
                          attention_mask=None, excluded_id: int | None = None):
    """(sum_i w_i CE_i, CE [N]) at the selected positions of the model's input xt [B, S].

    CE_i = -log softmax(decoder(head(h_i)))[target_i], with the column excluded_id removed
    from the softmax when given; flat_index [N] / targets [N] from selected_positions.
    A ModernBertMLM (possibly inside DistributedDataParallel) gives its head features and the
    vocabulary is swept chunk by chunk (chunked_loss: the [N, V] logits never exist); any
    other model is asked for logits [N, V] at `selected`. Only the sum carries a gradient.
    """
    inner = getattr(model, "module", model)  # DistributedDataParallel keeps the model in .module
    if isinstance(inner, ModernBertMLM):
        features = model(xt, attention_mask, features_at=flat_index)  # [N, H]
        return linear_cross_entropy(features, inner.decoder.weight, inner.decoder.bias, targets,
                                    row_weights, excluded_column=excluded_id)
    logits = model(xt, attention_mask, logits_at=selected)  # [N, V]
    token_ce = _masked_ce(logits, targets, excluded_id)  # [N]
    return (row_weights.to(token_ce) * token_ce).sum(), token_ce


# ---------------------------------------------------------------------------------------------
# The training objectives.
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


def nelbo_loss(
    model,
    x0,
    mask_id: int,
    *,
    maskable=None,
    attention_mask=None,
    schedule="linear",
    normalize: str = "sequence",
    stratified: bool = False,
    eps: float = 1e-3,
    t=None,
    generator=None,
):
    """One Monte-Carlo draw of the continuous-time NELBO (MDLM; docs/math.md): (loss scalar, num_masked).

    x0 [B, S] clean ids; maskable [B, S] bool (default: all positions, and never padding when an
    attention_mask is given); t [B] overrides the drawn times.
    normalize="sequence" (dllm): per row, w(t) * sum_masked CE / (that row's maskable count),
                                 then the mean over rows.
    normalize="token" (MDLM):    sum over the batch of w(t) * CE / (total maskable count).
    """
    schedule = get_schedule(schedule)
    maskable = _maskable_or_all(x0, maskable, attention_mask)  # [B, S]
    denominator = nelbo_normalizer(maskable, normalize).double()  # rows, or maskable tokens
    if t is None:
        t = sample_t(x0.shape[0], eps, stratified, generator, device=x0.device)  # [B]
    t = torch.as_tensor(t, dtype=torch.float32, device=x0.device).expand(x0.shape[0])  # [B]
    xt, is_masked = corrupt(x0, t, mask_id, maskable, generator, schedule)

    flat_index, rows, targets = selected_positions(is_masked, x0)  # [N] each
    weight = schedule.weight(t).double()  # [B]
    if normalize == "sequence":
        # loss = mean_b [ sum_{i masked in row b} w(t_b) CE_i / |maskable_b| ]
        row_weight = weight / maskable.sum(1).clamp(min=1) / denominator  # [B]
    else:
        # loss = sum_b sum_{i masked in row b} w(t_b) CE_i / sum_b |maskable_b|
        row_weight = weight / denominator  # [B]
    # CE_i = -log p(x0_i | x_t) at every masked position, <mask> excluded from the softmax;
    # an empty batch gives a zero that still backpropagates
    loss, _ = decoder_cross_entropy(model, xt, is_masked, flat_index, targets, row_weight[rows],
                                    attention_mask=attention_mask, excluded_id=mask_id)
    return loss, is_masked.sum()


def mlm_corrupt(ids, mask_id: int, maskable, *, mask_prob: float = 0.15, replace: bool = False,
                vocab_size: int | None = None, generator=None):
    """Fixed-ratio BERT masking: (corrupted ids [B, S], is_target [B, S] bool).

    Each row gets exactly k = floor(p n + 0.5) targets among its n maskable positions, a
    uniformly random k-subset (the k smallest of n iid uniforms). Positions not maskable
    (special tokens, padding) are never targets. With replace=True the targets follow BERT's
    80/10/10 rule (HF DataCollatorForLanguageModeling): 80% <mask>, 10% a token drawn uniformly
    from [0, vocab_size), 10% left unchanged; otherwise every target becomes <mask>.
    """
    if not 0.0 <= mask_prob <= 1.0:
        raise UserError(f"mask_prob={mask_prob} is outside [0, 1]")
    if replace and vocab_size is None:
        raise ValueError("mlm_corrupt(replace=True) needs vocab_size for the random 10%")
    maskable = maskable.bool()
    # k_b = floor(p * n_b + 0.5)   (float64 so that p * n lands where a reader computes it)
    count = torch.floor(maskable.sum(1).double() * mask_prob + 0.5).long()  # [B]
    # rank the maskable positions by a uniform score; non-maskable ones (score 2) rank last
    scores = torch.rand(ids.shape, generator=generator, device=ids.device)  # [B, S]
    scores = scores.masked_fill(~maskable, 2.0)
    ranks = scores.argsort(dim=1).argsort(dim=1)  # [B, S] rank of each position in its row
    is_target = ranks < count[:, None]  # [B, S]

    if not replace:
        return torch.where(is_target, torch.full_like(ids, mask_id), ids), is_target
    choice = torch.rand(ids.shape, generator=generator, device=ids.device)  # [B, S]
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator, device=ids.device)
    # u < 0.8 -> <mask>;  0.8 <= u < 0.9 -> random token;  u >= 0.9 -> unchanged
    corrupted = torch.where(is_target & (choice < 0.8), torch.full_like(ids, mask_id), ids)
    corrupted = torch.where(is_target & (choice >= 0.8) & (choice < 0.9), random_ids, corrupted)
    return corrupted, is_target


def mlm_loss(model, ids, mask_id: int, *, maskable, attention_mask=None, mask_prob: float = 0.15,
             replace: bool = False, vocab_size: int | None = None, exclude_mask_logit: bool = False,
             generator=None):
    """BERT's fixed-ratio MLM loss: (mean CE over the targets, number of targets).

    The softmax runs over the full vocabulary by default (HF run_mlm, the paper's perplexity
    probe, docs/evaluation.md); exclude_mask_logit=True removes <mask> as in the diffusion losses.
    """
    if vocab_size is None:
        vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    maskable = _maskable_or_all(ids, maskable, attention_mask)
    corrupted, is_target = mlm_corrupt(ids, mask_id, maskable, mask_prob=mask_prob,
                                       replace=replace, vocab_size=vocab_size, generator=generator)
    flat_index, _, targets = selected_positions(is_target, ids)  # [N] each
    # mean over targets: sum_i CE_i / N
    row_weights = torch.full_like(targets, 1.0 / max(targets.numel(), 1), dtype=torch.float64)  # [N]
    loss, _ = decoder_cross_entropy(model, corrupted, is_target, flat_index, targets, row_weights,
                                    attention_mask=attention_mask,
                                    excluded_id=mask_id if exclude_mask_logit else None)
    return loss, is_target.sum()


# ---------------------------------------------------------------------------------------------
# Likelihoods for evaluation and auditing.
# ---------------------------------------------------------------------------------------------


def _as_ids(ids, what: str):
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if ids.numel() == 0 and what == "answer":
        raise UserError("an answer to score is empty; expected at least one answer token")
    return ids


def masked_ce_per_row(model, x0, is_masked, mask_id: int, attention_mask=None):
    """sum_{i masked in row b} -log p(x0_i | x_t) for each row b: [B] float64, where x_t is x0
    [B, S] with the positions of is_masked [B, S] replaced by <mask> (<mask> out of the softmax)."""
    xt = torch.where(is_masked, torch.full_like(x0, mask_id), x0)  # [B, S]
    flat_index, rows, targets = selected_positions(is_masked, x0)  # [N] each
    _, token_ce = decoder_cross_entropy(model, xt, is_masked, flat_index, targets,
                                        torch.zeros_like(targets, dtype=torch.float64),
                                        attention_mask=attention_mask, excluded_id=mask_id)
    return token_ce.double().new_zeros(x0.shape[0]).index_add_(0, rows, token_ce.double())  # [B]


class AnswerDraws:
    """LLaDA's draws for an answer of L tokens, handed out `take(count)` rows at a time: (masked
    [count, L] bool, weight L / l [count] float64). Taking all n at once or in chunks consumes
    the generator identically, so memory is set by the chunk, not by n.

    Sample j masks exactly l_j answer positions, a uniform l_j-subset; the l_j are stratified,
    l_j = ((k + floor(j L / n)) mod L) + 1 with one k uniform in 0..L-1, so each l_j is uniform
    on 1..L and together they cover 1..L evenly."""

    def __init__(self, L: int, num_samples: int, generator=None, device=None):
        self.L, self.num_samples, self.generator, self.device = L, num_samples, generator, device
        self.k = torch.randint(L, (1,), generator=generator, device=device)
        self.taken = 0

    def take(self, count: int):
        # l_j = ((k + floor(j L / n)) mod L) + 1
        j = torch.arange(self.taken, self.taken + count, device=self.device)
        num_masked = (self.k + (j * self.L) // self.num_samples) % self.L + 1  # [c]
        # a uniform l-subset: the answer positions holding the l smallest uniform scores
        scores = torch.rand(count, self.L, generator=self.generator, device=self.device)  # [c, L]
        ranks = scores.argsort(dim=1).argsort(dim=1)
        self.taken += count
        return ranks < num_masked[:, None], self.L / num_masked.double()


def draw_answer_masks(L: int, num_samples: int, generator=None, device=None):
    """All of `AnswerDraws(L, num_samples)` at once: (masked [n, L] bool, weight L / l [n])."""
    return AnswerDraws(L, num_samples, generator, device).take(num_samples)


MAX_EXACT_LENGTH = 16


def all_masks(L: int, device=None):
    """Every non-empty subset M of L positions with its weight in the exact NELBO:
    (masked [2^L - 1, L] bool, (|M|-1)! (L-|M|)! / L! [2^L - 1] float64)."""
    # subset s (1 .. 2^L - 1) as bits over the positions
    codes = torch.arange(1, 2**L, device=device)[:, None]  # [K, 1]
    bits = (codes >> torch.arange(L, device=device)) & 1  # [K, L]
    # weight(m) = (m-1)! (L-m)! / L!, as exp of log-gammas in float64
    m = bits.sum(1).double()  # [K]
    return bits.bool(), torch.exp(torch.lgamma(m) + torch.lgamma(L - m + 1) - math.lgamma(L + 1))


class AllMasks:
    """`all_masks(L)` handed out like `AnswerDraws`: the exact sum as rows of a forward."""

    def __init__(self, L: int, device=None):
        self.masks, self.weights = all_masks(L, device)
        self.taken = 0

    def take(self, count: int):
        rows = slice(self.taken, self.taken + count)
        self.taken += count
        return self.masks[rows], self.weights[rows]


SCORINGS = ("auto", "exact", "mc")


def exact_rows(L: int) -> int:
    """Forwards the exact sum over the answer's masks costs: 2^L - 1."""
    return 2**L - 1


def use_exact(L: int, scoring: str, num_samples: int) -> bool:
    """exact: always (L <= MAX_EXACT_LENGTH); mc: only L = 1 (one row, exact for any n);
    auto: when the enumeration costs no more rows than the Monte-Carlo samples it replaces."""
    if scoring not in SCORINGS:
        raise UserError(f"scoring={scoring!r}: expected one of {', '.join(SCORINGS)}")
    if scoring == "exact":
        if L > MAX_EXACT_LENGTH:
            raise UserError(f"exact scoring enumerates 2^L - 1 masks and accepts answers of at most "
                            f"{MAX_EXACT_LENGTH} tokens; one has {L} (use scoring auto or mc)")
        return True
    return L == 1 or (scoring == "auto" and exact_rows(L) <= num_samples)


@dataclass(frozen=True)
class AnswerScore:
    """One scored answer: loglik ~ log p(answer | prompt) (-NELBO over the answer positions),
    se its Monte-Carlo standard error (0 when exact, nan from a single sample), exact whether it
    was enumerated."""

    loglik: float
    se: float
    exact: bool


def _check_sample_counts(num_samples: int, batch_size: int) -> None:
    if num_samples < 1 or batch_size < 1:
        raise UserError(f"num_samples={num_samples} and batch_size={batch_size} must both be >= 1")


@torch.no_grad()
def mc_loglik(model, prompt_ids, answer_ids, mask_id: int, *, num_samples: int = 32,
              batch_size: int = 32, generator=None) -> float:
    """LLaDA's Monte-Carlo estimate of log p(answer | prompt) (`get_log_likelihood.py`; docs/math.md).

    Sample j: l_j ~ U{1..L} (stratified over the samples), exactly l_j answer tokens masked,
    the prompt never; it scores (L / l_j) * sum_masked CE. The estimate is -(mean over
    samples); its expectation is -exact_nelbo over the answer positions, a lower bound on
    log p(answer | prompt). L = 1 is exact for any num_samples.
    """
    pair = (prompt_ids, answer_ids)  # one pair: its rows are never padded, so any pad_id does
    return score_answers(model, [pair], mask_id, pad_id=mask_id, num_samples=num_samples,
                         batch_size=batch_size, generator=generator, scoring="mc")[0].loglik


# ---------------------------------------------------------------------------------------------
# Scoring many pairs at once (throughput): the rows of all pairs packed into batches.
# ---------------------------------------------------------------------------------------------


def _pack_rows(pieces, pad_id: int, device):
    """One forward's rows from pieces (sequence [S_p], answer masks [c_p, L_p]), c_p rows each:
    (x0 [b, W] right-padded with pad_id, is_masked [b, W], attention [b, W], padded?)."""
    lengths = [seq.numel() for seq, _ in pieces]
    width, b = max(lengths), sum(masks.shape[0] for _, masks in pieces)
    x0 = torch.full((b, width), pad_id, dtype=torch.long, device=device)  # [b, W]
    is_masked = torch.zeros(b, width, dtype=torch.bool, device=device)  # [b, W]
    attention = torch.zeros(b, width, dtype=torch.long, device=device)  # [b, W]
    r0 = 0
    for seq, masks in pieces:
        r1, end = r0 + masks.shape[0], seq.numel()
        x0[r0:r1, :end] = seq
        attention[r0:r1, :end] = 1
        is_masked[r0:r1, end - masks.shape[1]:end] = masks.to(device)
        r0 = r1
    return x0, is_masked, attention, min(lengths) != width


def _row_sources(pairs, exact, num_samples: int, generator, pair_seed, device):
    """Per pair, lazily in pair order (the draws of pair p before those of p + 1):
    (sequence [S], source of its rows with .take(count))."""
    draw_device = _draw_device(None if pair_seed is not None else generator, None)
    for (prompt, answer), enumerate_all in zip(pairs, exact):
        prompt, answer = _as_ids(prompt, "prompt"), _as_ids(answer, "answer")
        sequence = torch.cat([prompt, answer]).to(device)
        if enumerate_all:
            yield sequence, AllMasks(answer.numel())
            continue
        if pair_seed is not None:
            generator = torch.Generator().manual_seed(pair_seed)
        yield sequence, AnswerDraws(answer.numel(), num_samples, generator, draw_device)


def _row_batches(sources, rows, batch_size: int):
    """Forwards of at most batch_size rows, filled pair after pair: lists of pieces
    (pair index, sequence [S], answer masks [c, L], weights [c])."""
    batch, room = [], batch_size
    for p, (sequence, source) in enumerate(sources):
        left = rows[p]
        while left:
            masks, weights = source.take(min(room, left))
            batch.append((p, sequence, masks, weights))
            left, room = left - masks.shape[0], room - masks.shape[0]
            if room == 0:
                yield batch
                batch, room = [], batch_size
    if batch:
        yield batch


@torch.no_grad()
def score_answers(model, pairs, mask_id: int, *, pad_id: int, num_samples: int = 32,
                  batch_size: int = 32, scoring: str = "mc", generator=None,
                  pair_seed: int | None = None) -> list[AnswerScore]:
    """log p(answer | prompt) for each (prompt, answer) pair, with its standard error; the rows
    of all pairs packed into forwards of batch_size rows (right-padded under an attention mask).

    exact pairs: loglik = -sum_{M != {}} (|M|-1)!(L-|M|)!/L! sum_{i in M} CE_i over the masks of
    the answer (exact_nelbo restricted to the answer), se = 0. Monte-Carlo pairs (`mc_loglik`):
    v_j = (L / l_j) sum_{i in M_j} CE_i, loglik = -mean_j v_j, se = std_j(v_j) / sqrt(n).
    `use_exact` picks per pair. Rows are drawn forward by forward, so memory is set by
    batch_size whatever num_samples is. Random draws are made pair after pair from `generator`;
    with `pair_seed` every pair draws from a fresh CPU generator seeded with it (common random
    numbers: a value does not depend on the other pairs).
    """
    _check_sample_counts(num_samples, batch_size)
    if len(pairs) == 0:
        return []
    device = model_device(model)
    lengths = [_as_ids(answer, "answer").numel() for _, answer in pairs]
    exact = [use_exact(L, scoring, num_samples) for L in lengths]
    rows = [exact_rows(L) if flag else num_samples for L, flag in zip(lengths, exact)]
    sources = _row_sources(pairs, exact, num_samples, generator, pair_seed, device)
    sums = torch.zeros(2, len(pairs), dtype=torch.float64, device=device)  # [2, P]: sum v, sum v^2
    for batch in _row_batches(sources, rows, batch_size):
        x0, is_masked, attention, padded = _pack_rows([(seq, masks) for _, seq, masks, _ in batch],
                                                      pad_id, device)
        owners = torch.cat([torch.full((m.shape[0],), p, device=device) for p, _, m, _ in batch])  # [b]
        weights = torch.cat([w for *_, w in batch]).to(device)  # [b]
        # v = weight * sum_{i in M} CE_i per row
        values = weights * masked_ce_per_row(model, x0, is_masked, mask_id, attention if padded else None)
        sums.index_add_(1, owners, torch.stack([values, values * values]))
    return _finish(sums, rows, exact)


def _finish(sums, rows, exact) -> list[AnswerScore]:
    """loglik and se per pair from sum v and sum v^2 (one host read for all pairs)."""
    n = torch.tensor(rows, dtype=torch.float64, device=sums.device)  # [P]
    is_exact = torch.tensor(exact, device=sums.device)  # [P]
    # exact: -sum_M weight_M CE_M; Monte Carlo: -(1/n) sum_j v_j
    loglik = -torch.where(is_exact, sums[0], sums[0] / n)
    # sample variance of v: (sum v^2 - n mean^2) / (n - 1); se = sqrt(var / n)
    mean = sums[0] / n
    var = ((sums[1] - n * mean * mean) / (n - 1).clamp(min=1)).clamp(min=0)
    # exact: 0; a single sample: unknown (nan)
    se = torch.where(is_exact, torch.zeros_like(var), torch.where(n < 2, math.nan, (var / n).sqrt()))
    return [AnswerScore(value, error, flag)
            for value, error, flag in zip(loglik.tolist(), se.tolist(), exact)]


@torch.no_grad()
def mc_loglik_many(model, pairs, mask_id: int, *, pad_id: int, num_samples: int = 32,
                   batch_size: int = 32, generator=None, pair_seed: int | None = None) -> list[float]:
    """`mc_loglik` for each (prompt, answer) pair (`score_answers` with scoring="mc", values only).

    The random draws for pair p are made before those for pair p + 1, so scoring pairs one by
    one with the same generator gives the same numbers. With `pair_seed`, every pair draws from
    a fresh CPU generator seeded with it instead (common random numbers: a pair's estimate is
    then `mc_loglik(..., generator=torch.Generator().manual_seed(pair_seed))`, whatever the
    order or grouping of the pairs).
    """
    scores = score_answers(model, pairs, mask_id, pad_id=pad_id, num_samples=num_samples,
                           batch_size=batch_size, scoring="mc", generator=generator, pair_seed=pair_seed)
    return [score.loglik for score in scores]



@torch.no_grad()
def exact_nelbo(model, x0, mask_id: int, maskable=None, *, batch_size: int = 256) -> float:
    """The NELBO of one sequence, exactly, by enumerating the 2^L - 1 masks (L <= 16; auditing).

        NELBO(x0) = sum_{M != {}} (|M|-1)! (L-|M|)! / L!  *  sum_{i in M} -log p(x0_i | x0 with M masked)

    over the subsets M of the L maskable positions. (|M|-1)!(L-|M|)!/L! = int_0^1 w(t) t^|M|
    (1-t)^(L-|M|) dt for the linear schedule, and the continuous NELBO is the same for every
    schedule. It equals the any-order-autoregressive NLL averaged over all orders.
    """
    x0 = torch.as_tensor(x0, dtype=torch.long).reshape(-1)  # [S]
    maskable = _maskable_or_all(x0, None if maskable is None else torch.as_tensor(maskable).reshape(-1))
    positions = maskable.nonzero().flatten().tolist()
    L = len(positions)
    if L > MAX_EXACT_LENGTH:
        raise UserError(f"exact_nelbo enumerates 2^L masks and accepts at most {MAX_EXACT_LENGTH} "
                        f"maskable positions; this sequence has {L}")
    if L == 0:
        return 0.0
    device = model_device(model)
    x0 = x0.to(device)
    bits, subset_weight = all_masks(L, device)  # [K, L], [K]

    total = torch.zeros((), dtype=torch.float64, device=device)
    position_index = torch.tensor(positions, device=device)
    for start in range(0, bits.shape[0], batch_size):
        chunk = bits[start:start + batch_size]  # [b, L]
        is_masked = torch.zeros(chunk.shape[0], x0.numel(), dtype=torch.bool, device=device)
        is_masked[:, position_index] = chunk  # [b, S]
        # sum_{i in M} CE_i for each subset M of the chunk
        per_subset = masked_ce_per_row(model, x0.expand(chunk.shape[0], -1), is_masked, mask_id)  # [b]
        total += (subset_weight[start:start + batch_size] * per_subset).sum()
    return float(total)
