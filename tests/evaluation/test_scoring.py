"""Scoring against hand-computed numbers, including the substring rule's known inflation."""
from __future__ import annotations

import pytest

from medlite.evaluation.scoring import (closed_correct, normalize, score, substring_match, token_recall,
                                         yes_no)
from medlite.evaluation.samples import VqaSample
from medlite.errors import DataError


def s(qid, answer, kind, modality="CT"):
    return VqaSample(qid=str(qid), question="q?", answer=answer, answer_type=kind, image_id=f"img{qid}",
                     modality=modality)


def test_normalize():
    assert normalize("The  Left-Lung!") == "left lung"
    assert normalize("Two nodules, 3.5 cm.") == "2 nodules 3.5 cm"
    assert normalize(12) == "12"
    assert normalize("Ｙｅｓ") == "yes"  # full-width (NFKC)


@pytest.mark.parametrize("pred,ref,whole,sub", [
    ("normal", "no", False, True),             # the inflation: "no" is a substring of "normal"
    ("No.", "no", True, True),
    ("no, there is none", "no", True, True),
    ("Not sure", "no", False, True),           # "no" in "not"
    ("There is a nodule", "no", False, True),  # "no" in "nodule"
    ("Yes", "No", False, False),
    ("yeah, it is", "yes", True, False),       # synonym counts whole-word, not as substring
    ("yes, but no effusion", "yes", True, True),  # first yes/no word decides
    ("in the left lung", "Left", True, True),
    ("leftward", "left", False, True),
    ("right side", "Right Side", True, True),
    ("the right", "right side", False, False),
    ("MRI", "MRI", True, True),
])
def test_closed_rules(pred, ref, whole, sub):
    assert closed_correct(pred, ref) is whole
    assert substring_match(pred, ref) is sub


def test_yes_no_and_recall():
    assert yes_no("Nope.") == "no" and yes_no("It is true") == "yes" and yes_no("normal") is None
    assert token_recall("the liver and the spleen", "Liver, Kidney") == 0.5
    assert token_recall("anything", "") == 0.0


def test_score_hand_computed():
    samples = [
        s(1, "no", "closed", "CR"),         # pred "normal": whole-word wrong, substring right
        s(2, "yes", "closed", "CR"),        # pred "Yes.": both right
        s(3, "no", "closed", "CT"),         # pred "No": both right
        s(4, "left", "closed", "CT"),       # pred "right": both wrong
        s(5, "Liver", "open", "CT"),        # pred "the liver": exact (article dropped), recall 1
        s(6, "Lung, Heart", "open", "MR"),  # pred "lung": not exact, recall 1/2
        s(7, "CT", "open", "MR"),           # pred "MRI": 0, 0
    ]
    preds = ["normal", "Yes.", "No", "right", "the liver", "lung", "MRI"]
    r = score(preds, samples)
    assert (r["n"], r["n_closed"], r["n_open"]) == (7, 4, 3)
    assert r["closed_accuracy"] == pytest.approx(2 / 4)
    assert r["closed_substring"] == pytest.approx(3 / 4)  # inflated by "normal" ⊃ "no"
    assert r["open_exact"] == pytest.approx(1 / 3)
    assert r["open_recall"] == pytest.approx((1 + 0.5 + 0) / 3)
    cr, ct, mr = r["by_modality"]["CR"], r["by_modality"]["CT"], r["by_modality"]["MR"]
    assert (cr["closed_accuracy"], cr["closed_substring"], cr["open_exact"]) == (0.5, 1.0, None)
    assert (ct["n_closed"], ct["closed_accuracy"], ct["open_exact"], ct["open_recall"]) == (2, 0.5, 1.0, 1.0)
    assert (mr["closed_accuracy"], mr["open_exact"], mr["open_recall"]) == (None, 0.0, 0.25)
    assert "substring" in r["rules"]


def test_score_with_mapping_and_mismatches():
    samples = [s(1, "yes", "closed"), s(2, "no", "closed")]
    r = score({"1": "yes", 2: "no way"}, samples)  # int keys from JSON answers are accepted
    assert r["closed_accuracy"] == 1.0
    with pytest.raises(DataError, match="no prediction for 1 of 2 questions \\(qid 2\\)"):
        score({"1": "yes"}, samples)
    with pytest.raises(DataError, match="1 predictions for 2 questions"):
        score(["yes"], samples)
    with pytest.raises(DataError, match="answer_type"):
        score(["x"], [s(9, "x", "CLOSED")])
