"""minidiff.plumbing.files: the published file is complete or absent, never partial; a temporary is
removed once its writer is gone; a lock has one holder at a time."""
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from minidiff.errors import UserError
from minidiff.plumbing import files


def test_write_text_and_json_round_trip(tmp_path):
    files.write_text(tmp_path / "a" / "x.txt", "çok güzel\n")
    assert (tmp_path / "a" / "x.txt").read_text(encoding="utf-8") == "çok güzel\n"
    files.write_json(tmp_path / "y.json", {"ş": 1, "p": tmp_path})
    assert json.loads((tmp_path / "y.json").read_text(encoding="utf-8")) == {"ş": 1, "p": str(tmp_path)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "y.json"]  # no temporaries left


def test_error_inside_block_leaves_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old", encoding="utf-8")
    with pytest.raises(RuntimeError):
        with files.atomic_path(target) as tmp:
            tmp.write_text("half", encoding="utf-8")
            raise RuntimeError("killed")
    assert target.read_text(encoding="utf-8") == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_killed_writer_never_publishes(tmp_path):
    # a child process writes half a file inside the block and dies (SIGKILL-like os._exit)
    target = tmp_path / "big.txt"
    code = (
        "import os, sys\nfrom minidiff.plumbing import files\n"
        f"with files.atomic_path({str(target)!r}) as tmp:\n"
        "    tmp.write_text('x' * 1000)\n"
        "    os._exit(9)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == 9
    assert not target.exists()


def test_temporaries_name_their_writer_and_only_dead_writers_lose_them(tmp_path):
    host = socket.gethostname().replace("-", "_")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert files.temporary_path(tmp_path / "x.json") == tmp_path / f".tmp-x.json-{host}-{os.getpid()}"
    assert files.temporary_path(tmp_path / "step-000004", shared=True) == tmp_path / ".tmp-step-000004"
    names = {"dead_file": f".tmp-a.json-{host}-{int(dead.stdout)}", "dead_dir": f".tmp-wiki-{host}-{int(dead.stdout)}",
             "alive": f".tmp-b.json-{host}-{os.getppid()}", "elsewhere": f".tmp-c.json-otherhost-{int(dead.stdout)}",
             "shared": ".tmp-step-000004", "user": "notes.tmp"}
    for key, name in names.items():
        if key == "dead_dir":
            (tmp_path / name).mkdir()
            (tmp_path / name / "tokens.bin").write_bytes(b"\0")
        else:
            (tmp_path / name).write_text("half")
    assert sorted(p.name for p in files.remove_temporaries(tmp_path)) == sorted([names["dead_dir"], names["dead_file"]])
    assert sorted(files.remove_temporaries(tmp_path, locked=True)) == sorted(
        tmp_path / names[key] for key in ("alive", "elsewhere", "shared"))  # under the folder's lock: every one
    assert [p.name for p in tmp_path.iterdir()] == ["notes.tmp"]


def test_a_fresh_temporary_directory_and_a_tree_removed_in_one_rename(tmp_path):
    tmp = files.temporary_directory(tmp_path / "entry")
    (tmp / "left.bin").write_bytes(b"x")  # what a killed writer of the same name left
    assert files.temporary_directory(tmp_path / "entry") == tmp and list(tmp.iterdir()) == []
    os.rename(tmp, tmp_path / "entry")
    files.remove_tree(tmp_path / "entry")
    assert list(tmp_path.iterdir()) == []


def test_the_lock_refuses_a_second_holder_or_makes_it_wait(tmp_path):
    lock = tmp_path / ".entry.lock"
    with files.hold_lock(lock, "the entry"):
        with pytest.raises(UserError, match=f"^the entry is in use by another run \\(pid {os.getpid()}\\); wait"):
            with files.hold_lock(lock, "the entry"):
                pass
    events, taken = [], threading.Event()

    def holder():
        with files.hold_lock(lock, "the entry"):
            taken.set()
            time.sleep(0.2)
            events.append("released")

    thread = threading.Thread(target=holder)
    thread.start()
    taken.wait(10)
    with files.hold_lock(lock, "the entry", wait=True):  # flock locks per open file: threads contend too
        events.append("taken")
    thread.join()
    assert events == ["released", "taken"]
