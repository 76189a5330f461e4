"""One model, one worker thread, a bounded queue.

The runtime answers one question at a time (ONNX Runtime already uses every core for one request,
and a Jetson has one GPU), so requests are admitted up to ``max_queue`` waiting behind the one
being answered; beyond that :meth:`ModelWorker.admit` raises :class:`QueueFull` and the server
answers HTTP 503 with ``Retry-After``. Each admitted request gets a :class:`Ticket`, released
exactly once, whatever happens to the request.
"""
from __future__ import annotations

import inspect
import logging
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from medlite.errors import MedliteError

log = logging.getLogger("medlite.serve")


class QueueFull(Exception):
    """Every slot is taken; ``retry_after`` is a whole-second estimate of when one frees up."""

    def __init__(self, retry_after: int):
        super().__init__(f"the model is busy; retry in {retry_after} s")
        self.retry_after = retry_after


class _Cancelled(Exception):
    """Raised inside generation when the client went away."""


class Ticket:
    """One admitted request's slot; :meth:`release` is idempotent."""

    def __init__(self, worker: "ModelWorker", position: int):
        self._worker, self.position, self._released = worker, position, False
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._worker._release()


@dataclass
class Job:
    """A question about a decoded image; ``emit(event, data)`` is called from the worker thread."""

    image: Any
    question: str
    emit: Callable[[str, dict], None]
    ticket: Ticket
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.perf_counter)
    session: Optional[str] = None     # the client's session: its follow-ups reuse the image's prefix cache


def count_tokens(vlm, text: str) -> Optional[int]:
    """Tokens in an answer: the text re-tokenized (the runtime's decoding loop is not instrumented;
    tests/serve compares it with the ids the runtime generates). None without a tokenizer."""
    tok = getattr(vlm, "tokenizer", None)
    if tok is None or not text:
        return 0 if tok is not None else None
    return len(tok.encode(text, add_special_tokens=False).ids)


def _takes_session(vlm) -> bool:
    """Whether the runtime's ``answer`` takes ``session`` (medlite's OnnxVlm; not every runtime does)."""
    return "session" in inspect.signature(vlm.answer).parameters


def _stream_keyword(vlm) -> str:
    """The runtime's streaming callback keyword: ``on_token`` (``on_text`` in a runtime that names it so)."""
    params = inspect.signature(vlm.answer).parameters
    return "on_text" if "on_text" in params else "on_token"


class ModelWorker:
    """Runs :class:`Job` s one at a time on ``vlm`` (an ``OnnxVlm`` or anything with its ``answer``)."""

    def __init__(self, vlm, *, max_queue: int = 4, max_new_tokens: int = 32):
        self.vlm, self.max_new_tokens = vlm, int(max_new_tokens)
        self.capacity = int(max_queue) + 1
        self._admitted = 0
        self._lock = threading.Lock()
        self._jobs: "queue.Queue[Optional[Job]]" = queue.Queue()   # bounded by admission
        self._recent: deque = deque(maxlen=8)                       # seconds per answer
        self._stream_kw = _stream_keyword(vlm)
        self._session_kw = _takes_session(vlm)
        self._thread = threading.Thread(target=self._loop, name="medlite-serve-model", daemon=True)
        self._thread.start()

    # -- admission ------------------------------------------------------------------------
    def admit(self) -> Ticket:
        """A slot for one request, or :class:`QueueFull`."""
        with self._lock:
            if self._admitted >= self.capacity:
                raise QueueFull(self._retry_after())
            self._admitted += 1
            return Ticket(self, self._admitted - 1)

    def _release(self) -> None:
        with self._lock:
            self._admitted -= 1

    def _retry_after(self) -> int:
        per = sum(self._recent) / len(self._recent) if self._recent else 2.0
        return max(1, math.ceil(per * self.capacity))

    @property
    def busy(self) -> int:
        """Requests admitted now (being answered or waiting)."""
        with self._lock:
            return self._admitted

    def submit(self, job: Job) -> None:
        """Queue an admitted job (its ticket is released by the worker after it ran)."""
        self._jobs.put(job)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker thread after the job it is running."""
        self._jobs.put(None)
        self._thread.join(timeout)

    # -- the worker thread ----------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                if not job.cancelled.is_set():
                    self._run(job)
            finally:
                job.ticket.release()

    def _run(self, job: Job) -> None:
        waited = time.perf_counter() - job.queued_at
        job.emit("start", {"waited_s": round(waited, 3)})
        t0 = time.perf_counter()
        first: list[float] = []

        def on_text(piece: str) -> None:
            if job.cancelled.is_set():
                raise _Cancelled()
            if not first:
                first.append(time.perf_counter() - t0)
            job.emit("token", {"text": piece})

        extra = {"session": job.session} if self._session_kw else {}
        try:
            answer = self.vlm.answer(job.image, job.question, max_new_tokens=self.max_new_tokens,
                                     **{self._stream_kw: on_text}, **extra)
        except _Cancelled:
            log.info("request cancelled by the client after %.2f s", time.perf_counter() - t0)
            return
        except MedliteError as e:
            job.emit("error", {"message": str(e)})
            return
        except Exception as e:  # keep serving; the message names the type only (no data in logs)
            log.exception("generation failed")
            job.emit("error", {"message": f"the model failed on this request ({type(e).__name__}); see the server log"})
            return
        seconds = time.perf_counter() - t0
        self._recent.append(seconds)
        stats = self._stats(answer, seconds, first[0] if first else None, waited)
        prefill = getattr(self.vlm, "last_prefill", None)
        if isinstance(prefill, dict) and "prefill_tokens" in prefill:   # what this answer prefilled
            stats.update(prefill_tokens=prefill["prefill_tokens"], cached_tokens=prefill.get("cached_tokens", 0))
        job.emit("done", stats)

    def _stats(self, answer: str, seconds: float, first_s: Optional[float], waited: float) -> dict:
        tokens = count_tokens(self.vlm, answer)
        log.info("answered in %.3f s (%s tokens, waited %.3f s)", seconds, tokens, waited)
        return {"answer": answer, "latency_s": round(seconds, 4), "first_text_s": None if first_s is None
                else round(first_s, 4), "tokens": tokens, "waited_s": round(waited, 4),
                "tokens_per_s": round(tokens / seconds, 2) if tokens and seconds > 0 else None}
