"""Park a model's idle weights on disk while ONNX Runtime works on its exported graph.

A quantize stage holds the working torch model (fp32: 6.1 GB at the full TinyLLaVA-1.5B size) and,
at the same time, an ONNX Runtime session or ``quantize_static`` run over the traced fp32 decoder
(4.4 GB more). During those steps the decoder blocks in torch are idle: the calibration feeds need
only the vision tower, the projector and the token embeddings. :func:`weights_on_disk` writes the
idle parameters to a safetensors file, frees them, and puts them back bit-exactly when the block
ends (also on error), so the two copies of the decoder never sit in memory together. Measured in
``benchmarks/int8_full_size.py`` (peak RSS per phase; docs/quantization-int8.md).
"""
from __future__ import annotations

import contextlib
import gc
import tempfile
from pathlib import Path
from typing import Iterable, Optional


def idle_decoder_modules(model) -> list:
    """The modules of a Llava model that calibration feeds never use: the decoder blocks and the
    final norm, plus ``lm_head`` unless it shares its weight with the input embeddings."""
    lm = model.model.language_model
    mods = [lm.layers, lm.norm]
    head = getattr(model, "lm_head", None)
    if head is not None and head.weight is not lm.get_input_embeddings().weight:
        mods.append(head)
    return mods


def _unique_params(modules: Iterable, keep: Iterable) -> list:
    kept = {id(p) for m in keep for p in m.parameters()}
    out, seen = [], set()
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen and id(p) not in kept:
                seen.add(id(p))
                out.append(p)
    return out


@contextlib.contextmanager
def weights_on_disk(modules: Iterable, *, keep: Iterable = (), folder: Optional[Path] = None, ctx=None):
    """Free the parameters of ``modules`` (except those shared with ``keep``) while the block runs.

    They are saved to a safetensors file in ``folder`` (a temporary folder when None) and restored
    bit-exactly when the block exits, normally or by an exception; the file is removed. Using the
    modules inside the block is an error (their parameters are empty).
    """
    import torch
    from safetensors.torch import load_file, save_file

    params = _unique_params(list(modules), list(keep))
    if not params:
        yield
        return
    with tempfile.TemporaryDirectory(prefix="medlite-offload-", dir=folder) as tmp:
        path = Path(tmp) / "weights.safetensors"
        save_file({str(i): p.data.contiguous() for i, p in enumerate(params)}, str(path))
        for p in params:
            p.data = torch.empty(0, dtype=p.dtype)
        gc.collect()
        if ctx is not None:
            ctx.info(f"parked {path.stat().st_size / 1e9:.2f} GB of idle weights on disk")
        try:
            yield
        finally:
            back = load_file(str(path))
            for i, p in enumerate(params):
                p.data = back.pop(str(i))
            del back


__all__ = ["idle_decoder_modules", "weights_on_disk"]
