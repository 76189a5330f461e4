"""Calibration sets: stratified, deterministic image+question pairs with an image-disjoint held-out.

Rules (docs/data.md):

* Every pair has a real image (the LLM must see real image tokens); a sample without one is an error.
* Held-out first: per stratum, ``heldout_fraction × images`` (rounded half up) whole *source images*
  (``image_id``) are set aside (a stratum with a single image keeps it for calibration). The held-out
  feeds accuracy checks only — no held-out image is ever in ``samples``.
* Allocation of ``n`` over the strata (modality; region when every modality is unknown): one slot
  per stratum when ``n`` allows, the rest proportional to stratum size by largest remainder
  (ties broken by stratum name). Inside a stratum, images are taken round-robin in a seeded order,
  so the set covers as many distinct images as possible.
* Deterministic: input order does not matter (samples are sorted by image_id, qid first); every
  random choice comes from a generator keyed by (seed, purpose, stratum) with a stable hash.
* ``content_hash``: sha256 over the parameters, each chosen sample's qid/question/answer/type/
  image_id/modality and its image — the sha256 of the image *file* when the sample has a path,
  else of the decoded RGB pixels — plus the held-out qids.
* Cached in ``ctx.cache_dir/calibration``: ``<content_hash>.json`` holds the selection (qids), and
  ``index/<input key>.json`` maps the inputs (samples' text, ids, meta, file size+mtime, params) to
  it, so a rebuild with unchanged inputs skips image hashing (samples rendered by ``image_fn`` are
  trusted to be pure functions of their text and meta). Files are written atomically.
* Subsets: a stage that uses ``n`` of the pairs (``samples: N``; held-out: ``sensitivity_rows``,
  ``heldout_samples``) takes ``CalibrationSet.subset(n)`` / ``heldout_subset(n)`` — one rule
  (:func:`stratified_subset`), so every stage that asks for ``n`` gets the same rows.
* Too little data is a DataError, never random data. ``allow_synthetic=True`` pads with seeded
  noise images and warns loudly through ``ctx.warn``.
"""
from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from medlite.imaging.pixels import MODALITIES
from medlite.evaluation.samples import OPEN, VqaSample
from medlite.errors import DataError
from medlite.fileio import sha256_file, write_json_atomic

VERSION = "medlite-calibset/1"
SYNTHETIC = "synthetic"


@dataclass
class CalibrationSet:
    """The chosen calibration pairs, the image-disjoint held-out pairs and their identity."""

    samples: list[VqaSample]
    heldout: list[VqaSample]
    content_hash: str
    seed: int = 0
    stratify: str = "modality"
    notes: list[str] = field(default_factory=list)

    def counts_by_modality(self) -> dict[str, int]:
        """Calibration pairs per modality, vocabulary order first."""
        c = Counter(s.modality for s in self.samples)
        order = [m for m in MODALITIES if m in c] + sorted(m for m in c if m not in MODALITIES)
        return {m: c[m] for m in order}

    def summary(self) -> str:
        """"128 image+question pairs on 40 images · CT 32 · MR 32 · … · held-out 96 pairs on 12 images"."""
        mods = " · ".join(f"{m} {k}" for m, k in self.counts_by_modality().items())
        held = (f" · held-out {len(self.heldout)} pairs on {len({s.image_id for s in self.heldout})} images"
                if self.heldout else " · no held-out")
        return (f"{len(self.samples)} image+question pairs on {len({s.image_id for s in self.samples})} "
                f"images · {mods}{held}")

    def subset(self, n: Optional[int]) -> list[VqaSample]:
        """The calibration pairs every stage that asks for ``n`` of them uses (``samples: N``): the same
        rows for int8, int4 and prune. Rule: :func:`stratified_subset` (``None``: all)."""
        return stratified_subset(self.samples, n, stratify=self.stratify)

    def heldout_subset(self, n: Optional[int]) -> list[VqaSample]:
        """``n`` pairs of the held-out slice by the same rule (int8's ``sensitivity_rows``, distill's
        ``heldout_samples``)."""
        return stratified_subset(self.heldout, n, stratify=self.stratify)

    def pairs(self) -> Iterator[tuple[object, str, VqaSample]]:
        """Yield ``(RGB image, question, sample)`` for every calibration pair (images load lazily)."""
        for s in self.samples:
            yield s.load_image(), s.question, s

    def to_dict(self) -> dict:
        """JSON-able description for manifests and reports."""
        return {"content_hash": self.content_hash, "seed": self.seed, "stratify": self.stratify,
                "n": len(self.samples), "n_heldout": len(self.heldout),
                "counts_by_modality": self.counts_by_modality(), "summary": self.summary(),
                "notes": list(self.notes)}


# -- deterministic helpers ---------------------------------------------------------------------
def _rng(*parts) -> np.random.Generator:
    key = "/".join(str(p) for p in parts).encode()
    return np.random.default_rng([zlib.crc32(key), zlib.adler32(key)])


def allocate(sizes: dict[str, int], n: int) -> dict[str, int]:
    """Split ``n`` slots over strata of the given sizes: one each first (when n >= #strata), then
    proportional to size by largest remainder, ties broken by stratum name; never above a size."""
    names = sorted(k for k, v in sizes.items() if v > 0)
    quota = {k: 0 for k in names}
    if n >= len(names):
        quota = {k: 1 for k in names}
    left = n - sum(quota.values())
    while left > 0:
        room = {k: sizes[k] - quota[k] for k in names if sizes[k] > quota[k]}
        if not room:
            break
        total = sum(room.values())
        exact = {k: left * room[k] / total for k in room}
        add = {k: min(int(exact[k]), room[k]) for k in room}
        rest = left - sum(add.values())
        order = sorted(room, key=lambda k: (-(exact[k] - int(exact[k])), k))
        for k in order:
            if rest <= 0:
                break
            if add[k] < room[k]:
                add[k] += 1
                rest -= 1
        for k in add:
            quota[k] += add[k]
        left = n - sum(quota.values())
    return quota


def _stratum_key(stratify: str):
    return (lambda s: s.modality) if stratify == "modality" else (lambda s: s.region)


def _deal(sizes: list[int], k: int) -> list[int]:
    """``k`` slots over groups (images) of the given sizes, in list order: fewer slots than groups →
    one each to groups spread evenly over the list; else one each, the rest by size (:func:`allocate`,
    ties to the earlier group)."""
    if k < len(sizes):
        out = [0] * len(sizes)
        for j in range(k):
            out[(j * len(sizes)) // k] += 1
        return out
    quota = allocate({f"{i:09d}": size for i, size in enumerate(sizes)}, k)
    return [quota[f"{i:09d}"] for i in range(len(sizes))]


def stratified_subset(samples: Sequence[VqaSample], n: Optional[int], *,
                      stratify: str = "modality") -> list[VqaSample]:
    """The one subset rule: ``n`` of ``samples``, stratified and deterministic (``None`` or ``n`` ≥ the
    number of samples: all of them, in order).

    1. The ``n`` slots are allocated over the strata (modality, or region) by :func:`allocate`;
    2. a stratum's slots are dealt over its images (``image_id``, in order of first appearance) by
       :func:`_deal`: as many distinct images as the slots allow, spread over the list;
    3. an image's slots are spread evenly over its pairs in list order (pair ``j·size // k`` for
       ``j < k``), never "the first k".

    The result keeps the input order and depends on nothing but the list and ``n``.
    """
    samples = list(samples)
    if n is None or n >= len(samples):
        return samples
    if n < 1:
        raise DataError(f"a calibration subset needs at least 1 sample, got {n}")
    key = _stratum_key(stratify)
    strata: dict[str, dict[str, list[int]]] = {}
    for i, s in enumerate(samples):
        strata.setdefault(key(s), {}).setdefault(s.image_id, []).append(i)
    quota = allocate({k: sum(map(len, imgs.values())) for k, imgs in strata.items()}, n)
    chosen: list[int] = []
    for k, images in strata.items():
        groups = list(images.values())
        for idx, m in zip(groups, _deal([len(g) for g in groups], quota.get(k, 0))):
            chosen += [idx[(j * len(idx)) // m] for j in range(m)]
    return [samples[i] for i in sorted(chosen)]


def _split_heldout(samples: list[VqaSample], key, fraction: float, seed: int) -> set[str]:
    """image_ids set aside per stratum (whole images, never split across the two sides)."""
    first: dict[str, str] = {}
    for s in samples:
        first.setdefault(s.image_id, key(s))
    by_stratum: dict[str, list[str]] = {}
    for img, st in sorted(first.items()):
        by_stratum.setdefault(st, []).append(img)
    held: set[str] = set()
    for st, imgs in sorted(by_stratum.items()):
        k = min(int(fraction * len(imgs) + 0.5), len(imgs) - 1)  # round half up (not banker's)
        if k > 0:
            order = _rng(seed, "heldout", st).permutation(len(imgs))
            held.update(imgs[i] for i in order[:k])
    return held


def _take_round_robin(pool: list[VqaSample], k: int, seed: int, stratum: str) -> list[VqaSample]:
    by_img: dict[str, list[VqaSample]] = {}
    for s in pool:
        by_img.setdefault(s.image_id, []).append(s)
    rng = _rng(seed, "select", stratum)
    imgs = sorted(by_img)
    imgs = [imgs[i] for i in rng.permutation(len(imgs))]
    queues = [[by_img[i][j] for j in rng.permutation(len(by_img[i]))] for i in imgs]
    out: list[VqaSample] = []
    depth = 0
    while len(out) < k:
        for q in queues:
            if depth < len(q):
                out.append(q[depth])
                if len(out) == k:
                    break
        depth += 1
    return out


# -- hashing -----------------------------------------------------------------------------------
def _file_sha256(path: Path, memo: dict) -> str:
    if path not in memo:
        try:
            memo[path] = sha256_file(path)
        except OSError as e:
            raise DataError(f"{path}: cannot read calibration image: {e}") from None
    return memo[path]


def _image_identity(s: VqaSample, memo: dict) -> str:
    if s.image_path is not None:
        return "file:" + _file_sha256(Path(s.image_path), memo)
    img = s.load_image().convert("RGB")
    return "pixels:" + hashlib.sha256(f"{img.size}".encode() + img.tobytes()).hexdigest()


def _text_fields(s: VqaSample) -> list:
    return [s.qid, s.question, s.answer, s.answer_type, s.image_id, s.modality]


def content_hash(samples: Sequence[VqaSample], heldout: Sequence[VqaSample], params: dict) -> str:
    """sha256 of the parameters, the chosen pairs (text + image bytes) and the held-out qids."""
    h = hashlib.sha256(json.dumps([VERSION, params], sort_keys=True).encode())
    memo: dict = {}
    for s in samples:
        h.update(json.dumps(_text_fields(s) + [_image_identity(s, memo)]).encode())
    h.update(json.dumps(sorted(s.qid for s in heldout)).encode())
    return h.hexdigest()


def _input_key(samples: Sequence[VqaSample], params: dict) -> str:
    h = hashlib.sha256(json.dumps([VERSION, params], sort_keys=True).encode())
    for s in samples:
        stat = None
        if s.image_path is not None:
            try:
                st = os.stat(s.image_path)
                stat = [st.st_size, st.st_mtime_ns]
            except OSError:
                stat = "missing"
        h.update(json.dumps(_text_fields(s) + [str(s.image_path), stat, repr(s.meta)], default=str).encode())
    return h.hexdigest()


# -- cache -------------------------------------------------------------------------------------


def _read_cache(root: Path, key: str, by_qid: dict) -> Optional[tuple[list, list, str]]:
    try:
        ref = json.loads((root / "index" / f"{key}.json").read_text())
        sel = json.loads((root / f"{ref['content_hash']}.json").read_text())
        if sel.get("version") != VERSION or sel.get("input_key") != key:
            return None
        return ([by_qid[q] for q in sel["samples"]], [by_qid[q] for q in sel["heldout"]], ref["content_hash"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent, partial or stale: rebuild (the rebuild rewrites it atomically)


# -- synthetic padding -------------------------------------------------------------------------
def _synthetic(k: int, seed: int, size: int = 224) -> list[VqaSample]:
    def noise(i: int):
        from PIL import Image

        a = _rng(seed, "synthetic", i).integers(0, 256, (size, size, 3), dtype=np.uint8)
        return Image.fromarray(a, "RGB")

    return [VqaSample(qid=f"synthetic-{i}", question="What is shown in this image?", answer="noise",
                      answer_type=OPEN, image_id=f"synthetic-{i}", modality=SYNTHETIC, region="none",
                      image_fn=(lambda i=i: noise(i)), meta=(("synthetic", True),)) for i in range(k)]


# -- entry point -------------------------------------------------------------------------------
def build_calibration_set(samples: Sequence[VqaSample], n: int, *, seed: int = 0, heldout_fraction: float = 0.25,
                          ctx, modalities: Optional[Sequence[str]] = None, stratify: str = "modality",
                          allow_synthetic: bool = False, cache: bool = True) -> CalibrationSet:
    """Choose ``n`` image+question pairs for calibration and an image-disjoint held-out set.

    ``modalities`` restricts (and requires) the strata; ``stratify`` is "modality" or "region".
    See the module docstring for the exact rules. Raises :class:`DataError` when the data cannot
    supply ``n`` real pairs (unless ``allow_synthetic``), a requested modality is absent, or a
    sample has no image.
    """
    if n < 1:
        raise DataError(f"calibration set size must be at least 1, got {n}")
    if not 0.0 <= heldout_fraction < 1.0:
        raise DataError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    if stratify not in ("modality", "region"):
        raise DataError(f"stratify must be 'modality' or 'region', got {stratify!r}")
    pool = sorted(samples, key=lambda s: (s.image_id, s.qid))
    if len({s.qid for s in pool}) != len(pool):
        dup = [q for q, c in Counter(s.qid for s in pool).items() if c > 1][:5]
        raise DataError(f"calibration samples have duplicate qids ({', '.join(dup)}): ids must be unique")
    no_image = [s.qid for s in pool if s.image_path is None and s.image_fn is None]
    if no_image:
        raise DataError(f"{len(no_image)} calibration sample(s) have no image (qid {', '.join(no_image[:10])}): "
                        "calibration needs real image+question pairs")
    notes: list[str] = []
    if modalities is not None:
        wanted = set(modalities)
        have = {s.modality for s in pool}
        missing = sorted(wanted - have)
        if missing:
            raise DataError(f"no calibration images of modality {', '.join(missing)} "
                            f"(the data has: {', '.join(sorted(have)) or 'nothing'})")
        pool = [s for s in pool if s.modality in wanted]
    if stratify == "modality" and pool and all(s.modality == "unknown" for s in pool) \
            and any(s.region != "unknown" for s in pool):
        stratify = "region"
        ctx.warn("calibration data has no modality labels (e.g. VQA-RAD): stratifying by region instead")
    if not pool and not allow_synthetic:
        raise DataError("no calibration samples: give a dataset with images (or allow_synthetic=True "
                        "to calibrate on random noise, which is not representative)")

    params = {"n": n, "seed": seed, "heldout_fraction": heldout_fraction, "stratify": stratify,
              "modalities": sorted(modalities) if modalities is not None else None,
              "allow_synthetic": allow_synthetic}
    root = Path(ctx.cache_dir) / "calibration"
    key = _input_key(pool, params)
    if cache and (hit := _read_cache(root, key, {s.qid: s for s in pool})) is not None:
        chosen, held, digest = hit
        return CalibrationSet(chosen, held, digest, seed, stratify, ["loaded from cache"])

    strat = _stratum_key(stratify)
    held_ids = _split_heldout(pool, strat, heldout_fraction, seed)
    held = [s for s in pool if s.image_id in held_ids]
    cal_pool = [s for s in pool if s.image_id not in held_ids]
    chosen: list[VqaSample] = []
    if n > len(cal_pool):
        if not allow_synthetic:
            raise DataError(f"asked for {n} calibration pairs but only {len(cal_pool)} are available after "
                            f"setting aside {len(held)} held-out pairs ({len(held_ids)} images); lower n, "
                            f"lower heldout_fraction or add data")
        chosen = list(cal_pool)
        pad = _synthetic(n - len(cal_pool), seed)
        ctx.warn(f"CALIBRATION SET PADDED WITH {len(pad)} SYNTHETIC NOISE IMAGES ({len(cal_pool)} real pairs for "
                 f"n={n}): quantization scales from noise are not representative of medical images")
        notes.append(f"{len(pad)} synthetic noise images")
        chosen += pad
    else:
        groups: dict[str, list[VqaSample]] = {}
        for s in cal_pool:
            groups.setdefault(strat(s), []).append(s)
        quota = allocate({k: len(v) for k, v in groups.items()}, n)
        for st in sorted(groups):
            chosen += _take_round_robin(groups[st], quota.get(st, 0), seed, st)
    digest = content_hash(chosen, held, params)
    cs = CalibrationSet(chosen, held, digest, seed, stratify, notes)
    if cache and not any(s.modality == SYNTHETIC for s in chosen):
        write_json_atomic(root / f"{digest}.json", {"version": VERSION, "input_key": key, **cs.to_dict(),
                                                    "samples": [s.qid for s in chosen],
                                                    "heldout": [s.qid for s in held]}, indent=1)
        write_json_atomic(root / "index" / f"{key}.json", {"content_hash": digest}, indent=1)
    return cs


def exclude_calibration_images(eval_samples: Sequence[VqaSample], calib: CalibrationSet, *, ctx,
                               what: str = "evaluation") -> list[VqaSample]:
    """``eval_samples`` without any question about an image used for calibration.

    Needed because the official splits are *not* image-disjoint: 202 of the 203 VQA-RAD test
    images also appear in its train questions, and SLAKE reuses images across splits (xmlab1 is in
    train (en) and test (zh)). Dropped questions are reported through ``ctx.warn``.
    """
    used = {s.image_id for s in calib.samples}
    kept = [s for s in eval_samples if s.image_id not in used]
    dropped = len(eval_samples) - len(kept)
    if dropped:
        n_img = len({s.image_id for s in eval_samples if s.image_id in used})
        ctx.warn(f"{what}: dropped {dropped} of {len(eval_samples)} questions about {n_img} images "
                 f"that are in the calibration set (accuracy must be measured on unseen images)")
    if not kept:
        raise DataError(f"{what}: every question is about a calibration image; use another split or data set")
    return kept
