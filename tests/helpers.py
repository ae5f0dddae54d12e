"""Small models, tokenizers and model directories the tests build for themselves (no network).

    tiny_config(**overrides)        a ModelConfig a test can run in milliseconds
    tiny_model(seed, **overrides)   a ModernBertMLM with random weights, norms and biases perturbed
    hf_twin(model)                  the transformers ModernBertForMaskedLM holding the same weights
    make_tokenizer_dir(path)        tokenizer.json (+ configs) with mmBERT's special-token layout
    make_model_dir(path, seed)      tokenizer + config.json + model.safetensors: a loadable model dir
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import data_oracle as oracle
import torch

from minidiff.data.batches import Batches, collate_cpt
from minidiff.data.tokenizer import tokenize_documents
from minidiff.model import ModelConfig, ModernBertMLM
from minidiff.plumbing.checkpoint import save_pretrained

# mmBERT's special-token layout (mmBERT 2509.06888; tokenizer of jhu-clsp/mmBERT-base).
RESERVED_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
PAD, EOS, BOS, UNK, MASK = range(5)

TURKISH_TEXT = [
    "Türkiye Cumhuriyeti 1923 yılında kuruldu ve başkenti Ankara oldu.",
    "İstanbul Boğazı Avrupa ile Asya'yı birbirinden ayırır.",
    "Çocuklar okul bahçesinde neşeyle oyun oynuyorlardı.",
    "Güneşli bir günde ağaçların gölgesinde kitap okumak çok güzeldir.",
    "Öğretmenimiz bize ışığın hızını ve ses dalgalarını anlattı.",
    "Şehrin sokaklarında yürürken eski dostumla karşılaştım.",
    "Ilık bir rüzgâr denizden esiyor, martılar gökyüzünde süzülüyordu.",
    "Yarın sabah erkenden kalkıp köye gideceğiz.",
    "Bu kitabı okuduktan sonra düşüncelerim tamamen değişti.",
    "Ekonomi, sağlık, spor ve siyaset haberleri her gün gazetede yer alır.",
    "Soru: Türkiye'nin başkenti neresidir? Cevap: Ankara.",
    "Ödevini bitirmeden dışarı çıkma, dedi annem gülümseyerek.",
]


def tiny_config(**overrides) -> ModelConfig:
    """mmBERT-like (pad 0, eos 1, bos 2, mask 4; both thetas 160000) but tiny."""
    base = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=2,
        max_position_embeddings=512,
        global_rope_theta=160000.0,
        local_rope_theta=160000.0,
        local_attention=8,
        global_attn_every_n_layers=3,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=BOS,
        cls_token_id=EOS,
        sep_token_id=EOS,
        mask_token_id=MASK,
    )
    base.update(overrides)
    return ModelConfig(**base)


def tiny_model(seed: int = 0, **overrides) -> ModernBertMLM:
    """Random weights (transformers' init), then norm weights and the decoder bias perturbed so
    that a test of those parameters can fail."""
    torch.manual_seed(seed)
    model = ModernBertMLM(tiny_config(**overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
            elif "tok_embeddings" in name:
                p.mul_(25.0)  # std 0.5: logits far from uniform, so tests see real preferences
    return model.eval()


def hf_twin(model: ModernBertMLM, attn_implementation: str = "eager"):
    """A transformers ModernBertForMaskedLM with the same config and weights."""
    import transformers

    hf_config = transformers.ModernBertConfig(**model.config.to_dict())
    hf_config._attn_implementation = attn_implementation
    hf = transformers.ModernBertForMaskedLM(hf_config)
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"decoder.weight"}, missing
    hf.tie_weights()
    return hf.eval()


def make_tokenizer_dir(path, vocab_size: int = 300, texts=None) -> Path:
    """Train a small byte-fallback BPE (▁ for spaces) with mmBERT's specials, framing
    `<bos> text <eos>`, and write tokenizer.json, tokenizer_config.json, special_tokens_map.json."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=RESERVED_TOKENS, show_progress=False)
    tok.train_from_iterator(texts or TURKISH_TEXT * 4, trainer)
    # byte-fallback pieces <0x00>..<0xFF> are ordinary vocabulary entries (as in Gemma's file)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(256):
        vocab.setdefault(f"<0x{i:02X}>", len(vocab))
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", pair="<bos> $A <eos> $B <eos>",
        special_tokens=[("<bos>", BOS), ("<eos>", EOS)],
    )
    tok.save(str(path / "tokenizer.json"))
    special_map = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>",
                   "unk_token": "<unk>", "mask_token": "<mask>"}
    (path / "special_tokens_map.json").write_text(json.dumps(special_map), encoding="utf-8")
    (path / "tokenizer_config.json").write_text(
        json.dumps({**special_map, "model_max_length": 8192}), encoding="utf-8"
    )
    return path


def make_model_dir(path, seed: int = 0, **overrides) -> Path:
    """A directory minidiff.load_model and load_tokenizer both read: tokenizer files, config.json
    and model.safetensors of a tiny random model sized to the tokenizer's vocabulary."""
    from tokenizers import Tokenizer

    path = make_tokenizer_dir(path)
    vocab = Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab_size()
    model = tiny_model(seed, vocab_size=vocab, **overrides)
    save_pretrained(model, path)
    return path


def assert_close_rel(got: torch.Tensor, want: torch.Tensor, rel: float, what: str = "") -> None:
    """max |got - want| <= rel * max |want|: a tolerance scaled to the magnitudes compared, so
    the same bound holds for logits of size 10 and gradients of size 100 on any CPU."""
    scale = want.detach().abs().max().item()
    err = (got.detach() - want.detach()).abs().max().item()
    assert err <= rel * scale, f"{what}: max difference {err:.3g} > {rel:g} x max |value| {scale:.3g}"


# a train_cpt.py run that hangs when it fetches micro-batch hang_after + 1 (a test SIGKILLs it there)
KILL_HARNESS = """
import sys, time
from minidiff.data.batches import Batches
original = Batches.__next__
fetched = [0]
def next_then_hang(self):
    fetched[0] += 1
    if fetched[0] > {hang_after}:
        time.sleep(3600)  # the test SIGKILLs the process here
    return original(self)
Batches.__next__ = next_then_hang
import train_cpt
from minidiff.errors import run_cli
sys.argv = ["train_cpt.py"] + {argv!r}
run_cli(train_cpt.main)
"""


def train_cpt_killed_and_full(common: list[str], full_out: Path, killed_out: Path, workdir: Path, *, env: dict,
                              hang_after: int = 10, checkpoint: str = "step-000004") -> None:
    """Run `train_cpt.py *common` twice at once: to the end into `full_out`, and into `killed_out`
    SIGKILLed once its `checkpoint` exists (it hangs fetching micro-batch hang_after + 1). Returns
    when the full run has ended; the killed run left no final model."""
    import signal
    import subprocess
    import time

    root = Path(__file__).resolve().parents[1]
    harness = workdir / "harness.py"
    harness.write_text(KILL_HARNESS.format(hang_after=hang_after, argv=[*common, "--out", str(killed_out)]))
    full = subprocess.Popen([sys.executable, "train_cpt.py", *common, "--out", str(full_out)], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen([sys.executable, str(harness)], cwd=root, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (killed_out / "checkpoints" / checkpoint).is_dir():
            assert victim.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.2)
        time.sleep(0.5)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert victim.returncode == -signal.SIGKILL
    assert not (killed_out / "model.safetensors").exists()
    assert full.wait(timeout=240) == 0, full.stderr.read()


def cpt_batches(tok, batch_size: int = 3, max_len: int = 48):
    """A resumable stream of CPT batches of TURKISH_TEXT (documents over max_len dropped)."""
    ids = tokenize_documents(TURKISH_TEXT, tok)
    examples = oracle.cpt_examples(ids, max_len, "drop", eos_id=tok.eos_id, bos_id=tok.bos_id)
    return Batches(examples, batch_size, seed=0, collate=lambda b: collate_cpt(b, tok.pad_id))
