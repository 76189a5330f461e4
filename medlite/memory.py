"""Park a model's idle weights on disk while ONNX Runtime works on its exported graph.

A quantize stage holds the working torch model (fp32: 6.1 GB at the full TinyLLaVA-1.5B size) and,
at the same time, an ONNX Runtime session or ``quantize_static`` run over the traced fp32 decoder
(4.4 GB more). During those steps the decoder blocks in torch are idle: the calibration feeds need
only the vision tower, the projector and the token embeddings. :func:`weights_on_disk` writes the
idle parameters to a file, frees them, and puts them back bit-exactly when the block
ends (also on error), so the two copies of the decoder never sit in memory together. Measured in
``benchmarks/int8_full_size.py`` (peak RSS per phase; docs/quantization-int8.md).
"""
from __future__ import annotations

import contextlib
import gc
import tempfile
from pathlib import Path
from typing import Iterable, Optional

from medlite.units import human_bytes


def release_memory() -> None:
    """Collect and return freed heap to the OS (glibc ``malloc_trim``).

    Between big steps (a trace, a calibration) the previous step's peak is freed but glibc keeps it
    mapped, so RSS — and the next step's peak — stacks on it; trimming makes the per-step peaks
    independent (measured on the full-size export and INT8 build)."""
    gc.collect()
    trim_heap()


def trim_heap() -> None:
    """glibc ``malloc_trim(0)``: return free heap pages (also those between live chunks) to the OS."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: nothing to trim
        pass


MMAP_THRESHOLD = 1 << 20    # bytes; see map_large_allocations


def map_large_allocations(threshold: int = MMAP_THRESHOLD) -> bool:
    """Have glibc serve every allocation of ``threshold`` bytes or more with its own ``mmap`` for the
    rest of this process (``mallopt(M_MMAP_THRESHOLD)``), so a freed activation goes back to the OS at
    once. Returns False where that is not available (not glibc).

    Why: glibc raises its mmap threshold dynamically up to 32 MiB after the first large free, after
    which the 4-26 MB activations of a full-size decoder layer come from the heap and leave holes that
    neither the top-of-heap trim nor the next layer's differently sized tensors reuse. In the full-size
    SmoothQuant pass (4 rows x ~790 positions per batch) RSS grew ~0.13 GB per layer, 7.5 -> 10.5 GB
    within one batch; with the threshold fixed at 1 MiB it stayed at 7.1-7.2 GB and the batch ran no
    slower (218 -> 201 s; docs/quantization-int8.md "Peak memory"). Setting it also turns off the
    dynamic adjustment (man mallopt), which is the point. ``medlite build`` calls this once per process;
    it changes no numerics.
    """
    import ctypes

    M_MMAP_THRESHOLD = -3    # glibc malloc.h
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):   # not glibc
        return False


def idle_decoder_modules(model) -> list:
    """The modules of a Llava model that calibration feeds never use: the decoder blocks and the
    final norm, plus ``lm_head`` unless it shares its weight with the input embeddings."""
    lm = model.model.language_model
    # the final norm's name depends on the backbone: ``norm`` (Llama, Qwen2, StableLM), ``final_layernorm`` (Phi)
    norm = next((getattr(lm, n) for n in ("norm", "final_layernorm") if getattr(lm, n, None) is not None), None)
    mods = [lm.layers] + ([norm] if norm is not None else [])
    head = getattr(model, "lm_head", None)
    if head is not None and head.weight is not lm.get_input_embeddings().weight:
        mods.append(head)
    return mods


def idle_vision_modules(model) -> list:
    """The modules a decoder trace never uses: the vision tower and the projector (1.7 GB fp32 at
    full size — parked while the decoder graph is traced, whose exporter holds a copy of its weights)."""
    inner = model.model
    return [m for m in (getattr(inner, "vision_tower", None), getattr(inner, "multi_modal_projector", None))
            if m is not None]


def modules_idle_for(model, graph: str) -> list:
    """The modules tracing ``graph`` ("vision", "embed" or "decoder") never runs (a tied lm_head /
    embedding table is never listed for a graph that uses either)."""
    if graph == "decoder":
        return idle_vision_modules(model)
    mods = idle_decoder_modules(model)
    emb = model.model.language_model.get_input_embeddings()
    return idle_vision_modules(model) + mods if graph == "embed" else mods + [emb]


def _unique_params(modules: Iterable, keep: Iterable) -> list:
    kept = {id(p) for m in keep for p in m.parameters()}
    out, seen = [], set()
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen and id(p) not in kept and p.numel() > 0:   # nothing to park in an empty one
                seen.add(id(p))
                out.append(p)
    return out


def _write_raw(params: list, path: Path) -> list:
    """Append each parameter's bytes to ``path`` and free it at once; returns ``(offset, nbytes)``.

    One tensor at a time on purpose: safetensors' ``save_file`` first turns *every* tensor into a
    Python ``bytes`` copy, which doubled the parked weights in memory (4.4 GB more at full size,
    the peak of the INT8 build's decoder step — benchmarks/int8_full_size.py).
    """
    import torch

    spans, offset = [], 0
    with open(path, "wb") as f:
        for p in params:
            raw = p.data.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            raw.tofile(f)
            spans.append((offset, raw.nbytes))
            offset += raw.nbytes
            del raw
            p.data = torch.empty(0, dtype=p.dtype)
    return spans


def _read_raw(params: list, path: Path, spans: list, shapes: list) -> None:
    """Put back what :func:`_write_raw` wrote (bit-exact: the bytes are reinterpreted, not converted)."""
    import numpy as np
    import torch

    with open(path, "rb") as f:
        for p, (offset, nbytes), shape in zip(params, spans, shapes):
            f.seek(offset)
            raw = torch.from_numpy(np.fromfile(f, dtype=np.uint8, count=nbytes))
            p.data = raw.view(p.dtype).reshape(shape)


@contextlib.contextmanager
def weights_on_disk(modules: Iterable, *, keep: Iterable = (), folder: Optional[Path] = None, ctx=None):
    """Free the parameters of ``modules`` (except those shared with ``keep``) while the block runs.

    They are written to a raw file in ``folder`` (a temporary folder when None), one tensor at a
    time so parking never needs more memory than one tensor, and restored bit-exactly when the block
    exits, normally or by an exception; the file is removed. Using the modules inside the block is
    an error (their parameters are empty).
    """
    params = _unique_params(list(modules), list(keep))
    if not params:
        yield
        return
    if folder is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="medlite-offload-", dir=folder) as tmp:
        path = Path(tmp) / "weights.bin"
        shapes = [tuple(p.shape) for p in params]
        spans = _write_raw(params, path)
        release_memory()
        if ctx is not None:
            ctx.info(f"parked {human_bytes(path.stat().st_size)} of idle weights on disk")
        try:
            yield
        finally:
            _read_raw(params, path, spans, shapes)


__all__ = ["MMAP_THRESHOLD", "idle_decoder_modules", "idle_vision_modules", "map_large_allocations",
           "modules_idle_for", "release_memory", "trim_heap", "weights_on_disk"]
