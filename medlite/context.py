"""The run context passed to every stage and command (no global mutable state).

A :class:`RunContext` carries the console, the cache directory and the output mode. Stages report
through it so that human output (rich start/finish lines, progress bars) and machine output
(``--json``) stay consistent.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator


def default_cache_dir() -> Path:
    """The user cache directory (``$MEDLITE_CACHE`` overrides it)."""
    env = os.environ.get("MEDLITE_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("medlite"))


def checked_cache_dir(arg: str | None = None) -> Path:
    """The cache folder ``--cache-dir`` (else ``$MEDLITE_CACHE``, else the user cache dir) names, refused in
    one line when it, or a folder above it, is a file (later it would be a NotADirectoryError traceback)."""
    from medlite.errors import MedliteError

    path = Path(arg).expanduser() if arg else default_cache_dir()
    where = "--cache-dir" if arg else ("$MEDLITE_CACHE" if os.environ.get("MEDLITE_CACHE") else "cache folder")
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                what = "is a file" if p == path else f"is inside {p}, which is a file"
                raise MedliteError(f"{where} {path}: {what}, not a folder; give a folder (it is created if missing)")
            break
    return path


def make_console(*, stderr: bool, quiet: bool = False):
    """A rich Console for stdout or stderr that wraps only on a terminal.

    Piped or redirected (a log file, CI, ``| tee``), rich would assume 80 columns and break stage
    lines and tables mid-word; there the width is unlimited and lines stay whole.
    """
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else 100_000
    return Console(stderr=stderr, highlight=False, quiet=quiet, width=width)


@dataclass
class StageRecord:
    """One finished stage: its name, the one-line summary and how long it took."""

    name: str
    detail: str
    seconds: float
    ok: bool = True


@dataclass
class RunContext:
    """Everything a command or stage needs besides its inputs.

    ``console`` writes to stderr so stdout stays clean for ``--json`` and for streamed answers.
    """

    cache_dir: Path = field(default_factory=default_cache_dir)
    json_mode: bool = False
    quiet: bool = False
    seed: int = 0
    console: Any = None
    stages: list[StageRecord] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.console is None:
            self.console = make_console(stderr=True, quiet=self.quiet or self.json_mode)

    # -- messages -------------------------------------------------------------------------
    def info(self, msg: str) -> None:
        """A plain line for humans (suppressed in --json and --quiet mode)."""
        self.console.print(msg)

    def warn(self, msg: str) -> None:
        """A loud warning: numerics changed silently, a fallback was taken, etc.

        Warnings are also kept in ``self.warnings`` so they reach reports and manifests, and are
        always printed to stderr, even in --json mode.
        """
        self.warnings.append(msg)
        make_console(stderr=True).print(f"[bold yellow]WARNING[/] {msg}")

    # -- stages ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[dict]:
        """Time a stage and print its finish line: ``✓ name  detail  1.2 s``.

        The body sets ``info["detail"]`` to the one-line summary, and ``info["ok"] = False`` when the
        stage ran but failed (a gate): that prints ``✗``, as an exception does.
        """
        info: dict = {"detail": ""}
        self.console.print(f"[dim]… {name}[/]")
        t0 = time.perf_counter()
        try:
            yield info
        except BaseException:
            dt = time.perf_counter() - t0
            self.stages.append(StageRecord(name, info.get("detail", ""), dt, ok=False))
            self.console.print(f"[bold red]✗[/] {name:<10}{info.get('detail', '')}  {dt:.1f} s", soft_wrap=True)
            raise
        dt = time.perf_counter() - t0
        ok = info.get("ok", True) is not False   # a stage that ran but failed its own check (a gate)
        self.stages.append(StageRecord(name, info["detail"], dt, ok=ok))
        mark = "[bold green]✓[/]" if ok else "[bold red]✗[/]"
        self.console.print(f"{mark} {name:<10}{info['detail']}  [dim]{dt:.1f} s[/]", soft_wrap=True)

    def progress(self, description: str, total: int | None):
        """A rich progress bar (a no-op display in --json/--quiet mode).

        Usage::

            with ctx.progress("calibrate", total=n) as advance:
                for x in items: ...; advance()
        """
        return _Progress(self, description, total)


class _Progress:
    def __init__(self, ctx: RunContext, description: str, total: int | None):
        self.ctx, self.description, self.total = ctx, description, total
        self._p = None

    def __enter__(self):
        if self.ctx.json_mode or self.ctx.quiet or not sys.stderr.isatty():
            return lambda n=1: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._p = Progress(TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(),
                           TimeElapsedColumn(), console=self.ctx.console, transient=True)
        self._p.__enter__()
        task = self._p.add_task(self.description, total=self.total)
        return lambda n=1: self._p.advance(task, n)

    def __exit__(self, *exc):
        if self._p is not None:
            self._p.__exit__(*exc)
        return False
