"""Jetson power and memory figures: ``tegrastats`` samples and the ``nvpmodel`` mode (JetPack 5.1).

A tegrastats line (L4T r35) looks like::

    RAM 2948/31002MB (lfb 6340x4MB) SWAP 0/15501MB (cached 0MB) CPU [2%@1190,...] EMC_FREQ 0%@2133
    GR3D_FREQ 0%@[1377] ... GPU 0mW/0mW CPU 310mW/310mW SOC 1240mW/1240mW CV 0mW/0mW VDDRQ 310mW/310mW
    SYS5V 1563mW/1563mW

Xavier NX (and Orin) print the input rail ``VDD_IN``; AGX Xavier has no ``VDD_IN`` rail, so the
module's power there is the sum of its rails (said in the output). Nothing is invented off a Jetson.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

NOT_A_JETSON = "not a Jetson"
PAPER = {"watts": 18.9, "memory_gb": 11.9, "source": "TinyLLaVA-Med paper (Jetson AGX Xavier)"}
# JetPack 5 prints "GPU 0mW/0mW"; JetPack 4 printed "GPU 120/100" (current/average, milliwatts).
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?=\s|$)")
_NOT_RAILS = ("RAM", "SWAP", "IRAM")
_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_GPU = re.compile(r"\bGR3D_FREQ (\d+)%")


def parse_line(line: str) -> dict:
    """One tegrastats line → ``{ram_mb, ram_total_mb, gpu_load_pct, rails_mw, watts, watts_from}``."""
    out = {}
    m = _RAM.search(line)
    if m:
        out["ram_mb"], out["ram_total_mb"] = int(m.group(1)), int(m.group(2))
    m = _GPU.search(line)
    if m:
        out["gpu_load_pct"] = int(m.group(1))
    rails = {name: int(now) for name, now, _avg in _RAIL.findall(line) if name not in _NOT_RAILS}
    out["rails_mw"] = rails
    if "VDD_IN" in rails:
        out["watts"], out["watts_from"] = rails["VDD_IN"] / 1000.0, "VDD_IN"
    elif rails:
        out["watts"], out["watts_from"] = sum(rails.values()) / 1000.0, "sum of rails (no VDD_IN on this module)"
    return out


def is_jetson() -> bool:
    return Path("/etc/nv_tegra_release").is_file()


def nvpmodel_mode() -> str:
    """``nvpmodel -q``'s mode name, or why there is none."""
    exe = shutil.which("nvpmodel")
    if not exe:
        return NOT_A_JETSON if not is_jetson() else "nvpmodel not found"
    try:
        text = subprocess.run([exe, "-q"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvpmodel failed: {e}"
    m = re.search(r"NV Power Mode:\s*(\S+)", text)
    return m.group(1) if m else text.strip() or "unknown"


class Sampler:
    """Runs ``tegrastats --interval MS`` and keeps ``(time, parsed line)`` samples; phases are time windows."""

    def __init__(self, interval_ms: int = 100):
        self.samples: list = []
        self.proc = None
        exe = shutil.which("tegrastats")
        if exe and is_jetson():
            self.proc = subprocess.Popen([exe, "--interval", str(interval_ms)], stdout=subprocess.PIPE, text=True)
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.samples.append((time.perf_counter(), parse_line(line)))

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=5)

    def phase(self, start: float, end: float) -> dict:
        """Mean watts, peak RAM and mean GPU load between two ``perf_counter`` times."""
        return summarize([s for t, s in self.samples if start <= t <= end], self.proc is not None)


def summarize(samples: list, sampling: bool = True) -> dict:
    """The figures of a phase from its parsed samples (``not a Jetson`` when nothing was sampled)."""
    if not sampling:
        return {"watts": NOT_A_JETSON, "peak_ram_gb": NOT_A_JETSON, "gpu_load_pct": NOT_A_JETSON}
    if not samples:
        return {"watts": "no sample in this phase (shorter than the sampling interval)", "samples": 0}
    watts = [s["watts"] for s in samples if "watts" in s]
    ram = [s["ram_mb"] for s in samples if "ram_mb" in s]
    gpu = [s["gpu_load_pct"] for s in samples if "gpu_load_pct" in s]
    return {"watts": round(sum(watts) / len(watts), 2) if watts else None,
            "watts_from": samples[-1].get("watts_from"),
            "peak_ram_gb": round(max(ram) * 1.048576 / 1000.0, 3) if ram else None,   # tegrastats MB = MiB
            "gpu_load_pct": round(sum(gpu) / len(gpu), 1) if gpu else None, "samples": len(samples)}
