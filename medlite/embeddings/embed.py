"""``medlite embed``: one pooled vector per image, written with the model identity and preprocessing.

Images come from files, folders (recursive) or globs through :func:`medlite.imaging.images.load_images`
(DICOM / NIfTI / PNG / JPEG / TIFF; a multi-frame file gives its middle frame). Each image's stored
name is its path relative to the folder (or glob base) it was found under — a file given directly is
stored by its name — and is what ``labels.csv`` matches.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medlite.embeddings import POOLS, SOURCES
from medlite.embeddings.pooling import pool_tokens
from medlite.embeddings.store import EmbeddingSet, check_writable_format, write_embeddings
from medlite.errors import DataError

LOADER_NOTE = ("medlite.imaging.images.load_image: 8-bit RGB; DICOM window from the file (else a 0.5-99.5 "
               "percentile window); the middle frame of multi-frame files / middle slice of NIfTI volumes")


@dataclass
class EmbedResult:
    """What ``medlite embed`` reports at the end."""

    out: str
    images: int
    skipped: int
    dim: int
    source: str
    pool: str
    load_s: float
    embed_s: float
    images_per_s: float
    peak_rss_bytes: int
    model: dict
    runtime: dict

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def collect_images(items: list[str], ctx, *, skip_bad: bool = False) -> tuple[list, int]:
    """MedImages for every file/folder/glob in ``items``, named relative to the folder (or glob base)
    each was found under. A file whose header cannot be read is a one-line error naming it, or with
    ``skip_bad`` a warning (counted); two images with the same stored name are an error."""
    from dataclasses import replace

    from medlite.imaging.images import _expand, load_images   # _expand: the same file listing as load_images

    images, seen, skipped = [], {}, 0
    for item in items:
        files, base = _expand(str(item))
        if not files:
            raise DataError(f"{item}: no image files found")
        for f in files:
            try:
                (im,) = load_images(f, ctx=ctx)
            except DataError as e:
                if not skip_bad:
                    raise DataError(f"{e} (--skip-bad leaves unreadable images out)") from None
                ctx.warn(f"{f}: left out, cannot read it ({e})")
                skipped += 1
                continue
            im = replace(im, image_id=f.relative_to(base).as_posix() if f.is_relative_to(base) else f.as_posix())
            if im.image_id in seen:
                raise DataError(f"two images would be stored as {im.image_id!r} ({seen[im.image_id]} and "
                                f"{im.source}); give their common folder instead so names stay unique")
            seen[im.image_id] = im.source
            images.append(im)
    if not images:
        raise DataError("no image could be read; nothing written")
    return images, skipped


def validate_args(args) -> None:
    """Option errors before anything loads."""
    from medlite.fileio import ensure_writable_file

    if args.pool not in POOLS:
        raise DataError(f"--pool {args.pool!r}: use one of {', '.join(POOLS)}")
    if args.source not in SOURCES:
        raise DataError(f"--from {args.source!r}: use one of {', '.join(SOURCES)}")
    if args.batch_size < 1:
        raise DataError(f"--batch-size must be at least 1, got {args.batch_size}")
    check_writable_format(args.out)
    ensure_writable_file(args.out, "--out")


def _decoded(images: list, skip_bad: bool, ctx) -> tuple[list, list]:
    """(MedImages, PIL images) of the ones that decode; an unreadable one is a one-line error naming
    it, or with ``--skip-bad`` a warning and left out."""
    kept, pil = [], []
    for im in images:
        try:
            pil.append(im.load())
        except (DataError, OSError, ValueError) as e:
            if not skip_bad:
                msg = str(e) if isinstance(e, DataError) else f"{im.source}: cannot decode ({e})"
                raise DataError(f"{msg} (--skip-bad leaves unreadable images out)") from None
            ctx.warn(f"{im.source}: left out, cannot decode it ({e})")
            continue
        kept.append(im)
    return kept, pil


def _encode_all(encoder, images: list, args, ctx) -> tuple[np.ndarray, list]:
    """Pooled vectors ``[N, D]`` and the images they belong to, batch by batch, with a progress bar."""
    out, kept = [], []
    with ctx.progress("embed", total=len(images)) as advance:
        for i in range(0, len(images), args.batch_size):
            chunk, pil = _decoded(images[i:i + args.batch_size], args.skip_bad, ctx)
            if pil:
                out.append(pool_tokens(encoder.features(pil, args.source), args.pool))
                kept += chunk
            advance(min(args.batch_size, len(images) - i))
    if not kept:
        raise DataError("no image could be decoded; nothing written")
    return np.concatenate(out, axis=0), kept


def _metadata(encoder, args, vectors: np.ndarray, tokens: int) -> dict:
    from medlite import __version__

    return {"medlite_version": __version__, "created_by": "medlite embed", "model": encoder.identity,
            "runtime": encoder.runtime_info(), "from": args.source, "pool": args.pool,
            "count": int(vectors.shape[0]), "dim": int(vectors.shape[1]), "tokens_per_image": tokens,
            "preprocessing": {"image_spec": encoder.image_spec.to_dict(), "loader": LOADER_NOTE}}


def run_embed(args, ctx) -> EmbedResult:
    """List the images, open the model, embed, write ``args.out`` atomically; returns the figures."""
    from medlite.bench.measure import peak_rss_bytes
    from medlite.embeddings.encoders import open_encoder

    validate_args(args)
    images, skipped = collect_images(list(args.images), ctx, skip_bad=args.skip_bad)   # before the model loads
    t0 = time.perf_counter()
    encoder = open_encoder(args, ctx)
    load_s = time.perf_counter() - t0
    # one untimed pass on a blank image: warms the session up (images/s is then the steady rate)
    # and gives the token count without decoding a user file twice
    from PIL import Image

    tokens = int(encoder.features([Image.new("RGB", (64, 64))], args.source).shape[1])
    t1 = time.perf_counter()
    listed = len(images) + skipped
    vectors, images = _encode_all(encoder, images, args, ctx)
    embed_s = time.perf_counter() - t1
    bad = [im.image_id for im, v in zip(images, vectors) if not np.isfinite(v).all()]
    if bad:
        ctx.warn(f"{len(bad)} embeddings are not finite (NaN/inf), e.g. {', '.join(bad[:3])}: the model's "
                 f"numerics overflowed on them (an fp16 graph? try an fp32 export)")
    data = EmbeddingSet([im.image_id for im in images], vectors, [im.source for im in images],
                        _metadata(encoder, args, vectors, tokens))
    write_embeddings(args.out, data)
    return EmbedResult(out=str(Path(args.out)), images=len(images), skipped=listed - len(images),
                       dim=int(vectors.shape[1]), source=args.source, pool=args.pool, load_s=load_s, embed_s=embed_s,
                       images_per_s=len(images) / embed_s if embed_s > 0 else float("inf"),
                       peak_rss_bytes=peak_rss_bytes(), model=encoder.identity, runtime=encoder.runtime_info())
