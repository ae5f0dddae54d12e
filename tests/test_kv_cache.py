"""The key/value cache's memory (minidiff/speed/kv_cache.py); its exactness is in test_sampler_cache.py."""
from __future__ import annotations

import torch
from helpers import tiny_model

from minidiff.speed.kv_cache import KVCache, cached_hidden


def test_the_key_value_cache_holds_two_hidden_vectors_per_token_per_layer():
    """Bytes the filled cache keeps alive (every distinct storage behind its tensors) against the
    count written by hand: keys and values, hidden_size values each, per token and layer."""
    model = tiny_model()
    B, T, H = 3, 40, model.config.hidden_size
    cache = KVCache()
    with torch.no_grad():
        cached_hidden(model, torch.randint(5, model.config.vocab_size, (B, T)), None, cache)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in cache.keys + cache.values}
    per_token_per_layer = sum(storages.values()) / (B * T * model.config.num_hidden_layers * 4)  # fp32 values
    assert per_token_per_layer == 2 * H
