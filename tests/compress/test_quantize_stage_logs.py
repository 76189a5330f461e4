"""llm-compressor's log lines during a quantize stage: on stderr (stdout stays clean for ``--json``),
each distinct warning once — its import and every later call on a CPU say "No accelerator available!"."""
from __future__ import annotations

import subprocess
import sys

SCRIPT = """
from medlite.compress.quantize_stage import _llmcompressor_logs_to_stderr
_llmcompressor_logs_to_stderr()     # the first import of llmcompressor happens in here
from llmcompressor.utils.dev import get_main_device
from loguru import logger
get_main_device(); get_main_device()
logger.info("llm-compressor chatter")
logger.warning("another warning")
"""


def test_llmcompressor_warnings_once_on_stderr():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    accel = [ln for ln in lines if "No accelerator available" in ln]
    if not accel:      # a machine with an accelerator: nothing to repeat
        assert "llm-compressor WARNING: another warning" in lines
        return
    assert accel == ["llm-compressor WARNING: No accelerator available! Compressing model on CPU instead"], lines
    assert "llm-compressor WARNING: another warning" in lines
    assert not any("chatter" in ln for ln in lines)
