"""Shared fixtures of the prune / distill tests: a random tiny checkpoint, a calibration set of
Micro Med-VQA train pairs, and a BuildState around a working copy."""
from __future__ import annotations

import pytest

from medlite.context import RunContext


@pytest.fixture(scope="session")
def cctx(tmp_path_factory):
    return RunContext(cache_dir=tmp_path_factory.mktemp("compress-cache"), quiet=True)


@pytest.fixture(scope="session")
def tiny_path(cctx, tmp_path_factory):
    from medlite.checkpoints.random_ckpt import write_random_checkpoint

    return write_random_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny", fmt="legacy", ctx=cctx)


@pytest.fixture(scope="session")
def calib(cctx):
    from medlite.calibration.calibset import build_calibration_set
    from medlite.evaluation.vqa import load_dataset

    return build_calibration_set(load_dataset("builtin:micro-med-vqa", split="train"), 16, ctx=cctx, cache=False)


@pytest.fixture(autouse=True)
def one_thread(request):
    """Small models run fastest on one thread (and on a busy 2-core machine, 40x faster than on two).
    Only for the prune / distill tests: other areas under tests/compress keep their own settings."""
    import torch

    if not any(part in ("prune", "distill") for part in request.node.path.parts) and \
            request.node.path.name != "test_prune_distill_demo.py":
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
