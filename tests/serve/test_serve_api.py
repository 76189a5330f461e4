"""The HTTP API of ``medlite serve`` on a real artifact of the demo model, through a live uvicorn
server on 127.0.0.1: streamed answers equal the runtime's, bad uploads get readable messages and
the server keeps serving, the bounded queue answers 503 without losing or mixing answers, nothing
stays on disk and no patient data reaches the logs."""
from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from serve_helpers import LiveServer, get_json, png_header_only, post, sse_events

from medlite.artifacts import open_artifact
from medlite.serve.app import create_app
from medlite.serve.uploads import ServeLimits
from medlite.serve.worker import _stream_keyword

try:
    from medlite.imaging.images import load_image
except ImportError:  # before the issue-12 move
    from medlite.calibration.images import load_image

pytestmark = pytest.mark.slow
QUESTION = "Is there a lesion?"


@pytest.fixture(scope="module")
def artifact(serve_artifact):
    return open_artifact(serve_artifact)


@pytest.fixture(scope="module")
def vlm(serve_artifact):
    from medlite.runtime import OnnxVlm

    return OnnxVlm.open(serve_artifact)


@pytest.fixture(scope="module")
def reference(serve_artifact):
    """A separately opened runtime: what `medlite ask` runs."""
    from medlite.runtime import OnnxVlm

    return OnnxVlm.open(serve_artifact)


@pytest.fixture(scope="module")
def server(vlm, artifact, tmp_path_factory):
    uploads = tmp_path_factory.mktemp("uploads")
    with LiveServer(create_app(vlm, artifact=artifact, tmp_root=uploads, allowed_hosts=["127.0.0.1"])) as s:
        s.uploads = uploads
        yield s


def ask(url, image: tuple[str, bytes], question=QUESTION, **fields):
    status, headers, body = post(url + "/api/ask", {"question": question, **fields}, image)
    return status, headers, (sse_events(body) if status == 200 else json.loads(body))


def test_info_is_the_manifest(server, artifact):
    info = get_json(server.url + "/api/info")
    a = info["artifact"]
    assert a["version"] == artifact.manifest["version"] and a["status"] == "passed" and a["hashes_checked"]
    assert info["precision"] == "vision fp32, embed fp32, decoder fp32" and a["recipe"] == "serve-test"
    assert [g["name"] for g in a["gates"]] == [g["name"] for g in artifact.manifest["gates"]] and a["gates"]
    assert all(g["passed"] is not False and g["text"].startswith(g["name"]) for g in a["gates"])


def test_streamed_answer_equals_the_runtime(server, reference, ct_small):
    status, headers, events = ask(server.url, ("CT_small.dcm", ct_small.read_bytes()))
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    kinds = [e for e, _ in events]
    assert kinds[:2] == ["queued", "start"] and kinds[-1] == "done" and set(kinds[2:-1]) <= {"token"}
    done = events[-1][1]
    image = load_image(ct_small)
    expected = reference.answer(image, QUESTION)
    assert done["answer"] == expected and "".join(d["text"] for e, d in events if e == "token") == expected
    ids = reference.generate_ids([image], [QUESTION])[0]
    # the answer re-tokenized vs the ids generated (greedy output is normally BPE's own segmentation)
    assert len(ids) > 0 and abs(done["tokens"] - len(ids)) <= 1
    assert done["latency_s"] > 0 and done["tokens_per_s"] > 0


def _bad_uploads(ct_small):
    data = ct_small.read_bytes()
    return {
        "corrupt DICOM": (("scan.dcm", data[: len(data) // 2]), 400, "scan.dcm: "),
        "text renamed .dcm": (("notes.dcm", b"not a scan at all\n" * 30), 400, "notes.dcm: "),
        "50,000 x 50,000 PNG": (("huge.png", png_header_only(50_000, 50_000)), 413, "huge.png: "),
        "no file": (None, 400, "no file in the upload"),
    }


@pytest.mark.parametrize("endpoint", ["preview", "ask"])
def test_bad_uploads_get_readable_messages_and_the_server_keeps_serving(server, ct_small, endpoint):
    for case, (file, code, start) in _bad_uploads(ct_small).items():
        status, _, body = post(f"{server.url}/api/{endpoint}", {"question": QUESTION}, file)
        msg = json.loads(body)["error"]
        assert status == code and msg.startswith(start), (case, status, msg)
        assert "Traceback" not in msg and str(server.uploads) not in msg
    status, _, body = post(server.url + "/api/preview", {}, ("ct.dcm", ct_small.read_bytes()))
    assert status == 200 and json.loads(body)["model_view"].startswith("data:image/png;base64,")
    assert server.app.state.worker.busy == 0
    assert list(server.uploads.iterdir()) == []


def test_request_checks(server, ct_small):
    image = ("ct.dcm", ct_small.read_bytes())
    assert ask(server.url, image, question="  ")[2]["error"] == "ask a question about the image"
    assert "at most 1000" in ask(server.url, image, question="x" * 1001)[2]["error"]
    assert "window 'C1W2'" in ask(server.url, image, window="C1W2")[2]["error"]
    assert "frame 3 out of range" in ask(server.url, image, frame="3")[2]["error"]
    req = urllib.request.Request(server.url + "/api/info", headers={"Host": "attacker.example"})
    with pytest.raises(urllib.error.HTTPError) as e:   # DNS rebinding: only the loopback names are served
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 400


def test_upload_size_limit(vlm, artifact, ct_small, tmp_path):
    with LiveServer(create_app(vlm, artifact=artifact, limits=ServeLimits(max_upload_bytes=10_000),
                               tmp_root=tmp_path)) as s:
        for endpoint in ("preview", "ask"):
            status, _, body = post(f"{s.url}/api/{endpoint}", {"question": QUESTION}, ("ct.dcm", ct_small.read_bytes()))
            assert status == 413 and "at most 10,000" in json.loads(body)["error"]
        assert s.app.state.worker.busy == 0
    assert list(tmp_path.iterdir()) == []


class GatedVlm:
    """The real runtime, held at a gate so that requests pile up deterministically."""

    def __init__(self, vlm):
        self.vlm, self.config, self.providers, self.tokenizer = vlm, vlm.config, vlm.providers, vlm.tokenizer
        self.gate, self.entered = threading.Event(), threading.Event()
        self._kw = _stream_keyword(vlm)

    def answer(self, image, question, *, max_new_tokens=32, on_token=None):
        self.entered.set()
        assert self.gate.wait(60)
        return self.vlm.answer(image, question, max_new_tokens=max_new_tokens, **{self._kw: on_token})


def _wait(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_queue_limit_gives_503_and_keeps_every_admitted_answer(vlm, reference, ct_small, mr_small, tmp_path):
    """max_queue=1: one answering + one waiting; four more concurrent requests get 503 + Retry-After."""
    gated = GatedVlm(vlm)
    jobs = [(ct_small, "Is there a lesion?"), (mr_small, "What modality is this?")]
    expected = [reference.answer(load_image(p), q) for p, q in jobs]
    results: dict = {}

    def send(key, path, question):
        results[key] = ask(s.url, (path.name, path.read_bytes()), question)

    with LiveServer(create_app(gated, limits=ServeLimits(max_queue=1), tmp_root=tmp_path)) as s:
        worker = s.app.state.worker
        threads = [threading.Thread(target=send, args=(i, p, q)) for i, (p, q) in enumerate(jobs)]
        threads[0].start()
        assert gated.entered.wait(60)                    # the first request is being answered
        threads[1].start()
        _wait(lambda: worker.busy == 2)                  # the second waits in the queue
        extra = [threading.Thread(target=send, args=(f"x{i}", ct_small, "Is this normal?")) for i in range(4)]
        for t in extra:
            t.start()
        for t in extra:
            t.join(60)
        gated.gate.set()
        for t in threads:
            t.join(120)
        _wait(lambda: worker.busy == 0)
    for i in range(4):
        status, headers, body = results[f"x{i}"]
        assert status == 503 and int(headers["retry-after"]) >= 1 and "busy" in body["error"]
    for i, want in enumerate(expected):
        status, _, events = results[i]
        assert status == 200 and events[-1][0] == "done", events[-1]
        assert events[-1][1]["answer"] == want
        assert "".join(d["text"] for e, d in events if e == "token") == want
    assert [results[i][2][0][1]["position"] for i in range(2)] == [0, 1]
    assert list(tmp_path.iterdir()) == []


def _dicom_with(ct_small, marker: str) -> bytes:
    import pydicom

    ds = pydicom.dcmread(ct_small)
    ds.PatientName, ds.PatientID, ds.InstitutionName = f"{marker}^NAME", f"{marker}-ID", f"{marker} Hospital"
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def test_no_upload_on_disk_and_no_patient_data_in_logs(server, ct_small, caplog):
    marker = "ZZPATIENT7431"
    data = _dicom_with(ct_small, marker)
    caplog.set_level(logging.INFO)
    for endpoint in ("preview", "ask"):
        status, _, body = post(f"{server.url}/api/{endpoint}", {"question": QUESTION}, (f"{marker}.dcm", data))
        assert status == 200, body
    post(server.url + "/api/ask", {"question": QUESTION}, (f"{marker}.dcm", data[:2000]))   # a failing one
    assert "decoded a dicom upload" in caplog.text and "answered in" in caplog.text   # the log is not empty
    assert marker not in caplog.text
    assert list(server.uploads.iterdir()) == []


def test_server_imports_no_torch(serve_artifact, ct_small):
    code = f"""
import sys
from pathlib import Path
from medlite.artifacts import open_artifact
from medlite.runtime import OnnxVlm
from medlite.serve.app import create_app
from medlite.serve.commands import cmd_serve
from medlite.serve.uploads import decode_upload, model_view
from medlite.cli import build_parser
art = open_artifact(Path({str(serve_artifact)!r}))
vlm = OnnxVlm.open(art.path)
app = create_app(vlm, artifact=art)
up = decode_upload(Path({str(ct_small)!r}).read_bytes(), "ct.dcm")
model_view(up.image, vlm.config.image_spec)
print(repr(vlm.answer(up.image, "Is there a lesion?")))
app.state.worker.close()
bad = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
assert not bad, bad
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def test_a_client_that_leaves_is_stopped_and_frees_its_slot(vlm, ct_small, tmp_path, caplog):
    import socket

    from serve_helpers import multipart

    caplog.set_level(logging.INFO)
    gated = GatedVlm(vlm)
    with LiveServer(create_app(gated, limits=ServeLimits(max_queue=0), tmp_root=tmp_path)) as s:
        body, ctype = multipart({"question": QUESTION}, ("ct.dcm", ct_small.read_bytes()))
        port = int(s.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            conn.sendall(f"POST /api/ask HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            assert b"event: queued" in conn.recv(65536) or b"event: queued" in conn.recv(65536)
            assert gated.entered.wait(60) and s.app.state.worker.busy == 1
        time.sleep(0.5)                                  # the server notices the closed connection
        gated.gate.set()
        _wait(lambda: s.app.state.worker.busy == 0)
        status, _, events = ask(s.url, ("ct.dcm", ct_small.read_bytes()))   # the slot is free again
        assert status == 200 and events[-1][0] == "done"
    assert "request cancelled by the client" in caplog.text
