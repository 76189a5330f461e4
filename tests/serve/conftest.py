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
