"""The shipped demo sweep (``recipes/sweeps/demo-precision.yaml``) on the demo model, local executor:
the table, the plot (a PNG with one point per built variant), a recommendation per target, every figure
equal to the variant's own report.json, the invalid combination listed with its rule, and the variants
that share the 25 % prune + distill prefix reusing it from the stage-output cache."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]   # four demo-model builds (~5-10 min on 2 cores)


def test_demo_sweep(tmp_path, capsys):
    from PIL import Image

    from medlite.cli import main
    from medlite.recipes.loader import builtin_dir

    out = tmp_path / "demo"
    rc = main(["sweep", str(builtin_dir() / "sweeps" / "demo-precision.yaml"), "--out", str(out), "--quiet",
               "--json"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0, [r["error"] for r in res["rows"]]
    rows = {r["variant"]: r for r in res["rows"]}
    assert rows["llm-w4a16_vision-fp16"]["status"] == "invalid" and "int8 engines" in rows["llm-w4a16_vision-fp16"]["error"]
    built = [r for r in res["rows"] if r["status"] in ("passed", "failed gates")]
    assert len(built) == 4
    for row in built:
        rep = json.loads((Path(row["artifact"]) / "report.json").read_text())
        m = rep["metrics"]
        assert (row["closed_acc"], row["drop"], row["agreement"], row["mean_kl"]) == \
            (m["artifact_closed_acc"], m["closed_acc_drop"], m["agreement"], m["mean_kl"])
        assert row["memory_bytes"]["jetson-xavier-agx-32gb"] == rep["device_memory"]["total_bytes"]
        assert row["failed_gates"] == [g["name"] for g in rep["gates"] if g["passed"] is False]
    with Image.open(out / "plot.png") as im:
        im.load()
        assert im.format == "PNG"
    assert res["plot_points"] == 4
    for target in ("jetson-xavier-agx-32gb", "jetson-xavier-nx-8gb", "cpu-x86_64"):
        rec = res["recommendations"][target]
        assert rec is not None, target
        ok = [r for r in built if r["status"] == "passed" and r["fits"][target]]
        assert rec["accuracy"] == max(r["closed_acc"] for r in ok)
        assert Path(rec["recipe"]).is_file()
    # the 25 % variants share one prune + distill prefix: all but (at most) the first resumed it
    resumed = []
    for name in ("llm-w8a8_vision-int8", "llm-w8a8_vision-fp16", "llm-w4a16_vision-int8"):
        info = json.loads((Path(rows[name]["artifact"]) / "build-info.json").read_text())
        resumed.append(info["timings"].get("resumed_after_stage") == 1)     # stages[1] is distill
    assert sum(resumed) >= 2, resumed
