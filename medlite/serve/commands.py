"""``medlite serve ARTIFACT``: a local web page to ask the artifact about a scan (torch-free).

The artifact is hash-checked before anything is served (as ``medlite ask`` does), then opened with
the ONNX Runtime runtime and served by uvicorn on 127.0.0.1. Another interface needs
``--allow-remote`` and gets a loud warning: there is no authentication and no TLS.
"""
from __future__ import annotations

import ipaddress
import logging
import socket
import sys
from pathlib import Path

from medlite.errors import MedliteError

DEFAULT_PORT = 8765
LOOPBACK_HOSTS = ["127.0.0.1", "localhost"]


def add_serve_args(p) -> None:
    """The ``serve`` subcommand's options (called by ``medlite.cli``)."""
    p.add_argument("artifact", nargs="?", default=None,
                   help="artifact folder, or OUT/<model>/<recipe> for its latest version (same as --model)")
    p.add_argument("--model", default=None, metavar="ARTIFACT", help="artifact folder (or an ONNX export folder)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a --host other than loopback (no authentication, no TLS: a trusted network only)")
    p.add_argument("--max-upload-mb", type=float, default=64.0, help="largest accepted file (default 64 MB)")
    p.add_argument("--max-pixels", type=int, default=25_000_000, help="largest image / frame (default 25 M pixels)")
    p.add_argument("--max-queue", type=int, default=4,
                   help="requests that may wait for the model (default 4; at least 1)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="answer length limit (default 32, as ask)")
    p.add_argument("--prefix-cache-mb", type=float, default=512.0,
                   help="memory for follow-up questions: each session's image + prompt-prefix KV cache, all "
                        "sessions together, least recently used dropped first (default 512 MB; 0 keeps none)")
    p.add_argument("--standin", action="store_true",
                   help="an extracted device bundle: its graphs on ONNX Runtime behind the engine interface "
                        "instead of TensorRT engines")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _open(path_arg: str, ctx, *, standin: bool = False):
    """(artifact or None, folder, OnnxVlm): hash-checked like ``medlite ask``; an extracted device bundle
    runs through its own engine runtime (``--standin``: its graphs on ONNX Runtime behind the engines)."""
    from medlite.artifacts import LATEST, MANIFEST, open_artifact, resolve_artifact_path
    from medlite.engines.bundle_host import ARTIFACT_DIR, is_bundle, open_bundle_vlm
    from medlite.runtime import OnnxVlm

    given = Path(path_arg)
    if given.name == LATEST and given.is_file():   # OUT/<model>/<recipe>/latest names the newest passing version
        given = given.parent
    folder = resolve_artifact_path(given)
    if is_bundle(folder):
        vlm = open_bundle_vlm(folder, standin=standin, ctx=ctx)
        return open_artifact(folder / ARTIFACT_DIR), folder / ARTIFACT_DIR, vlm
    artifact = None
    if (folder / MANIFEST).is_file():
        artifact = open_artifact(folder)   # ArtifactError names every changed, missing or extra file
        folder = artifact.path
        if artifact.status != "passed":
            ctx.warn(f"{folder}: this artifact's status is {artifact.status!r} (its accuracy gates did not pass; "
                     "see report.md) — answers may be wrong; the page says so")
    elif (folder / "medlite_runtime.json").is_file():
        ctx.warn(f"{folder}: an ONNX export, not a built artifact: no manifest, so no hashes checked and no gates")
    else:
        raise MedliteError(f"{folder}: not a medlite artifact (no manifest.json) nor an ONNX export "
                           "(no medlite_runtime.json); build one with: medlite build RECIPE --out DIR")
    return artifact, folder, OnnxVlm.open(folder, ctx=ctx)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise MedliteError(f"cannot listen on {host}:{port}: {e.strerror or e} (try --port 0 for a free port)") from None
    sock.listen(128)
    return sock


def _check_numbers(args) -> None:
    """Every numeric option, before anything is opened (a bad --port would otherwise surface as a traceback
    from the socket layer after the artifact was hash-checked)."""
    if not 0 <= args.port <= 65535:
        raise MedliteError(f"--port {args.port} is not a TCP port: use 1-65535, or 0 for a free one")
    for name in ("max_upload_mb", "max_pixels", "max_queue", "max_new_tokens"):
        if getattr(args, name) <= 0:
            raise MedliteError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    cache_mb = getattr(args, "prefix_cache_mb", 0.0)
    if not cache_mb >= 0:     # also NaN
        raise MedliteError(f"--prefix-cache-mb must be 0 (keep none) or more, got {cache_mb}")


def _limits(args):
    from medlite.serve.uploads import ServeLimits

    return ServeLimits(max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), max_pixels=args.max_pixels,
                       max_queue=args.max_queue, max_new_tokens=args.max_new_tokens,
                       prefix_cache_bytes=int(getattr(args, "prefix_cache_mb", 512.0) * 1000 ** 2))


def cmd_serve(args, ctx) -> int:
    """Check the artifact, open it, and serve the page until Ctrl-C."""
    path = args.artifact or args.model
    if args.artifact and args.model and Path(args.artifact) != Path(args.model):
        raise MedliteError(f"two artifacts given ({args.artifact} and --model {args.model}); name one")
    if not path:
        raise MedliteError("name the artifact to serve: medlite serve --model artifacts/<model>/<recipe>/latest")
    _check_numbers(args)
    remote = not _is_loopback(args.host)
    if remote and not args.allow_remote:
        raise MedliteError(f"--host {args.host} exposes patient images to the network; add --allow-remote to do it "
                           "on purpose (no authentication, no TLS)")
    try:
        import importlib.util

        if not (importlib.util.find_spec("python_multipart") or importlib.util.find_spec("multipart")):
            raise ImportError(name="python-multipart")   # Starlette's form parser needs it
        import uvicorn

        from medlite.serve.app import create_app
    except ImportError as e:
        raise MedliteError(f"medlite serve needs the serve extra ({e.name} is missing): "
                           "pip install 'medlite[serve]'") from None
    limits = _limits(args)
    artifact, folder, vlm = _open(path, ctx, standin=bool(getattr(args, "standin", False)))
    if remote:
        ctx.warn(f"serving on {args.host}: ANYONE who can reach this machine can upload scans and read answers; "
                 "there is no authentication and no TLS (images travel unencrypted). Use a trusted network only.")
    sock = _bind(args.host, args.port)
    port = sock.getsockname()[1]
    app = create_app(vlm, artifact=artifact, folder=folder, limits=limits,
                     allowed_hosts=None if remote else LOOPBACK_HOSTS)
    _log_to_stderr(ctx)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"medlite serve: http://{shown}:{port}/  ({_served(artifact, folder, vlm)}; Ctrl-C stops)", flush=True)
    config = uvicorn.Config(app, log_level="warning" if ctx.quiet else "info", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def _served(artifact, folder: Path, vlm) -> str:
    """What the start-up line names: the artifact's model, recipe and version (its folder name may be
    anything, e.g. ``latest``'s target or a copy) and the precision each graph runs in."""
    from medlite.runtime.describe import precision_summary

    if artifact is None:
        what = f"ONNX export {folder.name}, no version"
    else:
        m = artifact.manifest
        recipe = (m.get("recipe") or {}).get("name")
        what = " · ".join(str(x) for x in (m.get("model"), recipe) if x) + f" version {artifact.version}"
    return f"{what}, {precision_summary(vlm.config)}"


def _log_to_stderr(ctx) -> None:
    """Request timings (never file names or DICOM tags) on stderr, like uvicorn's access log."""
    logger = logging.getLogger("medlite.serve")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s:     medlite.serve: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING if ctx.quiet else logging.INFO)
