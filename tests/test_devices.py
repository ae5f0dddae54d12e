"""Device logic on a CPU: --device resolution, the device reaching the trainer and run.json,
inference precision, and resuming a checkpoint written on another device type.

References: torch.device semantics written out by hand (cuda -> cuda:LOCAL_RANK), an
uninterrupted run (resume), and torch.Generator seeded directly (the reseed fallback).
"""
from __future__ import annotations

import json
import random
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import MASK, TURKISH_TEXT, cpt_batches, make_model_dir, make_tokenizer_dir, tiny_model
from safetensors.torch import load_file

from minidiff.data.tokenizer import load_tokenizer
from minidiff.errors import UserError
from minidiff.plumbing import device
from minidiff.training import state as train_state
from minidiff.training import trainer

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- resolution


def test_bare_cuda_is_the_local_ranks_gpu(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert device.resolve_device("cuda") == torch.device("cuda", 3)
    assert device.resolve_device("cuda:1") == torch.device("cuda", 1)  # an explicit index wins
    assert device.resolve_device("cpu") == torch.device("cpu")
    assert device.resolve_device("cuda", local_rank=5) == torch.device("cuda", 5)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device.resolve_device(None) == torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device.resolve_device(None) == torch.device("cpu")
    monkeypatch.delenv("LOCAL_RANK")
    assert device.resolve_device("cuda") == torch.device("cuda", 0)
    with pytest.raises(UserError, match="not a device name"):
        device.resolve_device("gpu0")


def test_cuda_on_a_machine_without_one_is_one_sentence(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="no usable CUDA GPU"):
        trainer.distributed_context("cuda")


def test_inference_precision_table():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    auto_gpu = device.inference_precision(None, gpu)  # bf16 weights: nothing to re-cast at each step
    assert (auto_gpu.weights, auto_gpu.autocast_dtype) == (torch.bfloat16, torch.bfloat16)
    fp32 = device.inference_precision("float32", gpu)
    assert (fp32.weights, fp32.autocast_dtype) == (torch.float32, None)
    with pytest.raises(UserError, match="float16 is not supported"):
        device.inference_precision("float16", gpu)
    with pytest.raises(UserError, match="unknown"):
        device.inference_precision("int8", cpu)


def test_auto_on_the_cpu_is_bf16_only_with_native_bf16(monkeypatch):
    """auto: bf16 weights + bf16 autocast where /proc/cpuinfo lists avx512_bf16 or amx_bf16,
    plain fp32 on any other CPU; CUDA keeps bf16 weights + bf16 autocast either way."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    cases = [({"avx2", "avx512f"}, (torch.float32, None)), ({"avx512f", "avx512_bf16"}, (torch.bfloat16,) * 2),
             ({"amx_tile", "amx_bf16"}, (torch.bfloat16,) * 2), (set(), (torch.float32, None))]
    for flags, want in cases:
        monkeypatch.setattr(device, "cpu_flags", lambda flags=flags: frozenset(flags))
        auto = device.inference_precision("auto", cpu)
        assert (auto.weights, auto.autocast_dtype) == want, flags
        assert device.inference_precision("float32", cpu).autocast_dtype is None
        assert device.inference_precision("auto", gpu).weights == torch.bfloat16


def test_cpu_flags_read_from_proc_cpuinfo():
    """The flags line of /proc/cpuinfo, word for word (empty where the file does not exist)."""
    try:
        lines = open("/proc/cpuinfo", encoding="utf-8", errors="replace").read().splitlines()
    except OSError:
        assert device.cpu_flags() == frozenset()
        return
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    assert device.cpu_flags() == frozenset(flags)


def test_bfloat16_keeps_layernorms_and_the_residual_stream_fp32():
    model = tiny_model(0)
    precision = device.inference_precision("bfloat16", torch.device("cpu"))
    model = precision.prepare(model)
    for name, p in model.named_parameters():
        want = torch.float32 if "norm" in name else torch.bfloat16
        assert p.dtype == want, name
    seen = []
    hook = model.model.layers[1].register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    ids = torch.randint(5, 64, (2, 9))
    with torch.no_grad(), precision.autocast():
        logits = model(ids)
    hook.remove()
    assert seen == [torch.float32]  # the residual stream x + f(x) stays fp32
    with torch.no_grad():
        reference = tiny_model(0)(ids)  # fp32 weights, fp32 compute
    # bf16 matmul inputs: relative error of a few 2^-8 on logits of size ~1..10
    assert (logits.float() - reference).abs().max() <= 0.05 * reference.abs().max()


# ----------------------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(make_tokenizer_dir(tmp_path_factory.mktemp("tok")))


def batches(tok):
    return cpt_batches(tok)


def test_config_device_reaches_the_trainer_on_a_gpu_machine(tok, tmp_path, monkeypatch):
    # pretend CUDA is there: before, train() ignored the setting and would pick cuda:0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    asked = []
    real = trainer.distributed_context
    monkeypatch.setattr(trainer, "distributed_context", lambda d=None: asked.append(d) or real(d))
    model = tiny_model(0, vocab_size=tok.vocab_size)
    cfg = trainer.TrainConfig(max_steps=1, batch_size=3, progress=False, device="cpu")
    trainer.train(model, batches(tok), None, trainer.nelbo_objective(MASK), cfg, tmp_path / "run")
    assert asked == ["cpu"]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["device"] == "cpu" and run["config"]["device"] == "cpu"
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_device_flag_of_train_cpt_reaches_run_json(tmp_path):
    sys.path.insert(0, str(ROOT))
    import train_cpt

    model = make_model_dir(tmp_path / "model")
    text = tmp_path / "train.txt"
    text.write_text("\n".join(TURKISH_TEXT) + "\n", encoding="utf-8")
    common = ["--model", str(model), "--data", str(text), "--max-len", "48", "--batch-size", "3",
              "--max-steps", "1", "--full", "--no-progress"]
    assert train_cpt.main([*common, "--out", str(tmp_path / "run"), "--device", "cpu"]) == 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["device"] == "cpu" and run["config"]["device"] == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="cuda:7"):
            train_cpt.main([*common, "--out", str(tmp_path / "gpu"), "--device", "cuda:7"])
        assert not (tmp_path / "gpu").exists()


# ----------------------------------------------------------------------------- resume across devices


def cuda_style_rng_file(path: Path, generator: torch.Generator) -> None:
    """What a rank on a 2-GPU machine writes: CUDA states for both GPUs, the masking generator's
    CUDA (Philox: seed + offset, 16 bytes) state; python, numpy, torch CPU as usual."""
    state = train_state.rng_state(generator)
    philox = torch.tensor([123, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0, 0, 0, 0, 0, 0], dtype=torch.uint8)
    state.update(cuda=[philox.clone(), philox.clone()], generator=philox, generator_device="cuda")
    torch.save(state, path)


def test_cuda_rng_states_on_a_cpu_machine_reseed_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    generator = torch.Generator().manual_seed(1)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    cuda_style_rng_file(tmp_path / "rng.pt", generator)
    after = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    state = torch.load(tmp_path / "rng.pt", weights_only=True)
    with pytest.warns(UserWarning, match="reseeded from the run seed"):
        train_state.set_rng_state(state, generator, fallback_seed=77)
    assert random.random() == after[0] and np.random.rand() == after[1]
    assert torch.equal(torch.rand(3), after[2])
    assert torch.equal(torch.rand(5, generator=generator), torch.rand(5, generator=torch.Generator().manual_seed(77)))


def test_resume_a_gpu_checkpoint_on_the_cpu_equals_an_uninterrupted_run(tok, tmp_path):
    cfg = trainer.TrainConfig(max_steps=4, batch_size=3, grad_accum=2, save_every=2, keep_last=3,
                              lr=3e-3, progress=False, log_every=1)
    loss_fn = trainer.nelbo_objective(MASK)
    trainer.train(tiny_model(0, vocab_size=tok.vocab_size), batches(tok), None, loss_fn, cfg, tmp_path / "a")

    calls = {"n": 0}

    def dying(model, batch, generator):  # the run dies during step 3, after the step-2 checkpoint
        calls["n"] += 1
        if calls["n"] > 2 * cfg.grad_accum:
            raise RuntimeError("killed")
        return loss_fn(model, batch, generator)

    with pytest.raises(RuntimeError, match="killed"):
        trainer.train(tiny_model(0, vocab_size=tok.vocab_size), batches(tok), None, dying, cfg, tmp_path / "b")
    ckpt = train_state.latest_checkpoint(tmp_path / "b" / "checkpoints")
    cuda_style_rng_file(ckpt / "rng-rank-0.pt", torch.Generator())  # as if a GPU had written it
    train_state.write_manifest(ckpt)  # ... and vouched for it
    with pytest.warns(UserWarning, match="reseeded"):
        trainer.train(tiny_model(0, vocab_size=tok.vocab_size), batches(tok), None, loss_fn,
                      replace(cfg, resume=True), tmp_path / "b")
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_rng_state_with_a_cuda_generator_reseeds():
    state = train_state.rng_state(torch.Generator())
    generator = torch.Generator(device="cuda")
    with pytest.warns(UserWarning, match="was on cpu"):
        train_state.set_rng_state(state, generator, fallback_seed=3)
    want = torch.rand(4, device="cuda", generator=torch.Generator(device="cuda").manual_seed(3))
    assert torch.equal(torch.rand(4, device="cuda", generator=generator), want)


def test_scripts_refuse_float16_and_run_bfloat16(tmp_path, capsys):
    sys.path.insert(0, str(ROOT))
    import evaluate
    import sample

    model = make_model_dir(tmp_path / "model")
    text = tmp_path / "ppl.txt"
    text.write_text("\n".join(TURKISH_TEXT) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match="float16 is not supported"):
        evaluate.main(["--model", str(model), "--task", f"perplexity:{text}", "--out", str(tmp_path / "r.json"),
                       "--dtype", "float16"])
    assert not (tmp_path / "r.json").exists()
    with pytest.raises(UserError, match="float16 is not supported"):
        sample.main(["--model", str(model), "--prompt", "merhaba", "--dtype", "float16"])
    out = tmp_path / "bf16.json"
    assert evaluate.main(["--model", str(model), "--task", f"perplexity:{text}", "--out", str(out), "--max-len", "32",
                          "--dtype", "bfloat16", "--device", "cpu", "--no-progress"]) == 0
    results = json.loads(out.read_text())
    assert results["precision"] == "bfloat16 weights (packed), bfloat16 autocast" and results["device"] == "cpu"
    metrics = results["tasks"][f"perplexity:{text}"]
    assert all(np.isfinite(v) for v in metrics["metrics"].values() if isinstance(v, float))


# ----------------------------------------------------------------------------- the machines people have


def fake_gpus(monkeypatch, count: int, capability=(9, 0), name="NVIDIA H200"):
    """torch.cuda's queries answering as a machine with `count` visible GPUs of one kind."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: name)


def test_one_visible_gpu_per_rank_is_cuda_0(monkeypatch):
    """SLURM --gpus-per-task and the like: each rank sees one GPU, whatever its LOCAL_RANK."""
    monkeypatch.setenv("LOCAL_RANK", "3")
    fake_gpus(monkeypatch, 1)
    assert device.resolve_device("cuda") == torch.device("cuda", 0)
    assert device.resolve_device(None) == torch.device("cuda", 0)
    device.check_available(device.resolve_device("cuda"))
    fake_gpus(monkeypatch, 8)  # torchrun on one node: every rank sees all eight
    assert device.resolve_device("cuda") == torch.device("cuda", 3)


def test_auto_on_a_gpu_without_bf16_is_fp32(monkeypatch):
    gpu = torch.device("cuda", 0)
    fake_gpus(monkeypatch, 1, capability=(7, 0), name="Tesla V100")
    auto = device.inference_precision("auto", gpu)
    assert (auto.weights, auto.autocast_dtype) == (torch.float32, None)
    with pytest.raises(UserError, match="--dtype float32"):
        device.inference_precision("bfloat16", gpu)
    with pytest.raises(UserError, match="--no-bf16"):
        device.check_training_precision(gpu, bf16=True)
    device.check_training_precision(gpu, bf16=False)
    fake_gpus(monkeypatch, 1, capability=(8, 0), name="NVIDIA A100")
    auto = device.inference_precision("auto", gpu)
    assert (auto.weights, auto.autocast_dtype) == (torch.bfloat16, torch.bfloat16)
    device.check_training_precision(gpu, bf16=True)


def test_mps_is_refused_in_one_sentence():
    with pytest.raises(UserError, match="mps is not supported.*float64"):
        device.check_available(torch.device("mps"))


def test_tf32_leaves_the_precision_readable_as_inductor_reads_it(recwarn):
    """After the TF32 call for a CUDA device (no GPU needed to set the flags), the two legacy
    reads Inductor's matmul lowering makes answer instead of raising "mix of the legacy and new
    APIs", and say TF32; nothing warns."""
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        device.enable_tf32(torch.device("cuda"))
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cuda.matmul.allow_tf32 is True and torch.backends.cudnn.allow_tf32 is True
        assert not [w for w in recwarn if "tf32" in str(w.message).lower()]
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]


def test_no_source_sets_tf32_through_fp32_precision():
    """One API family everywhere: a `fp32_precision` setter anywhere in the package, the scripts
    or the benchmarks would bring back the mix."""
    sources = [*ROOT.glob("*.py"), *ROOT.glob("minidiff/**/*.py"), *ROOT.glob("benchmarks/*.py")]
    assert len(sources) > 20
    setters = [path.name for path in sources if "fp32_precision =" in path.read_text(encoding="utf-8")]
    assert setters == []


def test_a_gpu_this_machine_lacks_is_one_sentence_before_any_cuda_query(monkeypatch):
    """cuda:7 on a one-GPU machine: the precision lookup (which asks the card's capability) says
    which GPUs exist instead of passing CUDA's own error on."""
    fake_gpus(monkeypatch, 1)

    def capability(d=None):  # what CUDA does for an index it does not have
        if torch.device(d).index not in (None, 0):
            raise RuntimeError("CUDA error: invalid device ordinal")
        return (9, 0)

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    for call in (lambda d: device.inference_precision("auto", d), lambda d: device.check_training_precision(d, True)):
        with pytest.raises(UserError, match=r"cuda:7 does not exist: this machine has 1 GPU\(s\) \(cuda:0 .. cuda:0\)"):
            call(torch.device("cuda", 7))
        call(torch.device("cuda", 0))


def test_the_process_group_is_bound_to_the_ranks_gpu(monkeypatch):
    joined = {}
    fake_gpus(monkeypatch, 8)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "5")
    monkeypatch.setattr(trainer.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(trainer.dist, "init_process_group", lambda backend, **kw: joined.update(backend=backend, **kw))
    monkeypatch.setattr(trainer.dist, "get_rank", lambda: 5)
    ctx = trainer.distributed_context("cuda")
    assert ctx.device == torch.device("cuda", 5)
    assert joined == {"backend": "nccl", "device_id": torch.device("cuda", 5)}


def test_a_filesystem_without_locks_is_one_sentence(tmp_path, monkeypatch):
    import errno
    import fcntl

    from minidiff.plumbing import files

    def refuse(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)
    with pytest.raises(UserError, match="filesystem without file locks.*Lustre: -o flock"):
        with files.lock_directory(tmp_path / "run", "--out"):
            pass


def test_a_rank_that_cannot_see_the_checkpoint_folder_says_so(tmp_path):
    with pytest.raises(UserError, match="rank 3 cannot see.*every node shares"):
        train_state.write_rng(tmp_path / "not-shared" / ".tmp-step-000010", 3, None)
