"""The encoder + MLM head against transformers' ModernBertForMaskedLM (the independent reference).

Weights are created and saved by transformers (`save_pretrained`), loaded by minidiff.load_model,
and both models run the same right-padded batches in fp32.
"""
import json

import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

import minidiff
from minidiff.model import ModelConfig, ModernBertMLM

# three small architectures: mmBERT-like, plain-ModernBERT-like, and a window much shorter than S
CONFIGS = {
    "mmbert": dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=2,
        global_rope_theta=160000.0, local_rope_theta=160000.0, local_attention=16, global_attn_every_n_layers=3,
        pad_token_id=0, eos_token_id=1, bos_token_id=2, cls_token_id=1, sep_token_id=1,
    ),
    "modernbert": dict(  # ModernBERT's layout scaled down: specials at the top of the vocabulary
        vocab_size=120, hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        global_rope_theta=160000.0, local_rope_theta=10000.0, local_attention=16, global_attn_every_n_layers=2,
        pad_token_id=115, eos_token_id=114, bos_token_id=113, cls_token_id=113, sep_token_id=114,
    ),
    "short_window": dict(
        vocab_size=80, hidden_size=32, intermediate_size=40, num_hidden_layers=5, num_attention_heads=2,
        global_rope_theta=80000.0, local_rope_theta=5000.0, local_attention=6, global_attn_every_n_layers=3,
        pad_token_id=0, eos_token_id=1, bos_token_id=2, cls_token_id=2, sep_token_id=1,
    ),
}
LENGTHS = [37, 21, 5]  # right padding: row b has LENGTHS[b] real tokens


def hf_checkpoint(tmp_path, name, seed=0):
    """A random transformers ModernBertForMaskedLM (norms and decoder bias perturbed so they
    matter), saved with transformers' own save_pretrained."""
    torch.manual_seed(seed)
    hf = transformers.ModernBertForMaskedLM(transformers.ModernBertConfig(**CONFIGS[name]))
    with torch.no_grad():
        for key, p in hf.named_parameters():
            if "norm" in key or key.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
            elif "tok_embeddings" in key:
                p.mul_(20.0)
    directory = tmp_path / name
    hf.save_pretrained(directory)
    return directory


def batch(vocab_size, pad_id, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab_size - 10, (len(LENGTHS), max(LENGTHS)), generator=g)
    mask = (torch.arange(max(LENGTHS))[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    return ids.masked_fill(mask == 0, pad_id), mask


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(tmp_path, name):
    directory = hf_checkpoint(tmp_path, name)
    ours = minidiff.load_model(directory)
    ids, mask = batch(CONFIGS[name]["vocab_size"], CONFIGS[name]["pad_token_id"])
    real = mask.bool()
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)
        assert got.shape == (*ids.shape, CONFIGS[name]["vocab_size"])
        for impl in ("eager", "sdpa"):
            hf = transformers.AutoModelForMaskedLM.from_pretrained(directory, attn_implementation=impl).eval()
            want = hf(input_ids=ids, attention_mask=mask).logits
            assert (got[real] - want[real]).abs().max() <= 1e-4, impl
        # without an attention mask: one full-length row (no padding anywhere)
        full = ids[:1]
        assert (ours(full) - hf(input_ids=full).logits).abs().max() <= 1e-4


def test_local_window_is_what_matters(tmp_path):
    """The short-window parity test is not vacuous: the same weights with a window covering the
    whole sequence give different logits, so the band mask really acts."""
    directory = hf_checkpoint(tmp_path, "short_window")
    ours = minidiff.load_model(directory)
    wide = minidiff.load_model(directory)
    wide.config.local_attention = 10_000  # masks are built from the config at each call
    ids, mask = batch(CONFIGS["short_window"]["vocab_size"], 0)
    with torch.no_grad():
        assert (ours(ids, mask) - wide(ids, mask))[mask.bool()].abs().max() > 1e-3


def test_logits_at_equals_dense(tmp_path):
    directory = hf_checkpoint(tmp_path, "mmbert")
    model = minidiff.load_model(directory)
    ids, mask = batch(CONFIGS["mmbert"]["vocab_size"], 0)
    g = torch.Generator().manual_seed(3)
    sel = (torch.rand(ids.shape, generator=g) < 0.3) & mask.bool()
    with torch.no_grad():
        dense = model(ids, mask)  # [B, S, V]
        rows = model(ids, mask, logits_at=sel)  # [N, V]
        # row-major order, written differently: an explicit loop over (b, s)
        expected = torch.stack([dense[b, s] for b in range(ids.shape[0]) for s in range(ids.shape[1]) if sel[b, s]])
        assert rows.shape == expected.shape
        assert torch.allclose(rows, expected, atol=1e-5, rtol=0)
        index = torch.tensor([[0, 3, 3, 10], [20, 1, 0, 2], [4, 0, 1, 2]])  # [B, K] positions
        gathered = model.logits_at_positions(ids, mask, index)  # [B, K, V]
        for b in range(index.shape[0]):
            for k in range(index.shape[1]):
                assert torch.allclose(gathered[b, k], dense[b, index[b, k]], atol=1e-5, rtol=0)


MMBERT_BASE = dict(
    vocab_size=256000, hidden_size=768, num_hidden_layers=22, num_attention_heads=12, intermediate_size=1152,
    max_position_embeddings=8192, global_rope_theta=160000.0, local_rope_theta=160000.0, local_attention=128,
    global_attn_every_n_layers=3, norm_eps=1e-5, norm_bias=False, attention_bias=False, mlp_bias=False,
    classifier_bias=False, decoder_bias=True, hidden_activation="gelu", classifier_activation="gelu",
    tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=2, cls_token_id=1, sep_token_id=1,
)


def test_mmbert_base_parameter_count():
    with torch.device("meta"):
        model = ModernBertMLM(ModelConfig(**MMBERT_BASE))
    assert model.num_parameters() == 307_786_240  # the mmBERT-base model card's figure
    # and the same count written out from ModernBertForMaskedLM's keys (decoder tied, bias only)
    V, H, I, L = 256000, 768, 1152, 22
    per_layer = 3 * H * H + H * H + H + 2 * I * H + H * I  # Wqkv, Wo, mlp_norm, Wi, Wo
    by_table = V * H + H + L * per_layer + (L - 1) * H + H + H * H + H + V
    assert model.num_parameters() == by_table
    assert len(model.state_dict()) == 138  # 138 tensors, decoder.weight included


def test_config_transformers4_layout(tmp_path):
    """A config.json as transformers 4.x wrote it (the layout jhu-clsp/mmBERT-base ships)."""
    raw = {
        "architectures": ["ModernBertForMaskedLM"], "model_type": "modernbert", "vocab_size": 50368,
        "hidden_size": 768, "intermediate_size": 1152, "num_hidden_layers": 7, "num_attention_heads": 12,
        "global_rope_theta": 160000.0, "local_rope_theta": 10000.0, "global_attn_every_n_layers": 2,
        "local_attention": 128, "pad_token_id": 50283, "eos_token_id": 50282, "bos_token_id": 50281,
        "cls_token_id": 50281, "sep_token_id": 50282, "norm_eps": 1e-5, "some_future_key": 1,
        "reference_compile": True, "classifier_pooling": "mean", "torch_dtype": "float32",
    }
    (tmp_path / "config.json").write_text(json.dumps(raw))
    c = ModelConfig.from_json(tmp_path / "config.json")
    assert c.global_rope_theta == 160000.0 and c.local_rope_theta == 10000.0
    f, s = "full_attention", "sliding_attention"
    assert c.layer_types == [f, s, f, s, f, s, f]
    assert (c.vocab_size, c.num_hidden_layers, c.head_dim, c.local_attention) == (50368, 7, 64, 128)
    assert (c.pad_token_id, c.eos_token_id, c.bos_token_id) == (50283, 50282, 50281)


def test_config_missing_local_rope_theta(tmp_path):
    """No local_rope_theta: follow transformers, which reads such a config with its class
    default 10000 (not the global theta), so the checkpoint was trained that way."""
    raw = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 4,
           "num_attention_heads": 2, "global_rope_theta": 50000.0, "global_attn_every_n_layers": 3}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    c = ModelConfig.from_json(tmp_path / "config.json")
    hf = transformers.ModernBertConfig.from_pretrained(tmp_path)
    assert c.local_rope_theta == hf.rope_parameters["sliding_attention"]["rope_theta"] == 10000.0
    assert c.global_rope_theta == hf.rope_parameters["full_attention"]["rope_theta"] == 50000.0
    f, s = "full_attention", "sliding_attention"
    assert c.layer_types == [f, s, s, f] == list(hf.layer_types)


def test_rotary_stays_fp32_when_model_is_cast_to_bf16():
    """model.to(bf16) must not round the rotary frequencies: compare the angles' cos at position
    511 (fp32 inputs) with a float64 computation written out here."""
    torch.manual_seed(0)
    model = ModernBertMLM(ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=2, global_rope_theta=160000.0)).to(torch.bfloat16)
    (cos, _), _ = model.model.rotary_and_masks(torch.zeros(1, 512, 64), None)[True]
    d = 32
    inv = 1.0 / (160000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    expected = torch.cos(511 * inv)
    assert torch.allclose(cos[511, : d // 2].double(), expected, atol=1e-4)


class Created(TorchDispatchMode):
    """The shapes and dtypes of every tensor an operation returns."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.made += [(tuple(t.shape), t.dtype) for t in torch.utils._pytree.tree_leaves(out) if torch.is_tensor(t)]
        return out


def test_rotary_and_padded_masks_are_built_once_per_forward_in_the_compute_dtype():
    """A padded [B, S] batch under bf16 autocast: as many [B, 1, S, S] tensors are made at 2 layers
    as at 5 (the local mask is built once per forward and shared by the layers), and no fp32
    [B, heads, S, d] tensor appears (rotary runs in bf16, as the projections)."""
    B, S = 3, 12
    mask = (torch.arange(S)[None] < torch.tensor([12, 7, 2])[:, None]).long()
    squares = []
    for layers in (2, 5):
        torch.manual_seed(0)
        config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                             num_attention_heads=2, local_attention=4, global_attn_every_n_layers=2, pad_token_id=0)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), Created() as created:
            ModernBertMLM(config).eval()(torch.randint(5, 64, (B, S)), mask)
        squares.append(sum(1 for shape, _ in created.made if shape == (B, 1, S, S)))
        assert ((B, 2, S, 16), torch.float32) not in created.made
        assert ((B, 2, S, 16), torch.bfloat16) in created.made
    assert 0 < squares[0] == squares[1]


def test_decode_false_is_the_decoder_input():
    """decode=False: the head's output at the selection, which the decoder maps to the logits."""
    model = ModernBertMLM(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=2)).double().eval()
    ids = torch.randint(5, 64, (2, 9))
    sel = torch.rand(2, 9) < 0.5
    features = model(ids, logits_at=sel, decode=False)
    assert features.shape == (int(sel.sum()), 32)
    assert torch.equal(model.decoder(features), model(ids, logits_at=sel))
    assert torch.equal(model(ids, decode=False), model.head(model.hidden(ids)))


def test_config_transformers5_layout(tmp_path):
    """transformers 5.x writes rope_parameters + layer_types instead (what save_pretrained gives)."""
    hf = transformers.ModernBertConfig(**CONFIGS["modernbert"])
    hf.save_pretrained(tmp_path)
    c = ModelConfig.from_json(tmp_path / "config.json")
    assert c.global_rope_theta == 160000.0 and c.local_rope_theta == 10000.0
    assert c.layer_types == ["full_attention", "sliding_attention", "full_attention"]
    assert c.pad_token_id == 115
