"""Resume: a sweep interrupted (Ctrl-C to its process group) after k variants, then rerun with the same
command, reads the k finished variants back from their artifacts (re-hashed, not rebuilt) and builds only
the rest; a finished variant whose artifact changed is rebuilt."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sweep_helpers import comparable, rows_by_name

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]   # ~1-2 min: an interrupted and a resumed sweep


def _args(tiny_sweep, out: Path, cache: Path) -> list[str]:
    args = [a for a in tiny_sweep["args"] if a != "--quiet"]     # the summary line is checked
    args[args.index("--cache-dir") + 1] = str(cache)      # a cold cache: builds slow enough to interrupt
    return args + ["--out", str(out), "--jobs", "1"]


def test_interrupted_sweep_resumes(tiny_sweep, local_result, tmp_path, capsys):
    from medlite.cli import main

    out, cache = tmp_path / "out", tmp_path / "cache"
    medlite = Path(sys.executable).parent / "medlite"
    # SIGINT's default action restored in the child: a test run started in the background (nohup ... &,
    # some CI runners) ignores SIGINT, the child would inherit that and Python then installs no Ctrl-C handler
    proc = subprocess.Popen([str(medlite), *_args(tiny_sweep, out, cache)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 600
    while not list((out / "variants").glob("*.json")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)                     # Ctrl-C: the driver and its workers
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "rerun the same command to build the rest" in err
    done = sorted(p.stem for p in (out / "variants").glob("*.json"))
    assert 1 <= len(done) < 3, done                        # k variants finished, not all
    stamps = {n: (Path(json.loads((out / "variants" / f"{n}.json").read_text())["artifact"]).name,
                  (out / json.loads((out / "variants" / f"{n}.json").read_text())["artifact"] / "build-info.json")
                  .stat().st_mtime_ns) for n in done}

    rc = main(_args(tiny_sweep, out, cache))
    err = capsys.readouterr().err
    assert rc == 1
    res = json.loads((out / "results.json").read_text())
    rows = rows_by_name(res)
    built = [n for n in ("precision-fp32", "precision-fp16", "strict") if n not in done]
    assert f"{len(built) + 1} to build, {len(done)} finished before" in err    # + the failing variant
    for n in done:
        assert rows[n]["reused"] is True
        folder = Path(rows[n]["artifact"])
        assert (folder.name, (folder / "build-info.json").stat().st_mtime_ns) == stamps[n]   # not rebuilt
    for n in built:
        assert rows[n]["reused"] is False
    _, local, _ = local_result                             # the same table as an uninterrupted sweep
    assert {n: comparable(r) for n, r in rows.items()} == {n: comparable(r) for n, r in rows_by_name(local).items()}

    # a finished variant whose artifact changed is rebuilt, with a warning naming the file
    victim = Path(rows[done[0]]["artifact"]) / "tokenizer.json"
    victim.write_text(victim.read_text() + " ")
    main(_args(tiny_sweep, out, cache))
    err = capsys.readouterr().err
    assert "tokenizer.json" in err and f"rebuilding variant {done[0]}" in err
    rows = rows_by_name(json.loads((out / "results.json").read_text()))
    assert rows[done[0]]["reused"] is False and rows[done[0]]["status"] in ("passed", "failed gates")
