"""``medlite ask`` on an ONNX export: natural argument order, several questions, refused inputs."""
from __future__ import annotations

import json
import shutil

import pytest

from export_tiny_model import random_image
from medlite.cli import main
from medlite.runtime import OnnxVlm

Q1, Q2 = "is there a lesion in the lung ?", "which organ is this ?"


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    p = tmp_path_factory.mktemp("img") / "img.png"
    random_image(0).save(p)
    return p


def _expected(export, image, q):
    from PIL import Image

    return OnnxVlm.open(export).answer(Image.open(image).convert("RGB"), q, max_new_tokens=8)


def test_natural_order_and_several_questions(rt_export, image, capsys):
    # options between the artifact and the question: argparse alone says "unrecognized arguments"
    assert main(["ask", str(rt_export), "--image", str(image), Q1, "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() == _expected(rt_export, image, Q1)
    assert main(["ask", str(rt_export), "--image", str(image), Q1, Q2, "--max-new-tokens", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [{k: a[k] for k in ("question", "answer")} for a in out["answers"]] == [
        {"question": Q1, "answer": _expected(rt_export, image, Q1)},
        {"question": Q2, "answer": _expected(rt_export, image, Q2)}]
    assert all(a["latency_s"] > 0 for a in out["answers"])
    assert main(["ask", "--model", str(rt_export), Q1, Q2, "--image", str(image), "--max-new-tokens", "8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"Q: {Q1}", f"A: {_expected(rt_export, image, Q1)}", f"Q: {Q2}",
                     f"A: {_expected(rt_export, image, Q2)}"]


@pytest.mark.parametrize("extra, message", [
    (["--max-new-tokens", "-5", Q1], "--max-new-tokens must be at least 1, got -5"),
    (["   "], "a question is empty"),
])
def test_bad_arguments_are_clear_errors(rt_export, image, capsys, extra, message):
    assert main(["ask", str(rt_export), "--image", str(image), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_artifact_without_its_manifest_is_refused(rt_export, image, tmp_path, capsys):
    art = tmp_path / "art"
    shutil.copytree(rt_export, art)
    (art / "recipe.yaml").write_text("name: x\n")       # a built artifact ...
    (art / "report.md").write_text("# report\n")        # ... whose manifest.json was deleted
    assert main(["ask", str(art), "--image", str(image), Q1]) == 2
    err = capsys.readouterr().err
    assert "manifest.json is missing" in err and "refused" in err
    assert capsys.readouterr().out == ""                # nothing answered


# -- issue 26: the model that answers is never a silent wrong one ----------------------------------
@pytest.fixture()
def empty_cache(tmp_path, monkeypatch):
    """A cache without the demo model: a run that fell back to it would build it here."""
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("MEDLITE_CACHE", str(cache))
    yield cache
    assert not (cache / "demo-model").exists(), "the built-in demo model was used although a model was named"


@pytest.mark.parametrize("typo", ["copies/goood", "goood.onnx", "model.safetensors", "out.tar.gz"])
def test_mistyped_artifact_path_is_an_error_not_a_question(image, empty_cache, capsys, typo):
    assert main(["ask", typo, "--image", str(image), Q1]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err.count("\n") == 1
    assert cap.err.startswith(f"error: {typo}: no such file or folder")


def test_artifact_without_a_question_is_an_error(rt_export, image, empty_cache, capsys):
    assert main(["ask", str(rt_export), "--image", str(image)]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and "no question given" in cap.err and "Traceback" not in cap.err


def test_a_file_that_is_not_a_model_is_refused(image, tmp_path, empty_cache, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    assert main(["ask", str(notes), "--image", str(image), Q1]) == 2
    assert capsys.readouterr().err == f"error: {notes}: is a file, not a checkpoint, ONNX export or artifact " \
                                      f"folder (PATH takes a checkpoint, ONNX export or artifact folder)\n"
    onnx = tmp_path / "vision.onnx"                    # a model file, not the folder that holds it
    onnx.write_bytes(b"x")
    assert main(["ask", "--model", str(onnx), "--image", str(image), Q1]) == 2
    assert f"give the folder that holds it: {tmp_path}" in capsys.readouterr().err


def test_the_model_that_answers_is_named(rt_export, image, capsys):
    assert main(["ask", str(rt_export), "--image", str(image), Q1, "--max-new-tokens", "4"]) == 0
    cap = capsys.readouterr()
    first, *rest = cap.err.splitlines()
    assert "NOT HASH-CHECKED" in first and str(rt_export) in first          # an export: no manifest
    model = next(line for line in rest if line.startswith("model: "))
    runtime = model.split(" · ")[2]                      # CPU here; CUDA where this onnxruntime has it
    assert runtime.startswith("ONNX Runtime (")
    assert model == (f"model: {rt_export} · hashes skipped (no manifest.json: an ONNX export) · "
                     f"{runtime} · vision fp32, embed fp32, decoder fp32")
    assert rest[-1].startswith(f"image: {image} · window as stored (8-bit) · latency ")
    assert main(["ask", str(rt_export), "--image", str(image), Q1, "--max-new-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    m = out["model"]
    assert (m["folder"], m["version"], m["runtime"]) == (str(rt_export), None, runtime)
    assert m["hash_check"].startswith("skipped") and m["precision"] == {"vision": "fp32", "embed": "fp32",
                                                                         "decoder": "fp32"}
    assert out["image"] == {"file": str(image), "kind": "raster", "frames": 1, "frame": 0,
                            "window": "as stored (8-bit)"}


def test_image_given_twice_is_an_error(rt_export, image, tmp_path, capsys):
    other = tmp_path / "other.png"
    other.write_bytes(image.read_bytes())
    with pytest.raises(SystemExit) as e:
        main(["ask", str(rt_export), "--image", str(image), "--image", str(other), Q1])
    assert e.value.code == 2
    assert "--image given twice" in capsys.readouterr().err


def test_negative_frame_says_frames_count_from_0(rt_export, image, capsys):
    assert main(["ask", str(rt_export), "--image", str(image), Q1, "--frame", "-1"]) == 2
    assert "frames count from 0" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["latest", "recipe folder"])
def test_ask_accepts_latest_and_names_the_version(rt_export, image, tmp_path, capsys, how):
    from medlite import artifacts as af

    art = tmp_path / "out" / "tiny" / "r" / "1.0+abc1234"
    shutil.copytree(rt_export, art)
    af.write_manifest(art, {"format": af.FORMAT, "version": art.name, "status": "passed"})
    af.update_latest(art.parent, art.name)
    target = art.parent / "latest" if how == "latest" else art.parent
    assert main(["ask", str(target), "--image", str(image), Q1, "--max-new-tokens", "4", "--json"]) == 0
    cap = capsys.readouterr()
    m = json.loads(cap.out)["model"]
    assert (m["folder"], m["version"], m["status"]) == (str(art), "1.0+abc1234", "passed")
    assert m["hash_check"].startswith("checked (") and "NOT HASH-CHECKED" not in cap.err


def test_frame_out_of_range_and_the_frame_used_is_named(rt_export, capsys):
    from pydicom.data import get_testdata_file

    dcm = get_testdata_file("emri_small.dcm")            # a 10-frame MR
    assert main(["ask", str(rt_export), "--image", dcm, Q1, "--frame", "10"]) == 2
    err = capsys.readouterr().err
    last = err.splitlines()[-1]                          # after the export's NOT HASH-CHECKED warning
    assert last.startswith("error: ") and "frames count from 0" in last and "--frame takes 0 to 9" in last
    assert main(["ask", str(rt_export), "--image", dcm, Q1, "--max-new-tokens", "2"]) == 0
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.startswith(f"image: {dcm} · frame 5 of 10 (counting from 0) · window ")   # the middle one


def test_ask_reports_the_quantization_that_runs(rt_export, image, tmp_path, capsys):
    """The precision shown is read from medlite_runtime.json's quantization records, not the traced dtype."""
    exp = tmp_path / "exp"
    shutil.copytree(rt_export, exp)
    cfg = json.loads((exp / "medlite_runtime.json").read_text())
    cfg["graphs"]["vision"]["quantization"] = {"scheme": "int8-static-qdq", "precision": "int8"}
    cfg["graphs"]["decoder"]["quantization"] = {"method": "w4a16", "algorithm": "awq", "group_size": 64, "bits": [4]}
    (exp / "medlite_runtime.json").write_text(json.dumps(cfg))
    assert main(["ask", str(exp), "--image", str(image), Q1, "--max-new-tokens", "2"]) == 0
    model = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("model: "))
    assert model.endswith(" · vision int8 Q/DQ, embed fp32, decoder w4a16 int4 g64 awq")
