"""What the full-size benchmarks share: run a step in its own Python process (so its peak RSS is its
own ``ru_maxrss``) and read the JSON it prints last; keep an earlier result as history; write the
results file. Used by ``int8_full_size.py`` and ``int4_full_size.py``."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_json_child(args: list, *, code: str = "", errors: str = "raise", what: str = "child") -> dict:
    """Run ``python -c code *args`` (or ``python *args`` without ``code``) in the repository root and
    return the JSON object on the last line of its stdout, with ``wall_s`` added.

    ``errors="raise"`` exits with the child's stderr tail on failure; ``"record"`` returns
    ``{"error": ..., "wall_s": ...}`` so a benchmark can report the steps that did run.
    """
    argv = [sys.executable, "-c", code, *args] if code else [sys.executable, *args]
    t = time.time()
    proc = subprocess.run([str(a) for a in argv], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        if errors == "record":
            return {"error": proc.stderr[-2000:], "wall_s": time.time() - t}
        raise SystemExit(f"{what} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out.setdefault("wall_s", time.time() - t)
    return out


def keep_history(res: dict, key: str) -> None:
    """Move an earlier ``res[key]`` to ``res["history"][key]`` (newest last) before it is replaced."""
    if key in res:
        res.setdefault("history", {}).setdefault(key, []).append(res.pop(key))


def read_result(path: Path) -> dict:
    """The results file so far (steps merge into it), or an empty one."""
    return json.loads(path.read_text()) if path.is_file() else {}


def write_result(path: Path, res: dict) -> None:
    """Write the results file (sorted keys, one trailing newline) and echo it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(res, indent=1, sort_keys=True) + "\n"
    path.write_text(text)
    print(text, end="")


__all__ = ["ROOT", "keep_history", "read_result", "run_json_child", "write_result"]
