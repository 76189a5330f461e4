"""``medlite inspect`` and ``medlite plan`` read sizes from config.json + safetensors headers without torch."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from medlite.checkpoints import load_model

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "xavier-agx-int8.yaml"
CASES = [("tiny", "legacy"),          # tower copy with weights next to it: compared without torch
         ("tiny-qwen2", "hf"),        # tied embeddings, HF Llava layout
         ("tiny-phi", "factory")]     # lm_head bias, tokenizer smaller than the embedding


def _cli_without_torch(*argv: str) -> dict:
    """Run the CLI in a fresh interpreter; its --json result plus whether torch/transformers got imported."""
    code = ("import sys; from medlite.cli import main; rc = main(sys.argv[1:]); "
            "print('IMPORTED', 'torch' in sys.modules, 'transformers' in sys.modules, file=sys.stderr); sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, "--json", *argv], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert "IMPORTED False False" in p.stderr, p.stderr
    return json.loads(p.stdout)


def _reference(folder, ctx, dtype: str) -> dict:
    """Parameters and bytes per component from the torch state dict of the model loaded at ``dtype``."""
    loaded = load_model(folder, ctx=ctx, dtype=dtype)
    out = {k: {"params": 0, "bytes": 0} for k in ("vision_tower", "projector", "llm", "embeddings")}
    seen = set()
    for name, t in loaded.model.state_dict().items():
        if t.data_ptr() in seen or name == "lm_head.bias":   # tied lm_head counted once; the bias is not a weight table
            continue
        seen.add(t.data_ptr())
        part = ("vision_tower" if ".vision_tower." in name else "projector" if "multi_modal_projector" in name
                else "embeddings" if name in ("lm_head.weight", "model.language_model.embed_tokens.weight") else "llm")
        out[part]["params"] += t.numel()
        out[part]["bytes"] += t.numel() * t.element_size()
    out["total"] = {k: sum(v[k] for v in out.values()) for k in ("params", "bytes")}
    return out


@pytest.mark.parametrize("preset,fmt", CASES)
def test_inspect_and_plan_import_no_torch_and_match_the_loaded_model(preset, fmt, random_ckpt, ctx):
    folder = random_ckpt(preset, fmt)
    rep = _cli_without_torch("inspect", "--model", str(folder))
    ref = _reference(folder, ctx, rep["source_dtype"])
    assert rep["params"] == ref
    plan = _cli_without_torch("plan", str(RECIPE), "--model", str(folder))
    p = plan["params"]
    assert p["vision"] == ref["vision_tower"]["params"] and p["projector"] == ref["projector"]["params"]
    assert p["llm"] == ref["llm"]["params"] and p["embed"] + p["lm_head"] == ref["embeddings"]["params"]


@pytest.mark.parametrize("preset,fmt", CASES)
def test_header_report_equals_the_meta_device_report(preset, fmt, random_ckpt, ctx):
    """Everything inspect shows (architecture, ids, template, notes) is what the meta-device model gave."""
    from medlite.checkpoints.commands import inspect_report, report_from_facts
    from medlite.checkpoints.headers import facts_from_loaded
    from medlite.checkpoints.loader import inspect_checkpoint

    folder = random_ckpt(preset, fmt)
    fast = inspect_report(folder, ctx=ctx)
    meta = report_from_facts(folder, facts_from_loaded(inspect_checkpoint(folder, ctx=ctx)))
    assert fast == meta


def test_inconsistent_shapes_fall_back_to_the_full_check(random_ckpt, ctx, tmp_path):
    """A config that disagrees with the tensors is reported exactly as the meta-device inspection reports it."""
    import shutil

    from medlite.checkpoints.commands import inspect_report
    from medlite.errors import CheckpointError

    d = tmp_path / "c"
    shutil.copytree(random_ckpt("tiny", "factory"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"]["num_hidden_layers"] += 1
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="lacks tensors the model needs"):
        inspect_report(d, ctx=ctx)


def test_demo_key_without_torch_is_the_demo_model_key():
    from medlite.demo.model import demo_model_key
    from medlite.model_choice import demo_key_without_torch

    assert demo_key_without_torch() == demo_model_key()


def test_text_defaults_are_the_transformers_defaults():
    import transformers

    from medlite.checkpoints.configspec import TEXT_DEFAULTS

    classes = {"llama": transformers.LlamaConfig, "phi": transformers.PhiConfig,
               "stablelm": transformers.StableLmConfig, "qwen2": transformers.Qwen2Config}
    for backbone, cls in classes.items():
        c = cls()
        for k, v in TEXT_DEFAULTS[backbone].items():
            if k == "head_dim" and not hasattr(c, "head_dim"):
                continue
            if v is None:   # "derived": num_key_value_heads = heads, head_dim = hidden // heads
                v = c.num_attention_heads if k == "num_key_value_heads" else c.hidden_size // c.num_attention_heads
            assert getattr(c, k) == v, (backbone, k)
