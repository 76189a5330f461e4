"""Artifact layout, content versions, manifests, atomic writes (incl. SIGKILL) and verification, on real files."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from medlite import artifacts as af
from medlite.fileio import sha256_file

SRC = {"model.safetensors": "ab" * 32, "config.json": "cd" * 32}
INFO = {"format": "legacy", "path": "/data/ckpt", "files": SRC, "adapter": None, "vision_tower": None,
        "vision_weights": None, "dtype": "float16", "text_backbone": "llama", "name": "m", "notes": ["x"]}


def version(**kw):
    args = dict(source=af.source_identity(INFO, "vicuna_v1"), recipe={"name": "r", "stages": [{"export": {"precision": "fp16"}}]},
                calibration_sha256=None, medlite_version="0.1.0")
    args.update(kw)
    return af.compute_version("1.0.0", **args)


def test_version_is_content_derived():
    v = version()
    assert v.startswith("1.0.0+") and len(v.split("+")[1]) == 7
    assert version() == v
    moved = {**INFO, "path": "/elsewhere/ckpt", "files": dict(reversed(list(SRC.items()))), "notes": []}
    assert version(source=af.source_identity(moved, "vicuna_v1")) == v          # path, order, notes: no effect
    changed = {**INFO, "files": {**SRC, "config.json": "ee" * 32}}
    assert version(source=af.source_identity(changed, "vicuna_v1")) != v        # a changed file does
    assert version(source=af.source_identity(INFO, "phi")) != v                 # so does another template
    lora = {**INFO, "adapter": {"path": "/a", "files": {"adapter.safetensors": "11" * 32},
                                "base_path": "/b", "merged": True}}
    assert af.source_identity(lora)["adapter"] == {"files": {"adapter.safetensors": "11" * 32}, "merged": True}
    assert version(recipe={"name": "r", "stages": [{"export": {"precision": "fp32"}}]}) != v
    assert version(calibration_sha256="12" * 32) != v
    assert version(medlite_version="0.2.0") != v


def _artifact(tmp_path: Path, name="1.0.0+abcdef0") -> Path:
    with af.Staging(tmp_path / "m" / "r", name) as st:
        (st.path / "decoder.onnx").write_bytes(bytes(range(256)) * 4)
        (st.path / "sub").mkdir()
        (st.path / "sub" / "engines.json").write_text('{"a": 1}')
        (st.path / "build-info.json").write_text('{"seconds": 1.5}')
        af.write_manifest(st.path, {"format": af.FORMAT, "version": name, "status": "passed"})
        return st.commit()


def test_manifest_hashes_every_file_but_itself_and_volatile(tmp_path):
    path = _artifact(tmp_path)
    m = json.loads((path / af.MANIFEST).read_text())
    assert sorted(m["files"]) == ["decoder.onnx", "sub/engines.json"]
    assert m["files"]["decoder.onnx"] == {"sha256": sha256_file(path / "decoder.onnx"), "bytes": 1024}
    import hashlib

    assert m["files"]["sub/engines.json"]["sha256"] == hashlib.sha256(b'{"a": 1}').hexdigest()
    assert af.verify_files(path) == []
    (path / "build-info.json").write_text('{"seconds": 99}')        # volatile: not a problem
    assert af.verify_files(path) == []


def test_flipped_byte_missing_and_extra_files_are_named(tmp_path):
    path = _artifact(tmp_path)
    data = bytearray((path / "decoder.onnx").read_bytes())
    data[100] ^= 0x01
    (path / "decoder.onnx").write_bytes(bytes(data))
    (path / "sub" / "engines.json").unlink()
    (path / "stray.txt").write_text("x")
    assert af.verify_files(path) == ["decoder.onnx: sha256 mismatch (content changed)",
                                     "stray.txt: extra file not in the manifest",
                                     "sub/engines.json: missing"]
    with pytest.raises(af.ArtifactError) as ei:
        af.open_artifact(path)
    assert "decoder.onnx: sha256 mismatch" in str(ei.value)
    assert af.open_artifact(path, check_hashes=False).version == "1.0.0+abcdef0"


def test_open_artifact_and_latest(tmp_path):
    path = _artifact(tmp_path)
    parent = path.parent
    assert af.read_latest(parent) is None
    af.update_latest(parent, path.name)
    assert (parent / "latest").read_text() == "1.0.0+abcdef0\n"
    art = af.open_artifact(parent)                 # OUT/<model>/<recipe> resolves through latest
    assert art.path == path and art.status == "passed"
    with pytest.raises(af.ArtifactError, match="no manifest.json"):
        af.open_artifact(tmp_path / "m")


def test_staging_abort_leaves_nothing_and_commit_replaces(tmp_path):
    parent = tmp_path / "m" / "r"
    with pytest.raises(RuntimeError):
        with af.Staging(parent, "1.0.0+0000000") as st:
            (st.path / "x").write_text("partial")
            raise RuntimeError("stage failed")
    assert list(parent.iterdir()) == []
    first = _artifact(tmp_path, "1.0.0+0000000")
    with af.Staging(parent, "1.0.0+0000000") as st:
        (st.path / "y").write_text("new")
        st.commit()
    assert sorted(p.name for p in first.iterdir()) == ["y"]
    assert sorted(p.name for p in parent.iterdir()) == ["1.0.0+0000000"]


def test_manifest_is_byte_identical_for_identical_content(tmp_path):
    a = _artifact(tmp_path / "a")
    b = _artifact(tmp_path / "b")
    assert (a / af.MANIFEST).read_bytes() == (b / af.MANIFEST).read_bytes()
    assert str(tmp_path) not in (a / af.MANIFEST).read_text()


WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from medlite import artifacts as af
    parent, mode = Path(sys.argv[1]), sys.argv[2]
    with af.Staging(parent, "1.0.0+1234567") as st:
        (st.path / "vision.onnx").write_bytes(b"v" * 1000)
        (st.path / "STARTED").write_text("1")
        if mode == "hang":
            time.sleep(60)            # killed here, mid-build
        (st.path / "STARTED").unlink()
        af.write_manifest(st.path, {"format": af.FORMAT, "version": "1.0.0+1234567", "status": "passed"})
        st.commit()
""")


def test_sigkill_mid_build_leaves_no_artifact_and_rerun_completes(tmp_path):
    parent = tmp_path / "out" / "m" / "r"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, str(script), str(parent), "hang"], env=env)
    try:
        deadline = time.time() + 60
        while not list(parent.glob(".tmp-*/STARTED")):
            assert proc.poll() is None and time.time() < deadline, "writer never started"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (parent / "1.0.0+1234567").exists()
    stale = list(parent.glob(".tmp-*"))
    assert len(stale) == 1 and stale[0].name == f".tmp-1.0.0+1234567-{proc.pid}"
    r = subprocess.run([sys.executable, str(script), str(parent), "finish"], env=env, timeout=60)
    assert r.returncode == 0
    assert sorted(p.name for p in parent.iterdir()) == ["1.0.0+1234567"]   # stale tmp cleaned up
    assert af.verify_files(parent / "1.0.0+1234567") == []


def test_clean_stale_keeps_folders_of_live_builds(tmp_path):
    live = tmp_path / f".tmp-1.0.0+a-{os.getpid()}"
    live.mkdir()
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout.strip()
    dead = tmp_path / f".tmp-1.0.0+a-{dead_pid}"
    dead.mkdir()
    assert af.clean_stale(tmp_path) == [dead]
    assert live.exists() and not dead.exists()


def test_safe_names_and_layout(tmp_path):
    assert af.safe_name("Micro TinyLLaVA-Med!") == "micro-tinyllava-med"
    assert af.recipe_dir(tmp_path, "My Model", "xavier-agx-fp16") == tmp_path / "my-model" / "xavier-agx-fp16"


def test_package_versions_are_recorded():
    v = af.package_versions(("pydantic", "surely-not-installed-pkg"))
    assert v["pydantic"] and v["surely-not-installed-pkg"] is None
