"""The GPU check (`pytest -m cuda`, run by benchmarks/gpu_check.sh): every script on the GPU in
bf16, padded batches on every SDPA backend, host syncs, peak memory and the compiled sampler.
Without a GPU they are skipped, saying so (tests/conftest.py); MINIDIFF_TEST_DEVICE=cpu runs
them on the CPU at a tiny shape (the check's dry run). What each one guards: docs/devices.md.

References: an uninterrupted run (resume, bitwise), each row run alone (padding), PyTorch's CUDA
sync debug mode, the eager sampler (compile), Diffutron's micro-batch 64 x 512 at LoRA r = 256.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.nn.attention import SDPBackend, sdpa_kernel

import minidiff
from minidiff import lora
from minidiff.data.tokenizer import train_tokenizer
from minidiff.model import ModelConfig, ModernBertMLM
from minidiff.plumbing.checkpoint import save_pretrained
from minidiff.plumbing.device import (check_available, cpu_has_native_bf16, enable_tf32, inference_precision,
                                      training_autocast)
from minidiff.sampler import SamplerConfig, build_canvas, denoise_step
from minidiff.speed.sampling import FastConfig, generate
from minidiff.training import trainer

pytestmark = pytest.mark.cuda
ROOT = Path(__file__).resolve().parents[1]
DEVICE = torch.device(os.environ.get("MINIDIFF_TEST_DEVICE", "cuda"))
GPU = DEVICE.type == "cuda"
STEPS = 12 if GPU else 6  # training steps of the script runs; a checkpoint every STEPS // 3
TEXTS = [  # ten Turkish sentences of different lengths: the documents, prompts and answers
    "Ankara, Türkiye'nin başkenti ve ikinci büyük şehridir.",
    "Karadeniz kıyısında çay bahçeleri yamaçları kaplar.",
    "Kütüphanede sessizce ders çalışan öğrenciler vardı.",
    "Sonbaharda yapraklar sararır ve rüzgârla birlikte dökülür.",
    "Büyükannem her sabah taze ekmek ve peynirle kahvaltı hazırlar.",
    "Boğaz köprüsünün altından geçen gemiler akşam ışıklarıyla parlıyordu.",
    "Kış gelince dağ köylerinin yolları karla kapanır.",
    "Müzede Osmanlı döneminden kalma eski el yazmaları sergileniyor.",
    "Yağmur dinince çocuklar sokağa çıkıp top oynamaya başladı.",
    "Doktor, hastasına bol su içmesini ve iyice dinlenmesini önerdi.",
]
# mmBERT-base (22 layers, hidden 768, 12 heads, window 128, a global layer every 3, vocabulary 256k)
BASE = dict(vocab_size=256000, hidden_size=768, intermediate_size=1152, num_hidden_layers=22, num_attention_heads=12,
            local_attention=128, global_attn_every_n_layers=3, global_rope_theta=160000.0,
            local_rope_theta=160000.0, pad_token_id=0, eos_token_id=1, bos_token_id=2, mask_token_id=4)
TINY = {**BASE, "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 2, "local_attention": 16}


def model_shape(full: bool = GPU) -> ModelConfig:
    """mmBERT-base's shape on the GPU, the tiny one on the CPU (or when full is False)."""
    return ModelConfig(**(BASE if full else TINY))


@pytest.fixture(scope="module", autouse=True)
def device():
    check_available(DEVICE)
    enable_tf32(DEVICE)  # as every script does
    if GPU:
        torch.cuda.set_device(DEVICE)
    return DEVICE


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """A tokenizer, a small random model directory (window 16, so padded rows have fully masked
    windows) and the data files every script reads."""
    work = tmp_path_factory.mktemp("gpu-check")
    docs = TEXTS * 3  # 30 one-line documents of different lengths (padded batches)
    tok = train_tokenizer(docs, 400, out_dir=work / "base")
    config = ModelConfig(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=2, max_position_embeddings=512, global_rope_theta=160000.0,
        local_rope_theta=160000.0, local_attention=16, global_attn_every_n_layers=2,
        pad_token_id=tok.pad_id, eos_token_id=tok.eos_id, bos_token_id=tok.bos_id,
        cls_token_id=tok.eos_id, sep_token_id=tok.eos_id, mask_token_id=tok.mask_id)
    torch.manual_seed(0)
    save_pretrained(ModernBertMLM(config), work / "base")
    (work / "train.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    (work / "ppl.txt").write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    chats = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
             for q, a in zip(TEXTS, TEXTS[1:] + TEXTS[:1])]
    choices = [{"prompt": " ".join(t.split()[:-1]), "label": i % 3,  # answers of 1 to many tokens
                "choices": [" " + t.split()[-1], " " + " ".join(t.split()[-3:]), " evet"]} for i, t in enumerate(TEXTS)]
    for name, rows in (("sft.jsonl", chats), ("mc.jsonl", choices)):
        (work / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return {"work": work, "base": work / "base", "tok": tok}


def run_script(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    """python ARGS from the repository root, as a user runs it; exit status 0 or the test fails."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    done = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def check_run(run_dir: Path, world_size: int = 1) -> None:
    """Finite losses, the device asked for in run.json, an exported model."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    losses = [r[k] for r in rows for k in ("loss", "eval_loss") if k in r]
    assert losses and all(math.isfinite(v) for v in losses)
    run = json.loads((run_dir / "run.json").read_text())
    want = str(torch.device("cuda", torch.cuda.current_device())) if GPU else "cpu"
    assert (run["device"], run["world_size"]) == (want, world_size)
    assert (run_dir / "model.safetensors").is_file()


def cpt_args(inputs: dict, out: Path) -> list:
    return ["train_cpt.py", "--model", inputs["base"], "--data", inputs["work"] / "train.txt", "--max-len", "96",
            "--batch-size", "4", "--lr", "3e-3", "--log-every", "1", "--no-progress", "--lora-r", "8",
            "--lora-alpha", "16", "--max-steps", STEPS, "--save-every", STEPS // 3, "--keep-last", "5",
            "--eval-fraction", "0.2", "--eval-every", STEPS // 2, "--out", out]


@pytest.fixture(scope="module")
def cpt(inputs) -> Path:
    out = inputs["work"] / "cpt"
    run_script(*cpt_args(inputs, out), "--device", DEVICE)
    check_run(out)
    return out


@pytest.fixture(scope="module")
def sft(inputs, cpt) -> Path:
    out = inputs["work"] / "sft"
    run_script("train_sft.py", "--model", cpt, "--data", inputs["work"] / "sft.jsonl", "--format", "messages",
               "--max-len", "192", "--batch-size", "4", "--max-steps", STEPS, "--lr", "1e-3", "--log-every", "1",
               "--no-progress", "--device", DEVICE, "--out", out)
    check_run(out)
    return out


# the script with one kernel per op wherever torch has a choice, so two runs can agree bit for bit
DETERMINISTIC = ["-c", "import runpy, sys, torch; torch.use_deterministic_algorithms(True, warn_only=True); "
                 "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"]


def test_resume_from_a_middle_checkpoint_equals_the_uninterrupted_run(inputs):
    """A run cut back to its checkpoint at step STEPS / 3 and resumed ends with the uninterrupted
    run's weights, bit for bit: the data position, the random streams and the optimizer came back."""
    whole, resumed = inputs["work"] / "cpt-whole", inputs["work"] / "cpt-resumed"
    run_script(*DETERMINISTIC, *cpt_args(inputs, whole), "--device", DEVICE)
    check_run(whole)
    shutil.copytree(whole, resumed)
    for path in (resumed / "checkpoints").iterdir():
        if path.name != f"step-{STEPS // 3:06d}":
            shutil.rmtree(path)
    for path in resumed.iterdir():
        if path.name not in ("checkpoints", "metrics.jsonl", "run.json"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    run_script(*DETERMINISTIC, *cpt_args(inputs, resumed), "--device", DEVICE, "--resume")
    check_run(resumed)
    rows = {run: [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] for run in (whole, resumed)}
    kept = [row for row in rows[whole] if row["step"] <= STEPS // 3]
    assert rows[resumed][:len(kept)] == kept  # its own tokens/s included: those steps did not run again
    assert [row.get("loss") for row in rows[resumed]] == [row.get("loss") for row in rows[whole]]
    want, got = load_file(str(whole / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert sorted(want) == sorted(got)
    assert [k for k in want if not torch.equal(want[k], got[k])] == []


def test_torchrun_on_the_local_ranks_device(inputs):
    nproc = 2 if GPU and torch.cuda.device_count() >= 2 else 1
    out = inputs["work"] / "cpt-torchrun"
    run_script("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               *cpt_args(inputs, out), "--device", DEVICE.type)
    check_run(out, world_size=nproc)


def test_evaluate_on_the_device_in_its_precision(inputs, sft):
    results = inputs["work"] / "results.json"
    run_script("evaluate.py", "--model", sft, "--task", f"perplexity:{inputs['work'] / 'ppl.txt'}",
               "--task", f"mc:{inputs['work'] / 'mc.jsonl'}", "--batch-size", "4", "--max-len", "32",
               "--mc-samples", "4", "--out", results, "--no-progress", "--device", DEVICE)
    got = json.loads(results.read_text())
    numbers = [v for task in got["tasks"].values() for v in task.get("metrics", {}).values()
               if isinstance(v, (int, float))]
    assert numbers and all(math.isfinite(v) for v in numbers)
    # --dtype auto: bf16 weights and autocast on a CUDA card with bf16; on a CPU packed bf16 where it has
    # native bf16, else packed fp32
    assert got["precision"] == ("bfloat16 weights, bfloat16 autocast" if GPU else
                                "bfloat16 weights (packed), bfloat16 autocast" if cpu_has_native_bf16() else
                                "float32 weights (packed), no autocast")


SAMPLING = {
    "greedy": ["--prompt", "Ankara", "--max-new-tokens", "16", "--steps", "16", "--block-length", "8"],
    "threshold": ["--prompt", "Ankara", "--max-new-tokens", "16", "--steps", "16", "--block-length", "8",
                  "--threshold", "0.3"],
    "preset": ["--prompt", "Ankara", "--preset", "diffutron-long", "--seed", "0"],
    "cfg, two prompts": ["--prompt", "Ankara", "--prompt", "İstanbul Boğazı nerede?", "--max-new-tokens", "16",
                         "--steps", "16", "--block-length", "8", "--cfg-scale", "1.0"],
    "infill": ["--infill", "İstanbul <mask> <mask> <mask> Asya'yı ayırır.", "--steps", "3"],
}


@pytest.mark.parametrize("setting", SAMPLING)
def test_sample(sft, setting):
    done = run_script("sample.py", "--model", sft, *SAMPLING[setting], "--json", "--device", DEVICE)
    assert json.loads(done.stdout.strip().splitlines()[-1])


BACKENDS = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_rows_equal_each_row_alone(inputs, backend):
    """Real-token logits of a padded batch equal each row run alone, on each SDPA backend."""
    precision = inference_precision("auto", DEVICE)
    model = precision.prepare(minidiff.load_model(inputs["base"]))
    window = model.config.local_attention // 2
    lengths = [40, 3 * window // 2, 2]  # rows 1 and 2: padding queries with no key in their window
    S = max(lengths)
    ids = torch.randint(5, inputs["tok"].vocab_size, (len(lengths), S), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids, mask = ids.masked_fill(mask == 0, inputs["tok"].pad_id).to(DEVICE), mask.to(DEVICE)
    try:
        with torch.no_grad(), precision.autocast(), sdpa_kernel([BACKENDS[backend]]):
            padded = model(ids, mask).float()
            alone = [model(ids[b:b + 1, :n]).float() for b, n in enumerate(lengths)]
    except RuntimeError as err:
        pytest.skip(f"SDPA {backend} cannot run these inputs on {DEVICE}: {str(err)[:80]}")
    # bf16: rows of another length may be tiled differently; a NaN or a masking error is O(1)
    rel = 2e-2 if precision.autocast_dtype is not None else 1e-5
    assert torch.isfinite(padded).all()
    for b, n in enumerate(lengths):
        assert (padded[b, :n] - alone[b][0]).abs().max() <= rel * alone[b][0].abs().max(), b


def sampler_setup():
    """(model, canvas, first block's positions, counts, generator, precision): two rows, the second
    padded (88 new tokens against 128), prompt 32, blocks of 32."""
    config = model_shape()
    torch.manual_seed(0)
    precision = inference_precision("auto", DEVICE)
    with torch.device(DEVICE):  # initialised where it runs (300M parameters at full shape)
        model = precision.prepare(ModernBertMLM(config)).eval()
    B, prompt, L = 2, 32, 32
    rows = torch.randint(5, config.vocab_size, (B, prompt)).tolist()
    rows = [rows[0] + [config.mask_token_id] * 128, rows[1] + [config.mask_token_id] * 88]
    canvas = build_canvas(rows, [prompt] * B, 128, [prompt] * B, SamplerConfig(block_length=L),
                          mask_id=config.mask_token_id, eos_id=config.eos_token_id, device=DEVICE)
    counts = torch.full((B,), 2, dtype=torch.long, device=DEVICE)
    return model, canvas, canvas.blocks[0], counts, torch.Generator(device=DEVICE).manual_seed(0), precision


STEP_KINDS = {"greedy": SamplerConfig(), "threshold": SamplerConfig(threshold=0.9),
              "temperature + penalty": SamplerConfig(temperature=0.5, repetition_penalty=1.2),
              "cfg": SamplerConfig(cfg_scale=1.0), "random remasking": SamplerConfig(remasking="random")}


@pytest.mark.parametrize("kind", STEP_KINDS)
def test_a_sampler_step_makes_no_host_sync(kind):
    """denoise_step at the model shape on a padded canvas, under CUDA's sync debug mode "error"."""
    model, canvas, positions, counts, generator, precision = sampler_setup()
    assert canvas.attention_mask is not None and not bool(canvas.attention_mask.all())  # padded path

    def step():
        return denoise_step(model.logits_at_positions, canvas.ids.clone(), canvas, positions, counts,
                            STEP_KINDS[kind], generator)

    with torch.no_grad(), precision.autocast():
        step()  # warm-up: lazy initialisation may synchronise once
        if GPU:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            committed = step()
        finally:
            if GPU:
                torch.cuda.set_sync_debug_mode(0)
    assert committed.shape == positions.shape


@pytest.mark.parametrize("batch", [1, 4] if GPU else [2])  # a CPU compiles for a minute
def test_the_compiled_sampler_in_bf16_commits_the_eager_tokens(batch):
    """The compiled sampler step in bf16 autocast (what `--compile` users run) on a tiny model: one
    graph for the block shape, the eager loop's tokens. The compiler starts cold."""
    config = model_shape(full=False)
    torch.manual_seed(0)
    precision = inference_precision("bfloat16", DEVICE)
    with torch.device(DEVICE):
        model = precision.prepare(ModernBertMLM(config)).eval()
    settings = dict(max_new_tokens=32, steps=32, block_length=16, cache="dual")  # two blocks, one shape
    prompts = [torch.randint(5, config.vocab_size, (24 - 3 * r,)).tolist() for r in range(batch)]

    def run(compiled: bool):
        return generate(model, prompts, FastConfig(compile=compiled, **settings), mask_id=config.mask_token_id,
                        eos_id=config.eos_token_id).sequences

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch.no_grad(), precision.autocast():
        eager, compiled = run(False), run(True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    # bf16: the fused kernels round differently, which may swap a near tie; a wrong graph differs everywhere
    assert (eager == compiled).float().mean() >= 0.9


def padded_batch(vocab_size: int, batch: int, seq: int) -> dict:
    """A CPT batch whose rows after the first end in padding at 5/8 of the length."""
    ids = torch.randint(5, vocab_size, (batch, seq), device=DEVICE)
    attention = torch.ones_like(ids)
    attention[1:, 5 * seq // 8:] = 0
    return {"input_ids": ids, "maskable": attention.bool(), "attention_mask": attention}


def test_host_syncs_of_a_padded_cpt_micro_batch(inputs, capsys):
    """One CPT micro-batch (loss forward + backward) on a padded batch: finite, and the host syncs
    it makes counted under CUDA's sync debug mode "warn" (reported: the loss may index rows)."""
    model = minidiff.load_model(inputs["base"]).to(DEVICE).train()
    batch = padded_batch(inputs["tok"].vocab_size, 4, 64)
    loss_fn = trainer.nelbo_objective(inputs["tok"].mask_id)
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    for _ in range(2):  # the first pass may initialise lazily
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            if GPU:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("warn")
            try:
                with training_autocast(DEVICE, True):
                    loss, weight = loss_fn(model, batch, generator)
                (loss.float() * weight).backward()
            finally:
                if GPU:
                    torch.cuda.set_sync_debug_mode(0)
    assert math.isfinite(loss.item()) and all(torch.isfinite(p.grad).all() for p in model.parameters()
                                              if p.grad is not None)
    syncs = [str(w.message).splitlines()[0][:80] for w in seen if "synchroniz" in str(w.message).lower()]
    with capsys.disabled():
        print(f"\nhost syncs in one CPT micro-batch on {DEVICE}: {len(syncs)}", *syncs[:1])


def micro_batch_peak(batch: int, seq: int, checkpointing: bool) -> float | None:
    """Peak GiB (CUDA; NaN on the CPU) of one LoRA CPT micro-batch on a padded batch at the model
    shape: forward + backward of the NELBO, bf16 autocast, fp32 weights; None: out of memory."""
    config = model_shape()
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = ModernBertMLM(config)
    lora.apply_lora(model, r=256 if GPU else 8, alpha=256 if GPU else 8, dropout=0.05)
    model.train()
    model.model.gradient_checkpointing = checkpointing
    loss_fn = trainer.nelbo_objective(config.mask_token_id)
    if GPU:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(DEVICE)
    try:
        with training_autocast(DEVICE, True):
            loss, weight = loss_fn(model, padded_batch(config.vocab_size, batch, seq),
                                   torch.Generator(device=DEVICE).manual_seed(0))
        (loss.float() * weight).backward()
        assert math.isfinite(loss.item())
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        del model
    return torch.cuda.max_memory_allocated(DEVICE) / 2**30 if GPU else float("nan")


def test_peak_memory_of_a_lora_cpt_micro_batch(capsys):
    """At mmBERT-base shape, LoRA r = 256, padded rows of 512: 16 rows fit, gradient checkpointing
    lowers the peak; Diffutron's 64 rows with checkpointing reported (fits or not)."""
    seq, batch = (512, 16) if GPU else (64, 2)
    plain, checkpointed = micro_batch_peak(batch, seq, False), micro_batch_peak(batch, seq, True)
    assert plain is not None and checkpointed is not None
    lines = [f"{batch} x {seq}: peak {plain:.2f} GiB, with gradient checkpointing {checkpointed:.2f} GiB"
             if GPU else f"{batch} x {seq} ran with and without gradient checkpointing (peak memory needs CUDA)"]
    if GPU:
        assert checkpointed < plain
        recipe = micro_batch_peak(64, 512, True)
        lines.append("64 x 512 with checkpointing: " + (f"peak {recipe:.2f} GiB" if recipe else "does not fit"))
    with capsys.disabled():
        print(f"\nLoRA CPT micro-batch on {DEVICE}: " + "; ".join(lines))
