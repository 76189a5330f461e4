"""CLI handlers: demo random → inspect → convert (plain transformers loads it) → ask."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medlite.cli import main
from medlite.checkpoints import load_model
from medlite.checkpoints.generate import answer, first_token_logits, pixel_values, prompt_ids


def test_demo_random_then_inspect_json(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["demo", "random", "--preset", "tiny-qwen2", "--format", "factory", "--out", str(out), "--json"]) == 0
    made = json.loads(capsys.readouterr().out)          # --json: one object on stdout (was empty)
    assert made["path"] == str(out) and made["preset"] == "tiny-qwen2" and made["format"] == "factory"
    assert made["bytes"] == sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert main(["inspect", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["format"] == "factory" and rep["text_backbone"] == "qwen2" and rep["num_image_tokens"] == 15
    p = rep["params"]
    assert p["total"]["params"] == sum(p[k]["params"] for k in ("vision_tower", "projector", "llm", "embeddings"))
    # tied embeddings are counted once: 513 rows × 64
    assert p["embeddings"]["params"] == 513 * 64
    assert p["projector"]["params"] == 32 * 64 + 64 + 64 * 64 + 64
    assert p["vision_tower"]["bytes"] == 2 * p["vision_tower"]["params"]  # fp16 source
    assert any("drops the first token" in n for n in rep["notes"])
    # refusing to overwrite
    assert main(["demo", "random", "--preset", "tiny", "--out", str(out)]) == 2


def test_inspect_reads_no_tensor_data(random_ckpt, ctx, tmp_path):
    """inspect plans from headers: it works on a folder whose tensor bytes are garbage."""
    import shutil

    d = tmp_path / "c"
    shutil.copytree(random_ckpt("tiny", "factory"), d)
    f = d / "model.safetensors"
    raw = bytearray(f.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    raw[8 + n:] = b"\x7f" * (len(raw) - 8 - n)  # NaN-ish fp16 everywhere, header intact
    f.write_bytes(bytes(raw))
    from medlite.checkpoints.commands import inspect_report

    rep = inspect_report(d, ctx=ctx)
    assert rep["format"] == "factory" and rep["num_image_tokens"] == 15


@pytest.mark.parametrize("preset,fmt", [("tiny", "legacy"), ("tiny-phi", "factory")])
def test_convert_loads_with_plain_transformers(preset, fmt, random_ckpt, ctx, photo, tmp_path):
    from transformers import LlavaForConditionalGeneration

    src = random_ckpt(preset, fmt)
    loaded = load_model(src, ctx=ctx)
    out = tmp_path / "conv"
    assert main(["convert", str(src), "--out", str(out)]) == 0
    assert not list(tmp_path.glob(".conv.tmp-*"))  # atomic: no temp folder left
    meta = json.loads((out / "medlite_source.json").read_text())
    assert meta["source"]["format"] == fmt and meta["template"] == loaded.template.name
    plain = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids(loaded, "Where is the lesion?")])
    px = pixel_values(loaded, photo)
    with torch.no_grad():
        want = loaded.model(input_ids=ids, pixel_values=px).logits[0, -1].numpy()
        got = plain(input_ids=ids, pixel_values=px).logits[0, -1].numpy()
    if preset == "tiny-phi":
        # plain Llava has no lm_head bias: it is dropped (convert warns); everything before the head agrees
        bias = loaded.model.lm_head.bias.detach().numpy()
        np.testing.assert_allclose(got + bias, want, atol=1e-5, rtol=0)
    else:
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    again = load_model(out, ctx=ctx)
    assert again.source.format == "hf" and again.image_token_id == loaded.image_token_id
    assert again.num_image_tokens == loaded.num_image_tokens and again.template.name == loaded.template.name
    np.testing.assert_allclose(first_token_logits(again, photo, "Where is the lesion?"), want, atol=1e-5, rtol=0)


def test_convert_warns_about_dropped_bias(random_ckpt, ctx, tmp_path):
    from medlite.checkpoints.commands import write_canonical

    loaded = load_model(random_ckpt("tiny-phi", "legacy"), ctx=ctx)
    n = len(ctx.warnings)
    write_canonical(loaded, tmp_path / "o", ctx=ctx)
    assert any("lm_head has a bias" in w for w in ctx.warnings[n:])


def test_ask_streams_the_reference_answer(random_ckpt, ctx, photo, tmp_path, capsys):
    src = random_ckpt("tiny", "legacy")
    img = tmp_path / "slide.png"
    photo.save(img)
    q = "Is the tissue malignant?"
    assert main(["ask", str(src), q, "--image", str(img), "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out
    from medlite.imaging.images import load_image

    want = answer(load_model(src, ctx=ctx), load_image(img), q, max_new_tokens=5)
    assert printed == want + "\n"
    assert main(["ask", str(src), q, "--image", str(tmp_path / "missing.png")]) == 2
