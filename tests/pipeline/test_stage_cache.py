"""The stage-output cache: a changed quantize option resumes after the cached distilled model, the
artifact equals one built with an empty cache, and a corrupted entry is detected and rebuilt.

Runs the shipped ``prune-distill-int8`` recipe on a tiny random checkpoint, with overrides that keep
it to seconds (4 distillation steps, 8 calibration pairs, no INT8 sensitivity pass)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from medlite.cli import main

pytestmark = pytest.mark.slow

SMALL = ["distill.steps=4", "distill.eval_every=2", "distill.patience=1", "calibration.samples=8",
         "quantize.sensitivity=false", "evaluation.max_samples=8", "check.max_closed_acc_drop=null",
         "check.min_agreement=null", "check.min_vision_cosine=null", "check.max_mean_kl=null"]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from medlite.checkpoints.random_ckpt import write_random_checkpoint
    from medlite.context import RunContext

    root = tmp_path_factory.mktemp("ckpt")
    write_random_checkpoint("tiny", root / "tiny", fmt="legacy", ctx=RunContext(cache_dir=root / "cache", quiet=True))
    return root / "tiny"


def _build(capsys, ckpt, cache: Path, out: Path, alpha: float) -> dict:
    rc = main(["build", "prune-distill-int8", "--quiet", "--json", "--cache-dir", str(cache), "--model", str(ckpt),
               "--vision-tower", str(ckpt / "vision_tower"), "--out", str(out), *SMALL,
               f"quantize.smoothquant_alpha={alpha}"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    res = json.loads(captured.out)
    res["stderr"] = captured.err
    return res


def _line(res: dict, name: str) -> str:
    return next(s["detail"] for s in res["stages"] if s["name"] == name)


def _files(res: dict) -> dict:
    manifest = json.loads((Path(res["artifact"]) / "manifest.json").read_text())
    return {k: v["sha256"] for k, v in manifest["files"].items()}


def test_changed_quantize_option_resumes_after_distill(tmp_path, capsys, tiny_ckpt):
    from medlite.pipeline.stage_cache import StageCache

    cache = tmp_path / "cache"
    first = _build(capsys, tiny_ckpt, cache, tmp_path / "a", 0.5)
    assert "resumed" not in _line(first, "distill")
    entries = StageCache(cache).entries()
    assert sorted(e.stage for e in entries) == ["stages[0].prune", "stages[1].distill"]

    second = _build(capsys, tiny_ckpt, cache, tmp_path / "b", 0.6)
    for name in ("prune", "distill"):      # replayed from the cache: no importance pass, no training step
        assert "resumed from the stage cache" in _line(second, name), second["stages"]
    info = json.loads((Path(second["artifact"]) / "build-info.json").read_text())
    assert info["timings"]["resumed_after_stage"] == 1
    assert second["version"] != first["version"]

    cold = _build(capsys, tiny_ckpt, tmp_path / "empty-cache", tmp_path / "c", 0.6)
    assert "resumed" not in _line(cold, "distill")
    assert cold["version"] == second["version"]
    assert _files(cold) == _files(second)          # the same artifact, byte for byte

    # a flipped byte in the distilled entry: detected, reported, removed, rebuilt
    entry = next(e for e in StageCache(cache).entries() if e.stage == "stages[1].distill")
    blob = bytearray((entry.path / "model.pt").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (entry.path / "model.pt").write_bytes(bytes(blob))
    again = _build(capsys, tiny_ckpt, cache, tmp_path / "d", 0.7)
    assert "is corrupted" in again["stderr"] and "model.pt" in again["stderr"]
    assert "resumed from the stage cache" in _line(again, "prune")     # the prune entry is intact
    assert "resumed" not in _line(again, "distill")                    # distillation ran again
    assert any(e.stage == "stages[1].distill" for e in StageCache(cache).entries())


def test_cache_ls_and_clear(tmp_path, capsys):
    from medlite.pipeline.stage_cache import StageCache

    cache = StageCache(tmp_path)
    root = tmp_path / "stages"
    for i, size in enumerate((3000, 2000, 1000)):
        d = root / f"k{i}"
        d.mkdir(parents=True)
        (d / "model.pt").write_bytes(b"x" * size)
        (d / "entry.json").write_text(json.dumps({"stage": f"stages[{i}].prune", "recipe": "r", "created": i}))
        (d / "last-used").write_text(f"{100 + i}\n")
    assert [e.key for e in cache.entries()] == ["k2", "k1", "k0"]       # most recently used first
    removed = cache.evict(3500)
    assert [e.key for e in removed] == ["k0"]                              # least recently used goes first
    assert main(["cache", "ls", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "k1" in out and "k2" in out and "2 entries" in out
    assert main(["cache", "clear", "--cache-dir", str(tmp_path)]) == 0
    assert "removed 2 entries" in capsys.readouterr().out
    assert cache.entries() == []


def test_a_bad_cache_limit_is_one_line_naming_the_variable(monkeypatch, tmp_path, capsys):
    from medlite.pipeline.stage_cache import limit_bytes

    monkeypatch.setenv("MEDLITE_STAGE_CACHE_GB", "2.5")
    assert limit_bytes() == 2_500_000_000
    monkeypatch.setenv("MEDLITE_STAGE_CACHE_GB", "lots")
    assert main(["cache", "ls", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MEDLITE_STAGE_CACHE_GB='lots'" in err[0]
