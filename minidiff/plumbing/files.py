"""Files a reader never sees half of, and the package's one lock.

Write under a temporary name beside the real one, flush it, `os.replace` it onto the real name and
flush the directory: the real name holds the old content or the complete new one. Every temporary
is named by `temporary_path`, `.tmp-NAME-HOST-PID`; `remove_temporaries` deletes what a killed
writer left once its process is gone.

    write_text(path, text), write_json(path, obj)                  # str / JSON -> file, atomically
    with atomic_path(path) as tmp: save_file(tensors, str(tmp))   # anything that writes to a path
    with lock_directory(folder, what): ...                         # one writer at a time (fcntl.flock)
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
from contextlib import contextmanager, suppress
from pathlib import Path

import safetensors.torch
import torch

from minidiff.errors import UserError

TEMPORARY_MARK = ".tmp-"  # every temporary is .tmp-NAME-HOST-PID (or .tmp-NAME, shared)


def writer_id(pid: int | None = None) -> str:
    """HOST-PID of this process (or of `pid` on this host); the host without "-", split on below."""
    return f"{socket.gethostname().replace('-', '_')}-{os.getpid() if pid is None else pid}"


def temporary_path(path: str | Path, *, shared: bool = False) -> Path:
    """`.tmp-NAME-HOST-PID` beside `path`; shared: `.tmp-NAME`, one name for every process of a run."""
    path = Path(path)
    return path.with_name(f"{TEMPORARY_MARK}{path.name}" + ("" if shared else f"-{writer_id()}"))


@contextmanager
def atomic_path(path: str | Path, *, fsync: bool = True):
    """A temporary path beside `path`, renamed onto it when the block ends without error, else removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
        if fsync:
            fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def temporary_directory(path: str | Path, *, shared: bool = False) -> Path:
    """A new empty directory at temporary_path(path), a dead writer's leftover of that name removed."""
    tmp = temporary_path(path, shared=shared)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_text(path: str | Path, text: str, *, fsync: bool = True) -> Path:
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, obj, *, indent: int | None = 2, fsync: bool = True) -> Path:
    """Write `obj` as JSON (UTF-8, non-ASCII kept, values JSON does not know as str) atomically."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False, default=str) + "\n"
    return write_text(path, text, fsync=fsync)


def fsync_dir(folder: str | Path) -> None:
    """Flush a directory's entries (a rename into it) to disk; a no-op where file systems refuse."""
    with suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def new_digest():
    """The hash every file of the project is checked with: BLAKE2b, 160-bit."""
    return hashlib.blake2b(digest_size=20)


def file_hash(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = new_digest()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _writer_is_gone(tmp: Path) -> bool:
    """Whether `tmp` is named for a process of this host that has ended (a shared name: never)."""
    parts = tmp.name.rsplit("-", 2)  # .tmp-NAME, HOST, PID
    if (len(parts) != 3 or parts[0] == TEMPORARY_MARK[:-1] or not parts[2].isdigit()
            or f"{parts[1]}-{parts[2]}" != writer_id(int(parts[2]))):
        return False
    try:
        os.kill(int(parts[2]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process: running
        pass
    return False


def remove_temporaries(folder: str | Path, *, locked: bool = False) -> list[Path]:
    """Delete (and return) the temporaries in `folder` of dead writers (all, if the caller holds its lock)."""
    removed = []
    for tmp in sorted(Path(folder).glob(f"{TEMPORARY_MARK}*")):
        if locked or _writer_is_gone(tmp):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def remove_tree(path: str | Path) -> None:
    """Delete a directory so that no reader sees it half gone: a rename to a temporary name, then rmtree."""
    aside = temporary_path(path)
    if aside.exists():
        shutil.rmtree(aside)
    os.rename(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def hold_lock(lock_file: str | Path, what: str, *, wait: bool = False):
    """An exclusive fcntl.flock on `lock_file` for the block; when held elsewhere, `wait` or a UserError."""
    lock_file = Path(lock_file)
    with open(lock_file, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise UserError(f"{what} is in use by another run ({holder}); wait for it to end "
                            "or choose another directory") from None
        except OSError as err:  # Lustre without -o flock, NFS without lockd
            raise UserError(f"{lock_file.parent} is on a filesystem without file locks ({err.strerror or err}); "
                            "put it on a local disk, or mount the filesystem with lock support "
                            "(Lustre: -o flock; NFS: a running lockd)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        yield


@contextmanager
def lock_directory(folder: str | Path, what: str):
    """hold_lock on `folder`/.lock without waiting; a folder it created and nothing wrote into goes again."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{what} {folder} exists and is not a directory; expected a directory")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    with hold_lock(folder / ".lock", f"{what} {folder}"):
        yield folder
        if created and [f.name for f in folder.iterdir()] == [".lock"]:  # nothing was written: leave nothing
            (folder / ".lock").unlink()
            folder.rmdir()


def first_line(err: Exception) -> str:
    """An exception's first line, for a one-sentence UserError (its type when it says nothing)."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file, on the CPU; a UserError for a missing or unreadable file."""
    if not file.is_file():
        raise UserError(f"weights file {file} does not exist")
    try:
        return safetensors.torch.load_file(str(file))
    except Exception as err:  # SafetensorError (truncated header/data), OSError
        raise UserError(f"{file} is not a readable safetensors file (truncated or corrupt?): "
                        f"{first_line(err)}") from None
