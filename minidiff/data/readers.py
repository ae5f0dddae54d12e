"""File readers: documents (CPT) and rows (SFT) from .txt, .jsonl, .json, .csv and .parquet files,
directories of them and hub datasets, one small reader per format. A line or row a reader cannot
use is skipped and listed as "FILE:LINE: what"; docs/training.md, "Data".
"""
from __future__ import annotations

import csv
import io
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import huggingface_hub

from minidiff.errors import UserError

TEXT_EXTENSIONS = (".txt",)
ROW_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
SUPPORTED_EXTENSIONS = TEXT_EXTENSIONS + ROW_EXTENSIONS
HF_PREFIX = "hf://"

_BAD_BYTES = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of invalid UTF-8 bytes


def _listing(text: str, problems: list[str], show: int) -> str:
    return "\n  ".join([text] + problems[:show] + (["..."] if len(problems) > show else []))


@dataclass
class ReadResult:
    texts: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # "FILE:LINE: what"
    files: list[str] = field(default_factory=list)

    def summary(self, show: int = 5) -> str:
        text = f"read {len(self.texts):,} documents from {len(self.files)} file(s)"
        if not self.problems:
            return text + "; nothing skipped"
        kinds = Counter(p.rsplit(": ", 1)[-1] for p in self.problems)
        text += f"; skipped {len(self.problems):,} (" + ", ".join(f"{n:,} {k}" for k, n in kinds.items()) + ")"
        return _listing(text, self.problems, show)


class Rows(list):
    """Row dicts, with where each came from and what was skipped."""

    def __init__(self, rows=(), where=(), problems=(), files=()):
        super().__init__(rows)
        self.where = list(where)        # "FILE:LINE" (or "FILE:row N") of each row
        self.problems = list(problems)  # "FILE:LINE: what"
        self.files = list(files)

    def summary(self, show: int = 5) -> str:
        text = f"read {len(self):,} rows from {len(self.files)} file(s)"
        if not self.problems:
            return text + "; nothing skipped"
        return _listing(text + f"; skipped {len(self.problems):,}", self.problems, show)


def nothing_left(name: str, problems: list[str]) -> UserError:
    first = f"; the first: {problems[0]}" if problems else ""
    return UserError(f"no documents left in {name}: {len(problems):,} lines/rows were "
                     f"skipped{first}; expected at least one non-empty document")


def read_documents(source, *, field: str = "text", per: str = "line") -> ReadResult:
    """Text documents of `source`: one per .txt line (or file) or per row (column `field`)."""
    if per not in ("line", "file", "row"):
        raise UserError(f"per={per!r} is not a document unit; expected 'line', 'file' or 'row'")
    paths = resolve_sources(source)
    result = ReadResult(files=[str(path) for path in paths])
    result.texts = list(iter_documents(paths, result.problems, field=field, per=per))
    if not result.texts:
        raise nothing_left(source_name(source), result.problems)
    return result


def iter_documents(paths: Sequence[Path], problems: list[str], *, field: str = "text", per: str = "line"):
    """The documents of these files, streamed; skipped lines/rows appended to `problems`."""
    for path in paths:
        if path.suffix.lower() not in TEXT_EXTENSIONS:
            yield from _row_documents(path, field, problems)
        elif per == "file":
            yield from txt_file_document(path, problems)
        else:
            yield from txt_line_documents(path, problems)


def read_rows(source) -> Rows:
    """Rows (dicts) of row files, a directory of them or an hf:// dataset."""
    paths = resolve_sources(source)
    rows = Rows(files=[str(path) for path in paths])
    for where, row in iter_rows(paths, rows.problems):
        rows.append(row)
        rows.where.append(where)
    if not rows:
        raise UserError(f"no rows found in {source_name(source)} ({rows.summary(1)})")
    return rows


def iter_rows(paths: Sequence[Path], problems: list[str]):
    """("FILE:LINE", row dict) of every row; UserError before any row is read when a file is plain text."""
    readers = [_row_reader(path) for path in paths]
    return ((where, row) for path, read in zip(paths, readers) for where, row in read(path, problems))


def _unsupported(name) -> UserError:
    return UserError(f"{name} has an unsupported extension; expected one of {', '.join(SUPPORTED_EXTENSIONS)}")


def _row_reader(path: Path):
    suffix = path.suffix.lower()
    if suffix in TEXT_EXTENSIONS:
        raise UserError(f"{path} is plain text; rows must come from a .jsonl, .json, .csv or .parquet file")
    if suffix not in ROW_READERS:
        raise _unsupported(path)
    return ROW_READERS[suffix]


def _row_documents(path: Path, field: str, problems: list[str]):
    for where, row in _row_reader(path)(path, problems):
        value = row.get(field)
        if value is None:
            problems.append(f"{where}: no field '{field}'")
        elif not isinstance(value, str):
            problems.append(f"{where}: field '{field}' is not a string")
        elif not value.strip():
            problems.append(f"{where}: empty document")
        else:
            yield value


def resolve_sources(source) -> list[Path]:
    """The files a source names: a file, a directory (recursively, sorted, no hidden ones), an hf:// id, a list."""
    if isinstance(source, (list, tuple)):
        if not source:
            raise UserError("no data source given; expected at least one file, directory or hf:// id")
        return [p for s in source for p in resolve_sources(s)]
    text = str(source)
    if text.startswith(HF_PREFIX):
        return _files_in(download_hub_dataset(text), text)
    path = Path(text).expanduser()
    if path.is_dir():
        return _files_in(path, text)
    if not path.exists():
        raise UserError(f"data file {path} does not exist")
    if path.suffix.lower() not in SUPPORTED_EXTENSIONS:
        raise _unsupported(path)
    return [path]


def _files_in(path: Path, name: str) -> list[Path]:
    if path.is_file():
        if path.suffix.lower() not in SUPPORTED_EXTENSIONS:
            raise _unsupported(name)
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_EXTENSIONS
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise UserError(f"{name} contains no {', '.join(SUPPORTED_EXTENSIONS)} files")
    return files


def source_name(source) -> str:
    return ", ".join(map(str, source)) if isinstance(source, (list, tuple)) else str(source)


def download_hub_dataset(uri: str) -> Path:
    """The local path of `hf://datasets/ORG/NAME[/path]`, downloaded into the hub's cache."""
    parts = uri[len(HF_PREFIX):].strip("/").split("/")
    if len(parts) < 3 or parts[0] != "datasets" or not parts[1] or not parts[2]:
        raise UserError(f"{uri} is not a hub dataset id; expected hf://datasets/ORG/NAME[/path/in/repo]")
    repo_id, inner = f"{parts[1]}/{parts[2]}", "/".join(parts[3:])
    patterns = [inner, f"{inner}/*"] if inner else None
    try:
        local = huggingface_hub.snapshot_download(repo_id=repo_id, repo_type="dataset", allow_patterns=patterns)
    except Exception as err:  # offline, unknown repo, gated, HTTP errors: all user-facing
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"could not download {uri} from the Hugging Face hub ({reason}); "
                        "check the id and the network, or pass a local file") from None
    path = Path(local) / inner if inner else Path(local)
    if not path.exists():
        raise UserError(f"{uri}: the dataset repo {repo_id} has no file or folder '{inner}'")
    return path


def _utf8_lines(path: Path, problems: list[str]):
    """(number, line) of each valid UTF-8 line, streamed and split on "\\n" only."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):  # binary iteration splits on b"\n" only
            line = raw.removesuffix(b"\n").decode("utf-8", errors="surrogateescape")
            if _BAD_BYTES.search(line):
                problems.append(f"{path}:{number}: invalid UTF-8")
            else:
                yield number, line


def txt_line_documents(path: Path, problems: list[str]):
    """.txt, one document per line ("\\r\\n" endings too); invalid UTF-8 and blank lines skipped."""
    for number, line in _utf8_lines(path, problems):
        if line.rstrip("\r").strip():
            yield line.rstrip("\r")
        else:
            problems.append(f"{path}:{number}: empty document")


def txt_file_document(path: Path, problems: list[str]):
    text = "\n".join(line.rstrip("\r") for _, line in _utf8_lines(path, problems))
    if text.strip():
        yield text
    else:
        problems.append(f"{path}:1: empty document")


def jsonl_rows(path: Path, problems: list[str]):
    """.jsonl, one JSON object per line; blank lines are no rows."""
    for number, line in _utf8_lines(path, problems):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            problems.append(f"{path}:{number}: not valid JSON")
            continue
        if isinstance(row, dict):
            yield f"{path}:{number}", row
        else:
            problems.append(f"{path}:{number}: not a JSON object")


def json_rows(path: Path, problems: list[str]):
    """.json, a list of objects, or an object holding one such list ({"data": [...]})."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise UserError(f"{path}:{line}: invalid UTF-8 in a JSON file (it cannot be read around it; "
                        "JSONL files skip such lines)") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else [data]
    if not isinstance(data, list):
        raise UserError(f"{path} holds a JSON {type(data).__name__}; expected a list of objects")
    for index, row in enumerate(data, start=1):
        if isinstance(row, dict):
            yield f"{path}:item {index}", row
        else:
            problems.append(f"{path}:item {index}: not a JSON object")


def csv_rows(path: Path, problems: list[str]):
    """.csv with a header line; a record's place is the line it starts on; fields of any size."""
    try:
        csv.field_size_limit(sys.maxsize)
    except OverflowError:  # a 32-bit C long (Windows)
        csv.field_size_limit(2**31 - 1)
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    start = 2
    for row in reader:
        where, start = f"{path}:{start}", reader.line_num + 1
        if any(_BAD_BYTES.search(v or "") for v in row.values() if isinstance(v, str)):
            problems.append(f"{where}: invalid UTF-8")
        else:
            yield where, {k: v for k, v in row.items() if k is not None}


def parquet_rows(path: Path, problems: list[str]):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading {path} needs pyarrow: pip install pyarrow (or minidiff[data])") from None
    try:
        table = pq.read_table(path)
    except Exception as err:
        raise UserError(f"{path} is not a readable parquet file ({err})") from None
    for index, row in enumerate(table.to_pylist(), start=1):
        yield f"{path}:row {index}", row


ROW_READERS = {".jsonl": jsonl_rows, ".json": json_rows, ".csv": csv_rows, ".parquet": parquet_rows}
