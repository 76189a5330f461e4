"""Device-built files (engines, timing cache, bench.json) have a declared, unhashed place in every
artifact (issue 26 item 2, issue 27): building engines on the Jetson keeps the artifact verifiable,
while an undeclared extra file still fails verification."""
import json
from pathlib import Path

import pytest

from medlite import artifacts as af

PLACEHOLDERS = ("device/vision.engine", "device/decoder.engine", "device/timing.cache", "device/bench.json",
                "device/decoder.trtexec.engine")


def _artifact(tmp_path: Path) -> Path:
    with af.Staging(tmp_path / "m" / "r", "1.0.0+abcdef0") as st:
        (st.path / "decoder.onnx").write_bytes(bytes(range(256)))
        (st.path / "engines").mkdir()
        (st.path / "engines" / "engines.json").write_text("{}")
        af.write_manifest(st.path, {"format": af.FORMAT, "version": "1.0.0+abcdef0", "status": "passed"})
        return st.commit()


def _place(path: Path, names) -> None:
    for n in names:
        (path / n).parent.mkdir(parents=True, exist_ok=True)
        (path / n).write_bytes(b"built on the device")


def test_manifest_declares_the_device_folder(tmp_path):
    m = json.loads((_artifact(tmp_path) / af.MANIFEST).read_text())
    assert m["device_files"]["folder"] == "device"
    assert {"*.engine", "timing.cache", "bench.json"} <= set(m["device_files"]["patterns"])


def test_placeholder_engines_keep_the_artifact_verifiable(tmp_path):
    path = _artifact(tmp_path)
    _place(path, PLACEHOLDERS)
    assert af.verify_files(path) == []
    assert af.open_artifact(path).version == "1.0.0+abcdef0"


@pytest.mark.parametrize("extra", ["engines/decoder.engine", "device/evil.py", "device/sub/x.engine",
                                   "stray.engine"])
def test_undeclared_extra_files_still_fail(tmp_path, extra):
    path = _artifact(tmp_path)
    _place(path, PLACEHOLDERS + (extra,))
    assert af.verify_files(path) == [f"{extra}: extra file not in the manifest"]
    with pytest.raises(af.ArtifactError, match=extra.replace(".", r"\.")):
        af.open_artifact(path)


def test_manifest_without_a_declaration_exempts_nothing(tmp_path):
    """Artifacts written before the declaration: nothing is exempt (no silent widening)."""
    path = _artifact(tmp_path)
    m = json.loads((path / af.MANIFEST).read_text())
    del m["device_files"]
    (path / af.MANIFEST).write_text(json.dumps(m))
    _place(path, ["device/decoder.engine"])
    assert af.verify_files(path) == ["device/decoder.engine: extra file not in the manifest"]


def test_medlite_verify_cli_accepts_placeholders_and_names_an_extra_file(tmp_path):
    from medlite.cli import main

    path = _artifact(tmp_path)
    _place(path, PLACEHOLDERS)
    assert main(["verify", "--skip-checks", str(path)]) == 0
    _place(path, ["engines/decoder.engine"])
    assert main(["verify", "--skip-checks", str(path)]) == 1
