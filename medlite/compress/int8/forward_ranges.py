"""Min-max activation ranges of the Q/DQ graphs, observed during the forward pass SmoothQuant makes anyway.

Why: ONNX Runtime's ``MinMaxCalibrater`` needs its own pass over the calibration set through the
traced graph. At full size that pass repeats the whole VLM per pair (the vision tower to build the
decoder feeds, then 1.1 B decoder parameters over ~800 positions in ONNX Runtime) after SmoothQuant's
torch pass already ran the same pairs: ≈ 2.3 TFLOP per pair again, ~20 s each on this 2-core CPU.
For ``minmax`` the ranges follow from what SmoothQuant's pass can observe, exactly:

* every quantized MatMul/Conv's activation input is a module input in torch (the graph node
  ``/lm/layers.3/mlp/down_proj/MatMul`` is ``model.language_model.layers.3.mlp.down_proj``), so a
  forward pre-hook sees the tensor ONNX Runtime would see (up to float rounding of the two runtimes);
* smoothing divides a smoothed input's channel j by s_j and changes nothing else in real arithmetic,
  so after smoothing that input's per-tensor |max| is ``max_j(absmax_j / s_j)`` — the per-channel
  absmax taken before smoothing, divided by the factor llm-compressor applied (read back from the
  norm's weights, see :func:`smoothing_factors`).

Symmetric min-max is ``±max|x|``: the ranges are written in ONNX Runtime's calibration-cache format, so
``quantize_static`` consumes them exactly as it would its own calibrator's (tested against
``MinMaxCalibrater`` on the same pairs). Percentile and entropy need histograms of the smoothed graph's
activations and keep ONNX Runtime's calibrators and their pass.

Padding: a left-padded row's pad positions are activations the deployed model never uses for an answer
(ONNX Runtime's decoder feeds group equal prompt lengths for that reason), so the observing pass runs
unpadded batches (``ForwardLoop(equal_length=True)``).
"""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np

# the export wrappers' submodule names (medlite/export/modules.py) → the Llava model's module paths
ROOTS = {"tower": "model.vision_tower", "projector": "model.multi_modal_projector",
         "lm": "model.language_model", "head": "lm_head"}


def module_of_node(node_name: str) -> Optional[str]:
    """The torch module a traced MatMul/Conv node belongs to, or None when the name is not a module's.

    ``/tower/encoder/layers.0/self_attn/q_proj/MatMul`` → ``model.vision_tower.encoder.layers.0.self_attn.q_proj``.
    """
    parts = node_name.strip("/").split("/")
    if len(parts) < 2 or parts[0] not in ROOTS:
        return None
    return ".".join([ROOTS[parts[0]]] + parts[1:-1])


GRAPH_ROOTS = {"vision": ("model.vision_tower.", "model.multi_modal_projector."),
               "decoder": ("model.language_model.", "lm_head")}


def quantizable_modules(model, graph: str) -> list[str]:
    """Names of the Linear / Conv modules whose inputs ``graph``'s Q/DQ nodes can quantize."""
    import torch

    roots = GRAPH_ROOTS[graph]
    return [n for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)) and n.startswith(roots)]


class AbsMaxObserver:
    """Per-input-channel ``max |x|`` of the inputs of the named modules (forward pre-hooks).

    Linear inputs ``[..., C]`` reduce over every dim but the last; Conv inputs ``[B, C, H, W]`` over
    every dim but the second. Use as a context manager around the forward pass.
    """

    def __init__(self, model, names: Iterable[str]):
        mods = dict(model.named_modules())
        missing = [n for n in names if n not in mods]
        if missing:
            raise KeyError(f"modules not in the model: {missing[:3]}")
        self._mods = {n: mods[n] for n in dict.fromkeys(names)}
        self.names = list(self._mods)
        self.absmax: dict = {}
        self._handles: list = []

    def _hook(self, name: str, conv: bool):
        import torch

        def pre(module, args):
            x = args[0].detach()
            dims = [d for d in range(x.dim()) if d != (1 if conv else x.dim() - 1)]
            a = x.abs().amax(dim=dims).float()
            old = self.absmax.get(name)
            self.absmax[name] = a if old is None else torch.maximum(old, a)
        return pre

    def __enter__(self) -> "AbsMaxObserver":
        import torch

        for n, m in self._mods.items():
            conv = isinstance(m, torch.nn.modules.conv._ConvNd)
            self._handles.append(m.register_forward_pre_hook(self._hook(n, conv)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def smoothing_factors(before: dict, after: dict, bias_before: Optional[dict] = None,
                      bias_after: Optional[dict] = None) -> dict:
    """Per-channel factor s each smooth layer (norm) was divided by: ``before / after`` of its weight.

    Where a weight is 0 the bias ratio is used (LayerNorm); where both are 0 the channel is always 0
    and its factor is irrelevant (returned as 1).
    """
    import torch

    out = {}
    for k, w in before.items():
        w2 = after[k]
        s = torch.where(w2 != 0, w / torch.where(w2 != 0, w2, torch.ones_like(w2)), torch.ones_like(w))
        if bias_before and k in bias_before and bias_before[k] is not None:
            b, b2 = bias_before[k], bias_after[k]
            use_b = (w2 == 0) & (b2 != 0)
            s = torch.where(use_b, b / torch.where(b2 != 0, b2, torch.ones_like(b2)), s)
        out[k] = s.float()
    return out


def smoothed_absmax(absmax: dict, factors: dict, balance: dict) -> dict:
    """``absmax`` with each balance module's input divided by its smooth layer's factors.

    ``balance`` maps a smooth layer's name to the names of the modules it feeds.
    """
    out = dict(absmax)
    for smooth, names in balance.items():
        s = factors[smooth]
        for n in names:
            if n in out:
                out[n] = out[n] / s
    return out


def ranges_for_graph(nodes: dict, absmax: dict) -> tuple[dict, list]:
    """``{tensor: max|x|}`` for the graph's quantized nodes from the observed module inputs.

    ``nodes`` maps node name → its activation input tensor. Returns the ranges and the nodes whose
    module was not observed (the caller falls back to ONNX Runtime's calibrator for them).
    """
    ranges: dict = {}
    missing = []
    for node, tensor in nodes.items():
        mod = module_of_node(node)
        if mod is None or mod not in absmax:
            missing.append(node)
            continue
        v = float(absmax[mod].max())
        ranges[tensor] = max(ranges.get(tensor, 0.0), v)
    return ranges, missing


def save_ranges(ranges: dict, path) -> None:
    """Write symmetric ``±max|x|`` ranges in ONNX Runtime's calibration-cache format (MinMax)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData, save_tensors_data

    data = {t: TensorData(lowest=np.array(-v, dtype=np.float32), highest=np.array(v, dtype=np.float32))
            for t, v in ranges.items()}
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), path)


class ColumnProbe:
    """Recover the per-input-column factor s a weight is later multiplied by (``W' = W · diag(s)``).

    For smoothing done elsewhere (:mod:`.smooth_extra` folds s into o_proj / down_proj / out_proj
    columns, so their inputs are divided by s): one entry per column — its largest |w| — is kept, and
    ``s_j = W'[i_j, j] / W[i_j, j]``. An all-zero column gives NaN (unknown factor).
    """

    def __init__(self, model, names: Iterable[str]):
        import torch

        mods = dict(model.named_modules())
        self._rows: dict = {}
        for n in names:
            w = mods[n].weight.detach()
            idx = w.abs().argmax(dim=0)
            self._rows[n] = (idx, w[idx, torch.arange(w.shape[1])].clone().float())

    def factors(self, model) -> dict:
        """``{module: s}`` after the weights were rescaled."""
        import torch

        mods = dict(model.named_modules())
        out = {}
        for n, (idx, before) in self._rows.items():
            w = mods[n].weight.detach()
            after = w[idx, torch.arange(w.shape[1])].float()
            out[n] = torch.where(before != 0, after / torch.where(before != 0, before, torch.ones_like(before)),
                                 torch.full_like(before, float("nan")))
        return out


class ForwardRanges:
    """The quantize stage's min-max ranges per graph, observed during the SmoothQuant passes.

    ``observer(graph)`` goes to that graph's SmoothQuant call; a graph without SmoothQuant gets an
    observation-only pass (:meth:`observe_only`); :meth:`smoothed` divides by the factors the
    smoothing applied; :meth:`write` turns them into the traced graph's ranges cache.
    """

    def __init__(self, model, graphs: Iterable[str], *, lm_head: bool = False):
        # lm_head only when it is quantized: observing it makes the pass compute every position's logits
        # (full size: 8 rows x 790 x 32000 fp32 = 0.8 GB per batch, and 0.1 TFLOP per pair)
        self.observers = {g: AbsMaxObserver(model, [n for n in quantizable_modules(model, g)
                                                    if lm_head or n != "lm_head"]) for g in graphs}
        self.absmax: dict = {}
        self.samples: dict = {}

    def observer(self, graph: str) -> Optional[AbsMaxObserver]:
        return self.observers.get(graph)

    def smoothed(self, graph: str, smooth, samples: int) -> None:
        """Record ``graph``'s observation, divided by ``smooth``'s factors (None: not smoothed)."""
        obs = self.observers[graph]
        self.absmax[graph] = (smoothed_absmax(obs.absmax, smooth.factors, smooth.balance)
                              if smooth is not None else dict(obs.absmax))
        self.samples[graph] = samples

    def observe_only(self, graph: str, model, loop) -> None:
        """The pass for a graph that has no SmoothQuant pass to ride along."""
        with self.observers[graph] as obs:
            n = loop.run_images(model) if graph == "vision" else loop.run(model, lm_head="lm_head" in obs.names)
        self.smoothed(graph, None, n)

    def divide(self, factors: dict) -> None:
        """Divide the observed inputs of the modules in ``factors`` by them (smoothing applied after
        the observation); a module with an unknown factor is dropped, so its graph falls back to ONNX
        Runtime's calibrator."""
        import torch

        for absmax in self.absmax.values():
            for n, s in factors.items():
                if n in absmax:
                    if bool(torch.isfinite(s).all()) and bool((s > 0).all()):
                        absmax[n] = absmax[n] / s
                    else:
                        del absmax[n]

    def write(self, graph: str, nodes: dict, path) -> list:
        """Write ``graph``'s ranges for ``nodes`` ({node: activation tensor}) to ``path`` (ONNX Runtime's
        cache format). Returns the nodes it has no observation for (then nothing is written)."""
        ranges, missing = ranges_for_graph(nodes, self.absmax.get(graph, {}))
        if not missing:
            save_ranges(ranges, path)
        return missing


__all__ = ["AbsMaxObserver", "ColumnProbe", "ForwardRanges", "GRAPH_ROOTS", "ROOTS", "module_of_node", "quantizable_modules", "ranges_for_graph", "save_ranges", "smoothed_absmax",
           "smoothing_factors"]
