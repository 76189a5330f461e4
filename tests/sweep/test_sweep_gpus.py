"""``medlite sweep --device`` reaches every variant's build, and each Ray task declares its GPUs
(``--gpus-per-variant``, default 1 on CUDA, 0 on the CPU) — checked on this GPU-less machine with a
recording stand-in for Ray whose tasks run in-process up to the build, which records its device and stops.
Local CUDA builds run one at a time; impossible combinations are one line before anything builds."""
from __future__ import annotations

import sys
import types

import pytest

from sweep_helpers import read_json, rows_by_name


class _Ref:
    def __init__(self, result):
        self.result = result


class _Remote:
    """``ray.remote(**opts)(fn)``: ``.options(**more)`` and ``.remote(*args)`` (runs ``fn`` now, recording)."""

    def __init__(self, fake, opts, fn=None):
        self.fake, self.opts, self.fn = fake, opts, fn

    def __call__(self, fn):
        return _Remote(self.fake, self.opts, fn)

    def options(self, **more):
        return _Remote(self.fake, {**self.opts, **more}, self.fn)

    def remote(self, task, events):
        self.fake.calls[task.name] = dict(self.opts)
        return _Ref(self.fn(task, events))


def _fake_ray():
    fake = types.ModuleType("ray")
    fake.calls = {}
    fake.is_initialized = lambda: True               # "the caller started Ray": run_ray neither inits nor shuts down
    fake.remote = lambda **opts: _Remote(fake, opts)
    fake.wait = lambda refs, num_returns=1, timeout=None: (refs[:1], refs[1:])
    fake.get = lambda ref: ref.result
    fake.cancel = lambda ref, force=False: None
    return fake


@pytest.fixture
def recorded(monkeypatch):
    """The stand-in Ray in ``sys.modules`` and ``medlite.pipeline.pipeline.build`` replaced by a recorder that
    raises (every built variant becomes an error row): ``(fake ray, {variant recipe name: device})``."""
    import torch

    import medlite.pipeline.pipeline as pipeline
    from medlite.errors import MedliteError
    from medlite.sweep.variant import THREAD_VARS

    fake, devices = _fake_ray(), {}
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setitem(sys.modules, "ray.util.queue", None)      # no progress queue (never the real Ray)
    for var in THREAD_VARS:                                        # run_variant sets them in this process
        monkeypatch.setenv(var, "1")
    threads = torch.get_num_threads()

    def build(resolved, choice, out_root, ctx, *, force=False, device=None):
        devices[resolved.recipe.name] = device
        raise MedliteError("stub build: device recorded")

    monkeypatch.setattr(pipeline, "build", build)
    yield fake, devices
    torch.set_num_threads(threads)


BUILT = {"precision-fp32", "precision-fp16", "strict"}      # huge-context stops at its budget check


@pytest.mark.parametrize("flags, device, gpus", [
    (["--device", "cuda"], "cuda", 1.0),
    (["--device", "cuda", "--gpus-per-variant", "0.5"], "cuda", 0.5),
    (["--device", "cpu"], "cpu", None),
    ([], None, None),
])
def test_ray_tasks_declare_gpus_and_builds_get_the_device(tiny_sweep, recorded, tmp_path, flags, device, gpus):
    from medlite.cli import main

    fake, devices = recorded
    out = tmp_path / "out"
    rc = main(tiny_sweep["args"] + ["--out", str(out), "--executor", "ray"] + flags)
    assert rc == 1                                       # every variant failed (the stub build)
    rows = rows_by_name(read_json(out / "results.json"))
    assert {n for n, r in rows.items() if "stub build" in (r["error"] or "")} == BUILT
    assert set(fake.calls) == BUILT | {"huge-context"}
    for name, opts in fake.calls.items():
        assert opts.get("num_gpus") == gpus, (name, opts)
        assert opts["num_cpus"] == 2 and opts["max_retries"] == 0
        assert opts["max_calls"] == 1                    # a fresh worker process per variant
    assert {n.split(".", 1)[1]: d for n, d in devices.items()} == {n: device for n in BUILT}


@pytest.mark.parametrize("flags, message", [
    (["--device", "cuda"], "sees no CUDA device"),                          # local: resolved before any build
    (["--device", "cuda", "--jobs", "2"], "local GPU builds run one at a time"),
    (["--gpus-per-variant", "1"], "use it with --executor ray"),
    (["--executor", "ray", "--device", "cuda", "--gpus-per-variant", "0"], "Ray hides the GPUs"),
    (["--executor", "ray", "--device", "cuda:1"], "use --device cuda"),
    (["--executor", "ray", "--device", "cpu", "--gpus-per-variant", "1"], "never use"),
    (["--executor", "ray", "--gpus-per-variant", "1.5"], "whole number"),
    (["--device", "gpu"], "is not a device"),
])
def test_impossible_device_choices_are_one_line(tiny_sweep, tmp_path, capsys, flags, message):
    import torch

    from medlite.cli import main

    if torch.cuda.is_available() and flags == ["--device", "cuda"]:
        pytest.skip("this machine has CUDA: --device cuda is valid here")
    out = tmp_path / "out"
    rc = main(tiny_sweep["args"] + ["--out", str(out)] + flags)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (out / "artifacts").exists()              # nothing built, nothing half-written


def test_a_cuda_build_has_its_own_resume_key():
    from types import SimpleNamespace

    from medlite.recipes.loader import builtin_dir
    from medlite.sweep.commands import variant_key
    from medlite.sweep.gpus import Placement
    from medlite.sweep.spec import load_sweep

    v = next(v for v in load_sweep(builtin_dir() / "sweeps" / "demo-precision.yaml").variants if v.valid)
    choice = SimpleNamespace(label="demo")
    keys = {d: variant_key(v, choice, Placement("ray", d)) for d in (None, "cpu", "cuda", "cuda:0")}
    assert keys[None] == keys["cpu"] == v.key("demo")     # CPU keys unchanged (earlier sweeps resume)
    assert keys["cuda"] == keys["cuda:0"] != keys[None]
