"""The README and docs walk-through, re-run as a new user would (issue 26).

Every command line in a fenced shell block of README.md and docs/*.md that starts with ``medlite``
or ``.venv/bin/medlite`` (``$ medlite …`` in a ``console`` block) is collected and run as written,
in a folder laid out like a fresh clone after ``make demo``: ``recipes/`` and the
``artifacts/micro-tinyllava-med/xavier-agx-int8`` artifact, built there by the command ``make demo``
runs. A command passes when it exits 0 and prints no traceback; ``serve`` passes when it prints its
URL (it would run until Ctrl-C).

Every collected command runs unless NOT_RUN lists it with the reason, so a command added to the docs
is run by default. The placeholders the docs use for "your artifact", "your checkpoint" and "your
scan" are replaced by the demo's own (PLACEHOLDERS); any other placeholder fails until it is listed.
"""
from __future__ import annotations

import queue
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console", "text"}  # text: docs/sweeps.md, docs/gpu-builds.md
COMMAND = re.compile(r"^(?:\.venv/bin/)?medlite(?:\s|$)")
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w-]*)")
DEMO_ARTIFACT = "artifacts/micro-tinyllava-med/xavier-agx-int8"
MAKE_DEMO = ["build", "recipes/xavier-agx-int8.yaml"]  # what `make demo` runs (Makefile)
CLI = [sys.executable, "-m", "medlite.cli"]
TIMEOUT_S = 900

# Commands that are not run: those with one of these words (a path the user supplies, or a job far
# beyond a test), each with the reason. Keep this short: every other command in the docs is run.
NOT_RUN = {
    "./TinyLLaVA-Med": "the full-size checkpoint the user downloads; builds/evals of it take hours on CPU",
    "path/to/adapter": "a LoRA adapter and base the user supplies (LoRA: tests/checkpoints)",
    "ckpt/": "the user's checkpoint; a build (shipped recipes on the demo model: tests/test_build_demo.py)",
    "recipes/sweeps/demo-precision.yaml": "four builds of the demo model (sweeps: tests/sweep)",
    "my-sweep.yaml": "a sweep file the user writes",
    "my.yaml": "a sweep file the user writes, on the user's Ray cluster",
    "labels.csv": "the user's own labels (docs/cpu.md's probe synopsis, [options] in brackets)",
}


# Words the docs use for a path the user fills in -> what the walk-through fills in.
PLACEHOLDERS = {
    "OUT/<model>/<recipe>": DEMO_ARTIFACT,
    "CKPT": "{demo_model}",
    "scan.dcm": "{scan}",  # pydicom's CT_small.dcm (a real CT slice, installed with pydicom)
}


@dataclass(frozen=True)
class DocCommand:
    """One command line a user can copy from the docs."""

    where: str  # "docs/serve.md:10"
    words: tuple[str, ...]  # as a POSIX shell splits the line: quotes removed, comment dropped

    @property
    def text(self) -> str:
        """The command, one space between words, quoted where a shell needs it."""
        return shlex.join(self.words)


def _shell_words(line: str) -> tuple[str, ...]:
    """`line`'s words as a POSIX shell splits them, up to a comment (`#` at the start of a word)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=False)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return tuple(lexer)


def commands_in(path: Path) -> list[DocCommand]:
    """The medlite command lines in `path`'s fenced shell blocks (continuation lines joined)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found, fence, info, i = [], None, None, 0
    while i < len(lines):
        line, i = lines[i], i + 1
        m = FENCE.match(line)
        if m and (fence is None or m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence)):
            fence, info = (m.group(1), m.group(2).lower()) if fence is None else (None, None)
            continue
        if fence is None or info not in SHELL_BLOCKS:
            continue
        text, start = line.strip(), i
        if info == "console" and not text.startswith("$ "):
            continue  # console blocks: output lines have no prompt
        text = text[2:] if text.startswith("$ ") else text
        while text.endswith("\\") and i < len(lines):
            text, i = text[:-1] + " " + lines[i].strip(), i + 1
        if COMMAND.match(text):
            found.append(DocCommand(f"{path.relative_to(ROOT)}:{start}", _shell_words(text)))
    return found


ALL_COMMANDS = [c for p in DOC_FILES for c in commands_in(p)]
TO_RUN = [c for c in ALL_COMMANDS if not set(c.words) & set(NOT_RUN)]


# --- the collector (fast) ---------------------------------------------------------------------------

def test_collector_reads_shell_blocks_prompts_and_continuations(tmp_path, monkeypatch):
    doc = tmp_path / "x.md"
    doc.write_text(
        "```\nmake demo\n.venv/bin/medlite verify a/b    # latest\n```\n"
        "```python\nmedlite = 1\n```\n"
        "```console\n$ medlite plan r.yaml \\\n    --model m\nmedlite output line\n```\n"
        "```sh\nmedlite ask a --image b \"Is it {x}?\"  # the quoted question is one word\n```\n"
        "```bash\nmedlite recipes ls\n```\n"
        "`medlite inline`\n```yaml\nmedlite: x\n```\n",
        encoding="utf-8")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    got = [(c.where, c.text) for c in commands_in(doc)]
    assert got == [("x.md:3", ".venv/bin/medlite verify a/b"),
                   ("x.md:9", "medlite plan r.yaml --model m"),
                   ("x.md:14", "medlite ask a --image b 'Is it {x}?'"),
                   ("x.md:17", "medlite recipes ls")]
    assert commands_in(doc)[2].words[-1] == "Is it {x}?"


def test_docs_have_commands_and_every_exclusion_is_still_in_the_docs():
    words = {w for c in ALL_COMMANDS for w in c.words}
    assert any(c.where.startswith("README.md") for c in ALL_COMMANDS)
    stale = sorted(set(NOT_RUN) - words)
    assert not stale, f"NOT_RUN lists words no longer in any command of the docs: {stale}"
    assert len(TO_RUN) >= 3, [c.text for c in ALL_COMMANDS]


# --- the walk-through (slow: builds the demo artifact as `make demo` does) --------------------------

@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory) -> dict:
    """A folder like a fresh clone after `make demo`; returns {"cwd", "demo_model", "scan"}."""
    cwd = tmp_path_factory.mktemp("walkthrough")
    shutil.copytree(ROOT / "recipes", cwd / "recipes")
    res = subprocess.run(CLI + ["--quiet", *MAKE_DEMO], cwd=cwd, capture_output=True, text=True,
                         timeout=TIMEOUT_S)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert (cwd / DEMO_ARTIFACT / "latest").is_file(), sorted(p.name for p in (cwd / "artifacts").rglob("*"))
    res = subprocess.run(CLI + ["--quiet", "demo", "model"], cwd=cwd, capture_output=True, text=True,
                         timeout=TIMEOUT_S)  # prints the cached checkpoint's folder
    demo_model = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
    assert res.returncode == 0 and Path(demo_model).is_dir(), res.stdout + res.stderr[-3000:]
    from pydicom.data import get_testdata_file

    return {"cwd": cwd, "demo_model": demo_model, "scan": get_testdata_file("CT_small.dcm")}


def _argv(cmd: DocCommand, walk: dict) -> list[str]:
    """The command's argv: medlite through this interpreter, placeholders filled in."""
    words = [PLACEHOLDERS[w].format(**walk) if w in PLACEHOLDERS else w for w in cmd.words[1:]]
    if words and words[0] == "serve":
        words += ["--port", "0"]  # 8765 may be taken on a test machine; the URL line says which
    return CLI + words


def _serve_until_url(argv: list[str], cwd: Path) -> tuple[bool, str]:
    """Start `medlite serve`, read its output until the URL line (True) or its exit (False), stop it."""
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()

    def read():  # in a thread: readline blocks, and a server that is up prints nothing more
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    out, deadline = [], time.monotonic() + TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1.0)
            except queue.Empty:
                continue
            if line is None:
                return False, "".join(out) + f"\n(exited {proc.wait()} before serving)"
            out.append(line)
            if "http://127.0.0.1:" in line:
                return True, "".join(out)
        return False, "".join(out) + "\n(no URL line in time)"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("cmd", TO_RUN, ids=[c.where for c in TO_RUN])
def test_doc_command_runs_as_written(cmd: DocCommand, walkthrough):
    argv = _argv(cmd, walkthrough)
    if argv[len(CLI)] == "serve":
        ok, output = _serve_until_url(argv, walkthrough["cwd"])
        assert ok and "Traceback" not in output, f"{cmd.where}: {cmd.text}\n{output[-3000:]}"
        return
    res = subprocess.run(argv, cwd=walkthrough["cwd"], capture_output=True, text=True, timeout=TIMEOUT_S)
    output = res.stdout + res.stderr
    assert res.returncode == 0 and "Traceback" not in output, \
        f"{cmd.where}: {cmd.text} (exit {res.returncode})\n{output[-3000:]}"
