"""GPTQ / AWQ / round-to-nearest weight-only quantization of the language model with llm-compressor 0.14.

llm-compressor's own calibration pipelines feed text-only ``input_ids`` (and its ``oneshot`` needs a
Hugging Face processor and ``datasets``); a VLM's language model would then be calibrated without
its image tokens, ~90 % of a TinyLLaVA-Med prompt. So we drive llm-compressor's modifiers through
its session lifecycle with our own layer-sequential loop, fed by the framework's
:class:`~medlite.calibration.forward.ForwardLoop` (vision tower → projector → splice → LLM):

1. the inputs of the first decoder layer (spliced embeddings, rotary embeddings, mask) are captured
   once per calibration batch;
2. each decoder layer is run on them with the modifiers' hooks on (GPTQ accumulates Hessians,
   AWQ caches activations), then ``sequential_epoch_end`` quantizes that layer, then the layer is
   run again with hooks off so the next layer sees the quantized layer's output (error propagation,
   what llm-compressor's ``sequential`` pipeline does);
3. optionally the final norm + ``lm_head`` the same way.

Only modules of the language model (and ``lm_head`` when asked) are targeted: the modifiers get
explicit per-module regex targets, so the vision tower and projector are never touched.

compressed-tensors 0.19 refuses group quantization when a layer's input width is not a multiple of
the group size (``group_size_validation.py``; the demo model's ``down_proj`` has K = 352). Such
layers are quantized as zero-padded ``Linear(K_pad, N)`` (:class:`PaddedLinear`): padded columns see
zero inputs (no Hessian contribution) and hold zero weights, which quantize to the zero point and
do not change a group's min/max (compressed-tensors' ranges always include 0). The last group of
the real K columns is then exactly MatMulNBits' partial last block.
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Optional

import torch
from torch import nn


class PaddedLinear(nn.Module):
    """``Linear(K, N)`` computed as ``Linear(K_pad, N)`` on zero-padded inputs (``inner`` is quantized)."""

    def __init__(self, linear: nn.Linear, k_pad: int):
        super().__init__()
        n, k = linear.weight.shape
        self.in_features, self.k_pad = k, k_pad
        self.inner = nn.Linear(k_pad, n, bias=linear.bias is not None, dtype=linear.weight.dtype)
        with torch.no_grad():
            self.inner.weight.zero_()
            self.inner.weight[:, :k] = linear.weight
            if linear.bias is not None:
                self.inner.bias.copy_(linear.bias)

    def forward(self, x):
        return self.inner(nn.functional.pad(x, (0, self.k_pad - self.in_features)))


@dataclass
class QuantizedLinear:
    """The quantizer's own result for one Linear ``y = x W^T + b`` (``W`` is ``[N, K]``)."""

    name: str                       # module name in the Llava model, e.g. model.language_model.layers.0.mlp.down_proj
    bits: int
    group_size: int
    qweight: Any                    # int16 tensor [N, K]: unsigned integers 0 .. 2^bits - 1
    scales: Any                     # float32 [N, ceil(K / group_size)]
    zero_points: Any                # int16 [N, ceil(K / group_size)], unsigned (2^(bits-1) when symmetric)
    symmetric: bool
    bias: Any = None                # float32 [N] or None
    g_idx: Any = None               # int32 [K] group of each input column (None: contiguous groups)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)

    def dequantized(self) -> torch.Tensor:
        """``[N, K]`` float32 weights ``(q - zp) * scale`` (the quantizer's fake-quant weights)."""
        n, k = self.qweight.shape
        g = self.g_idx.long() if self.g_idx is not None else torch.arange(k) // self.group_size
        return (self.qweight.float() - self.zero_points.float()[:, g]) * self.scales.float()[:, g]


@dataclass
class LlmcOptions:
    """What to run (mirrors the recipe's quantize options)."""

    algorithm: str = "gptq"          # gptq | awq | rtn
    group_size: int = 128
    symmetric: bool = True
    act_order: bool = False
    lm_head: str = "fp16"            # fp16 | int8 | int4
    dampening_frac: float = 0.01
    observer: Optional[str] = None   # weight observer (llm-compressor registry name); None: min-max
    observer_kwargs: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


def language_linear_names(model, lm_head: bool) -> list[str]:
    """Names of the Linear layers of the language model (and ``lm_head``), in model order."""
    names = [f"model.language_model.{n}" for n, m in model.model.language_model.named_modules()
             if isinstance(m, nn.Linear)]
    return names + (["lm_head"] if lm_head else [])


def _scheme(bits: int, opts: LlmcOptions) -> dict:
    weights = {"num_bits": bits, "type": "int", "symmetric": opts.symmetric, "strategy": "group",
               "group_size": int(opts.group_size)}
    if opts.observer:
        weights.update(observer=opts.observer, observer_kwargs=dict(opts.observer_kwargs))
    return {"weights": weights, "input_activations": None, "output_activations": None}


def _gptq_actorder(opts: LlmcOptions):
    """GPTQModifier's ``actorder``, always explicit: its default sentinel turns a scheme's None into
    "static", which ran act-order under ``act_order: false`` (measured, llmcompressor 0.14).

    compressed-tensors 0.19 refuses "group"/"dynamic" (the variants storing ``weight_g_idx``);
    "weight" restores the column order after quantizing, so groups stay contiguous (no ``g_idx``).
    """
    return "weight" if opts.act_order else None


def _modifiers(names_by_bits: dict[int, list[str]], opts: LlmcOptions) -> list:
    groups = {f"group_{b}": {"targets": ["re:^" + "$|^".join(re.escape(n) for n in names) + "$"],
                             **_scheme(b, opts)} for b, names in names_by_bits.items() if names}
    if opts.algorithm == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        return [GPTQModifier(config_groups=groups, dampening_frac=opts.dampening_frac, actorder=_gptq_actorder(opts),
                             **opts.extra)]
    from llmcompressor.modifiers.quantization import QuantizationModifier

    mods = [QuantizationModifier(config_groups=groups)]
    if opts.algorithm == "awq":
        from llmcompressor.modifiers.transform.awq import AWQModifier

        mods.insert(0, AWQModifier(mappings=_awq_mappings(), **opts.extra))
    elif opts.algorithm != "rtn":
        raise ValueError(f"algorithm {opts.algorithm!r}: use gptq, awq or rtn")
    return mods


def _scoped(pattern: str) -> str:
    # "re:.*q_proj$" -> only inside the language model; a padded layer's quantized Linear is ".inner"
    body = pattern[len("re:"):].lstrip(".*").rstrip("$")
    return rf"re:.*language_model\..*{body}(\.inner)?$"


def _awq_mappings() -> list:
    """llm-compressor's default (Llama-style) AWQ mappings, scoped to the language model.

    Unscoped, ``.*q_proj$`` also matches SigLIP's attention, which misaligns llm-compressor's mapping
    sets ("AWQ needs to match a single smoothlayer for each mapping").
    """
    from llmcompressor.modifiers.transform.awq.mappings import AWQMapping, default_mappings

    return [AWQMapping(_scoped(m.smooth_layer), [_scoped(b) for b in m.balance_layers], m.activation_hook_target)
            for m in default_mappings]


@contextlib.contextmanager
def padded_layers(model, names: list[str], group_size: int):
    """Wrap every named Linear whose K is not a multiple of ``group_size`` in :class:`PaddedLinear`.

    Yields ``{name: quantized module name}`` (``name.inner`` for padded layers); the wrappers stay
    until the caller has read the results, then the context restores plain Linear modules.
    """
    mapping, swapped = {}, []
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lin = getattr(parent, attr)
        k = lin.weight.shape[1]
        if k % group_size:
            wrapper = PaddedLinear(lin, math.ceil(k / group_size) * group_size)
            setattr(parent, attr, wrapper)
            swapped.append((parent, attr, lin))
            mapping[name] = f"{name}.inner"
        else:
            mapping[name] = name
    try:
        yield mapping
    finally:
        for parent, attr, lin in swapped:
            setattr(parent, attr, lin)


@contextlib.contextmanager
def _cpu_safe_cache():
    """Make llm-compressor's activation-cache pinning a no-op without an accelerator.

    AWQModifier (llmcompressor 0.14, transform/awq/base.py ``_apply_smoothing``) pins every cached
    batch with ``Tensor.pin_memory()``, which raises "Cannot access accelerator device when none is
    available" on a CPU-only torch. Pinning only speeds up host-to-device copies; skipping it on
    CPU changes nothing numerically. Patched for the duration of one quantization only.
    """
    from unittest import mock

    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.cuda.is_available():
        yield
        return
    with mock.patch.object(IntermediatesCache, "pin_memory", lambda *a, **k: None):
        yield


@contextlib.contextmanager
def _quiet_llmcompressor():
    """llm-compressor logs every module it quantizes (loguru, INFO); our progress bar says enough."""
    from loguru import logger

    logger.disable("llmcompressor")
    try:
        yield
    finally:
        logger.enable("llmcompressor")


class _Captured(Exception):
    pass


def _layer_inputs(model, loop) -> tuple[list[tuple[tuple, dict]], list]:
    """(args, kwargs) of the first decoder layer for every calibration batch (real image tokens), and
    each batch's ``[batch, seq]`` attention mask (1 = real token, 0 = left padding)."""
    layers = model.model.language_model.layers
    seen: list = []
    masks: list = []

    def grab(_m, args, kwargs):
        seen.append((args, dict(kwargs)))
        raise _Captured

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for inp in loop.batches(model):
            masks.append(inp.attention_mask.detach().clone())
            with torch.no_grad(), contextlib.suppress(_Captured):
                model.model.language_model(inputs_embeds=inp.inputs_embeds, attention_mask=inp.attention_mask,
                                           position_ids=inp.position_ids, use_cache=False, return_dict=True)
    finally:
        handle.remove()
    return seen, masks


def _hidden(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _run_sequential(model, cached: list, lm_head: bool, ctx, state=None) -> None:
    """Per decoder layer: calibrate (hooks on), quantize, propagate (hooks off). ``state`` (the session's)
    gets the batch index, which is how AWQ finds that batch's ``state.loss_masks`` entry."""
    from llmcompressor.core import LifecycleCallbacks
    from llmcompressor.modifiers.utils.hooks import HooksMixin

    layers = model.model.language_model.layers
    states = [(args, kw) for args, kw in cached]
    steps = list(layers) + ([None] if lm_head else [])
    state = state if state is not None else SimpleNamespace()
    progress = ctx.progress("quantize language model", total=len(steps)) if ctx else contextlib.nullcontext()
    with progress as advance, torch.no_grad():
        for layer in steps:
            if layer is None:   # final norm + lm_head
                for i, (args, kw) in enumerate(states):
                    state.current_batch_idx = i
                    model.lm_head(model.model.language_model.norm(args[0]))
                LifecycleCallbacks.sequential_epoch_end([model.lm_head, *model.lm_head.modules()])
            else:
                for i, (args, kw) in enumerate(states):
                    state.current_batch_idx = i
                    layer(*args, **kw)
                state.current_batch_idx = -1
                LifecycleCallbacks.sequential_epoch_end(list(layer.modules()))
                with HooksMixin.disable_hooks():
                    states = [((_hidden(layer(*args, **kw)), *args[1:]), kw) for args, kw in states]
            if advance:
                advance(1)


def quantize_language_model(model, loop, opts: LlmcOptions, *, ctx=None,
                            on_quantized=None) -> dict[str, QuantizedLinear]:
    """Quantize the language model of ``model`` (a Llava) in place with llm-compressor; return the results.

    ``loop`` is a :class:`~medlite.calibration.forward.ForwardLoop` over the calibration samples.
    Afterwards every quantized Linear holds llm-compressor's dequantized (fake-quant) weights and is
    a plain ``nn.Linear`` again (no compressed-tensors hooks remain), so the working model runs
    anywhere; the returned records hold the integers, scales and zero points the quantizer chose.
    ``on_quantized(model)`` is called while llm-compressor's fake-quant forward is still installed
    (tests compare against it).
    """
    from llmcompressor.core import LifecycleCallbacks, create_session
    from llmcompressor.utils.helpers import DisableQuantization, calibration_forward_context

    head_bits = {"int4": 4, "int8": 8}.get(opts.lm_head)
    if head_bits is not None:
        untie_lm_head(model)
    names = language_linear_names(model, lm_head=False)
    with padded_layers(model, names + (["lm_head"] if head_bits else []), opts.group_size) as mapping:
        by_bits = {4: [mapping[n] for n in names]}
        if head_bits:
            by_bits.setdefault(head_bits, []).append(mapping["lm_head"])
        with create_session() as session, _cpu_safe_cache(), _quiet_llmcompressor():
            session.initialize(model=model, start=-1, recipe=_modifiers(by_bits, opts))
            cached, masks = _layer_inputs(model, loop)
            if not cached:
                raise ValueError("no calibration batches: the calibration set is empty")
            # AWQ's activation statistics and output loss skip the left padding (llm-compressor's
            # use_loss_mask mechanism; GPTQ does not read it)
            session.state.loss_masks = masks
            LifecycleCallbacks.calibration_start()
            with calibration_forward_context(model), DisableQuantization(model):
                _run_sequential(model, cached, head_bits is not None, ctx, state=session.state)
            session.state.loss_masks = None
            LifecycleCallbacks.calibration_end()
            session.finalize()
        records = {n: record_from_module(n, model.get_submodule(q), opts.symmetric,
                                         k=model.get_submodule(n).in_features)
                   for n, q in mapping.items() if n != "lm_head" or head_bits}
        if on_quantized is not None:
            on_quantized(model)
        strip_quantization(model)
    for name, rec in records.items():   # bake the quantizer's fake-quant weights into plain Linear
        lin = model.get_submodule(name)
        with torch.no_grad():
            lin.weight.copy_(rec.dequantized().to(lin.weight.dtype))
    return records


def record_from_module(name: str, module, symmetric: bool, k: Optional[int] = None) -> QuantizedLinear:
    """Read the integers, scales and zero points compressed-tensors holds for ``module``.

    The integers are what compressed-tensors' own ``quantize`` gives for the module's (already GPTQ-
    updated) weight with its scale and zero point — the values its pack-quantized compressor saves.
    Signed integers in ``[-2^(b-1), 2^(b-1) - 1]`` become unsigned by adding ``2^(b-1)`` (as
    MatMulNBits stores them); a padded module is cut back to its real K columns. A ``weight_g_idx``
    (what older compressed-tensors stored for "group" act-order) is kept as the record's ``g_idx``.
    """
    from compressed_tensors.quantization.lifecycle.forward import quantize

    args = module.quantization_scheme.weights
    bits, gs = int(args.num_bits), int(args.group_size)
    w = module.weight.detach().float()
    scale = module.weight_scale.detach().float()
    zp = getattr(module, "weight_zero_point", None)
    zp = torch.zeros_like(scale) if zp is None else zp.detach().float()
    g_idx = getattr(module, "weight_g_idx", None)   # "group" act-order of compressed-tensors < 0.19
    if g_idx is None:
        q = quantize(w, scale, zp, args, dtype=torch.float32)
    else:   # column j uses group g_idx[j]: compressed-tensors' formula with per-column scale / zero point
        g = g_idx.detach().long()
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        q = torch.clamp(torch.round(w / scale[:, g] + zp[:, g]), lo, hi)
        g_idx = g_idx.detach().to(torch.int32).clone()
    offset = 1 << (bits - 1)
    k = q.shape[1] if k is None else int(k)
    return QuantizedLinear(name=name, bits=bits, group_size=gs, qweight=(q + offset).to(torch.int16)[:, :k],
                           scales=scale.clone(), zero_points=(zp + offset).round().to(torch.int16),
                           symmetric=symmetric, g_idx=None if g_idx is None else g_idx[:k],
                           bias=None if module.bias is None else module.bias.detach().float().clone())


def strip_quantization(model) -> None:
    """Remove compressed-tensors state (forward patch, scales, observers) and unwrap padded layers."""
    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, PaddedLinear):
                inner = child.inner
                lin = nn.Linear(child.in_features, inner.out_features, bias=inner.bias is not None,
                                dtype=inner.weight.dtype)
                with torch.no_grad():
                    lin.weight.copy_(inner.weight[:, :child.in_features])
                    if inner.bias is not None:
                        lin.bias.copy_(inner.bias)
                setattr(parent, attr, lin)
    for m in model.modules():
        if "forward" in m.__dict__:          # compressed-tensors patches the instance's forward
            del m.forward
        for attr in ("quantization_scheme", "quantization_status", "quantization_enabled"):
            if attr in m.__dict__:
                delattr(m, attr)
        for pname in [n for n, _ in m.named_parameters(recurse=False) if n.startswith(("weight_", "input_", "output_"))]:
            delattr(m, pname)
        for sub in [n for n, _ in m.named_children() if n.endswith("_observer")]:
            delattr(m, sub)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def untie_lm_head(model) -> None:
    """Give ``lm_head`` its own weight when it shares the embedding table (quantizing it must not
    change the embeddings)."""
    emb = model.model.language_model.get_input_embeddings().weight
    if model.lm_head.weight is emb or model.lm_head.weight.data_ptr() == emb.data_ptr():
        model.lm_head.weight = nn.Parameter(emb.detach().clone())
        if hasattr(model.config, "tie_word_embeddings"):
            model.config.tie_word_embeddings = False
        tc = getattr(model.config, "text_config", None)
        if tc is not None and hasattr(tc, "tie_word_embeddings"):
            tc.tie_word_embeddings = False


__all__ = ["LlmcOptions", "PaddedLinear", "QuantizedLinear", "language_linear_names", "padded_layers",
           "quantize_language_model", "record_from_module", "strip_quantization", "untie_lm_head"]
