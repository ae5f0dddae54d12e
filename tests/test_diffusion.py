"""minidiff.diffusion (with the batched answer scorer, minidiff.evaluation.answers, and BERT's
masking, minidiff.evaluation.perplexity) against independent references: exact enumerations over
orders, a toy model holding the exact conditionals of a known joint, hand-computed losses, finite
differences, and the formulas of MDLM / BERT written out again here."""
from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from helpers import BOS, EOS, MASK, PAD, tiny_model
from test_chunked_loss import mlm_loss
from torch import nn

from minidiff import diffusion as D
from minidiff.errors import UserError
from minidiff.evaluation import answers
from minidiff.evaluation.perplexity import mlm_corrupt

V = 12  # tiny vocabulary: ids 0..4 are mmBERT's specials (mask = 4), 5..11 ordinary tokens


@pytest.fixture(scope="module")
def model():
    """A tiny random encoder whose predictions depend strongly on context: the freshly
    initialised linears (std 0.02) are scaled up 5x, otherwise every order of the any-order
    factorisation gives almost the same probability and the order-dependent tests see little."""
    model = tiny_model(3, vocab_size=V)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(key in name for key in ("Wqkv", "Wo", "Wi", "head.dense")):
                param.mul_(5.0)
    return model


# ---------------------------------------------------------------------------------------------
# References written here, independently of minidiff.diffusion
# ---------------------------------------------------------------------------------------------


def order_logprobs(model, x0, positions):
    """log p_sigma(x0) = sum_i log p(x0[sigma_i] | x0[sigma_<i] revealed, the rest masked) for
    every order sigma of `positions` (any-order autoregressive chain rule), from full-sequence
    logits with the <mask> column set to -inf, in float64."""
    table = {}  # revealed set -> {position: log p(x0[position] | revealed)}
    for size in range(len(positions)):
        for revealed in itertools.combinations(positions, size):
            x = x0.clone()
            for p in positions:
                if p not in revealed:
                    x[p] = MASK
            with torch.no_grad():
                logits = model(x[None])[0].double()  # [S, V]
            logits[:, MASK] = -math.inf
            log_probs = logits.log_softmax(-1)
            table[frozenset(revealed)] = {p: float(log_probs[p, x0[p]]) for p in positions}
    result = [sum(table[frozenset(order[:i])][p] for i, p in enumerate(order))
              for order in itertools.permutations(positions)]
    return torch.tensor(result, dtype=torch.float64)


class JointConditionals(nn.Module):
    """A 'model' whose prediction at every masked position is the exact conditional of a known
    joint p over `sequences` given the unmasked tokens (other masked positions marginalised)."""

    def __init__(self, sequences, probs, vocab_size):
        super().__init__()
        self.sequences, self.probs, self.vocab_size = sequences, probs, vocab_size

    def forward(self, input_ids, attention_mask=None, logits_at=None):
        rows = []
        for row in input_ids:
            observed = row != MASK
            agrees = ((self.sequences == row) | ~observed).all(1)  # [K]
            weight = self.probs * agrees
            table = torch.stack([
                torch.zeros(self.vocab_size, dtype=torch.float64).index_add_(0, self.sequences[:, i], weight)
                for i in range(row.numel())
            ])  # [S, V]: unnormalised p(x_i = v, observed)
            rows.append(table.log())
        logits = torch.stack(rows)  # [B, S, V]
        return logits if logits_at is None else logits[logits_at]


class FixedLogits(nn.Module):
    """Every position predicts the same logits; remembers the last input it saw."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, input_ids, attention_mask=None, logits_at=None):
        self.seen = input_ids.clone()
        self.history = getattr(self, "history", []) + [input_ids.clone()]
        full = self.logits.expand(*input_ids.shape, -1)  # [B, S, V]
        return full if logits_at is None else full[logits_at]


def mean_and_se(values):
    values = torch.tensor(values, dtype=torch.float64)
    return float(values.mean()), float(values.std() / math.sqrt(len(values)))


# ---------------------------------------------------------------------------------------------
# exact_nelbo
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens, maskable", [
    ([BOS, 5, 9, 6, 11, EOS], [0, 1, 1, 1, 1, 0]),
    ([7, 5, 10, 8, 6], [1, 1, 1, 1, 1]),
    ([BOS, 8, 8, 5, 7, 10], [0, 0, 1, 1, 0, 1]),
])
def test_exact_nelbo_equals_any_order_nll_averaged_over_orders(model, tokens, maskable):
    x0 = torch.tensor(tokens)
    positions = [i for i, m in enumerate(maskable) if m]
    reference = float(-order_logprobs(model, x0, positions).mean())
    got = D.exact_nelbo(model, x0, MASK, torch.tensor(maskable, dtype=torch.bool))
    assert got == pytest.approx(reference, rel=1e-5)


def test_exact_nelbo_of_exact_conditionals_is_minus_log_p():
    torch.manual_seed(0)
    alphabet = torch.tensor([5, 6, 7])
    sequences = torch.cartesian_prod(*[alphabet] * 4)  # [81, 4]
    probs = torch.distributions.Dirichlet(torch.ones(len(sequences), dtype=torch.float64)).sample()
    toy = JointConditionals(sequences, probs, V)
    for k in [0, 17, 40, 80]:
        x = sequences[k]
        assert D.exact_nelbo(toy, x, MASK) == pytest.approx(-math.log(probs[k]), abs=1e-6)
        # only positions 1..3 maskable: -log p(x_1:3 | x_0)
        given = (sequences[:, 0] == x[0])
        conditional = probs[k] / probs[given].sum()
        got = D.exact_nelbo(toy, x, MASK, torch.tensor([False, True, True, True]))
        assert got == pytest.approx(-math.log(conditional), abs=1e-6)


def test_exact_nelbo_bounds_the_any_order_sampler_nll(model):
    # q(x) = mean over orders of prod_i p(x_sigma(i) | revealed): the probability that the
    # any-order sampler (uniform order, exact conditionals of the model) produces x. Jensen:
    # exact_nelbo = E_sigma[-log p_sigma(x)] >= -log E_sigma[p_sigma(x)] = -log q(x).
    for tokens in ([9, 5, 11, 6], [5, 5, 7, 10, 8]):
        x0 = torch.tensor(tokens)
        logp = order_logprobs(model, x0, list(range(len(tokens))))
        minus_log_q = float(-(torch.logsumexp(logp, 0) - math.log(len(logp))))
        nelbo = D.exact_nelbo(model, x0, MASK)
        assert nelbo >= minus_log_q
        assert nelbo - minus_log_q > 1e-3  # a random model's orders disagree: the gap is real


def test_exact_nelbo_refuses_long_sequences(model):
    with pytest.raises(UserError, match="at most 16"):
        D.exact_nelbo(model, torch.full((17,), 5), MASK)


# ---------------------------------------------------------------------------------------------
# Monte-Carlo estimators against the exact value
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["linear", "cosine", "loglinear"])
def test_nelbo_loss_mean_matches_exact_nelbo(model, schedule):
    x0 = torch.tensor([BOS, 6, 10, 5, 9, EOS])
    maskable = torch.tensor([0, 1, 1, 1, 1, 0], dtype=torch.bool)
    exact = D.exact_nelbo(model, x0, MASK, maskable)
    generator = torch.Generator().manual_seed(1)
    batch = 32
    draws = []
    with torch.no_grad():
        for _ in range(150):
            loss, _ = D.nelbo_loss(model, x0.repeat(batch, 1), MASK, maskable=maskable.repeat(batch, 1),
                                   schedule=schedule, normalize="token", generator=generator)
            draws.append(float(loss) * int(maskable.sum()))  # token-normalised -> per sequence
    mean, se = mean_and_se(draws)
    assert abs(mean - exact) < 4 * se, (mean, se, exact)


def test_stratified_time_draw_has_lower_variance():
    # The mean of t over a batch: iid variance (1-eps)^2 / (12 n), stratified (1-eps)^2 / (12 n^3).
    eps, n, reps = 1e-3, 16, 2000
    generator = torch.Generator().manual_seed(2)
    iid = torch.stack([D.sample_t(n, eps, False, generator).mean() for _ in range(reps)]).double()
    strata = torch.stack([D.sample_t(n, eps, True, generator).mean() for _ in range(reps)]).double()
    assert float(iid.var()) == pytest.approx((1 - eps) ** 2 / (12 * n), rel=0.15)
    assert float(strata.var()) == pytest.approx((1 - eps) ** 2 / (12 * n ** 3), rel=0.15)

    # The NELBO of a model whose loss depends strongly on t: exact conditionals of a joint that
    # makes neighbours agree (CE ~ 0 with context, log 3 without). Stratifying t removes the
    # between-times part of the variance; the masking noise within a time stays.
    alphabet = torch.tensor([5, 6, 7])
    sequences = torch.cartesian_prod(*[alphabet] * 5)  # [243, 5]
    agreements = (sequences[:, 1:] == sequences[:, :-1]).sum(1).double()
    toy = JointConditionals(sequences, torch.softmax(5.0 * agreements, 0), V)
    x0 = sequences[0].repeat(16, 1)

    def variance(stratified):
        generator = torch.Generator().manual_seed(3)
        losses = [float(D.nelbo_loss(toy, x0, MASK, normalize="token", stratified=stratified,
                                     generator=generator)[0]) for _ in range(400)]
        return float(torch.tensor(losses).var())

    assert variance(True) < 0.85 * variance(False)


def test_minus_mc_loglik_mean_matches_exact_nelbo_of_the_answer(model):
    prompt, answer = [BOS, 5, 6], [9, 7, 11, 8]
    exact = D.exact_nelbo(model, torch.tensor(prompt + answer), MASK,
                          torch.tensor([0] * len(prompt) + [1] * len(answer), dtype=torch.bool))
    generator = torch.Generator().manual_seed(3)
    draws = [-D.mc_loglik(model, prompt, answer, MASK, num_samples=8, batch_size=8, generator=generator)
             for _ in range(200)]
    mean, se = mean_and_se(draws)
    assert se > 0
    assert abs(mean - exact) < 4 * se, (mean, se, exact)


def test_mc_loglik_single_token_answer_is_exact(model):
    prompt, answer = [BOS, 5, 6, 7], [9]
    x = torch.tensor([prompt + [MASK]])
    with torch.no_grad():
        logits = model(x)[0, -1].double()
    logits[MASK] = -math.inf
    direct = float(logits.log_softmax(-1)[9])
    for seed in (0, 1):
        generator = torch.Generator().manual_seed(seed)
        got = D.mc_loglik(model, prompt, answer, MASK, num_samples=3, generator=generator)
        assert got == pytest.approx(direct, abs=1e-5)


def test_mc_loglik_strata_weights_and_prompt():
    # Fixed logits and an answer of one repeated token: every sample scores (L / l) * l * c = L c
    # whatever l is, so the estimate is exact; the recorded inputs show which l were drawn.
    toy = fixed_model()
    prompt, answer = [BOS, 5, 6], [9] * 5
    L, n = len(answer), 20
    got = D.mc_loglik(toy, prompt, answer, MASK, num_samples=n, batch_size=7,
                      generator=torch.Generator().manual_seed(14))
    assert got == pytest.approx(-L * hand_ce(toy, 9), rel=1e-6)
    inputs = torch.cat(toy.history)  # [n, S]
    assert inputs.shape[0] == n
    assert torch.equal(inputs[:, :len(prompt)], torch.tensor(prompt).expand(n, -1))  # prompt never masked
    counts = (inputs[:, len(prompt):] == MASK).sum(1)
    # n = 4 L samples, stratified: each l in 1..L exactly 4 times
    assert sorted(counts.tolist()) == sorted(list(range(1, L + 1)) * (n // L))


def test_mc_loglik_many_equals_pair_by_pair(model):
    pairs = [([BOS, 5, 6], [9, 7, 11]), ([BOS, 8], [10, 5, 6, 7, 9]), ([BOS, 6, 6, 6, 9], [5]),
             ([BOS], [7, 8])]
    many = answers.mc_loglik_many(model, pairs, MASK, pad_id=PAD, num_samples=6, batch_size=4,
                            generator=torch.Generator().manual_seed(4))
    generator = torch.Generator().manual_seed(4)
    one_by_one = [D.mc_loglik(model, p, a, MASK, num_samples=6, batch_size=6, generator=generator)
                  for p, a in pairs]
    assert many == pytest.approx(one_by_one, abs=1e-5)
    assert answers.mc_loglik_many(model, [], MASK, pad_id=PAD) == []


def test_mc_loglik_rejects_an_empty_answer(model):
    with pytest.raises(UserError, match="empty"):
        D.mc_loglik(model, [BOS, 5], [], MASK)


# ---------------------------------------------------------------------------------------------
# Schedules, time draws, the forward process
# ---------------------------------------------------------------------------------------------


def test_schedules_against_finite_differences_and_hand_formulas():
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-6
    eps = 1e-3
    hand = {
        "linear": (1 - t, 1 / t),
        "cosine": (1 - torch.cos(math.pi / 2 * (1 - t)), math.pi / 2 * torch.tan(math.pi / 2 * (1 - t))),
        # MDLM LogLinearNoise: sigma = -log1p(-(1-eps) t), alpha = exp(-sigma); its loss factor
        # is dsigma / expm1(sigma) with dsigma = (1-eps) / (1 - (1-eps) t)
        "loglinear": (torch.exp(torch.log1p(-(1 - eps) * t)),
                      ((1 - eps) / (1 - (1 - eps) * t)) / torch.expm1(-torch.log1p(-(1 - eps) * t))),
    }
    for name, (alpha, weight) in hand.items():
        schedule = D.get_schedule(name)
        assert torch.allclose(schedule.alpha(t), alpha, atol=1e-12)
        derivative = (schedule.alpha(t + h) - schedule.alpha(t - h)) / (2 * h)
        assert torch.allclose(schedule.alpha_prime(t), derivative, atol=1e-7)
        assert torch.allclose(schedule.weight(t), weight, rtol=1e-9)
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert torch.allclose(D.get_schedule("linear").alpha(ends), torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert torch.allclose(D.get_schedule("cosine").alpha(ends), torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert torch.allclose(D.get_schedule("loglinear").alpha(ends), torch.tensor([1.0, eps], dtype=torch.float64))
    with pytest.raises(UserError, match="cosine"):
        D.get_schedule("sqrt")


def test_sample_t_ranges_and_strata():
    eps = 1e-3
    t = D.sample_t(100_000, eps=eps, generator=torch.Generator().manual_seed(0))
    assert float(t.min()) >= eps and float(t.max()) < 1
    assert float(t.mean()) == pytest.approx((1 + eps) / 2, abs=4 * 0.29 / math.sqrt(len(t)))
    n = 16
    t = D.sample_t(n, eps=eps, stratified=True, generator=torch.Generator().manual_seed(1))
    u = (t - eps) / (1 - eps)
    i = torch.arange(n)
    assert bool(((u >= i / n - 1e-6) & (u < (i + 1) / n + 1e-6)).all())


def test_corrupt_masks_at_rate_one_minus_alpha_and_never_outside_maskable():
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randint(5, V, (4, 20_000), generator=generator)
    maskable = torch.rand(4, 20_000, generator=generator) < 0.7
    t = torch.tensor([0.1, 0.3, 0.6, 0.9])
    xt, is_masked = D.corrupt(x0, t, MASK, maskable, generator=generator, schedule="cosine")
    assert torch.equal(xt[~maskable], x0[~maskable])
    assert torch.equal(xt[~is_masked], x0[~is_masked])
    assert bool((xt[is_masked] == MASK).all()) and not bool((is_masked & ~maskable).any())
    for row in range(4):
        p = math.cos(math.pi / 2 * (1 - float(t[row])))  # 1 - alpha(t), written by hand
        n = int(maskable[row].sum())
        rate = int(is_masked[row].sum()) / n
        assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n)


# ---------------------------------------------------------------------------------------------
# nelbo_loss on hand-computed cases
# ---------------------------------------------------------------------------------------------


def fixed_model():
    logits = torch.linspace(-1.0, 1.5, V, dtype=torch.float32)
    logits[MASK] = 50.0  # would dominate every softmax if it were not excluded
    return FixedLogits(logits)


def hand_ce(model, token):
    z = [float(v) for v in model.logits.detach()]
    return math.log(sum(math.exp(v) for i, v in enumerate(z) if i != MASK)) - z[token]


def test_nelbo_linear_weight_is_one_over_t():
    toy = fixed_model()
    x0 = torch.randint(5, V, (2, 8), generator=torch.Generator().manual_seed(5))
    t = torch.tensor([0.5, 0.25])
    loss, num_masked = D.nelbo_loss(toy, x0, MASK, t=t, generator=torch.Generator().manual_seed(6))
    masked = toy.seen == MASK
    assert bool(masked.sum(1).gt(0).all()) and int(num_masked) == int(masked.sum())
    per_row = [sum(hand_ce(toy, int(x0[b, i])) for i in range(8) if masked[b, i]) / float(t[b]) / 8
               for b in range(2)]
    assert loss.item() == pytest.approx(sum(per_row) / 2, rel=1e-6)


def test_nelbo_sequence_versus_token_normalisation():
    toy = fixed_model()
    x0 = torch.tensor([[5, 6, PAD, PAD], [5, 6, 7, 8]])
    maskable = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    t = torch.ones(2)  # linear: mask probability 1 and weight 1
    c = {v: hand_ce(toy, v) for v in (5, 6, 7, 8)}
    seq, n = D.nelbo_loss(toy, x0, MASK, maskable=maskable, t=t, normalize="sequence")
    tok, _ = D.nelbo_loss(toy, x0, MASK, maskable=maskable, t=t, normalize="token")
    assert int(n) == 6
    assert seq.item() == pytest.approx(((c[5] + c[6]) / 2 + (c[5] + c[6] + c[7] + c[8]) / 4) / 2, rel=1e-6)
    assert tok.item() == pytest.approx((2 * c[5] + 2 * c[6] + c[7] + c[8]) / 6, rel=1e-6)
    # with an attention mask and no maskable, padding is never masked
    D.nelbo_loss(toy, x0, MASK, attention_mask=maskable.long(), t=t)
    assert torch.equal(toy.seen == MASK, maskable)
    with pytest.raises(UserError, match="normalize"):
        D.nelbo_loss(toy, x0, MASK, t=t, normalize="batch")


def test_nelbo_with_nothing_masked_is_zero_and_differentiable(model):
    x0 = torch.tensor([[5, 6, 7, 8]])
    loss, num_masked = D.nelbo_loss(model, x0, MASK, t=torch.tensor([1e-9]))
    assert int(num_masked) == 0 and loss.item() == 0.0
    loss.backward()
    grad = model.head.dense.weight.grad
    assert grad is not None and not bool(grad.any())
    model.zero_grad(set_to_none=True)


def test_nelbo_gradient_matches_a_direct_computation(model):
    # the loss (and its gradient) equals the formula evaluated on full-sequence logits
    x0 = torch.randint(5, V, (3, 6), generator=torch.Generator().manual_seed(7))
    t = torch.tensor([0.3, 0.6, 0.9])
    loss, _ = D.nelbo_loss(model, x0, MASK, t=t, generator=torch.Generator().manual_seed(8))
    _, is_masked = D.corrupt(x0, t, MASK, generator=torch.Generator().manual_seed(8))
    xt = torch.where(is_masked, MASK, x0)
    logits = model(xt).double()  # [B, S, V]
    logits[..., MASK] = -math.inf
    ce = -logits.log_softmax(-1).gather(-1, x0[..., None])[..., 0]  # [B, S]
    reference = ((ce * is_masked).sum(1) / t.double() / x0.shape[1]).mean()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    grads = torch.autograd.grad(loss, [model.head.dense.weight])[0]
    ref_grads = torch.autograd.grad(reference, [model.head.dense.weight])[0]
    assert torch.allclose(grads, ref_grads, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The BERT (fixed-ratio) objective
# ---------------------------------------------------------------------------------------------


def test_mlm_corrupt_exact_count_and_specials_never_masked():
    generator = torch.Generator().manual_seed(9)
    ids = torch.randint(0, V, (6, 40), generator=generator)  # ids 0..4 are special tokens
    maskable = ids >= 5
    for p in (0.15, 0.3, 0.5, 1.0):
        corrupted, target = mlm_corrupt(ids, MASK, maskable, mask_prob=p, generator=generator)
        for row in range(6):
            n = int(maskable[row].sum())
            assert int(target[row].sum()) == math.floor(p * n + 0.5)
        assert not bool((target & ~maskable).any())
        assert bool((corrupted[target] == MASK).all()) and torch.equal(corrupted[~target], ids[~target])


def test_mlm_corrupt_chooses_uniformly():
    ids = torch.full((1, 10), 7)
    maskable = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)  # n = 8, k = 2
    generator = torch.Generator().manual_seed(10)
    draws = 4000
    counts = torch.zeros(10)
    for _ in range(draws):
        counts += mlm_corrupt(ids, MASK, maskable, mask_prob=0.25, generator=generator)[1][0]
    p = 2 / 8
    assert counts[0] == 0 and counts[9] == 0
    assert bool(((counts[1:9] / draws - p).abs() < 4 * math.sqrt(p * (1 - p) / draws)).all())


def test_mlm_corrupt_80_10_10():
    generator = torch.Generator().manual_seed(11)
    ids = torch.randint(5, V, (8, 5000), generator=generator)
    maskable = torch.ones_like(ids, dtype=torch.bool)
    corrupted, target = mlm_corrupt(ids, MASK, maskable, mask_prob=0.5, replace=True,
                                      vocab_size=V, generator=generator)
    assert torch.equal(corrupted[~target], ids[~target])
    n = int(target.sum())
    # a random replacement is drawn from all V ids: it is <mask> or the original with 1/V each
    expected = {
        "mask": 0.8 + 0.1 / V,
        "same": 0.1 + 0.1 / V,
        "other": 0.1 * (1 - 2 / V),
    }
    observed = {
        "mask": int((corrupted[target] == MASK).sum()) / n,
        "same": int((corrupted[target] == ids[target]).sum()) / n,
    }
    observed["other"] = 1 - observed["mask"] - observed["same"]
    for key, p in expected.items():
        assert abs(observed[key] - p) < 4 * math.sqrt(p * (1 - p) / n), key


@pytest.mark.parametrize("exclude", [False, True])
def test_mlm_loss_equals_direct_cross_entropy(model, exclude):
    ids = torch.randint(0, V, (3, 12), generator=torch.Generator().manual_seed(12))
    maskable = ids >= 5
    loss, n = mlm_loss(model, ids, MASK, maskable=maskable, mask_prob=0.3, replace=True,
                         exclude_mask_logit=exclude, generator=torch.Generator().manual_seed(13))
    corrupted, target = mlm_corrupt(ids, MASK, maskable, mask_prob=0.3, replace=True,
                                      vocab_size=V, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        logits = model(corrupted).double()  # [B, S, V]
    if exclude:
        logits[..., MASK] = -math.inf
    ce = -logits.log_softmax(-1).gather(-1, ids[..., None])[..., 0]
    assert int(n) == int(target.sum()) > 0
    assert loss.item() == pytest.approx(ce[target].mean().item(), rel=1e-5)


def test_nelbo_under_bf16_autocast_is_close_to_fp32(model):
    x0 = torch.randint(5, V, (4, 8), generator=torch.Generator().manual_seed(15))
    with torch.no_grad():
        full, _ = D.nelbo_loss(model, x0, MASK, generator=torch.Generator().manual_seed(16))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half, _ = D.nelbo_loss(model, x0, MASK, generator=torch.Generator().manual_seed(16))
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(full.item(), rel=0.05)


@pytest.mark.parametrize("normalize", ["sequence", "token"])
def test_nelbo_normalizer_recombines_micro_batches(model, normalize):
    """At t = 1 every maskable position is masked (no randomness), so two micro-batches weighted
    by nelbo_normalizer recombine into the loss of the whole batch:
    sum_m loss_m n_m / sum_m n_m = loss(batch)."""
    g = torch.Generator().manual_seed(3)
    x0 = torch.randint(5, V, (4, 7), generator=g)
    maskable = torch.ones_like(x0, dtype=torch.bool)
    maskable[0, 5:] = False  # rows with different maskable counts
    maskable[2, :4] = False
    whole, _ = D.nelbo_loss(model, x0, MASK, maskable=maskable, normalize=normalize, t=1.0)
    parts, weights = [], []
    for rows in (slice(0, 1), slice(1, 4)):
        loss, _ = D.nelbo_loss(model, x0[rows], MASK, maskable=maskable[rows], normalize=normalize, t=1.0)
        parts.append(loss.double())
        weights.append(D.nelbo_normalizer(maskable[rows], normalize).double())
    recombined = sum(p * w for p, w in zip(parts, weights)) / sum(weights)
    torch.testing.assert_close(recombined, whole.double(), rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# score_answers: exact enumeration, standard errors, bounded memory
# ---------------------------------------------------------------------------------------------


def test_exact_score_is_the_any_order_average_over_the_answer(model):
    """exact = -(mean over the L! orders of the answer's positions of -log p_sigma), float64;
    prompt positions are never masked. Also equal to exact_nelbo with only the answer maskable."""
    double = copy.deepcopy(model).double()
    pairs = [([BOS, 5, 6], [9, 7, 11]), ([BOS, 8], [10, 5, 6, 7]), ([BOS, 6], [5])]
    got = answers.score_answers(double, pairs, MASK, pad_id=PAD, scoring="exact", batch_size=5)
    for (prompt, answer), score in zip(pairs, got):
        x0 = torch.tensor(prompt + answer)
        positions = list(range(len(prompt), len(x0)))
        reference = float(order_logprobs(double, x0, positions).mean())
        assert score.exact and score.se == 0.0
        assert score.loglik == pytest.approx(reference, rel=1e-12, abs=1e-12)
        maskable = torch.tensor([0] * len(prompt) + [1] * len(answer), dtype=torch.bool)
        assert -score.loglik == pytest.approx(D.exact_nelbo(double, x0, MASK, maskable), rel=1e-12)


def test_exact_scores_do_not_depend_on_the_seed(model):
    pairs = [([BOS, 5, 6], [9, 7, 11]), ([BOS], [7, 8])]
    a = answers.score_answers(model, pairs, MASK, pad_id=PAD, scoring="exact", seeds=[0, 1])
    b = answers.score_answers(model, pairs, MASK, pad_id=PAD, scoring="exact", seeds=[2, 3])
    assert a == b


def test_auto_is_exact_when_no_dearer_than_the_samples_it_replaces(model):
    pairs = [([BOS, 5], [9]), ([BOS, 5], [9, 7]), ([BOS, 5], [9, 7, 11]), ([BOS, 5], [9, 7, 11, 6])]
    got = answers.score_answers(model, pairs, MASK, pad_id=PAD, num_samples=7, scoring="auto", seeds=[2] * 4)
    # 2^L - 1 = 1, 3, 7, 15 forwards against 7 samples
    assert [s.exact for s in got] == [True, True, True, False]
    assert got[3].se > 0
    with pytest.raises(UserError, match="at most 16 tokens"):
        answers.score_answers(model, [([BOS], [5] * 17)], MASK, pad_id=PAD, scoring="exact")


def test_mc_standard_error_is_the_spread_of_its_samples(model):
    """se = std(v_j, ddof=1) / sqrt(n), v_j = (L / l_j) sum_masked CE recomputed here row by row."""
    prompt, answer, n = [BOS, 5, 6], [9, 7, 11, 8], 10
    got = answers.score_answers(model, [(prompt, answer)], MASK, pad_id=PAD, num_samples=n, batch_size=3,
                          scoring="mc", seeds=[4])[0]
    generator = torch.Generator().manual_seed(4)
    masks, weights = D.draw_answer_masks(len(answer), n, answers.stratum_offset(len(answer), generator), generator=generator)
    values = []
    for mask, weight in zip(masks, weights):
        x = torch.tensor(prompt + answer)
        target = torch.tensor(prompt + answer)
        x[len(prompt):][mask] = MASK
        with torch.no_grad():
            logits = model(x[None])[0].double()
        logits[:, MASK] = -math.inf
        ce = -logits.log_softmax(-1)[torch.arange(len(x)), target]
        values.append(float(weight) * float(ce[len(prompt):][mask].sum()))
    mean, se = mean_and_se(values)
    assert got.loglik == pytest.approx(-mean, rel=1e-5) and got.se == pytest.approx(se, rel=1e-4)


def test_draws_in_chunks_are_the_draws_at_once():
    generator = torch.Generator().manual_seed(8)
    whole = D.draw_answer_masks(5, 23, answers.stratum_offset(5, generator), generator=generator)
    generator = torch.Generator().manual_seed(8)
    offset = answers.stratum_offset(5, generator)
    parts = [D.draw_answer_masks(5, 23, offset, range(a, b), generator) for a, b in ((0, 4), (4, 5), (5, 23))]
    assert torch.equal(torch.cat([m for m, _ in parts]), whole[0])
    assert torch.equal(torch.cat([w for _, w in parts]), whole[1])


class RowLimit(nn.Module):
    """Forwards to `model` while checking each forward's rows; stops after `forwards` forwards."""

    def __init__(self, model, rows: int, forwards: int):
        super().__init__()
        self.model, self.rows, self.left = model, rows, forwards
        self.config = model.config

    def forward(self, input_ids, attention_mask=None, logits_at=None):
        assert input_ids.shape[0] <= self.rows
        self.left -= 1
        if self.left < 0:
            raise StopIteration("enough forwards")
        return self.model(input_ids, attention_mask, logits_at=logits_at)


def test_a_billion_samples_run_in_forwards_of_batch_size_rows(model):
    """No allocation grows with num_samples: the first forwards start at once, each batch_size rows."""
    guard = RowLimit(model, rows=8, forwards=3)
    with pytest.raises(StopIteration):
        answers.score_answers(guard, [([BOS, 5], [9, 7, 11])], MASK, pad_id=PAD, num_samples=10**9,
                        batch_size=8, scoring="mc", seeds=[0])
    assert guard.left < 0
