"""A tiny random checkpoint and a small sweep on it (the shipped fp16 recipe: export → check → engines),
run once with the local executor and shared by the tests that compare against it.

The sweep has two axis variants (fp32, fp16), one that fails its KL gate (``strict``), one whose build
fails (``huge-context``: a 100-million-token context the target cannot hold, refused by the budget
check the worker runs before any weight loads) and one invalid variant (``opset18``: above TensorRT
8.5's opset, a recipe rule)."""
from __future__ import annotations

import json

import pytest

SWEEP = """
name: tiny
recipe: xavier-agx-fp16
overrides: [evaluation.max_samples=8, engines.max_prompt_tokens=512, check.min_agreement=0.5,
            check.max_closed_acc_drop=null, check.min_vision_cosine=null, check.max_mean_kl=null]
axes:
  export.precision: [fp32, fp16]
variants:
  - {name: strict, overrides: [export.precision=fp16, check.max_mean_kl=1.0e-12]}
  - {name: huge-context, overrides: [engines.max_new_tokens=100000000, engines.max_batch=64]}
  - {name: opset18, overrides: [export.opset=18]}
targets: [jetson-xavier-agx-32gb, jetson-xavier-nx-8gb, cpu-x86_64]
"""


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory):
    """``{"root", "ckpt", "cache", "file", "args"}``: the checkpoint, a cache, the sweep file and the CLI
    arguments that name them (append ``--out DIR``)."""
    from medlite.checkpoints.random_ckpt import write_random_checkpoint
    from medlite.context import RunContext

    root = tmp_path_factory.mktemp("sweep")
    ckpt, cache = root / "tiny", root / "cache"
    write_random_checkpoint("tiny", ckpt, fmt="legacy", ctx=RunContext(cache_dir=cache, quiet=True))
    f = root / "tiny.yaml"
    f.write_text(SWEEP)
    args = ["sweep", str(f), "--quiet", "--cache-dir", str(cache), "--model", str(ckpt),
            "--vision-tower", str(ckpt / "vision_tower")]
    return {"root": root, "ckpt": ckpt, "cache": cache, "file": f, "args": args}


@pytest.fixture(scope="session")
def local_result(tiny_sweep):
    """The sweep run with ``--executor local --jobs 2``: ``(exit code, results.json, out folder)``."""
    from medlite.cli import main

    out = tiny_sweep["root"] / "local"
    rc = main(tiny_sweep["args"] + ["--out", str(out), "--jobs", "2"])
    return rc, json.loads((out / "results.json").read_text()), out
