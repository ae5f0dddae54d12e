"""minidiff.training.trainer and minidiff.training.state: the loop against hand-written references.

- one optimizer step with gradient accumulation equals a hand-written step (the global loss
  written as one scalar, torch.optim.AdamW), for both loss normalisations;
- the loss falls on a short run; checkpoints are complete, atomic and pruned;
- resuming in-process from a checkpoint gives bitwise the weights of an uninterrupted run;
- SFT batches: the prompt is never masked, the answer and its padding are, and "token"
  normalisation counts exactly the non-prompt positions;
- a non-finite step is skipped (the weights and lr schedule do not move) and counted; several
  in a row stop the run naming the steps and keep the last good checkpoint;
- the prefetcher hands out the source's batches at the source's positions (CPU; CUDA, where the
  copy runs on a side stream).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace

import data_oracle as oracle
import pytest
import torch
from helpers import MASK, TURKISH_TEXT, make_tokenizer_dir, tiny_model
from safetensors.torch import load_file

from minidiff import diffusion
from minidiff.data.batches import Batches, collate_cpt, collate_sft
from minidiff.data.tokenizer import load_tokenizer, tokenize_documents
from minidiff.errors import UserError
from minidiff.plumbing.device import Prefetcher
from minidiff.training import resume as resume_policy
from minidiff.training import state as train_state
from minidiff.training import trainer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(make_tokenizer_dir(tmp_path_factory.mktemp("tok")))


def cpt_examples(tok, max_len=48):
    ids = tokenize_documents(TURKISH_TEXT, tok)
    return oracle.cpt_examples(ids, max_len, "drop", eos_id=tok.eos_id, bos_id=tok.bos_id)


def cpt_batches(tok, batch_size=4, seed=0, examples=None):
    examples = examples if examples is not None else cpt_examples(tok)
    return Batches(examples, batch_size, seed=seed, collate=lambda b: collate_cpt(b, tok.pad_id))


def config(**kw):
    base = dict(lr=3e-3, max_steps=4, batch_size=4, grad_accum=1, clip=0.0, log_every=1, progress=False, seed=0)
    base.update(kw)
    return trainer.TrainConfig(**base)


def model_for(tok, seed=0):
    return tiny_model(seed, vocab_size=tok.vocab_size)


@pytest.mark.parametrize("loss_norm", ["token", "sequence"])
def test_one_accumulated_step_equals_hand_written_step(tok, tmp_path, loss_norm):
    # adam_eps=1, lr=1: the first AdamW step is g / (|g| + 1), smooth in g, so weights compare gradients
    cfg = config(max_steps=1, grad_accum=2, batch_size=3, loss_norm=loss_norm, weight_decay=0.0, adam_eps=1.0, lr=1.0)
    # float64 on both sides: the comparison holds on any CPU (fp32 used ~20% of the tolerance here)
    model = model_for(tok).double()
    reference = model_for(tok).double()
    batches = cpt_batches(tok, batch_size=3)
    ref_batches = cpt_batches(tok, batch_size=3)
    micro = [next(ref_batches), next(ref_batches)]

    loss_fn = trainer.nelbo_objective(MASK, loss_norm=loss_norm)
    trainer.train(model, batches, None, loss_fn, cfg, tmp_path / "run")

    # reference: the global loss as ONE scalar over both micro-batches, then torch's AdamW
    reference.train()
    numerator, denominator = 0.0, 0.0
    for m, batch in enumerate(micro):
        gen = torch.Generator().manual_seed(trainer.derived_seed(cfg.seed, 0, m))
        torch.manual_seed(trainer.derived_seed(cfg.seed, 0, m))
        loss, _ = diffusion.nelbo_loss(reference, batch["input_ids"], MASK, maskable=batch["maskable"],
                                       attention_mask=batch["attention_mask"], normalize=loss_norm, generator=gen)
        count = batch["maskable"].sum() if loss_norm == "token" else batch["input_ids"].shape[0]
        numerator = numerator + loss * count
        denominator = denominator + count
    (numerator / denominator).backward()
    opt = torch.optim.AdamW([p for p in reference.parameters()], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            eps=cfg.adam_eps, weight_decay=0.0)
    opt.step()
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), name  # updates are 1e-2..1
    assert not torch.equal(model.state_dict()['head.dense.weight'], model_for(tok).double().state_dict()['head.dense.weight'])


def test_loss_falls_and_run_layout(tok, tmp_path):
    examples = cpt_examples(tok)
    cfg = config(max_steps=40, lr=5e-3, log_every=5, save_every=10, keep_last=2, eval_every=20)
    out = tmp_path / "run"
    model = model_for(tok)
    result = trainer.train(model, cpt_batches(tok, examples=examples), [collate_cpt(examples[:8], tok.pad_id)],
                           trainer.nelbo_objective(MASK), cfg, out, tokenizer=tok)
    first, last = result.eval_losses[0][1], result.eval_losses[-1][1]
    assert result.eval_losses[0][0] == 0 and result.eval_losses[-1][0] == 40
    assert last < 0.75 * first, (first, last)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 20, 40]
    # keep_last=2 of the checkpoints at 10, 20, 30 and the final step 40
    assert [s for s, _ in train_state.list_checkpoints(out / "checkpoints")] == [30, 40]
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["lr"] == cfg.lr and run["versions"]["torch"] == torch.__version__
    # the export: transformers layout, loadable, equal to the trained weights
    from minidiff import load_model

    loaded = load_model(out)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name].cpu()), name
    assert load_tokenizer(out).vocab_size == tok.vocab_size


def test_resume_from_checkpoint_is_bitwise_exact(tok, tmp_path):
    from minidiff import lora

    def lora_model():
        m = model_for(tok, seed=1)
        return lora.apply_lora(m, r=4, alpha=8, dropout=0.1)  # dropout: global RNG must be restored too

    cfg = config(max_steps=6, save_every=2, keep_last=5, grad_accum=2, batch_size=3, loss_norm="token",
                 stratified_t=True, clip=1.0, warmup=2, eval_every=3)
    evals = [collate_cpt(cpt_examples(tok)[:4], tok.pad_id)]
    full = lora_model()
    trainer.train(full, cpt_batches(tok, 3), evals, trainer.nelbo_objective(MASK, loss_norm="token", stratified=True),
                  cfg, tmp_path / "a", lora=True)

    # a run that dies after its step-4 checkpoint (its loss raises at step 5) ...
    calls = {"n": 0}
    base_loss = trainer.nelbo_objective(MASK, loss_norm="token", stratified=True)

    def dying_loss(model, batch, generator):
        if model.training:
            calls["n"] += 1
            if calls["n"] > 4 * cfg.grad_accum:
                raise RuntimeError("killed")
        return base_loss(model, batch, generator)

    with pytest.raises(RuntimeError, match="killed"):
        trainer.train(lora_model(), cpt_batches(tok, 3), evals, dying_loss, cfg, tmp_path / "b", lora=True)
    assert [s for s, _ in train_state.list_checkpoints(tmp_path / "b" / "checkpoints")] == [2, 4]
    assert not (tmp_path / "b" / "model.safetensors").exists()
    torch.manual_seed(12345)  # a different global RNG state: the resumed run must not depend on it
    resumed = lora_model()
    from dataclasses import replace

    trainer.train(resumed, cpt_batches(tok, 3), evals, base_loss, replace(cfg, resume=True), tmp_path / "b", lora=True)
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ad_a = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    ad_b = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(ad_a[k], ad_b[k]) for k in ad_a)
    # metrics of the resumed run: each step logged once
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_checkpoint_contents_and_rng_roundtrip(tok, tmp_path):
    cfg = config(max_steps=3, save_every=2)
    trainer.train(model_for(tok), cpt_batches(tok), None, trainer.nelbo_objective(MASK), cfg, tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "step-000002"
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["checkpoint.json", "optimizer.pt", "rng-rank-0.pt", "state.json", "trainable.safetensors"]
    # checkpoint.json: every other file's size and BLAKE2b, recomputed here with hashlib
    import hashlib

    listed = json.loads((ckpt / "checkpoint.json").read_text())["files"]
    assert sorted(listed) == names[1:]
    for name, entry in listed.items():
        content = (ckpt / name).read_bytes()
        assert entry == {"bytes": len(content), "blake2b": hashlib.blake2b(content, digest_size=20).hexdigest()}
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 2 and state["data"]["step_in_epoch"] == 2
    opt = torch.load(ckpt / "optimizer.pt", weights_only=True)  # plain tensors and containers only
    assert opt["scheduler"]["last_epoch"] == 2
    # python / numpy / torch random states survive the round trip
    import random

    import numpy as np

    gen = torch.Generator().manual_seed(7)
    saved = train_state.rng_state(gen)
    expected = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=gen).item())
    train_state.set_rng_state(saved, gen)
    again = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=gen).item())
    assert expected == again


def test_sft_batch_masks_answer_and_padding_only(tok):
    rows = [
        {"messages": [{"role": "user", "content": "Türkiye'nin başkenti neresidir?"},
                      {"role": "assistant", "content": "Ankara."}]},
        {"messages": [{"role": "system", "content": "Kısa cevap ver."},
                      {"role": "user", "content": "İstanbul hangi boğazın iki yakasındadır?"},
                      {"role": "assistant", "content": "İstanbul Boğazı, Avrupa ile Asya arasında."}]},
    ]
    examples, _ = oracle.build_sft_examples(rows, "messages", tok, 128)
    batch = collate_sft(examples, tok.pad_id, tok.eos_id)
    # hand-made expectation: prompt length from the template text itself
    prompts = ["[Question]\nTürkiye'nin başkenti neresidir?\n[/Question]\n\n[Answer]\n",
               "[SYS]\nKısa cevap ver.\n[/SYS]\n\n[Question]\nİstanbul hangi boğazın iki yakasındadır?\n[/Question]\n\n[Answer]\n"]
    prompt_lens = [len(tok.encode(p, add_special_tokens=False)) for p in prompts]
    S = batch["input_ids"].shape[1]
    expected_maskable = torch.tensor([[i >= n for i in range(S)] for n in prompt_lens])

    seen = []

    class Spy(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids, attention_mask=None, logits_at=None):
            seen.append((ids.clone(), attention_mask))
            return self.inner(ids, attention_mask, logits_at=logits_at)

    spy = Spy(model_for(tok))
    loss_fn = trainer.nelbo_objective(tok.mask_id, loss_norm="token")
    gen = torch.Generator().manual_seed(0)
    ever_masked = torch.zeros_like(expected_maskable)
    for _ in range(60):
        loss, weight = loss_fn(spy, batch, gen)
        ever_masked |= seen[-1][0] == tok.mask_id
        assert seen[-1][1] is None  # SFT: no attention mask
    assert not (ever_masked & ~expected_maskable).any(), "a prompt position was masked"
    assert torch.equal(ever_masked, expected_maskable), "some answer/padding position was never masked"
    assert weight.item() == int(expected_maskable.sum())
    pad_positions = batch["input_ids"] == tok.pad_id
    assert pad_positions[0].any() and (ever_masked & pad_positions).any()  # the padding is trained


def nan_from(step_range, base=None):
    """A loss that is nan at the optimizer steps in `step_range` (1-based, grad_accum 1)."""
    base = base or trainer.nelbo_objective(MASK)
    calls = {"n": 0}

    def loss_fn(model, batch, generator):
        loss, weight = base(model, batch, generator)
        if model.training:
            calls["n"] += 1
            if calls["n"] in step_range:
                loss = loss * float("nan")
        return loss, weight

    return loss_fn


def test_a_non_finite_step_is_skipped_and_counted(tok, tmp_path):
    cfg = config(max_steps=6, save_every=1, keep_last=10, log_every=3)
    trainer.train(model_for(tok), cpt_batches(tok), None, nan_from({5}), cfg, tmp_path / "run")
    root = tmp_path / "run" / "checkpoints"
    four, five = (load_file(str(root / f"step-00000{s}" / "trainable.safetensors")) for s in (4, 5))
    assert all(torch.equal(four[k], five[k]) for k in four)  # step 5 changed nothing
    assert not all(torch.equal(four[k], load_file(str(root / "step-000006" / "trainable.safetensors"))[k]) for k in four)
    opt4, opt5 = (torch.load(root / f"step-00000{s}" / "optimizer.pt", weights_only=True) for s in (4, 5))
    assert opt4["scheduler"]["last_epoch"] == opt5["scheduler"]["last_epoch"] == 4  # the lr schedule did not move
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped_steps"]) for r in rows if "loss" in r] == [(3, 0), (6, 1)]
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)


def test_non_finite_steps_in_a_row_stop_the_run(tok, tmp_path):
    cfg = config(max_steps=12, save_every=2, log_every=3, max_skipped_steps=3)
    with pytest.raises(UserError, match="non-finite .* from 5 to 7"):
        trainer.train(model_for(tok), cpt_batches(tok), None, nan_from(range(5, 100)), cfg, tmp_path / "run")
    kept = [s for s, _ in train_state.list_checkpoints(tmp_path / "run" / "checkpoints")]
    assert kept == [4, 6]  # step 6's weights are step 4's: the skipped steps changed nothing
    for step in kept:
        ckpt = load_file(str(tmp_path / "run" / "checkpoints" / f"step-00000{step}" / "trainable.safetensors"))
        assert all(torch.isfinite(t).all() for t in ckpt.values())
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_output_dir_rules(tok, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UserError, match="no complete checkpoint"):
        resume_policy.check_out_dir(out, resume=True)
    (out / "checkpoints" / ".tmp-step-000002").mkdir(parents=True)  # an interrupted write is not a checkpoint
    with pytest.raises(UserError, match="no complete checkpoint"):
        resume_policy.check_out_dir(out, resume=True)
    trainer.train(model_for(tok), cpt_batches(tok), None, trainer.nelbo_objective(MASK),
                  config(max_steps=2, save_every=1, keep_last=1), out)
    with pytest.raises(UserError, match="finished model"):
        resume_policy.check_out_dir(out, resume=False)
    (out / "model.safetensors").unlink()
    with pytest.raises(UserError, match="unfinished run"):
        resume_policy.check_out_dir(out, resume=False)
    assert resume_policy.check_out_dir(out, resume=True).name == "step-000002"  # the final step's


@dataclass
class ConfigWithNewFields(trainer.TrainConfig):
    """A config as a script grows it: fields that no list in the trainer names."""

    new_setting: int = 0  # no metadata: --resume requires the checkpoint's value
    new_path: str = field(default="a", metadata=resume_policy.MAY_DIFFER)
    new_data_rule: int = field(default=0, metadata=resume_policy.DATA)


def test_resume_rule_of_a_new_field_is_read_from_its_metadata(tok, tmp_path):
    out = tmp_path / "run"
    first = ConfigWithNewFields(lr=3e-3, max_steps=2, batch_size=4, clip=0.0, log_every=1, progress=False,
                                save_every=1)
    trainer.train(model_for(tok), cpt_batches(tok), None, trainer.nelbo_objective(MASK), first, out)
    (out / "model.safetensors").unlink()  # as if the run had died after its last checkpoint

    def resume(**changes):
        trainer.train(model_for(tok), cpt_batches(tok), None, trainer.nelbo_objective(MASK),
                      replace(first, resume=True, **changes), out)

    with pytest.raises(UserError, match="--new-setting is 1 but the checkpoint"):
        resume(new_setting=1)
    with pytest.raises(UserError, match="--new-data-rule is 1 but the checkpoint"):
        resume(new_data_rule=1)
    with pytest.raises(UserError, match="--new-setting is 1 but the checkpoint"):
        resume(new_setting=1, new_data_rule=1, allow_data_change=True)
    assert not (out / "model.safetensors").exists()
    resume(new_path="b", new_data_rule=1, allow_data_change=True)
    assert (out / "model.safetensors").exists()


def test_a_cpt_batch_without_padding_reaches_attention_unmasked(tok, monkeypatch):
    """Packed CPT rows have no padding: the global layers' SDPA gets attn_mask=None (the fused
    kernels), the local layers only their window band; a padded batch still masks its padding."""
    import torch.nn.functional as F

    from minidiff import model as model_module
    from minidiff.data.batches import collate_cpt

    seen, attend = [], F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append(attn_mask)
        return attend(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", spy)
    model = model_for(tok)
    is_global = [layer.is_global for layer in model.model.layers]
    loss_fn = trainer.nelbo_objective(MASK)
    loss_fn(model, collate_cpt([[7] * 40, [8] * 40], tok.pad_id), torch.Generator().manual_seed(0))
    assert [m is None for m, g in zip(seen, is_global) if g] == [True] * sum(is_global)
    band = [m for m, g in zip(seen, is_global) if not g]
    assert all(m is not None and m.all(-1).sum() == 0 for m in band)  # a window, not all keys
    seen.clear()
    loss_fn(model, collate_cpt([[7] * 40, [8] * 30], tok.pad_id), torch.Generator().manual_seed(0))
    assert all(m is not None for m in seen)


class NumberedBatches:
    """An endless batch source with a position, as batches.Batches: batch i is drawn from seed i."""

    def __init__(self, numel: int):
        self.numel, self.position = numel, 0

    def state_dict(self) -> dict:
        return {"position": self.position}

    def __next__(self) -> dict:
        x = torch.randn(self.numel, generator=torch.Generator().manual_seed(self.position))
        self.position += 1
        return {"x": x, "ids": torch.arange(8) + self.position, "epoch": 0}


NEEDS_CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)])
def test_prefetched_batches_equal_the_unprefetched_ones(device):
    """Each batch is the source's, on the device, and used at once on the compute stream (on CUDA
    the copy runs on a side stream: without the wait, the product below could read a partial copy);
    state_dict() is the position before the batch handed out next."""
    plain, prefetched = NumberedBatches(1 << 22), Prefetcher(NumberedBatches(1 << 22), torch.device(device))
    for _ in range(4):
        position = plain.state_dict()
        expected = next(plain)
        assert prefetched.state_dict() == position
        batch = next(prefetched)
        doubled = batch["x"] * 2  # queued on the compute stream right after the hand-over
        assert batch["x"].device.type == device and batch["epoch"] == 0
        assert torch.equal(doubled.cpu(), expected["x"] * 2) and torch.equal(batch["ids"].cpu(), expected["ids"])

