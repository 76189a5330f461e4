"""``medlite sweep`` with the local executor on a tiny random checkpoint: the table (CSV/JSON/Markdown),
the plot, a recommendation per target, failed and invalid rows — and every figure of the table equal to
the variant's own ``report.json`` / ``manifest.json`` / ``build-info.json``."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from sweep_helpers import BUILT, read_json, rows_by_name

pytestmark = pytest.mark.slow    # ~1 min on 2 cores: three tiny builds


def test_table_equals_each_report(local_result):
    rc, res, out = local_result
    assert rc == 1                                   # a variant's build failed (its row says why)
    rows = rows_by_name(res)
    assert list(rows) == ["precision-fp32", "precision-fp16", "strict", "huge-context", "opset18"]
    for name in BUILT:
        row = rows[name]
        folder = Path(row["artifact"])
        rep, man = read_json(folder / "report.json"), read_json(folder / "manifest.json")
        m = rep["metrics"]
        assert (row["closed_acc"], row["source_closed_acc"], row["drop"], row["agreement"], row["mean_kl"]) == \
            (m["artifact_closed_acc"], m["source_closed_acc"], m["closed_acc_drop"], m["agreement"], m["mean_kl"])
        assert rep["metrics"] == man["metrics"] and row["version"] == man["version"] == rep["version"]
        # the recipe's own target: exactly the report's device-memory estimate
        assert row["memory_bytes"]["jetson-xavier-agx-32gb"] == rep["device_memory"]["total_bytes"]
        # another Xavier: the same memory model with the recipe's engines options (only the budget differs)
        assert row["memory_bytes"]["jetson-xavier-nx-8gb"] == rep["device_memory"]["total_bytes"]
        assert row["memory_bytes"]["cpu-x86_64"] < row["memory_bytes"]["jetson-xavier-agx-32gb"]  # no TRT reserve
        rt = read_json(folder / "medlite_runtime.json")
        assert row["graph_bytes"] == {g: sum(rep["files"][f] for f in [info["file"], *info.get("data_files", [])])
                                      for g, info in rt["graphs"].items()}     # each graph with its external data
        assert row["build_seconds"] == read_json(folder / "build-info.json")["seconds"]
        assert row["failed_gates"] == [g["name"] for g in rep["gates"] if g["passed"] is False]
        assert row["status"] == ("passed" if rep["status"] == "passed" else "failed gates")
    assert rows["strict"]["status"] == "failed gates" and rows["strict"]["failed_gates"] == ["mean_kl"]
    assert rows["precision-fp16"]["status"] == "passed"
    assert rows["huge-context"]["status"] == "error" and "KV cache dominates" in rows["huge-context"]["error"]
    assert rows["opset18"]["status"] == "invalid" and "opset 18 is above 17" in rows["opset18"]["error"]
    assert rows["opset18"]["overrides"] == ["export.opset=18"]


def test_csv_and_markdown_match_json(local_result):
    _, res, out = local_result
    with open(out / "results.csv", newline="") as f:
        table = {r["variant"]: r for r in csv.DictReader(f)}
    for row in res["rows"]:
        c = table[row["variant"]]
        assert c["status"] == row["status"]
        if row["closed_acc"] is not None:
            assert float(c["agreement"]) == pytest.approx(row["agreement"], rel=1e-6)
            assert int(c["memory_cpu-x86_64"]) == row["memory_bytes"]["cpu-x86_64"]
            assert int(c["bytes_total"]) == sum(row["graph_bytes"].values())
        assert (c["pareto"] == "yes") == row["pareto"]
    md = (out / "results.md").read_text()
    assert all(f"{r['variant']} |" in md for r in res["rows"]) and "## Recommendation per target" in md


def test_plot_and_recommendations(local_result):
    from PIL import Image

    _, res, out = local_result
    with Image.open(out / "plot.png") as im:
        im.load()
        assert im.format == "PNG" and im.size[0] >= 800
    assert res["plot_points"] == len(BUILT)
    pareto = [r["variant"] for r in res["rows"] if r["pareto"]]
    assert pareto and set(pareto) <= set(BUILT)
    for target in ("jetson-xavier-agx-32gb", "jetson-xavier-nx-8gb", "cpu-x86_64"):
        rec = res["recommendations"][target]
        passing = [r for r in res["rows"] if r["status"] == "passed"]
        best = max(r["closed_acc"] for r in passing)
        assert rec["variant"] in {r["variant"] for r in passing} and rec["accuracy"] == best
        text = Path(rec["recipe"]).read_text()
        assert f"name: tiny.{rec['variant']}" in text and "# rebuild: medlite build" in text
        # the written recipe is the artifact's resolved recipe: it loads and names the same stages
        from medlite.recipes import load_recipe

        assert load_recipe(rec["recipe"]).recipe.to_dict() == load_recipe(Path(rec["artifact"]) / "recipe.yaml").recipe.to_dict()
