"""The shipped fewer-image-tokens recipe on the demo model (issue 32): 49 → 16 tokens, distilled back to the
source, gated; and everything downstream uses the new count (runtime, engine profiles, memory, plan, bench, serve)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow
N_SRC, N_IMG = 49, 16


@pytest.fixture(scope="module")
def built(tmp_path_factory, monkeypatch_module):
    from medlite.cli import main

    out = tmp_path_factory.mktemp("tokens-art")
    # its own cache: the demo model (user cache) is read, this build's stage outputs stay here
    monkeypatch_module.setenv("MEDLITE_STAGE_CACHE_GB", "0")
    assert main(["build", "recipes/xavier-nx-tokens16.yaml", "--out", str(out)]) == 0
    (art,) = list((out / "micro-tinyllava-med" / "xavier-nx-tokens16").glob("1.0.0+*"))
    return art


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_gates_hold_after_distillation(built):
    report = json.loads((built / "report.json").read_text())
    m = report["metrics"]
    assert m["closed_acc_drop"] <= 2.0                     # points, held-out test split
    assert m["agreement"] >= 0.90
    tok = json.loads((built / "manifest.json").read_text())["sections"]["tokens"]
    assert (tok["tokens_in"], tok["tokens_out"], tok["kernel"], tok["pad"]) == (N_SRC, N_IMG, 2, 1)


def test_runtime_graph_profiles_and_memory_use_the_new_count(built):
    import onnxruntime as ort

    cfg = json.loads((built / "medlite_runtime.json").read_text())
    assert cfg["num_image_tokens"] == N_IMG
    sess = ort.InferenceSession(str(built / "vision.onnx"), providers=["CPUExecutionProvider"])
    size = sess.get_inputs()[0].shape[-1]
    out = sess.run(None, {"pixel_values": np.zeros((1, 3, size, size), np.float32)})[0]
    assert out.shape[1] == N_IMG
    eng = json.loads((built / "engines" / "engines.json").read_text())
    lim = eng["limits"]
    assert lim["max_context_tokens"] == 1 + N_IMG + lim["max_prompt_tokens"] + lim["max_new_tokens"]
    dec = next(e for e in eng["engines"] if e["name"] == "decoder")
    prefill = next(p for p in dec["profiles"] if p["name"] == "prefill")
    assert prefill["shapes"]["inputs_embeds"]["max"][1] == N_IMG + lim["max_prompt_tokens"]
    mem = eng["memory"]
    model = cfg["model"]
    kv = model["num_layers"] * 2 * model["num_kv_heads"] * model["head_dim"] * 2 * lim["max_context_tokens"]
    assert mem["context_tokens"] == lim["max_context_tokens"] and mem["kv_cache_bytes"] == kv    # fp16 K and V


def test_plan_chains_the_count_before_the_build(built, capsys):
    from medlite.cli import main

    assert main(["plan", "--json", "recipes/xavier-nx-tokens16.yaml"]) == 0
    plan = json.loads(capsys.readouterr().out)
    eng = json.loads((built / "engines" / "engines.json").read_text())["memory"]
    assert plan["budget"]["parts"]["KV cache"] == eng["kv_cache_bytes"]
    assert plan["budget"]["parts"]["activations"] == eng["activation_bytes"]
    assert f"at {eng['context_tokens']} tokens" in plan["budget"]["context"]


def test_bench_and_serve_see_the_new_count(built, capsys):
    from medlite.cli import main
    from medlite.runtime.vlm import OnnxVlm
    from medlite.serve.info import serve_info

    vlm = OnnxVlm.open(built)
    q = "is there a lesion?"
    ids = vlm.prompt_ids(q)
    assert ids.count(vlm.config.image_token_id) == N_IMG
    assert main(["bench", "--model", str(built), "--question", q, "--runs", "1", "--warmup", "0",
                 "--max-new-tokens", "2"]) == 0
    bench = json.loads((built / "bench.json").read_text())
    got = bench.get("prompt_tokens", (bench.get("results") or [{}])[0].get("prompt_tokens"))
    assert got == len(ids)
    assert serve_info(vlm)["num_image_tokens"] == N_IMG
