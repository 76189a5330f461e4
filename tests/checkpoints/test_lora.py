"""LoRA / PEFT adapters merged at load: equal to peft's own unmerged forward, with clear errors.

The reference is independent of medlite's loader: ``ckpt_reference.SourceReference`` builds a plain
transformers ``LlamaForCausalLM`` + SigLIP from the base's source tensors and splices the image
features itself; ``lora_fixtures.make_adapter`` wraps that LM with peft (random non-zero LoRA
weights), saves the adapter with ``PeftModel.save_pretrained`` and gives the reference the projector
it wrote to ``non_lora_trainables.bin``. The reference then runs peft's *unmerged* LoRA layers.
"""
from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from lora_fixtures import make_adapter, rewrite_adapter
from medlite.checkpoints import load_model
from medlite.checkpoints.generate import first_token_logits
from medlite.errors import CheckpointError

QUESTION = "Is there a mass in the left lung?"


class NotATensor:
    """Pickled into a .bin: ``torch.load(weights_only=True)`` must refuse it."""


def _tower(base):
    return base / "vision_tower" if (base / "vision_tower").is_dir() else None


def _load(adapter, base, ctx, **kw):
    return load_model(adapter, ctx=ctx, base=base, vision_tower=_tower(base), **kw)


def _check_against_reference(ad, loaded, photo, base_loaded):
    prompt = loaded.template.render(QUESTION)
    want = ad.ref.first_token_logits(photo, prompt, bos=loaded.bos_token_id)
    got = first_token_logits(loaded, photo, QUESTION)
    n = want.shape[0]
    assert got.shape[0] == n + 1  # the appended <image> row
    np.testing.assert_allclose(got[:n], want, atol=1e-5, rtol=0)
    assert np.abs(want).max() > 0.5, "logits too small for the comparison to mean anything"
    base = first_token_logits(base_loaded, photo, QUESTION)
    assert np.abs(base[:n] - got[:n]).max() > 0.5, "the merge changed nothing"


@pytest.fixture(scope="module")
def legacy_base(random_ckpt):
    return random_ckpt("tiny", "legacy")


@pytest.fixture(scope="module")
def legacy_base_model(legacy_base, ctx):
    return load_model(legacy_base, ctx=ctx, vision_tower=_tower(legacy_base))


@pytest.fixture(scope="module")
def legacy_adapter(legacy_base, tmp_path_factory):
    return make_adapter(legacy_base, tmp_path_factory.mktemp("lora") / "tiny-med-lora")


@pytest.mark.parametrize("kind", ["safetensors", "bin", "dora", "rank_pattern"])
def test_legacy_merge_equals_peft_reference(kind, legacy_base, legacy_base_model, legacy_adapter, ctx, photo,
                                            tmp_path):
    if kind == "safetensors":
        ad = legacy_adapter
    elif kind == "bin":
        ad = make_adapter(legacy_base, tmp_path / "a", binary=True, seed=1)
        assert (ad.folder / "adapter_model.bin").is_file() and not (ad.folder / "adapter_model.safetensors").exists()
    elif kind == "dora":
        ad = make_adapter(legacy_base, tmp_path / "a", use_dora=True, seed=2)
    else:  # per-module rank / alpha: peft's patterns are resolved on the source names, then re-keyed
        ad = make_adapter(legacy_base, tmp_path / "a", seed=3, rank_pattern={"v_proj": 2},
                          alpha_pattern={"down_proj": 32})
    loaded = _load(ad.folder, legacy_base, ctx)
    _check_against_reference(ad, loaded, photo, legacy_base_model)
    assert loaded.source.format == "legacy"
    a = loaded.source.adapter
    assert a["merged"] is True and a["peft_type"] == "LORA"
    assert a["lora_modules"] == 10 and a["target_modules"] == ["down_proj", "gate_proj", "q_proj", "up_proj", "v_proj"]
    assert a["non_lora_tensors"] == 4 and a["use_dora"] == (kind == "dora")
    assert a["ranks"] == ([2, 4] if kind == "rank_pattern" else [4])
    # nothing of peft is left in the canonical model
    assert not any(type(m).__module__.startswith("peft") for m in loaded.model.modules())


def test_source_records_adapter_and_base(legacy_base, legacy_adapter, ctx):
    loaded = _load(legacy_adapter.folder, legacy_base, ctx)
    src = loaded.source
    a = src.adapter
    assert loaded.name == src.name == "tiny-med-lora"
    assert a["path"] == str(legacy_adapter.folder) and a["base_path"] == str(legacy_base)
    for name in ("adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.bin"):
        assert a["files"][name] == hashlib.sha256((legacy_adapter.folder / name).read_bytes()).hexdigest()
    assert a["base_files"]["model.safetensors"] == hashlib.sha256(
        (legacy_base / "model.safetensors").read_bytes()).hexdigest()
    assert a["base_files"] == src.files
    assert (a["r"], a["lora_alpha"]) == (4, 8)
    json.dumps(src.to_dict())  # goes into manifests
    # the projector comes from non_lora_trainables.bin, not from the base
    w = loaded.model.model.multi_modal_projector.linear_1.weight
    torch.testing.assert_close(w, legacy_adapter.projector[0], rtol=0, atol=0)
    assert any("replaced by adapter" in n and "mm_projector" in n for n in src.notes)


def test_factory_base_and_bin(random_ckpt, ctx, photo, tmp_path):
    """Factory naming: language_model.model.layers.N...; non-lora keys base_model.model.connector.*."""
    base = random_ckpt("tiny", "factory")
    ad = make_adapter(base, tmp_path / "factory-lora", binary=True, seed=4)
    loaded = _load(ad.folder, base, ctx)
    _check_against_reference(ad, loaded, photo, load_model(base, ctx=ctx))
    assert loaded.source.format == "factory" and loaded.num_image_tokens == 15
    assert loaded.source.adapter["non_lora_tensors"] == 4


def test_base_from_adapter_config(legacy_base, ctx, tmp_path, photo, legacy_base_model):
    ad = make_adapter(legacy_base, tmp_path / "a", seed=5, base_name=str(legacy_base))
    loaded = load_model(ad.folder, ctx=ctx, vision_tower=_tower(legacy_base))
    assert loaded.source.adapter["base_from"] == "adapter_config.json base_model_name_or_path"
    _check_against_reference(ad, loaded, photo, legacy_base_model)


def test_dtype_applied_after_merge(legacy_base, legacy_adapter, ctx):
    loaded = _load(legacy_adapter.folder, legacy_base, ctx, dtype="float16")
    merged32 = _load(legacy_adapter.folder, legacy_base, ctx)
    q16 = loaded.model.model.language_model.layers[0].self_attn.q_proj.weight
    q32 = merged32.model.model.language_model.layers[0].self_attn.q_proj.weight
    assert q16.dtype == torch.float16
    torch.testing.assert_close(q16, q32.to(torch.float16), rtol=0, atol=0)  # merged in fp32, rounded once
    assert any("merged in float32, then cast to float16" in n for n in loaded.source.notes)


def test_inspect_adapter_checks_without_merging(legacy_base, legacy_adapter, ctx):
    from medlite.checkpoints.lora import describe_adapter, inspect_adapter

    lm = inspect_adapter(legacy_adapter.folder, ctx=ctx, base=legacy_base, vision_tower=_tower(legacy_base))
    assert next(lm.model.parameters()).device.type == "meta"
    a = lm.source.adapter
    assert a["merged"] is False and a["lora_modules"] == 10 and a["non_lora_tensors"] == 4
    text = "\n".join(describe_adapter(a))
    assert str(legacy_adapter.folder) in text and "r=4" in text and "q_proj" in text and str(legacy_base) in text


def test_cli_inspect_shows_the_merge(legacy_base, legacy_adapter, capsys):
    from medlite.cli import main

    rc = main(["inspect", str(legacy_adapter.folder), "--base", str(legacy_base),
               "--vision-tower", str(_tower(legacy_base)), "--json"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["adapter"]["path"] == str(legacy_adapter.folder)
    assert rep["adapter"]["lora_modules"] == 10 and rep["adapter"]["base_path"] == str(legacy_base)


# -- errors ------------------------------------------------------------------------------------------
def _copy(ad, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(ad.folder, dst)
    return dst


def _expect(match, adapter, base, ctx, **kw):
    with pytest.raises(CheckpointError, match=match):
        _load(adapter, base, ctx, **kw)


def test_error_no_base(legacy_adapter, ctx):
    with pytest.raises(CheckpointError, match=r"needs its base checkpoint — pass --base BASE_DIR .*"
                                              r"base_model_name_or_path='bczhou/tiny-llava-v1-hf'"):
        load_model(legacy_adapter.folder, ctx=ctx)


def test_error_lora_in_features_mismatch(legacy_base, legacy_adapter, ctx, tmp_path):
    d = _copy(legacy_adapter, tmp_path)
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    rewrite_adapter(d, lambda sd: {**sd, key: sd[key][:, :48]})
    _expect(r"q_proj\.lora_A\.weight has shape \(4, 48\): its in-features \(48,\) ≠ the base layer's 64", d,
            legacy_base, ctx)


def test_error_non_lora_shape_mismatch(legacy_base, legacy_adapter, ctx, tmp_path):
    d = _copy(legacy_adapter, tmp_path)
    sd = torch.load(d / "non_lora_trainables.bin", weights_only=True)
    sd["base_model.model.model.mm_projector.2.bias"] = torch.zeros(63)
    torch.save(sd, d / "non_lora_trainables.bin")
    _expect(r"mm_projector\.2\.bias has shape \(63,\) but the base tensor model\.mm_projector\.2\.bias it replaces "
            r"has \(64,\)", d, legacy_base, ctx)


def test_error_module_the_base_lacks(legacy_base, legacy_adapter, ctx, tmp_path):
    d = _copy(legacy_adapter, tmp_path)
    rewrite_adapter(d, lambda sd: {k.replace("layers.1.", "layers.7."): v for k, v in sd.items()})
    _expect(r"targets module\(s\) the base .* lacks: .*model\.layers\.7\.mlp\.down_proj \(canonical "
            r"model\.language_model\.layers\.7\.mlp\.down_proj\)", d, legacy_base, ctx)


def test_error_leftover_tensors(legacy_base, legacy_adapter, ctx, tmp_path):
    d = _copy(legacy_adapter, tmp_path)
    rewrite_adapter(d, lambda sd: {**sd, "base_model.model.model.layers.0.mlp.extra_scale": torch.ones(3)})
    _expect(r"base_model\.model\.model\.layers\.0\.mlp\.extra_scale .* which the base .* has no tensor for", d,
            legacy_base, ctx)
    d2 = _copy(legacy_adapter, tmp_path / "2")
    sd = torch.load(d2 / "non_lora_trainables.bin", weights_only=True)
    sd["base_model.model.model.mm_projector.4.weight"] = torch.zeros(2, 2)
    torch.save(sd, d2 / "non_lora_trainables.bin")
    _expect(r"model\.mm_projector\.4\.weight \(non_lora_trainables\) names .* no tensor for", d2, legacy_base, ctx)


def test_error_half_a_lora_pair(legacy_base, legacy_adapter, ctx, tmp_path):
    d = _copy(legacy_adapter, tmp_path)
    rewrite_adapter(d, lambda sd: {k: v for k, v in sd.items() if k != "base_model.model.model.layers.0.mlp."
                                   "up_proj.lora_A.weight"})
    _expect(r"LoRA on model\.layers\.0\.mlp\.up_proj: missing lora_A\.weight", d, legacy_base, ctx)


@pytest.mark.parametrize("which", ["adapter_model.bin", "non_lora_trainables.bin"])
def test_error_pickle_bin_refused(which, legacy_base, ctx, tmp_path):
    ad = make_adapter(legacy_base, tmp_path / "a", binary=True, seed=6)
    f = ad.folder / which
    sd = torch.load(f, weights_only=True)
    sd["trainer_state"] = NotATensor()
    torch.save(sd, f)
    _expect(rf"{which}: torch\.load\(weights_only=True\) refused this pickle", ad.folder, legacy_base, ctx)


@pytest.mark.parametrize("change,match", [
    ({"peft_type": "LOHA"}, r"peft_type 'LOHA' is not supported — only LORA"),
    ({"layer_replication": [[0, 1]]}, r"cannot merge: layer_replication=\[\[0, 1\]\]"),
    ({"init_lora_weights": "pissa"}, r"init_lora_weights='pissa' modifies the base weights"),
    ({"some_future_option": 3}, r"some_future_option=3 \(unknown to this peft version\)"),
    ({"r": 8}, r"adapter_config\.json gives rank 8 but .*lora_A\.weight has rank 4"),
])
def test_error_adapter_config(change, match, legacy_base, legacy_adapter, ctx, tmp_path):
    d = _copy(legacy_adapter, tmp_path)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
    _expect(match, d, legacy_base, ctx)


def test_error_ambiguous_and_stacked(legacy_base, legacy_adapter, ctx, tmp_path):
    d = _copy(legacy_adapter, tmp_path)
    from safetensors.torch import load_file

    torch.save(load_file(str(d / "adapter_model.safetensors")), d / "adapter_model.bin")
    _expect(r"both adapter_model\.safetensors and adapter_model\.bin exist", d, legacy_base, ctx)
    _expect(r"is itself a LoRA adapter; stacked adapters are not supported", legacy_adapter.folder,
            legacy_adapter.folder, ctx)


def test_error_architecture_mismatch_in_adapter_config_json(legacy_base, legacy_adapter, ctx, tmp_path):
    """LLaVA saves the training model's config.json next to the adapter: it must describe the base."""
    d = _copy(legacy_adapter, tmp_path)
    cfg = json.loads((legacy_base / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "hidden_size": 2048}))
    _expect(r"trained on a different architecture .*hidden_size: adapter 2048 vs base 64", d, legacy_base, ctx)


def test_hf_base_lora_on_vision_and_projector(random_ckpt, ctx, photo, tmp_path):
    """An adapter trained on transformers' own LlavaForConditionalGeneration (HF base), LoRA on the vision
    tower's q/v and the projector too; the reference is that peft-wrapped Llava, unmerged."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    from medlite.checkpoints.generate import pixel_values, prompt_ids

    base = random_ckpt("tiny", "hf")
    ref = LlavaForConditionalGeneration.from_pretrained(base, dtype=torch.float32).eval()
    pm = get_peft_model(ref, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "linear_1"]))
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    pm.save_pretrained(str(tmp_path / "hf-lora"))
    loaded = load_model(tmp_path / "hf-lora", ctx=ctx, base=base)
    got = first_token_logits(loaded, photo, QUESTION)
    with torch.no_grad():
        want = pm(input_ids=torch.tensor([prompt_ids(loaded, QUESTION)]),
                  pixel_values=pixel_values(loaded, [photo])).logits[0, -1].numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    base_logits = first_token_logits(load_model(base, ctx=ctx), photo, QUESTION)
    assert np.abs(base_logits - got).max() > 0.5
    a = loaded.source.adapter
    # 2 text layers × q/v + 2 used vision layers × q/v + linear_1; the third vision layer is never reached
    assert a["lora_modules"] == 9 and loaded.source.format == "hf"
    assert any("LoRA on a module the base conversion drops" in n and "encoder.layers.2" in n
               for n in loaded.source.notes)


@pytest.mark.filterwarnings("ignore:Setting .save_embedding_layers.:UserWarning")
def test_lm_head_lora_and_modules_to_save(legacy_base, legacy_base_model, ctx, photo, tmp_path):
    """LoRA on lm_head (peft then also saves lm_head.base_layer.weight) and modules_to_save (full tensors)."""
    ad = make_adapter(legacy_base, tmp_path / "a", seed=9, targets=("q_proj", "lm_head"),
                      modules_to_save=["model.norm"])
    with torch.no_grad():  # make the saved full tensor differ from the base, as training would
        ad.peft_model.base_model.model.model.norm.modules_to_save["default"].weight.mul_(1.5)
    ad.peft_model.save_pretrained(str(ad.folder))
    loaded = _load(ad.folder, legacy_base, ctx)
    _check_against_reference(ad, loaded, photo, legacy_base_model)
    head = loaded.model.lm_head.weight
    assert torch.count_nonzero(head[loaded.image_token_id]) == 0  # the appended row stays zero
    a = loaded.source.adapter
    assert a["lora_modules"] == 3 and a["adapter_full_tensors"] == 2  # model.norm + lm_head.base_layer
