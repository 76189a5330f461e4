"""``medlite bundle --model ARTIFACT --out FILE.tar.gz``: one reproducible file to copy to the Jetson.

The archive holds one folder ``medlite-bundle-<model>-<recipe>-<version>/``::

    README.md              the device commands and the pinned pip packages
    medlite_device.py      python3 medlite_device.py {build,verify,ask,bench} [--standin]
    mldevice/              the engine runtime (TensorRT 8.5 / ONNX Runtime stand-in), verify, bench
    mlrt/                  medlite's torch-free ONNX Runtime path, copied at bundle time (device_vendor.py)
    reference/             reference.npz (host ONNX Runtime inputs/outputs), answers.json + images/
    bundle.json            sha256 of every file above, tolerances, pins
    artifact/              the artifact as built: graphs, embed_tokens.bin, tokenizer.json,
                           medlite_runtime.json, engines/ (build scripts), manifest.json;
                           artifact/device/ receives the engines built on the device

Reproducible: entries sorted, mtime 0, uid/gid 0, fixed modes, gzip header without time or name; the
references come from deterministic ONNX Runtime runs, so one artifact gives a byte-identical file.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

from medlite.errors import MedliteError

FORMAT = "medlite-device-bundle/1"
# Pinned for JetPack 5.1 (Python 3.8, aarch64): each has a cp38 manylinux2014_aarch64 wheel (or is pure
# Python), checked with `pip download --only-binary=:all: --python-version 3.8 --platform
# manylinux2014_aarch64 PKG==VER --no-deps` on 2026-12-07. onnxruntime 1.16.3 is the last such wheel
# (CPU only; ONNX Runtime with CUDA for sm_72 comes from a source build / Jetson Zoo wheel).
PINS = {"numpy": "1.24.4", "tokenizers": "0.20.3", "Pillow": "10.4.0", "onnxruntime": "1.16.3",
        "cuda-python": "11.8.1"}
OPTIONAL_PINS = {"pydicom": "2.4.4", "psutil": "5.9.8"}
# Imported names of those packages (what a .py file in the bundle may import besides the stdlib,
# its own modules and the JetPack-provided tensorrt).
IMPORT_NAMES = {"numpy": "numpy", "tokenizers": "tokenizers", "Pillow": "PIL", "onnxruntime": "onnxruntime",
                "cuda-python": "cuda", "pydicom": "pydicom", "psutil": "psutil"}


class BundleError(MedliteError):
    """The artifact cannot be bundled for the device (named in the message)."""


def add_bundle_args(p) -> None:
    """The ``bundle`` subcommand's options (argparse only; called by ``medlite.cli``)."""
    p.add_argument("--model", required=True, metavar="ARTIFACT",
                   help="a built Xavier artifact (with engines/), or OUT/<model>/<recipe> for its latest")
    p.add_argument("--out", required=True, metavar="FILE.tar.gz", help="the bundle to write")


def cmd_bundle(args, ctx) -> int:
    """``medlite bundle``: write the device bundle and say what is in it."""
    info = make_bundle(Path(args.model), Path(args.out), ctx=ctx)
    from medlite.units import human_bytes

    print(f"bundle      {info['out']}  ({human_bytes(info['bytes'])}, {info['files']} files, "
          f"sha256 {info['sha256'][:12]})")
    print(f"on the device: tar -xzf {Path(info['out']).name} && cd {info['folder']} && see README.md")
    return 0


def _open(model: Path):
    from medlite import artifacts as af

    artifact = af.open_artifact(model)          # hashes checked: a damaged artifact is never bundled
    path = artifact.path
    if not (path / "engines" / "engines.json").is_file():
        raise BundleError(f"{path}: no engines/engines.json — bundles are for Jetson targets (a recipe with an "
                          "engines stage, e.g. xavier-agx-fp16)")
    if not isinstance(artifact.manifest.get("device_files"), dict):
        raise BundleError(f"{path}: its manifest.json declares no device_files (built by an older medlite): "
                          "engines built on the device would make it fail verification; rebuild the artifact")
    return artifact


def _held_out(manifest: dict) -> list:
    from medlite.pipeline.references import select_samples
    from medlite.evaluation.vqa import load_dataset

    from medlite.engines.bundle_refs import N_QUESTIONS

    ev = manifest.get("evaluation") or {}
    spec = ev.get("dataset") if str(ev.get("dataset", "")).startswith("builtin:") else "builtin:micro-med-vqa"
    return select_samples(load_dataset(spec, split=ev.get("split") or "test"), N_QUESTIONS)


def _references(path: Path, manifest: dict, precision: str) -> tuple[dict, dict]:
    """``{bundle path: bytes}`` of reference/ and the bundle.json entries describing it."""
    from medlite.engines.bundle_refs import MAX_NEW_TOKENS, N_IMAGES, npz_bytes, reference_arrays
    from medlite.runtime.vlm import OnnxVlm
    from PIL import Image

    vlm = OnnxVlm.open(path, providers=["CPUExecutionProvider"], embed_source="table")
    samples = _held_out(manifest)
    files, questions, images = {}, [], {}
    for s in samples:
        if s.image_id not in images:
            buf = io.BytesIO()
            s.load_image().convert("RGB").save(buf, format="PNG")   # no time stamps in PNG chunks
            images[s.image_id] = f"reference/images/{len(images):02d}.png"
            files[images[s.image_id]] = buf.getvalue()
        img = Image.open(io.BytesIO(files[images[s.image_id]])).convert("RGB")
        questions.append({"qid": str(s.qid), "question": s.question, "image": images[s.image_id],
                          "host_answer": vlm.answer(img, s.question, max_new_tokens=MAX_NEW_TOKENS)})
    pngs = [Image.open(io.BytesIO(files[p])).convert("RGB") for p in sorted(set(images.values()))]
    while len(pngs) < N_IMAGES:
        pngs.append(pngs[len(pngs) % max(1, len(set(images.values())))])
    arrays = reference_arrays(vlm, pngs[:N_IMAGES], questions[0]["question"])
    files["reference/reference.npz"] = npz_bytes(arrays)
    answers = {"max_new_tokens": MAX_NEW_TOKENS, "questions": questions,
               "source": "host ONNX Runtime (CPU) answers of the artifact's graphs, as `medlite ask` gives them"}
    files["reference/answers.json"] = (json.dumps(answers, indent=1, sort_keys=True) + "\n").encode()
    return files, {"reference": {"file": "reference/reference.npz", "images": N_IMAGES,
                                 "decode_steps": int(len(arrays["decode_ids"])), "precision": precision},
                   "answers": {"file": "reference/answers.json", "questions": len(questions)}}


def bundle_files(model: Path, *, ctx=None) -> tuple[str, dict]:
    """``(folder name, {relative path: bytes | Path})`` of everything the bundle holds, sorted."""
    from medlite import artifacts as af
    from medlite.engines.bundle_readme import readme
    from medlite.engines.bundle_refs import TOLERANCES
    from medlite.engines.device_vendor import runtime_files

    artifact = _open(model)
    path, m = artifact.path, artifact.manifest
    spec = json.loads((path / "engines" / "engines.json").read_text(encoding="utf-8"))
    precision = spec["precision"]
    folder = "medlite-bundle-" + "-".join([af.safe_name(m.get("model", "model")),
                                           af.safe_name((m.get("recipe") or {}).get("name", "recipe")),
                                           artifact.version])
    files: dict = {f"artifact/{rel}": path / rel for rel in sorted(m["files"])}
    files["artifact/manifest.json"] = path / af.MANIFEST
    files.update({rel: text.encode("utf-8") for rel, text in runtime_files().items()})
    refs, ref_info = _references(path, m, precision)
    files.update(refs)
    first = json.loads(refs["reference/answers.json"])["questions"][0]
    files["README.md"] = readme(folder, m, spec, first, PINS, OPTIONAL_PINS).encode("utf-8")
    own = {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items() if isinstance(data, bytes)}
    bundle = {"format": FORMAT, "artifact": {"model": m.get("model"), "recipe": (m.get("recipe") or {}).get("name"),
                                             "version": artifact.version, "target": spec.get("target")},
              "precision": precision, "tolerances": TOLERANCES[precision], "files": dict(sorted(own.items())),
              "pip": PINS, "pip_optional": OPTIONAL_PINS, "python": "3.8", "tensorrt": spec.get("tensorrt"),
              **ref_info}
    files["bundle.json"] = (json.dumps(bundle, indent=1, sort_keys=True) + "\n").encode("utf-8")
    return folder, dict(sorted(files.items()))


def _mode(rel: str) -> int:
    return 0o755 if rel.endswith((".sh", "medlite_device.py")) else 0o644


def write_tar(out: Path, folder: str, files: dict) -> None:
    """A reproducible ``.tar.gz``: sorted entries (folders first), mtime 0, owner 0, fixed modes, bare gzip header."""
    dirs = sorted({f"{folder}/{'/'.join(rel.split('/')[:i])}" for rel in files for i in range(1, rel.count("/") + 1)}
                  | {folder})
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for d in dirs:
                ti = tarfile.TarInfo(d)
                ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 0
                tar.addfile(ti)
            for rel, data in files.items():
                ti = tarfile.TarInfo(f"{folder}/{rel}")
                ti.mode, ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = _mode(rel), 0, 0, 0, "", ""
                if isinstance(data, bytes):
                    ti.size = len(data)
                    tar.addfile(ti, io.BytesIO(data))
                else:
                    ti.size = data.stat().st_size
                    with open(data, "rb") as f:
                        tar.addfile(ti, f)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def make_bundle(model: Path, out: Path, *, ctx=None) -> dict:
    """Write the bundle of the artifact ``model`` to ``out``; returns what was written."""
    from medlite.fileio import ensure_writable_file, sha256_file

    out = Path(out)
    if out.is_dir():
        raise BundleError(f"--out {out}: is a folder; name the .tar.gz file to write")
    if not out.name.endswith((".tar.gz", ".tgz")):
        raise BundleError(f"--out {out}: name it FILE.tar.gz")
    ensure_writable_file(out, "--out")
    folder, files = bundle_files(Path(model), ctx=ctx)
    write_tar(out, folder, files)
    return {"out": str(out), "folder": folder, "files": len(files), "bytes": out.stat().st_size,
            "sha256": sha256_file(out)}
