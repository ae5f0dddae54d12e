"""Writing files so that a reader never sees half of one.

References: none (plumbing). The idea is POSIX's: write the whole content under a temporary
name in the same directory, flush it to disk, then `os.replace` it onto the real name, and flush
the directory (`fsync_dir`) so the rename is durable. The real name holds either the old file or
the complete new one; a process killed half-way leaves only a `*.tmp-PID` file behind.

    write_text(path, text), write_json(path, obj)   # str / JSON -> file, atomically
    with atomic_path(path) as tmp:             # anything that writes to a path: safetensors,
        save_file(tensors, str(tmp))           # torch.save, a page ...
    file_hash(path)                            # BLAKE2b of a file's bytes (checkpoints, shards)
    remove_temporaries(folder)                 # *.tmp-PID files left by killed writers
    with lock_directory(folder, what): ...     # one writer at a time (fcntl.flock)
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path

from minidiff.errors import UserError

TEMPORARY_MARK = ".tmp-"  # atomic_path's temporary files are named NAME.tmp-PID


@contextmanager
def atomic_path(path: str | Path, *, fsync: bool = True):
    """Yield a temporary path beside `path`; when the block ends without error, publish it as
    `path` by one rename. On error the temporary file is removed and `path` is left untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}{TEMPORARY_MARK}{os.getpid()}")
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


def write_text(path: str | Path, text: str, *, fsync: bool = True) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, obj, *, indent: int | None = 2, fsync: bool = True) -> Path:
    """Write `obj` as JSON (UTF-8, non-ASCII kept, values JSON does not know as str) atomically."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False, default=str) + "\n"
    return write_text(path, text, fsync=fsync)


def fsync_dir(folder: str | Path) -> None:
    """Flush a directory's entries (a rename into it) to disk; a no-op where file systems refuse."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def new_digest():
    """The hash every file of the project is checked with: BLAKE2b, 160-bit."""
    return hashlib.blake2b(digest_size=20)


def file_hash(path: str | Path, chunk: int = 1 << 20) -> str:
    """new_digest() of the file's bytes, read in 1 MiB chunks."""
    digest = new_digest()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def remove_temporaries(folder: str | Path) -> list[Path]:
    """Delete (and return) the `NAME.tmp-PID` files in `folder` whose writer's pid is gone."""
    removed = []
    for tmp in Path(folder).glob(f"*{TEMPORARY_MARK}*"):
        pid = tmp.name.rsplit(TEMPORARY_MARK, 1)[1]
        if tmp.is_file() and pid.isdigit() and not pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def no_locks(path: Path, err: OSError) -> str:
    """The sentence for a filesystem that refuses flock (Lustre without -o flock, NFS without lockd)."""
    return (f"{path} is on a filesystem without file locks ({err.strerror or err}); put it on a local disk, "
            "or mount the filesystem with lock support (Lustre: -o flock; NFS: a running lockd)")


@contextmanager
def lock_directory(folder: str | Path, what: str):
    """Hold an exclusive lock on `folder` (its `.lock` file, fcntl.flock; it dies with its process)
    for the block; a second holder gets a UserError at once, naming the folder as `what`. A folder
    this call created is removed again when the block ends having written nothing."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{what} {folder} exists and is not a directory; expected a directory")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / ".lock", "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise UserError(f"{what} {folder} is in use by another run ({holder}); wait for it to end "
                            "or choose another directory") from None
        except OSError as err:
            raise UserError(no_locks(folder, err)) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        yield folder
        if created and [f.name for f in folder.iterdir()] == [".lock"]:  # nothing was written: leave nothing
            (folder / ".lock").unlink()
            folder.rmdir()
    finally:
        handle.close()
