"""medlite.devices: spellings, resolution (auto/cpu/cuda), descriptions, peaks and the fit check."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from medlite import devices
from medlite.devices import DeviceError


@pytest.mark.parametrize("spec,want", [(None, "auto"), ("auto", "auto"), ("CPU", "cpu"), ("cuda", "cuda"),
                                       ("cuda:1", "cuda:1"), (" cuda:0 ", "cuda:0")])
def test_parse_accepts(spec, want):
    assert devices.parse_device(spec) == want


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:x", "mps", "cuda0", ""])
def test_parse_refuses_with_one_line_naming_the_value(spec):
    with pytest.raises(DeviceError) as e:
        devices.parse_device(spec, where="recipe device")
    msg = str(e.value)
    assert "\n" not in msg and repr(spec) in msg and "recipe device" in msg and devices.CHOICES in msg


def test_cpu_and_auto_without_cuda_resolve_to_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve_device("cpu").type == "cpu"
    assert devices.resolve_device("auto").type == "cpu"
    assert devices.resolve_device(None).type == "cpu"


@pytest.mark.parametrize("spec", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_one_line(monkeypatch, spec):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError) as e:
        devices.resolve_device(spec)
    msg = str(e.value)
    assert "\n" not in msg and "no CUDA device" in msg and "--device cpu" in msg


def test_cpu_helpers_are_no_ops():
    cpu = torch.device("cpu")
    t = torch.ones(2)
    assert devices.to_device(cpu, t) is t                      # same object: no copy on the CPU
    a, b = devices.to_device(cpu, t, None)
    assert a is t and b is None
    m = torch.nn.Linear(2, 2)
    with devices.placed(m, cpu) as got:
        assert got is m and devices.model_device(m).type == "cpu"
    peaks = devices.PeakMemory(cpu)
    with peaks.phase("x"):
        pass
    assert peaks.get("x") is None and peaks.line() == ""
    assert devices.peak_memory(cpu) is None and devices.total_memory(cpu) is None
    info = devices.describe(cpu)
    assert info["type"] == "cpu" and info["memory_bytes"] is None and devices.describe_line(info) == "cpu"
    devices.check_fits(cpu, 10 ** 15, what="anything", option="n/a")   # the CPU is never refused


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda as seen on a machine with one 8 GB card (only the queries medlite.devices makes)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=8_000_000_000))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "Fake GPU 8GB")


def test_fake_cuda_resolution_and_description(fake_cuda):
    assert devices.resolve_device("auto") == torch.device("cuda:0")
    assert devices.resolve_device("cuda") == torch.device("cuda:0")
    with pytest.raises(DeviceError, match=r"has 1 CUDA device\(s\)"):
        devices.resolve_device("cuda:3")
    info = devices.describe(torch.device("cuda:0"))
    assert info == {"type": "cuda:0", "name": "Fake GPU 8GB", "memory_bytes": 8_000_000_000}
    assert devices.describe_line(info) == "cuda:0 (Fake GPU 8GB, 8.00 GB)"


def test_fake_cuda_fit_check_names_the_option(fake_cuda):
    dev = torch.device("cuda:0")
    devices.check_fits(dev, 7_000_000_000, what="gptq", option="lower x")       # 7 GB ≤ 90 % of 8 GB
    with pytest.raises(DeviceError) as e:
        devices.check_fits(dev, 7_500_000_000, what="quantize (GPTQ, one decoder layer at a time)",
                           option="lower quantize.batch_size")
    msg = str(e.value)
    assert "\n" not in msg and "7.50 GB" in msg and "8.00 GB" in msg and "lower quantize.batch_size" in msg
