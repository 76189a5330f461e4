"""``medlite serve``: follow-up questions in one browser session reuse the image's prompt-prefix KV cache
(issue 31); the cache is per session, bounded in bytes over all sessions, and a session's new image drops
its old one. The demo model's fp32 export behind a live uvicorn server."""
from __future__ import annotations

import io
import secrets
import urllib.request

import numpy as np
import pytest
from serve_helpers import LiveServer, multipart, sse_events

pytest.importorskip("uvicorn")

from medlite.runtime import OnnxVlm  # noqa: E402
from medlite.serve.app import SESSION_COOKIE, create_app  # noqa: E402
from medlite.serve.uploads import ServeLimits  # noqa: E402

Q1, Q2 = "Is this image a X-ray?", "Is there a fracture?"


@pytest.fixture(scope="module")
def demo_export(tmp_path_factory):
    from medlite.checkpoints import load_model
    from medlite.context import RunContext
    from medlite.demo.model import ensure_demo_model
    from medlite.export import export_onnx

    ctx = RunContext(quiet=True)
    out = tmp_path_factory.mktemp("serve-followup-export")
    export_onnx(load_model(ensure_demo_model(ctx), ctx=ctx), out, ctx=ctx, precision="fp32")
    return out


@pytest.fixture(scope="module")
def reference(demo_export):
    return OnnxVlm.open(demo_export, providers=["CPUExecutionProvider"])


def png(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def ask(url: str, data: bytes, question: str, session=None):
    """(Set-Cookie header or None, the ``done`` event's data) of one ``/api/ask``."""
    body, ctype = multipart({"question": question}, ("scan.png", data))
    headers = {"Content-Type": ctype}
    if session:
        headers["Cookie"] = f"{SESSION_COOKIE}={session}"
    req = urllib.request.Request(f"{url}/api/ask", data=body, method="POST", headers=headers)
    with urllib.request.urlopen(req, timeout=120) as r:
        cookie, events = r.headers.get("Set-Cookie"), sse_events(r.read())
    assert events[-1][0] == "done", events[-1]
    return cookie, events[-1][1]


def head_len(vlm, question: str) -> int:
    """Prompt tokens before the question text (the template's fixed prefix), tokenized from the text."""
    from medlite.prompting import encode_prompt, expand_image_tokens

    c = vlm.config
    text = c.template.render(question)
    ids = encode_prompt(vlm.tokenizer, text[: text.index(question)], image_token_id=c.image_token_id,
                        bos_token_id=c.bos_token_id)
    return len(expand_image_tokens(ids, c.image_token_id, c.num_image_tokens))


def test_followup_in_a_session_prefills_only_its_question(demo_export, reference):
    from PIL import Image

    vlm = OnnxVlm.open(demo_export, providers=["CPUExecutionProvider"])
    scan = png(0)
    image = Image.open(io.BytesIO(scan)).convert("RGB")
    with LiveServer(create_app(vlm)) as server:
        cookie, first = ask(server.url, scan, Q1)
        assert cookie and cookie.startswith(f"{SESSION_COOKIE}=") and "httponly" in cookie.lower()
        sid = cookie.split(";")[0].split("=", 1)[1]
        again, second = ask(server.url, scan, Q2, session=sid)
        assert again is None                                    # the session is kept, not renewed
        _, other = ask(server.url, scan, Q2, session=secrets.token_hex(16))   # another session: its own cache
        renewed, _ = ask(server.url, scan, Q1, session="../not-an-id")
    assert renewed and renewed.split(";")[0].split("=", 1)[1] != "../not-an-id"
    assert [first["answer"], second["answer"], other["answer"]] == [
        reference.answer(image, q, max_new_tokens=32) for q in (Q1, Q2, Q2)]
    full1, full2 = len(reference.prompt_ids(Q1)), len(reference.prompt_ids(Q2))
    assert (first["prefill_tokens"], first["cached_tokens"]) == (full1, 0)
    assert (second["prefill_tokens"], second["cached_tokens"]) == (full2 - head_len(reference, Q2),
                                                                   head_len(reference, Q2))
    assert (other["prefill_tokens"], other["cached_tokens"]) == (full2, 0)


def test_session_caches_stay_within_the_bound(demo_export):
    vlm = OnnxVlm.open(demo_export, providers=["CPUExecutionProvider"])
    c = vlm.config
    m = c.model
    entry = (2 * m["num_layers"] * m["num_kv_heads"] * m["head_dim"] * np.dtype(c.kv_cache["dtype"]).itemsize
             * (int(c.kv_cache["prefill_past_slots"]) + head_len(vlm, Q1)))
    bound = int(2.5 * entry)                                   # room for two sessions' images
    sessions = [secrets.token_hex(16) for _ in range(6)]
    with LiveServer(create_app(vlm, limits=ServeLimits(prefix_cache_bytes=bound))) as server:
        cache = vlm.prefix_cache
        assert cache is not None and cache.max_bytes == bound
        for i, sid in enumerate(sessions):
            for image in (png(100 + 2 * i), png(101 + 2 * i)):      # each session: two scans, two questions each
                for q, hit in ((Q1, False), (Q2, True)):
                    _, done = ask(server.url, image, q, session=sid)
                    assert (done["cached_tokens"] > 0) == hit, (i, q)
                    assert cache.nbytes <= bound and len(cache) <= 2
    s = cache.stats()
    n = len(sessions)
    assert (s["hits"], s["misses"], s["stored"]) == (2 * n, 2 * n, 2 * n)
    assert s["evicted_new_image"] == n                        # each session's second scan dropped its first
    assert s["evicted_lru"] == 2 * n - n - s["entries"]       # the rest went by the byte bound
    assert s["entries"] == 2 and s["bytes"] == 2 * entry


def test_prefix_cache_off(demo_export):
    vlm = OnnxVlm.open(demo_export, providers=["CPUExecutionProvider"])
    with LiveServer(create_app(vlm, limits=ServeLimits(prefix_cache_bytes=0))) as server:
        cookie, _ = ask(server.url, png(0), Q1)
        sid = cookie.split(";")[0].split("=", 1)[1]
        _, done = ask(server.url, png(0), Q2, session=sid)
    assert vlm.prefix_cache is None and done["cached_tokens"] == 0


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_bad_prefix_cache_size_is_one_line(tmp_path, capsys, value):
    from medlite.cli import main

    assert main(["serve", str(tmp_path), "--prefix-cache-mb", value]) == 2
    err = capsys.readouterr().err
    assert f"--prefix-cache-mb must be 0 (keep none) or more, got {float(value)}" in err and "Traceback" not in err


@pytest.mark.slow
def test_browser_session_follow_up_reuses_the_prefix(serve_artifact, tmp_path):
    """The page's own fetch keeps the session cookie: a second question on the same scan shows the reuse
    (a built artifact of the demo model: the page waits for its version)."""
    from pathlib import Path

    from serve_helpers import CHROMEDRIVER, CHROMIUM, CliServer, ask_in_page, chromium

    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("chromium / chromedriver missing (.ci/run installs them)")
    scan = tmp_path / "scan.png"
    scan.write_bytes(png(3))
    reference = OnnxVlm.open(serve_artifact, providers=["CPUExecutionProvider"])
    server, driver = CliServer(str(serve_artifact)), chromium(tmp_path / "profile")
    try:
        first = ask_in_page(driver, server.url, scan, Q1)
        second = ask_in_page(driver, server.url, scan, Q2)     # the page reloaded: same browser session
        cookies = {c["name"]: c for c in driver.get_cookies()}
    finally:
        driver.quit()
        server.close()
    assert SESSION_COOKIE in cookies and cookies[SESSION_COOKIE]["httpOnly"]
    assert first["state"] == second["state"] == "done" and "reused" not in first["stats"]
    new = len(reference.prompt_ids(Q2)) - head_len(reference, Q2)
    assert f"prefilled {new} new tokens, {head_len(reference, Q2)} reused" in second["stats"]
