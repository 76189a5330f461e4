"""The bundle's README.md: what is inside, the device commands and the pinned pip packages."""
from __future__ import annotations


def readme(folder: str, manifest: dict, spec: dict, first: dict, pins: dict, optional: dict) -> str:
    """README text; every line of its ``sh`` blocks that starts with ``python3 medlite_device.py`` is run by the tests."""
    recipe = (manifest.get("recipe") or {}).get("name", "?")
    ort = ", ".join(sorted(spec.get("onnxruntime_components") or {})) or "none"
    engines = ", ".join(e["engine"] + " (" + "/".join(p["name"] for p in e["profiles"]) + ")" for e in spec["engines"])
    pip = " ".join(f"{k}=={v}" for k, v in pins.items())
    opt = " ".join(f"{k}=={v}" for k, v in optional.items())
    q = first["question"].replace('"', '\\"')
    return f"""# medlite device bundle: {manifest.get('model')} · {recipe} · {manifest.get('version')}

Target: {spec.get('target')} (TensorRT {spec.get('tensorrt')}, {spec.get('arch')}), precision {spec.get('precision')}.
Engines built on the device: {engines}. On ONNX Runtime: {ort}.

This folder runs on a Jetson Xavier with JetPack 5.1 (Python 3.8, numpy, the `tensorrt` 8.5.2 bindings,
CUDA 11.4). It needs neither torch nor medlite. `--standin` runs the same ONNX graphs on ONNX Runtime
behind the engine interface (same profiles, same buffers) to dry-run everything on any machine.

## Install (once, on the device)

```sh
sudo apt-get install python3-pip python3-libnvinfer   # JetPack 5.1 usually has both
python3 -m pip install --user {pip}
python3 -m pip install --user {opt}   # optional: DICOM input, memory figures
```

Each pin has a Python 3.8 aarch64 wheel on PyPI. onnxruntime {pins.get('onnxruntime')} from PyPI is CPU only:
it serves `--standin` and the ONNX-Runtime-only parts (INT4 decoders need onnxruntime >= 1.17 built with
CUDA for sm_72, see medlite's docs/engines.md).

## Commands (run in this folder)

```sh
python3 medlite_device.py verify --standin
python3 medlite_device.py build
python3 medlite_device.py verify
python3 medlite_device.py ask --image {first['image']} "{q}"
python3 medlite_device.py bench
```

1. `verify --standin` checks every file against `artifact/manifest.json` and `bundle.json`, runs the
   reference inputs through ONNX Runtime and answers the held-out questions: do this first, anywhere.
2. `build` (on the Jetson; `FORCE=1` or `--force` elsewhere) builds the engines into `artifact/device/`,
   the folder the artifact's manifest declares for device-built files: the artifact stays verifiable.
3. `verify` compares the engines' outputs with the host's (`reference/reference.npz`), prints the worst
   tensor and its error, exits 1 on a mismatch, and reports agreement with the host's answers.
4. `ask` streams an answer; `bench` writes `artifact/device/bench.json` (latency, tokens/s, and on a
   Jetson tegrastats power/RAM/GPU load per phase and the nvpmodel mode, next to the TinyLLaVA-Med
   paper's 18.9 W / 11.9 GB).
"""
