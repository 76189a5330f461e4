"""Executor pieces without builds: the thread budget (jobs × threads ≤ cores), the prefix ordering (a
variant that shares a cached prune + distill prefix waits for the first one), and the running display
(one line per running variant, with its stage)."""
from __future__ import annotations

import io
from types import SimpleNamespace

from medlite.sweep.executors import Display, Waits, thread_budget


def test_thread_budget():
    assert [thread_budget(j, 8) for j in (1, 2, 3, 4, 8, 16)] == [8, 4, 2, 2, 1, 1]
    assert all(j * thread_budget(j, c) <= c for j in range(1, 9) for c in range(j, 17))


def test_waits_release_followers_after_their_leader():
    t = [SimpleNamespace(name=n, extra=e) for n, e in
         (("a", {}), ("b", {"after": "a"}), ("c", {}), ("d", {"after": "a"}))]
    w = Waits(t)
    assert [x.name for x in w.ready()] == ["a", "c"]
    assert w.done("c") == []
    assert [x.name for x in w.done("a")] == ["b", "d"]
    assert w.done("b") == [] and w.waiting == []


def test_prefix_order_on_the_demo_sweep():
    from medlite.recipes.loader import builtin_dir
    from medlite.sweep.commands import order_by_prefix, prefix_key
    from medlite.sweep.spec import load_sweep

    s = load_sweep(builtin_dir() / "sweeps" / "demo-precision.yaml")
    valid = {v.name: v for v in s.variants if v.valid}
    tasks = order_by_prefix([SimpleNamespace(name=n, extra={}) for n in valid], valid)
    after = {t.name: t.extra.get("after") for t in tasks}
    # the three 25 % variants share a prefix (different quantize options only); the 50 % one has its own
    assert after == {"llm-w8a8_vision-int8": None, "llm-w8a8_vision-fp16": "llm-w8a8_vision-int8",
                     "llm-w4a16_vision-int8": "llm-w8a8_vision-int8", "mlp50_llm-w8a8_vision-int8": None}
    assert prefix_key(valid["llm-w8a8_vision-fp16"].resolved) != prefix_key(valid["mlp50_llm-w8a8_vision-int8"].resolved)


def test_display_one_line_per_running_variant(monkeypatch):
    import sys

    from rich.console import Console

    buf = io.StringIO()
    ctx = SimpleNamespace(quiet=False, json_mode=False, console=Console(file=buf, force_terminal=True, width=120))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    with Display(ctx, total=3) as d:
        d.stage("alpha", "distill")
        d.stage("beta", "export")
        text = d._render().plain
        assert "0/3 variants done, 2 running" in text
        assert [line.split()[1:3] for line in text.splitlines()[1:]] == [["alpha", "distill"], ["beta", "export"]]
        d.finished("alpha", "✓ alpha done")
        text = d._render().plain
        assert "1/3 variants done, 1 running" in text and "alpha" not in text
    assert "✓ alpha done" in buf.getvalue()


def test_unreachable_ray_address_is_one_line():
    import socket

    import pytest

    from medlite.errors import MedliteError
    from medlite.sweep.executors import check_address

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                                              # nothing listens there now
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(MedliteError, match=f"nothing answers at 127.0.0.1:{port}"):
            check_address(address, timeout=2)
    with pytest.raises(MedliteError, match="expected HOST:PORT"):
        check_address("headnode")
    check_address("auto")                                  # left to Ray
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    try:
        check_address(f"127.0.0.1:{srv.getsockname()[1]}")
    finally:
        srv.close()


def test_local_workers_build_each_variant_in_a_fresh_process():
    """A worker reused for a second variant carried state over from the first build (the demo sweep's W4A16
    decoder came out 423 kB after the W8A8 builds in the same worker, 383 kB alone): one process per variant."""
    from sweep_helpers import worker_pid

    from medlite.sweep.executors import run_local

    for jobs in (1, 2):
        tasks = [SimpleNamespace(name=f"v{i}", threads=1, extra={}) for i in range(4)]
        results = []
        ctx = SimpleNamespace(quiet=True, json_mode=True, console=None)
        with Display(ctx, total=len(tasks)) as display:
            display.finished = lambda name, line: None
            run_local(tasks, jobs, display, results.append, work=worker_pid)
        assert sorted(r["name"] for r in results) == ["v0", "v1", "v2", "v3"]
        assert len({r["pid"] for r in results}) == 4, (jobs, results)
