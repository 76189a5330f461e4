"""``medlite embed`` on a random tiny checkpoint and its ONNX export: real scans shipped in packages,
one finite vector per image, the recorded metadata, ONNX Runtime = PyTorch, clear option errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medlite.embeddings.store import read_embeddings


def _embed(cli, tmp_path, model, scans, *extra, out="e.npz"):
    code, stdout, err, res = cli("--cache-dir", tmp_path / "cache", "embed", "--model", model, "--images", *scans,
                                 "--out", tmp_path / out, "--json", *extra)
    assert code == 0, err
    return res, read_embeddings(tmp_path / out)


def test_checkpoint_projector_and_tower(cli, tmp_path, tiny_ckpt, real_scans):
    from medlite.checkpoints import load_model
    from medlite.context import RunContext

    res, data = _embed(cli, tmp_path, tiny_ckpt, real_scans, "--batch-size", "3")
    loaded = load_model(tiny_ckpt, ctx=RunContext(quiet=True))
    cfg = loaded.model.config
    assert data.files == [s.name for s in real_scans]
    assert data.vectors.shape == (len(real_scans), cfg.text_config.hidden_size)
    assert np.isfinite(data.vectors).all()
    assert len({v.tobytes() for v in data.vectors}) == len(real_scans)     # different scans, different vectors
    m = data.metadata
    assert m["from"] == "projector" and m["pool"] == "mean" and m["model"]["kind"] == "checkpoint"
    assert m["model"]["source"]["files"] == loaded.source.to_dict()["files"]      # checkpoint hashes
    assert m["preprocessing"]["image_spec"] == loaded.image_spec.to_dict()
    assert m["medlite_version"] and m["runtime"]["name"] == "torch" and m["tokens_per_image"] == loaded.num_image_tokens
    assert res["images"] == len(real_scans) and res["images_per_s"] > 0 and res["peak_rss_bytes"] > 0

    # the projector vector is the mean of exactly what generation splices into the prompt
    from medlite.checkpoints.generate import image_embeddings
    from medlite.imaging.images import load_image

    ref = image_embeddings(loaded, load_image(real_scans[0])).mean(axis=0)
    np.testing.assert_allclose(data.vectors[0], ref, rtol=1e-5, atol=1e-6)

    _, tower = _embed(cli, tmp_path, tiny_ckpt, real_scans, "--from", "vision", "--pool", "max", out="t.npz")
    assert tower.vectors.shape == (len(real_scans), cfg.vision_config.hidden_size)
    assert tower.metadata["from"] == "vision" and tower.metadata["pool"] == "max"
    assert np.isfinite(tower.vectors).all()


def test_onnx_export_matches_checkpoint(cli, tmp_path, tiny_ckpt, tiny_export, real_scans):
    _, ref = _embed(cli, tmp_path, tiny_ckpt, real_scans, out="ref.npz")
    res, data = _embed(cli, tmp_path, tiny_export, real_scans)
    assert data.files == ref.files
    np.testing.assert_allclose(data.vectors, ref.vectors, rtol=1e-4, atol=1e-5)
    m = data.metadata["model"]
    assert m["kind"] == "onnx-export" and len(m["vision_graph_sha256"]) == 64
    assert m["source"]["files"]                  # the checkpoint hashes the export was made from
    assert data.metadata["runtime"]["name"] == "onnxruntime"


def test_parquet_equals_npz(cli, tmp_path, tiny_export, real_scans):
    pytest.importorskip("pyarrow")
    _, a = _embed(cli, tmp_path, tiny_export, real_scans[:2], out="a.npz")
    _, b = _embed(cli, tmp_path, tiny_export, real_scans[:2], out="b.parquet")
    assert a.files == b.files and a.metadata == b.metadata
    np.testing.assert_array_equal(a.vectors, b.vectors)


def test_folder_names_are_relative(cli, tmp_path, tiny_export, real_scans):
    import shutil

    root = tmp_path / "scans"
    (root / "dicom").mkdir(parents=True)
    shutil.copy(real_scans[0], root / "dicom" / "ct.dcm")
    shutil.copy(real_scans[3], root / "retina.jpg")
    _, data = _embed(cli, tmp_path, tiny_export, [root])
    assert data.files == ["dicom/ct.dcm", "retina.jpg"]


def test_option_errors_are_one_line_and_write_nothing(cli, tmp_path, tiny_export, real_scans):
    out = tmp_path / "e.npz"

    def fails(*argv):
        code, stdout, err, _ = cli("--cache-dir", tmp_path / "cache", "embed", *argv)
        assert code == 2 and not out.exists(), err
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
        return err

    assert "--from vision needs a checkpoint" in fails("--model", tiny_export, "--images", real_scans[0],
                                                      "--out", out, "--from", "vision")
    assert "must end in .npz or .parquet" in fails("--model", tiny_export, "--images", real_scans[0],
                                                   "--out", tmp_path / "e.csv")
    assert "no such file or folder" in fails("--model", tiny_export, "--images", tmp_path / "nope.dcm", "--out", out)
    assert "two images would be stored as 'CT_small.dcm'" in fails(
        "--model", tiny_export, "--images", real_scans[0], real_scans[0], "--out", out)


def test_export_runs_without_torch(tiny_export, real_scans, tmp_path):
    """The ONNX path imports no torch (and no transformers)."""
    out = tmp_path / "e.npz"
    code = ("import sys, json; sys.modules['torch'] = None; from medlite.cli import main; "
            f"rc = main(['--quiet', 'embed', '--model', {str(tiny_export)!r}, '--images', "
            f"{str(real_scans[0])!r}, {str(real_scans[3])!r}, '--out', {str(out)!r}]); "
            "heavy = [m for m in ('torch', 'transformers') if sys.modules.get(m) is not None]; "
            "print(json.dumps({'rc': rc, 'heavy': heavy}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"rc": 0, "heavy": []}
    data = read_embeddings(out)
    assert data.vectors.shape[0] == 2 and np.isfinite(data.vectors).all()
    assert Path(data.paths[0]) == real_scans[0]


def test_artifact_version_recorded_and_hashes_checked(cli, tmp_path, tiny_export, real_scans):
    """A built artifact is hash-checked first, and its version and vision-graph hash go into the file."""
    import shutil

    from medlite.artifacts import FORMAT, write_manifest
    from medlite.fileio import sha256_file

    art = tmp_path / "art"
    shutil.copytree(tiny_export, art)
    write_manifest(art, {"format": FORMAT, "version": "0.1.0+abc1234", "status": "passed",
                         "recipe": {"name": "cpu-test", "version": "0.1.0"}})
    _, data = _embed(cli, tmp_path, art, real_scans[:1])
    m = data.metadata["model"]
    assert (m["kind"], m["version"], m["recipe"]) == ("artifact", "0.1.0+abc1234", "cpu-test")
    assert m["vision_graph_sha256"] == sha256_file(art / "vision.onnx")

    with open(art / "tokenizer.json", "a") as f:
        f.write(" ")
    code, _, err, _ = cli("embed", "--model", art, "--images", real_scans[0], "--out", tmp_path / "x.npz")
    assert code == 2 and "tokenizer.json" in err and not (tmp_path / "x.npz").exists()


def test_unreadable_image_named_or_skipped(cli, tmp_path, tiny_export, real_scans):
    import shutil

    root = tmp_path / "scans"
    root.mkdir()
    shutil.copy(real_scans[0], root / "a.dcm")
    shutil.copy(real_scans[3], root / "c.jpg")
    (root / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"truncated")      # header unreadable
    from PIL import Image

    Image.open(real_scans[3]).save(root / "d.png")                             # header fine, pixels cut off
    (root / "d.png").write_bytes((root / "d.png").read_bytes()[:2000])
    out = tmp_path / "e.npz"
    code, _, err, _ = cli("embed", "--model", tiny_export, "--images", root, "--out", out)
    assert code == 2 and "b.png" in err and "--skip-bad" in err and not out.exists()
    code, _, err, _ = cli("embed", "--model", tiny_export, "--images", root / "a.dcm", root / "d.png", "--out", out)
    assert code == 2 and "d.png" in err and "--skip-bad" in err and not out.exists()
    code, _, err, res = cli("embed", "--model", tiny_export, "--images", root, "--out", out, "--skip-bad", "--json")
    assert code == 0, err
    assert "b.png: left out" in err and "d.png: left out" in err
    assert res["skipped"] == 2 and res["images"] == 2
    assert read_embeddings(out).files == ["a.dcm", "c.jpg"]
