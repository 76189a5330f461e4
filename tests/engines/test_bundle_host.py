"""``medlite ask / bench / serve --model BUNDLE_FOLDER`` on a host (issue 27): the bundle's own device
runtime answers (here with ``--standin``: no TensorRT on this machine), and without TensorRT and
without ``--standin`` one line says what is missing and that ``--standin`` exists."""
import json
import sys

import pytest

from bundle_helpers import extract
from medlite.cli import main


@pytest.fixture(scope="module")
def bundle_folder(tiny_bundle, tmp_path_factory):
    folder = extract(tiny_bundle, tmp_path_factory.mktemp("host"))
    yield folder
    if str(folder) in sys.path:
        sys.path.remove(str(folder))
    for m in [m for m in sys.modules if m.split(".")[0] in ("mlrt", "mldevice")]:
        del sys.modules[m]


def _first(folder):
    qs = json.loads((folder / "reference" / "answers.json").read_text())
    return qs, qs["questions"][0]


def test_ask_a_bundle_with_standin_gives_the_host_answer(bundle_folder, capsys):
    qs, q = _first(bundle_folder)
    rc = main(["ask", str(bundle_folder), "--image", str(bundle_folder / q["image"]), q["question"], "--standin",
               "--max-new-tokens", str(qs["max_new_tokens"]), "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    res = json.loads(out.out)
    assert res["answers"][0]["answer"] == q["host_answer"]
    assert "stand-in" in res["model"]["runtime"] and "bundle.json" in res["model"]["hash_check"]


def test_ask_a_bundle_without_tensorrt_says_what_is_missing(bundle_folder, capsys):
    from medlite.engines.bundle_host import missing_engine_runtime

    if not missing_engine_runtime():
        pytest.skip("this host has tensorrt and cuda-python: the engine path runs instead")
    _, q = _first(bundle_folder)
    rc = main(["ask", str(bundle_folder), "--image", str(bundle_folder / q["image"]), q["question"]])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "tensorrt" in err[0] and "--standin" in err[0] and str(bundle_folder.resolve()) in err[0]


def test_bench_and_serve_open_a_bundle_through_its_runtime(bundle_folder, capsys):
    from medlite.context import RunContext
    from medlite.serve.commands import _open

    qs, q = _first(bundle_folder)
    rc = main(["bench", "--model", str(bundle_folder), "--standin", "--runs", "1", "--warmup", "0", "--no-write",
               "--image", str(bundle_folder / q["image"]), "--question", q["question"], "--max-new-tokens", "8",
               "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "stand-in" in json.dumps(json.loads(out.out))
    artifact, folder, vlm = _open(str(bundle_folder), RunContext(cache_dir=bundle_folder.parent / "c", quiet=True),
                                  standin=True)
    assert folder == bundle_folder / "artifact" and artifact.status == "passed"
    assert "decoder" in vlm.backend and vlm.engine_decoder is not None
