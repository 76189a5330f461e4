"""``medlite sweep --executor ray`` on a local Ray instance the test starts (``ray.init(num_cpus=2)``, shut
down after): the same rows and recommendations as the local executor, the failing variant a failed
row in both. The workers return their artifacts to the driver (``--return-artifacts``: the path for a
cluster without a shared file system), which writes them under ``--out``."""
from __future__ import annotations

import pytest

from sweep_helpers import comparable, rows_by_name

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]   # ~1-2 min: Ray start-up + three tiny builds

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_instance():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def test_ray_gives_the_local_table(tiny_sweep, local_result, ray_instance):
    import json
    from pathlib import Path

    from medlite import artifacts as af
    from medlite.cli import main

    _, local, _ = local_result
    out = tiny_sweep["root"] / "ray"
    rc = main(tiny_sweep["args"] + ["--out", str(out), "--executor", "ray", "--return-artifacts"])
    assert rc == 1
    res = json.loads((out / "results.json").read_text())
    got, want = rows_by_name(res), rows_by_name(local)
    assert list(got) == list(want)
    for name in want:
        assert comparable(got[name]) == comparable(want[name]), name
    assert got["huge-context"]["status"] == "error" and got["opset18"]["status"] == "invalid"
    strip = lambda recs: {t: {k: v for k, v in r.items() if k not in ("artifact", "recipe")} for t, r in recs.items()}
    assert strip(res["recommendations"]) == strip(local["recommendations"])
    # the artifacts came back to the driver's --out, intact
    for name in ("precision-fp32", "precision-fp16", "strict"):
        folder = Path(got[name]["artifact"])
        assert folder.is_relative_to(out) and af.verify_files(folder) == []
    assert not list(out.glob(".shared-fs-*"))
