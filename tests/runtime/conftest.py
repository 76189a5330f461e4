"""Fixtures: medlite.checkpoints' random "tiny" preset exported once (fp32 and fp16) for the runtime tests."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))

from export_tiny_model import checkpoint_model  # noqa: E402
from medlite.context import RunContext  # noqa: E402


@pytest.fixture(scope="session")
def rt_ctx(tmp_path_factory):
    return RunContext(cache_dir=tmp_path_factory.mktemp("rt_cache"), quiet=True)


@pytest.fixture(scope="session")
def rt_model(rt_ctx, tmp_path_factory):
    return checkpoint_model("tiny", "legacy", tmp_path_factory.mktemp("rt_ckpt"), rt_ctx)


@pytest.fixture(scope="session")
def rt_export(rt_model, rt_ctx, tmp_path_factory):
    from medlite.export import export_onnx

    out = tmp_path_factory.mktemp("rt_fp32")
    export_onnx(rt_model, out, ctx=rt_ctx)
    return out


@pytest.fixture(scope="session")
def rt_export_fp16(rt_model, rt_ctx, tmp_path_factory):
    from medlite.export import export_onnx

    out = tmp_path_factory.mktemp("rt_fp16")
    export_onnx(rt_model, out, ctx=rt_ctx, precision="fp16")
    return out
