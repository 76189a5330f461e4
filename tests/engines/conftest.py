"""Fixtures for the device-bundle tests: a tiny random Xavier artifact with an engines bundle, built
once per session, and its device bundle."""
import pytest

from medlite import artifacts as af
from medlite.pipeline.contract import BuildState
from medlite.pipeline.stages import engines as eng
from medlite.context import RunContext
from medlite.engines.targets import TARGETS
from medlite.recipes.schema import EnginesOptions

OPTS = EnginesOptions(precision="fp16", max_batch=1, max_prompt_tokens=200, max_new_tokens=32, workspace_mb=512)


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    """A tiny random fp16 export + engines bundle + manifest (an artifact as `medlite build` leaves it)."""
    from medlite.checkpoints import load_model
    from medlite.checkpoints.random_ckpt import write_random_checkpoint
    from medlite.export import export_onnx

    root = tmp_path_factory.mktemp("tiny-xavier")
    ctx = RunContext(cache_dir=root / "cache", quiet=True)
    ckpt = write_random_checkpoint("tiny", root / "ckpt", ctx=ctx)
    loaded = load_model(ckpt, ctx=ctx, vision_tower=ckpt / "vision_tower")
    work = root / "artifact"
    export_onnx(loaded, work, ctx=ctx, precision="fp16")
    state = BuildState(ctx=ctx, recipe=None, target=TARGETS["jetson-xavier-agx-32gb"], work=work, source=None,
                       model=loaded)
    assert eng.run(state, 1, OPTS).ok
    af.write_manifest(work, {"format": af.FORMAT, "version": "1.0.0+abcdef0", "status": "passed", "model": "tiny",
                             "recipe": {"name": "tiny-xavier"}})
    return work


@pytest.fixture(scope="session")
def tiny_bundle(tiny_artifact, tmp_path_factory):
    from medlite.engines.bundle import make_bundle

    out = tmp_path_factory.mktemp("bundle") / "tiny.tar.gz"
    make_bundle(tiny_artifact, out)
    return out
