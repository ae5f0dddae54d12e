"""minidiff.plumbing.files: the published file is complete or absent, never partial."""
import json
import os
import subprocess
import sys

import pytest

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
