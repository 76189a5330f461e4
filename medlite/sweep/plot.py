"""The sweep's plot: accuracy vs device memory (PNG), readable without colour.

Each built variant is a labelled point: filled when it passes its gates, hollow when a gate failed.
The Pareto front is a dashed step line through its points (also marked with a larger ring); each
target's memory budget is a vertical line, each in its own line style, named in the legend. The x axis
is logarithmic when the points and budgets span more than a factor of ten (a micro model next to GB
budgets). matplotlib is imported lazily (``pip install 'medlite[sweep]'``).
"""
from __future__ import annotations

import math
from pathlib import Path

from medlite.errors import MedliteError
from medlite.units import human_bytes

LINESTYLES = [(0, (1, 1)), (0, (5, 2)), (0, (3, 1, 1, 1)), (0, (8, 2, 1, 2)), "-", (0, (1, 3))]


def plot_points(result: dict) -> list[dict]:
    """The points the plot draws: ``{variant, memory, accuracy, passed, pareto}`` of every built variant."""
    from medlite.sweep.results import BUILT, accuracy

    t = result["primary_target"]
    out = []
    for r in result["rows"]:
        mem, acc = (r.get("memory_bytes") or {}).get(t), accuracy(r)
        if r["status"] in BUILT and mem is not None and acc is not None:
            out.append({"variant": r["variant"], "memory": float(mem), "accuracy": float(acc),
                        "passed": r["status"] == "passed", "pareto": bool(r.get("pareto"))})
    return out


def _label_offsets(pts: list[dict], xs_all: list[float], log: bool) -> list[int]:
    """Vertical label offsets (points) so labels of points that coincide at the plot's scale (the x span
    includes the budget lines) do not overprint."""
    if not pts:
        return []
    f = (lambda v: math.log10(max(v, 1.0))) if log else (lambda v: v)
    dx = (max(map(f, xs_all)) - min(map(f, xs_all))) or 1.0
    ys = [p["accuracy"] for p in pts]
    dy = (max(ys) - min(ys)) or 1.0
    out = []
    for i, p in enumerate(pts):
        near = sum(1 for q in pts[:i] if abs(f(q["memory"]) - f(p["memory"])) < 0.08 * dx
                   and abs(q["accuracy"] - p["accuracy"]) < 0.05 * dy)
        out.append(4 + 11 * near)
    return out


def _budgets(result: dict) -> list[tuple[str, float]]:
    from medlite.engines.targets import TARGETS

    return [(t, TARGETS[t].usable_memory_gb * 1e9) for t in result["targets"]]


def _points(ax, pts: list[dict], xs_all: list[float], log: bool, *, labels: bool) -> None:
    """The variants (filled: gates pass, hollow: a gate failed), their labels and the Pareto front."""
    for p, dy in zip(pts, _label_offsets(pts, xs_all, log)):
        ax.plot(p["memory"], 100 * p["accuracy"], marker="o", markersize=8, linestyle="none", color="black",
                markerfacecolor="black" if p["passed"] else "white", zorder=3)
        if labels:
            ax.annotate(p["variant"], (p["memory"], 100 * p["accuracy"]), textcoords="offset points",
                        xytext=(8, dy), fontsize=7,
                        arrowprops={"arrowstyle": "-", "color": "0.6", "linewidth": 0.5} if dy > 4 else None)
    front = sorted((p for p in pts if p["pareto"]), key=lambda p: p["memory"])
    if front:
        ax.step([p["memory"] for p in front], [100 * p["accuracy"] for p in front], where="post", color="black",
                linestyle="--", linewidth=1, label="Pareto front", zorder=2)
        ax.plot([p["memory"] for p in front], [100 * p["accuracy"] for p in front], marker="o", markersize=14,
                linestyle="none", markerfacecolor="none", color="black", zorder=2)


def _style(ax, log: bool) -> None:
    from matplotlib.ticker import FuncFormatter

    if log:
        ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: human_bytes(v)))
    ax.grid(True, linestyle=":", linewidth=0.5)
    ax.tick_params(axis="x", labelsize=7)


def write_plot(result: dict, path: Path) -> int:
    """Draw the plot to ``path`` (PNG); returns the number of points drawn.

    When the points sit within a few percent of the budgets' scale (a micro model: the runtime reserve
    dominates), a second panel zooms on them so they can be told apart and labelled."""
    try:
        import matplotlib
    except ImportError:
        raise MedliteError("the sweep plot needs matplotlib: pip install 'medlite[sweep]' (the table is written "
                           "without it)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = plot_points(result)
    budgets = _budgets(result)
    xs = [p["memory"] for p in pts] + [b for _, b in budgets]
    log = bool(xs) and max(xs) / max(min(xs), 1) > 10
    mem = [p["memory"] for p in pts]
    zoom = len(pts) > 1 and (max(mem) - min(mem)) < 0.02 * (max(xs) - min(xs))
    fig, axes = plt.subplots(1, 2 if zoom else 1, figsize=(11 if zoom else 8, 5), dpi=120, squeeze=False)
    ax = axes[0][0]
    _points(ax, pts, xs, log, labels=not zoom)
    for i, (name, budget) in enumerate(budgets):
        ax.axvline(budget, color="0.35", linestyle=LINESTYLES[i % len(LINESTYLES)], linewidth=1.2,
                   label=f"{name} budget {human_bytes(budget)}")
    _style(ax, log)
    ax.plot([], [], marker="o", linestyle="none", color="black", label="gates pass")
    ax.plot([], [], marker="o", linestyle="none", color="black", markerfacecolor="white", label="a gate failed")
    ax.set_xlabel(f"device memory estimate on {result['primary_target']}")
    ax.set_ylabel("closed-question accuracy (%)")
    ax.legend(fontsize=7, loc="best")
    if zoom:
        z = axes[0][1]
        _points(z, pts, mem, False, labels=True)
        _style(z, False)
        z.set_xlabel(f"device memory on {result['primary_target']} (zoom on the variants)")
        z.margins(x=0.25, y=0.2)
    fig.suptitle(f"medlite sweep {result['sweep']}: accuracy vs device memory — accuracy: {result['accuracy_from']}",
                 fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)
    return len(pts)
