"""The one place that knows about torch devices: ``--device auto|cpu|cuda|cuda:N`` and recipes' ``device``.

* :func:`parse_device` checks a spelling (torch-free: the CLI and the recipe schema call it);
* :func:`resolve_device` turns a spelling into a :class:`torch.device` (``auto``: CUDA when
  ``torch.cuda.is_available()``, else the CPU), with one-line errors for CUDA without CUDA;
* :func:`describe` is what the model stage line, report.md and the manifest's ``device`` field show;
* :func:`placed` moves a module onto the device for one phase and back to the host afterwards
  (the working model lives on the host between stages); on the CPU it does nothing at all;
* :class:`PeakMemory` records ``torch.cuda.max_memory_allocated`` per phase (None on the CPU);
* :func:`check_fits` refuses, before any work, a phase whose estimated peak exceeds the card.

Every CPU path stays exactly as before this module existed: callers guard device moves with
``if device.type != "cpu"`` (no copies, same numerics), and :func:`placed` is a no-op there.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from medlite.errors import MedliteError

CHOICES = "auto, cpu, cuda or cuda:N"
_SPELLING = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class DeviceError(MedliteError):
    """A device that is misspelt or not available on this machine (one line, exit 2)."""


def parse_device(spec: Optional[str], *, where: str = "--device") -> str:
    """The normalized spelling of ``spec`` (None → ``auto``); torch-free, for the CLI and recipes."""
    if spec is None:
        return "auto"
    s = str(spec).strip().lower()
    if not _SPELLING.match(s):
        raise DeviceError(f"{where}: {spec!r} is not a device; use {CHOICES}")
    return s


def add_device_arg(p, *, what: str = "PyTorch work") -> None:
    """``--device`` for a command's argparse parser (argparse only: the CLI imports no torch)."""
    p.add_argument("--device", default=None, metavar="DEVICE",
                   help=f"torch device for {what}: {CHOICES} (default: the recipe's device, else auto = CUDA "
                        "when torch sees it, else the CPU)")


def resolve_device(spec: Optional[str], *, where: str = "--device"):
    """``torch.device`` for ``spec``: ``auto`` picks ``cuda`` when CUDA is available, else ``cpu``."""
    import torch

    s = parse_device(spec, where=where)
    if s == "cpu" or (s == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"{where} {s}: this torch ({torch.__version__}) sees no CUDA device; use --device cpu, "
                          f"or install a CUDA build of torch (docs/gpu-builds.md)")
    dev = torch.device("cuda:0" if s in ("auto", "cuda") else s)
    n = torch.cuda.device_count()
    if dev.index is not None and dev.index >= n:
        raise DeviceError(f"{where} {s}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
    return dev


def is_cpu(device) -> bool:
    """True for None or a CPU device (the unchanged path)."""
    return device is None or getattr(device, "type", str(device)) == "cpu"


def total_memory(device) -> Optional[int]:
    """Bytes of memory on a CUDA device (None on the CPU)."""
    if is_cpu(device):
        return None
    import torch

    return int(torch.cuda.get_device_properties(device).total_memory)


def describe(device) -> dict:
    """``{"type", "name", "memory_bytes"}`` of the device (the manifest's ``device`` field)."""
    if is_cpu(device):
        import platform

        return {"type": "cpu", "name": platform.processor() or platform.machine() or "cpu", "memory_bytes": None}
    import torch

    return {"type": str(device), "name": torch.cuda.get_device_name(device), "memory_bytes": total_memory(device)}


def describe_line(info: dict) -> str:
    """``cuda:0 (NVIDIA H100, 85.05 GB)`` or ``cpu``."""
    from medlite.units import human_bytes

    if info.get("type", "cpu") == "cpu":
        return "cpu"
    mem = info.get("memory_bytes")
    return f"{info['type']} ({info.get('name', '?')}" + (f", {human_bytes(mem)})" if mem else ")")


def model_device(module):
    """The device of a module's first parameter (CPU for a module without parameters)."""
    import torch

    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def to_device(device, *tensors):
    """``tensors`` moved to ``device`` when it is not the CPU (the CPU path gets the same objects back)."""
    if is_cpu(device):
        return tensors if len(tensors) != 1 else tensors[0]
    out = tuple(None if t is None else t.to(device) for t in tensors)
    return out if len(out) != 1 else out[0]


@contextlib.contextmanager
def placed(module, device) -> Iterator[Any]:
    """``module`` on ``device`` for the ``with`` block, back on the host afterwards; CPU: untouched."""
    if is_cpu(device):
        yield module
        return
    import torch

    module.to(device)
    try:
        yield module
    finally:
        module.to("cpu")
        torch.cuda.empty_cache()


@dataclass
class PeakMemory:
    """Peak CUDA memory of named phases (``torch.cuda.max_memory_allocated``); nothing on the CPU."""

    device: Any = None

    def __post_init__(self) -> None:
        self.peaks: dict = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Reset the peak counter, run the block, record its peak under ``name``."""
        if is_cpu(self.device):
            yield
            return
        import torch

        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            yield
        finally:
            self.peaks[name] = int(torch.cuda.max_memory_allocated(self.device))

    def get(self, name: str) -> Optional[int]:
        """Bytes of ``name``'s peak, or None (CPU, or the phase did not run)."""
        return self.peaks.get(name)

    def line(self) -> str:
        """`` · peak GPU 3.21 GB (gptq)`` for a stage line; empty on the CPU."""
        from medlite.units import human_bytes

        if not self.peaks:
            return ""
        return " · peak GPU " + ", ".join(f"{human_bytes(v)} ({k})" for k, v in self.peaks.items())


def to_host(obj, _depth: int = 0):
    """Every torch tensor inside ``obj`` (dicts, lists, tuples, attributes of plain objects) moved to the
    CPU in place, after a GPU phase, so later CPU-side work (ONNX feeds, numpy) never mixes devices."""
    import torch

    if _depth > 4 or obj is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, torch.nn.Module):
        return obj                    # modules go back with placed()
    if isinstance(obj, dict):
        for k in list(obj):
            obj[k] = to_host(obj[k], _depth + 1)
        return obj
    if isinstance(obj, list):
        obj[:] = [to_host(v, _depth + 1) for v in obj]
        return obj
    if isinstance(obj, tuple):
        return type(obj)(*[to_host(v, _depth + 1) for v in obj]) if hasattr(obj, "_fields") else \
            tuple(to_host(v, _depth + 1) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        for k, v in list(vars(obj).items()):
            try:
                setattr(obj, k, to_host(v, _depth + 1))
            except AttributeError:          # a read-only property
                pass
    return obj


def record_peaks(state, peaks: "PeakMemory", prefix: str = "") -> str:
    """Keep a stage's GPU peaks in the build: ``state.gpu_peaks`` and ``build-info.json``'s timings (peaks vary
    a little between identical builds, so never in the hashed manifest/report). Returns the stage-line note."""
    for k, v in peaks.peaks.items():
        state.gpu_peaks[f"{prefix}{k}"] = v
        state.timings[f"{prefix}{k} peak_gpu_bytes"] = v
    return peaks.line().lstrip(" ·")


def peak_memory(device) -> Optional[int]:
    """``torch.cuda.max_memory_allocated`` on ``device`` since its last reset; None on the CPU."""
    if is_cpu(device):
        return None
    import torch

    return int(torch.cuda.max_memory_allocated(device))


def check_fits(device, estimate_bytes: int, *, what: str, option: str) -> None:
    """Refuse before starting when ``what`` is estimated to need more than the card has.

    ``option`` names what would make it fit (e.g. ``calibration.samples`` / a smaller batch, layer
    onloading). A 10 % margin is kept for the CUDA context and the allocator's fragmentation.
    """
    total = total_memory(device)
    if total is None or estimate_bytes <= 0.9 * total:
        return
    from medlite.units import human_bytes

    raise DeviceError(f"{what} needs about {human_bytes(estimate_bytes)} on {device} but the card has "
                      f"{human_bytes(total)} (90 % usable): {option}")


def module_bytes(module) -> int:
    """Bytes of a module's parameters and buffers (what :func:`placed` moves)."""
    return int(sum(t.numel() * t.element_size() for t in module.parameters())
               + sum(t.numel() * t.element_size() for t in module.buffers()))


__all__ = ["CHOICES", "DeviceError", "add_device_arg", "PeakMemory", "check_fits", "describe", "describe_line", "is_cpu",
           "model_device", "module_bytes", "parse_device", "peak_memory", "placed", "record_peaks", "resolve_device",
           "to_device", "to_host", "total_memory"]
