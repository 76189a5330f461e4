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

Layers whose input width is not a multiple of the group size are quantized zero-padded
(:func:`~medlite.compress.int4.records.padded_layers`, which says why).
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Optional

import torch

from medlite.memory import idle_vision_modules, release_memory, weights_on_disk
from medlite.compress.int4.records import (PaddedLinear, QuantizedLinear, language_linear_names, padded_layers,
                                           record_from_module, strip_quantization, untie_lm_head)


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
    awq_clip: bool = False           # awq: AutoAWQ's clip search after the scales (awq_clip.py)
    extra: dict = field(default_factory=dict)


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


def _modifiers(names_by_bits: dict[int, list[str]], opts: LlmcOptions, wrapped: frozenset = frozenset()) -> list:
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

        mods.insert(0, AWQModifier(mappings=_awq_mappings(wrapped), **opts.extra))
    elif opts.algorithm != "rtn":
        raise ValueError(f"algorithm {opts.algorithm!r}: use gptq, awq or rtn")
    return mods


def _clip_step(opts: LlmcOptions, masks: list, state):
    """AWQ's clip search per decoder layer (None unless ``algorithm: awq`` with ``awq_clip``)."""
    if opts.algorithm != "awq" or not opts.awq_clip:
        return None
    from medlite.compress.int4.awq_clip import clip_layer

    return lambda layer, run: clip_layer(layer, run, masks, state)


def _kind(pattern: str) -> str:
    """``"re:.*q_proj$"`` (llm-compressor's mapping pattern) -> ``"q_proj"``."""
    return pattern[len("re:"):].lstrip(".*").rstrip("$")


def _scoped(pattern: str, not_these: str = "") -> str:
    # "re:.*q_proj$" -> only inside the language model; a padded layer's quantized Linear is ".inner"
    return rf"re:{not_these}.*language_model\..*{_kind(pattern)}(\.inner)?$"


def _awq_mappings(wrapped: frozenset = frozenset()) -> list:
    """llm-compressor's default (Llama-style) AWQ mappings, scoped to the language model.

    Unscoped, ``.*q_proj$`` also matches SigLIP's attention, which misaligns llm-compressor's mapping
    sets ("AWQ needs to match a single smoothlayer for each mapping"). ``wrapped``: names of
    :class:`PaddedLinear` wrappers, which AWQ must not see (it edits ``.weight``, which a wrapper does not
    have). As a smooth layer, a padded layer's ``.inner`` Linear stands in (AWQ divides its output rows;
    the padding is on its inputs). As a balance layer it cannot (its ``.inner`` takes more inputs than
    the smooth layer gives), so that mapping is left out in that decoder layer (llm-compressor matches
    smooth and balance layers as complete sets); :func:`quantize_language_model` warns about it.
    """
    from llmcompressor.modifiers.transform.awq.mappings import AWQMapping, default_mappings

    no_wrapper = "(?!(?:" + "|".join(re.escape(n) for n in sorted(wrapped)) + ")$)" if wrapped else ""
    out = []
    for m in default_mappings:
        kinds = tuple("." + _kind(b) for b in m.balance_layers)
        layers = sorted({_decoder_layer(n) for n in wrapped if n.endswith(kinds)} - {""})
        skip = no_wrapper + ("(?!" + "|".join(re.escape(p) for p in layers) + ")" if layers else "")
        out.append(AWQMapping(_scoped(m.smooth_layer, skip), [_scoped(b, skip) for b in m.balance_layers],
                              m.activation_hook_target))
    return out


def _decoder_layer(name: str) -> str:
    """``model.language_model.layers.3.mlp.down_proj`` -> ``model.language_model.layers.3.`` ("" outside one)."""
    found = re.match(r"^(.*\.layers\.\d+\.)", name)
    return found.group(1) if found else ""


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
    """llm-compressor logs every module it quantizes (loguru, INFO) and compressed-tensors draws a progress
    bar of its own; our progress bar says enough."""
    import functools
    from unittest import mock

    from llmcompressor.modifiers.quantization.quantization import mixin
    from llmcompressor.modifiers.transform.awq import base as awq_base
    from loguru import logger

    logger.disable("llmcompressor")
    # compressed-tensors draws its own tqdm bar ("Applying quantization config") over ours, and AWQ one
    # per mapping and per grid search ("Smoothing", "Grid search for ...")
    quiet_apply = functools.partial(mixin.apply_quantization_config, show_progress=False)
    quiet_tqdm = functools.partial(awq_base.tqdm, disable=True)
    try:
        with mock.patch.object(mixin, "apply_quantization_config", quiet_apply), \
                mock.patch.object(awq_base, "tqdm", quiet_tqdm):
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


@contextlib.contextmanager
def _onloaded(modules: list, device):
    """llm-compressor's sequential onloading on a GPU: ``modules`` on ``device`` for the block, back on the
    host after it (one decoder layer at a time: a 1.5B build fits an 8 GB card). CPU: nothing moves."""
    from medlite.devices import placed

    with contextlib.ExitStack() as stack:
        for m in modules:
            stack.enter_context(placed(m, device))
        yield


def _capture_modules(model) -> list:
    """What runs before decoder layer 0's inputs are captured: the vision tower moved whole, the
    projector, the token embeddings and the rotary table (the decoder layers stay on the host)."""
    lm = model.model.language_model
    mods = [model.model.vision_tower, model.model.multi_modal_projector, lm.get_input_embeddings()]
    return mods + ([lm.rotary_emb] if getattr(lm, "rotary_emb", None) is not None else [])


def gpu_estimate(model, n_samples: int, tokens: int) -> int:
    """Bytes a GPU holds at most during the layer loop: the captured hidden states (input + output of one
    layer for every calibration sample), the largest decoder layer with one GPTQ Hessian per Linear
    (in_features² fp32), and the vision tower + embeddings of the capture (whichever phase is larger)."""
    from medlite.devices import module_bytes

    hidden = int(model.config.text_config.hidden_size)
    states = 2 * n_samples * tokens * hidden * 4
    layers = model.model.language_model.layers
    layer = max((module_bytes(m) + sum(4 * lin.in_features ** 2 for lin in m.modules()
                                       if isinstance(lin, torch.nn.Linear)) for m in layers), default=0)
    capture = sum(module_bytes(m) for m in _capture_modules(model)) + states // 2
    return max(states + layer, capture)


def _run_sequential(model, cached: list, lm_head: bool, ctx, state=None, on_layer=None, device=None) -> None:
    """Per decoder layer: calibrate (hooks on), quantize, propagate (hooks off). ``cached`` (from
    :func:`_layer_inputs`) is consumed: its entries become each layer's outputs. ``state`` (the session's)
    gets the batch index, which is how AWQ finds that batch's ``state.loss_masks`` entry.
    ``on_layer(layer, run)``, when given, runs after a layer is quantized and before it propagates;
    ``run()`` runs that layer over the batches with llm-compressor's hooks off (AWQ's clip search).
    ``device`` (a GPU): each step's modules are onloaded there for that step only."""
    layers = model.model.language_model.layers
    states = cached     # owned: each batch's hidden states are replaced in place as a layer propagates
    steps = list(layers) + ([None] if lm_head else [])
    state = state if state is not None else SimpleNamespace()
    progress = ctx.progress("quantize language model", total=len(steps)) if ctx else contextlib.nullcontext()
    with progress as advance, torch.no_grad():
        for layer in steps:
            with _onloaded([model.lm_head, model.model.language_model.norm] if layer is None else [layer], device):
                _step(model, layer, states, state, on_layer)
            if advance:
                advance(1)


def _step(model, layer, states: list, state, on_layer) -> None:
    """One step of :func:`_run_sequential`: a decoder layer (calibrate, quantize, propagate) or, for
    ``layer`` None, the final norm + lm_head."""
    from llmcompressor.core import LifecycleCallbacks
    from llmcompressor.modifiers.utils.hooks import HooksMixin

    if layer is None:   # final norm + lm_head
        for i, (args, kw) in enumerate(states):
            state.current_batch_idx = i
            model.lm_head(model.model.language_model.norm(args[0]))
        LifecycleCallbacks.sequential_epoch_end([model.lm_head, *model.lm_head.modules()])
    else:
        _replay(layer, states, state)
        LifecycleCallbacks.sequential_epoch_end(list(layer.modules()))
        if on_layer is not None:
            on_layer(layer, lambda layer=layer: _replay(layer, states, state, hooks=False))
        with HooksMixin.disable_hooks():
            # in place, and the first layer's inputs are not kept: one set of hidden states
            # lives, not three (inputs of layer 0, of this layer, outputs: 3 x 0.9 GB at 128
            # full-size pairs of 839 tokens)
            for i, (args, kw) in enumerate(states):
                states[i] = ((_hidden(layer(*args, **kw)), *args[1:]), kw)


def _replay(layer, states: list, state, hooks: bool = True) -> None:
    """Run ``layer`` over the cached batches, telling ``state`` which batch runs (llm-compressor's hooks
    on, or off with ``hooks=False``)."""
    from llmcompressor.modifiers.utils.hooks import HooksMixin

    with contextlib.nullcontext() if hooks else HooksMixin.disable_hooks():
        for i, (args, kw) in enumerate(states):
            state.current_batch_idx = i
            layer(*args, **kw)
    state.current_batch_idx = -1


def _warn_unscaled(opts: LlmcOptions, wrapped: frozenset, ctx) -> None:
    """AWQ gives no scales to layers quantized zero-padded (their input width is not a multiple of the
    group size): say so, they are round-to-nearest."""
    unscaled = sorted(n for n in wrapped if n != "lm_head")
    if opts.algorithm != "awq" or not unscaled or ctx is None:
        return
    kinds = sorted({n.rsplit(".", 1)[-1] for n in unscaled})
    ctx.warn(f"awq: {len(unscaled)} layer(s) ({', '.join(kinds)}) take an input width that is not a multiple of "
             f"group_size {opts.group_size}; they are quantized zero-padded and AWQ cannot scale them "
             "(llm-compressor needs a balance layer's inputs to equal its smooth layer's outputs): "
             "round-to-nearest for those; a group_size dividing every width keeps AWQ on all layers")


def _idle_during_layers(model) -> list:
    """What the layer-by-layer loop never runs once the first layer's inputs are captured: the vision
    tower, the projector and the token embeddings (1.9 GB fp32 at full size, parked on disk meanwhile;
    a table tied to ``lm_head`` is kept)."""
    return idle_vision_modules(model) + [model.model.language_model.get_input_embeddings()]


def quantize_language_model(model, loop, opts: LlmcOptions, *, ctx=None, on_quantized=None,
                            consume: Optional[Callable] = None, device=None) -> dict:
    """Quantize the language model of ``model`` (a Llava) in place with llm-compressor; return the results.

    ``loop`` is a :class:`~medlite.calibration.forward.ForwardLoop` over the calibration samples.
    Returns ``{name: QuantizedLinear}``: the integers, scales and zero points the quantizer chose.
    Afterwards every quantized Linear holds llm-compressor's dequantized (fake-quant) weights and is
    a plain ``nn.Linear`` again (no compressed-tensors hooks remain), so the working model runs
    anywhere. ``on_quantized(model)`` is called while llm-compressor's fake-quant forward is still
    installed (tests compare against it).

    ``consume(name, record)``, when given, takes each record as soon as it is read, before the next
    one is, and its return value is kept in place of the record; it may replace the module ``name``
    (the quantize stage installs the packed MatMulNBits layer there, so the fp32 weight and the
    record's integers are freed layer by layer instead of all records and all weights being held
    together). Layers it consumed are not baked back into plain Linear.

    ``device`` (a GPU): the capture modules, then one decoder layer at a time, run there; the model
    stays on the host. None or the CPU: everything as before.
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
            wrapped = frozenset(n for n, q in mapping.items() if q != n)
            _warn_unscaled(opts, wrapped, ctx)
            session.initialize(model=model, start=-1, recipe=_modifiers(by_bits, opts, wrapped))
            with _onloaded(_capture_modules(model), device):
                cached, masks = _layer_inputs(model, loop)
            if not cached:
                raise ValueError("no calibration batches: the calibration set is empty")
            release_memory()    # the vision forward's activations: freed, but glibc keeps them mapped
            # AWQ's activation statistics and output loss skip the left padding (llm-compressor's
            # use_loss_mask mechanism; GPTQ does not read it)
            session.state.loss_masks = masks
            LifecycleCallbacks.calibration_start()
            with calibration_forward_context(model), DisableQuantization(model), \
                    weights_on_disk(_idle_during_layers(model), keep=[model.lm_head], ctx=ctx):
                _run_sequential(model, cached, head_bits is not None, ctx, state=session.state,
                                on_layer=_clip_step(opts, masks, session.state), device=device)
            del cached
            session.state.loss_masks = None
            LifecycleCallbacks.calibration_end()
            session.finalize()
        if on_quantized is not None:
            on_quantized(model)
        results = {}
        for n, q in mapping.items():
            if n == "lm_head" and not head_bits:
                continue
            rec = record_from_module(n, model.get_submodule(q), opts.symmetric, k=model.get_submodule(n).in_features)
            results[n] = rec if consume is None else consume(n, rec)
            del rec
        strip_quantization(model)
    if consume is None:
        for name, rec in results.items():   # bake the quantizer's fake-quant weights into plain Linear
            lin = model.get_submodule(name)
            with torch.no_grad():
                lin.weight.copy_(rec.dequantized().to(lin.weight.dtype))
    return results


__all__ = ["LlmcOptions", "PaddedLinear", "QuantizedLinear", "language_linear_names", "padded_layers",
           "quantize_language_model", "record_from_module", "strip_quantization", "untie_lm_head"]
