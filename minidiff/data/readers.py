"""Training data: read documents and rows, build CPT and SFT examples, collate, batch, shard.

References: Diffutron (arXiv 2603.20466: CPT drop rule, SFT stages), LLaDA (2502.09992, SFT:
the prompt is never masked). Matches dllm's data code (`tokenize_and_group` for packing, the SFT
map function and `DataCollatorForSeq2Seq` padding) and HF `run_mlm`'s `group_texts`.

    docs = read_documents("wiki.txt")                            # one document per line
    print(docs.summary())                                        # kept / skipped, with FILE:LINE
    ids = tokenize_documents(docs.texts, tok)                    # no special tokens inside documents
    cpt = cpt_examples(ids, 512, mode="drop", eos_id=tok.eos_id, bos_id=tok.bos_id)
    sft, report = build_sft_examples(read_rows("sft.jsonl"), "alpaca", tok, 256)
    batches = Batches(sft, 16, seed=0, collate=lambda b: collate_sft(b, tok.pad_id))
    batch = next(batches)                                        # input_ids, labels, maskable

Conventions (dllm; docs/training.md):
- CPT "drop" frames each document as `<bos> doc <eos>` (mmBERT's post-processor) and keeps it
  only when it fits in max_len; "pack" writes `doc <eos> doc <eos> ...` and cuts full blocks.
- SFT: prompt = chat template up to and including the generation prompt "[Answer]\\n" (labels
  IGNORE: never masked, no loss); answer = the last assistant turn's content + "\\n[/Answer]\\n\\n".
  No special tokens (dllm's template has none); the prompt is tokenised alone, as a sampler
  sees it. The batch is right-padded with the pad token and the padding IS in the labels.
  The chat format itself (template, `sft_messages`, `render_sft`, `chat_prompt_ids`,
  `SFT_FORMATS`) lives in minidiff/data/chat.py; those names are re-exported here for old imports.
- One global step takes batch_size * world_size examples; rank r takes the r-th contiguous slice.
"""
from __future__ import annotations

import csv
import io
import json
import math
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from minidiff.data.chat import SFT_FORMATS, chat_prompt_ids, render_sft, sft_messages  # noqa: F401 (also re-exported)
from minidiff.errors import UserError

IGNORE = -100  # label of positions that carry no loss and are never masked (the SFT prompt)
TEXT_EXTENSIONS = (".txt",)
ROW_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
SUPPORTED_EXTENSIONS = TEXT_EXTENSIONS + ROW_EXTENSIONS
HF_PREFIX = "hf://"

_BAD_BYTES = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of invalid UTF-8 bytes


# ============================================================================ reading files


@dataclass
class ReadResult:
    """Documents read from one or more sources, plus every line/row that was skipped and why."""

    texts: list[str] = dc_field(default_factory=list)
    problems: list[str] = dc_field(default_factory=list)  # "FILE:LINE: what"
    files: list[str] = dc_field(default_factory=list)

    def summary(self, show: int = 5) -> str:
        """How many documents were kept, how many lines/rows were skipped (by reason), the first few."""
        text = f"read {len(self.texts):,} documents from {len(self.files)} file(s)"
        if not self.problems:
            return text + "; nothing skipped"
        kinds = Counter(p.rsplit(": ", 1)[-1] for p in self.problems)
        text += f"; skipped {len(self.problems):,} (" + ", ".join(f"{n:,} {k}" for k, n in kinds.items()) + ")"
        return "\n  ".join([text] + self.problems[:show] + (["..."] if len(self.problems) > show else []))


class Rows(list):
    """A list of row dicts that also remembers where each row came from and what was skipped."""

    def __init__(self, rows=(), where=(), problems=(), files=()):
        super().__init__(rows)
        self.where = list(where)        # "FILE:LINE" (or "FILE:row N") of each row
        self.problems = list(problems)  # "FILE:LINE: what"
        self.files = list(files)

    def summary(self, show: int = 5) -> str:
        text = f"read {len(self):,} rows from {len(self.files)} file(s)"
        if not self.problems:
            return text + "; nothing skipped"
        text += f"; skipped {len(self.problems):,}"
        return "\n  ".join([text] + self.problems[:show] + (["..."] if len(self.problems) > show else []))


def _row_documents(path: Path, field: str, problems: list[str]):
    """The string `field` of each row of a jsonl/json/csv/parquet file; rows without it, with a
    non-string or an empty value are reported in `problems` (FILE:ROW: what is wrong)."""
    for where, row in _iter_rows(path, problems):
        value = row.get(field)
        if value is None:
            problems.append(f"{where}: no field '{field}'")
        elif not isinstance(value, str):
            problems.append(f"{where}: field '{field}' is not a string")
        elif not value.strip():
            problems.append(f"{where}: empty document")
        else:
            yield value


def read_documents(source, *, field: str = "text", per: str = "line") -> ReadResult:
    """Read text documents from `source`: a path, a list of paths, a directory (its supported
    files, recursively, in sorted order) or `hf://datasets/ORG/NAME[/path]`.

    .txt files give one document per line (`per="line"`, the default) or per file
    (`per="file"`); .jsonl/.json/.csv/.parquet give one document per row, read from column
    `field`. Invalid UTF-8 lines, empty documents and rows without `field` are skipped and
    listed in `.problems` as "FILE:LINE: what". Raises UserError for a missing file, an
    unknown extension, a file that cannot be parsed at all, or when nothing is left."""
    if per not in ("line", "file", "row"):
        raise UserError(f"per={per!r} is not a document unit; expected 'line', 'file' or 'row'")
    result = ReadResult()
    for path in resolve_sources(source):
        result.files.append(str(path))
        if path.suffix.lower() in TEXT_EXTENSIONS:
            texts, problems = _read_txt(path, whole_file=(per == "file"))
        else:
            problems = []
            texts = list(_row_documents(path, field, problems))
        result.texts.extend(texts)
        result.problems.extend(problems)
    if not result.texts:
        first = f"; the first: {result.problems[0]}" if result.problems else ""
        raise UserError(f"no documents left in {_name(source)}: {len(result.problems):,} lines/rows were "
                        f"skipped{first}; expected at least one non-empty document")
    return result


def read_rows(source) -> Rows:
    """Rows (dicts) of .jsonl/.json/.csv/.parquet files, a directory of them, or an hf:// dataset;
    lines that are not valid UTF-8 or JSON objects are skipped and listed in `.problems`."""
    rows = Rows()
    for path in resolve_sources(source):
        if path.suffix.lower() in TEXT_EXTENSIONS:
            raise UserError(f"{path} is plain text; rows must come from a .jsonl, .json, .csv or .parquet file")
        rows.files.append(str(path))
        for where, row in _iter_rows(path, rows.problems):
            rows.append(row)
            rows.where.append(where)
    if not rows:
        raise UserError(f"no rows found in {_name(source)} ({rows.summary(1)})")
    return rows


def resolve_sources(source) -> list[Path]:
    """The files a source names: a file, a directory (supported files, sorted), an hf:// id,
    or a list of those. UserError for a missing path or an unsupported extension."""
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
        raise UserError(f"{path} has an unsupported extension; expected one of {', '.join(SUPPORTED_EXTENSIONS)}")
    return [path]


def download_hub_dataset(uri: str) -> Path:
    """Download `hf://datasets/ORG/NAME[/path]` with huggingface_hub into its normal cache and
    return the local file or directory. UserError when the id is malformed or unreachable."""
    parts = uri[len(HF_PREFIX):].strip("/").split("/")
    if len(parts) < 3 or parts[0] != "datasets" or not parts[1] or not parts[2]:
        raise UserError(f"{uri} is not a hub dataset id; expected hf://datasets/ORG/NAME[/path/in/repo]")
    repo_id, inner = f"{parts[1]}/{parts[2]}", "/".join(parts[3:])
    import huggingface_hub

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


def _files_in(path: Path, name: str) -> list[Path]:
    if path.is_file():
        if path.suffix.lower() not in SUPPORTED_EXTENSIONS:
            raise UserError(f"{name} has an unsupported extension; expected one of {', '.join(SUPPORTED_EXTENSIONS)}")
        return [path]
    files = sorted(
        p for p in path.rglob("*")
        if p.is_file() and p.suffix.lower() in SUPPORTED_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise UserError(f"{name} contains no {', '.join(SUPPORTED_EXTENSIONS)} files")
    return files


def _name(source) -> str:
    return ", ".join(map(str, source)) if isinstance(source, (list, tuple)) else str(source)


def _lines(path: Path) -> list[str]:
    """The file's lines; invalid UTF-8 bytes become lone surrogates that _BAD_BYTES finds."""
    return path.read_bytes().decode("utf-8", errors="surrogateescape").split("\n")


def _iter_lines(path: Path):
    """The same strings as _lines(path), read one line at a time (memory independent of the
    file size): split on "\n" only, a final "" when the file is empty or ends with "\n"."""
    last_ended = True
    with open(path, "rb") as handle:
        for raw in handle:  # binary iteration splits on b"\n" only, keeping it
            last_ended = raw.endswith(b"\n")
            yield (raw[:-1] if last_ended else raw).decode("utf-8", errors="surrogateescape")
    if last_ended:
        yield ""


def iter_documents(paths: Sequence[Path], problems: list[str], *, field: str = "text", per: str = "line"):
    """Yield the documents read_documents would keep from these files, in the same order,
    streaming .txt (one per line) and .jsonl files line by line; the skipped lines/rows are
    appended to `problems` with the same "FILE:LINE: what" text. No "nothing left" check."""
    for path in paths:
        if path.suffix.lower() in TEXT_EXTENSIONS and per != "file":
            pending = None  # one line of lookahead: the final "" after the last newline is no line
            for number, line in enumerate(_iter_lines(path), start=1):
                if pending is not None:
                    yield from _txt_line(path, number - 1, pending, problems)
                pending = line
            if pending not in (None, ""):
                yield from _txt_line(path, number, pending, problems)
        elif path.suffix.lower() in TEXT_EXTENSIONS:
            texts, found = _read_txt(path, whole_file=True)
            problems.extend(found)
            yield from texts
        else:
            yield from _row_documents(path, field, problems)


def _txt_line(path: Path, number: int, line: str, problems: list[str]):
    line = line.rstrip("\r")
    if _BAD_BYTES.search(line):
        problems.append(f"{path}:{number}: invalid UTF-8")
    elif not line.strip():
        problems.append(f"{path}:{number}: empty document")
    else:
        yield line


def _read_txt(path: Path, whole_file: bool) -> tuple[list[str], list[str]]:
    texts, problems, kept = [], [], []
    lines = _lines(path)
    if lines and lines[-1] == "":
        lines.pop()  # the final newline does not start another document
    for number, line in enumerate(lines, start=1):
        line = line.rstrip("\r")
        if _BAD_BYTES.search(line):
            problems.append(f"{path}:{number}: invalid UTF-8")
        elif whole_file:
            kept.append(line)
        elif not line.strip():
            problems.append(f"{path}:{number}: empty document")
        else:
            texts.append(line)
    if whole_file:
        text = "\n".join(kept)
        if text.strip():
            texts.append(text)
        else:
            problems.append(f"{path}:1: empty document")
    return texts, problems


def _iter_rows(path: Path, problems: list[str]):
    """Yield ("FILE:LINE", row dict) for each row of a .jsonl/.json/.csv/.parquet file; append
    "FILE:LINE: what" to `problems` for lines that are skipped."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for number, line in enumerate(_iter_lines(path), start=1):
            where = f"{path}:{number}"
            if _BAD_BYTES.search(line):
                problems.append(f"{where}: invalid UTF-8")
                continue
            if not line.strip():
                continue  # blank lines separate nothing in JSONL
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                problems.append(f"{where}: not valid JSON")
                continue
            if not isinstance(row, dict):
                problems.append(f"{where}: not a JSON object")
                continue
            yield where, row
    elif suffix == ".json":
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
        if isinstance(data, dict):  # {"data": [...]} or any single list of rows
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else [data]
        if not isinstance(data, list):
            raise UserError(f"{path} holds a JSON {type(data).__name__}; expected a list of objects")
        for index, row in enumerate(data, start=1):
            where = f"{path}:item {index}"
            if isinstance(row, dict):
                yield where, row
            else:
                problems.append(f"{where}: not a JSON object")
    elif suffix == ".csv":
        _allow_csv_fields_of_any_size()
        text = path.read_bytes().decode("utf-8", errors="surrogateescape")
        reader = csv.DictReader(io.StringIO(text, newline=""))
        start = 2
        for row in reader:
            where = f"{path}:{start}"
            start = reader.line_num + 1
            if any(_BAD_BYTES.search(v or "") for v in row.values() if isinstance(v, str)):
                problems.append(f"{where}: invalid UTF-8")
                continue
            yield where, {k: v for k, v in row.items() if k is not None}
    elif suffix == ".parquet":
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
    else:
        raise UserError(f"{path} has an unsupported extension; expected one of {', '.join(SUPPORTED_EXTENSIONS)}")


def _allow_csv_fields_of_any_size() -> None:
    """Raise the csv module's field limit (128 kB by default) to the largest the platform's C
    long holds, so a long document in one CSV field reads like any other."""
    try:
        csv.field_size_limit(sys.maxsize)
    except OverflowError:  # a 32-bit C long (Windows)
        csv.field_size_limit(2**31 - 1)


# ============================================================================ CPT examples


def tokenize_documents(texts: Sequence[str], tokenizer) -> list[list[int]]:
    """Token ids of each document, without special tokens (cpt_examples adds the framing).
    Uses the `tokenizers` backend's batched (multi-threaded) encoder when the tokenizer has one."""
    backend = getattr(tokenizer, "backend", None)
    if hasattr(backend, "encode_batch"):
        return [encoding.ids for encoding in backend.encode_batch(list(texts), add_special_tokens=False)]
    return [list(tokenizer.encode(text, add_special_tokens=False)) for text in texts]


def cpt_examples(token_lists: Sequence[Sequence[int]], max_len: int, mode: str = "drop", *,
                 eos_id: int, bos_id: int | None = None) -> list[list[int]]:
    """CPT training sequences from tokenised documents.

    "drop" (the paper): each document framed `<bos> doc <eos>` (bos only when bos_id is given),
    kept only when the framed length is <= max_len; longer ones are left out.
    "pack" (dllm's tokenize_and_group with insert_eos): documents written one after another as
    `doc <eos> doc <eos> ...` and cut into full max_len blocks; the last partial block is
    dropped. No bos: a block can start mid-document."""
    if max_len < 2:
        raise UserError(f"max_len={max_len} is too small; expected at least 2 tokens")
    if mode == "drop":
        head = [] if bos_id is None else [bos_id]
        framed = (head + list(ids) + [eos_id] for ids in token_lists if len(ids) > 0)
        return [seq for seq in framed if len(seq) <= max_len]
    if mode == "pack":
        stream = [t for ids in token_lists if len(ids) > 0 for t in (*ids, eos_id)]
        return [stream[i:i + max_len] for i in range(0, len(stream) - max_len + 1, max_len)]
    raise UserError(f"CPT mode {mode!r} is unknown; expected 'drop' or 'pack'")


def mix_counts(sizes: Sequence[int], counts: Sequence[int] | None = None,
               ratios: Sequence[float] | None = None) -> list[int]:
    """How many items of each source a mixture takes (see mix_sources), checked."""
    if counts is not None and ratios is not None:
        raise UserError("give either counts or ratios for mixing sources, not both")
    if counts is None and ratios is not None:
        if len(ratios) != len(sizes) or any(r < 0 for r in ratios) or sum(ratios) <= 0:
            raise UserError(f"mixing ratios {list(ratios)} must be {len(sizes)} non-negative numbers, not all zero")
        shares = [r / sum(ratios) for r in ratios]
        # N = min_i len_i / r_i, count_i = floor(N * r_i)
        total = min(size / share for size, share in zip(sizes, shares) if share > 0)
        counts = [math.floor(total * share + 1e-9) for share in shares]
    if counts is None:
        counts = list(sizes)
    if len(counts) != len(sizes) or any(c < 0 for c in counts):
        raise UserError(f"mixing counts {list(counts)} must be {len(sizes)} non-negative integers")
    for size, count in zip(sizes, counts):
        if count and not size:
            raise UserError(f"a source asked for {count} examples is empty")
    return list(counts)


def mix_sources(lists: Sequence[Sequence], counts: Sequence[int] | None = None,
                ratios: Sequence[float] | None = None, seed: int = 0) -> list:
    """Mix several example lists into one shuffled list.

    counts: take counts[i] items of list i (a random subset when fewer than it holds; the whole
    list repeated, then a random subset for the remainder, when more). ratios: the largest
    mixture with these proportions that needs no repetition, i.e. total N = min_i len_i / r_i
    and floor(N * r_i) items of list i. Neither: everything. Shuffled with `seed`."""
    counts = mix_counts([len(items) for items in lists], counts, ratios)
    rng = random.Random(seed)
    mixed = []
    for items, count in zip(lists, counts):
        repeats, remainder = divmod(count, len(items)) if items else (0, 0)
        mixed.extend(list(items) * repeats)
        mixed.extend(items[i] for i in sorted(rng.sample(range(len(items)), remainder)))
    rng.shuffle(mixed)
    return mixed


def train_eval_split(items: Sequence, eval_size: int | float, seed: int = 0) -> tuple[list, list]:
    """Split off a held-out set: `eval_size` items (int) or that fraction (float < 1), chosen
    with `seed`; the rest keep their order."""
    n = len(items)
    k = int(round(eval_size * n)) if isinstance(eval_size, float) and eval_size < 1 else int(eval_size)
    if not 0 <= k < n:
        raise UserError(f"eval size {eval_size} leaves no training data out of {n} examples")
    held = set(random.Random(seed).sample(range(n), k))
    return [x for i, x in enumerate(items) if i not in held], [items[i] for i in sorted(held)]


# ============================================================================ SFT examples


def sft_example(row: dict, fmt: str, tokenizer, max_len: int, where: str = "row"
                ) -> tuple[list[int], list[int]] | None:
    """(input_ids, labels): prompt ids then answer ids, labels IGNORE on the prompt and equal to
    the ids on the answer. None when the prompt leaves no room for an answer token
    (len(prompt) >= max_len); otherwise right-truncated to max_len."""
    prompt_ids, answer_ids = _encode_sft(row, fmt, tokenizer, where)
    return _join_sft(prompt_ids, answer_ids, max_len)


def _encode_sft(row, fmt, tokenizer, where):
    """(prompt_ids, answer_ids). The prompt is tokenised alone, exactly as a sampler will see it;
    the answer is the tail of the whole text's tokenisation when that starts with the prompt's
    ids (the usual case), else tokenised alone (a BPE merge crossed the boundary)."""
    prompt, answer = render_sft(row, fmt, tokenizer, where)
    prompt_ids = list(tokenizer.encode(prompt, add_special_tokens=False))
    full_ids = list(tokenizer.encode(prompt + answer, add_special_tokens=False))
    if full_ids[:len(prompt_ids)] == prompt_ids:
        return prompt_ids, full_ids[len(prompt_ids):]
    return prompt_ids, list(tokenizer.encode(answer, add_special_tokens=False))


def _join_sft(prompt_ids, answer_ids, max_len):
    if len(prompt_ids) >= max_len:
        return None
    ids = (prompt_ids + answer_ids)[:max_len]
    labels = ([IGNORE] * len(prompt_ids) + answer_ids)[:max_len]
    return ids, labels


@dataclass
class SFTReport:
    """What build_sft_examples kept, dropped and truncated."""

    rows: int = 0
    kept: int = 0
    dropped_prompt_too_long: int = 0
    truncated: int = 0
    max_len: int = 0

    def summary(self) -> str:
        return (f"{self.kept:,} of {self.rows:,} SFT rows kept; {self.dropped_prompt_too_long:,} dropped "
                f"(prompt alone >= {self.max_len} tokens); {self.truncated:,} answers right-truncated")


def build_sft_examples(rows: Sequence[dict], fmt: str, tokenizer, max_len: int
                       ) -> tuple[list[tuple[list[int], list[int]]], SFTReport]:
    """sft_example over all rows. UserError naming the row and field for a malformed row, a
    wrong format name, or when every row is dropped."""
    if fmt not in SFT_FORMATS:
        raise UserError(f"SFT format {fmt!r} is unknown; expected one of {', '.join(SFT_FORMATS)}")
    where = getattr(rows, "where", None) or [f"row {i + 1}" for i in range(len(rows))]
    report, examples = SFTReport(rows=len(rows), max_len=max_len), []
    for row, place in zip(rows, where):
        if not isinstance(row, dict):
            raise UserError(f"{place}: an SFT row must be an object, got {type(row).__name__}")
        prompt_ids, answer_ids = _encode_sft(row, fmt, tokenizer, place)
        example = _join_sft(prompt_ids, answer_ids, max_len)
        if example is None:
            report.dropped_prompt_too_long += 1
            continue
        examples.append(example)
        report.truncated += int(len(prompt_ids) + len(answer_ids) > max_len)
    report.kept = len(examples)
    if not examples:
        raise UserError(f"all {len(rows):,} SFT rows were dropped: every prompt is >= max_len={max_len} tokens")
    return examples, report


# ============================================================================ batching


def collate_cpt(batch: Sequence[Sequence[int]], pad_id: int, pad_to: int | None = None) -> dict:
    """Right-pad to the longest sequence (or to `pad_to`): input_ids [B, S] long,
    attention_mask [B, S] long, maskable [B, S] bool (= the real tokens)."""
    length = max(len(seq) for seq in batch) if pad_to is None else pad_to
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)  # [B, S]
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)  # [B, S]
    for i, seq in enumerate(batch):
        input_ids[i, :len(seq)] = torch.as_tensor(np.asarray(seq, dtype=np.int64))
        attention_mask[i, :len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "maskable": attention_mask.bool()}


def collate_sft(batch: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, eos_id: int | None = None,
                *, fill: str = "pad", pad_to: int | None = None) -> dict:
    """Right-pad (input_ids, labels) pairs to the longest (or to `pad_to`) with the pad token
    (`fill="pad"`, what dllm's collator does with mmBERT's <pad>) or with eos (`fill="eos"`).
    The padding is part of the labels (dllm: trained, so the model learns to end answers):
    input_ids [B, S] long, labels [B, S] long (IGNORE on the prompt), maskable [B, S] bool =
    labels != IGNORE, attention_mask None (SFT attends to everything, padding included)."""
    if fill not in ("pad", "eos") or (fill == "eos" and eos_id is None):
        raise UserError(f"fill={fill!r} is not valid; expected 'pad', or 'eos' together with eos_id")
    fill_id = pad_id if fill == "pad" else eos_id
    length = max(len(ids) for ids, _ in batch) if pad_to is None else pad_to
    input_ids = torch.full((len(batch), length), fill_id, dtype=torch.long)  # [B, S]
    labels = torch.full((len(batch), length), fill_id, dtype=torch.long)  # [B, S]
    for i, (ids, lab) in enumerate(batch):
        input_ids[i, :len(ids)] = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        labels[i, :len(lab)] = torch.as_tensor(np.asarray(lab, dtype=np.int64))
    return {"input_ids": input_ids, "labels": labels, "maskable": labels != IGNORE, "attention_mask": None}


class Batches:
    """Deterministic, resumable, shardable batches over a list of examples; endless.

    Epoch e visits the examples in a permutation drawn from (seed, e). Global step s of an
    epoch takes positions [s * G, (s + 1) * G) of it, G = batch_size * world_size, and rank r
    gets the contiguous slice [s * G + r * batch_size, s * G + (r + 1) * batch_size): the
    ranks together see exactly the global batch of a single process with batch_size * G.
    drop_last=True leaves out the last n % G examples of each epoch (a different few each
    epoch); drop_last=False completes the last global batch with examples from the start of
    the epoch's order (as torch's DistributedSampler does), so every batch has the same size.
    `state_dict()` is the position of the next batch in global steps, so a run can resume
    (even with another world size, as long as the global batch is the same).
    """

    def __init__(self, examples: Sequence, batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = True, collate: Callable | None = None):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"batch_size={batch_size}, rank={rank}, world_size={world_size} are not valid")
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.rank, self.world_size, self.drop_last, self.collate = rank, world_size, drop_last, collate
        self.global_batch_size = batch_size * world_size
        n = len(examples)
        steps = n // self.global_batch_size if drop_last else math.ceil(n / self.global_batch_size)
        if steps == 0:
            raise UserError(f"only {n} examples: fewer than one global batch of {batch_size} x {world_size} "
                            "processes; lower --batch-size or add data")
        self._steps = steps
        self.epoch, self.step_in_epoch = 0, 0
        self._order_epoch, self._order = None, None

    @property
    def steps_per_epoch(self) -> int:
        return self._steps

    def __len__(self) -> int:
        return self._steps

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's permutation of example indices (numpy's PCG64 seeded with [seed, epoch])."""
        if self._order_epoch != epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
            self._order_epoch = epoch
        return self._order

    def indices(self, epoch: int, step: int) -> list[int]:
        """Example indices of this rank's batch at global step `step` of `epoch`."""
        order = self.order(epoch)
        start = step * self.global_batch_size + self.rank * self.batch_size
        positions = [(start + i) % len(order) for i in range(self.batch_size)]  # wraps only when drop_last=False
        return [int(order[p]) for p in positions]

    def __iter__(self):
        return self

    def __next__(self):
        """The next (collated) batch of this rank; after an epoch's last step the next epoch starts."""
        if self.step_in_epoch >= self._steps:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        batch = [self.examples[i] for i in self.indices(self.epoch, self.step_in_epoch)]
        self.step_in_epoch += 1
        return self.collate(batch) if self.collate is not None else batch

    def state_dict(self) -> dict:
        """The position of the next batch (in global steps) plus what it is only valid for."""
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "seed": self.seed,
                "num_examples": len(self.examples), "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("seed", self.seed), ("num_examples", len(self.examples)),
                          ("global_batch_size", self.global_batch_size)):
            if key in state and state[key] != mine:
                raise UserError(f"cannot resume the data position: the checkpoint has {key}={state[key]}, "
                                f"this run has {mine}; use the same data, seed and global batch size")
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
