"""``medlite ask ARTIFACT_DIR --image scan.dcm "question" ...`` on an ONNX export (torch-free).

Every answer is attributed: before the answers a stderr line names the model that answers (folder,
version, hash check, runtime, precision per graph), after them one names the image frame and window used
and the latency; with ``--json`` the same facts are the ``model`` and ``image`` fields.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from medlite.errors import DataError


def print_answers(questions: Sequence[str], answer: Callable, ctx, *, model: Optional[dict] = None,
                  image: Optional[dict] = None, stats: Optional[Callable[[], dict]] = None) -> list[dict]:
    """Answer each question in turn: the answer streams to stdout (one line each; with several
    questions the question comes first, ``Q: ...`` / ``A: ...``). With ``--json`` nothing streams and
    one JSON object ``{"answers": [{"question", "answer", "latency_s"}], "model": ..., "image": ...}`` is
    printed at the end.

    ``answer(question, on_text)`` returns the full answer and calls ``on_text(piece)`` as it goes.
    ``model`` / ``image`` (:func:`model_line` / :func:`image_line` facts) are named on stderr in text mode.
    ``stats()``, called after each answer, adds its fields to that answer's record (the ONNX runtime's
    ``prefill_tokens`` / ``cached_tokens``: the image line then names the prefill of each question).
    """
    many, out = len(questions) > 1, []

    def stream(piece: str) -> None:
        if not ctx.json_mode:
            sys.stdout.write(piece)
            sys.stdout.flush()

    if model is not None and not ctx.json_mode:   # named before any answer: an interrupted run still says it
        print(model_line(model), file=sys.stderr, flush=True)
    for q in questions:
        if many and not ctx.json_mode:
            sys.stdout.write(f"Q: {q}\nA: ")
        t0 = time.perf_counter()
        text = answer(q, stream)
        out.append({"question": q, "answer": text, "latency_s": round(time.perf_counter() - t0, 3)})
        if stats is not None:
            out[-1].update(stats())
        if not ctx.json_mode:
            sys.stdout.write("\n" if text else "(empty answer)\n")
            sys.stdout.flush()
    if ctx.json_mode:
        result: dict = {"answers": out}
        if model is not None:
            result["model"] = model
        if image is not None:
            result["image"] = image
        print(json.dumps(result, indent=1))
    elif image is not None:
        print(image_line(image, [a["latency_s"] for a in out], [a.get("prefill_tokens") for a in out]),
              file=sys.stderr, flush=True)
    return out


def model_line(m: dict) -> str:
    """``model: FOLDER · version V · hashes checked · ONNX Runtime (CPU) · vision int8 Q/DQ, ...`` (one line)."""
    parts = [f"model: {m['folder']}"]
    if m.get("version"):
        parts.append(f"version {m['version']}")
    parts.append(f"hashes {m['hash_check']}")
    parts.append(m["runtime"])
    prec = m.get("precision") or {}
    if prec:
        parts.append(", ".join(f"{g} {label}" for g, label in prec.items()))
    return " · ".join(parts)


def image_line(img: dict, latencies: Sequence[float], prefill: Sequence[Optional[int]] = ()) -> str:
    """``image: FILE · frame 5 of 10 (counting from 0) · window C40/W400 · latency 0.84 s``; with
    ``prefill`` (tokens each question prefilled) also ``· prefill 84, 7 tokens``."""
    parts = [f"image: {img['file']}"]
    if img.get("frames", 1) > 1:
        what = "slice" if img.get("kind") == "nifti" else "frame"
        parts.append(f"{what} {img['frame']} of {img['frames']} (counting from 0)")
    parts.append(f"window {img['window']}")
    parts.append("latency " + ", ".join(f"{s:.2f} s" for s in latencies))
    if prefill and all(n is not None for n in prefill):
        parts.append("prefill " + ", ".join(str(n) for n in prefill) + " tokens")
    return " · ".join(parts)


def load_ask_image(path, frame: Optional[int], ctx):
    """``(PIL RGB image, facts)`` for ``ask``: the file decoded as the runtime does (DICOM-aware), with the
    frame/slice and window that were used (``facts``: file, kind, frames, frame, window)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{p}: is a folder, not an image file" if p.is_dir() else f"{p}: image file not found")
    if frame is not None and frame < 0:
        raise DataError(f"--frame {frame}: frames count from 0 (the first frame is --frame 0)")
    try:
        from medlite.imaging.images import decode_image
    except ImportError:  # a runtime-only install without the imaging package
        from PIL import Image

        with Image.open(p) as im:
            return im.convert("RGB"), {"file": str(p), "kind": "raster", "frames": 1, "frame": 0,
                                      "window": "as stored (8-bit)"}
    d = decode_image(p, frame=frame)
    for w in d.warnings:
        ctx.warn(f"{p}: {w}")
    used = frame if frame is not None else (d.n_frames // 2 if d.kind in ("dicom", "nifti") else 0)
    window = [n for n in d.notes if not n.startswith(("frame ", "slice "))]
    return d.image, {"file": str(p), "kind": d.kind, "frames": int(d.n_frames), "frame": int(used),
                     "window": "; ".join(window) or "as stored (8-bit)"}


def _check_artifact(folder: Path, ctx) -> dict:
    """A built artifact (manifest, recipe, report) is hash-checked first, as every artifact load is; one
    whose manifest.json was deleted is refused as ``verify`` refuses it. A plain export has none: it runs
    with a loud "not hash-checked" warning (as ``serve`` gives). Returns the model facts known so far."""
    from medlite.artifacts import MANIFEST, RECIPE_FILE, ArtifactError, open_artifact

    if not (folder / MANIFEST).is_file():
        if (folder / RECIPE_FILE).is_file() or (folder / "report.md").is_file():
            raise ArtifactError(f"{folder}: {MANIFEST} is missing, so its files cannot be checked; this "
                                f"artifact is refused (as `medlite verify` refuses it): rebuild it")
        ctx.warn(f"{folder}: NOT HASH-CHECKED — an ONNX export, not a built artifact: no {MANIFEST}, so no "
                 "hashes checked and no accuracy gates; build a recipe for a checked artifact")
        return {"folder": str(folder), "version": None, "status": None,
                "hash_check": "skipped (no manifest.json: an ONNX export)"}
    # refuse changed files (ArtifactError names each), say when its gates failed
    artifact = open_artifact(folder)
    if artifact.status != "passed":
        ctx.warn(f"{artifact.path}: this artifact's status is {artifact.status!r} (its accuracy gates did not "
                 f"pass; see report.md) — answers may be wrong")
    return {"folder": str(artifact.path), "version": artifact.version, "status": artifact.status,
            "hash_check": f"checked ({len(artifact.manifest.get('files', {}))} files match {MANIFEST})"}


def _runtime_name(providers: dict) -> str:
    """``ONNX Runtime (CPU)``, or the provider of each graph when they differ."""
    short = {g: ",".join(p.replace("ExecutionProvider", "") for p in used) for g, used in providers.items()}
    kinds = sorted(set(short.values()))
    if len(kinds) <= 1:
        return f"ONNX Runtime ({kinds[0] if kinds else '?'})"
    return "ONNX Runtime (" + ", ".join(f"{g} {k}" for g, k in short.items()) + ")"


def cmd_ask_onnx(args, ctx) -> int:
    """Answer ``args.questions`` about ``args.image`` with the export in ``args.model``, streaming tokens.

    ``ask`` dispatches here when the folder holds ``medlite_runtime.json`` (or a manifest). The answers
    go to stdout (streamed); the model and image lines, provider fallbacks and image-loading warnings go
    to stderr.
    """
    from medlite.runtime.describe import graph_labels
    from medlite.runtime.vlm import OnnxVlm

    model = _check_artifact(Path(args.model), ctx)
    image, facts = load_ask_image(args.image, getattr(args, "frame", None), ctx)
    vlm = OnnxVlm.open(model["folder"], ctx=ctx)
    questions = getattr(args, "questions", None) or [args.question]
    if len(questions) > 1:     # follow-ups reuse the image's prompt-prefix KV cache (identical answers)
        from medlite.runtime.prefix_cache import PrefixCache

        vlm.prefix_cache = PrefixCache()
    providers = {g: list(p) for g, p in (getattr(vlm, "providers", {}) or {}).items()}
    model.update(runtime=_runtime_name(providers), providers=providers, precision=graph_labels(vlm.config))
    n = int(getattr(args, "max_new_tokens", 32))
    print_answers(questions, lambda q, on_text: vlm.answer(image, q, max_new_tokens=n, on_token=on_text), ctx,
                  model=model, image=facts, stats=lambda: {k: vlm.last_prefill[k] for k in
                                                           ("prefill_tokens", "cached_tokens")})
    return 0
