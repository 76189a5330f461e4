#!/usr/bin/env python3
"""medlite on the Jetson: ``python3 medlite_device.py {build,verify,ask,bench}`` (see README.md).

Needs what JetPack 5.1 ships (Python 3.8, the tensorrt 8.5.2 bindings, CUDA) and the pip packages
pinned in README.md; never torch, never medlite. ``--standin`` runs the same graphs on ONNX Runtime
behind the engine interface (profiles enforced), so every command can be dry-run without a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

ARTIFACT = ROOT / "artifact"


def _vlm(args):
    from mldevice.runtime import open_device_vlm

    return open_device_vlm(ARTIFACT, standin=args.standin)


def cmd_build(args) -> int:
    """Build the engines on the device into artifact/device/ (the manifest's declared device folder)."""
    script = ARTIFACT / "engines" / "build_engines.sh"
    env = dict(os.environ)
    if args.force:
        env["FORCE"] = "1"
    cmd = ["bash", str(script)] + (["trtexec"] if args.trtexec else [])
    return subprocess.run(cmd, env=env).returncode


def cmd_verify(args) -> int:
    from mldevice.verify import run_verify

    return run_verify(ROOT, lambda: _vlm(args), standin=args.standin)


def _image(args):
    from mlrt.imaging import load_image

    if args.image:
        return load_image(args.image)
    refs = json.loads((ROOT / "reference" / "answers.json").read_text(encoding="utf-8"))
    return load_image(ROOT / refs["questions"][0]["image"])


def cmd_ask(args) -> int:
    image = _image(args)             # a bad image path fails before the engines load
    vlm = _vlm(args)
    for part, what in sorted(vlm.runs.items()):
        print(f"{part}: {what}", file=sys.stderr)
    for q in args.question:
        if len(args.question) > 1:
            sys.stdout.write(f"Q: {q}\nA: ")

        def stream(piece):
            sys.stdout.write(piece)
            sys.stdout.flush()

        text = vlm.answer(image, q, max_new_tokens=args.max_new_tokens, on_token=stream)
        sys.stdout.write("\n" if text else "(empty answer)\n")
    return 0


def cmd_bench(args) -> int:
    from mldevice.bench import run_bench

    return run_bench(ROOT, _vlm(args), _image(args), args)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="medlite_device.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="build the TensorRT engines (on the Jetson)")
    p.add_argument("--force", action="store_true", help="build even off a Jetson / with another TensorRT (FORCE=1)")
    p.add_argument("--trtexec", action="store_true", help="use trtexec (one decoder profile) instead of the Python API")
    for name, text in (("verify", "check files, engine outputs and held-out answers"),
                       ("ask", "answer questions about an image"), ("bench", "latency, tokens/s, power, memory")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--standin", action="store_true",
                       help="ONNX Runtime sessions of the same graphs instead of TensorRT engines (no GPU needed)")
        if name in ("ask", "bench"):
            p.add_argument("--image", default=None, help="image file (default: the bundle's first reference image)")
            p.add_argument("--max-new-tokens", type=int, default=32)
        if name == "ask":
            p.add_argument("question", nargs="+")
        if name == "bench":
            p.add_argument("--question", default="Is there an abnormality?")
            p.add_argument("--runs", type=int, default=3)
            p.add_argument("--no-write", action="store_true", help="do not write artifact/device/bench.json")
    args = ap.parse_args(argv)
    handler = {"build": cmd_build, "verify": cmd_verify, "ask": cmd_ask, "bench": cmd_bench}[args.command]
    try:
        return handler(args)
    except (ValueError, OSError) as e:   # ProfileError, config errors, a missing image: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:           # noqa: BLE001 - the copied medlite errors (DataError) end here too
        if type(e).__name__ in ("DataError", "MedliteError"):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
