"""Peak resident memory per phase of a benchmark child process (where a peak RSS comes from).

``ru_maxrss`` gives one number for a whole process; to find which step of a build holds the memory,
:class:`PhaseRss` samples this process's RSS every ``interval`` seconds on a daemon thread and
charges each sample to the phases active at that moment (nested phases are named
``outer > inner``). Phases are opened with
``with rss.phase("name"):`` or by wrapping a function in place (``rss.wrap(module, "func")``), so the
product code is measured unchanged.

Used by the benchmark children (``benchmarks/int8_full_size.py``); psutil is already a dependency of
the bench command.
"""
from __future__ import annotations

import contextlib
import functools
import threading

import psutil


class PhaseRss:
    """Per-phase peak RSS (bytes) of the current process, sampled on a background thread."""

    def __init__(self, interval: float = 0.25):
        self.interval = interval
        self.peaks: dict = {}
        self.order: list = []
        self._stack = ["(outside phases)"]
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "PhaseRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample(self) -> None:
        rss = self._proc.memory_info().rss
        name = " > ".join(self._stack[1:]) or self._stack[0]
        if rss > self.peaks.get(name, 0):
            self.peaks[name] = rss

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    @contextlib.contextmanager
    def phase(self, name: str):
        """Charge the samples taken while the block runs to ``name`` (nested: ``outer > name``)."""
        self._sample()
        self._stack.append(name)
        full = " > ".join(self._stack[1:])
        if full not in self.order:
            self.order.append(full)
        try:
            yield
        finally:
            self._sample()
            self._stack.pop()

    def wrap(self, owner, attr: str, name=None) -> None:
        """Replace ``owner.attr`` (a function) by one that runs inside a phase named ``attr``, or
        ``name(*args, **kwargs)`` when ``name`` is a callable (e.g. to put the graph in the name)."""
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def wrapped(*a, **kw):
            with self.phase(name(*a, **kw) if callable(name) else (name or attr)):
                return fn(*a, **kw)

        setattr(owner, attr, wrapped)

    def to_dict(self) -> dict:
        """``{phase: peak GB}`` in the order the phases first ran."""
        names = [n for n in self.order if n in self.peaks] + [n for n in self.peaks if n not in self.order]
        return {n: round(self.peaks[n] / 1e9, 2) for n in names}


__all__ = ["PhaseRss"]
