"""An impossible plan is a recipe error (issue 12): by how much, and which component dominates —
for ``plan`` and for ``build`` before any weight loads."""
from __future__ import annotations

import json

import pytest

from medlite.cli import main

RECIPE = """\
name: too-big
version: 1.0.0
target: jetson-xavier-nx-8gb
stages:
  - export: {{precision: fp16}}
  - engines: {{max_batch: {batch}, max_new_tokens: {tokens}}}
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from medlite.checkpoints.random_ckpt import write_random_checkpoint
    from medlite.context import RunContext

    root = tmp_path_factory.mktemp("ckpt")
    return write_random_checkpoint("tiny", root / "tiny", fmt="legacy", ctx=RunContext(cache_dir=root / "c", quiet=True))


def _run(tmp_path, tiny, command, batch, tokens, *extra):
    r = tmp_path / "r.yaml"
    r.write_text(RECIPE.format(batch=batch, tokens=tokens))
    return main(["--quiet", "--cache-dir", str(tmp_path / "c"), command, str(r), "--model", str(tiny),
                 "--vision-tower", str(tiny / "vision_tower"), *extra])


def test_over_budget_plan_is_an_error_naming_the_kv_cache(tmp_path, tiny, capsys):
    from medlite.recipes.planning import CONTEXT_RESERVE_BYTES

    assert _run(tmp_path, tiny, "plan", 64, 10_000_000) == 2
    err = capsys.readouterr().err
    assert "device memory: needs" in err and "jetson-xavier-nx-8gb has 5.50 GB usable" in err
    assert "the KV cache dominates" in err and " over; " in err
    # the KV cache figure is the tiny model's (2 layers, 2 KV heads, head dim 16, fp16) at the recipe's limits
    tokens = 1 + 16 + 128 + 10_000_000      # 16 image tokens in the tiny preset
    kv = 2 * 2 * 2 * 16 * tokens * 64 * 2
    assert f"KV cache {kv / 1e9:.2f} GB" in err
    assert CONTEXT_RESERVE_BYTES > 0


def test_build_refuses_before_loading_and_writes_nothing(tmp_path, tiny, capsys):
    assert _run(tmp_path, tiny, "build", 64, 10_000_000, "--out", str(tmp_path / "out")) == 2
    assert "the KV cache dominates" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("manifest.json"))


def test_plan_budget_line_includes_the_kv_cache(tmp_path, tiny, capsys):
    assert _run(tmp_path, tiny, "plan", 1, 128, "--json") == 0
    out = json.loads(capsys.readouterr().out)
    parts = out["budget"]["parts"]
    assert parts["KV cache"] == 2 * 2 * 2 * 16 * (1 + 16 + 128 + 128) * 1 * 2
    assert out["budget"]["fits"] and out["budget"]["total"] == sum(parts.values())
