"""Writing files so that a reader never sees half of one.

References: none (plumbing). The idea is POSIX's: write the whole content under a temporary
name in the same directory, flush it to disk, then `os.replace` it onto the real name. A rename
within one file system is atomic, so the real name holds either the old file or the complete new
one, never a prefix; a process killed half-way leaves only a `*.tmp-PID` file behind.

    write_text(path, text)                     # str -> file
    write_json(path, obj)                      # JSON with a trailing newline
    with atomic_path(path) as tmp:             # anything that writes to a path: safetensors,
        save_file(tensors, str(tmp))           # torch.save, a page ...
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path, *, fsync: bool = True):
    """Yield a temporary path beside `path`; when the block ends without error, publish it as
    `path` by one rename. On error the temporary file is removed and `path` is left untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | Path, text: str, *, fsync: bool = True) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, obj, *, indent: int | None = 2, fsync: bool = True) -> Path:
    """Write `obj` as JSON (UTF-8, non-ASCII kept, values JSON does not know as str) atomically."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False, default=str) + "\n"
    return write_text(path, text, fsync=fsync)
