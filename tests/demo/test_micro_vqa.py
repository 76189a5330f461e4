"""Micro Med-VQA: deterministic, balanced, split by source image, lesions where the answers say."""
from __future__ import annotations

import collections

import numpy as np
import pytest

from medlite.imaging.builtin import builtin_images
from medlite.demo.micro_vqa import (IMAGE_SIZE, QUESTION_TYPES, TEST_SOURCES, SourceBank, micro_med_vqa,
                                           plan_views, question_templates, render_view)
from medlite.errors import DataError


@pytest.fixture(scope="module")
def train():
    return micro_med_vqa("train")


@pytest.fixture(scope="module")
def test():
    return micro_med_vqa("test")


def _views(samples):
    """First sample of each view (questions about one view share its image)."""
    out = {}
    for s in samples:
        out.setdefault(dict(s.meta)["view"], s)
    return out


def test_sizes_types_and_answers(train, test):
    assert 3000 <= len(train) <= 6000 and 300 <= len(test) <= 1000
    for s in train + test:
        assert s.answer in ("Yes", "No") and s.answer_type == "closed"
        assert dict(s.meta)["question_type"] in QUESTION_TYPES
        assert s.question in question_templates()
    assert {dict(s.meta)["question_type"] for s in train} == set(QUESTION_TYPES)
    # region questions are training-only (one source per region: not learnable for unseen images)
    assert {dict(s.meta)["question_type"] for s in test} == set(QUESTION_TYPES) - {"region"}
    assert len({s.qid for s in train + test}) == len(train) + len(test)


def test_balanced_per_question_type(train, test):
    for samples in (train, test):
        counts = collections.Counter((dict(s.meta)["question_type"], s.answer) for s in samples)
        for t in QUESTION_TYPES:
            assert abs(counts[(t, "Yes")] - counts[(t, "No")]) <= 1, (t, counts)
        yes = sum(s.answer == "Yes" for s in samples)
        assert abs(2 * yes - len(samples)) <= len(QUESTION_TYPES)


def test_split_is_disjoint_by_source_and_every_modality_trains(train, test):
    tr, te = {s.image_id for s in train}, {s.image_id for s in test}
    assert not tr & te
    assert te == set(TEST_SOURCES)
    assert {s.modality for s in train} == {im.modality for im in builtin_images()}
    # multi-frame sources stay on one side: all three echo frames are in train
    assert {dict(s.meta)["view"].split("/")[1] for s in train if s.image_id == "us-echo"} == {"f0", "f10", "f20"}


def test_deterministic_for_a_seed_and_seed_changes_views(test):
    again = micro_med_vqa("test")
    assert [(s.qid, s.question, s.answer) for s in again] == [(s.qid, s.question, s.answer) for s in test]
    a, b = _views(test), _views(again)
    for key in list(a)[:12]:
        assert np.array_equal(np.asarray(a[key].load_image()), np.asarray(b[key].load_image()))
    other = _views(micro_med_vqa("test", seed=1))
    diffs = [not np.array_equal(np.asarray(a[k].load_image()), np.asarray(other[k].load_image())) for k in list(a)[:12]]
    assert all(diffs)


def test_images_at_model_size_and_grey_sources_stay_grey(test):
    colour = {im.image_id: im.is_color for im in builtin_images()}
    spread = collections.defaultdict(list)
    for s in _views(test).values():
        arr = np.asarray(s.load_image()).astype(int)
        assert arr.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
        spread[s.image_id].append(int(np.abs(arr - arr.mean(axis=2, keepdims=True)).max()))
    for sid, vals in spread.items():
        assert (max(vals) > 20) if colour[sid] else (max(vals) <= 1), (sid, vals)


def test_colour_answers_follow_the_source_label(test):
    colour = {im.image_id: im.is_color for im in builtin_images()}
    for s in test:
        if dict(s.meta)["question_type"] == "colour":
            asks_colour = "colour" in s.question
            assert (s.answer == "Yes") == (asks_colour == colour[s.image_id]), s.question


@pytest.mark.parametrize("split", ["train", "test"])
def test_lesion_is_where_the_answers_say(split):
    """Pixel statistics: the lesion-vs-no-lesion difference lies in the half the answer names,
    has the sign the brightness answer names, and views without a lesion have none."""
    images = builtin_images()
    bank = SourceBank(images)
    views = plan_views(images, bank, split, 0)
    samples = micro_med_vqa(split)
    by_view = collections.defaultdict(dict)
    for s in samples:
        by_view[dict(s.meta)["view"]][dict(s.meta)["question_type"]] = s
    checked = 0
    for view in views[:: 3 if split == "train" else 1]:
        qs = by_view[view.key]
        with_l, placement = render_view(view, bank)
        assert np.array_equal(np.asarray(with_l), np.asarray(qs["lesion"].load_image()))  # samples use this view
        if view.lesion is None:
            assert qs["lesion"].answer == "No" and placement is None and "lesion_side" not in qs
            continue
        without, _ = render_view(view, bank, with_lesion=False)
        diff = np.asarray(with_l, dtype=float).mean(axis=2) - np.asarray(without, dtype=float).mean(axis=2)
        mass = np.abs(diff)
        half = IMAGE_SIZE // 2
        left, right = mass[:, :half].sum(), mass[:, half:].sum()
        assert mass.max() >= 25, (view.key, mass.max())  # visible
        side = "left" if left > right else "right"
        assert min(left, right) == 0, view.key  # the whole disc is inside one half
        ys, xs = np.nonzero(mass > 0)
        # a disc of the placement's size (core + 2 px rim), where the placement says
        assert abs(xs.mean() - placement.cx) < 2 and abs(ys.mean() - placement.cy) < 2, view.key
        assert xs.max() - xs.min() <= 2 * placement.radius + 7, view.key
        side_q = qs["lesion_side"]
        asks = "left" if "left" in side_q.question else "right"
        assert (side_q.answer == "Yes") == (asks == side), (view.key, side_q.question, side_q.answer)
        bright_q = qs["lesion_brightness"]
        yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] + 0.5
        core = np.hypot(xx - placement.cx, yy - placement.cy) <= 0.6 * placement.radius
        is_bright = diff[core].mean() > 0  # the core (the rim has the opposite polarity)
        asks_bright = "bright" in bright_q.question
        assert (bright_q.answer == "Yes") == (asks_bright == is_bright), (view.key, bright_q.question)
        assert qs["lesion"].answer == "Yes"
        checked += 1
    assert checked >= 20


def test_unknown_split_is_a_data_error():
    with pytest.raises(DataError, match="validate"):
        micro_med_vqa("validate")
