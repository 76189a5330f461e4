"""Pareto front and recommendations on hand-made rows (no builds): the rules, including ties, failed
gates, budgets and the user's data set taking precedence over the check stage's split."""
from __future__ import annotations

from medlite.sweep.results import accuracy, mark_pareto, recommend, to_csv
from medlite.sweep.rows import empty_row


def _row(name, mem, acc, *, status="passed", fits=True, dataset=None):
    r = empty_row(name, [f"x={name}"], status)
    r.update(closed_acc=acc, memory_bytes={"a": mem, "b": mem + 500}, fits={"a": fits, "b": True},
             gates_passed=status == "passed", artifact=f"/x/{name}", dataset=dataset, bytes_total=mem // 2,
             graph_bytes={"vision": 1, "decoder": 2})
    return r


def test_pareto_front():
    rows = [_row("small", 100, 0.80), _row("mid", 200, 0.90), _row("dominated", 250, 0.85),
            _row("big", 300, 0.95), _row("same-as-mid", 200, 0.90), _row("failed", 150, 0.90, status="failed gates"),
            empty_row("broken", [], "error", "boom")]
    mark_pareto(rows, "a")
    front = {r["variant"] for r in rows if r["pareto"]}
    # 'failed' (150, 0.90) dominates mid (200, 0.90): a gate failure is still a point of the trade-off
    assert front == {"small", "failed", "big"}


def test_recommendation_per_target():
    rows = [_row("best-but-too-big", 900, 0.99, fits=False), _row("good", 300, 0.95), _row("tie-larger", 400, 0.95),
            _row("gate-failed", 100, 0.97, status="failed gates"), _row("worse", 100, 0.90)]
    recs = recommend(rows, ["a", "b"])
    assert recs["a"]["variant"] == "good" and recs["a"]["memory_bytes"] == 300      # fits, passes, ties -> smaller
    assert recs["b"]["variant"] == "best-but-too-big" and recs["b"]["memory_bytes"] == 1400
    assert recommend([_row("f", 1, 0.5, status="failed gates")], ["a"]) == {"a": None}


def test_dataset_accuracy_ranks_and_csv():
    r1 = _row("r1", 100, 0.9, dataset={"closed_accuracy": 0.5})
    r2 = _row("r2", 100, 0.5, dataset={"closed_accuracy": 0.7})
    assert accuracy(r1) == 0.5
    assert recommend([r1, r2], ["a"])["a"]["variant"] == "r2"
    lines = to_csv([r1, r2], ["a", "b"]).splitlines()
    assert lines[0].startswith("variant,status,overrides,bytes_vision,bytes_decoder,bytes_total,memory_a,memory_b,")
    assert lines[1].split(",")[:8] == ["r1", "passed", "x=r1", "1", "2", "50", "100", "600"]
