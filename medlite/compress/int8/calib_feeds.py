"""Calibration feeds for the exported graphs, from the framework's forward loop.

* vision graph: ``pixel_values`` of each distinct calibration image (preprocessed exactly as the
  runtime does), ``batch_size`` images per feed;
* decoder graph: the runtime's prefill inputs (:func:`medlite.runtime.decoding.prefill_inputs`):
  ``inputs_embeds`` with the projected image embeddings spliced in, ``attention_mask`` with the
  ``prefill_past_slots`` dummy slot(s) first, ``position_ids`` and zero past slots.

Decoder feeds group samples of equal prompt length, so no row is padded: a padded query row
attends to nothing real and its activations (a uniform softmax over blocked slots) would widen
the calibrated ranges with values the deployed model never uses for an answer. Feeds of
different groups differ in sequence length; ONNX Runtime's histogram calibrators (percentile,
entropy) stack all feeds of one ``collect_data`` call into one array and fail on that
("inhomogeneous shape"), so :mod:`medlite.compress.int8.qdq_onnx` passes them one feed at a time
(its histograms merge across calls).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from medlite.calibration.forward import distinct_images

PREFILL_PAST_SLOTS = 1   # medlite_runtime.json kv_cache.prefill_past_slots (export/runtime_config.py)


def vision_feeds(loop, *, batch_size: int = 8) -> Iterator[dict]:
    """``{"pixel_values": float32 [B,3,S,S]}`` for every distinct image of ``loop``'s samples."""
    from medlite.preprocess import preprocess

    imgs = distinct_images(loop.samples)
    for i in range(0, len(imgs), batch_size):
        chunk = imgs[i:i + batch_size]
        px = preprocess([s.load_image() for s in chunk], loop.loaded.image_spec)
        yield {"pixel_values": np.ascontiguousarray(px, dtype=np.float32)}


def prefill_feed(embeds: np.ndarray, *, num_layers: int, num_kv_heads: int, head_dim: int,
                 past_slots: int = PREFILL_PAST_SLOTS) -> dict:
    """Decoder inputs for unpadded rows ``embeds [B, T, H]`` as the runtime builds them for prefill."""
    b, t, _ = embeds.shape
    feed = {"inputs_embeds": np.ascontiguousarray(embeds, dtype=np.float32),
            "attention_mask": np.concatenate([np.zeros((b, past_slots), np.int32), np.ones((b, t), np.int32)], 1),
            "position_ids": np.tile(np.arange(t, dtype=np.int32), (b, 1))}
    zeros = np.zeros((b, num_kv_heads, past_slots, head_dim), np.float32)
    for i in range(num_layers):
        feed[f"past_key_values.{i}.key"] = zeros
        feed[f"past_key_values.{i}.value"] = zeros
    return feed


def decoder_feeds(loop, model, dims: dict, *, batch_size: int = 8, text_only: bool = False,
                  past_slots: int = PREFILL_PAST_SLOTS) -> Iterator[dict]:
    """Prefill feeds of the decoder graph for every calibration sample (image tokens spliced in).

    ``dims`` is :func:`medlite.export.graphs.text_dims` of the model. ``text_only=True`` drops the
    image positions (what a text-only calibration, e.g. llm-compressor's own loop, would see) — for
    measuring how much the image tokens matter, not for building.
    """
    kw = dict(num_layers=dims["num_layers"], num_kv_heads=dims["num_kv_heads"], head_dim=dims["head_dim"],
              past_slots=past_slots)
    from medlite.calibration.forward import ForwardLoop

    # groups of one prompt length, so no feed row is padded
    for chunk in ForwardLoop(loop.loaded, loop.samples, batch_size=batch_size, equal_length=True).chunks():
        inp = loop.batch(chunk, model)
        emb = inp.inputs_embeds.float().numpy()
        if not text_only:
            yield prefill_feed(emb, **kw)
            continue
        keep = (~inp.image_positions).numpy()
        for r in range(emb.shape[0]):
            yield prefill_feed(emb[r][keep[r]][None], **kw)


__all__ = ["PREFILL_PAST_SLOTS", "decoder_feeds", "distinct_images", "prefill_feed",
           "vision_feeds"]
