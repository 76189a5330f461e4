"""The build contract: gates compare against the untouched source, never the working model.

A deliberately damaging stage (it zeroes a decoder layer of the working model) must make the build
FAIL its gates, the failing gate lines naming the drop; the same build without the damage passes.
"""
from __future__ import annotations

import dataclasses
import json

import pytest

from medlite.pipeline.contract import StageResult
from medlite.cli import main

RECIPE = """\
name: contract
version: 1.0.0
target: jetson-xavier-agx-32gb
calibration: {samples: 8}
evaluation: {max_samples: 24}
stages:
  - prune: {mlp: 0.25}
  - export: {precision: fp32, opset: 17}
  - check:
      max_closed_acc_drop: null     # a random tiny model has no meaningful accuracy
      min_agreement: null
      max_mean_kl: 0.001
      min_vision_cosine: 0.999
"""


def zero_decoder_layer(state, index, opts):
    """Damage the working model: layer 0's attention output and MLP output projections become zero."""
    import torch

    layer = state.model.model.model.language_model.layers[0]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    return StageResult(summary="zeroed decoder layer 0 (test)", changed=["language_model.layers.0"])


def leave_untouched(state, index, opts):
    return StageResult(summary="no change (test)")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from medlite.checkpoints.random_ckpt import write_random_checkpoint
    from medlite.context import RunContext

    root = tmp_path_factory.mktemp("ckpt")
    write_random_checkpoint("tiny", root / "tiny", fmt="legacy", ctx=RunContext(cache_dir=root / "cache", quiet=True))
    return root / "tiny"


def _build(tmp_path, monkeypatch, capsys, ckpt, runner):
    from medlite.recipes import registry

    monkeypatch.setitem(registry.STAGES, "prune", dataclasses.replace(registry.STAGES["prune"], runner=runner))
    recipe = tmp_path / "contract.yaml"
    recipe.write_text(RECIPE)
    rc = main(["--quiet", "--cache-dir", str(tmp_path.parent / "shared-cache"), "build", str(recipe), "--model",
               str(ckpt), "--vision-tower", str(ckpt / "vision_tower"), "--out", str(tmp_path / "out"), "--json"])
    captured = capsys.readouterr()
    return rc, json.loads(captured.out), captured.err


def test_damaging_stage_fails_the_gates(tmp_path, monkeypatch, capsys, tiny_ckpt):
    rc, res, err = _build(tmp_path, monkeypatch, capsys, tiny_ckpt, zero_decoder_layer)
    assert rc == 1 and res["status"] == "failed"
    assert any(line.startswith("gate mean_kl: ") and " > 0.001" in line for line in res["failed_gates"]), res
    assert "gate mean_kl" in err
    check = next(s for s in res["stages"] if s["name"] == "check")
    assert check["ok"] is False            # printed with ✗, never ✓
    with open(res["artifact"] + "/manifest.json", encoding="utf-8") as f:
        manifest = json.load(f)
    assert manifest["sections"]["prune"]["changed"] == ["language_model.layers.0"]
    assert manifest["references"]["questions"] == 24


def test_same_build_without_damage_passes(tmp_path, monkeypatch, capsys, tiny_ckpt):
    rc, res, _ = _build(tmp_path, monkeypatch, capsys, tiny_ckpt, leave_untouched)
    assert rc == 0 and res["status"] == "passed", res["failed_gates"]
    assert all(s["ok"] for s in res["stages"])
    mk = res["metrics"]
    assert mk["mean_kl"] < 1e-6 and mk["vision_cosine"] > 0.99999 and mk["n"] == 24
