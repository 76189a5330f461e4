"""The ``quantize`` stage: per-component quantization of the working model.

* ``vision: int8`` and ``llm: w8a8`` — static INT8 Q/DQ graphs TensorRT 8.5 compiles to INT8 kernels
  (SmoothQuant on the language model first): :mod:`medlite.compress.int8`;
* ``llm: w4a16`` — GPTQ / AWQ / RTN INT4 weight-only through llm-compressor, exported as
  ``com.microsoft`` MatMulNBits that only ONNX Runtime runs: :mod:`medlite.compress.int4`.

Both calibrate on the recipe's medical image + question pairs through the framework's forward loop
and register what the export must do on ``state.export_plan``; neither writes graphs itself.
"""
from __future__ import annotations

import contextlib


def _merge(results: list):
    from medlite.pipeline.contract import StageResult

    out = StageResult(summary=" · ".join(r.summary for r in results))
    for r in results:
        out.changed += r.changed
        out.report += r.report
        out.manifest.update(r.manifest)
        out.ok = out.ok and r.ok
    befores = [r.bytes_before for r in results if r.bytes_before is not None]
    afters = [r.bytes_after for r in results if r.bytes_after is not None]
    out.bytes_before = sum(befores) if befores else None
    out.bytes_after = sum(afters) if afters else None
    return out


def _llmcompressor_logs_to_stderr() -> None:
    """llm-compressor's loguru sink writes to stdout (llmcompressor/logger.py ``configure_logger``),
    which corrupts ``--json`` output; send its warnings to stderr instead, each distinct message once
    (its INFO chatter is dropped: the stage's own progress says enough)."""
    import io
    import sys

    from loguru import logger

    # its import already logs to that sink (llmcompressor/modeling/fuse.py calls get_high_precision()
    # at import time: "No accelerator available!" on a CPU), and later calls repeat it: catch the
    # import's lines and show every distinct message once, in our format
    caught = io.StringIO()
    with contextlib.redirect_stdout(caught):
        import llmcompressor  # noqa: F401  (configures its logger on import)
    seen: set[str] = set()

    def once(record) -> bool:
        key = f"{record['level'].name}: {record['message']}"
        fresh = key not in seen
        seen.add(key)
        return fresh

    logger.remove()
    logger.add(sys.stderr, level="WARNING", format="llm-compressor {level}: {message}", filter=once)
    for line in caught.getvalue().splitlines():     # "<time> | <function> | <LEVEL> - <message>"
        level, _, message = line.rpartition(" | ")[2].partition(" - ")
        if level.strip() in ("WARNING", "ERROR", "CRITICAL") and message:
            logger.log(level.strip(), message)


def run(state, index: int, opts):
    """Quantize what ``opts`` asks for (see :class:`medlite.recipes.options.QuantizeOptions`)."""
    _llmcompressor_logs_to_stderr()
    results = []
    if opts.llm == "w4a16" or opts.lm_head == "int4":
        from medlite.compress.int4.stage import apply_w4a16

        results.append(apply_w4a16(state, index, opts))
    if opts.vision == "int8" or opts.llm == "w8a8":
        from medlite.compress.int8.stage import apply_int8

        results.append(apply_int8(state, index, opts))
    return _merge(results)
