"""A sweep's ``dataset:``: every variant is also scored on that data set on ONNX Runtime, and that score
ranks the variants; it equals ``medlite eval --model ARTIFACT`` on the same data. ``--bench`` adds
decode tokens/s and time to first token measured on this machine."""
from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow    # ~40 s: one tiny build, its evaluation and a short benchmark

SWEEP = """
name: tiny-data
recipe: xavier-agx-fp16
overrides: [evaluation.max_samples=8, engines.max_prompt_tokens=512, check.min_agreement=null,
            check.max_closed_acc_drop=null, check.min_vision_cosine=null, check.max_mean_kl=null]
variants:
  - {name: fp32, overrides: [export.precision=fp32]}
dataset: {dataset: "builtin:micro-med-vqa", split: test, limit: 6}
targets: [cpu-x86_64]
"""


def test_dataset_scores_and_bench(tiny_sweep, tmp_path, capsys):
    from medlite.cli import main

    f = tmp_path / "data.yaml"
    f.write_text(SWEEP)
    args = list(tiny_sweep["args"])
    args[1] = str(f)
    out = tmp_path / "out"
    assert main(args + ["--out", str(out), "--bench", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    (row,) = res["rows"]
    assert res["accuracy_from"].startswith("builtin:micro-med-vqa [test]")
    assert main(["eval", "--json", "--quiet", "--model", row["artifact"], "--limit", "6",
                 "--cache-dir", str(tiny_sweep["cache"])]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert row["dataset"]["closed_accuracy"] == ev["metrics"]["closed_accuracy"]
    assert row["dataset"]["n"] == ev["metrics"]["n"] == 6
    assert res["recommendations"]["cpu-x86_64"]["accuracy"] == ev["metrics"]["closed_accuracy"]
    assert row["bench"]["ttft_ms"] > 0 and row["bench"]["decode_tokens_per_s"] > 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"][0]["bench"] == row["bench"]
