"""On the demo model, ``medlite plan`` predicts the built INT8 artifact (issue 26 item 5): every file
within 5 %, and one device-memory figure in plan, engines.json, build_engines.sh and report.md.

One build (xavier-agx-int8, the recipe the issue measured) on the cached demo model, kept lean: fewer
calibration pairs and questions (file sizes do not depend on them) and no sensitivity pass, whose
fp16 layers are chosen during the build (the plan states the most they can add; checked below)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from medlite.cli import main

pytestmark = pytest.mark.slow
RECIPE = "xavier-agx-int8"
LEAN = ["calibration.samples=32", "evaluation.max_samples=16", "quantize.sensitivity=false",
        "check.min_agreement=null", "check.max_mean_kl=null", "check.max_closed_acc_drop=null",
        "check.min_vision_cosine=null"]


def test_plan_predicts_the_built_int8_artifact(tmp_path, capsys):
    from medlite.units import human_bytes

    assert main(["plan", RECIPE, "--json"]) == 0
    shipped = json.loads(capsys.readouterr().out)
    assert main(["plan", RECIPE, *LEAN, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert shipped["files"] == plan["files"] and shipped["budget"] == plan["budget"]
    note = next(s["does"] for s in shipped["stages"] if s["stage"] == "export")
    assert "layers the sensitivity pass keeps fp16 add at most vision.onnx +" in note
    assert main(["build", RECIPE, *LEAN, "--out", str(tmp_path / "artifacts"), "--json"]) == 0
    art = Path(json.loads(capsys.readouterr().out)["artifact"])
    graphs = {k: v for k, v in plan["files"].items() if v and not k.startswith("engines/")}
    built = {k: (art / k).stat().st_size for k in graphs}
    off = {k: round(graphs[k] / built[k] - 1, 4) for k in graphs}
    assert set(graphs) >= {"vision.onnx", "decoder.onnx", "embed_tokens.bin"}
    assert all(abs(v) <= 0.05 for v in off.values()), (off, graphs, built)

    mem = json.loads((art / "engines" / "engines.json").read_text())["memory"]
    sh = (art / "engines" / "build_engines.sh").read_text()
    report = (art / "report.md").read_text()
    assert f"# Estimated device memory: {mem['line']} (see engines.json)" in sh
    assert f"- estimated device memory {mem['line']}; " in report
    b = plan["budget"]
    # the same model on the same limits: KV cache, activations and reserve are equal; the weights are the
    # planned file sizes (within 5 %), so the totals agree to well under 1 %
    for part in ("KV cache", "activations", "runtime reserve"):
        assert b["parts"][part] == mem["parts"][part], part
    assert abs(b["parts"]["weights"] / mem["parts"]["weights"] - 1) <= 0.05
    assert abs(b["total"] / mem["total_bytes"] - 1) <= 0.01 and b["usable"] == mem["usable_bytes"]
    # ... and on the demo model (its 600 MB reserve dominates) plan shows the very figure the artifact shows
    assert human_bytes(b["total"]) == human_bytes(mem["total_bytes"]) and "0.00 GB" not in sh


PRUNE_LEAN = ["calibration.samples=16", "evaluation.max_samples=16", "distill.steps=2", "distill.eval_every=1",
              "distill.patience=1", "check.min_agreement=null", "check.max_closed_acc_drop=null",
              "check.min_vision_cosine=null"]


def test_plan_chains_through_pruning(tmp_path, capsys):
    """Issue 28: the plan of a pruned recipe shows the pruned language model and a smaller device-memory
    estimate than the unpruned fp16 recipe, and its files match the built artifact within 5 %."""
    assert main(["plan", "xavier-agx-fp16", "--json"]) == 0
    fp16 = json.loads(capsys.readouterr().out)
    assert main(["plan", "prune-mlp25", *PRUNE_LEAN, "--json"]) == 0
    pruned = json.loads(capsys.readouterr().out)
    assert pruned["params_after"]["llm"] < pruned["params"]["llm"] == fp16["params"]["llm"]
    assert pruned["files"]["decoder.onnx"] < fp16["files"]["decoder.onnx"]
    assert pruned["budget"]["parts"]["weights"] < fp16["budget"]["parts"]["weights"]
    assert pruned["budget"]["total"] < fp16["budget"]["total"]
    assert main(["build", "prune-mlp25", *PRUNE_LEAN, "--out", str(tmp_path / "artifacts"), "--json"]) == 0
    art = Path(json.loads(capsys.readouterr().out)["artifact"])
    graphs = {k: v for k, v in pruned["files"].items() if v and not k.startswith("engines/")}
    off = {k: round(graphs[k] / (art / k).stat().st_size - 1, 4) for k in graphs}
    assert "decoder.onnx" in off and all(abs(v) <= 0.05 for v in off.values()), off
    mem = json.loads((art / "engines" / "engines.json").read_text())["memory"]
    assert abs(pruned["budget"]["total"] / mem["total_bytes"] - 1) <= 0.01
