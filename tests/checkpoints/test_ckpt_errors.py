"""Every way a checkpoint can be wrong gives a clear CheckpointError naming what is at fault."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from medlite.checkpoints import load_model
from medlite.errors import CheckpointError


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(folder, fn):
    f = folder / "model.safetensors"
    sd = load_file(str(f))
    fn(sd)
    save_file(sd, str(f), metadata={"format": "pt"})


def test_leftover_tensor_is_listed(random_ckpt, ctx, tmp_path):
    d = _copy(random_ckpt("tiny", "legacy"), tmp_path / "c")
    _edit_tensors(d, lambda sd: sd.update({"model.extra_adapter.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"not used by the conversion.*model\.extra_adapter\.weight"):
        load_model(d, ctx=ctx)


def test_missing_tensor_is_listed(random_ckpt, ctx, tmp_path):
    d = _copy(random_ckpt("tiny", "factory"), tmp_path / "c")
    _edit_tensors(d, lambda sd: sd.pop("language_model.model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing.*language_model\.model\.layers\.1\.mlp\.down_proj\.weight"):
        load_model(d, ctx=ctx)


class Payload:  # an arbitrary class: weights_only unpickling must refuse it
    def __init__(self):
        self.x = 1


def test_pickle_bin_with_objects_is_refused(random_ckpt, ctx, tmp_path):
    d = _copy(random_ckpt("tiny", "legacy"), tmp_path / "c")
    sd = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    torch.save({**sd, "evil": Payload()}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*weights_only=True\) refused"):
        load_model(d, ctx=ctx)


def test_plain_tensor_bin_loads(random_ckpt, ctx, tmp_path, photo):
    from medlite.checkpoints.generate import first_token_logits

    src = random_ckpt("tiny", "legacy")
    d = _copy(src, tmp_path / "c")
    sd = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    torch.save(sd, d / "pytorch_model.bin")
    a = first_token_logits(load_model(d, ctx=ctx), photo, "What organ?")
    b = first_token_logits(load_model(src, ctx=ctx), photo, "What organ?")
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("content,msg", [
    (b"\xff\xff\xff\x00\x00\x00\x00\x00{}", "truncated"),
    ((19).to_bytes(8, "little") + b"{not json at all!!}", "invalid JSON"),
    (b"abc", "no header length"),
])
def test_corrupt_safetensors_names_the_file(random_ckpt, ctx, tmp_path, content, msg):
    d = _copy(random_ckpt("tiny", "legacy"), tmp_path / "c")
    (d / "model.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors.*{msg}"):
        load_model(d, ctx=ctx)


def test_truncated_data_section(random_ckpt, ctx, tmp_path):
    d = _copy(random_ckpt("tiny", "legacy"), tmp_path / "c")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*outside the file"):
        load_model(d, ctx=ctx)


def _legacy_without_vision(random_ckpt, ctx, tmp_path, hub_id):
    from medlite.checkpoints import write_checkpoint

    base = load_model(random_ckpt("tiny", "legacy"), ctx=ctx)
    out = tmp_path / "novision"
    write_checkpoint(base.model, base.tokenizer, out, fmt="legacy", image_spec=base.image_spec,
                     template_name="vicuna_v1", include_vision=False, vision_tower_repo=hub_id)
    return out, base


def test_missing_vision_tower_names_hub_id_and_option(random_ckpt, ctx, tmp_path):
    out, _ = _legacy_without_vision(random_ckpt, ctx, tmp_path, "google/siglip-so400m-patch14-384")
    with pytest.raises(CheckpointError, match=r"google/siglip-so400m-patch14-384.*--vision-tower PATH"):
        load_model(out, ctx=ctx)


def test_tower_weights_from_vision_tower_option(random_ckpt, ctx, tmp_path, photo):
    from medlite.checkpoints.generate import first_token_logits

    out, base = _legacy_without_vision(random_ckpt, ctx, tmp_path, "medlite-random/siglip-tiny-patch7-28")
    tower = random_ckpt("tiny", "legacy") / "vision_tower"
    loaded = load_model(out, ctx=ctx, vision_tower=tower)
    assert loaded.source.vision_weights == "tower"
    assert loaded.source.vision_tower["path"] == str(tower)
    np.testing.assert_allclose(first_token_logits(loaded, photo, "Any fracture?"),
                               first_token_logits(base, photo, "Any fracture?"), atol=1e-6)


def test_head_count_not_guessed(random_ckpt, ctx, tmp_path):
    """Shapes reveal everything but the head count: an unknown tower without a copy is refused."""
    d = _copy(random_ckpt("tiny", "legacy"), tmp_path / "c")
    shutil.rmtree(d / "vision_tower")
    with pytest.raises(CheckpointError, match=r"head count.*--vision-tower PATH.*medlite-random/siglip-tiny"):
        load_model(d, ctx=ctx)


def test_known_hub_table_is_checked_against_shapes(random_ckpt, ctx, tmp_path):
    d = _copy(random_ckpt("tiny", "legacy"), tmp_path / "c")
    shutil.rmtree(d / "vision_tower")
    cfg = json.loads((d / "config.json").read_text())
    cfg["mm_vision_tower"] = "google/siglip-so400m-patch14-384"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"hidden_size is 1152 in the tower config but .* say 32"):
        load_model(d, ctx=ctx)


def test_differing_vision_weights_require_a_choice(random_ckpt, ctx, tmp_path, photo):
    from ckpt_reference import SourceReference
    from medlite.checkpoints.generate import first_token_logits

    d = _copy(random_ckpt("tiny", "legacy"), tmp_path / "c")
    tw = d / "vision_tower" / "model.safetensors"
    sd = load_file(str(tw))
    sd["vision_model.encoder.layers.0.mlp.fc1.weight"] = sd["vision_model.encoder.layers.0.mlp.fc1.weight"] * 1.5
    save_file(sd, str(tw), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"differ.*encoder\.layers\.0\.mlp\.fc1\.weight.*--vision-weights"):
        load_model(d, ctx=ctx)
    q = "Is this normal?"
    results = {}
    for choice in ("checkpoint", "tower"):
        loaded = load_model(d, ctx=ctx, vision_weights=choice)
        assert loaded.source.vision_weights == choice
        ref = SourceReference(d, tower=d / "vision_tower", vision_from=choice)
        want = ref.first_token_logits(photo, loaded.template.render(q), bos=loaded.bos_token_id)
        got = first_token_logits(loaded, photo, q)
        np.testing.assert_allclose(got[: want.shape[0]], want, atol=1e-5, rtol=0)
        results[choice] = got
    assert np.abs(results["checkpoint"] - results["tower"]).max() > 1e-3


def test_unknown_config_and_missing_folder(tmp_path, ctx):
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        load_model(tmp_path / "nope", ctx=ctx)
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match=r"config\.json: not a TinyLLaVA / Llava checkpoint \(model_type='bert'"):
        load_model(tmp_path / "bert", ctx=ctx)


def test_missing_shard_named(random_ckpt, ctx, tmp_path):
    from medlite.checkpoints import write_checkpoint

    base = load_model(random_ckpt("tiny", "factory"), ctx=ctx)
    out = tmp_path / "sh"
    write_checkpoint(base.model, base.tokenizer, out, fmt="factory", image_spec=base.image_spec,
                     template_name="llama", max_shard_bytes=100_000)
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=rf"shard file\(s\) missing: {victim.name}"):
        load_model(out, ctx=ctx)


def test_half_precision_copy_of_the_tower_is_not_a_difference(random_ckpt, ctx, tmp_path):
    """A checkpoint holding the fp16 rounding of an fp32 tower repo needs no --vision-weights choice."""
    d = _copy(random_ckpt("tiny", "legacy"), tmp_path / "c")
    tw = d / "vision_tower" / "model.safetensors"
    sd = {k: v.float() for k, v in load_file(str(tw)).items()}
    # the tower copy is now fp32 and the checkpoint fp16: same values, different precision
    save_file(sd, str(tw), metadata={"format": "pt"})
    loaded = load_model(d, ctx=ctx)
    assert loaded.source.vision_weights is None
    assert any("identical" in n for n in loaded.source.notes)
    sd["vision_model.encoder.layers.0.mlp.fc1.weight"] *= 1.01
    save_file(sd, str(tw), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="--vision-weights"):
        load_model(d, ctx=ctx)
