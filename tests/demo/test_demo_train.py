"""Stage-2 examples of the demo training: the fresh-lesion questions and their curriculum forms.

The answers are checked against the pixels (where the image changed against its lesion-free
background), not against the lesion object the same code drew.
"""
from __future__ import annotations

import numpy as np
import pytest

from medlite.demo.train import BRIGHT_CHOICE, SIDE_CHOICE, _fresh_example, caption_for, tokenizer_corpus
from medlite.demo.vision import render_views
from medlite.demo.micro_vqa import micro_med_vqa
from medlite.context import RunContext


@pytest.fixture(scope="module")
def bank_and_samples(tmp_path_factory):
    ctx = RunContext(cache_dir=tmp_path_factory.mktemp("cache"), quiet=True)
    samples = micro_med_vqa("train")[::7]  # every source, colour ones included
    return render_views(samples, ctx), samples


def _of_type(samples, kind):
    return [(i, s) for i, s in enumerate(samples) if dict(s.meta)["question_type"] == kind]


def _lesion_from_pixels(img: np.ndarray, background: np.ndarray):
    """(side, bright) of the one drawn lesion, from the pixels that changed: the disc and its rim
    are round, so the centroid of the change is the centre, and the core is what lies within half
    the changed radius of it."""
    diff = img.astype(np.float32).mean(axis=2) - background.astype(np.float32).mean(axis=2)
    ys, xs = np.nonzero(np.abs(diff) > 25)
    cy, cx = ys.mean(), xs.mean()
    side = "left" if cx < img.shape[1] / 2 else "right"
    radius = np.sqrt(len(xs) / np.pi)
    yy, xx = np.mgrid[:img.shape[0], :img.shape[1]]
    core = np.hypot(yy - cy, xx - cx) < 0.5 * radius
    return side, float(diff[core].mean()) > 0


@pytest.mark.parametrize("kind", ["lesion_side", "lesion_brightness"])
@pytest.mark.parametrize("form", ["asked", "direct", "choice"])
def test_side_and_brightness_answers_match_the_drawn_pixels(bank_and_samples, kind, form, monkeypatch):
    import medlite.demo.vision as dv

    bank, samples = bank_and_samples
    # lesions on the view itself (not a texture / mosaic), so the lesion-free image is known
    monkeypatch.setattr(dv, "random_background",
                        lambda bank, row, rng, textures=None: (bank.clean[row].astype(np.float32), bool(bank.is_color[row])))
    rows = _of_type(samples, kind)[:24]
    assert rows
    rng = np.random.default_rng(5)
    answers = set()
    for i, s in rows:
        img, question, answer = _fresh_example(s, kind, bank, bank.index[i], rng, textures=None, form=form)
        answers.add(answer)
        side, bright = _lesion_from_pixels(img, bank.clean[bank.index[i]])
        if form == "asked":
            assert question == s.question
        elif form == "direct":
            assert ("left" in question) if kind == "lesion_side" else ("bright" in question)
            assert " right" not in question and "dark" not in question
        else:
            assert question == (SIDE_CHOICE if kind == "lesion_side" else BRIGHT_CHOICE)
        truth = side if kind == "lesion_side" else ("bright" if bright else "dark")
        if form == "choice":
            assert answer == truth.capitalize()
        else:
            asked = "left" if "left" in question else "right" if kind == "lesion_side" else (
                "bright" if "bright" in question else "dark")
            assert answer == ("Yes" if asked == truth else "No"), (question, truth)
    # both answers occur (a constant answer would pass the loop above on a biased draw)
    assert len(answers) == 2, answers


def test_captions_and_choice_questions_are_in_the_tokenizer_corpus(bank_and_samples):
    _, samples = bank_and_samples
    corpus = " ".join(tokenizer_corpus())
    assert SIDE_CHOICE in corpus and BRIGHT_CHOICE in corpus
    with_lesion = [s for s in samples if dict(s.meta).get("lesion_side")]
    s = with_lesion[0]
    m = dict(s.meta)
    text = caption_for(s)
    assert f"lesion on the {m['lesion_side']} side" in text
    assert ("bright" if m["lesion_bright"] else "dark") in text


@pytest.mark.parametrize("form", ["asked", "direct"])
def test_colour_answers_follow_the_background(bank_and_samples, form):
    bank, samples = bank_and_samples
    rows = _of_type(samples, "colour")[:40]
    rng = np.random.default_rng(7)
    answers = set()
    for i, s in rows:
        img, question, answer = _fresh_example(s, "colour", bank, bank.index[i], rng, textures=None, form=form)
        # greyscale images have three equal channels; colour ones do not
        is_color = bool(np.abs(img[..., 0].astype(int) - img[..., 1]).max() > 0
                        or np.abs(img[..., 1].astype(int) - img[..., 2]).max() > 0)
        if form == "direct":
            assert "colour" in question.lower()
        else:
            assert question == s.question
        positive = "colour" in question.lower()
        assert answer == ("Yes" if positive == is_color else "No"), (question, is_color)
        answers.add(answer)
    assert len(answers) == 2, answers
