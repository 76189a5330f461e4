"""Device bundles of the demo model's Xavier artifacts (xavier-agx-fp16, xavier-agx-int8, xavier-nx-int4):
the device runtime on the stand-in backend answers every held-out question exactly as `medlite ask`
does, with one prefill->decode profile switch per question and no KV reallocation; `verify --standin`
passes; placeholder engines keep `medlite verify` passing. Artifacts are built once per session."""
import json
import subprocess

import pytest

from bundle_helpers import device_env, extract, run
from medlite.cli import main

pytestmark = pytest.mark.slow
RECIPES = ("xavier-agx-fp16", "xavier-agx-int8", "xavier-nx-int4")


class _Bundles(dict):
    """recipe -> (artifact folder, extracted bundle folder), each built and bundled once, when first asked."""

    def __init__(self, root):
        super().__init__()
        self.root = root

    def __missing__(self, name):
        root = self.root
        assert main(["build", name, "--out", str(root / "artifacts"), "--quiet"]) == 0, name
        (art,) = [p for p in (root / "artifacts").glob(f"*/{name}/*") if p.is_dir()]
        tar = root / f"{name}.tar.gz"
        assert main(["bundle", "--model", str(art), "--out", str(tar)]) == 0
        self[name] = (art, extract(tar, root / f"x-{name}"))
        return self[name]


@pytest.fixture(scope="session")
def demo_bundles(tmp_path_factory):
    return _Bundles(tmp_path_factory.mktemp("demo-bundles"))


PROBE = """
import json, sys
sys.path.insert(0, '.')
from mldevice.backends import HostBuffer
from mldevice.runtime import open_device_vlm
from mlrt.imaging import load_image
vlm = open_device_vlm('artifact', standin=True)
qs = json.load(open('reference/answers.json'))
dec = vlm.engine_decoder
rows, allocs = [], HostBuffer.allocations
for q in qs['questions']:
    if dec is not None:
        dec.profile_log.clear()
    a = vlm.answer(load_image(q['image']), q['question'], max_new_tokens=qs['max_new_tokens'])
    log = dec.profile_log if dec is not None else []
    rows.append({'qid': q['qid'], 'image': q['image'], 'question': q['question'], 'answer': a,
                 'switches': sum(x != y for x, y in zip(log, log[1:])), 'first': log[:1]})
print(json.dumps({'rows': rows, 'new_allocations': HostBuffer.allocations - allocs, 'runs': vlm.runs}))
"""


@pytest.mark.parametrize("name", RECIPES)
def test_device_answers_equal_medlite_ask_with_one_switch_and_no_reallocation(demo_bundles, name, tmp_path,
                                                                              capsys):
    art, folder = demo_bundles[name]
    r = subprocess.run(["python3", "-c", PROBE], cwd=folder, env=device_env(tmp_path), capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["new_allocations"] == 0
    if name == "xavier-nx-int4":
        assert res["runs"]["decoder"].startswith("ONNX Runtime (CPUExecutionProvider)")
    else:
        assert all(row["switches"] == 1 and row["first"] == ["prefill"] for row in res["rows"]), res["rows"]
    capsys.readouterr()
    for row in res["rows"]:
        assert main(["ask", str(art), "--image", str(folder / row["image"]), row["question"], "--json"]) == 0
        host = json.loads(capsys.readouterr().out)["answers"][0]["answer"]
        assert row["answer"] == host, (row, host)


@pytest.mark.parametrize("name", RECIPES)
def test_verify_standin_passes_and_placeholder_engines_keep_medlite_verify_passing(demo_bundles, name, tmp_path,
                                                                                  capsys):
    art, folder = demo_bundles[name]
    env = device_env(tmp_path)
    r = run(folder, ["verify", "--standin"], env, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "ok   outputs:" in r.stdout and "identical to the host's" in r.stdout
    for n in ("vision.engine", "decoder.engine", "timing.cache", "bench.json"):
        for base in (art, folder / "artifact"):
            (base / "device").mkdir(exist_ok=True)
            (base / "device" / n).write_bytes(b"placeholder")
    assert main(["verify", str(art), "--skip-checks"]) == 0
    assert run(folder, ["verify", "--standin"], env, timeout=900).returncode == 0
    (art / "device" / "stray.bin").write_bytes(b"x")
    try:
        assert main(["verify", str(art), "--skip-checks"]) == 1
        assert "device/stray.bin: extra file not in the manifest" in capsys.readouterr().err
    finally:
        (art / "device" / "stray.bin").unlink()
