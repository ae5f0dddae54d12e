"""Cached sampling (prefix / dual key/value caches) and the fixed-shape, compilable step.

Exactness is checked against the exact sampler (cache="none", itself checked against a plain
reference in test_sampler.py), against full forwards of the model, and against keys/values
recomputed here from hooked layer inputs with rotary written as a complex rotation.
"""
from __future__ import annotations

import functools
import itertools
import random

import pytest
import torch
from helpers import EOS, MASK, tiny_model

from minidiff.errors import UserError
from minidiff.sampler import SamplerConfig, build_canvas
from minidiff.speed.kv_cache import BlockLogits, KVCache, cached_hidden
from minidiff.speed.sampling import FastConfig, LateCount, block_step, generate

V = 64


def prompt(seed, n):
    rng = random.Random(seed)
    return [rng.randrange(5, V) for _ in range(n)]


@pytest.fixture(scope="module")
def model():
    # local_attention 4 (band of 2) < canvas, so local layers really are banded
    return tiny_model(11, num_hidden_layers=4, local_attention=4)


BATCHES = {"one row, no attention mask": [prompt(1, 5)],
           "three lengths, attention mask": [prompt(2, 4), prompt(3, 9), prompt(4, 6)]}


def canvas_of(prompts, n_new):
    """[prompt | masks | eos] per row and the attention mask (None for one row), as generate."""
    lengths = [len(p) for p in prompts]
    T = max(lengths) + n_new
    x = torch.full((len(prompts), T), EOS)
    for r, p in enumerate(prompts):
        x[r, : len(p)] = torch.tensor(p)
        x[r, len(p): len(p) + n_new] = MASK
    mask = None
    if len(prompts) > 1:
        mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None] + n_new).long()
    return x, mask, lengths


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("mode", ["dual", "prefix"])
@pytest.mark.parametrize("threshold", [None, 0.3])
def test_refresh_every_step_is_the_exact_sampler(model, batch, mode, threshold):
    config = FastConfig(max_new_tokens=12, steps=12, block_length=4, stop_at_eos=False, length_bucket=0,
                           repetition_penalty=1.2, threshold=threshold)
    exact = generate(model, BATCHES[batch], config, mask_id=MASK, eos_id=EOS)
    cached = generate(model, BATCHES[batch], config.replace(cache=mode, cache_refresh=1),
                      mask_id=MASK, eos_id=EOS)
    assert torch.equal(cached.sequences, exact.sequences)
    if threshold is None:
        assert cached.num_forward == exact.num_forward
    else:  # the masks-left count is read one step late: at most one extra step per block ...
        assert exact.num_forward <= cached.num_forward <= exact.num_forward + 3
        # ... and an extra step commits nothing
        assert sum(1 for s in cached.trace if s.committed.any()) == exact.num_forward


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("mode", ["dual", "prefix"])
def test_hidden_states_from_the_cache_equal_the_full_forward(model, batch, mode):
    prompts = BATCHES[batch]
    x, mask, lengths = canvas_of(prompts, 12)
    x[:, 2] = MASK  # a mask inside the prompt too
    full = model.hidden(x, mask)  # [B, T, H], the exact path
    cache = KVCache()
    torch.testing.assert_close(cached_hidden(model, x, mask, cache), full, rtol=0, atol=0)
    starts = torch.tensor(lengths)[:, None] + 4  # the second block of 4
    width = 4 if mode == "dual" else x.shape[1] - min(lengths) - 4
    positions = starts + torch.arange(width)[None]  # [B, Q]; prefix: past the end = unused
    ids = x.gather(1, positions.clamp(max=x.shape[1] - 1))
    h = cached_hidden(model, ids, mask, cache.at(positions))
    for r in range(len(prompts)):
        own = positions[r] < lengths[r] + 12  # the row's own canvas (not its eos padding)
        torch.testing.assert_close(h[r][own], full[r, positions[r][own]], rtol=1e-5, atol=1e-5)


def rotate_complex(x, theta):
    """Rotary as a complex rotation: (x1 + i x2) e^{i p w_k}, w_k = theta^(-2k/d)."""
    d = x.shape[-1]
    w = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = torch.arange(x.shape[-2], dtype=torch.float64)[:, None] * w[None]  # [S, d/2]
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2:].double()) * torch.polar(
        torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], -1).float()


@pytest.mark.parametrize("batch", list(BATCHES))
def test_cached_keys_values_equal_a_full_forward(model, batch):
    """Every layer's cached keys/values (what prefix mode keeps) equal ones recomputed here from
    the layer inputs of a plain forward; each row of a batch equals that prompt alone."""
    prompts = BATCHES[batch]
    x, mask, lengths = canvas_of(prompts, 8)
    inputs = []
    hooks = [layer.attn.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
             for layer in model.model.layers]
    model.hidden(x, mask)
    for h in hooks:
        h.remove()
    cache = KVCache()
    cached_hidden(model, x, mask, cache)
    c, heads = model.config, model.config.num_attention_heads
    for i, layer in enumerate(model.model.layers):
        B, T, H = inputs[i].shape
        q, k, v = (inputs[i] @ layer.attn.Wqkv.weight.T).view(B, T, 3, heads, H // heads).unbind(2)
        theta = c.global_rope_theta if layer.is_global else c.local_rope_theta
        k = rotate_complex(k.transpose(1, 2), theta)  # [B, heads, T, d]
        torch.testing.assert_close(cache.keys[i], k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.values[i], v.transpose(1, 2), rtol=0, atol=0)
    for r, p in enumerate(prompts):  # the batch row equals the prompt alone
        alone_x, _, _ = canvas_of([p], 8)
        alone = KVCache()
        cached_hidden(model, alone_x, None, alone)
        n = alone_x.shape[1]
        for i in range(len(model.model.layers)):
            torch.testing.assert_close(cache.keys[i][r, :, :n], alone.keys[i][0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["dual", "prefix"])
def test_batch_rows_equal_each_prompt_alone(model, mode):
    """The approximate caches too: a row of a batch of different lengths = that prompt alone."""
    prompts = BATCHES["three lengths, attention mask"]
    config = FastConfig(max_new_tokens=12, steps=12, block_length=4, stop_at_eos=False, cache=mode)
    out = generate(model, prompts, config, mask_id=MASK, eos_id=EOS)
    for r, p in enumerate(prompts):
        alone = generate(model, [p], config, mask_id=MASK, eos_id=EOS).sequences[0]
        assert torch.equal(out.sequences[r, : len(alone)], alone)


def test_cache_modes_fill_every_mask_and_validate(model):
    for mode in ("dual", "prefix"):
        config = FastConfig(max_new_tokens=10, steps=5, block_length=4, stop_at_eos=False, length_bucket=0,
                               cache=mode, cfg_scale=0.5)
        out = generate(model, [prompt(5, 3), prompt(6, 7)], config, mask_id=MASK, eos_id=EOS)
        assert not (out.sequences == MASK).any() and out.num_forward == 6  # 3 blocks x 2 steps
    with pytest.raises(UserError, match="cache must be one of"):
        FastConfig(cache="kv")
    with pytest.raises(UserError, match="cache_refresh"):
        FastConfig(cache="dual", cache_refresh=0)


# ----------------------------------------------------------------------------- static step


def test_step_makes_no_host_read(model, monkeypatch):
    """The fixed-shape step (fill and cached, with threshold, penalty and cfg) with every
    tensor-to-host conversion patched to fail."""
    prompts = BATCHES["three lengths, attention mask"]
    canvas = build_canvas([p + [MASK] * 8 for p in prompts], [len(p) for p in prompts], 8,
                          [len(p) for p in prompts], SamplerConfig(block_length=4), mask_id=MASK,
                          eos_id=EOS, device="cpu")
    block, counts = canvas.blocks[0], torch.tensor([1, 2, 1])
    configs = [FastConfig(cache=mode, threshold=threshold, repetition_penalty=1.2, cfg_scale=0.5)
               for mode, threshold in (("dual", None), ("prefix", 0.5), ("none", None))]
    # made before the patch: prefix mode reads the block's start once per block
    sources = [BlockLogits(model, config, block, canvas.ids.shape[1]) for config in configs]

    def fail(*args, **kwargs):
        raise AssertionError("host read in the step")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, fail)
    for config, logits in zip(configs, sources):
        for i in ((0, 1) if config.cache != "none" else (0,)):  # step 0 fills the cache, step 1 reads it
            assert logits.refreshes(i) == (config.cache != "none" and i == 0)
            for logit_width in (None, 2):  # the whole block, or the first 2 still-masked positions
                ids, positions, committed, left = block_step(logits.at_step(i), canvas.ids, canvas, block,
                                                             counts, config, None, logit_width)
                assert ids.shape == canvas.ids.shape and left.dim() == 0
                assert positions.shape == committed.shape == (3, 4 if logit_width is None else 2)


@pytest.mark.slow  # inductor compiles the step once (C++ on the CPU): tens of seconds
def test_compiled_step_same_tokens_no_recompile(model):
    from torch._dynamo.utils import counters

    prompts = BATCHES["three lengths, attention mask"]
    config = FastConfig(max_new_tokens=12, steps=12, block_length=4, stop_at_eos=False, length_bucket=0,
                           repetition_penalty=1.2, cache="dual")
    eager = generate(model, prompts, config, mask_id=MASK, eos_id=EOS)
    torch._dynamo.reset()
    counters.clear()
    compiled = generate(model, prompts, config.replace(compile=True), mask_id=MASK, eos_id=EOS)
    assert torch.equal(compiled.sequences, eager.sequences)
    # 3 blocks x 3 cached steps of one shape: traced once, never recompiled
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["recompiles"].values()) == 0


def test_compiled_step_graphs_are_bounded(model, monkeypatch):
    """Twelve request settings (three caches x greedy, temperature 0.7, threshold 0.9, penalty 1.2)
    on batches of 1 and 3 rows, twice over: the numbers travel as tensors and shapes are bucketed,
    so the first pass makes one graph per logits source and batch bucket (3 x 2), the second none,
    and nothing hits dynamo's limit. Graphs are dynamo's, whatever the backend: aot_eager keeps the
    test fast (inductor: the slow test above). Each answer equals the uncompiled loop's."""
    from torch._dynamo.utils import counters

    from minidiff.speed import sampling

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    monkeypatch.setattr(sampling, "_COMPILED", {})
    torch._dynamo.reset()
    counters.clear()
    batches = [[prompt(1, 5)], BATCHES["three lengths, attention mask"]]
    settings = [dict(), dict(temperature=0.7), dict(threshold=0.9), dict(repetition_penalty=1.2)]
    graphs = []
    for rep in range(2):
        for cache in ("none", "prefix", "dual"):
            for setting, batch in itertools.product(settings, batches):
                config = FastConfig(max_new_tokens=12, steps=12, block_length=4, stop_at_eos=False,
                                    length_bucket=0, cache=cache, **setting)
                compiled = generate(model, batch, config.replace(compile=True), mask_id=MASK, eos_id=EOS)
                assert compiled.sequences.shape == (len(batch), max(map(len, batch)) + 12)
                if rep == 0 and "temperature" not in setting:  # bucketing changes no answer
                    eager = generate(model, batch, config, mask_id=MASK, eos_id=EOS)
                    assert torch.equal(compiled.sequences, eager.sequences)
                    assert [s.committed.sum() for s in compiled.trace] == [s.committed.sum() for s in eager.trace]
                elif "temperature" in setting:
                    assert not (compiled.sequences == MASK).any()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [6, 6]


# ----------------------------------------------------------------------------- late reads on CUDA


def test_late_count_records_on_the_samplers_device_stream(monkeypatch):
    """With the sampler on cuda:1 while the current device is cuda:0, the count's copy and its
    event go on cuda:1's current stream (an event on cuda:0's stream would let the host read
    before the copy lands). CUDA's stream, event and pinned memory are stand-ins here."""
    class Stream:
        def __init__(self, device):
            self.device = torch.device(device)

    entered = []

    class StreamContext:
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            entered.append(self.stream)

        def __exit__(self, *exc):
            entered.append(None)

    class Event:
        def __init__(self, *args, **kwargs):
            self.stream, self.waited = None, False

        def record(self, stream=None):  # torch.cuda.Event.record: the current device's stream by default
            self.stream = stream if stream is not None else torch.cuda.current_stream()

        def synchronize(self):
            self.waited = True

    copies = []
    real_copy = torch.Tensor.copy_

    def copy(self, src, non_blocking=False):
        copies.append((entered[-1] if entered else None, non_blocking))
        return real_copy(self, src)

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream(device or "cuda:0"))
    monkeypatch.setattr(torch.cuda, "stream", StreamContext)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)
    monkeypatch.setattr(torch.Tensor, "copy_", copy)

    late = LateCount(torch.device("cuda:1"))
    assert late.read() is None  # nothing pushed yet
    late.push(torch.tensor(5))
    assert late.event.stream.device == torch.device("cuda:1")
    assert copies == [(late.event.stream, True)]  # the non-blocking copy went on that same stream
    assert late.read() == 5 and late.event.waited
