"""Token shards under faults users met: damaged files of the same size, ids outside the
vocabulary, a truncated file, a garbage manifest, a source that changes while it is tokenised,
`prepare --out` into another source's shards, a CSV field over csv's 128 kB default, temporary
directories of dead preparations, carriage returns in a log, and processes of one torchrun job.

Each fault is made by the test at a point it chooses (a byte it flips, a reader it patches to
change the source after the first batch), never by timing. The expected data is the source read
and tokenised by the list pipeline (readers.read_documents -> tokenize_documents); the expected
hashes come from hashlib over the file's bytes. A cache entry that fails is rebuilt and then
holds that data; a prepared directory that fails is refused with one sentence (in a subprocess:
exit status 2, one stderr line starting "error:", no traceback), and nothing half-written is
left that a reader would take for an entry.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import TURKISH_TEXT, make_model_dir

from minidiff.data import readers, shards
from minidiff.data.tokenizer import load_tokenizer, tokenize_documents
from minidiff.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
CPT = shards.cpt_options()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    model = make_model_dir(root / "model", seed=0)  # tokenizer files + a tiny model (train_cpt.py needs one)
    a = root / "a.txt"
    a.write_text("\n".join(f"{i}. {TURKISH_TEXT[i % 12]} {TURKISH_TEXT[(7 * i) % 12]}" for i in range(120)) + "\n",
                 encoding="utf-8")
    b = root / "b.txt"
    b.write_text("\n".join(reversed(TURKISH_TEXT)) + "\n", encoding="utf-8")
    rows = root / "rows.jsonl"
    rows.write_text("".join(json.dumps({"instruction": q, "output": r}, ensure_ascii=False) + "\n"
                            for q, r in zip(TURKISH_TEXT, TURKISH_TEXT[1:])), encoding="utf-8")
    return {"root": root, "model": model, "tok": load_tokenizer(model), "a": a, "b": b, "rows": rows}


def source_ids(path, tok) -> list[list[int]]:
    return tokenize_documents(readers.read_documents(path).texts, tok)


def entry_ids(entry) -> list[list[int]]:
    return [entry.tokens[entry.offsets[d]:entry.offsets[d + 1]].tolist() for d in range(entry.num_documents)]


def blake2b(path: Path) -> str:
    return hashlib.blake2b(path.read_bytes(), digest_size=20).hexdigest()


def rehash(folder: Path) -> None:
    """Rewrite the manifest's sizes and hashes for the files as they are now: a damaged entry
    whose manifest agrees with it, so only the content checks can catch it."""
    manifest = json.loads((folder / shards.MANIFEST).read_text())
    for name in manifest["files"]:
        manifest["files"][name] = {"size": (folder / name).stat().st_size, "blake2b": blake2b(folder / name)}
    (folder / shards.MANIFEST).write_text(json.dumps(manifest))


def patch(folder: Path, name: str, index: int, value: int, dtype) -> None:
    """Set element `index` of `name` (read as `dtype`) to `value`, in place: same size."""
    array = np.fromfile(folder / name, dtype=dtype)
    array[index] = value
    array.tofile(folder / name)


def flip_token_byte(folder, tok):
    raw = bytearray((folder / "tokens.bin").read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (folder / "tokens.bin").write_bytes(bytes(raw))


def shift_one_offset(folder, tok):
    offsets = np.fromfile(folder / "offsets.bin", dtype=np.int64)
    patch(folder, "offsets.bin", 5, offsets[5] + 1, np.int64)


def id_beyond_vocab(folder, tok):
    patch(folder, "tokens.bin", 3, tok.vocab_size, np.uint16)
    rehash(folder)


def decreasing_offset(folder, tok):
    patch(folder, "offsets.bin", 7, 0, np.int64)
    rehash(folder)


def last_offset_short(folder, tok):
    offsets = np.fromfile(folder / "offsets.bin", dtype=np.int64)
    patch(folder, "offsets.bin", -1, offsets[-1] - 1, np.int64)
    rehash(folder)


def truncate_tokens(folder, tok):
    raw = (folder / "tokens.bin").read_bytes()
    (folder / "tokens.bin").write_bytes(raw[:-2])


def garbage_manifest(folder, tok):
    (folder / shards.MANIFEST).write_bytes(b"\x00{not json")


FAULTS = {  # fault -> words of the one sentence that names it
    flip_token_byte: "tokens.bin does not match its hash",
    shift_one_offset: "offsets.bin does not match its hash",
    id_beyond_vocab: "token id",
    decreasing_offset: "offsets.bin decreases",
    last_offset_short: "offsets.bin runs from 0 to",
    truncate_tokens: "tokens.bin has",
    garbage_manifest: "manifest.json is not readable JSON",
}


def test_manifest_records_each_file_size_and_hash(setup, tmp_path):
    for source, kind, options in [(setup["a"], "cpt", CPT), (setup["rows"], "sft", shards.sft_options("alpaca"))]:
        entry = shards.prepare(source, kind, options, setup["tok"], cache_dir=tmp_path)
        names = {"tokens.bin", "offsets.bin"} | ({"prompt_lengths.bin"} if kind == "sft" else set())
        assert set(entry.manifest["files"]) == names
        for name in names:
            assert entry.manifest["files"][name] == {"size": (entry.path / name).stat().st_size,
                                                     "blake2b": blake2b(entry.path / name)}
            assert shards.file_hash(entry.path / name) == blake2b(entry.path / name)


@pytest.mark.parametrize("fault", list(FAULTS), ids=lambda f: f.__name__)
def test_a_damaged_cache_entry_is_rebuilt_and_holds_the_source(setup, tmp_path, capsys, fault):
    tok = setup["tok"]
    first = shards.prepare(setup["a"], "cpt", CPT, tok, cache_dir=tmp_path)
    fault(first.path, tok)
    capsys.readouterr()
    rebuilt = shards.prepare(setup["a"], "cpt", CPT, tok, cache_dir=tmp_path)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and FAULTS[fault] in lines[0] and f"tokenising {setup['a']} again" in lines[0], lines
    assert rebuilt.path == first.path and entry_ids(rebuilt) == source_ids(setup["a"], tok)
    assert rebuilt.manifest["documents"] == 120 and rebuilt.manifest["entry_id"] != first.manifest["entry_id"]
    shards.verify_entry(rebuilt, tok.vocab_size)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [first.path.name]


@pytest.mark.parametrize("fault", list(FAULTS), ids=lambda f: f.__name__)
def test_a_damaged_prepared_directory_is_refused(setup, tmp_path, fault):
    out = tmp_path / "prepared"
    shards.prepare(setup["a"], "cpt", CPT, setup["tok"], out=out)
    fault(out, setup["tok"])
    with pytest.raises(UserError) as info:
        shards.open_source(out, "cpt", CPT, setup["tok"])
    assert FAULTS[fault] in str(info.value) and "prepare it again" in str(info.value)
    assert "\n" not in str(info.value)


def test_a_prompt_length_beyond_its_row_is_refused(setup, tmp_path):
    out = tmp_path / "sft"
    entry = shards.prepare(setup["rows"], "sft", shards.sft_options("alpaca"), setup["tok"], out=out)
    patch(out, "prompt_lengths.bin", 2, entry.lengths[2] + 1, np.int64)
    rehash(out)
    with pytest.raises(UserError, match="prompt_lengths.bin holds a prompt length outside"):
        shards.open_prepared(out, "sft", shards.sft_options("alpaca"), setup["tok"])


def test_a_shard_directory_of_the_older_format_is_refused(setup, tmp_path):
    out = tmp_path / "old"
    shards.prepare(setup["a"], "cpt", CPT, setup["tok"], out=out)
    manifest = json.loads((out / shards.MANIFEST).read_text())
    (out / shards.MANIFEST).write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(UserError, match=f"shard format 1; this minidiff reads format {shards.FORMAT_VERSION}"):
        shards.open_prepared(out, "cpt", CPT, setup["tok"])


def one_error_line(done: subprocess.CompletedProcess) -> str:
    """The single stderr line of a run that ended with a UserError."""
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("error: ")
    return done.stderr


def run(args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow  # one python + torch start-up
def test_training_on_a_damaged_prepared_directory_stops_with_one_sentence(setup, tmp_path):
    out = tmp_path / "prepared"
    shards.prepare(setup["a"], "cpt", CPT, setup["tok"], out=out)
    flip_token_byte(out, setup["tok"])
    done = run(["train_cpt.py", "--model", setup["model"], "--data", out, "--out", tmp_path / "run",
                "--max-steps", "1", "--max-len", "32", "--no-progress"], timeout=240)
    assert f"error: {out} failed verification: tokens.bin does not match its hash" in one_error_line(done)
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_prepare_out_refuses_another_sources_shards_unless_overwrite(setup, tmp_path, capsys):
    out, tok_dir = tmp_path / "wiki", str(setup["model"])
    assert shards.main(["prepare", "--tokenizer", tok_dir, "--data", str(setup["a"]), "--out", str(out),
                        "--no-progress"]) == 0
    before = {name: blake2b(out / name) for name in ("tokens.bin", "offsets.bin", shards.MANIFEST)}
    done = run(["-m", "minidiff.data.shards", "prepare", "--tokenizer", tok_dir, "--data", setup["b"], "--out", out])
    assert "holds token shards of other data (their sources differ" in one_error_line(done)
    assert "--overwrite" in done.stderr
    assert {name: blake2b(out / name) for name in before} == before  # untouched
    again = run(["-m", "minidiff.data.shards", "prepare", "--tokenizer", tok_dir, "--data", setup["a"], "--out", out,
                 "--kind", "sft"])
    assert "their kind, options differ" in one_error_line(again)

    capsys.readouterr()
    assert shards.main(["prepare", "--tokenizer", tok_dir, "--data", str(setup["a"]), "--out", str(out),
                        "--no-progress"]) == 0  # the same data: reused
    assert {name: blake2b(out / name) for name in before} == before and capsys.readouterr().err.count("\n") == 1
    assert shards.main(["prepare", "--tokenizer", tok_dir, "--data", str(setup["b"]), "--out", str(out),
                        "--no-progress", "--overwrite"]) == 0
    assert entry_ids(shards.open_prepared(out, "cpt", CPT, setup["tok"])) == source_ids(setup["b"], setup["tok"])
    assert not list(tmp_path.glob(".tmp-*"))


CHANGING = """
import sys
from minidiff.data import readers, shard_writer, shards
from minidiff.errors import run_cli
shard_writer.BATCH_DOCUMENTS = 10
source = sys.argv[1]
original = readers.iter_documents
def read_then_change(*args, **kwargs):  # the source gains a line once the first batch is read
    for number, text in enumerate(original(*args, **kwargs), start=1):
        yield text
        if number == shard_writer.BATCH_DOCUMENTS:
            with open(source, "a", encoding="utf-8") as handle:
                handle.write("Yeni eklenen satır.\\n")
readers.iter_documents = read_then_change
sys.argv = ["minidiff.data.shards", "prepare", "--no-progress", "--tokenizer", sys.argv[2], "--data", source] + sys.argv[3:]
run_cli(shards.main)
"""


@pytest.mark.parametrize("where", ["out", "cache"])
def test_a_source_changed_while_tokenising_publishes_nothing(setup, tmp_path, where):
    source = tmp_path / "growing.txt"
    source.write_bytes(setup["a"].read_bytes())
    harness = tmp_path / "changing.py"
    harness.write_text(CHANGING)
    target = ["--out", tmp_path / "out" / "growing"] if where == "out" else ["--cache-dir", tmp_path / "cache"]
    done = run([harness, source, setup["model"], *target])
    assert f"error: {source} changed while it was being tokenised, so nothing was saved" in one_error_line(done)
    assert source.read_text(encoding="utf-8").endswith("Yeni eklenen satır.\n")  # the change did happen
    folder = tmp_path / where
    assert [p.name for p in folder.iterdir() if not p.name.endswith(".lock")] == []  # no entry, no temporary
    entry = shards.prepare(source, "cpt", CPT, setup["tok"], cache_dir=tmp_path / "cache",
                           out=tmp_path / "out" / "growing" if where == "out" else None)
    assert entry_ids(entry) == source_ids(source, setup["tok"]) and entry.manifest["documents"] == 121


def test_csv_with_a_200_kb_field(setup, tmp_path):
    long_text = " ".join(TURKISH_TEXT) * 260  # ~200 kB
    assert len(long_text.encode()) > 200_000
    source = tmp_path / "big.csv"
    source.write_text(f'id,text\n1,"{long_text}"\n2,Kısa satır.\n', encoding="utf-8")
    entry = shards.prepare(source, "cpt", CPT, setup["tok"], cache_dir=tmp_path / "cache")
    expected = [setup["tok"].encode(text, add_special_tokens=False) for text in (long_text, "Kısa satır.")]
    assert entry_ids(entry) == [list(ids) for ids in expected]


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


@pytest.mark.parametrize("where", ["out", "cache"])
@pytest.mark.parametrize("entry_exists", [False, True])
def test_temporaries_of_dead_preparations_are_removed_at_start(setup, tmp_path, where, entry_exists):
    folder = tmp_path / "shards"
    kwargs = {"out": folder / "wiki"} if where == "out" else {"cache_dir": folder}
    if entry_exists:
        shards.prepare(setup["a"], "cpt", CPT, setup["tok"], **kwargs)
    host = socket.gethostname().replace("-", "_")  # temporaries are .tmp-NAME-HOST-PID
    dead = folder / f".tmp-wiki-{host}-{dead_pid()}"
    alive = folder / f".tmp-wiki-{host}-{os.getppid()}"  # a live process, not this writer
    elsewhere = folder / f".tmp-wiki-otherhost-{dead_pid()}"
    for tmp in (dead, alive, elsewhere):
        tmp.mkdir(parents=True)
        (tmp / "tokens.bin").write_bytes(b"\0" * 10)
    entry = shards.prepare(setup["a"], "cpt", CPT, setup["tok"], **kwargs)
    assert not dead.exists() and alive.exists() and elsewhere.exists()
    assert entry_ids(entry) == source_ids(setup["a"], setup["tok"])


def test_progress_in_a_log_is_plain_lines(setup, tmp_path):
    done = run(["-m", "minidiff.data.shards", "prepare", "--tokenizer", setup["model"], "--data", setup["a"],
                "--cache-dir", tmp_path])  # stderr is a pipe: not a terminal
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr and "\r" not in done.stdout
    assert f"tokenising {setup['a']}: 120 docs" in done.stderr.splitlines()


OPEN_SOURCE = """
import sys
from minidiff.data import shards
from minidiff.data.tokenizer import load_tokenizer
entry = shards.open_source(sys.argv[1], "cpt", shards.cpt_options(), load_tokenizer(sys.argv[2]),
                           cache_dir=sys.argv[3], progress=True)
print(entry.path, entry.content_key, flush=True)
"""


def test_processes_of_one_job_prepare_through_the_lock_without_a_barrier(setup, tmp_path):
    harness = tmp_path / "open_source.py"
    harness.write_text(OPEN_SOURCE)
    cache = tmp_path / "cache"
    runs = [subprocess.Popen([sys.executable, str(harness), str(setup["a"]), str(setup["model"]), str(cache),
                              str(rank)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for rank in (0, 1)]
    outputs = [r.communicate(timeout=120) for r in runs]
    assert [r.returncode for r in runs] == [0, 0], [err for _, err in outputs]
    assert outputs[0][0] == outputs[1][0]  # the same entry and content
    assert sum(f"tokenising {setup['a']}" in err for _, err in outputs) == 1  # one process tokenised
    entries = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and entry_ids(shards.load_entry(entries[0])) == source_ids(setup["a"], setup["tok"])


def test_content_key_names_the_data_an_entry_holds(setup, tmp_path):
    tok = setup["tok"]
    cached = shards.prepare(setup["a"], "cpt", CPT, tok, cache_dir=tmp_path / "cache")
    prepared = shards.prepare(setup["a"], "cpt", CPT, tok, out=tmp_path / "out")  # written again, elsewhere
    other = shards.prepare(setup["b"], "cpt", CPT, tok, cache_dir=tmp_path / "cache")
    assert cached.content_key == prepared.content_key and cached.path != prepared.path
    assert cached.content_key.startswith(cached.manifest["key"] + "-")
    assert other.content_key != cached.content_key
    patch(prepared.path, "tokens.bin", 0, prepared.tokens[0] + 1, np.uint16)  # other ids, manifest made to agree
    rehash(prepared.path)
    changed = shards.load_entry(prepared.path)
    assert changed.manifest["key"] == cached.manifest["key"] and changed.content_key != cached.content_key
