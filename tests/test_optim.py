"""minidiff.optim against torch.optim.AdamW, torch.nn.utils.clip_grad_norm_ and hand-computed values."""
import copy
import io
import math

import pytest
import torch
from torch import nn

from minidiff.errors import UserError
from minidiff.optim import AdamW, WarmupCosine, clip_grad_norm, param_groups, warmup_cosine

PEAK, MIN, WARMUP, TOTAL = 3e-3, 3e-4, 20, 200


class Small(nn.Module):
    """Embedding + linears (with biases) + LayerNorm: parameters with and without decay."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc1 = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 20)

    def forward(self, ids):
        return self.fc2(self.norm(torch.tanh(self.fc1(self.emb(ids)))))


def batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, 20, (4, 6), generator=g)
    return ids, torch.roll(ids, 1, dims=1)


def loss_of(model, step):
    ids, target = batch(step)
    return nn.functional.cross_entropy(model(ids).flatten(0, 1), target.flatten())


def train(model, optimizer, steps, start=0, set_lr=True):
    for step in range(start, start + steps):
        if set_lr:
            for group in optimizer.param_groups:
                group["lr"] = warmup_cosine(step, warmup=WARMUP, total=TOTAL, peak_lr=PEAK, min_lr=MIN)
        optimizer.zero_grad()
        loss_of(model, step).backward()
        optimizer.step()


def test_param_groups_exempt_norms_biases_embeddings():
    model = Small()
    model.fc1.weight.requires_grad_(False)  # frozen parameters are left out
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model.fc2.weight)}
    expected = [model.emb.weight, model.fc1.bias, model.norm.weight, model.norm.bias, model.fc2.bias]
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in expected}


def test_param_groups_count_tied_weight_once():
    from helpers import tiny_model

    model = tiny_model(0)
    groups = param_groups(model, 0.01)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len({id(p) for p in model.parameters()})
    no_decay = {id(p) for p in groups[1]["params"]}
    assert id(model.model.embeddings.tok_embeddings.weight) in no_decay  # = decoder.weight (tied)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_matches_torch_for_200_steps(weight_decay):
    torch.manual_seed(0)
    ours_model = Small()
    ref_model = copy.deepcopy(ours_model)
    ours = AdamW(param_groups(ours_model, weight_decay), lr=PEAK, betas=(0.9, 0.95), eps=1e-8)
    ref = torch.optim.AdamW(param_groups(ref_model, weight_decay), lr=PEAK, betas=(0.9, 0.95), eps=1e-8,
                            foreach=False)  # the per-tensor loop: a differently written reference
    start = [p.detach().clone() for p in ours_model.parameters()]
    train(ours_model, ours, 200)
    train(ref_model, ref, 200)
    for (name, p), q, p0 in zip(ours_model.named_parameters(), ref_model.parameters(), start):
        assert (p - p0).abs().max() > 1e-3, name  # every parameter really moved
        rel = ((p - q).norm() / q.norm()).item()
        assert rel <= 1e-6, (name, rel)
    for p in ours_model.parameters():
        st = ours.state[p]
        assert st["step"] == 200 and st["exp_avg"].dtype == torch.float32


def test_adamw_update_by_hand_one_parameter():
    # two steps with a constant gradient g = 1 on p = 2, lr 0.1, wd 0.5, betas (0.9, 0.99), eps 0
    p = nn.Parameter(torch.tensor([2.0], dtype=torch.float64))
    opt = AdamW([p], lr=0.1, betas=(0.9, 0.99), eps=0.0, weight_decay=0.5)
    for _ in range(2):
        p.grad = torch.ones_like(p)
        opt.step()
    # step 1: p = 2 * 0.95 = 1.9, m = 0.1, v = 0.01, mhat = 1, vhat = 1: p = 1.9 - 0.1 = 1.8
    # step 2: p = 1.8 * 0.95 = 1.71, m = 0.19, v = 0.0199, mhat = 1, vhat = 1: p = 1.61
    assert abs(p.item() - 1.61) < 1e-12


def test_bf16_parameters_keep_fp32_state_and_master():
    torch.manual_seed(0)
    p32 = nn.Parameter(torch.randn(64, 32))
    p16 = nn.Parameter(p32.detach().to(torch.bfloat16))
    master_start = p16.detach().float().clone()
    ref = torch.optim.AdamW([nn.Parameter(master_start.clone())], lr=1e-4, weight_decay=0.01)
    ours = AdamW([p16], lr=1e-4, weight_decay=0.01)
    for step in range(100):
        # a gradient of constant sign: each step moves p by about lr = 1e-4 the same way
        g = 1.0 + 0.1 * torch.randn(64, 32, generator=torch.Generator().manual_seed(step))
        p16.grad = g.to(torch.bfloat16)
        ref.param_groups[0]["params"][0].grad = g.to(torch.bfloat16).float()
        ours.step()
        ref.step()
    state = ours.state[p16]
    assert {state[k].dtype for k in ("exp_avg", "exp_avg_sq", "master")} == {torch.float32}
    assert p16.dtype == torch.bfloat16
    # the fp32 master follows torch's fp32 AdamW on the same (bf16-rounded) gradients
    torch.testing.assert_close(state["master"], ref.param_groups[0]["params"][0].detach(), atol=1e-6, rtol=1e-6)
    # the parameter is the master rounded to bf16
    assert torch.equal(p16.detach(), state["master"].to(torch.bfloat16))
    # an update of 1e-4 is below half a bf16 ulp for |p| > 0.05: applied to a bf16 tensor it is lost
    start16 = master_start.to(torch.bfloat16)
    lost = (start16 - 1e-4) == start16
    assert lost.float().mean() > 0.8
    # through the master copy those parameters still moved, by about 100 * 1e-4
    moved = (p16.detach().float() - master_start).abs()
    assert (moved[lost] > 0).float().mean() > 0.8


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    model = Small()
    model.fc2.to(torch.bfloat16)  # a low-precision parameter too: its fp32 state must survive load
    opt = AdamW(param_groups(model, 0.1), lr=PEAK)
    sched = WarmupCosine(opt, warmup=WARMUP, total=TOTAL, min_lr=MIN)

    def run(m, o, s, steps, start):
        for step in range(start, start + steps):
            o.zero_grad()
            ids, target = batch(step)
            out = m.fc2(m.norm(torch.tanh(m.fc1(m.emb(ids)))).to(torch.bfloat16)).float()
            nn.functional.cross_entropy(out.flatten(0, 1), target.flatten()).backward()
            o.step()
            s.step()

    run(model, opt, sched, 10, 0)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buffer)
    resumed_model = Small()
    resumed_model.fc2.to(torch.bfloat16)
    resumed_opt = AdamW(param_groups(resumed_model, 0.1), lr=PEAK)
    resumed_sched = WarmupCosine(resumed_opt, warmup=WARMUP, total=TOTAL, min_lr=MIN)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    resumed_sched.load_state_dict(saved["sched"])
    assert resumed_opt.state[resumed_model.fc2.weight]["exp_avg"].dtype == torch.float32
    run(model, opt, sched, 15, 10)
    run(resumed_model, resumed_opt, resumed_sched, 15, 10)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
    assert resumed_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_torch_load_state_dict_would_have_cast_state():
    # why AdamW overrides load_state_dict: torch's default casts state to the parameter dtype
    p = nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    opt = AdamW([p])
    p.grad = torch.ones_like(p)
    opt.step()
    fresh = AdamW([p])
    torch.optim.Optimizer.load_state_dict(fresh, opt.state_dict())
    assert fresh.state[p]["exp_avg"].dtype == torch.bfloat16
    fresh.load_state_dict(opt.state_dict())
    assert fresh.state[p]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("max_norm", [0.05, 1e3])
def test_clip_grad_norm_matches_torch(max_norm):
    torch.manual_seed(0)
    model = Small()
    ref = copy.deepcopy(model)
    for m in (model, ref):
        loss_of(m, 0).backward()
        m.emb.weight.grad = None  # a parameter without gradient is skipped
    ours_total = clip_grad_norm(model.parameters(), max_norm)
    ref_total = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
    torch.testing.assert_close(ours_total, ref_total, atol=0, rtol=1e-6)
    for p, q in zip(model.parameters(), ref.parameters()):
        if q.grad is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, q.grad, atol=0, rtol=1e-6)
    clipped_norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()
                                                       if p.grad is not None]))
    assert clipped_norm <= max_norm * (1 + 1e-5) or max_norm > ref_total


def test_clip_grad_norm_bf16_and_hand_value():
    a = torch.zeros(2, requires_grad=True)
    b = torch.zeros(1, dtype=torch.bfloat16, requires_grad=True)
    a.grad = torch.tensor([3.0, 0.0])
    b.grad = torch.tensor([4.0], dtype=torch.bfloat16)
    total = clip_grad_norm([a, b], 1.0)
    assert abs(total.item() - 5.0) < 1e-6  # sqrt(9 + 16)
    assert abs(a.grad[0].item() - 0.6) < 1e-5 and abs(b.grad[0].item() - 0.8) < 4e-3


def test_warmup_cosine_closed_form():
    kw = dict(warmup=10, total=110, peak_lr=1e-3, min_lr=1e-4)
    assert warmup_cosine(0, **kw) == 0.0
    assert abs(warmup_cosine(5, **kw) - 5e-4) < 1e-15  # halfway through warmup
    assert abs(warmup_cosine(10, **kw) - 1e-3) < 1e-15  # warmup end: peak
    # a quarter into the decay: 1e-4 + 9e-4 * (1 + cos(pi/4)) / 2 = 1e-4 + 9e-4 * 0.853553390593
    assert abs(warmup_cosine(35, **kw) - 8.681980515339e-4) < 1e-15
    assert abs(warmup_cosine(60, **kw) - 5.5e-4) < 1e-15  # middle: (peak + min) / 2
    assert abs(warmup_cosine(110, **kw) - 1e-4) < 1e-15  # end: min
    assert abs(warmup_cosine(500, **kw) - 1e-4) < 1e-15  # after the end: stays at min
    assert warmup_cosine(0, warmup=0, total=10, peak_lr=2.0) == 2.0  # no warmup: start at peak


def test_scheduler_follows_the_formula_and_matches_lambdalr():
    p = nn.Parameter(torch.zeros(1))
    opt = AdamW([p], lr=PEAK)
    sched = WarmupCosine(opt, warmup=WARMUP, total=TOTAL, min_lr=MIN)
    ref_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=PEAK)
    # LambdaLR with HF's cosine-with-warmup factor, written independently
    def factor(step):
        if step < WARMUP:
            return step / WARMUP
        progress = min(1.0, (step - WARMUP) / (TOTAL - WARMUP))
        return MIN / PEAK + (1 - MIN / PEAK) * 0.5 * (1 + math.cos(math.pi * progress))
    ref = torch.optim.lr_scheduler.LambdaLR(ref_opt, factor)
    for step in range(TOTAL + 5):
        assert abs(opt.param_groups[0]["lr"] - ref_opt.param_groups[0]["lr"]) < 1e-12, step
        p.grad = torch.ones_like(p)
        opt.step()
        ref_opt.step()
        sched.step()
        ref.step()


@pytest.mark.parametrize("call, words", [
    (lambda: warmup_cosine(0, warmup=10, total=10, peak_lr=1e-3), "total steps"),
    (lambda: warmup_cosine(0, warmup=-1, total=10, peak_lr=1e-3), "warmup"),
    (lambda: warmup_cosine(0, warmup=1, total=10, peak_lr=1e-3, min_lr=1e-2), "minimum learning rate"),
    (lambda: AdamW([nn.Parameter(torch.zeros(1))], lr=-1.0), "learning rate"),
    (lambda: AdamW([nn.Parameter(torch.zeros(1))], betas=(0.9, 1.0)), "betas"),
    (lambda: AdamW([nn.Parameter(torch.zeros(1))], weight_decay=-0.1), "weight decay"),
])
def test_bad_inputs(call, words):
    with pytest.raises(UserError, match=words):
        call()


def test_loading_state_for_another_model_is_refused():
    opt = AdamW(param_groups(Small(), 0.1))
    other = nn.Linear(3, 3)
    with pytest.raises(UserError, match="parameter groups"):
        AdamW(param_groups(other, 0.1)).load_state_dict(opt.state_dict())
