"""Fixtures of the ``medlite embed`` / ``medlite probe`` tests: a random tiny checkpoint and its ONNX
export (fast), the built-in demo model and its fp32 export (the acceptance tests), real scans shipped
in packages, and an in-process CLI runner."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from medlite.context import RunContext


@pytest.fixture(scope="session")
def ectx(tmp_path_factory):
    return RunContext(cache_dir=tmp_path_factory.mktemp("embed-cache"), quiet=True)


@pytest.fixture(scope="session")
def tiny_ckpt(ectx, tmp_path_factory) -> Path:
    from medlite.checkpoints.random_ckpt import write_random_checkpoint

    return Path(write_random_checkpoint("tiny", tmp_path_factory.mktemp("emb-ckpt") / "tiny", fmt="legacy",
                                        ctx=ectx))


@pytest.fixture(scope="session")
def tiny_export(tiny_ckpt, ectx, tmp_path_factory) -> Path:
    from medlite.checkpoints import load_model
    from medlite.export import export_onnx

    out = tmp_path_factory.mktemp("emb-export")
    export_onnx(load_model(tiny_ckpt, ctx=ectx), out, ctx=ectx, precision="fp32")
    return out


@pytest.fixture(scope="session")
def demo_ckpt() -> Path:
    """The built-in demo model from the user cache (trained there once; never per test session)."""
    from medlite.demo.model import ensure_demo_model

    return Path(ensure_demo_model(RunContext(quiet=True)))


@pytest.fixture(scope="session")
def demo_export(demo_ckpt, tmp_path_factory) -> Path:
    from medlite.checkpoints import load_model
    from medlite.export import export_onnx

    ctx = RunContext(quiet=True)
    out = tmp_path_factory.mktemp("emb-demo-export")
    export_onnx(load_model(demo_ckpt, ctx=ctx), out, ctx=ctx, precision="fp32")
    return out


@pytest.fixture(scope="session")
def real_scans() -> list[Path]:
    """Real clinical images that ship inside installed packages: pydicom, pydicom-data, scikit-image."""
    from pydicom.data import get_testdata_file

    from medlite.imaging.builtin import package_dir

    scans = [Path(get_testdata_file("CT_small.dcm")), Path(get_testdata_file("MR_small.dcm")),
             package_dir("data_store") / "data" / "US1_UNCR.dcm",
             package_dir("skimage") / "data" / "retina.jpg"]
    for s in scans:
        assert s.is_file(), s
    return scans


@pytest.fixture
def cli(capsys):
    """``cli(*argv)`` → ``(exit code, stdout, stderr)``; with ``--json`` also the parsed object."""
    from medlite.cli import main

    def run(*argv):
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        parsed = json.loads(out) if "--json" in argv and code == 0 else None
        return code, out, err, parsed

    return run
