"""The device bundle on a tiny random Xavier artifact: reproducible archive, Python 3.8 / import hygiene,
README commands run where medlite cannot be imported, TensorRT names checked against a strict fake
TensorRT 8.5.2, tampering detected, device-built files accepted."""
import ast
import json
import re
import shlex
import subprocess
import sys

import pytest

from medlite.engines.bundle import IMPORT_NAMES, PINS, OPTIONAL_PINS, make_bundle
from bundle_helpers import device_env, extract, readme_commands, run

STDLIB = set(sys.stdlib_module_names)
OWN = {"mlrt", "mldevice", "medlite_device", "tensorrt", "build_engines"}


@pytest.fixture(scope="module")
def folder(tiny_bundle, tmp_path_factory):
    return extract(tiny_bundle, tmp_path_factory.mktemp("x"))


def test_same_artifact_gives_a_byte_identical_bundle(tiny_artifact, tiny_bundle, tmp_path):
    again = tmp_path / "again.tar.gz"
    make_bundle(tiny_artifact, again)
    assert again.read_bytes() == tiny_bundle.read_bytes()
    import tarfile

    assert tiny_bundle.read_bytes()[4:8] == b"\0\0\0\0"              # gzip header mtime 0
    with tarfile.open(tiny_bundle) as t:
        members = t.getmembers()
    assert {m.mtime for m in members} == {0} and {m.uid for m in members} == {0}
    files = [m.name for m in members if m.isfile()]
    assert files == sorted(files)
    top = members[0].name
    assert {f"{top}/README.md", f"{top}/medlite_device.py", f"{top}/bundle.json", f"{top}/artifact/decoder.onnx",
            f"{top}/artifact/embed_tokens.bin", f"{top}/artifact/tokenizer.json",
            f"{top}/artifact/medlite_runtime.json", f"{top}/artifact/engines/build_engines.sh",
            f"{top}/reference/reference.npz", f"{top}/reference/answers.json", f"{top}/mlrt/decoding.py"} <= set(files)


def _imports(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module.split(".")[0]


def test_every_py_file_is_python_38_and_imports_only_stdlib_and_readme_packages(folder):
    readme = (folder / "README.md").read_text()
    named = {IMPORT_NAMES[p] for p in {**PINS, **OPTIONAL_PINS} if f"{p}==" in readme}
    assert named == {"numpy", "tokenizers", "PIL", "onnxruntime", "cuda", "pydicom", "psutil"}
    pys = sorted(folder.rglob("*.py"))
    assert len(pys) > 12
    for p in pys:
        tree = ast.parse(p.read_text(), filename=str(p), feature_version=(3, 8))
        bad = {m for m in _imports(tree)} - STDLIB - named - OWN
        assert not bad, f"{p.relative_to(folder)} imports {bad}"
        assert "medlite" not in {m for m in _imports(tree)}, p


def test_shell_scripts_parse_and_trtexec_flags_are_8_5_2_flags(folder):
    from medlite.pipeline.stages.engines import trtexec_flags

    scripts = sorted(folder.rglob("*.sh"))
    assert scripts
    for sh in scripts:
        assert subprocess.run(["bash", "-n", str(sh)]).returncode == 0, sh
    text = (folder / "artifact" / "engines" / "build_engines.sh").read_text()
    flags = set(re.findall(r"(?<![\w-])(--[A-Za-z][A-Za-z0-9]*)", text.split("trtexec)", 1)[1]))
    assert flags and flags <= trtexec_flags(), flags - trtexec_flags()


def test_runtime_subprocess_cannot_import_medlite(folder, tmp_path):
    env = device_env(tmp_path)
    r = subprocess.run(["python3", "-c", "import medlite"], cwd=folder, env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "No module named 'medlite'" in r.stderr
    r = subprocess.run(["python3", "-c", "import sys; sys.path.insert(0, '.'); import mldevice.runtime, mlrt.vlm; "
                        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('medlite', 'torch')))"],
                       cwd=folder, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


def test_readme_commands_run_and_engines_land_in_the_declared_folder(folder, tmp_path):
    """Each README command, in order: build with FORCE=1 through the fake TensorRT 8.5.2 (every name it
    touches checked), verify/ask/bench with --standin, then verify and ask on the (fake-)engines."""
    from medlite import artifacts as af

    cmds = readme_commands(folder)
    assert [c.split()[2] for c in cmds] == ["verify", "build", "verify", "ask", "bench"]
    env = device_env(tmp_path, fake_trt=True)
    for line in cmds:
        args = shlex.split(line)[2:]
        r = run(folder, args, {**env, "FORCE": "1"})
        assert r.returncode == 0, (line, r.stdout[-2000:], r.stderr[-3000:])
        if args[0] != "build" and "--standin" not in args:
            r2 = run(folder, args + ["--standin"], env)
            assert r2.returncode == 0, (line, r2.stderr[-3000:])
        if args[:2] == ["verify", "--standin"]:
            assert "ok   answers: 6/6 identical to the host's" in r.stdout, r.stdout
    built = sorted(p.name for p in (folder / "artifact" / "device").iterdir())
    assert built == ["bench.json", "decoder.engine", "timing.cache", "vision.engine"]
    bench = json.loads((folder / "artifact" / "device" / "bench.json").read_text())
    assert bench["phases"]["decode"]["watts"] == "not a Jetson" and bench["paper"]["watts"] == 18.9
    # device-built files are declared: the artifact inside the bundle still verifies with medlite itself
    assert af.verify_files(folder / "artifact") == []
    r = run(folder, ["verify"], env)                        # on the (fake) TensorRT engines
    assert r.returncode == 0 and "TensorRT decoder.engine" in r.stdout, r.stdout + r.stderr
    # an undeclared extra file still fails, naming it
    (folder / "artifact" / "device" / "notes.txt").write_text("x")
    try:
        r = run(folder, ["verify", "--standin"], env)
        assert r.returncode == 1 and "artifact/device/notes.txt: extra file not in the manifest" in r.stdout
    finally:
        (folder / "artifact" / "device" / "notes.txt").unlink()


def test_fake_tensorrt_refuses_names_outside_8_5_2(tmp_path):
    env = device_env(tmp_path, fake_trt=True)
    code = ("import tensorrt as trt\n"
            "for expr in ['trt.BuilderConfig', 'trt.BuilderFlag.FP8', 'trt.Builder(trt.Logger()).build_engine_with_config',"
            " 'trt.OnnxParser(trt.Builder(trt.Logger()).create_network(0), trt.Logger()).set_flag',"
            " 'trt.Logger.SEVERE']:\n"
            "    try:\n        eval(expr)\n        print('ACCEPTED', expr)\n"
            "    except AttributeError as e:\n        print('refused', e)\n"
            "print(trt.BuilderFlag.FP16, trt.Builder(trt.Logger(trt.Logger.WARNING)).create_network)\n")
    r = subprocess.run(["python3", "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "ACCEPTED" not in r.stdout and r.stdout.count("refused") == 5, r.stdout + r.stderr


def test_flipped_byte_in_decoder_onnx_fails_verify_naming_the_file(tiny_bundle, tmp_path):
    folder = extract(tiny_bundle, tmp_path / "x")
    p = folder / "artifact" / "decoder.onnx"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    r = run(folder, ["verify", "--standin"], device_env(tmp_path))
    assert r.returncode == 1
    assert "FAIL artifact/decoder.onnx: sha256 mismatch (content changed)" in r.stdout, r.stdout


def test_bundle_refuses_a_non_xavier_artifact_and_a_folder_out(tiny_artifact, tmp_path):
    from medlite.engines.bundle import BundleError

    with pytest.raises(BundleError, match="FILE.tar.gz"):
        make_bundle(tiny_artifact, tmp_path / "x.zip")
    with pytest.raises(BundleError, match="is a folder"):
        make_bundle(tiny_artifact, tmp_path)
