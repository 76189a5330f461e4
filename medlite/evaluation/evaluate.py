"""``medlite eval``: answer a VQA dataset with a checkpoint or a built artifact and score it.

Predictions come from the PyTorch reference generation (:func:`medlite.checkpoints.generate.answer_batch`,
greedy, equal to ``answer`` row by row) for a checkpoint, or from ONNX Runtime (:func:`evaluate_artifact`,
the graphs a device runs) for an artifact / export; scores from :func:`medlite.evaluation.scoring.score`,
so the numbers printed here are the numbers the build gates compare against.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

from medlite.evaluation.samples import VqaSample


def _group_by(preds: list[str], samples: Sequence[VqaSample], key) -> dict:
    """``score`` on each group of samples (the same keys, without the nested per-modality table)."""
    from medlite.evaluation.scoring import score

    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        groups[str(key(s))].append(i)
    out = {}
    for g, idx in sorted(groups.items()):
        m = score([preds[i] for i in idx], [samples[i] for i in idx])
        out[g] = {k: v for k, v in m.items() if k not in ("by_modality", "rules")}
    return out


def evaluate(loaded, samples: Sequence[VqaSample], *, ctx, batch_size: int = 32, max_new_tokens: int = 32) -> dict:
    """Answer every sample and score the answers.

    Returns ``{"metrics": score(...) + "by_question_type" (when samples carry one), "predictions":
    [{qid, question, answer, prediction, answer_type, modality, image_id, correct...}], "model": ...}``.
    Questions are batched (left padding); generation stops early once every row has ended.
    """
    from medlite.checkpoints.generate import answer_batch

    samples = list(samples)
    preds = _answer_all(samples, lambda imgs, qs: answer_batch(loaded, imgs, qs, max_new_tokens=max_new_tokens),
                        ctx=ctx, batch_size=batch_size, where="")
    return {**scored(preds, samples), "model": {"name": loaded.name, "source": loaded.source.to_dict()}}


def _answer_all(samples: list, answer, *, ctx, batch_size: int, where: str) -> list[str]:
    """``answer(images, questions)`` over ``samples`` in batches, with the stage line and a progress bar."""
    preds: list[str] = []
    with ctx.stage("answer") as info:
        with ctx.progress("answer", total=len(samples)) as advance:
            for i in range(0, len(samples), batch_size):
                chunk = samples[i:i + batch_size]
                preds += answer([s.load_image() for s in chunk], [s.question for s in chunk])
                advance(len(chunk))
        info["detail"] = f"{len(samples)} questions{where}"
    return preds


def scored(preds: list[str], samples: Sequence[VqaSample]) -> dict:
    """``{"metrics", "predictions"}`` of answers ``preds`` to ``samples`` (the same for every runtime)."""
    from medlite.evaluation.scoring import score, score_one

    metrics = score(preds, samples)
    rows = [score_one(p, s) for p, s in zip(preds, samples)]
    qtypes = [dict(s.meta).get("question_type") for s in samples]
    if any(qtypes):
        metrics["by_question_type"] = _group_by(preds, samples, lambda s: dict(s.meta).get("question_type", "other"))
    predictions = [{"qid": s.qid, "question": s.question, "answer": s.answer, "prediction": p,
                    "answer_type": s.answer_type, "modality": s.modality, "image_id": s.image_id,
                    **{k: v for k, v in r.items() if k not in ("qid", "type")}}
                   for s, p, r in zip(samples, preds, rows)]
    return {"metrics": metrics, "predictions": predictions}


def evaluate_artifact(vlm, samples: Sequence[VqaSample], *, ctx, batch_size: int = 16,
                      max_new_tokens: int = 32) -> dict:
    """Answer every sample with an ONNX export (:class:`medlite.runtime.OnnxVlm`) and score the answers.

    The same result as :func:`evaluate` (``metrics``, ``predictions``), from the graphs a device runs:
    greedy answers in left-padded batches of ``batch_size`` on ONNX Runtime, scored by the same rules.
    """
    samples = list(samples)
    preds = _answer_all(samples, lambda imgs, qs: vlm.answer_batch(imgs, qs, max_new_tokens=max_new_tokens),
                        ctx=ctx, batch_size=batch_size, where=" on ONNX Runtime")
    return scored(preds, samples)


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def print_report(result: dict, console, *, title: str) -> None:
    """The human summary on ``console``: overall numbers, per-modality and per-question-type tables."""
    from rich.table import Table

    m = result["metrics"]
    console.print(f"[bold]{title}[/]  {m['n']} questions ({m['n_closed']} closed, {m['n_open']} open)")
    console.print(f"  closed accuracy (whole word)        {_fmt(m['closed_accuracy'])}")
    console.print(f"  closed substring (LLaVA-Med rule)   {_fmt(m['closed_substring'])}")
    if m["n_open"]:
        console.print(f"  open exact / token recall           {_fmt(m['open_exact'])} / {_fmt(m['open_recall'])}")
    for name, key in (("modality", "by_modality"), ("question type", "by_question_type")):
        groups = m.get(key)
        if not groups:
            continue
        table = Table(title=f"by {name}", title_justify="left")
        for col in (name, "n", "closed acc", "substring", "open exact", "open recall"):
            table.add_column(col, justify="left" if col == name else "right")
        for g, a in groups.items():
            table.add_row(g, str(a["n"]), _fmt(a["closed_accuracy"]), _fmt(a["closed_substring"]),
                          _fmt(a["open_exact"]), _fmt(a["open_recall"]))
        console.print(table)
