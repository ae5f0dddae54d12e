"""The chunked vocabulary loss (minidiff.speed.chunked_loss) against dense computations written here
and against minidiff.diffusion's dense losses.

In float64 the loss and every gradient (head features, decoder weight tied to the embedding,
decoder bias, LoRA A/B, every model parameter) equal full-logits cross-entropy to 1e-10
relative, for chunks of 1 row, 7 rows and more rows than there are; nelbo_loss (both
normalisations, and equal to diffusion.nelbo_loss), mlm_loss (with and without the <mask>
logit), the answer scorer; bf16 autocast runs.
"""
from __future__ import annotations

import math

import pytest
import torch
from helpers import MASK, PAD, tiny_model

from minidiff import diffusion
from minidiff.evaluation import answers
from minidiff.evaluation.perplexity import mlm_corrupt
from minidiff.lora import apply_lora
from minidiff.speed import chunked_loss

TOL = 1e-10


def assert_close(got, want, tol=TOL):
    scale = want.abs().max().clamp(min=1e-300)
    assert (got - want).abs().max() <= tol * scale, float((got - want).abs().max() / scale)


@pytest.fixture
def chunk_rows(monkeypatch, request):
    """Set the logits budget to `rows` float64 rows of the test vocabulary; record chunk sizes."""
    seen = []
    real = chunked_loss._chunk_logits

    def spy(features, *args):
        seen.append(features.shape[0])
        return real(features, *args)

    def set_rows(rows, vocab):
        monkeypatch.setattr(chunked_loss, "LOGITS_BUDGET_BYTES", rows * vocab * 8)
        monkeypatch.setattr(chunked_loss, "_chunk_logits", spy)
        return seen

    return set_rows


def mlm_loss(model, ids, mask_id: int, *, maskable, attention_mask=None, mask_prob: float = 0.15,
             replace: bool = False, vocab_size: int | None = None, exclude_mask_logit: bool = False,
             generator=None):
    """BERT's fixed-ratio MLM loss through the chunked loss: (mean CE over the targets, number of
    targets). maskable [B, S] bool or None (every position), never padding under an attention_mask;
    the softmax runs over the full vocabulary unless exclude_mask_logit=True."""
    if vocab_size is None:
        vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    maskable = torch.ones_like(ids, dtype=torch.bool) if maskable is None else maskable.bool()
    if attention_mask is not None:
        maskable = maskable & attention_mask.bool()
    corrupted, is_target = mlm_corrupt(ids, mask_id, maskable, mask_prob=mask_prob,
                                       replace=replace, vocab_size=vocab_size, generator=generator)
    # mean over targets: sum_i CE_i / N
    weight = torch.tensor(1.0 / max(int(is_target.sum()), 1), dtype=torch.float64)
    loss, _ = chunked_loss.decoder_cross_entropy(model, corrupted, is_target, ids, weight,
                                                 attention_mask=attention_mask,
                                                 excluded_id=mask_id if exclude_mask_logit else None)
    return loss, is_target.sum()


def dense_ce(logits, targets, excluded):
    """-log softmax(logits)[target], column `excluded` removed: [..., V] -> [...]."""
    if excluded is not None:
        logits = logits.clone()
        logits[..., excluded] = -math.inf
    return -logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)


# ----------------------------------------------------------------------------- the function


@pytest.mark.parametrize("rows", [1, 7, 1000])
@pytest.mark.parametrize("excluded", [None, 3])
def test_function_equals_dense(chunk_rows, rows, excluded):
    N, H, V = 23, 6, 11
    g = torch.Generator().manual_seed(rows)
    f = torch.randn(N, H, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(V, H, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(V, (N,), generator=g)
    y[y == 3] = 4  # never the excluded id
    w = torch.rand(N, dtype=torch.float64, generator=g)
    seen = chunk_rows(rows, V)

    loss, ce = chunked_loss.linear_cross_entropy(f, W, b, y, w, excluded_column=excluded)
    grads = torch.autograd.grad(3.0 * loss, (f, W, b))
    want_ce = dense_ce(f @ W.T + b, y, excluded)
    want = (w * want_ce).sum()
    want_grads = torch.autograd.grad(3.0 * want, (f, W, b))

    assert seen == [min(rows, N - s) for s in range(0, N, rows)]
    assert_close(loss, want)
    assert_close(ce, want_ce.detach())
    for got, ref in zip(grads, want_grads):
        assert_close(got, ref)


def test_function_with_no_rows_and_without_bias():
    f = torch.zeros(0, 4, dtype=torch.float64, requires_grad=True)
    W = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    loss, ce = chunked_loss.linear_cross_entropy(f, W, None, torch.zeros(0, dtype=torch.long),
                                                 torch.zeros(0, dtype=torch.float64), excluded_column=2)
    loss.backward()
    assert loss.item() == 0.0 and ce.shape == (0,)
    assert f.grad.shape == (0, 4) and torch.equal(W.grad, torch.zeros_like(W))


def test_without_grad_only_the_loss_is_computed(monkeypatch):
    f, W = torch.randn(5, 4, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    y, w = torch.tensor([0, 1, 2, 3, 4]), torch.ones(5, dtype=torch.float64)
    with_grad, _ = chunked_loss.linear_cross_entropy(f, W, None, y, w)
    monkeypatch.setattr(chunked_loss._LinearCrossEntropy, "apply", None)  # would fail if called
    with torch.no_grad():
        without, _ = chunked_loss.linear_cross_entropy(f, W, None, y, w)
    assert not without.requires_grad
    assert_close(without, with_grad.detach())


def test_rows_per_chunk_follows_the_budget():
    assert chunked_loss.rows_per_chunk(256_000, torch.bfloat16, 256 * 2**20) == 262  # fp32 logits
    assert chunked_loss.rows_per_chunk(1000, torch.float64, 8000 * 7) == 7
    assert chunked_loss.rows_per_chunk(10**9, torch.float32, 10) == 1


# ----------------------------------------------------------------------------- the model side


def test_decode_false_gives_the_decoder_input():
    model = tiny_model(1).double()
    ids = torch.randint(5, 64, (2, 9))
    sel = torch.rand(2, 9) < 0.5
    features = model(ids, logits_at=sel, decode=False)
    assert features.shape == (int(sel.sum()), model.config.hidden_size)
    assert torch.equal(model.decoder(features), model(ids, logits_at=sel))


def model_under_test(kind):
    """full: every parameter trains (decoder tied to the embedding); lora: adapters only,
    with B made non-zero so the A gradients are not trivially zero."""
    model = tiny_model(3).double()
    assert model.decoder.weight is model.model.embeddings.tok_embeddings.weight
    if kind == "lora":
        apply_lora(model, r=4, alpha=8)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.3)
    return model


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def check_loss_and_grads(model, chunked, dense):
    params = trainable(model)
    got = torch.autograd.grad(chunked, [p for _, p in params])
    want = torch.autograd.grad(dense, [p for _, p in params])
    assert_close(chunked.detach(), dense.detach())
    for (name, _), a, b in zip(params, got, want):
        assert a.abs().max() > 0 or b.abs().max() == 0, name
        assert_close(a, b)


def batch():
    x0 = torch.randint(5, 64, (4, 16), generator=torch.Generator().manual_seed(7))
    attention = torch.ones_like(x0)
    attention[1, 11:] = 0  # a padded row
    x0[1, 11:] = PAD
    return x0, attention


@pytest.mark.parametrize("kind", ["full", "lora"])
@pytest.mark.parametrize("rows", [1, 7, 1000])
@pytest.mark.parametrize("normalize", ["sequence", "token"])
def test_nelbo_loss_equals_dense(chunk_rows, kind, rows, normalize):
    model = model_under_test(kind)
    x0, attention = batch()
    maskable = attention.bool()
    t = torch.tensor([0.5, 0.25, 1.0, 0.125])  # w(t) = 1/t exact in fp32 and fp64
    seen = chunk_rows(rows, model.config.vocab_size)

    loss, num_masked = chunked_loss.nelbo_loss(model, x0, MASK, attention_mask=attention, normalize=normalize,
                                               t=t, generator=torch.Generator().manual_seed(11))

    # dense: the same draws, logits everywhere, <mask> removed, CE at the masked positions
    xt, is_masked = diffusion.corrupt(x0, t, MASK, maskable, torch.Generator().manual_seed(11),
                                      diffusion.get_schedule("linear"))
    ce = dense_ce(model(xt, attention), x0, MASK)  # [B, S]
    per_row = torch.where(is_masked, ce, 0.0).sum(1) / t.double()  # [B]
    if normalize == "sequence":
        dense = (per_row / maskable.sum(1)).mean()
    else:
        dense = per_row.sum() / maskable.sum()

    N = int(is_masked.sum())
    assert int(num_masked) == N and 7 < N < 1000  # several 7-row chunks; one 1000-row chunk
    assert seen == [min(rows, N - s) for s in range(0, N, rows)]
    check_loss_and_grads(model, loss, dense)


@pytest.mark.parametrize("kind", ["full", "lora"])
@pytest.mark.parametrize("normalize", ["sequence", "token"])
def test_chunked_nelbo_loss_equals_the_dense_one(chunk_rows, kind, normalize):
    """chunked_loss.nelbo_loss is diffusion.nelbo_loss: the same draws, loss and gradients (float64),
    the times drawn too (stratified) and padding under an attention mask."""
    model = model_under_test(kind)
    x0, attention = batch()
    chunk_rows(7, model.config.vocab_size)
    options = dict(attention_mask=attention, normalize=normalize, stratified=True, schedule="cosine")
    chunked, n = chunked_loss.nelbo_loss(model, x0, MASK, generator=torch.Generator().manual_seed(3), **options)
    dense, m = diffusion.nelbo_loss(model, x0, MASK, generator=torch.Generator().manual_seed(3), **options)
    assert int(n) == int(m) > 7
    check_loss_and_grads(model, chunked, dense)


def test_chunked_masked_ce_per_row_equals_the_dense_one(chunk_rows):
    model = model_under_test("full")
    x0, attention = batch()
    chunk_rows(7, model.config.vocab_size)
    is_masked = (torch.rand(x0.shape, generator=torch.Generator().manual_seed(6)) < 0.4) & attention.bool()
    with torch.no_grad():
        chunked = chunked_loss.masked_ce_per_row(model, x0, is_masked, MASK, attention)
        dense = diffusion.masked_ce_per_row(model, x0, is_masked, MASK, attention)
    assert chunked.dtype == dense.dtype == torch.float64 and chunked.shape == (x0.shape[0],)
    assert_close(chunked, dense)


def test_nelbo_loss_with_nothing_masked_backpropagates_zero():
    model = model_under_test("full")
    x0, _ = batch()
    loss, n = chunked_loss.nelbo_loss(model, x0, MASK, maskable=torch.zeros_like(x0, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and n.item() == 0
    assert model.decoder.bias.grad is not None and model.decoder.bias.grad.abs().max() == 0


@pytest.mark.parametrize("exclude", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 1000])
def test_mlm_loss_equals_dense(chunk_rows, exclude, rows):
    model = model_under_test("full")
    x0, attention = batch()
    seen = chunk_rows(rows, model.config.vocab_size)
    loss, n = mlm_loss(model, x0, MASK, maskable=None, attention_mask=attention, mask_prob=0.3,
                       replace=True, exclude_mask_logit=exclude, generator=torch.Generator().manual_seed(5))
    corrupted, is_target = mlm_corrupt(x0, MASK, attention.bool(), mask_prob=0.3, replace=True,
                                       vocab_size=64, generator=torch.Generator().manual_seed(5))
    ce = dense_ce(model(corrupted, attention), x0, MASK if exclude else None)  # [B, S]
    dense = ce[is_target].sum() / is_target.sum()
    assert seen and max(seen) <= rows
    check_loss_and_grads(model, loss, dense)


class LogitsOnly(torch.nn.Module):
    """The same model seen as a plain logits function: full logits, rows picked here."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, ids, attention_mask=None, logits_at=None):
        return self.inner(ids, attention_mask)[logits_at]


@pytest.mark.parametrize("rows", [1, 7, 1000])
def test_mc_loglik_equals_dense(chunk_rows, rows):
    model = model_under_test("full")
    seen = chunk_rows(rows, model.config.vocab_size)
    # one answer token: log p(a | prompt) exactly, the softmax without <mask>
    prompt, answer = [2, 17, 33, 40], [21]
    got = answers.mc_loglik_many(model, [(prompt, answer)], MASK, pad_id=PAD, num_samples=3)[0]
    logits = model(torch.tensor([prompt + [MASK]]))[0, -1].detach()  # [V]
    assert math.isclose(got, -float(dense_ce(logits, torch.tensor(21), MASK)), rel_tol=TOL)
    # several answers, padded batches: the same draws through dense logits
    pairs = [([2, 17, 33], [21, 30, 8, 9]), ([2, 5], [44, 12]), ([2, 7, 7, 7, 9], [50, 51, 52])]
    got = answers.mc_loglik_many(model, pairs, MASK, pad_id=PAD, num_samples=5, batch_size=4,
                                 generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = answers.mc_loglik_many(LogitsOnly(model), pairs, MASK, pad_id=PAD, num_samples=5,
                                      batch_size=4, generator=torch.Generator().manual_seed(2))
    assert seen and max(seen) <= rows
    for a, b in zip(got, want):
        assert math.isclose(a, b, rel_tol=TOL)


def test_wrapped_model_is_asked_through_its_forward():
    """A wrapper with .module (as DistributedDataParallel) sees the features call (decode=False)."""
    calls = []

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            calls.append(sorted(kwargs))
            return self.module(*args, **kwargs)

    model = model_under_test("full")
    x0, attention = batch()
    t = torch.tensor([0.5, 0.25, 1.0, 0.125])
    wrapped, _ = chunked_loss.nelbo_loss(Wrapper(model), x0, MASK, attention_mask=attention, t=t,
                                         generator=torch.Generator().manual_seed(1))
    plain, _ = chunked_loss.nelbo_loss(model, x0, MASK, attention_mask=attention, t=t,
                                       generator=torch.Generator().manual_seed(1))
    assert calls == [["decode", "logits_at"]]
    assert torch.equal(wrapped, plain)


def test_bf16_autocast_on_cpu_stays_near_fp32():
    model = tiny_model(3, hidden_size=64, num_attention_heads=4)
    x0, attention = batch()
    t = torch.tensor([0.5, 0.25, 1.0, 0.125])

    def run():
        loss, _ = chunked_loss.nelbo_loss(model, x0, MASK, attention_mask=attention, t=t,
                                          generator=torch.Generator().manual_seed(4))
        grads = torch.autograd.grad(loss, list(model.parameters()))
        return loss, grads

    ref_loss, ref_grads = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = run()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert abs(loss.item() - ref_loss.item()) <= 2e-2 * abs(ref_loss.item())
    for g, ref in zip(grads, ref_grads):
        assert g.dtype == ref.dtype and torch.isfinite(g).all()
        # bf16 keeps 8 bits of mantissa: a few parts in a hundred, relative to the gradient's norm
        assert (g - ref).norm() <= 5e-2 * ref.norm() + 1e-6
