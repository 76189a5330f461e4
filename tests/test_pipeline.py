"""``medlite build / verify / plan`` end to end on a random tiny checkpoint (export-only recipes).

The recipes here have no check stage: gates need the PyTorch reference generation and are covered
by tests/test_build_demo.py on the demo model.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medlite import artifacts as af
from medlite.cli import main

EXPORT_ONLY = """\
name: exp-only
version: 2.0.0
target: jetson-xavier-nx-8gb
stages:
  - export: {precision: fp16, opset: 17}
"""


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from medlite.checkpoints.random_ckpt import write_random_checkpoint
    from medlite.context import RunContext

    root = tmp_path_factory.mktemp("ckpt")
    write_random_checkpoint("tiny", root / "tiny", fmt="legacy", ctx=RunContext(cache_dir=root / "cache", quiet=True))
    return root / "tiny"


@pytest.fixture()
def recipe(tmp_path):
    p = tmp_path / "exp-only.yaml"
    p.write_text(EXPORT_ONLY)
    return p


def model_args(ckpt):
    return ["--model", str(ckpt), "--vision-tower", str(ckpt / "vision_tower")]


def build(tmp_path, recipe, ckpt, out, *extra, capsys=None):
    overrides = [e for e in extra if "=" in e]
    flags = [e for e in extra if "=" not in e]
    argv = ["--quiet", "--cache-dir", str(tmp_path / "cache"), "build", str(recipe), *overrides, *model_args(ckpt),
            "--out", str(out), "--json", *flags]
    rc = main(argv)
    res = json.loads(capsys.readouterr().out) if capsys else None
    return rc, res


def test_build_writes_a_complete_reproducible_artifact(tmp_path, recipe, tiny_ckpt, capsys):
    rc, res = build(tmp_path, recipe, tiny_ckpt, tmp_path / "a", capsys=capsys)
    assert rc == 0 and res["status"] == "passed" and not res["reused"]
    path = Path(res["artifact"])
    assert path.parent == tmp_path / "a" / "tiny" / "exp-only" and res["version"].startswith("2.0.0+")
    names = sorted(p.name for p in path.iterdir())
    for f in ("vision.onnx", "embed.onnx", "decoder.onnx", "medlite_runtime.json", "tokenizer.json",
              "recipe.yaml", "manifest.json", "report.md", "report.json", "build-info.json"):
        assert f in names
    m = json.loads((path / "manifest.json").read_text())
    assert set(m["files"]) == set(names) - {"manifest.json", "build-info.json"}
    assert m["status"] == "passed" and m["target"]["name"] == "jetson-xavier-nx-8gb"
    assert m["source"]["files"] and m["source"]["path"] == str(tiny_ckpt.resolve())
    assert m["packages"]["onnx"] and m["sections"]["export"]["trt_check"]["decoder"]["ok"]
    assert str(tmp_path / "a") not in (path / "manifest.json").read_text()    # no temporary/output paths
    assert af.read_latest(path.parent) == res["version"]
    # The saved recipe is the resolved one and validates again.
    from medlite.recipes import load_recipe

    assert load_recipe(path / "recipe.yaml").recipe.stage("export").precision == "fp16"

    # Same inputs, another output root and --force semantics: byte-identical files (build-info aside).
    rc, res2 = build(tmp_path, recipe, tiny_ckpt, tmp_path / "b", capsys=capsys)
    path2 = Path(res2["artifact"])
    assert res2["version"] == res["version"]
    for name in m["files"]:
        assert (path / name).read_bytes() == (path2 / name).read_bytes(), name
    assert (path / "manifest.json").read_bytes() == (path2 / "manifest.json").read_bytes()

    # A rebuild is reused after re-hashing; --force recomputes into the same version.
    rc, res3 = build(tmp_path, recipe, tiny_ckpt, tmp_path / "a", capsys=capsys)
    assert rc == 0 and res3["reused"] and res3["artifact"] == res["artifact"]
    rc, res4 = build(tmp_path, recipe, tiny_ckpt, tmp_path / "a", "--force", capsys=capsys)
    assert rc == 0 and not res4["reused"]
    assert (path / "manifest.json").read_bytes() == (path2 / "manifest.json").read_bytes()

    # An override changes the recipe, hence the version.
    rc, res5 = build(tmp_path, recipe, tiny_ckpt, tmp_path / "a", "export.precision=fp32", capsys=capsys)
    assert rc == 0 and res5["version"] != res["version"]
    assert json.loads((Path(res5["artifact"]) / "manifest.json").read_text())["sections"]["export"]["precision"] == "fp32"


def test_verify_names_a_tampered_file_and_damaged_artifacts_are_rebuilt(tmp_path, recipe, tiny_ckpt, capsys):
    rc, res = build(tmp_path, recipe, tiny_ckpt, tmp_path / "o", capsys=capsys)
    path = Path(res["artifact"])
    assert main(["verify", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["files_ok"]
    data = bytearray((path / "vision.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "vision.onnx").write_bytes(bytes(data))
    assert main(["verify", str(path)]) == 1
    err = capsys.readouterr().err
    assert "vision.onnx: sha256 mismatch (content changed)" in err
    # A later build notices the damage and rebuilds instead of reusing.
    rc, res2 = build(tmp_path, recipe, tiny_ckpt, tmp_path / "o", capsys=capsys)
    assert rc == 0 and not res2["reused"] and af.verify_files(path) == []


def test_ask_on_an_artifact_checks_its_hashes_and_follows_latest(tmp_path, recipe, tiny_ckpt, capsys):
    import numpy as np
    from PIL import Image

    rc, res = build(tmp_path, recipe, tiny_ckpt, tmp_path / "q", capsys=capsys)
    path = Path(res["artifact"])
    img = tmp_path / "scan.png"
    Image.fromarray((np.arange(64 * 64) % 251).reshape(64, 64).astype(np.uint8)).save(img)
    ask = ["--quiet", "ask", "is there a lesion?", "--image", str(img), "--max-new-tokens", "4"]
    assert main(ask[:2] + [str(path)] + ask[2:]) == 0
    answer = capsys.readouterr().out
    # OUT/<model>/<recipe> is its latest artifact
    assert main(ask[:2] + [str(path.parent)] + ask[2:]) == 0
    assert capsys.readouterr().out == answer
    data = bytearray((path / "decoder.onnx").read_bytes())
    data[len(data) // 3] ^= 0x01
    (path / "decoder.onnx").write_bytes(bytes(data))
    assert main(ask[:2] + [str(path)] + ask[2:]) != 0
    captured = capsys.readouterr()
    assert captured.out == "" and "decoder.onnx: sha256 mismatch" in captured.err


def test_killed_build_leaves_no_artifact_and_rerun_completes(tmp_path, recipe, tiny_ckpt):
    out = tmp_path / "k"
    parent = out / "tiny" / "exp-only"
    cmd = [sys.executable, "-m", "medlite.cli", "--quiet", "--cache-dir", str(tmp_path / "cache"), "build",
           str(recipe), *model_args(tiny_ckpt), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        # Kill as soon as the export has written its first graph into the staging folder.
        while not list(parent.glob(".tmp-*/vision.onnx")):
            assert proc.poll() is None, "build finished before it could be killed"
            assert time.time() < deadline
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    left = [p.name for p in parent.iterdir()]
    # Only the killed build's staging folder: no artifact, no latest.
    assert len(left) == 1 and re.fullmatch(rf"\.tmp-2\.0\.0\+[0-9a-f]{{7}}-{proc.pid}", left[0]), left
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in parent.iterdir())
    assert len(names) == 2 and names[1] == "latest" and names[0].startswith("2.0.0+")   # stale tmp removed
    assert af.verify_files(parent / names[0]) == []


def test_plan_estimates_without_building(tmp_path, recipe, tiny_ckpt, capsys):
    rc = main(["--cache-dir", str(tmp_path / "cache"), "plan", str(recipe), *model_args(tiny_ckpt), "--json"])
    assert rc == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["stages"][0]["stage"] == "export"
    from medlite.checkpoints import load_model
    from medlite.context import RunContext

    loaded = load_model(tiny_ckpt, ctx=RunContext(quiet=True), vision_tower=tiny_ckpt / "vision_tower")
    total = loaded.param_breakdown()["total"]["params"]
    assert sum(plan["params"].values()) == total             # every parameter counted once
    p = plan["params"]
    from medlite.recipes.file_sizes import STRUCTURE

    base, per_layer = STRUCTURE["decoder"]      # fp16: 2 bytes each, plus the graph's structure per layer
    layers = loaded.model.config.text_config.num_hidden_layers
    assert plan["files"]["decoder.onnx"] == 2 * (p["llm"] + p["lm_head"]) + base + per_layer * layers
    assert plan["files"]["embed_tokens.bin"] == 2 * p["embed"]
    assert not (tmp_path / "artifacts").exists()


CHECKED = """\
name: chk
version: 1.0.0
target: jetson-xavier-agx-32gb
evaluation: {max_samples: 4}
stages:
  - export: {precision: fp16}
  - check: {max_new_tokens: 4, max_mean_kl: 0.01, min_vision_cosine: 0.99, min_agreement: null}
"""
# Answers of a random-weight model come from near-uniform distributions, so greedy decoding can flip
# between fp32 and fp16 on a tie: agreement is measured but not gated here (it is on the demo model).


@pytest.fixture(scope="module")
def checked(tiny_ckpt, tmp_path_factory):
    """A passing export+check build of the tiny checkpoint: (tmp root, recipe path, JSON result)."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("checked")
    recipe = root / "chk.yaml"
    recipe.write_text(CHECKED)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc, _ = build(root, recipe, tiny_ckpt, root / "o")
    res = json.loads(buf.getvalue())
    assert rc == 0 and res["status"] == "passed", res
    return root, recipe, res


def test_gates_pass_and_verify_reproduces_them(checked, tiny_ckpt, capsys):
    root, recipe, res = checked
    m = res["metrics"]
    assert m["n"] == 4 and 0 < m["mean_kl"] < 0.01 and 0.99 < m["vision_cosine"] < 1.0   # fp16 is close, not equal
    good = Path(res["artifact"])
    assert {g["name"]: g["passed"] for g in res["gates"]} == {
        "closed_acc_drop": True, "agreement": None, "mean_kl": True, "vision_cosine": True}
    assert 0.0 <= m["agreement"] <= 1.0
    report = json.loads((good / "report.json").read_text())
    assert len(report["questions"]) == 4 and all(q["source"] is not None for q in report["questions"])
    # verify re-runs the gates with the runtime and reproduces the recorded metrics
    assert main(["--cache-dir", str(root / "cache"), "verify", str(good), *model_args(tiny_ckpt)[2:],
                 "--json"]) == 0
    v = json.loads(capsys.readouterr().out)
    assert v["ok"] and v["checks"]["ok"] and v["checks"]["metrics"]["mean_kl"] == m["mean_kl"]


def test_an_impossible_gate_fails_the_build_with_one_line_per_gate(checked, tiny_ckpt, capsys):
    # KL can never be below zero: the gate fails, the build exits 1 with one line per failed gate,
    # the artifact is kept and marked failed, and `latest` still names the passing one.
    root, recipe, res = checked
    good = Path(res["artifact"])
    rc, _ = build(root, recipe, tiny_ckpt, root / "o", "check.max_mean_kl=0", "check.min_vision_cosine=1")
    out, err = capsys.readouterr()
    res2 = json.loads(out)
    assert rc == 1 and res2["status"] == "failed"
    lines = [ln for ln in err.splitlines() if ln.startswith("gate ")]
    assert lines == res2["failed_gates"] and len(lines) == 2
    assert re.fullmatch(r"gate mean_kl: [0-9.e-]+ > 0", lines[0]), lines
    assert re.fullmatch(r"gate vision_cosine: 0\.9999\d* < 1(\.0*)?", lines[1]), lines
    bad = Path(res2["artifact"])
    assert json.loads((bad / "manifest.json").read_text())["status"] == "failed"
    assert af.read_latest(bad.parent) == good.name
    assert "FAILED" in (bad / "report.md").read_text().splitlines()[0]


def test_verify_refuses_a_different_source_checkpoint(checked, tmp_path, capsys):
    from medlite.checkpoints.random_ckpt import write_random_checkpoint
    from medlite.context import RunContext

    _, _, res = checked
    other = tmp_path / "other"
    write_random_checkpoint("tiny", other, fmt="legacy", seed=1, ctx=RunContext(quiet=True))
    rc = main(["verify", res["artifact"], "--model", str(other), "--vision-tower", str(other / "vision_tower")])
    assert rc == 2
    assert "does not have the file hashes recorded in manifest.json" in capsys.readouterr().err


OVERLAP = """\
name: chk-overlap
version: 1.0.0
target: jetson-xavier-agx-32gb
calibration: {dataset: "DATA", split: train, samples: 6}
evaluation: {dataset: "DATA", split: test}
stages:
  - export: {precision: fp16}
  - check: {max_new_tokens: 2, max_mean_kl: 0.01, min_vision_cosine: 0.99, min_agreement: null}
"""


def test_verify_leaves_out_the_calibration_images_as_the_build_did(tiny_ckpt, tmp_path, capsys):
    """VQA-RAD's splits share images (the fixture: 5 of its 12 test images are also in train): the
    build drops the test questions about calibration images, and verify must score the very same
    questions (it re-ran the gates on every test question before, and reported a mismatch)."""
    import shutil

    from PIL import Image

    from medlite.pipeline.pipeline import load_calibration
    from medlite.context import RunContext
    from medlite.evaluation.vqa import load_dataset
    from medlite.recipes import load_recipe

    data = tmp_path / "vqa_rad.json"
    shutil.copyfile(Path(__file__).parent / "evaluation" / "fixtures" / "vqa_rad.json", data)
    (tmp_path / "images").mkdir()
    for k, name in enumerate(sorted({r["image_name"] for r in json.loads(data.read_text())})):
        Image.new("RGB", (16, 16), (k * 13 % 255, 40 + k, 90)).save(tmp_path / "images" / name, format="JPEG")
    recipe = tmp_path / "overlap.yaml"
    recipe.write_text(OVERLAP.replace("DATA", str(data)))
    rc, res = build(tmp_path, recipe, tiny_ckpt, tmp_path / "o", capsys=capsys)
    assert rc == 0 and res["status"] == "passed", res
    art = Path(res["artifact"])
    asked = {q["qid"] for q in json.loads((art / "report.json").read_text())["questions"]}
    cal, _, _ = load_calibration(load_recipe(recipe).recipe, RunContext(cache_dir=tmp_path / "cache", quiet=True))
    used = {s.image_id for s in cal.samples}
    test = load_dataset(str(data), split="test")
    dropped = [s for s in test if s.image_id in used]
    assert dropped and len(asked) == res["metrics"]["n"] == len(test) - len(dropped)
    assert not asked & {str(s.qid) for s in dropped}
    assert main(["--cache-dir", str(tmp_path / "cache"), "verify", str(art), *model_args(tiny_ckpt)[2:], "--json"]) == 0
    v = json.loads(capsys.readouterr().out)
    assert v["ok"] and v["checks"]["ok"] and v["checks"]["metrics"]["n"] == res["metrics"]["n"], v
