"""An extracted device bundle given to ``medlite ask / bench / serve --model BUNDLE_FOLDER`` on a host.

The host runs the bundle's *own* device runtime (``mldevice``, the code ``medlite_device.py`` runs on the
Jetson): its TensorRT engines where the ``tensorrt`` bindings, ``cuda-python`` and a GPU are present,
or — with ``--standin`` — the same graphs on ONNX Runtime behind the engine interface (profiles
enforced). Without TensorRT and without ``--standin`` it is one line saying what is missing.
The bundle's files are checked first against ``bundle.json`` (as ``medlite_device.py verify`` does).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from medlite.errors import MedliteError

ARTIFACT_DIR = "artifact"


def is_bundle(folder) -> bool:
    """An extracted ``medlite bundle`` (``bundle.json``, ``medlite_device.py``, ``artifact/``)."""
    folder = Path(folder)
    return (folder / "bundle.json").is_file() and (folder / "medlite_device.py").is_file() \
        and (folder / ARTIFACT_DIR).is_dir()


def missing_engine_runtime() -> list[str]:
    """What running TensorRT engines needs and this host lacks (import names)."""
    return [name for name, mod in (("tensorrt", "tensorrt"), ("cuda-python", "cuda"))
            if importlib.util.find_spec(mod) is None]


def open_bundle_vlm(folder, *, standin: bool, ctx):
    """The bundle's device VLM (an ``OnnxVlm`` whose vision/decoder run on engines or their stand-ins)."""
    folder = Path(folder).resolve()
    missing = [] if standin else missing_engine_runtime()
    if missing:
        raise MedliteError(f"{folder}: a device bundle runs TensorRT engines, which needs {' and '.join(missing)} "
                           f"on this host (missing); --standin runs the same graphs on ONNX Runtime behind the engine "
                           f"interface, or give its {ARTIFACT_DIR}/ folder to run the artifact on ONNX Runtime")
    _check_files(folder)
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))      # the bundle's own mldevice/ and mlrt/, as medlite_device.py does
    from mldevice.runtime import open_device_vlm

    try:
        vlm = open_device_vlm(folder / ARTIFACT_DIR, standin=standin)
    except SystemExit as e:                  # the device runtime reports its problems this way
        raise MedliteError(f"{folder}: {e}") from None
    ctx.info(f"{folder}: device bundle, " + "; ".join(f"{k}: {v}" for k, v in vlm.backend.items()))
    return vlm


def _check_files(folder: Path) -> None:
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    from mldevice.verify import check_files

    problems = check_files(folder)
    if problems:
        raise MedliteError(f"{folder}: the bundle does not match bundle.json: " + "; ".join(map(str, problems[:5])))


def cmd_ask_bundle(args, ctx) -> int:
    """``medlite ask BUNDLE_FOLDER --image F "Q"`` through the bundle's device runtime (see the module doc)."""
    import json

    from medlite.runtime.commands import load_ask_image, print_answers
    from medlite.runtime.describe import graph_labels

    folder = Path(args.model).resolve()
    vlm = open_bundle_vlm(folder, standin=bool(getattr(args, "standin", False)), ctx=ctx)
    image, facts = load_ask_image(args.image, getattr(args, "frame", None), ctx)
    manifest = json.loads((folder / ARTIFACT_DIR / "manifest.json").read_text(encoding="utf-8"))
    model = {"folder": str(folder), "version": manifest.get("version"), "status": manifest.get("status"),
             "hash_check": "checked (every file matches bundle.json)",
             "runtime": "; ".join(f"{k}: {v}" for k, v in vlm.backend.items()), "precision": graph_labels(vlm.config)}
    n = int(getattr(args, "max_new_tokens", 32))
    questions = getattr(args, "questions", None) or [args.question]
    print_answers(questions, lambda q, on_text: vlm.answer(image, q, max_new_tokens=n, on_token=on_text), ctx,
                  model=model, image=facts)
    return 0
