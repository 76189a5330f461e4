"""Medical VQA scoring: whole-word closed accuracy beside the LLaVA-Med-compatible substring score.

Torch-free (pure Python). Rules (docs/data.md explains them with examples):

* Normalisation: Unicode NFKC, lower case, punctuation → spaces (a decimal point between digits is
  kept), articles (a/an/the) dropped, number words zero..ten → digits, whitespace collapsed.
* Closed questions whose reference is yes/no: the prediction's *first* yes/no word decides
  (synonyms: yeah/yep/true/correct → yes; nope/false/incorrect → no). "normal" is not "no".
* Other closed questions ("left", "MRI", "right side"): correct when the normalised reference
  appears as a whole-word run in the normalised prediction.
* ``closed_substring``: the TinyLLaVA-Med rule reproduced exactly — ``gt.lower() in pred.lower()``
  on the raw strings. It inflates: "no" matches "normal", "not sure", "nodule", "unknown".
* Open questions: exact match of the normalised strings, and token recall — the fraction of the
  reference's distinct normalised tokens found in the prediction.
"""
from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from typing import Optional, Sequence

from medlite.evaluation.samples import CLOSED, OPEN, VqaSample
from medlite.errors import DataError

ARTICLES = frozenset({"a", "an", "the"})
NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten".split())}
YES_WORDS = frozenset({"yes", "yeah", "yep", "true", "correct"})
NO_WORDS = frozenset({"no", "nope", "false", "incorrect"})

_PUNCT = re.compile(r"(?<!\d)\.|\.(?!\d)|[^\w\s.]|_")


def normalize(text) -> str:
    """Normalised answer text (see the module docstring); non-strings (e.g. int answers) allowed."""
    t = unicodedata.normalize("NFKC", str(text)).lower()
    t = _PUNCT.sub(" ", t)
    words = [NUMBER_WORDS.get(w, w) for w in t.split() if w not in ARTICLES]
    return " ".join(words)


def tokens(text) -> list[str]:
    """Normalised tokens of ``text``."""
    return normalize(text).split()


def yes_no(text) -> Optional[str]:
    """"yes"/"no" from the first yes/no word of ``text`` (synonyms included), else None."""
    for w in tokens(text):
        if w in YES_WORDS:
            return "yes"
        if w in NO_WORDS:
            return "no"
    return None


def _contains_run(haystack: list[str], needle: list[str]) -> bool:
    n = len(needle)
    return n > 0 and any(haystack[i:i + n] == needle for i in range(len(haystack) - n + 1))


def closed_correct(prediction: str, reference) -> bool:
    """Whole-word closed-question correctness (yes/no by polarity, others by word run)."""
    ref = yes_no(reference) if normalize(reference) in YES_WORDS | NO_WORDS else None
    if ref is not None:
        return yes_no(prediction) == ref
    return _contains_run(tokens(prediction), tokens(reference))


def substring_match(prediction: str, reference) -> bool:
    """The TinyLLaVA-Med closed rule, exactly: lower-cased reference is a substring of the
    lower-cased prediction (no other normalisation, so "no" matches "normal")."""
    return str(reference).lower() in str(prediction).lower()


def open_exact(prediction: str, reference) -> bool:
    """Normalised strings are equal."""
    return normalize(prediction) == normalize(reference)


def token_recall(prediction: str, reference) -> float:
    """Fraction of the reference's distinct normalised tokens that occur in the prediction."""
    ref = set(tokens(reference))
    if not ref:
        return 0.0
    return len(ref & set(tokens(prediction))) / len(ref)


def score_one(prediction: str, sample: VqaSample) -> dict:
    """Per-sample scores: closed → ``correct``/``substring``; open → ``exact``/``recall``."""
    if sample.answer_type == CLOSED:
        return {"qid": sample.qid, "type": CLOSED, "correct": closed_correct(prediction, sample.answer),
                "substring": substring_match(prediction, sample.answer)}
    if sample.answer_type == OPEN:
        return {"qid": sample.qid, "type": OPEN, "exact": open_exact(prediction, sample.answer),
                "recall": token_recall(prediction, sample.answer)}
    raise DataError(f"sample {sample.qid}: answer_type must be {CLOSED!r} or {OPEN!r}, "
                    f"got {sample.answer_type!r}")


def _aggregate(rows: list[dict]) -> dict:
    closed = [r for r in rows if r["type"] == CLOSED]
    open_ = [r for r in rows if r["type"] == OPEN]

    def mean(vals):
        vals = list(vals)
        return sum(vals) / len(vals) if vals else None  # None, not 0.0: "no questions" ≠ "all wrong"

    return {
        "n": len(rows), "n_closed": len(closed), "n_open": len(open_),
        "closed_accuracy": mean(float(r["correct"]) for r in closed),
        "closed_substring": mean(float(r["substring"]) for r in closed),
        "open_exact": mean(float(r["exact"]) for r in open_),
        "open_recall": mean(r["recall"] for r in open_),
    }


def align_predictions(predictions, samples: Sequence[VqaSample]) -> list[str]:
    """Predictions as a list parallel to ``samples``: a list of the same length, or a mapping
    qid → text (e.g. from :func:`medlite.evaluation.vqa.load_answers_jsonl`)."""
    if isinstance(predictions, Mapping):
        keyed = {str(k): v for k, v in predictions.items()}
        missing = [s.qid for s in samples if str(s.qid) not in keyed]
        if missing:
            shown = ", ".join(missing[:10]) + (" …" if len(missing) > 10 else "")
            raise DataError(f"no prediction for {len(missing)} of {len(samples)} questions (qid {shown})")
        return [str(keyed[str(s.qid)]) for s in samples]
    preds = list(predictions)
    if len(preds) != len(samples):
        raise DataError(f"{len(preds)} predictions for {len(samples)} questions: they must pair up one to one")
    return [str(p) for p in preds]


def score(predictions, samples: Sequence[VqaSample]) -> dict:
    """Score predictions against samples; all rates are fractions in [0, 1] (None when no such
    questions). Keys: ``n``, ``n_closed``, ``n_open``, ``closed_accuracy`` (whole-word),
    ``closed_substring`` (TinyLLaVA-Med rule, inflated), ``open_exact``, ``open_recall``,
    ``by_modality`` (the same keys per modality) and ``rules`` (a one-line description).
    """
    preds = align_predictions(predictions, samples)
    rows = [score_one(p, s) for p, s in zip(preds, samples)]
    out = _aggregate(rows)
    by_mod: dict[str, list[dict]] = {}
    for r, s in zip(rows, samples):
        by_mod.setdefault(s.modality, []).append(r)
    out["by_modality"] = {m: _aggregate(rs) for m, rs in sorted(by_mod.items())}
    out["rules"] = ("closed_accuracy: whole-word match after normalisation (yes/no by the first "
                    "yes/no word); closed_substring: TinyLLaVA-Med 'reference is a substring of the "
                    "prediction' (inflated: 'no' matches 'normal'); open: normalised exact match "
                    "and reference-token recall")
    return out
