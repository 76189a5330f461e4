"""The tokens stage: pooling geometry, recipe rules, the pooled model and its exported vision graph
against an independent numpy reference of the pooling on the vision tower's output."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medlite.image_tokens import achievable_counts, geometry, pool_matrix, pool_tokens


def reference_pool(feats: np.ndarray, out: int, *, weights: np.ndarray | None = None) -> np.ndarray:
    """``[N, C]`` tokens of a square grid → ``[out², C]``: explicit windows over a grid padded at the bottom/right
    with NaN (padded cells excluded), written without :mod:`medlite.image_tokens`."""
    n, c = feats.shape
    side = int(np.ceil(n ** 0.5))
    miss = side * side - n                       # a grid missing its first token(s): NaN there too
    k = -(-side // out)
    full = np.concatenate([np.full((miss, c), np.nan), feats]).reshape(side, side, c)
    wfull = np.concatenate([np.full(miss, np.nan), np.ones(n) if weights is None else weights]).reshape(side, side)
    grid = np.full((out * k, out * k, c), np.nan)
    grid[:side, :side] = full
    w = np.full((out * k, out * k), np.nan)
    w[:side, :side] = wfull
    res = np.zeros((out, out, c))
    for i in range(out):
        for j in range(out):
            win, ww = grid[i * k:(i + 1) * k, j * k:(j + 1) * k].reshape(-1, c), w[i * k:(i + 1) * k, j * k:(j + 1) * k]
            real = ~np.isnan(ww.reshape(-1))
            res[i, j] = (win[real] * ww.reshape(-1)[real, None]).sum(0) / ww.reshape(-1)[real].sum()
    return res.reshape(out * out, c)


def test_geometry_of_the_full_size_and_demo_grids():
    assert achievable_counts(27) == [729, 196, 81, 49, 36, 25, 16, 9, 4, 1]
    assert achievable_counts(7) == [49, 16, 9, 4, 1]
    g = geometry(729, 196)
    assert (g.side, g.out, g.kernel, g.pad) == (27, 14, 2, 1)
    assert (geometry(729, 81).kernel, geometry(729, 81).pad) == (3, 0)
    assert (geometry(49, 16).kernel, geometry(49, 16).pad) == (2, 1)
    with pytest.raises(ValueError, match="choose one of 729, 196, 81, 49, 36, 25, 16, 9, 4, 1"):
        geometry(729, 100)
    with pytest.raises(ValueError, match="not a square grid"):
        geometry(50, 16)
    # TinyLLaVA Factory's "default" feature selection drops the first of 729 tokens: pooled as the full grid
    g = geometry(728, 196)
    assert (g.side, g.missing, g.tokens_in) == (27, 1, 728)
    with pytest.raises(ValueError, match="choose one of 196, 81"):
        geometry(728, 728)


@pytest.mark.parametrize("n_in,n_out", [(729, 196), (729, 81), (728, 196), (728, 81), (49, 16), (49, 9), (16, 4)])
def test_pool_matrix_equals_the_reference_windows(n_in, n_out):
    x = np.random.default_rng(n_in + n_out).standard_normal((n_in, 5))
    assert np.allclose(pool_tokens(x, n_out), reference_pool(x, int(round(n_out ** 0.5))), atol=1e-12)
    m = pool_matrix(geometry(n_in, n_out))
    assert np.allclose(m.sum(axis=1), 1.0) and (m > 0).sum() == n_in      # every token in exactly one window


def _recipe(tmp_path: Path, stages: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text("name: t\nversion: 1.0.0\ntarget: jetson-xavier-nx-8gb\ncalibration: {samples: 16}\n"
                 "evaluation: {dataset: 'builtin:micro-med-vqa', split: test}\nstages:\n" + stages +
                 "  - export: {precision: fp16}\n")
    return p


def test_recipe_rules(tmp_path):
    from medlite.errors import RecipeError
    from medlite.recipes.loader import load_recipe

    with pytest.raises(RecipeError) as e:
        load_recipe(_recipe(tmp_path, "  - tokens: {count: 15}\n  - distill: {steps: 5}\n"))
    assert any("stages[0].tokens.count" in x and "15 is not a square" in x for x in e.value.errors)
    with pytest.raises(RecipeError) as e:
        load_recipe(_recipe(tmp_path, "  - tokens: {count: 16}\n  - distill: {steps: 5, hidden_mse: all, "
                                      "hidden_weight: 1.0}\n"))
    assert any("stages[1].distill.hidden_mse" in x and "image-token count" in x for x in e.value.errors)
    with pytest.raises(RecipeError) as e:                        # ordering: tokens after distill
        load_recipe(_recipe(tmp_path, "  - distill: {steps: 5}\n  - tokens: {count: 16}\n"))
    assert any("tokens" in x and "must come" in x for x in e.value.errors)
    r = load_recipe(_recipe(tmp_path, "  - tokens: {count: 16}\n"))
    assert any("without a later distill" in w for w in r.warnings)


def test_plan_refuses_a_count_the_grid_cannot_make_in_one_line(tmp_path, capsys):
    """Before any weight loads: the demo model's 7×7 grid cannot give 25 tokens; the plan says which it can."""
    from medlite.cli import main

    rc = main(["plan", str(_recipe(tmp_path, "  - tokens: {count: 25}\n  - distill: {steps: 5}\n"))])
    err = capsys.readouterr().err
    assert rc == 2 and "stages[0].tokens.count" in err and "choose one of 49, 16, 9, 4, 1" in err
    assert "Traceback" not in err
    rc = main(["plan", "--json", str(_recipe(tmp_path, "  - tokens: {count: 9}\n  - distill: {steps: 5}\n"))])
    out = capsys.readouterr().out
    assert rc == 0 and "7×7 = 49 → 3×3 = 9 tokens" in out


@pytest.fixture(scope="module")
def demo():
    from medlite.checkpoints import load_model
    from medlite.context import RunContext
    from medlite.demo.model import ensure_demo_model

    ctx = RunContext(quiet=True)
    return lambda: load_model(ensure_demo_model(ctx), ctx=ctx)


@pytest.mark.parametrize("method", ["avg", "salient"])
def test_pooled_vision_graph_equals_numpy_pooling_of_the_tower_output(demo, method, tmp_path):
    """ONNX vision graph of the pooled model == projector(reference pooling(tower output)) of the same weights."""
    import onnxruntime as ort
    import torch

    from medlite.checkpoints.token_pool import install
    from medlite.export.graphs import vision_onnx_from_model
    from medlite.export.modules import VisionGraph

    loaded = demo()
    model = loaded.model.eval()
    size = loaded.image_spec.size
    pixels = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (2, 3, size, size)).astype(np.float32))
    with torch.no_grad():
        out = model.model.vision_tower(pixels, output_hidden_states=True, return_dict=True)
        feats = out.hidden_states[model.config.vision_feature_layer].double().numpy()     # [2, 49, C]
    weights = [np.linalg.norm(f, axis=-1) if method == "salient" else None for f in feats]
    pooled = np.stack([reference_pool(f, 4, weights=w) for f, w in zip(feats, weights)])
    with torch.no_grad():
        want = model.model.multi_modal_projector(torch.from_numpy(pooled).float()).numpy()
    install(model, 49, 16, method)
    with torch.no_grad():
        torch_out = VisionGraph(model, torch.float32)(pixels).numpy()
    proto = vision_onnx_from_model(model, image_size=size, opset=17, metadata={}, tmp_root=tmp_path)
    (tmp_path / "v.onnx").write_bytes(proto.SerializeToString())
    got = ort.InferenceSession(str(tmp_path / "v.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"pixel_values": pixels.numpy()})[0]
    assert got.shape == (2, 16, want.shape[-1]) and torch_out.shape == got.shape
    assert np.allclose(torch_out, want, atol=1e-5, rtol=1e-4)
    assert np.allclose(got, want, atol=1e-4, rtol=1e-3)


def test_pooling_survives_the_stage_cache_and_generation_uses_the_count(demo):
    from medlite.checkpoints.generate import answer_batch
    from medlite.checkpoints.token_pool import current_pool, install
    from medlite.evaluation.vqa import load_dataset
    from medlite.pipeline.stage_cache import _model_from, _model_state

    loaded = demo()
    install(loaded.model, 49, 16, "avg")
    loaded.num_image_tokens = 16
    assert loaded.model.state_dict().keys() == demo().model.state_dict().keys()   # no new weights
    again = _model_from(_model_state(loaded))
    assert current_pool(again.model).spec() == {"tokens_in": 49, "tokens_out": 16, "method": "avg"}
    assert again.num_image_tokens == 16 and again.model.config.image_seq_length == 16
    s = load_dataset("builtin:micro-med-vqa", split="train")[:6]
    imgs, qs = [x.load_image() for x in s], [x.question for x in s]
    assert answer_batch(again, imgs, qs, max_new_tokens=6) == answer_batch(loaded, imgs, qs, max_new_tokens=6)
    with pytest.raises(ValueError, match="already pools"):
        install(again.model, 16, 4)


def test_the_shipped_tokens_sweep_has_an_image_token_axis():
    """Sweeps compose with the stage: the shipped sweep expands count × method into valid variant recipes."""
    from medlite.sweep.spec import load_sweep

    sweep = load_sweep("recipes/sweeps/demo-tokens.yaml")
    got = {(v.resolved.recipe.stage("tokens").count, v.resolved.recipe.stage("tokens").method)
           for v in sweep.variants if not v.errors}
    assert got == {(c, m) for c in (16, 9, 4) for m in ("avg", "salient")}
