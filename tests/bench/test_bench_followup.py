"""``medlite bench`` reports ``followup_ttft_ms``: time to first token of a second question on the same image
with the image's prompt-prefix KV cache kept (issue 31), beside ``ttft_ms``."""
from __future__ import annotations

import json
import math

import pytest

from medlite.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from medlite.checkpoints import load_model
    from medlite.checkpoints.random_ckpt import write_random_checkpoint
    from medlite.context import RunContext
    from medlite.export import export_onnx

    cache = tmp_path_factory.mktemp("bench-followup-cache")
    ctx = RunContext(cache_dir=cache, quiet=True)
    ckpt = write_random_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny", fmt="legacy", ctx=ctx)
    out = tmp_path_factory.mktemp("export")
    export_onnx(load_model(ckpt, ctx=ctx), out, ctx=ctx, precision="fp32")
    return ckpt, out, cache


def _new_tokens(export, question: str) -> int:
    """Prompt tokens after the template's fixed prefix (everything before the question text)."""
    from medlite.prompting import encode_prompt, expand_image_tokens
    from medlite.runtime import OnnxVlm

    vlm = OnnxVlm.open(export, providers=["CPUExecutionProvider"])
    c = vlm.config
    text = c.template.render(question)
    head = expand_image_tokens(encode_prompt(vlm.tokenizer, text[: text.index(question)],
                                             image_token_id=c.image_token_id, bos_token_id=c.bos_token_id),
                               c.image_token_id, c.num_image_tokens)
    return len(vlm.prompt_ids(question)) - len(head)


def test_followup_ttft_beside_ttft(tiny, capsys):
    from medlite.evaluation.vqa import load_dataset

    _, export, cache = tiny
    common = ["bench", "--model", str(export), "--runs", "2", "--warmup", "1", "--max-new-tokens", "4",
              "--cache-dir", str(cache)]
    capsys.readouterr()
    assert main([*common, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    question = load_dataset("builtin:micro-med-vqa", split="test")[0].question
    assert r["question"] == question and r["details"]["followup_question"] == question
    assert math.isfinite(r["followup_ttft_ms"]) and r["followup_ttft_ms"] > 0 and r["ttft_ms"] > 0
    assert r["followup_prefill_tokens"] == _new_tokens(export, question) < r["prompt_tokens"]
    assert json.loads((export / "bench.json").read_text())["followup_ttft_ms"] == r["followup_ttft_ms"]

    other = "which organ is this ?"
    assert main([*common, "--followup-question", other, "--no-write"]) == 0
    table = capsys.readouterr().out
    line = next(x for x in table.splitlines() if x.strip().startswith("follow-up TTFT"))
    assert f"{_new_tokens(export, other)} tokens prefilled" in line and " ms " in line


def test_checkpoint_has_no_followup_figure(tiny, capsys):
    ckpt, _, cache = tiny
    capsys.readouterr()
    assert main(["bench", "--model", str(ckpt), "--json", "--runs", "1", "--warmup", "0", "--max-new-tokens", "2",
                 "--cache-dir", str(cache)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["followup_ttft_ms"] is None and r["followup_prefill_tokens"] is None and r["ttft_ms"] > 0
