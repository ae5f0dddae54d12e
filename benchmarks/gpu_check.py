"""GPU check: every script on CUDA in bf16 on small models built on the spot, and the checks
only a GPU can make. One command, a few minutes on one GPU:

References: PyTorch's CUDA sync debug mode and SDPA backends (torch.nn.attention); the
Diffutron recipe (arXiv 2603.20466) for the micro-batch shape (64 x 512, LoRA r = 256).

    bash benchmarks/gpu_check.sh                       # python benchmarks/gpu_check.py --device cuda
    python benchmarks/gpu_check.py --device cpu --quick   # the parts a CPU can run (smoke test)
    python benchmarks/gpu_check.py --json checks.json     # every check's line as JSON too

Scripts (subprocesses, as a user runs them): train_cpt.py with LoRA, evaluation and
checkpoints; --resume of that run; torchrun with 1 process (2 when two GPUs are present);
train_sft.py; evaluate.py (perplexity + multiple choice, padded batches); sample.py (greedy,
threshold, the diffutron-long preset, cfg, infill). Each must exit 0 with finite losses and
record the device it was given in run.json / results.json.

In-process checks: a padded batch gives the real tokens what the unpadded rows give, on every
SDPA backend torch offers for it (math, memory-efficient, cuDNN; flash takes no mask); one
sampler step (sampler.denoise_step) makes no host-device synchronisation
(torch.cuda.set_sync_debug_mode("error")), and its time per step at mmBERT-base shape; the
sampler's ms/step through `generate` at batch 1 and 8 for each key/value cache mode (none,
prefix, dual), eager and (on CUDA) compiled; the
number of host synchronisations in one CPT micro-batch (reported: the loop adds none, the loss
function's internals may); the peak
memory (torch.cuda.max_memory_allocated) of one LoRA CPT micro-batch at mmBERT-base shape
(22 layers, hidden 768, vocabulary 256,000, r = 256) with the paper's 64 x 512 tokens (and
16 x 512 if 64 does not fit). With --quick the model-shape measurements use a tiny model.

Prints one line per check and a summary; exits 1 if any check failed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import torch
from common import banner, mmbert_base, timed, tiny_shape, write_results
from safetensors.torch import load_file
from torch.nn.attention import SDPBackend, sdpa_kernel

import minidiff
from minidiff import lora
from minidiff.data.tokenizer import train_tokenizer
from minidiff.errors import run_cli
from minidiff.model import ModelConfig, ModernBertMLM
from minidiff.plumbing.checkpoint import save_pretrained
from minidiff.plumbing.device import (
    check_available,
    cpu_has_native_bf16,
    enable_tf32,
    inference_precision,
    resolve_device,
    training_autocast,
)
from minidiff.sampler import SamplerConfig, build_canvas, denoise_step
from minidiff.speed.sampling import generate
from minidiff.training import trainer

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [  # ten Turkish sentences of different lengths: the documents, prompts and answers of the checks
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


class Report:
    """Collects PASS / FAIL / INFO lines and prints them as they come."""

    def __init__(self):
        self.rows: list[tuple[str, str, str]] = []

    def add(self, status: str, name: str, detail: str = "") -> None:
        self.rows.append((status, name, detail))
        print(f"[{status}] {name}{': ' + detail if detail else ''}", flush=True)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.add("PASS" if ok else "FAIL", name, detail)
        return ok

    def failed(self) -> list[str]:
        return [name for status, name, _ in self.rows if status == "FAIL"]


# ----------------------------------------------------------------------------- set-up


def build_inputs(work: Path, seed: int = 0) -> dict:
    """A tokenizer, a small random model directory (local window 16, so padded rows have
    fully masked windows) and the data files every script reads."""
    base = work / "base"
    docs = TEXTS * 3  # 30 one-line documents of different lengths (padded batches)
    tok = train_tokenizer(docs, 400, out_dir=base)
    config = ModelConfig(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=2, max_position_embeddings=512, global_rope_theta=160000.0,
        local_rope_theta=160000.0, local_attention=16, global_attn_every_n_layers=2,
        pad_token_id=tok.pad_id, eos_token_id=tok.eos_id, bos_token_id=tok.bos_id,
        cls_token_id=tok.eos_id, sep_token_id=tok.eos_id, mask_token_id=tok.mask_id)
    torch.manual_seed(seed)
    save_pretrained(ModernBertMLM(config), base)
    assert minidiff.load_model(base) is not None
    (work / "train.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    (work / "ppl.txt").write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    with open(work / "sft.jsonl", "w", encoding="utf-8") as handle:
        for q, a in zip(TEXTS, TEXTS[1:] + TEXTS[:1]):
            handle.write(json.dumps({"messages": [{"role": "user", "content": q},
                                                  {"role": "assistant", "content": a}]}, ensure_ascii=False) + "\n")
    with open(work / "mc.jsonl", "w", encoding="utf-8") as handle:  # answers of 1 to many tokens
        for i, text in enumerate(TEXTS):
            words = text.split()
            choices = [" " + " ".join(words[-1:]), " " + " ".join(words[-3:]), " evet"]
            handle.write(json.dumps({"prompt": " ".join(words[:-1]), "choices": choices, "label": i % 3},
                                    ensure_ascii=False) + "\n")
    return {"base": base, "train": work / "train.txt", "ppl": work / "ppl.txt", "sft": work / "sft.jsonl",
            "mc": work / "mc.jsonl", "tok": tok, "config": config}


def run_script(args: list[str], env_extra: dict | None = None, timeout: int = 300):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return timed(lambda: subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                                        timeout=timeout))


def tail(text: str, n: int = 400) -> str:
    return text.strip().replace("\n", " | ")[-n:]


def finite_losses(run_dir: Path) -> tuple[bool, str]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    values = [r[k] for r in rows for k in ("loss", "eval_loss") if k in r]
    ok = bool(values) and all(math.isfinite(v) for v in values)
    return ok, f"{len(values)} losses, last {values[-1]:.4f}" if values else "no losses logged"


def check_train_run(report: Report, name: str, done, seconds: float, run_dir: Path, want_device: str,
                    world_size: int = 1) -> bool:
    if not report.check(f"{name} exits 0", done.returncode == 0, f"{seconds:.1f} s" if done.returncode == 0
                        else tail(done.stderr)):
        return False
    ok, detail = finite_losses(run_dir)
    report.check(f"{name} losses finite", ok, detail)
    run = json.loads((run_dir / "run.json").read_text())
    report.check(f"{name} run.json device", run["device"] == want_device and run["world_size"] == world_size,
                 f"device {run['device']}, world size {run['world_size']} (want {want_device}, {world_size})")
    return report.check(f"{name} exported", (run_dir / "model.safetensors").is_file())


# ----------------------------------------------------------------------------- scripts


def check_scripts(report: Report, inputs: dict, work: Path, device: str, quick: bool) -> None:
    want = "cpu" if device == "cpu" else str(torch.device("cuda", torch.cuda.current_device()))
    steps = 4 if quick else 12
    common = ["--data", str(inputs["train"]), "--max-len", "96", "--batch-size", "4", "--lr", "3e-3",
              "--log-every", "1", "--no-progress", "--device", device]
    cpt = work / "cpt"
    lora = ["--model", str(inputs["base"]), "--lora-r", "8", "--lora-alpha", "16", "--max-steps", str(steps),
            "--save-every", str(steps // 2), "--eval-fraction", "0.2", "--eval-every", str(steps // 2)]
    done, s = run_script(["train_cpt.py", *lora, *common, "--out", str(cpt)])
    if not check_train_run(report, "train_cpt.py LoRA", done, s, cpt, want):
        return
    # --resume: the run without its final export continues from its last checkpoint
    reference = load_file(str(cpt / "model.safetensors"))
    (cpt / "model.safetensors").unlink()
    done, s = run_script(["train_cpt.py", *lora, *common, "--out", str(cpt), "--resume"])
    if check_train_run(report, "train_cpt.py --resume", done, s, cpt, want):
        resumed = load_file(str(cpt / "model.safetensors"))
        worst = max(((resumed[k].float() - reference[k].float()).abs().max() /
                     reference[k].float().abs().max().clamp(min=1e-12)).item() for k in reference)
        # CUDA backward kernels may reduce in another order; a wrong data position or mask differs by O(1)
        report.check("resume equals the uninterrupted run", worst <= 1e-3, f"largest relative difference {worst:.2e}")

    nproc = 2 if device != "cpu" and torch.cuda.device_count() >= 2 else 1
    dist_dir = work / "cpt-torchrun"
    done, s = run_script(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train_cpt.py",
                          *lora, *common[:-2], "--device", "cpu" if device == "cpu" else "cuda",
                          "--out", str(dist_dir)], env_extra={"OMP_NUM_THREADS": "1"})
    check_train_run(report, f"torchrun {nproc} process(es), --device {'cpu' if device == 'cpu' else 'cuda'}",
                    done, s, dist_dir,
                    "cpu" if device == "cpu" else "cuda:0", world_size=nproc)

    sft = work / "sft"
    done, s = run_script(["train_sft.py", "--model", str(cpt), "--data", str(inputs["sft"]), "--format", "messages",
                          "--max-len", "192", "--batch-size", "4", "--max-steps", str(steps), "--lr", "1e-3",
                          "--log-every", "1", "--no-progress", "--device", device, "--out", str(sft)])
    check_train_run(report, "train_sft.py", done, s, sft, want)
    model_dir = sft if (sft / "model.safetensors").is_file() else cpt

    results = work / "results.json"
    done, s = run_script(["evaluate.py", "--model", str(model_dir), "--task", f"perplexity:{inputs['ppl']}",
                          "--task", f"mc:{inputs['mc']}", "--batch-size", "4", "--max-len", "32",
                          "--mc-samples", "4", "--out", str(results), "--no-progress", "--device", device])
    if report.check("evaluate.py exits 0", done.returncode == 0,
                    f"{s:.1f} s" if done.returncode == 0 else tail(done.stderr)):
        got = json.loads(results.read_text())
        numbers = [v for task in got["tasks"].values() for v in task.get("metrics", {}).values()
                   if isinstance(v, (int, float))]
        report.check("evaluate.py metrics finite", bool(numbers) and all(math.isfinite(v) for v in numbers),
                     f"{len(numbers)} numbers")
        # --dtype auto: bf16 weights and autocast on a CUDA card with bf16; on a CPU packed bf16 weights where
        # it has native bf16, else packed fp32
        want_precision = ("bfloat16 weights, bfloat16 autocast" if device != "cpu" else
                          "bfloat16 weights (packed), bfloat16 autocast" if cpu_has_native_bf16()
                          else "float32 weights (packed), no autocast")
        report.check("evaluate.py device and precision", got["device"] == want and got["precision"] == want_precision,
                     f"{got['device']}, {got['precision']}")

    sampling = {
        "greedy": ["--prompt", "Ankara", "--max-new-tokens", "16", "--steps", "16", "--block-length", "8"],
        "threshold": ["--prompt", "Ankara", "--max-new-tokens", "16", "--steps", "16", "--block-length", "8",
                      "--threshold", "0.3"],
        "diffutron-long preset": ["--prompt", "Ankara", "--preset", "diffutron-long", "--seed", "0"],
        "cfg, two prompts": ["--prompt", "Ankara", "--prompt", "İstanbul Boğazı nerede?", "--max-new-tokens", "16",
                             "--steps", "16", "--block-length", "8", "--cfg-scale", "1.0"],
        "infill": ["--infill", "İstanbul <mask> <mask> <mask> Asya'yı ayırır.", "--steps", "3"],
    }
    for name, args in sampling.items():
        done, s = run_script(["sample.py", "--model", str(model_dir), *args, "--json", "--device", device])
        ok = done.returncode == 0
        if ok:
            try:
                json.loads(done.stdout.strip().splitlines()[-1])
            except (json.JSONDecodeError, IndexError):
                ok = False
        report.check(f"sample.py {name}", ok, f"{s:.1f} s" if ok else tail(done.stderr or done.stdout))


# ----------------------------------------------------------------------------- in-process checks


def check_padding(report: Report, inputs: dict, device: torch.device) -> None:
    """Real-token logits of a padded batch equal each row run alone, per SDPA backend."""
    precision = inference_precision("auto", device)
    model = precision.prepare(minidiff.load_model(inputs["base"]))
    tok = inputs["tok"]
    window = model.config.local_attention // 2
    lengths = [40, 3 * window // 2, 2]  # rows 1 and 2: padding queries with no key in their window
    S = max(lengths)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, tok.vocab_size, (len(lengths), S), generator=g)
    mask = (torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids, mask = ids.masked_fill(mask == 0, tok.pad_id).to(device), mask.to(device)
    backends = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        backends["cudnn"] = SDPBackend.CUDNN_ATTENTION
    # bf16 on CUDA: rows of another length may be tiled differently; a NaN or a masking error is O(1)
    rel = 2e-2 if precision.autocast_dtype is not None else 1e-5
    for name, backend in backends.items():
        try:
            with torch.no_grad(), precision.autocast(), sdpa_kernel([backend]):
                padded = model(ids, mask).float()
                alone = [model(ids[b:b + 1, :n]).float() for b, n in enumerate(lengths)]
        except RuntimeError as err:
            report.add("INFO", f"padded == unpadded, SDPA {name}", f"backend not usable here ({str(err)[:70]})")
            continue
        finite = bool(torch.isfinite(padded).all())
        worst = max(((padded[b, :n] - alone[b][0]).abs().max() / alone[b][0].abs().max()).item()
                    for b, n in enumerate(lengths))
        report.check(f"padded == unpadded, SDPA {name}", finite and worst <= rel,
                     f"finite everywhere: {finite}, largest relative difference {worst:.2e} (bound {rel:g})")


def model_shape(quick: bool) -> ModelConfig:
    """mmBERT-base's shape, or the tiny one with --quick."""
    return tiny_shape() if quick else mmbert_base()


def check_sampler(report: Report, device: torch.device, quick: bool) -> None:
    """No host sync inside denoise_step (CUDA), and its time per step at the model shape."""
    config = model_shape(quick)
    torch.manual_seed(0)
    precision = inference_precision("auto", device)
    with torch.device(device):  # initialised where it runs (300M parameters at full shape)
        model = precision.prepare(ModernBertMLM(config)).eval()
    B, prompt, L = 2, 32, 32
    T = prompt + 128
    rows = torch.randint(5, config.vocab_size, (B, prompt)).tolist()
    rows = [rows[0] + [config.mask_token_id] * 128, rows[1] + [config.mask_token_id] * 88]  # a padded row
    canvas = build_canvas(rows, [prompt] * B, 128, [prompt] * B, SamplerConfig(block_length=L),
                          mask_id=config.mask_token_id, eos_id=config.eos_token_id, device=device)
    positions = canvas.blocks[0]  # [B, L]
    counts = torch.full((B,), 2, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    variants = {"greedy": SamplerConfig(), "threshold": SamplerConfig(threshold=0.9),
                "temperature + penalty": SamplerConfig(temperature=0.5, repetition_penalty=1.2),
                "cfg": SamplerConfig(cfg_scale=1.0), "random remasking": SamplerConfig(remasking="random")}
    for name, sampler_config in variants.items():
        step = lambda: denoise_step(model.logits_at_positions, canvas.ids.clone(), canvas, positions,  # noqa: E731
                                    counts, sampler_config, generator)
        with torch.no_grad(), precision.autocast():
            step()  # warm-up: lazy initialisation may synchronise once
            if device.type != "cuda":
                report.add("INFO", f"sampler step without host sync ({name})", "needs CUDA; ran once on the CPU")
                continue
            torch.cuda.synchronize()
            try:
                torch.cuda.set_sync_debug_mode("error")
                step()
                ok, detail = True, "no synchronising call"
            except RuntimeError as err:
                ok, detail = False, str(err)[:200]
            finally:
                torch.cuda.set_sync_debug_mode(0)
        report.check(f"sampler step without host sync ({name})", ok, detail)
    # time per step: the greedy step at this shape
    repeats = 3 if quick else 20

    def steps(n: int) -> None:
        for _ in range(n):
            denoise_step(model.logits_at_positions, canvas.ids.clone(), canvas, positions, counts,
                         SamplerConfig(), generator)

    with torch.no_grad(), precision.autocast():
        steps(2)  # warm-up
        ms = 1000 * timed(lambda: steps(repeats), device)[1] / repeats
    shape = "tiny model" if quick else "mmBERT-base shape"
    report.add("INFO", "sampler ms/step", f"{ms:.2f} ms ({shape}, batch {B}, canvas {T}, block {L}, {precision.describe()})")


def check_sampler_caches(report: Report, device: torch.device, quick: bool) -> None:
    """ms per sampler step of `generate` at batch 1 and 8 for each cache mode, eager and compiled
    (compiled on CUDA only: on the CPU, compiling the full shape would take minutes)."""
    config = model_shape(quick)
    torch.manual_seed(0)
    precision = inference_precision("auto", device)
    with torch.device(device):
        model = precision.prepare(ModernBertMLM(config)).eval()
    new_tokens = 32 if quick else 128  # diffutron-long: one token per step, blocks of 32
    settings = dict(max_new_tokens=new_tokens, steps=new_tokens, block_length=32, repetition_penalty=1.2)
    compiled = [False, True] if device.type == "cuda" else [False]
    for batch in (1, 8):
        prompts = [torch.randint(5, config.vocab_size, (64 - 3 * r,)).tolist() for r in range(batch)]
        for cache in ("none", "prefix", "dual"):
            for compile_step in compiled:
                sampler_config = SamplerConfig(cache=cache, compile=compile_step, **settings)
                run = lambda: generate(model, prompts, sampler_config, mask_id=config.mask_token_id,  # noqa: E731
                                       eos_id=config.eos_token_id)
                with torch.no_grad(), precision.autocast():
                    run()  # warm-up (and compilation)
                    out, seconds = timed(run, device)
                ms = 1000 * seconds / max(out.num_forward, 1)
                mode = "compiled" if compile_step else "eager"
                report.add("INFO", f"sampler ms/step, cache {cache}, {mode}, batch {batch}",
                           f"{ms:.2f} ms ({out.num_forward} steps, {new_tokens} new tokens, "
                           f"{precision.describe()})")


def check_training_syncs(report: Report, inputs: dict, device: torch.device) -> None:
    """How many host synchronisations one CPT micro-batch (loss forward + backward) makes; the
    loop adds none per micro-batch (one per optimizer step: is the step finite). Reported, not
    asserted: the loss internals may still index rows."""
    if device.type != "cuda":
        report.add("INFO", "host syncs in one CPT micro-batch", "needs CUDA")
        return
    model = minidiff.load_model(inputs["base"]).to(device).train()
    ids = torch.randint(5, inputs["tok"].vocab_size, (4, 64), device=device)
    attention = torch.ones_like(ids)
    attention[1:, 40:] = 0
    batch = {"input_ids": ids, "maskable": attention.bool(), "attention_mask": attention}
    loss_fn = trainer.nelbo_objective(inputs["tok"].mask_id)
    generator = torch.Generator(device=device).manual_seed(0)
    for _ in range(2):  # the first pass may initialise lazily
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with training_autocast(device, True):
                    loss, weight = loss_fn(model, batch, generator)
                (loss.float() * weight).backward()
            finally:
                torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message).splitlines()[0][:80] for w in seen if "synchroniz" in str(w.message).lower()]
    report.add("INFO", "host syncs in one CPT micro-batch", f"{len(syncs)}" + (f" (first: {syncs[0]})" if syncs else ""))


def cpt_micro_batch_peak(device: torch.device, quick: bool, batch: int, seq: int, checkpointing: bool) -> float | None:
    """Peak GiB of one LoRA CPT micro-batch (forward + backward of the NELBO at iid t, bf16
    autocast, fp32 weights included, no optimizer state); None: out of memory."""
    config = model_shape(quick)
    torch.manual_seed(0)
    with torch.device(device):
        model = ModernBertMLM(config)
    lora.apply_lora(model, r=8 if quick else 256, alpha=8 if quick else 256, dropout=0.05)
    model.train()
    model.model.gradient_checkpointing = checkpointing
    loss_fn = trainer.nelbo_objective(config.mask_token_id)
    ids = torch.randint(5, config.vocab_size, (batch, seq), device=device)
    batch_dict = {"input_ids": ids, "maskable": torch.ones_like(ids, dtype=torch.bool),
                  "attention_mask": torch.ones_like(ids)}
    generator = torch.Generator(device=device).manual_seed(0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with training_autocast(device, True):
            loss, weight = loss_fn(model, batch_dict, generator)
        (loss.float() * weight).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        del model
    if not math.isfinite(float(loss.detach())):
        raise RuntimeError("the loss of the CPT micro-batch is not finite")
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def check_memory(report: Report, device: torch.device, quick: bool) -> None:
    shape = "tiny model" if quick else "mmBERT-base shape, LoRA r=256"
    seq = 64 if quick else 512
    for checkpointing in (False, True):
        for batch in ((2,) if quick else (64, 16)):
            peak = cpt_micro_batch_peak(device, quick, batch, seq, checkpointing)
            label = f"CPT micro-batch {batch} x {seq}{' + gradient checkpointing' if checkpointing else ''}"
            if peak is None:
                report.add("INFO", label, f"does not fit in {torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB")
                continue
            detail = f"peak {peak:.2f} GiB ({shape})" if device.type == "cuda" else f"ran ({shape}; peak memory needs CUDA)"
            report.add("INFO", label, detail)
            break  # 16 x 512 only when 64 x 512 does not fit
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- main


# the parts, in the order they run: name -> run(report, inputs, work, device, quick)
PARTS = [
    ("scripts", lambda report, inputs, work, device, quick: check_scripts(report, inputs, work, str(device), quick)),
    ("padding", lambda report, inputs, work, device, quick: check_padding(report, inputs, device)),
    ("sampler", lambda report, inputs, work, device, quick: check_sampler(report, device, quick)),
    ("sampler-caches", lambda report, inputs, work, device, quick: check_sampler_caches(report, device, quick)),
    ("training-syncs", lambda report, inputs, work, device, quick: check_training_syncs(report, inputs, device)),
    ("memory", lambda report, inputs, work, device, quick: check_memory(report, device, quick)),
]


def run_parts(report: Report, inputs: dict, work: Path, device: torch.device, args) -> None:
    """Every part not in --skip; a crash in one part is a failed check, the others still run."""
    for name, part in PARTS:
        if name in args.skip:
            continue
        try:
            part(report, inputs, work, device, args.quick)
        except Exception as err:
            traceback.print_exc()
            report.check(f"{name} part ran", False, f"{type(err).__name__}: {err}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --quick: a smoke run)")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few steps (the CPU smoke mode)")
    p.add_argument("--out", default=None, help="keep the work directory here (default: a temporary one)")
    p.add_argument("--skip", nargs="*", default=[], choices=[name for name, _ in PARTS], help="parts to leave out")
    p.add_argument("--json", metavar="PATH", help="also write every check (status, name, detail) here as JSON")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    check_available(device)
    enable_tf32(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    print(banner(device) + ("" if device.type == "cuda" else "; on the CPU, CUDA-only checks are reported as INFO"))
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    report = Report()
    try:
        _, seconds = timed(lambda: run_parts(report, build_inputs(work), work, device, args))
    finally:
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)
    failed = report.failed()
    counts = {status: sum(s == status for s, _, _ in report.rows) for status in ("PASS", "FAIL", "INFO")}
    print(f"\nsummary: {counts['PASS']} passed, {len(failed)} failed, {counts['INFO']} info, {seconds:.0f} s")
    for name in failed:
        print(f"  FAILED: {name}")
    write_results(args.json, {"device": str(device), "quick": args.quick, "seconds": seconds,
                              "checks": [{"status": s, "name": n, "detail": d} for s, n, d in report.rows]}, device)
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(main)
