"""``--device`` on the CPU path (issue 29): ``--device cpu`` and ``auto`` (no CUDA here) build the same
artifact as a build without the flag — same version, same files byte for byte; ``--device cuda`` without
CUDA and a misspelt device are one line, exit 2; the recipe's ``device`` field stays out of recipe.yaml
and the version when unset, and out of the version when it resolves to the CPU."""
from __future__ import annotations

import json

import pytest
import torch

from medlite.cli import main

# cpu-int4 runs every device-aware CPU path at once: calibration forward loop, the reference outputs,
# GPTQ's layer-by-layer loop (llm-compressor) and the check stage's PyTorch side; fewer samples keep it short.
RECIPE = "cpu-int4"
SMALL = ["calibration.samples=16", "check.max_samples=16", "check.max_closed_acc_drop=null",
         "check.min_agreement=null"]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from medlite.checkpoints.random_ckpt import write_random_checkpoint
    from medlite.context import RunContext

    root = tmp_path_factory.mktemp("ckpt")
    write_random_checkpoint("tiny", root / "tiny", fmt="legacy", ctx=RunContext(cache_dir=root / "cache", quiet=True))
    return root / "tiny"


@pytest.fixture(autouse=True)
def _no_cuda(monkeypatch):
    # what this file asserts is the machine without CUDA (also when it runs on one with a GPU)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _build(tmp_path, capsys, ckpt, out: str, *extra: str) -> dict:
    rc = main(["--quiet", "build", RECIPE, *SMALL, "--cache-dir", str(tmp_path / "cache"), "--model", str(ckpt),
               "--vision-tower", str(ckpt / "vision_tower"), "--out", str(tmp_path / out), "--json", *extra])
    res = json.loads(capsys.readouterr().out)
    assert rc in (0, 1), res           # a random tiny model may fail a gate; the artifact is written either way
    return res


@pytest.mark.slow    # three tiny INT4 builds: ~110 s on 2 cores
def test_cpu_and_auto_build_byte_identical_artifacts(tmp_path, capsys, tiny_ckpt):
    plain = _build(tmp_path, capsys, tiny_ckpt, "plain")
    cpu = _build(tmp_path, capsys, tiny_ckpt, "cpu", "--device", "cpu")
    auto = _build(tmp_path, capsys, tiny_ckpt, "auto", "--device", "auto")
    manifests = [json.loads((tmp_path / r["artifact"] / "manifest.json").read_text()) for r in (plain, cpu, auto)]
    assert plain["version"] == cpu["version"] == auto["version"]
    files = [m["files"] for m in manifests]
    assert files[0] == files[1] == files[2]
    assert any(n.endswith(".onnx") for n in files[0]), files[0]
    assert all(m["device"] == {"type": "cpu"} for m in manifests)
    model_line = [s for s in plain["stages"] if s["name"] == "model"][0]["detail"]
    assert model_line.endswith("· on cpu"), model_line
    assert "built on: cpu" in (tmp_path / plain["artifact"] / "report.md").read_text()
    # the resolved recipe written into the artifact has no device key (as before the option existed)
    assert "device" not in (tmp_path / plain["artifact"] / "recipe.yaml").read_text()


@pytest.mark.parametrize("argv", [
    ["build", "xavier-agx-fp16", "--device", "cuda"],
    ["build", "xavier-agx-fp16", "--device", "cuda:1"],
    ["eval", "--device", "cuda", "--limit", "1"],
    ["export", "--device", "cuda", "--out", "OUT"],
    ["ask", "--device", "cuda", "--image", "SCAN", "is there a lesion?"],
    ["build", "xavier-agx-fp16", "device=cuda"],
])
def test_cuda_without_cuda_is_one_line_exit_2(tmp_path, capsys, tiny_ckpt, argv):
    from pydicom.data import get_testdata_file

    argv = [a.replace("OUT", str(tmp_path / "exp")).replace("SCAN", get_testdata_file("CT_small.dcm")) for a in argv]
    rc = main([*argv, "--model", str(tiny_ckpt), "--vision-tower", str(tiny_ckpt / "vision_tower"),
               "--cache-dir", str(tmp_path / "cache")] + (["--out", str(tmp_path / "art")] if argv[0] == "build" else []))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: ") and "no CUDA device" in err[0], err
    assert "--device cpu" in err[0]
    assert not (tmp_path / "art").exists() or not any((tmp_path / "art").rglob("manifest.json"))


def test_misspelt_device_is_one_line(tmp_path, capsys, tiny_ckpt):
    rc = main(["build", "xavier-agx-fp16", "--device", "gpu", "--model", str(tiny_ckpt),
               "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "art")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "'gpu' is not a device" in err[0] and "auto, cpu, cuda or cuda:N" in err[0]


def test_recipe_device_field(tmp_path, capsys):
    from medlite.recipes import load_recipe

    plain = load_recipe("xavier-agx-fp16").recipe
    cpu = load_recipe("xavier-agx-fp16", ["device=cpu"]).recipe
    assert "device" not in plain.to_dict() and cpu.to_dict()["device"] == "cpu"
    assert plain.hashed_dict() == cpu.hashed_dict()          # the spelling never enters the version
    bad = tmp_path / "r.yaml"
    bad.write_text("name: r\nversion: 1.0.0\ntarget: jetson-xavier-agx-32gb\ndevice: gpu0\nstages:\n  - export\n")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "device" in err and "'gpu0' is not a device" in err


def test_version_hashes_a_gpu_device_only():
    from types import SimpleNamespace

    from medlite.pipeline.pipeline import _version
    from medlite.recipes import load_recipe

    recipe = load_recipe("xavier-agx-fp16").recipe
    source = SimpleNamespace(identity={"files": {"a": "0" * 64}})
    base = _version(recipe, source, None)
    assert _version(recipe, source, None, torch.device("cpu")) == base
    assert _version(recipe, source, None, torch.device("cuda:0")) != base
