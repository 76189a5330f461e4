"""medlite.fileio (hashes, atomic writes, rename into place, writability) and medlite.units."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from medlite.errors import OutputError
from medlite.fileio import (ensure_writable_dir, ensure_writable_file, replace_into_place, sha256_file,
                            staged_folder, write_json_atomic, write_text_atomic)
from medlite.units import common_unit, human_bytes


def read_only_dir(tmp_path: Path) -> Path:
    """A folder this process cannot write in: chmod 555 for a normal user; root ignores permission
    bits, so for root a path on the read-only sysfs mount."""
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        return ro
    sysfs = Path("/sys")
    if not sysfs.is_dir():
        pytest.skip("running as root and no read-only mount to try")
    return sysfs


def test_sha256_file_equals_hashlib(tmp_path):
    p = tmp_path / "blob"
    data = os.urandom(5_000_001)
    p.write_bytes(data)
    assert sha256_file(p, chunk=1 << 16) == hashlib.sha256(data).hexdigest()


def test_atomic_writes_leave_no_temporary_files(tmp_path):
    write_text_atomic(tmp_path / "a" / "x.txt", "hello")
    write_json_atomic(tmp_path / "a" / "y.json", {"p": Path("/x")})
    assert (tmp_path / "a" / "x.txt").read_text() == "hello"
    assert json.loads((tmp_path / "a" / "y.json").read_text()) == {"p": "/x"}
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["x.txt", "y.json"]


def test_replace_into_place_and_staged_folder(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with staged_folder(final) as tmp:
        (tmp / "new.txt").write_text("new")
        assert not (final / "new.txt").exists()       # nothing visible until the block succeeds
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    with pytest.raises(RuntimeError):
        with staged_folder(final) as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("killed")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]   # no leftovers
    f = tmp_path / "f.txt"
    (tmp_path / "g.txt").write_text("2")
    f.write_text("1")
    replace_into_place(tmp_path / "g.txt", f)
    assert f.read_text() == "2" and not (tmp_path / "g.txt").exists()


def test_writable_checks_give_one_line(tmp_path):
    assert ensure_writable_dir(tmp_path / "new" / "deeper", "--out") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()            # checking creates nothing
    ro = read_only_dir(tmp_path)
    with pytest.raises(OutputError) as e:
        ensure_writable_dir(ro / "artifacts", "--out")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"--out {ro / 'artifacts'}: cannot write in {ro}")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        ensure_writable_dir(tmp_path / "file" / "sub", "--out")
    with pytest.raises(OutputError, match="is a folder; give a file name"):
        ensure_writable_file(tmp_path, "--out")
    with pytest.raises(OutputError, match="cannot write"):
        ensure_writable_file(ro / "result.json", "--out")


def test_human_bytes_one_decimal_vocabulary():
    assert [human_bytes(n) for n in (12, 7_800, 45_600_000, 1_230_000_000)] == [
        "12 B", "7.80 kB", "45.60 MB", "1.23 GB"]
    sizes = [1_620_000, 327_690_000_000, 900]
    unit = common_unit(sizes)
    assert unit == "GB" and [human_bytes(n, unit) for n in sizes] == ["0.00 GB", "327.69 GB", "0.00 GB"]
    assert human_bytes(1_620_000, "kB", digits=1) == "1620.0 kB"


def test_console_does_not_wrap_when_not_a_terminal(tmp_path):
    """Piped output (CI logs, `| tee`) keeps each line whole instead of rich's 80-column default."""
    import subprocess
    import sys

    code = ("from medlite.context import RunContext\n"
            "ctx = RunContext(cache_dir='.')\n"
            "ctx.info('x' * 150 + ' end')\n"
            "ctx.warn('y' * 150 + ' end')\n"
            "with ctx.stage('stage') as info:\n"
            "    info['detail'] = 'z' * 150 + ' end'\n")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    lines = err.splitlines()
    assert "x" * 150 + " end" in lines
    assert any(line.endswith("y" * 150 + " end") for line in lines)
    assert any(("z" * 150 + " end") in line and line.startswith("✓") for line in lines)


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_outputs_get_the_umask_modes_not_private_ones(tmp_path, umask):
    """Issue 26 #12: tempfile's 0600 / mkdtemp's 0700 must not survive the rename into place."""
    import stat
    import tempfile

    old = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "eval.json", {"a": 1})
        final = tmp_path / "out"
        with staged_folder(final) as tmp:
            fd, name = tempfile.mkstemp(dir=tmp)            # how safetensors / tempfile writers leave files: 0600
            os.close(fd)
            os.rename(name, tmp / "model.safetensors")
            (tmp / "sub").mkdir(mode=0o700)
            (tmp / "run.sh").write_text("#!/bin/sh\n")
            (tmp / "run.sh").chmod(0o700)
    finally:
        os.umask(old)

    def mode(p):
        return stat.S_IMODE(p.stat().st_mode)
    assert mode(tmp_path / "eval.json") == 0o666 & ~umask
    assert mode(final) == 0o777 & ~umask
    assert mode(final / "sub") == 0o777 & ~umask
    assert mode(final / "model.safetensors") == 0o666 & ~umask
    assert mode(final / "run.sh") == 0o777 & ~umask       # executables stay executable
