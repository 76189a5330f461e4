"""The shipped demo sweep (``recipes/sweeps/demo-precision.yaml``) on the demo model, plus one variant made
to fail through the sweep file (an impossible context: 100 million new tokens × batch 64, refused by the
budget check before its weights load). Run once with the local executor (a module fixture) and:

* local: the table, the plot (a PNG with one point per built variant), a recommendation per target, every
  figure equal to the variant's own report.json, the invalid combination listed with its rule, the failing
  variant an error row, and the variants that share the 25 % prune + distill prefix reusing it;
* Ray (``ray.init(num_cpus=2)`` started by the test, shut down after): the same sweep into its own ``--out``
  builds and checks its own artifacts — resuming the prune + distill prefixes the local run put in the
  shared stage-output cache, so only quantize → export → check → engines run again — and gives the same
  table (identical metrics, each equal to its own report.json), the same recommendations, the same failed
  and invalid rows."""
from __future__ import annotations

from pathlib import Path

import pytest

from sweep_helpers import comparable, read_json, rows_by_name

pytestmark = pytest.mark.slow

IMPOSSIBLE = "impossible-context"
BUILT = ["llm-w8a8_vision-int8", "llm-w8a8_vision-fp16", "llm-w4a16_vision-int8", "mlp50_llm-w8a8_vision-int8"]
SHARED_PREFIX = BUILT[:3]          # the 25 % variants: one prune + distill prefix


@pytest.fixture(scope="module")
def demo_sweep_file(tmp_path_factory) -> Path:
    """The shipped sweep file with the failing variant appended (``recipe:`` is a shipped name: found anywhere)."""
    import yaml

    from medlite.recipes.loader import builtin_dir

    spec = yaml.safe_load((builtin_dir() / "sweeps" / "demo-precision.yaml").read_text(encoding="utf-8"))
    spec["variants"].append({"name": IMPOSSIBLE,
                             "overrides": ["engines.max_new_tokens=100000000", "engines.max_batch=64"]})
    f = tmp_path_factory.mktemp("demo-sweep") / "demo-precision.yaml"
    f.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return f


@pytest.fixture(scope="module")
def demo_local(demo_sweep_file):
    """``(exit code, results.json, out)`` of the local executor (``--jobs 1``), computed once for both tests."""
    from medlite.cli import main

    out = demo_sweep_file.parent / "local"
    rc = main(["sweep", str(demo_sweep_file), "--out", str(out), "--quiet"])
    return rc, read_json(out / "results.json"), out


def _check_rows_against_reports(res: dict, out: Path) -> dict:
    """Every built row's figures equal its own artifact's report.json (an artifact under ``out``)."""
    rows = rows_by_name(res)
    assert [r["variant"] for r in res["rows"] if r["status"] in ("passed", "failed gates")] == BUILT
    for name in BUILT:
        row, folder = rows[name], Path(rows[name]["artifact"])
        assert folder.is_relative_to(out), (name, folder)
        rep = read_json(folder / "report.json")
        m = rep["metrics"]
        assert (row["closed_acc"], row["drop"], row["agreement"], row["mean_kl"]) == \
            (m["artifact_closed_acc"], m["closed_acc_drop"], m["agreement"], m["mean_kl"])
        assert row["memory_bytes"]["jetson-xavier-agx-32gb"] == rep["device_memory"]["total_bytes"]
        assert row["failed_gates"] == [g["name"] for g in rep["gates"] if g["passed"] is False]
    assert rows["llm-w4a16_vision-fp16"]["status"] == "invalid" and "int8 engines" in rows["llm-w4a16_vision-fp16"]["error"]
    assert rows[IMPOSSIBLE]["status"] == "error" and "device memory" in rows[IMPOSSIBLE]["error"]
    return rows


def _resumed(rows: dict, names) -> list[bool]:
    """Which variants resumed after the distill stage (stages[1]) from the stage-output cache."""
    return [read_json(Path(rows[n]["artifact"]) / "build-info.json")["timings"].get("resumed_after_stage") == 1
            for n in names]


@pytest.mark.timeout(1800)    # four demo-model builds (~5-10 min on 2 cores)
def test_demo_sweep(demo_local):
    from PIL import Image

    rc, res, out = demo_local
    assert rc == 1, [r["error"] for r in res["rows"]]        # the impossible variant's build failed, only it
    assert [r["variant"] for r in res["rows"] if r["status"] == "error"] == [IMPOSSIBLE]
    rows = _check_rows_against_reports(res, out)
    with Image.open(out / "plot.png") as im:
        im.load()
        assert im.format == "PNG"
    assert res["plot_points"] == 4
    built = [rows[n] for n in BUILT]
    for target in ("jetson-xavier-agx-32gb", "jetson-xavier-nx-8gb", "cpu-x86_64"):
        rec = res["recommendations"][target]
        assert rec is not None, target
        ok = [r for r in built if r["status"] == "passed" and r["fits"][target]]
        assert rec["accuracy"] == max(r["closed_acc"] for r in ok)
        assert Path(rec["recipe"]).is_file()
    # the 25 % variants share one prune + distill prefix: all but (at most) the first resumed it
    assert sum(_resumed(rows, SHARED_PREFIX)) >= 2


@pytest.mark.timeout(2400)    # the Ray run (~2-4 min: prefixes cached) + the local fixture when run alone
def test_ray_gives_the_demo_table(demo_sweep_file, demo_local):
    try:
        import ray
    except ImportError:
        pytest.skip("Ray is not installed (pip install 'medlite[ray]'): the Ray executor is not tested")
    from medlite.cli import main

    _, local, local_out = demo_local
    out = demo_sweep_file.parent / "ray"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        rc = main(["sweep", str(demo_sweep_file), "--out", str(out), "--quiet", "--executor", "ray"])
    finally:
        ray.shutdown()
    assert rc == 1
    res = read_json(out / "results.json")
    rows = _check_rows_against_reports(res, out)      # its own artifacts, checked by its own builds
    # independent builds: the prefixes came from the stage-output cache, quantize → check ran again
    assert all(_resumed(rows, BUILT)), _resumed(rows, BUILT)
    assert all(not r.get("reused") for r in res["rows"])
    want = rows_by_name(local)
    assert list(rows) == list(want)
    for name in want:
        assert comparable(rows[name]) == comparable(want[name]), name
    strip = lambda recs: {t: {k: v for k, v in r.items() if k not in ("artifact", "recipe")} for t, r in recs.items()}
    assert strip(res["recommendations"]) == strip(local["recommendations"])
    assert res["plot_points"] == local["plot_points"] == 4
    assert not list(out.glob(".shared-fs-*"))                # the shared-file-system marker is removed
