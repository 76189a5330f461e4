"""Fixtures of the INT8 tests (imported by the test modules; not a conftest, whose module name would clash with tests/compress/conftest.py): the tiny random checkpoint (tests/compress/conftest.py), its fp32 vision
and decoder graphs as the export traces them, and calibration feeds from the framework's forward loop."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny8(tiny_path, cctx):
    from medlite.checkpoints import load_model

    return load_model(tiny_path, ctx=cctx)


@pytest.fixture(scope="session")
def fp32_graphs(tiny8, tmp_path_factory):
    """{graph: path} of the fp32 vision / decoder graphs written for ONNX Runtime."""
    from medlite.compress.int8.qdq_onnx import save_for_ort
    from medlite.export.graphs import decoder_onnx_from_model, vision_onnx_from_model

    root = tmp_path_factory.mktemp("int8-fp32")
    m = tiny8.model
    v = vision_onnx_from_model(m, image_size=int(m.config.vision_config.image_size), opset=17, metadata={},
                               tmp_root=root / "t")
    d = decoder_onnx_from_model(m, opset=17, metadata={}, tmp_root=root / "t")
    return {"vision": save_for_ort(v, root / "vision" / "fp32.onnx"),
            "decoder": save_for_ort(d, root / "decoder" / "fp32.onnx")}


def feeds(loaded, samples, graph, *, batch_size=8, text_only=False):
    from medlite.calibration.forward import ForwardLoop
    from medlite.compress.int8.calib_feeds import decoder_feeds, vision_feeds
    from medlite.export.graphs import text_dims

    loop = ForwardLoop(loaded, samples, batch_size=batch_size)
    if graph == "vision":
        return list(vision_feeds(loop, batch_size=batch_size))
    return list(decoder_feeds(loop, loaded.model, text_dims(loaded.model), batch_size=batch_size,
                              text_only=text_only))


def int8_state(ctx, loaded, calib):
    """A BuildState whose working model is ``loaded`` (no recipe: the stage's default gates)."""
    from types import SimpleNamespace

    from medlite.pipeline.contract import BuildState

    return BuildState(ctx=ctx, recipe=None, target=None, work=None, source=SimpleNamespace(model=lambda: None),
                      model=loaded, calibration=calib)


def quantize_recipe(**quantize) -> str:
    """A minimal recipe text whose quantize stage has ``quantize`` (YAML values as written)."""
    lines = "".join(f"      {k}: {v}\n" for k, v in quantize.items())
    return ("name: int8-test\nversion: 1.0.0\ntarget: jetson-xavier-agx-32gb\ncalibration:\n"
            "  dataset: builtin:micro-med-vqa\n  samples: 16\nstages:\n  - quantize:\n" + lines
            + "  - export:\n      precision: fp16\n")
