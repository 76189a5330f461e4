"""Context-length limits (issue 26 item 6): requests past the decoder's maximum positions or the engines'
profile bounds are refused before any graph runs, with the limit and where it comes from."""
from __future__ import annotations

import json
import shutil

import pytest

from medlite.errors import DataError, MedliteError
from medlite.runtime import OnnxVlm, RuntimeConfig
from medlite.runtime.limits import ContextLimits, check_request, limits_for


def test_check_request_names_the_limit_and_its_source():
    lim = ContextLimits(max_positions=512, positions_from="model.max_position_embeddings in x/medlite_runtime.json",
                        num_image_tokens=49, max_prompt_tokens=128, max_new_tokens=64, engines_from="x/engines/engines.json")
    check_request(lim, [100, 49 + 128], 64)                       # exactly at every bound: allowed
    with pytest.raises(DataError, match=r"prompt of 450 tokens \(49 of them image tokens\) \+ max_new_tokens 100 "
                                        r"= 550 exceeds the decoder's maximum of 512 positions \(model"
                                        r"\.max_position_embeddings in x/medlite_runtime\.json\)"):
        check_request(ContextLimits(max_positions=512, positions_from=lim.positions_from, num_image_tokens=49),
                      [450], 100)
    with pytest.raises(DataError, match=r"prompt of 129 text tokens .* max_prompt_tokens 128 \(x/engines/engines"):
        check_request(lim, [49 + 129], 1)
    with pytest.raises(DataError, match=r"max_new_tokens 65 exceeds the engines' max_new_tokens 64"):
        check_request(lim, [60], 65)
    check_request(ContextLimits(), [10 ** 6], 10 ** 6)            # nothing recorded: nothing to refuse


def test_export_records_the_maximum_positions(rt_export, rt_model):
    cfg = RuntimeConfig.load(rt_export)
    assert cfg.model["max_position_embeddings"] == rt_model.model.config.text_config.max_position_embeddings == 512
    lim = limits_for(rt_export, cfg)
    assert lim.max_positions == 512 and lim.max_prompt_tokens is None     # no engines bundle here


@pytest.fixture(scope="module")
def guarded(rt_export, rt_ctx):
    """The export opened with a vision graph that must never run (every refusal comes before it)."""
    vlm = OnnxVlm.open(rt_export, ctx=rt_ctx)

    def never(_images):
        raise AssertionError("a graph ran before the request was checked")

    vlm._vision = never
    return vlm


def test_generation_past_the_maximum_positions_is_refused_up_front(guarded, rt_export):
    from PIL import Image

    img = Image.new("RGB", (32, 32))
    n = len(guarded.prompt_ids("is this normal ?"))
    with pytest.raises(MedliteError, match=rf"prompt of {n} tokens .* \+ max_new_tokens 100000 = {n + 100000} exceeds "
                                           r"the decoder's maximum of 512 positions .*medlite_runtime\.json"):
        guarded.answer(img, "is this normal ?", max_new_tokens=100000)
    with pytest.raises(MedliteError, match="maximum of 512 positions"):
        guarded.answer_batch([img, img], ["is this normal ?", "lung " * 600])
    with pytest.raises(MedliteError, match="maximum of 512 positions"):
        guarded.first_token_logits(img, "lung " * 600)
    with pytest.raises(MedliteError, match="maximum of 512 positions"):
        guarded.evaluate_rows([img], [0], ["is this normal ?"], max_new_tokens=512)


def test_engines_profile_bounds_are_refused(rt_export, rt_ctx, guarded, tmp_path):
    from PIL import Image

    text = len(guarded.prompt_ids("is this normal ?")) - guarded.config.num_image_tokens
    from medlite.pipeline.contract import BuildState
    from medlite.pipeline.stages import engines
    from medlite.engines.targets import TARGETS
    from medlite.recipes.options import EnginesOptions

    folder = tmp_path / "art"
    shutil.copytree(rt_export, folder)
    # the engines stage records its recipe options as the profiles' bounds in engines/engines.json
    state = BuildState(ctx=rt_ctx, recipe=None, target=TARGETS["jetson-xavier-nx-8gb"], work=folder, source=None,
                       model=None)
    engines.run(state, 3, EnginesOptions(precision="fp16", max_prompt_tokens=text, max_new_tokens=4))
    assert json.loads((folder / "engines" / "engines.json").read_text())["limits"]["max_new_tokens"] == 4
    vlm = OnnxVlm.open(folder, ctx=rt_ctx)
    img = Image.new("RGB", (32, 32))
    assert vlm.answer(img, "is this normal ?", max_new_tokens=4) is not None     # inside the bounds: runs
    with pytest.raises(MedliteError, match=r"max_new_tokens 5 exceeds the engines' max_new_tokens 4 \(.*engines\.json"):
        vlm.answer(img, "is this normal ?", max_new_tokens=5)
    longer = len(vlm.prompt_ids("is this normal ? ?")) - vlm.config.num_image_tokens
    with pytest.raises(MedliteError, match=rf"prompt of {longer} text tokens .* exceeds the engines' max_prompt_tokens {text}"):
        vlm.answer(img, "is this normal ? ?", max_new_tokens=1)
    assert longer > text


def test_pytorch_reference_refuses_the_same_way(rt_model):
    from PIL import Image

    from medlite.checkpoints import generate

    img = Image.new("RGB", (32, 32))
    with pytest.raises(MedliteError, match=r"exceeds the decoder's maximum of 512 positions "
                                           r"\(text_config\.max_position_embeddings of "):
        generate.answer(rt_model, img, "is this normal ?", max_new_tokens=100000)
    with pytest.raises(MedliteError, match="maximum of 512 positions"):
        generate.answer_batch(rt_model, [img], ["lung " * 600], max_new_tokens=1)
    with pytest.raises(MedliteError, match="maximum of 512 positions"):
        generate.evaluate_rows(rt_model, [img], [0], ["is this normal ?"], max_new_tokens=600)
    with pytest.raises(MedliteError, match="maximum of 512 positions"):
        generate.first_token_logits(rt_model, img, "lung " * 600)


def test_ask_cli_refuses_with_one_line(rt_export, tmp_path, capsys):
    from PIL import Image

    from medlite.cli import main

    png = tmp_path / "img.png"
    Image.new("RGB", (32, 32)).save(png)
    assert main(["ask", str(rt_export), "--image", str(png), "is this normal ?", "--max-new-tokens", "100000"]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "exceeds the decoder's maximum of 512 positions" in lines[0]
    assert "Traceback" not in err
