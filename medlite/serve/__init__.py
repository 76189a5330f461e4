"""``medlite serve``: a local web page to ask an artifact about a scan (torch-free).

Starlette + uvicorn (the ``serve`` extra) with one static page and server-sent events; see
docs/serve.md. Nothing here imports torch; the web framework is imported only by
:mod:`medlite.serve.app`, so ``import medlite.serve`` is free.
"""
from __future__ import annotations


def create_app(*args, **kwargs):
    """:func:`medlite.serve.app.create_app` (imported on first use: it needs the serve extra)."""
    from medlite.serve.app import create_app as _create_app

    return _create_app(*args, **kwargs)


__all__ = ["create_app"]
