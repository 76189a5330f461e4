"""Where variants build: ``local`` (``--jobs N`` processes) or ``ray`` (one Ray task per variant).

Both take :class:`~medlite.sweep.variant.VariantTask` objects and call ``on_done(result)`` in the
driver as each finishes (in completion order), and report stage starts to a :class:`Display`: one line
per running variant. Ctrl-C cancels what has not started, stops the workers and re-raises
KeyboardInterrupt; finished variants are already recorded, so rerunning the command resumes.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from typing import Callable, Optional

from medlite.errors import MedliteError


def usable_cores() -> int:
    """Cores this process may run on (CPU affinity respected)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        return os.cpu_count() or 1


def thread_budget(jobs: int, cores: Optional[int] = None) -> int:
    """Threads per worker so that ``jobs × threads ≤ cores`` (at least one each)."""
    return max(1, (cores or usable_cores()) // max(1, jobs))


class Display:
    """One line per running variant (``⠿ name · stage · 12 s``) on a terminal; plain start/finish lines
    otherwise (and none in --quiet / --json mode)."""

    def __init__(self, ctx, total: int):
        import sys

        self.ctx, self.total, self.done = ctx, total, 0
        self.running: dict[str, list] = {}     # name -> [stage, started]
        self.lock = threading.Lock()
        self.live = None
        if not (ctx.quiet or ctx.json_mode) and sys.stderr.isatty():
            from rich.live import Live

            self.live = Live(self._render(), console=ctx.console, refresh_per_second=2, transient=True)

    def _render(self):
        from rich.text import Text

        now = time.perf_counter()
        lines = [f"sweep: {self.done}/{self.total} variants done, {len(self.running)} running"]
        lines += [f"  … {n:<36} {st:<12} {now - t0:5.0f} s" for n, (st, t0) in sorted(self.running.items())]
        return Text("\n".join(lines))

    def __enter__(self):
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.__exit__(*exc)
        return False

    def stage(self, name: str, stage: str) -> None:
        """A worker's variant ``name`` started ``stage``."""
        with self.lock:
            started = self.running.get(name, [None, time.perf_counter()])[1]
            self.running[name] = [stage, started]
            if self.live is not None:
                self.live.update(self._render())

    def finished(self, name: str, line: str) -> None:
        """A variant finished: its line is printed above the running ones."""
        with self.lock:
            self.running.pop(name, None)
            self.done += 1
            self.ctx.console.print(line, soft_wrap=True)
            if self.live is not None:
                self.live.update(self._render())


class Waits:
    """Tasks in order, each released when the task it waits for (``task.extra["after"]``) has finished."""

    def __init__(self, tasks: list):
        self.waiting = list(tasks)
        self.finished: set = set()

    def _take(self) -> list:
        ready = [t for t in self.waiting if t.extra.get("after") in (None, *self.finished)]
        self.waiting = [t for t in self.waiting if t not in ready]
        return ready

    def ready(self) -> list:
        """The tasks that can start now (the first call: those that wait for nothing)."""
        return self._take()

    def done(self, name: str) -> list:
        """``name`` finished (built or failed): the tasks that can start now."""
        self.finished.add(name)
        return self._take()


def _drain(events, display: Display, stop: threading.Event) -> None:
    """Move the workers' stage events onto the display until ``stop``."""
    while not stop.is_set():
        try:
            name, stage = events.get(timeout=0.2)
        except queue.Empty:
            continue
        except (EOFError, OSError, BrokenPipeError):   # the manager went away (Ctrl-C)
            return
        display.stage(name, stage)


_EVENTS = None    # in a local worker: the queue its stage events go to (set by _worker_init)


def _worker_init(threads: int, events) -> None:
    # before torch / onnxruntime are imported in the worker: their pools start with this budget
    from medlite.sweep.variant import set_threads

    global _EVENTS
    _EVENTS = events
    set_threads(threads)


def _local_task(task) -> dict:
    from medlite.sweep.variant import run_variant

    return run_variant(task, _EVENTS)


def run_local(tasks: list, jobs: int, display: Display, on_done: Callable[[dict], None], *,
              work: Callable = _local_task) -> None:
    """``jobs`` worker processes (spawned: no forked torch state), each with ``tasks[i].threads`` threads.

    Every variant gets a fresh process (``max_tasks_per_child=1``), exactly like ``medlite build``: a worker
    reused for the next variant carried state over from the previous builds (measured: the demo sweep's
    W4A16 variant built after the W8A8 ones wrote a 423 kB decoder with another mean KL, 383 kB alone or
    on Ray). ``work`` is what runs in the worker (tests pass a recorder)."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    if not tasks:
        return
    spawn = mp.get_context("spawn")
    events = spawn.Queue()     # handed to each worker when it starts (no manager process to lose on Ctrl-C)
    stop = threading.Event()
    pump = threading.Thread(target=_drain, args=(events, display, stop), daemon=True)
    pump.start()
    pool = ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=spawn, initializer=_worker_init,
                               initargs=(tasks[0].threads, events), max_tasks_per_child=1)
    gate = Waits(tasks)
    try:
        pending = {pool.submit(work, t): t for t in gate.ready()}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                task = pending.pop(fut)
                pending.update({pool.submit(work, t): t for t in gate.done(task.name)})
                try:
                    result = fut.result()
                except Exception as e:   # noqa: BLE001 — a worker that died (killed, out of memory) is a row too
                    result = {"name": task.name, "ok": False, "artifact": None, "files": None, "dataset": None,
                              "seconds": None, "error": f"the worker process died: {type(e).__name__}: {e}"}
                on_done(result)
    except KeyboardInterrupt:
        _stop_pool(pool)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        stop.set()
        pump.join(timeout=2)
        events.close()


def _stop_pool(pool) -> None:
    """Ctrl-C: cancel what has not started and end the workers (their staging folders are removed by
    their own Ctrl-C; a killed one leaves a stale folder the next build cleans)."""
    procs = list((getattr(pool, "_processes", None) or {}).values())   # shutdown() forgets them
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()


# -- Ray ------------------------------------------------------------------------------------------
def _ray_task(task, events):
    from medlite.sweep.variant import run_variant

    return run_variant(task, events)


def _ray_events(ray):
    """A Ray queue for stage events (None where the cluster cannot host one: the display then shows
    each variant as running without its stage)."""
    try:
        from ray.util.queue import Queue

        return Queue(actor_options={"num_cpus": 0})
    except Exception:   # noqa: BLE001 — progress lines are a convenience, never a reason to fail
        return None


def check_address(address: Optional[str], timeout: float = 5.0) -> None:
    """A ``host:port`` or ``ray://host:port`` that nothing answers is one line now (Ray itself retries for
    minutes); ``auto`` / ``local`` are left to Ray."""
    import socket

    if not address or address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise MedliteError(f"--address {address}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise MedliteError(f"--address {address}: nothing answers at {host}:{port} ({e.strerror or e}); start the "
                           f"cluster (`ray start --head`) or fix the address") from None


def run_ray(tasks: list, display: Display, on_done: Callable[[dict], None], *, address: Optional[str] = None,
            memory_bytes: Optional[int] = None) -> None:
    """One Ray task per variant, declaring ``tasks[i].threads`` CPUs, ``memory_bytes`` of memory and
    ``tasks[i].gpus`` GPUs (when above 0: a GPU build, medlite.sweep.gpus).

    Connects to ``address`` (``auto``, ``ray://host:10001``), to the Ray instance this process already
    started, or starts a local one (shut down at the end). Workers that see the driver's ``--out`` write
    the artifacts there; others return the files to the driver, which writes them (``VariantTask.marker``).
    """
    try:
        import ray
    except ImportError:
        raise MedliteError("--executor ray needs Ray: pip install 'medlite[ray]' (or use --executor local)") from None
    if not tasks:
        return
    started = not ray.is_initialized()
    if started:
        check_address(address)
        try:
            # a new local instance: no dashboard, workers' logs stay in theirs (each variant has logs/<name>.log);
            # an existing cluster or a ray:// client: only the address (the client takes few init options)
            ray.init(address=address) if address else ray.init(include_dashboard=False, log_to_driver=False)
        except Exception as e:   # noqa: BLE001 — ConnectionError, a wrong address: one line
            raise MedliteError(f"--executor ray: cannot connect to Ray at {address or 'a new local instance'}: "
                               f"{e}") from None
    events = _ray_events(ray)
    # max_calls=1: a fresh worker process per variant, as locally (a reused one carries state between builds)
    opts = {"num_cpus": tasks[0].threads, "max_retries": 0, "max_calls": 1}
    if memory_bytes:
        opts["memory"] = int(memory_bytes)
    remote = ray.remote(**opts)(_ray_task)

    def submit(t):
        gpus = float(getattr(t, "gpus", 0) or 0)
        return (remote.options(num_gpus=gpus) if gpus else remote).remote(t, events)

    refs = {}
    gate = Waits(tasks)
    try:
        refs = {submit(t): t for t in gate.ready()}
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1, timeout=0.5)
            _pump_ray(events, display)
            for ref in done:
                task = refs.pop(ref)
                refs.update({submit(t): t for t in gate.done(task.name)})
                try:
                    result = ray.get(ref)
                except Exception as e:   # noqa: BLE001 — a lost worker or node: a failed row
                    result = {"name": task.name, "ok": False, "artifact": None, "files": None, "dataset": None,
                              "seconds": None, "error": f"the Ray task failed: {type(e).__name__}: {e}"}
                on_done(result)
    except KeyboardInterrupt:
        for ref in refs:
            ray.cancel(ref, force=True)
        raise
    finally:
        if started:
            ray.shutdown()


def _pump_ray(events, display: Display) -> None:
    if events is None:
        return
    try:
        while not events.empty():
            name, stage = events.get_nowait()
            display.stage(name, stage)
    except Exception:   # noqa: BLE001 — queue actor gone
        pass
