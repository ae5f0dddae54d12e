"""minidiff.speed.packed: the oneDNN product equals F.linear computed in float64 (fp32 tolerances) for
every layout a model hands it, runs only where no gradient can flow, and PackedLinear is an nn.Linear;
packed weights give F.linear's results, are dropped when the weight changes and never reach
gradients, state dicts or copies."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import BOS, EOS, MASK, tiny_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from minidiff.speed.packed import PackedLinear, linear, pack_weights, packed_weights, unpack_weights
from minidiff.speed.sampling import FastConfig, generate


class OpNames(TorchDispatchMode):
    """Records the name of every aten/mkldnn op that runs."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def reference(x, weight, bias):
    return F.linear(x.double(), weight.double(), None if bias is None else bias.double()).float()


@pytest.mark.parametrize("rows", [1, 8, 32])
@pytest.mark.parametrize("with_bias", [False, True])
def test_small_row_products_match_float64(rows, with_bias):
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(2304, 768, generator=g) * 0.02  # a layer's Wqkv
    bias = torch.randn(2304, generator=g) if with_bias else None
    x = torch.randn(rows, 768, generator=g)
    with torch.no_grad(), OpNames() as ops:
        got = linear(x, weight, bias)
    assert ("mkldnn._linear_pointwise" in ops.names) == (rows > 1)  # one row: F.linear
    torch.testing.assert_close(got, reference(x, weight, bias))  # fp32 tolerances


def test_every_layout_matches_float64():
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(300, 40, generator=g), torch.randn(300, generator=g)
    inputs = {"vector": torch.randn(40, generator=g), "no rows": torch.randn(0, 40, generator=g),
              "transposed": torch.randn(40, 5, generator=g).t(), "batch": torch.randn(2, 3, 40, generator=g),
              "strided": torch.randn(2, 3, 80, generator=g)[..., ::2], "every other row": torch.randn(8, 40, generator=g)[::2]}
    weights = {"contiguous": weight, "transposed": weight.t().contiguous().t()}
    with torch.no_grad():
        for (x_name, x), (w_name, w) in [(a, b) for a in inputs.items() for b in weights.items()]:
            got = linear(x, w, bias)
            assert got.shape == (*x.shape[:-1], 300), (x_name, w_name)
            torch.testing.assert_close(got, reference(x, w, bias), msg=f"{x_name} x, {w_name} weight")


def test_gradients_use_f_linear_and_are_exact():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 16, generator=g, requires_grad=True)
    weight = torch.randn(24, 16, generator=g, requires_grad=True)
    bias = torch.randn(24, generator=g, requires_grad=True)
    with OpNames() as ops:
        out = linear(x, weight, bias)
    assert "mkldnn._linear_pointwise" not in ops.names
    (out ** 2).sum().backward()
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    (F.linear(x64, w64, b64) ** 2).sum().backward()
    for got, want in [(x.grad, x64.grad), (weight.grad, w64.grad), (bias.grad, b64.grad)]:
        torch.testing.assert_close(got, want.float())


def test_frozen_weight_with_grad_input_still_backpropagates():
    # a LoRA base layer: the weight is frozen, the input carries the gradient
    weight = torch.randn(8, 6)
    x = torch.randn(3, 6, requires_grad=True)
    linear(x, weight).sum().backward()
    torch.testing.assert_close(x.grad, weight.sum(0).expand(3, 6))


def test_autocast_and_other_dtypes_are_f_linears():
    weight, x = torch.randn(8, 6), torch.randn(3, 6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear(x, weight).dtype == torch.bfloat16  # as F.linear under autocast
    with torch.no_grad(), OpNames() as ops:
        got = linear(x.double(), weight.double())
    assert "mkldnn._linear_pointwise" not in ops.names and got.dtype == torch.float64


def test_mkldnn_switch_turns_it_off(monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    with torch.no_grad(), OpNames() as ops:
        linear(torch.randn(2, 6), torch.randn(8, 6))
    assert "mkldnn._linear_pointwise" not in ops.names


def test_linear_module_is_an_nn_linear():
    torch.manual_seed(0)
    plain = nn.Linear(12, 20)
    ours = PackedLinear(12, 20)
    ours.load_state_dict(plain.state_dict())
    assert isinstance(ours, nn.Linear) and list(ours.state_dict()) == ["weight", "bias"]
    x = torch.randn(5, 12)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x, plain.weight, plain.bias))


# ----------------------------------------------------------------------------- packed weights


class PackedProducts(TorchDispatchMode):
    """Counts oneDNN products whose weight is a packed (opaque mkldnn) tensor."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func.overloadpacket) == "mkldnn._linear_pointwise" and args[1].is_mkldnn:
            self.count += 1
        return func(*args, **(kwargs or {}))


needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs a torch built with oneDNN")


@needs_onednn
@pytest.mark.parametrize("rows", [1, 8, 32])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_fp32_products_match_float64(rows, with_bias):
    torch.manual_seed(rows)
    layer = PackedLinear(768, 2304, bias=with_bias)
    x = torch.randn(2, rows, 768)
    with torch.no_grad(), packed_weights(layer), PackedProducts() as packed:
        assert layer.packed_weight() is not None
        got = layer(x)
    assert packed.count == 1 and layer.packed_weight() is None  # dropped on leaving
    torch.testing.assert_close(got, reference(x, layer.weight, layer.bias))  # fp32 tolerances


@needs_onednn
def test_packed_bf16_under_autocast_is_f_linear_in_bf16():
    torch.manual_seed(0)
    layer = PackedLinear(96, 200).to(torch.bfloat16)
    x = torch.randn(5, 96)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.linear(x, layer.weight, layer.bias)
        with packed_weights(layer), PackedProducts() as packed:
            got = layer(x)
    assert packed.count == 1 and got.dtype == want.dtype == torch.bfloat16
    # both sum bf16 products in fp32; they differ by the rounding of the bf16 result at most
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@needs_onednn
def test_a_changed_weight_drops_its_packed_copy():
    torch.manual_seed(0)
    layer = PackedLinear(16, 24)
    x = torch.randn(3, 16)
    pack_weights(layer)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    F.linear(torch.randn(4, 16), layer.weight, layer.bias).square().sum().backward()
    optimizer.step()  # in place: the version counter moves
    with torch.no_grad(), PackedProducts() as packed:
        after_step = layer(x)
    assert packed.count == 0 and layer.packed_weight() is None
    torch.testing.assert_close(after_step, reference(x, layer.weight, layer.bias))
    pack_weights(layer)
    layer.load_state_dict(PackedLinear(16, 24).state_dict())  # copy_ into the same storage
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(x, layer.weight, layer.bias))
    assert layer.packed_weight() is None
    pack_weights(layer)
    layer.double()  # a cast: another storage
    assert layer.packed_weight() is None
    unpack_weights(layer)


@needs_onednn
def test_packed_weights_leave_training_and_copies_alone():
    torch.manual_seed(0)
    layer = PackedLinear(16, 24)
    x = torch.randn(3, 16, requires_grad=True)
    with packed_weights(layer), PackedProducts() as packed:
        layer(x).square().sum().backward()  # gradients flow: F.linear
        clone = copy.deepcopy(layer)
        assert "packed" not in str(clone.state_dict().keys()) and clone.packed_weight() is None
    assert packed.count == 0
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, layer.weight, layer.bias))
    F.linear(x64, w64, b64).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, w64.grad.float())
    torch.testing.assert_close(x.grad, x64.grad.float())


@needs_onednn
def test_sampling_with_packed_weights_commits_the_same_tokens():
    model = tiny_model(0).eval()
    prompts = [[BOS, 11, 12, 13], [BOS, 21, 22]]
    config = FastConfig(max_new_tokens=8, steps=8, block_length=4, temperature=0.0, cache="dual")
    ids = torch.tensor([[BOS, 11, 12, MASK, 14, MASK, 16]])
    with torch.no_grad():
        plain = generate(model, prompts, config, mask_id=MASK, eos_id=EOS).sequences
        want = model(ids).double()
        assert pack_weights(model) == sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, nn.Linear))
        with PackedProducts() as packed:
            packed_sequences = generate(model, prompts, config, mask_id=MASK, eos_id=EOS).sequences
            got = model(ids).double()
    unpack_weights(model)
    assert packed.count > 0
    assert torch.equal(packed_sequences, plain)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_torch_compile_traces_a_packed_linear_as_f_linear():
    torch.manual_seed(0)
    layer = PackedLinear(16, 24)
    x = torch.randn(3, 16)
    with torch.no_grad(), packed_weights(layer):
        got = torch.compile(layer, fullgraph=True, backend="eager")(x)  # dynamo traces; eager runs the graph
    torch.testing.assert_close(got, reference(x, layer.weight, layer.bias))


@needs_onednn
def test_packing_swaps_a_models_linears_and_unpacking_restores_them():
    """pack_weights makes each CPU nn.Linear a PackedLinear in place (same parameters, same keys);
    unpack_weights gives it back its plain class; layers oneDNN cannot pack stay as they are."""
    model = tiny_model(0).eval()
    keys, params = list(model.state_dict()), [id(p) for p in model.parameters()]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is nn.Linear for m in linears)
    with packed_weights(model):
        assert all(type(m) is PackedLinear and m.packed_weight() is not None for m in linears)
        assert list(model.state_dict()) == keys and [id(p) for p in model.parameters()] == params
    assert all(type(m) is nn.Linear for m in linears)
    wide = tiny_model(0).double()  # float64: no oneDNN layout to pack into
    assert pack_weights(wide) == 0
    assert all(type(m) is nn.Linear for m in wide.modules() if isinstance(m, nn.Linear))


def test_weights_off_the_cpu_stay_plain_linear_layers():
    """A model whose weights are not on the CPU (the meta device stands in for CUDA here) is left
    exactly as built: nothing packed, every layer a plain nn.Linear, so its product is F.linear's."""
    from helpers import tiny_model

    model = tiny_model().to("meta")
    assert pack_weights(model) == 0
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is torch.nn.Linear for m in linears)
