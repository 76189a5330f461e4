"""``medlite bench`` on an ONNX export and on its checkpoint (tiny random model), same prompt."""
from __future__ import annotations

import json
import math

import pytest

from medlite.cli import main

FIGURES = ("image_encode_ms", "prefill_ms", "ttft_ms", "decode_tokens_per_s", "peak_rss_bytes", "threads",
           "tokens", "decode_steps", "prompt_tokens")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from medlite.checkpoints.random_ckpt import write_random_checkpoint
    from medlite.context import RunContext
    from medlite.export import export_onnx

    cache = tmp_path_factory.mktemp("bench-cache")
    ctx = RunContext(cache_dir=cache, quiet=True)
    ckpt = write_random_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny", fmt="legacy", ctx=ctx)
    from medlite.checkpoints import load_model

    out = tmp_path_factory.mktemp("export")
    export_onnx(load_model(ckpt, ctx=ctx), out, ctx=ctx, precision="fp32")
    return ckpt, out, cache


def _bench(capsys, model, cache, *extra):
    capsys.readouterr()
    rc = main(["bench", "--model", str(model), "--json", "--runs", "2", "--warmup", "1", "--cache-dir", str(cache),
               *extra])
    assert rc == 0
    return json.loads(capsys.readouterr().out)


def _pair():
    from medlite.evaluation.vqa import load_dataset

    s = load_dataset("builtin:micro-med-vqa", split="test")[0]
    return s.load_image(), s.question


def test_artifact_figures_and_token_count(tiny, capsys):
    from medlite.runtime import OnnxVlm

    _, export, cache = tiny
    r = _bench(capsys, export, cache, "--max-new-tokens", "12")
    image, question = _pair()
    (ids,) = OnnxVlm.open(export, providers=["CPUExecutionProvider"]).generate_ids([image], [question],
                                                                                   max_new_tokens=12)
    assert r["tokens"] == len(ids) and r["question"] == question
    assert r["kind"] == "artifact" and r["runtime"].startswith("onnxruntime")
    for k in FIGURES:
        if k == "decode_tokens_per_s" and r["decode_steps"] == 0:
            continue
        assert math.isfinite(r[k]) and r[k] > 0, (k, r[k])
    written = json.loads((export / "bench.json").read_text())
    assert written["tokens"] == r["tokens"] and written["model"] == str(export)


def test_checkpoint_and_artifact_on_the_same_prompt(tiny, capsys):
    from medlite.artifacts import VOLATILE
    from medlite.checkpoints import load_model
    from medlite.checkpoints.generate import answer
    from medlite.context import RunContext

    ckpt, export, cache = tiny
    a = _bench(capsys, export, cache, "--max-new-tokens", "10", "--ignore-eos")
    c = _bench(capsys, ckpt, cache, "--max-new-tokens", "10", "--ignore-eos")
    assert c["kind"] == "checkpoint" and c["runtime"] == "pytorch eager"
    assert (a["question"], a["image"], a["prompt_tokens"]) == (c["question"], c["image"], c["prompt_tokens"])
    for r in (a, c):
        assert r["tokens"] == 10 and r["decode_steps"] == 9
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in FIGURES)
    image, question = _pair()
    ref = answer(load_model(ckpt, ctx=RunContext(cache_dir=cache, quiet=True)), image, question, max_new_tokens=10)
    assert c["answer"] == ref
    assert "bench.json" in VOLATILE      # never hashed: benchmarking leaves an artifact verifiable


def test_bad_runs_is_one_clear_error(tiny, capsys):
    _, export, cache = tiny
    assert main(["bench", "--model", str(export), "--runs", "0", "--cache-dir", str(cache)]) == 2
    assert "--runs 0" in capsys.readouterr().err


def _copy(export, tmp_path, edit=None):
    """A copy of the export, its medlite_runtime.json changed by ``edit(cfg)``."""
    import shutil

    out = tmp_path / "export"
    shutil.copytree(export, out)
    if edit is not None:
        p = out / "medlite_runtime.json"
        cfg = json.loads(p.read_text())
        edit(cfg)
        p.write_text(json.dumps(cfg, indent=1, sort_keys=True) + "\n")
    return out


def _stops_at_once(export, tmp_path):
    """The export with its first answer token made an end-of-sequence id: every answer is empty."""
    from medlite.runtime import OnnxVlm

    image, question = _pair()
    (first,) = OnnxVlm.open(export, providers=["CPUExecutionProvider"]).generate_ids([image], [question],
                                                                                    max_new_tokens=1)
    return _copy(export, tmp_path, lambda cfg: cfg.update(eos_token_ids=[first[0]]))


def test_decode_speed_is_timed_over_a_fixed_token_count(tiny, tmp_path, capsys):
    """Issue 26 #11: a one-word answer gave "646.9 tokens/s (1 step)"; by default every timed run
    generates --max-new-tokens tokens, and too few steps give no figure, with what to change."""
    _, export, cache = tiny
    short = _stops_at_once(export, tmp_path)
    r = _bench(capsys, short, cache)
    assert r["answer"] == "" and r["tokens"] == 0 and r["decode_steps"] == 31 and r["max_new_tokens"] == 32
    assert math.isfinite(r["decode_tokens_per_s"]) and r["decode_tokens_per_s"] > 0
    r = _bench(capsys, short, cache, "--stop-at-eos")
    assert r["decode_steps"] == 0 and r["decode_tokens_per_s"] is None
    capsys.readouterr()
    assert main(["bench", "--model", str(export), "--runs", "1", "--max-new-tokens", "4", "--cache-dir",
                 str(cache), "--no-write"]) == 0
    out, err = capsys.readouterr()
    assert "decode speed not measured: 3 decode steps timed, fewer than 8" in err and "--max-new-tokens" in err
    assert "tokens/s" not in out and "not measured" in out


def test_int8_graph_is_labelled_int8(tiny, tmp_path, capsys):
    """Issue 26 #4: the precision shown is the quantization record's, not the trace precision."""
    from medlite.recipes.options import QuantizeOptions  # first: the stages import the recipe registry
    from medlite.compress.int8.stage import GraphChoice, _record  # noqa: I001

    _, export, cache = tiny
    rec = _record(GraphChoice(graph="vision", targets=[]), QuantizeOptions(vision="int8"), None)
    art = _copy(export, tmp_path, lambda cfg: cfg["graphs"]["vision"].update(quantization=rec))
    assert _bench(capsys, art, cache, "--runs", "1")["precision"] == "vision int8 Q/DQ, embed fp32, decoder fp32"


def test_read_only_artifact_keeps_the_results(tiny, tmp_path, capsys):
    """Issue 26 #8: bench.json cannot be written (here: a folder of that name; root ignores modes), the
    results are printed and a warning names the file; no traceback."""
    _, export, cache = tiny
    art = _copy(export, tmp_path)
    (art / "bench.json").unlink(missing_ok=True)   # an earlier test's
    (art / "bench.json").mkdir()
    (art / "bench.json" / "keep").write_text("x")
    r = _bench(capsys, art, cache, "--runs", "1")
    assert r["tokens"] > 0 and r["model"] == str(art)
    r2 = main(["bench", "--model", str(art), "--runs", "1", "--warmup", "0", "--cache-dir", str(cache)])
    out, err = capsys.readouterr()
    assert r2 == 0 and "time to first token" in out
    assert f"could not write {art / 'bench.json'}" in err and "Traceback" not in err
    assert (art / "bench.json" / "keep").read_text() == "x"


def test_table_in_decimal_units_and_image_id(tiny, capsys):
    """Issue 26 #13: peak RSS in decimal units (README), the image named by its id (no "fNone")."""
    import re

    from medlite.evaluation.vqa import load_dataset

    _, export, cache = tiny
    capsys.readouterr()
    assert main(["bench", "--model", str(export), "--runs", "1", "--cache-dir", str(cache), "--no-write"]) == 0
    out = capsys.readouterr().out
    assert "MiB" not in out and re.search(r"peak RSS  \d+\.\d\d (kB|MB|GB)$", out, re.M), out
    image_id = load_dataset("builtin:micro-med-vqa", split="test")[0].image_id
    assert "fNone" not in out and f"test image {image_id}" in out


@pytest.mark.parametrize("which", ["export", "checkpoint"])
def test_generation_past_the_context_is_refused_up_front(tiny, which, capsys):
    """Issue 26 #6: --max-new-tokens past the decoder's positions (512 on this model) is refused before any
    run, naming the limit and where it comes from."""
    ckpt, export, cache = tiny
    model = export if which == "export" else ckpt
    capsys.readouterr()
    assert main(["bench", "--model", str(model), "--ignore-eos", "--max-new-tokens", "600", "--runs", "1",
                 "--warmup", "0", "--cache-dir", str(cache), "--no-write"]) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]   # the checkpoint also logs its load
    assert "maximum of 512 positions" in line and "max_position_embeddings" in line and "Traceback" not in err
