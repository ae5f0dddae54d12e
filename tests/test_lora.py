"""minidiff.lora and minidiff.plumbing.peft_io against peft's LoRA on transformers' ModernBertForMaskedLM.

Outputs and gradients are compared in float64 (transformers still computes its rotary angles
and rotated q, k in float32, which bounds the agreement near 1e-7 relative); adapters written
to files stay float32. Tolerances are relative to the largest magnitude compared.
"""
import json
import math

import pytest
import torch
from helpers import assert_close_rel, hf_twin, tiny_model
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict

from minidiff.errors import UserError
from minidiff.lora import (
    LoRALinear,
    adapter_state_dict,
    apply_lora,
    base_state_dict,
    lora_report,
    merge_lora,
    unmerge_lora,
)
from minidiff.model import ModelConfig, ModernBertMLM
from minidiff.plumbing.peft_io import load_adapter, save_adapter

TARGETS = ["Wqkv", "Wo", "Wi"]
R, ALPHA = 4, 8  # scaling 2, so a wrong scaling shows


def inputs(seed=0, vocab=64):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return ids, mask


def peft_model_with_random_b(seed=0, r=R, alpha=ALPHA, dtype=torch.float32):
    """peft LoRA on the transformers twin of tiny_model(seed); B randomised (peft starts it at 0)."""
    hf = hf_twin(tiny_model(seed)).to(dtype)
    peft = get_peft_model(hf, LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0))
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return peft.to(dtype).eval()


def peft_logits(peft, ids, mask):
    with torch.no_grad():
        return peft(input_ids=ids, attention_mask=mask).logits


def copy_peft_adapter_into(model, peft):
    """Test-side mapping: peft's saved key 'base_model.model.X.lora_A.weight' is minidiff's 'X.lora_A.weight'."""
    state = get_peft_model_state_dict(peft)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in state.items():
            params[key.removeprefix("base_model.model.")].copy_(value)
    return len(state)


def test_outputs_equal_peft_with_same_a_and_b():
    peft = peft_model_with_random_b(dtype=torch.float64)
    model = apply_lora(tiny_model(0).double(), R, ALPHA)
    copied = copy_peft_adapter_into(model, peft)
    assert copied == 2 * 4 * model.config.num_hidden_layers
    ids, mask = inputs()
    expected = peft_logits(peft, ids, mask)
    got = model(ids, mask)
    assert_close_rel(got, expected, 1e-6, "logits")
    # and the adapter really changes the output (B != 0), so the comparison is not trivial
    assert (got - tiny_model(0).double()(ids, mask)).abs().max() > 1e-2


def test_gradients_equal_peft():
    peft = peft_model_with_random_b(dtype=torch.float64)
    model = apply_lora(tiny_model(0).double(), R, ALPHA)
    copy_peft_adapter_into(model, peft)
    ids, mask = inputs(1)
    weights = torch.randn(64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (peft(input_ids=ids, attention_mask=mask).logits * weights).sum().backward()
    (model(ids, mask) * weights).sum().backward()
    peft_grads = {n.replace("base_model.model.", "").replace(".default", ""): p.grad
                  for n, p in peft.named_parameters() if p.requires_grad}
    ours = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert set(ours) == set(peft_grads)
    for name in ours:
        # gradients reach ~100: a bound relative to each tensor's largest entry
        assert_close_rel(ours[name], peft_grads[name], 1e-6, name)


def test_init_is_identity_and_a_is_kaiming_uniform():
    base = tiny_model(0)
    model = apply_lora(tiny_model(0), 8, 16)
    ids, mask = inputs()
    torch.testing.assert_close(model(ids, mask), base(ids, mask), atol=0, rtol=0)
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            assert torch.count_nonzero(m.lora_B.weight) == 0
            bound = 1.0 / math.sqrt(m.in_features)  # kaiming_uniform(a=sqrt 5): U(-1/sqrt(in), 1/sqrt(in))
            assert m.lora_A.weight.abs().max() <= bound
            assert m.lora_A.weight.abs().max() > 0.8 * bound


def test_trainable_parameters_are_exactly_the_lora_ones_and_match_peft():
    model = apply_lora(tiny_model(0), R, ALPHA)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    layers = model.config.num_hidden_layers
    expected = {f"model.layers.{i}.{mod}.lora_{ab}.weight" for i in range(layers)
                for mod in ("attn.Wqkv", "attn.Wo", "mlp.Wi", "mlp.Wo") for ab in "AB"}
    assert trainable == expected
    # base weights keep their plain keys
    assert "model.layers.0.attn.Wqkv.weight" in dict(model.named_parameters())
    peft = peft_model_with_random_b()
    peft_trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    peft_total = sum(p.numel() for p in peft.parameters())
    assert lora_report(model) == f"trainable {peft_trainable:,} of {peft_total:,} ({100 * peft_trainable / peft_total:.2f}%)"


def test_report_on_full_mmbert_base_config_matches_paper():
    # mmBERT-base (2509.06888) on the meta device: no memory, no weights
    config = ModelConfig(vocab_size=256000, hidden_size=768, intermediate_size=1152, num_hidden_layers=22,
                         num_attention_heads=12, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                         cls_token_id=1, sep_token_id=1)
    with torch.device("meta"):
        model = ModernBertMLM(config)
    assert model.num_parameters() == 307_786_240
    apply_lora(model, 256, 256)
    # independent count: r * (in + out) for Wqkv 768->2304, Wo 768->768, Wi 768->2304, Wo 1152->768
    per_layer = 256 * ((768 + 2304) + (768 + 768) + (768 + 2304) + (1152 + 768))
    assert per_layer * 22 == 54_067_200
    assert lora_report(model) == "trainable 54,067,200 of 361,853,440 (14.94%)"


def test_adapter_saved_by_peft_loads_into_minidiff(tmp_path):
    peft = peft_model_with_random_b(r=R, alpha=ALPHA)
    peft.save_pretrained(tmp_path)
    model = load_adapter(tiny_model(0), tmp_path)
    assert {m.r for _, m in model.named_modules() if isinstance(m, LoRALinear)} == {R}
    ids, mask = inputs(2)
    assert_close_rel(model(ids, mask), peft_logits(peft, ids, mask), 1e-5, "logits")


def test_adapter_saved_by_minidiff_loads_into_peft(tmp_path):
    model = apply_lora(tiny_model(0), R, ALPHA, dropout=0.05)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    model.eval()
    save_adapter(model, tmp_path / "named", base_model="jhu-clsp/mmBERT-base")
    config = json.loads((tmp_path / "named" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (R, ALPHA, 0.05)
    assert config["base_model_name_or_path"] == "jhu-clsp/mmBERT-base"
    assert sorted(p.name for p in (tmp_path / "named").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]  # no temporaries left
    save_adapter(model, tmp_path)  # no base name: peft would try the hub to look it up
    LoraConfig.from_pretrained(tmp_path)  # peft accepts every field
    peft = PeftModel.from_pretrained(hf_twin(tiny_model(0)), tmp_path).eval()
    assert peft.peft_config["default"].r == R
    ids, mask = inputs(3)
    assert_close_rel(model(ids, mask), peft_logits(peft, ids, mask), 1e-5, "logits")
    # and the file keys are exactly the ones peft itself writes
    from safetensors import safe_open
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(get_peft_model_state_dict(peft))


def test_merge_unmerge_and_base_state_dict():
    peft = peft_model_with_random_b()
    model = apply_lora(tiny_model(0), R, ALPHA)
    copy_peft_adapter_into(model, peft)
    ids, mask = inputs(4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged_logits = model(ids, mask)
    merged_state = base_state_dict(model)
    # base_state_dict does not touch the model
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # its weights equal peft's merge_and_unload, under plain transformers keys
    reference = peft.merge_and_unload().state_dict()
    assert set(merged_state) == set(reference)
    for k in reference:
        torch.testing.assert_close(merged_state[k], reference[k], atol=1e-6, rtol=0)
    merge_lora(model)
    assert_close_rel(model(ids, mask), unmerged_logits, 1e-5, "logits")
    for k in merged_state:
        torch.testing.assert_close(model.state_dict()[k], merged_state[k], atol=1e-6, rtol=0)
    unmerge_lora(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=1e-6, rtol=0)  # fp32 round trip W + D - D
    assert_close_rel(model(ids, mask), unmerged_logits, 1e-5, "logits")
    # a plain model loaded from base_state_dict gives the LoRA model's logits
    plain = tiny_model(7)
    plain.load_state_dict(merged_state)
    assert_close_rel(plain(ids, mask), unmerged_logits, 1e-5, "logits")


def test_adapter_state_dict_names():
    model = apply_lora(tiny_model(0), R, ALPHA, targets=("Wqkv",))
    assert sorted(adapter_state_dict(model)) == sorted(
        f"model.layers.{i}.attn.Wqkv.lora_{ab}.weight" for i in range(3) for ab in "AB")


def test_dropout_only_in_training_mode():
    model = apply_lora(tiny_model(0), R, ALPHA, dropout=0.5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    ids, mask = inputs()
    model.eval()
    torch.testing.assert_close(model(ids, mask), model(ids, mask), atol=0, rtol=0)
    model.train()
    torch.manual_seed(0)
    a = model(ids, mask)
    b = model(ids, mask)
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("kwargs, words", [
    (dict(r=0, alpha=8), "rank"),
    (dict(r=-2, alpha=8), "rank"),
    (dict(r=4, alpha=0), "alpha"),
    (dict(r=4, alpha=-1.0), "alpha"),
    (dict(r=4, alpha=8, targets=("Wqkv", "query")), "'query'"),
    (dict(r=4, alpha=8, targets=("dense",)), "'dense'"),  # the head is not adapted
])
def test_bad_apply_inputs(kwargs, words):
    with pytest.raises(UserError, match=words) as info:
        apply_lora(tiny_model(0), **kwargs)
    assert "\n" not in str(info.value)


def test_adapter_with_wrong_shapes_is_refused(tmp_path):
    apply_lora(other := tiny_model(0, hidden_size=16, num_attention_heads=2), R, ALPHA)
    save_adapter(other, tmp_path)
    model = tiny_model(0)
    with pytest.raises(UserError, match=r"lora_A\.weight has shape \[4, 16\].*needs \[4, 32\]"):
        load_adapter(model, tmp_path)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # nothing half-applied


def test_adapter_with_other_rank_into_applied_model_is_refused(tmp_path):
    save_adapter(apply_lora(tiny_model(0), 2, ALPHA), tmp_path)
    with pytest.raises(UserError, match=r"shape \[2, 32\].*needs \[4, 32\]"):
        load_adapter(apply_lora(tiny_model(0), 4, ALPHA), tmp_path)


def test_adapter_for_more_layers_is_refused(tmp_path):
    save_adapter(apply_lora(tiny_model(0, num_hidden_layers=4), R, ALPHA), tmp_path)
    with pytest.raises(UserError, match=r"model\.layers\.3\..*matches no LoRA layer"):
        load_adapter(tiny_model(0), tmp_path)


def test_adapter_for_another_base_model_is_refused(tmp_path):
    save_adapter(apply_lora(tiny_model(0), R, ALPHA), tmp_path, base_model="jhu-clsp/mmBERT-small")
    with pytest.raises(UserError, match="mmBERT-small.*mmBERT-base"):
        load_adapter(tiny_model(0), tmp_path, base_model="jhu-clsp/mmBERT-base")
    load_adapter(tiny_model(0), tmp_path, base_model="/models/mmBERT-small")  # a local copy is fine


def test_missing_or_unsupported_adapter_is_refused(tmp_path):
    with pytest.raises(UserError, match="adapter_config.json"):
        load_adapter(tiny_model(0), tmp_path)
    save_adapter(apply_lora(tiny_model(0), R, ALPHA), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(UserError, match="use_dora"):
        load_adapter(tiny_model(0), tmp_path)


def test_peft_adapter_with_regex_targets_loads(tmp_path):
    hf = hf_twin(tiny_model(0))
    config = LoraConfig(r=2, lora_alpha=3, target_modules=r".*\.(Wqkv|Wi)", lora_dropout=0.0)
    peft = get_peft_model(hf, config)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    peft.eval().save_pretrained(tmp_path)
    model = load_adapter(tiny_model(0), tmp_path)
    adapted = sorted({".".join(n.split(".")[3:5]) for n in adapter_state_dict(model)})
    assert adapted == ["attn.Wqkv", "mlp.Wi"]
    ids, mask = inputs(5)
    assert_close_rel(model(ids, mask), peft_logits(peft, ids, mask), 1e-5, "logits")
