"""The device runtime's copy of medlite's torch-free ONNX Runtime path, made at bundle time.

The device runtime (``medlite/engines/device/``) reuses medlite's preprocessing, prompt, runtime
config, session and greedy-decoding code instead of keeping a second copy: :func:`vendored_files`
copies those modules into the bundle's ``mlrt/`` package with their ``medlite`` imports rewritten to
``mlrt``. Anything else a copied module imports from medlite is refused here (the bundle must run
without medlite), and every copied file must parse as Python 3.8.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

from medlite.errors import ExportError

ROOT = Path(__file__).resolve().parents[1]          # the medlite package folder
DEVICE_SRC = Path(__file__).resolve().parent / "device"
# bundle path -> medlite source (relative to the medlite package)
VENDORED = {
    "mlrt/preprocess.py": "preprocess.py",
    "mlrt/prompting.py": "prompting.py",
    "mlrt/config.py": "runtime/config.py",
    "mlrt/decoding.py": "runtime/decoding.py",
    "mlrt/sessions.py": "runtime/sessions.py",
    "mlrt/vlm.py": "runtime/vlm.py",
    "mlrt/limits.py": "runtime/limits.py",
}
# medlite module -> its name in the bundle
MODULE_MAP = {"medlite.preprocess": "mlrt.preprocess", "medlite.prompting": "mlrt.prompting",
              "medlite.errors": "mlrt.errors", "medlite.runtime.config": "mlrt.config",
              "medlite.runtime.decoding": "mlrt.decoding", "medlite.runtime.sessions": "mlrt.sessions",
              "medlite.runtime.vlm": "mlrt.vlm", "medlite.runtime.limits": "mlrt.limits",
              "medlite.imaging.images": "mlrt.imaging"}

SHIMS = {
    "mlrt/__init__.py": '"""medlite\'s torch-free ONNX Runtime path, copied into this bundle (see README.md)."""\n',
    "mlrt/errors.py": '''"""Error types of the copied medlite modules (medlite.errors, reduced to what they raise)."""


class MedliteError(Exception):
    """An error a user can act on: printed as one line, no traceback."""


class DataError(MedliteError):
    """Bad input data (file, key or value named in the message)."""
''',
    "mlrt/imaging.py": '''"""Image loading on the device: PNG/JPEG/TIFF through Pillow, DICOM through pydicom (if installed).

medlite's own loader (windowing presets, NIfTI, multi-frame selection) stays on the host; here a
DICOM image is scaled by its own window (or its value range) to 8-bit grey.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def load_image(path, ctx=None):
    """An RGB PIL image from ``path``."""
    from PIL import Image

    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(132)
    if head[128:132] == b"DICM" or path.suffix.lower() == ".dcm":
        try:
            import pydicom
        except ImportError:
            raise SystemExit(f"{path}: a DICOM file needs pydicom (pip3 install pydicom==2.4.4)") from None
        ds = pydicom.dcmread(str(path))
        arr = ds.pixel_array.astype(np.float64)
        if arr.ndim == 3 and arr.shape[-1] != 3:
            arr = arr[0]
        arr = arr * float(getattr(ds, "RescaleSlope", 1) or 1) + float(getattr(ds, "RescaleIntercept", 0) or 0)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo or 1.0) * 255.0
        if str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":
            arr = 255.0 - arr
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
        return img.convert("RGB")
    return Image.open(path).convert("RGB")
''',
}

_IMPORT = re.compile(r"^(\s*)(from|import)\s+(medlite(?:\.[A-Za-z_]+)*)", re.M)


def rewrite(text: str, source: str) -> str:
    """``text`` with its medlite imports pointed at the bundle's ``mlrt`` modules; refuses others."""
    def sub(m: re.Match) -> str:
        mod = m.group(3)
        if mod not in MODULE_MAP:
            raise ExportError(f"{source}: imports {mod}, which the device bundle does not carry")
        return f"{m.group(1)}{m.group(2)} {MODULE_MAP[mod]}"

    out = _IMPORT.sub(sub, text)
    check_py38(out, source)
    for node in ast.walk(ast.parse(out)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        if any(n == "medlite" or n.startswith("medlite.") for n in names):
            raise ExportError(f"{source}: still imports medlite after rewriting")
    return out


def check_py38(text: str, source: str) -> None:
    """Refuse text that is not Python 3.8 syntax (JetPack 5.1's python3)."""
    try:
        ast.parse(text, filename=source, feature_version=(3, 8))
    except SyntaxError as e:
        raise ExportError(f"{source}: not Python 3.8 syntax (line {e.lineno}): {e.msg}") from None


def runtime_files() -> dict[str, str]:
    """Every Python file of the device runtime, ``{bundle path: text}``, sorted."""
    files = {}
    for p in sorted(DEVICE_SRC.rglob("*.py")):
        if "__pycache__" in p.parts:
            continue
        rel = p.relative_to(DEVICE_SRC).as_posix()
        text = p.read_text(encoding="utf-8")
        check_py38(text, str(p))
        files[rel] = text
    for rel, src in VENDORED.items():
        files[rel] = rewrite((ROOT / src).read_text(encoding="utf-8"), f"medlite/{src}")
    for rel, text in SHIMS.items():
        check_py38(text, rel)
        files[rel] = text
    return dict(sorted(files.items()))
