"""GPU vs CPU, stage by stage, on the demo model (issue 29). Skipped without CUDA ("needs CUDA").

Tolerances (fp32 on both sides; CUDA matmuls reduce in another order, TF32 stays off as torch's default):

* calibration forward loop: language-model inputs and logits within 1e-3 (absolute, fp32 logits of
  magnitude ~10) — the ranges every calibration stage observes;
* SmoothQuant: the migration factors' range (manifest ``scale_range``) within 1e-3 relative;
* prune importance: MLP-channel / KV-group scores within 1e-4 relative and the same channels kept;
* GPTQ (llm-compressor, one decoder layer at a time on the GPU): ≥ 99 % of the packed 4-bit integers
  identical (a Hessian accumulated in another order can flip a rounding), the same gates passed;
* distillation: the loss over the first 20 steps within 1e-3 relative per step (2 % at step 20);
* final artifacts (INT8 and INT4 builds): the same gates pass on both devices.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CUDA = torch.device("cuda:0") if torch.cuda.is_available() else None


@pytest.fixture(scope="module")
def gctx(tmp_path_factory):
    from medlite.context import RunContext, default_cache_dir

    # the demo model comes from the user cache (trained there once); everything else is per test run
    return RunContext(cache_dir=default_cache_dir(), quiet=True)


@pytest.fixture(scope="module")
def demo(gctx):
    from medlite.model_choice import ModelChoice

    return ModelChoice().load(gctx)


@pytest.fixture(scope="module")
def calib(gctx):
    from medlite.calibration.calibset import build_calibration_set
    from medlite.evaluation.vqa import load_dataset

    return build_calibration_set(load_dataset("builtin:micro-med-vqa", split="train"), 32, ctx=gctx, cache=False)


def _on_gpu(loaded):
    g = copy.deepcopy(loaded)
    g.model.to(CUDA)
    return g


def test_forward_loop_matches(demo, calib):
    from medlite.calibration.forward import ForwardLoop

    gpu = _on_gpu(demo)
    cpu_out, gpu_out = [], []
    ForwardLoop(demo, calib.samples, batch_size=8).run(on_batch=lambda i, lg: cpu_out.append((i.inputs_embeds, lg)))
    ForwardLoop(gpu, calib.samples, batch_size=8).run(on_batch=lambda i, lg: gpu_out.append((i.inputs_embeds, lg)))
    assert len(cpu_out) == len(gpu_out)
    for (e_c, l_c), (e_g, l_g) in zip(cpu_out, gpu_out):
        assert e_g.device.type == "cuda"
        assert torch.allclose(e_c, e_g.cpu(), atol=1e-4, rtol=1e-4)
        assert (l_c - l_g.cpu()).abs().max().item() <= 1e-3


def test_references_match(demo):
    from medlite.checkpoints.generate import evaluate_rows
    from medlite.evaluation.vqa import load_dataset

    samples = load_dataset("builtin:micro-med-vqa", split="test")[:16]
    images = [s.load_image() for s in samples]
    args = (images, list(range(len(samples))), [s.question for s in samples])
    a_c, l_c, e_c = evaluate_rows(demo, *args, max_new_tokens=8)
    a_g, l_g, e_g = evaluate_rows(_on_gpu(demo), *args, max_new_tokens=8)
    assert sum(x == y for x, y in zip(a_c, a_g)) >= 0.99 * len(a_c)
    assert np.abs(l_c - l_g).max() <= 1e-3 and np.abs(e_c - e_g).max() <= 1e-4


def test_prune_importance_matches(demo, calib):
    from medlite.calibration.forward import ForwardLoop
    from medlite.compress.prune import importance as imp

    cpu = imp.activation_importance(ForwardLoop(demo, calib.samples), demo.model)
    gpu_model = _on_gpu(demo)
    g = imp.activation_importance(ForwardLoop(gpu_model, calib.samples), gpu_model.model)
    assert cpu.tokens == g.tokens
    for a, b in zip(cpu.mlp + cpu.groups, g.mlp + g.groups):
        b = b.cpu()
        assert torch.allclose(a, b, rtol=1e-4, atol=0)
        k = len(a) * 3 // 4
        assert torch.equal(imp.keep_top(a, k), imp.keep_top(b, k))


def test_distill_loss_curve_matches(demo, gctx, calib):
    from medlite.compress.distill import data as D
    from medlite.compress.distill.objective import Objective
    from medlite.compress.distill.options import DistillOptions
    from medlite.devices import placed
    from medlite.training.trainer import TrainConfig, Trainer, trainable

    opts = DistillOptions(steps=20, batch_size=8, eval_every=1000, checkpoint_every=0)
    samples = calib.samples[:32]
    answers = D.teacher_answers(demo, samples, ctx=gctx, max_new_tokens=8)
    curves = {}
    for dev in (torch.device("cpu"), CUDA):
        teacher, student = copy.deepcopy(demo), copy.deepcopy(demo)
        with placed(teacher.model, dev), placed(student.model, dev):
            examples = [D.encode(student, s, a) for s, a in zip(samples, answers)]
            obj = Objective(student, teacher, D.Batches(student, examples), D.Batches(student, []), opts,
                            ctx=gctx, pruned=None)
            cfg = TrainConfig(steps=20, batch_size=8, learning_rate=1e-3, seed=0, warmup=2)
            res = Trainer({**trainable(student.model.named_parameters())}, obj.loss, len(examples), cfg,
                          ctx=gctx, description="distill").fit()
        curves[dev.type] = [v for _, v in res.losses]
    c, g = np.array(curves["cpu"]), np.array(curves["cuda"])
    assert len(c) == len(g) == 20
    assert np.all(np.abs(c[:5] - g[:5]) <= 1e-3 * np.abs(c[:5]) + 1e-6)
    assert abs(c[-1] - g[-1]) <= 0.02 * abs(c[-1]) + 1e-6


def _build(tmp_path, capsys, recipe: str, device: str, *overrides: str) -> dict:
    from medlite.cli import main

    rc = main(["--quiet", "build", recipe, *overrides, "--out", str(tmp_path / device.replace(":", "-")),
               "--device", device, "--json"])
    res = json.loads(capsys.readouterr().out)
    res["manifest"] = json.loads((tmp_path / res["artifact"] / "manifest.json").read_text())
    res["rc"] = rc
    return res


def _gates(res) -> dict:
    return {g["name"]: g["passed"] for g in res["manifest"]["gates"]}


def test_int8_build_smoothquant_and_gates_match(tmp_path, capsys):
    cpu = _build(tmp_path, capsys, "xavier-agx-int8", "cpu")
    gpu = _build(tmp_path, capsys, "xavier-agx-int8", "cuda")
    assert gpu["manifest"]["device"]["type"] == "cuda:0" and gpu["version"] != cpu["version"]
    sc = cpu["manifest"]["sections"]["quantize"]["smoothquant"]["scale_range"]
    sg = gpu["manifest"]["sections"]["quantize"]["smoothquant"]["scale_range"]
    assert np.allclose(sc, sg, rtol=1e-3)
    assert cpu["status"] == gpu["status"] == "passed" and _gates(cpu) == _gates(gpu)


def _nbits_integers(folder) -> np.ndarray:
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(folder / "decoder.onnx"))
    inits = {i.name: i for i in m.graph.initializer}
    packed = [numpy_helper.to_array(inits[n.input[1]]).ravel() for n in m.graph.node
              if n.op_type == "MatMulNBits" and n.input[1] in inits]
    b = np.concatenate(packed).astype(np.uint8)
    return np.stack([b & 0x0F, b >> 4], axis=-1).ravel()


def test_gptq_integers_and_gates_match(tmp_path, capsys):
    cpu = _build(tmp_path, capsys, "cpu-int4", "cpu")
    gpu = _build(tmp_path, capsys, "cpu-int4", "cuda")
    qc, qg = _nbits_integers(tmp_path / cpu["artifact"]), _nbits_integers(tmp_path / gpu["artifact"])
    assert qc.shape == qg.shape
    assert (qc == qg).mean() >= 0.99
    assert cpu["status"] == gpu["status"] == "passed" and _gates(cpu) == _gates(gpu)


def test_gpu_build_records_device_and_peaks(tmp_path, capsys):
    gpu = _build(tmp_path, capsys, "cpu-int4", "cuda")
    d = gpu["manifest"]["device"]
    assert d["name"] == torch.cuda.get_device_name(0) and d["memory_bytes"] > 0
    info = json.loads((tmp_path / gpu["artifact"] / "build-info.json").read_text())
    assert any(k.endswith("peak_gpu_bytes") and v > 0 for k, v in info["timings"].items())
    quant = next(s for s in gpu["stages"] if s["name"] == "quantize")
    assert "peak GPU" in quant["detail"]
