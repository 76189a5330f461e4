"""Calibration sets: determinism, stratified allocation, image-disjoint held-out, cache, errors."""
from __future__ import annotations

import json
import random
from collections import Counter

import pytest
from PIL import Image

from medlite.calibration import calibset
from medlite.calibration.calibset import allocate, build_calibration_set
from medlite.evaluation.samples import VqaSample
from medlite.context import RunContext
from medlite.errors import DataError

# modality → (images, questions per image)
LAYOUT = {"CT": (20, 3), "MR": (10, 2), "US": (4, 1), "NM": (1, 2)}


def solid(i: int):
    return lambda: Image.new("RGB", (8, 8), (i % 256, (i * 7) % 256, 50))


def make_samples(tmp_path=None, layout=LAYOUT):
    """Samples with image_fn images; with tmp_path, the US images are real files instead."""
    out, k = [], 0
    for mod, (n_img, n_q) in layout.items():
        for i in range(n_img):
            img_id = f"{mod}-{i}"
            path = None
            if tmp_path is not None and mod == "US":
                path = tmp_path / f"{img_id}.png"
                solid(k)().save(path)
            for q in range(n_q):
                out.append(VqaSample(qid=f"{img_id}-q{q}", question=f"question {q}?", answer="yes",
                                     answer_type="closed", image_id=img_id, modality=mod, region="chest",
                                     image_path=path, image_fn=None if path else solid(k)))
            k += 1
    return out


@pytest.fixture
def ctx(tmp_path):
    return RunContext(cache_dir=tmp_path / "cache", quiet=True)


def qids(samples):
    return [s.qid for s in samples]


def test_allocate_largest_remainder():
    assert allocate({"a": 10, "b": 10, "c": 1}, 5) == {"a": 2, "b": 2, "c": 1}
    assert allocate({"b": 5, "a": 5}, 3) == {"a": 2, "b": 1}            # tie → name order
    assert allocate({"a": 100, "b": 1}, 1) == {"a": 1, "b": 0}          # n < strata: proportional only
    # 1 each, 38 left over room (2, 49): exact 1.49 / 36.51 → floors 1 + 36, the last slot to b (.51)
    assert allocate({"a": 3, "b": 50}, 40) == {"a": 2, "b": 38}
    assert allocate({"a": 2, "b": 3}, 5) == {"a": 2, "b": 3}            # everything, never above a size
    assert sum(allocate({"x": 7, "y": 11, "z": 13}, 17).values()) == 17


def test_stratified_counts_and_heldout(ctx):
    cs = build_calibration_set(make_samples(), 20, seed=0, ctx=ctx, cache=False)
    # Held-out images per stratum: CT 20*0.25=5, MR 2.5→3 (half up), US 1, NM 0 (single image stays).
    held_imgs = Counter(s.modality for s in {s.image_id: s for s in cs.heldout}.values())
    assert held_imgs == {"CT": 5, "MR": 3, "US": 1}
    assert len(cs.heldout) == 5 * 3 + 3 * 2 + 1 * 1
    # Pool after held-out: CT 45, MR 14, US 3, NM 2 (64). One slot each, then 16 slots by size
    # (44, 13, 2, 1 left → 11.73, 3.47, 0.53, 0.27): floors 11+3, remainders to CT (.73), US (.53).
    assert cs.counts_by_modality() == {"CT": 13, "MR": 4, "US": 2, "NM": 1}
    assert list(cs.counts_by_modality()) == ["CT", "MR", "US", "NM"]  # vocabulary order
    # Round robin over images: the 13 CT questions come from 13 different CT images.
    assert len({s.image_id for s in cs.samples if s.modality == "CT"}) == 13
    assert cs.summary().startswith("20 image+question pairs on 20 images · CT 13 · MR 4 · US 2 · NM 1 · "
                                   "held-out 22 pairs on 9 images")


def test_heldout_is_disjoint_by_image_and_whole(ctx):
    samples = make_samples()
    cs = build_calibration_set(samples, 30, seed=3, heldout_fraction=0.4, ctx=ctx, cache=False)
    held_ids = {s.image_id for s in cs.heldout}
    assert held_ids and not held_ids & {s.image_id for s in cs.samples}
    # every question of a held-out image is in the held-out set
    assert {s.qid for s in samples if s.image_id in held_ids} == set(qids(cs.heldout))
    none = build_calibration_set(samples, 10, heldout_fraction=0.0, ctx=ctx, cache=False)
    assert none.heldout == [] and none.summary().endswith("no held-out")


def test_deterministic_for_seed_and_input_order(ctx):
    samples = make_samples()
    a = build_calibration_set(samples, 16, seed=1, ctx=ctx, cache=False)
    shuffled = list(samples)
    random.Random(5).shuffle(shuffled)
    b = build_calibration_set(shuffled, 16, seed=1, ctx=ctx, cache=False)
    assert qids(a.samples) == qids(b.samples) and qids(a.heldout) == qids(b.heldout)
    assert a.content_hash == b.content_hash and len(a.content_hash) == 64
    c = build_calibration_set(samples, 16, seed=2, ctx=ctx, cache=False)
    assert qids(c.samples) != qids(a.samples) and c.content_hash != a.content_hash
    assert c.counts_by_modality() == a.counts_by_modality()  # same allocation, other picks


def test_hash_covers_image_bytes(tmp_path, ctx):
    samples = make_samples(tmp_path)  # US images are PNG files
    a = build_calibration_set(samples, 20, ctx=ctx, cache=False)
    used = [s for s in a.samples if s.modality == "US"]
    assert used and all(s.image_path is not None for s in used)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(used[0].image_path)  # same name, other pixels
    b = build_calibration_set(samples, 20, ctx=ctx, cache=False)
    assert qids(a.samples) == qids(b.samples) and a.content_hash != b.content_hash


def test_disk_cache_roundtrip_and_corruption(ctx, monkeypatch):
    samples = make_samples()
    a = build_calibration_set(samples, 12, seed=4, ctx=ctx)
    root = ctx.cache_dir / "calibration"
    record = json.loads((root / f"{a.content_hash}.json").read_text())
    assert record["samples"] == qids(a.samples) and record["heldout"] == qids(a.heldout)
    assert record["counts_by_modality"] == a.counts_by_modality()
    assert not list(root.rglob("*.tmp"))  # atomic writes leave no temporaries

    def no_hashing(*args):
        raise AssertionError("a cache hit must not re-hash images")

    monkeypatch.setattr(calibset, "_image_identity", no_hashing)
    b = build_calibration_set(samples, 12, seed=4, ctx=ctx)
    assert b.notes == ["loaded from cache"] and qids(b.samples) == qids(a.samples)
    assert b.content_hash == a.content_hash
    monkeypatch.undo()
    (root / f"{a.content_hash}.json").write_text("{truncated")
    c = build_calibration_set(samples, 12, seed=4, ctx=ctx)
    assert c.notes == [] and c.content_hash == a.content_hash
    assert json.loads((root / f"{a.content_hash}.json").read_text())["samples"] == qids(a.samples)


def test_missing_data_is_an_error(ctx):
    samples = make_samples()
    with pytest.raises(DataError, match="no calibration samples"):
        build_calibration_set([], 8, ctx=ctx)
    with pytest.raises(DataError, match="asked for 100 calibration pairs but only 64 are available"):
        build_calibration_set(samples, 100, ctx=ctx)
    with pytest.raises(DataError, match="no calibration images of modality fundus"):
        build_calibration_set(samples, 4, modalities=["CT", "fundus"], ctx=ctx)
    bare = VqaSample(qid="x", question="q", answer="a", answer_type="open", image_id="i")
    with pytest.raises(DataError, match="have no image"):
        build_calibration_set(samples + [bare], 4, ctx=ctx)
    with pytest.raises(DataError, match="duplicate qids"):
        build_calibration_set(samples + samples[:1], 4, ctx=ctx)
    only_ct = build_calibration_set(samples, 6, modalities=["CT"], ctx=ctx, cache=False)
    assert only_ct.counts_by_modality() == {"CT": 6}
    assert ctx.warnings == []


def test_synthetic_padding_only_when_allowed_and_loud(ctx):
    samples = make_samples(layout={"CT": (4, 1)})
    cs = build_calibration_set(samples, 8, heldout_fraction=0.25, allow_synthetic=True, ctx=ctx)
    assert len(cs.samples) == 8 and cs.counts_by_modality() == {"CT": 3, "synthetic": 5}
    assert len(ctx.warnings) == 1 and "SYNTHETIC NOISE" in ctx.warnings[0]
    img = cs.samples[-1].load_image()
    assert img.size == (224, 224) and img.mode == "RGB"
    assert not (ctx.cache_dir / "calibration").exists()  # noise sets are never cached
    empty = build_calibration_set([], 2, allow_synthetic=True, ctx=ctx)
    assert empty.counts_by_modality() == {"synthetic": 2}


def test_region_fallback_without_modalities(ctx):
    samples = [VqaSample(qid=f"q{i}", question="q", answer="a", answer_type="open", image_id=f"img{i // 2}",
                         region=["head", "chest", "abdomen"][i % 3], image_fn=solid(i)) for i in range(24)]
    cs = build_calibration_set(samples, 9, ctx=ctx, cache=False)
    assert cs.stratify == "region" and "stratifying by region" in ctx.warnings[0]
    assert len(cs.samples) == 9 and set(Counter(s.region for s in cs.samples)) == {"head", "chest", "abdomen"}
    pairs = list(cs.pairs())
    assert len(pairs) == 9 and pairs[0][0].size == (8, 8) and pairs[0][1] == "q"


def test_exclude_calibration_images_from_evaluation(ctx):
    from medlite.calibration.calibset import exclude_calibration_images

    samples = make_samples()
    cs = build_calibration_set(samples, 10, heldout_fraction=0.0, ctx=ctx, cache=False)
    used = {s.image_id for s in cs.samples}
    kept = exclude_calibration_images(samples, cs, ctx=ctx)
    assert not {s.image_id for s in kept} & used
    assert len(kept) == len([s for s in samples if s.image_id not in used]) < len(samples)
    assert len(ctx.warnings) == 1 and "dropped" in ctx.warnings[0]
    with pytest.raises(DataError, match="every question is about a calibration image"):
        exclude_calibration_images(cs.samples, cs, ctx=ctx)


# -- the one subset rule (samples: N, sensitivity_rows, heldout_samples) --------------------------
def test_subset_is_stratified_then_spread_over_images():
    samples = make_samples()      # CT 20 images x 3, MR 10 x 2, US 4 x 1, NM 1 x 2: 86 pairs, in this order
    sub = calibset.stratified_subset(samples, 10)
    # one slot per modality, then 6 by size (room 59, 19, 3, 1 → 4.32, 1.39, 0.22, 0.07): floors 4 + 1,
    # the last slot to MR (.39); inside a modality one slot per image, the images spread over the list
    assert qids(sub) == ["CT-0-q0", "CT-4-q0", "CT-8-q0", "CT-12-q0", "CT-16-q0",
                         "MR-0-q0", "MR-3-q0", "MR-6-q0", "US-0-q0", "NM-0-q0"]
    assert qids(calibset.stratified_subset(samples, 10)) == qids(sub)          # deterministic
    big = calibset.stratified_subset(samples, 40)
    # 1 each, 36 by size (25.93, 8.34, 1.32, 0.44): floors 25 + 8 + 1, remainders to CT (.93), NM (.44)
    assert Counter(s.modality for s in big) == {"CT": 27, "MR": 9, "US": 2, "NM": 2}
    assert len({s.image_id for s in big if s.modality == "CT"}) == 20          # every CT image, 7 twice
    assert len(set(qids(big))) == 40 and qids(big) == [q for q in qids(samples) if q in set(qids(big))]


def test_subset_spreads_over_one_images_questions():
    one = make_samples(layout={"CT": (1, 100)})
    assert qids(calibset.stratified_subset(one, 4)) == ["CT-0-q0", "CT-0-q25", "CT-0-q50", "CT-0-q75"]
    assert qids(calibset.stratified_subset(one, None)) == qids(one) == qids(calibset.stratified_subset(one, 100))
    with pytest.raises(DataError, match="at least 1"):
        calibset.stratified_subset(one, 0)


def test_calibration_set_subsets_use_the_rule(ctx):
    samples = make_samples()
    cs = build_calibration_set(samples, 40, seed=0, ctx=ctx, cache=False)
    for n in (1, 5, 12, 39):
        assert qids(cs.subset(n)) == qids(calibset.stratified_subset(cs.samples, n))
        assert qids(cs.heldout_subset(n)) == qids(calibset.stratified_subset(cs.heldout, n))
    assert cs.subset(None) == cs.samples and cs.subset(10_000) == cs.samples
    # the set lists a modality's pairs round-robin over its images: 12 slots → 12 distinct images
    assert len({s.image_id for s in cs.subset(12)}) == 12
    # the same rows from a set rebuilt from the inputs in another order
    shuffled = list(samples)
    random.Random(3).shuffle(shuffled)
    again = build_calibration_set(shuffled, 40, seed=0, ctx=ctx, cache=False)
    assert qids(again.subset(12)) == qids(cs.subset(12)) and qids(again.heldout_subset(7)) == qids(cs.heldout_subset(7))
