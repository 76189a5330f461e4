"""Fixtures: medlite.checkpoints' random "tiny" preset (legacy format, loaded with load_model) and its
exports, built once per test session."""
from __future__ import annotations

import pytest

from medlite.context import RunContext
from export_tiny_model import checkpoint_model


@pytest.fixture(scope="session")
def ctx(tmp_path_factory):
    return RunContext(cache_dir=tmp_path_factory.mktemp("cache"), quiet=True)


@pytest.fixture(scope="session")
def tiny(ctx, tmp_path_factory):
    return checkpoint_model("tiny", "legacy", tmp_path_factory.mktemp("ckpt"), ctx)


@pytest.fixture(scope="session")
def exported(tiny, ctx, tmp_path_factory):
    """(folder, ExportResult) of the fp32 export at opset 17."""
    from medlite.export import export_onnx

    out = tmp_path_factory.mktemp("onnx_fp32")
    return out, export_onnx(tiny, out, ctx=ctx)


@pytest.fixture(scope="session")
def exported_fp16(tiny, ctx, tmp_path_factory):
    from medlite.export import export_onnx

    out = tmp_path_factory.mktemp("onnx_fp16")
    return out, export_onnx(tiny, out, ctx=ctx, precision="fp16")
