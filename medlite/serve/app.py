"""The Starlette app of ``medlite serve``: one static page and three JSON/SSE endpoints.

* ``GET /`` — the page (``static/index.html`` + ``app.js`` + ``style.css``, no build step, no CDN);
* ``GET /api/info`` — artifact, version, precision, gate results, providers, limits;
* ``POST /api/preview`` — multipart ``file`` (+ ``frame``, ``window``): the image as the model sees it;
* ``POST /api/ask`` — the same fields + ``question``: ``text/event-stream`` of ``queued``, ``start``,
  ``token`` (``{"text": piece}``), then ``done`` (answer, latency, tokens, tokens/s, prefill_tokens) or
  ``error``. HTTP 503 with ``Retry-After`` when the bounded queue is full.

Follow-up questions: each browser session (cookie ``medlite_session``, set on its first ask) keeps the
KV cache of its image's prompt prefix, so a second question on the same scan prefills only its own
tokens; all sessions together hold at most ``ServeLimits.prefix_cache_bytes`` (least recently used
dropped first), and a session that sends another image drops its old one (medlite/runtime/prefix_cache.py).

Uploads are read into memory (size-checked while they arrive), decoded in a private temporary
folder that is deleted before the response starts, and never logged by name or content.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import threading
import time
from pathlib import Path
from typing import Optional

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from medlite.serve.info import serve_info
from medlite.serve.uploads import (ServeLimits, UploadError, decode_upload, display_name, model_view,
                                   parse_frame, parse_window, png_data_url)
from medlite.serve.worker import Job, ModelWorker, QueueFull

STATIC = Path(__file__).with_name("static")
log = logging.getLogger("medlite.serve")
_FORM_OVERHEAD = 64 * 1024     # multipart framing + the small text fields
_PREVIEW_SLOTS = 2             # previews decoded at once
SESSION_COOKIE = "medlite_session"
_SESSION_ID = re.compile(r"[0-9a-f]{32}")
_PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'",
                 "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


def _error(e: UploadError) -> JSONResponse:
    return JSONResponse({"error": str(e)}, status_code=e.status)


def _busy(retry_after: int) -> JSONResponse:
    return JSONResponse({"error": f"the server is busy; retry in {retry_after} s", "retry_after": retry_after},
                        status_code=503, headers={"Retry-After": str(retry_after)})


async def read_form(request, limits: ServeLimits):
    """The multipart form, read into memory with the upload limit enforced while it arrives."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise UploadError("send the scan as multipart/form-data (field 'file')", status=415)
    budget = limits.max_upload_bytes + _FORM_OVERHEAD
    too_big = UploadError(f"the upload is larger than this server accepts ({limits.max_upload_bytes:,} bytes; "
                          "medlite serve --max-upload-mb)", status=413)
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > budget:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > budget:
            raise too_big

    async def whole():
        yield bytes(body)

    # Starlette spools file parts above 1 MB to an unnamed temporary file; keep them in memory instead.
    parser = type("_InMemoryParser", (MultiPartParser,), {"spool_max_size": budget + 1})(
        request.headers, whole(), max_files=1, max_fields=8, max_part_size=_FORM_OVERHEAD)
    try:
        return await parser.parse()
    except MultiPartException as e:
        if str(e).startswith("Part exceeded"):   # a text field (not the file) over max_part_size
            raise _field_too_big(getattr(getattr(parser, "_current_part", None), "field_name", None),
                                 limits) from None
        raise UploadError(f"malformed upload: {e}") from None


def _field_too_big(name: Optional[str], limits: ServeLimits) -> UploadError:
    """Starlette says "Part exceeded maximum size of 64KB"; say which field and what the limit is for it."""
    if name == "question":
        return UploadError(f"the question is longer than this server reads ({_FORM_OVERHEAD:,} bytes); "
                           f"a question may have at most {limits.max_question_chars} characters", status=413)
    return UploadError(f"form field {name!r} is larger than {_FORM_OVERHEAD:,} bytes (the scan goes in "
                       "field 'file'; 'question', 'frame' and 'window' are short text)", status=413)


async def _decode_form(form, limits: ServeLimits, tmp_root: Optional[Path]):
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise UploadError("no file in the upload (form field 'file')")
    data = await upload.read()
    await upload.close()
    frame, window = parse_frame(form.get("frame")), parse_window(form.get("window"))
    t0 = time.perf_counter()
    decoded = await run_in_threadpool(decode_upload, data, upload.filename, frame=frame, window=window,
                                      limits=limits, tmp_root=tmp_root)
    log.info("decoded a %s upload (%d bytes) in %.3f s", decoded.kind, len(data), time.perf_counter() - t0)
    return decoded, display_name(upload.filename)


def _question(form, limits: ServeLimits) -> str:
    q = str(form.get("question") or "").strip()
    if not q:
        raise UploadError("ask a question about the image")
    if len(q) > limits.max_question_chars:
        raise UploadError(f"the question has {len(q)} characters; at most {limits.max_question_chars}")
    return q


def session_id(request) -> tuple[str, bool]:
    """``(id, new)``: the client's session cookie, or a fresh random id when it sent none (or a malformed one)."""
    sid = request.cookies.get(SESSION_COOKIE, "")
    if _SESSION_ID.fullmatch(sid):
        return sid, False
    return secrets.token_hex(16), True


def enable_prefix_cache(vlm, max_bytes: int):
    """Give medlite's own ONNX Runtime VLM a bounded prefix cache (None: off, or a runtime without one,
    e.g. a device bundle's engines, whose KV cache stays on the device)."""
    from medlite.runtime.prefix_cache import PrefixCache
    from medlite.runtime.vlm import OnnxVlm

    if max_bytes <= 0 or not isinstance(vlm, OnnxVlm):
        return None
    vlm.prefix_cache = PrefixCache(max_bytes)
    return vlm.prefix_cache


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _stream(job: Job, events: asyncio.Queue):
    """SSE events of one job; leaving early (client gone) cancels it."""
    try:
        yield _sse("queued", {"position": job.ticket.position})
        while True:
            event, data = await events.get()
            yield _sse(event, data)
            if event in ("done", "error"):
                return
    finally:
        job.cancelled.set()


class _Api:
    """The request handlers, sharing one worker, one page description and the limits."""

    def __init__(self, worker: ModelWorker, info: dict, spec, limits: ServeLimits, tmp_root: Optional[Path]):
        self.worker, self.info, self.spec, self.limits, self.tmp_root = worker, info, spec, limits, tmp_root
        # Previews do not queue for the model, but each holds an upload and its decoded pixels:
        # bound them too (asks are bounded by the worker's admission).
        self.previews = threading.BoundedSemaphore(_PREVIEW_SLOTS)

    async def index(self, request):
        return FileResponse(STATIC / "index.html", headers=_PAGE_HEADERS)

    async def api_info(self, request):
        return JSONResponse(self.info)

    async def preview(self, request):
        if not self.previews.acquire(blocking=False):
            return _busy(1)
        try:
            decoded, name = await _decode_form(await read_form(request, self.limits), self.limits, self.tmp_root)
        except UploadError as e:
            return _error(e)
        finally:
            self.previews.release()

        def images() -> tuple[str, str]:
            return png_data_url(model_view(decoded.image, self.spec)), png_data_url(decoded.image, max_side=768)

        seen, windowed = await run_in_threadpool(images)
        w, h = decoded.image.size
        return JSONResponse({"name": name, "kind": decoded.kind, "modality": decoded.modality,
                             "n_frames": decoded.n_frames, "frame": decoded.frame, "width": w, "height": h,
                             "notes": list(decoded.notes), "warnings": list(decoded.warnings),
                             "model_view": seen, "model_size": self.spec.size, "windowed": windowed})

    async def ask(self, request):
        try:
            ticket = self.worker.admit()
        except QueueFull as e:
            return _busy(e.retry_after)
        try:
            form = await read_form(request, self.limits)
            question = _question(form, self.limits)
            decoded, _ = await _decode_form(form, self.limits, self.tmp_root)
        except UploadError as e:
            ticket.release()
            return _error(e)
        except BaseException:
            ticket.release()
            raise
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event: str, data: dict) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, (event, data))
            except RuntimeError:   # the event loop is gone (server shutting down)
                pass

        sid, new = session_id(request)
        job = Job(decoded.image, question, emit, ticket, session=sid)
        self.worker.submit(job)   # the worker owns the ticket from here on
        response = StreamingResponse(_stream(job, events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
        if new:
            response.set_cookie(SESSION_COOKIE, sid, httponly=True, samesite="strict")
        return response


def create_app(vlm, *, artifact=None, folder: Optional[Path] = None, limits: ServeLimits = ServeLimits(),
               tmp_root: Optional[Path] = None, allowed_hosts: Optional[list[str]] = None) -> Starlette:
    """The ASGI app serving ``vlm`` (an opened ``OnnxVlm``).

    ``artifact``: the hash-checked :class:`medlite.artifacts.Artifact` (its manifest feeds the page);
    ``tmp_root``: parent of the private per-upload folders (default: the system temp dir);
    ``allowed_hosts``: Host headers accepted (``["127.0.0.1", "localhost"]`` on loopback guards
    against DNS rebinding; None accepts any). ``app.state.worker`` is the model's queue.
    """
    enable_prefix_cache(vlm, limits.prefix_cache_bytes)
    worker = ModelWorker(vlm, max_queue=limits.max_queue, max_new_tokens=limits.max_new_tokens)
    api = _Api(worker, serve_info(vlm, artifact, folder=folder, limits=limits), vlm.config.image_spec, limits,
               tmp_root)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(worker.close)

    routes = [Route("/", api.index), Route("/api/info", api.api_info),
              Route("/api/preview", api.preview, methods=["POST"]), Route("/api/ask", api.ask, methods=["POST"]),
              Mount("/static", StaticFiles(directory=STATIC), name="static")]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)] if allowed_hosts else []
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
    app.state.worker = worker
    return app
