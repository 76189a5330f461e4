"""No traceback for a cache folder that is a file or a closed stdout pipe (issue 26, item 8)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from medlite import artifacts as af
from medlite.cli import main


def _fake_artifact(out: Path, version: str = "1.0+abc1234") -> Path:
    """OUT/<model>/<recipe>/<version> with a valid manifest (one file) and ``latest`` naming it."""
    art = out / "demo" / "r" / version
    art.mkdir(parents=True)
    (art / "a.txt").write_text("x")
    af.write_manifest(art, {"format": af.FORMAT, "version": version, "status": "passed"})
    af.update_latest(art.parent, version)
    return art


@pytest.mark.parametrize("how", ["flag", "env", "under-a-file"])
def test_cache_dir_that_is_a_file_is_one_line(tmp_path, monkeypatch, capsys, how):
    f = tmp_path / "cache.txt"
    f.write_text("I am a file")
    argv = ["demo", "model"]            # would build the demo model into the cache folder
    if how == "flag":
        argv = ["--cache-dir", str(f)] + argv
    elif how == "env":
        monkeypatch.setenv("MEDLITE_CACHE", str(f))
    else:
        argv = ["--cache-dir", str(f / "sub")] + argv
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and str(f) in err and "not a folder" in err


def test_closed_stdout_pipe_is_quiet(tmp_path):
    """``medlite verify --json ART | head -c 10``: the reader leaves first; no BrokenPipeError traceback."""
    art = _fake_artifact(tmp_path)
    code = "import sys\nfrom medlite.cli import main\nsys.exit(main(sys.argv[1:]))"
    p = subprocess.Popen([sys.executable, "-c", code, "verify", "--json", "--skip-checks", str(art)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()                     # closed before the command writes anything
    err = p.stderr.read().decode()
    rc = p.wait(timeout=60)
    assert "Traceback" not in err and "BrokenPipe" not in err and err == "", err
    assert rc in (0, 141)
