"""Padded batches give the real tokens exactly what the same rows give unpadded.

The rows are short enough that padding queries lie more than local_attention // 2 past the
row's end: without the self-attention diagonal their local window holds no key at all. The
references are independent: each row run alone without padding (same model, float64), and
transformers' ModernBertForMaskedLM with the same weights (for rows where it is defined). Every SDPA backend this machine
offers is tried.
"""
from __future__ import annotations

import pytest
import torch
from helpers import PAD, assert_close_rel, hf_twin, tiny_model
from torch.nn.attention import SDPBackend, sdpa_kernel

LENGTHS = [14, 3, 1]  # row 2: 13 padding positions, window half-width 2
WINDOW = 4            # local_attention: |i - j| <= 2
# the SDPA backends torch has for CPU tensors; the CUDA-only ones (memory-efficient, cuDNN) are
# checked on a GPU by tests/test_cuda.py::test_padded_rows_equal_each_row_alone
BACKENDS = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION}


def model_and_batch(dtype=torch.float64, lengths=LENGTHS):
    # layers 0 and 3 global, 1, 2 and 4 local: both layer types, local ones in sequence
    model = tiny_model(3, local_attention=WINDOW, num_hidden_layers=5, global_attn_every_n_layers=3).to(dtype)
    S = max(lengths)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.config.vocab_size, (len(lengths), S), generator=g)
    mask = (torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]).long()  # [B, S]
    return model, ids.masked_fill(mask == 0, PAD), mask


def layer_outputs(model, ids, mask):
    """Hidden states after every encoder layer (and the logits), via forward hooks."""
    seen = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: seen.append(out)) for layer in model.model.layers]
    try:
        logits = model(ids, mask)
    finally:
        for h in hooks:
            h.remove()
    return seen + [logits]


def test_every_attention_row_has_a_key():
    model, ids, mask = model_and_batch()
    S = ids.shape[1]
    global_mask, local_mask = model.model.attention_masks(mask, S, ids.device)
    for m in (global_mask, local_mask):
        assert m.expand(len(LENGTHS), 1, S, S).any(dim=-1).all()  # no query row is fully masked
    # written out per query: the real keys in its window, or itself when there are none
    for b, n in enumerate(LENGTHS):
        for i in range(S):
            window = [j for j in range(S) if abs(i - j) <= WINDOW // 2 and j < n] or [i]
            assert local_mask[b, 0, i].nonzero().flatten().tolist() == window, (b, i)
            assert global_mask[b, 0, 0].nonzero().flatten().tolist() == list(range(n))
    # a row with no real token at all attends to every position in global layers
    empty = torch.zeros(1, S, dtype=torch.long)
    assert model.model.attention_masks(empty, S, ids.device)[0].all()


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_padded_equals_unpadded_in_every_layer(backend):
    model, ids, mask = model_and_batch()
    with torch.no_grad(), sdpa_kernel([BACKENDS[backend]]):
        padded = layer_outputs(model, ids, mask)
    with torch.no_grad():
        for b, n in enumerate(LENGTHS):
            alone = layer_outputs(model, ids[b:b + 1, :n], None)  # the row without any padding
            for k, (got, want) in enumerate(zip(padded, alone)):
                assert torch.isfinite(got[b]).all(), (backend, b, k)  # padding rows too
                assert_close_rel(got[b, :n], want[0], 1e-10, f"{backend} row {b} layer {k}")


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_padded_real_tokens_match_transformers(impl):
    # Where transformers is a usable reference: rows whose padding stays within half a window.
    # (transformers 5.24 returns NaN for the real tokens of rows like LENGTHS[1:], whose
    # padding queries have an empty local window, in both its eager and sdpa paths.)
    # It computes rotary angles and rotated q, k in float32 even in a float64 model, hence 1e-5.
    model, ids, mask = model_and_batch(torch.float32, lengths=[14, 12, 13])
    hf = hf_twin(model, impl).to(torch.float64)
    model = model.to(torch.float64)
    real = mask.bool()
    with torch.no_grad():
        ours = model(ids, mask)
        theirs = hf(input_ids=ids, attention_mask=mask).logits
    assert_close_rel(ours[real], theirs[real], 1e-5, impl)
