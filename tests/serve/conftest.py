"""Fixtures for the ``medlite serve`` tests: a real artifact built from the demo model, test images."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from serve_helpers import run_cli

# Export + a small check stage: real gate results for the page, on a dozen held-out questions.
RECIPE = """\
name: serve-test
version: 0.1.0
target: jetson-xavier-agx-32gb
evaluation: {dataset: "builtin:micro-med-vqa", split: test}
stages:
  - export: {precision: fp32, opset: 17}
  - check: {max_samples: 12, max_new_tokens: 8, min_agreement: 0.9}
"""


@pytest.fixture(scope="session")
def serve_artifact(tmp_path_factory) -> Path:
    """A built artifact of the demo model (the public CLI: independent of how builds are organised)."""
    root = tmp_path_factory.mktemp("serve-artifact")
    recipe = root / "serve-test.yaml"
    recipe.write_text(RECIPE)
    res = run_cli("--quiet", "build", str(recipe), "--out", str(root / "artifacts"), "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    assert out["status"] == "passed", out
    return Path(out["artifact"])


@pytest.fixture(scope="session")
def ct_small() -> Path:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("CT_small.dcm"))


@pytest.fixture(scope="session")
def mr_small() -> Path:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("MR_small.dcm"))


@pytest.fixture(scope="session")
def int8_artifact(tmp_path_factory) -> Path:
    """A small artifact (tiny random model, ~30 s) whose vision graph carries the INT8 stage's own
    quantization record, in a folder whose name is not its version (a copy, as users make them)."""
    from medlite.recipes.options import QuantizeOptions  # first: the stages import the recipe registry
    from medlite.artifacts import FORMAT, write_manifest  # noqa: I001
    from medlite.checkpoints import load_model
    from medlite.checkpoints.random_ckpt import write_random_checkpoint
    from medlite.compress.int8.stage import GraphChoice, _record
    from medlite.context import RunContext
    from medlite.export import export_onnx

    root = tmp_path_factory.mktemp("int8-artifact")
    ctx = RunContext(cache_dir=root / "cache", quiet=True)
    ckpt = write_random_checkpoint("tiny", root / "ckpt", fmt="legacy", ctx=ctx)
    out = root / "my-copy"
    export_onnx(load_model(ckpt, ctx=ctx), out, ctx=ctx, precision="fp32")
    cfg_path = out / "medlite_runtime.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["graphs"]["vision"]["quantization"] = _record(GraphChoice(graph="vision", targets=[]),
                                                      QuantizeOptions(vision="int8"), None)
    cfg_path.write_text(json.dumps(cfg, indent=1, sort_keys=True) + "\n")
    write_manifest(out, {"format": FORMAT, "model": "tiny", "recipe": {"name": "int8-test", "version": "0.1.0"},
                         "version": "0.1.0+abc1234", "status": "passed", "gates": []})
    return out
