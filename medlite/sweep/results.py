"""The sweep's results: the Pareto front, one recommendation per target, and the table (CSV/JSON/Markdown).

Accuracy is the closed-question accuracy of the artifact — on the sweep's ``dataset`` when it has one
(``medlite eval`` on ONNX Runtime), else the check stage's held-out split (``report.json``). Device
memory is the estimate on the sweep's first target (the plot's x axis and the Pareto front's);
recommendations use each target's own estimate and budget.
"""
from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path
from typing import Optional

from medlite.fileio import write_json_atomic, write_text_atomic
from medlite.units import human_bytes

BUILT = ("passed", "failed gates")


def accuracy(row: dict) -> Optional[float]:
    """The accuracy the sweep ranks by (the user's data set when scored on one)."""
    if row.get("dataset"):
        return row["dataset"].get("closed_accuracy")
    return row.get("closed_acc")


def _point(row: dict, target: str) -> Optional[tuple[float, float]]:
    acc, mem = accuracy(row), (row.get("memory_bytes") or {}).get(target)
    if row["status"] not in BUILT or acc is None or mem is None:
        return None
    return float(mem), float(acc)


def mark_pareto(rows: list[dict], target: str) -> None:
    """``row["pareto"] = True`` for every built variant no other beats on both device memory (≤) and
    accuracy (≥), strictly on one of them."""
    pts = {id(r): _point(r, target) for r in rows}
    for r in rows:
        p = pts[id(r)]
        r["pareto"] = p is not None and not any(
            q is not None and q[0] <= p[0] and q[1] >= p[1] and q != p for q in pts.values())


def recommend(rows: list[dict], targets: list[str]) -> dict[str, Optional[dict]]:
    """Per target: the most accurate variant that passes its gates and fits the target's memory budget
    (ties: less memory, then name); None when no variant qualifies."""
    out: dict[str, Optional[dict]] = {}
    for t in targets:
        ok = [r for r in rows if r["status"] == "passed" and r.get("gates_passed") and (r.get("fits") or {}).get(t)
              and accuracy(r) is not None]
        best = min(ok, key=lambda r: (-accuracy(r), r["memory_bytes"][t], r["variant"]), default=None)
        out[t] = None if best is None else {"variant": best["variant"], "accuracy": accuracy(best),
                                            "memory_bytes": best["memory_bytes"][t], "artifact": best["artifact"]}
    return out


def write_recommended(out: Path, recs: dict, model_arg: Optional[str]) -> None:
    """``OUT/recommended/<target>.yaml``: the recommended variant's resolved recipe (its artifact's own
    ``recipe.yaml``), with the command that rebuilds it."""
    folder = out / "recommended"
    folder.mkdir(parents=True, exist_ok=True)
    for target, rec in recs.items():
        dest = folder / f"{target}.yaml"
        if rec is None:
            dest.unlink(missing_ok=True)
            continue
        text = (Path(rec["artifact"]) / "recipe.yaml").read_text(encoding="utf-8")
        cmd = f"medlite build {dest}" + (f" --model {model_arg}" if model_arg else "")
        head = (f"# medlite sweep: recommended for {target} — variant {rec['variant']} "
                f"(accuracy {rec['accuracy']:.3f}, device memory {human_bytes(rec['memory_bytes'])})\n"
                f"# rebuild: {cmd}\n")
        write_text_atomic(dest, head + text)
        rec["recipe"] = str(dest)


# -- table ----------------------------------------------------------------------------------------
def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def flat(row: dict, graphs: list[str], targets: list[str]) -> dict:
    """One CSV row: graphs and targets as their own columns."""
    bench = row.get("bench") or {}
    out = {"variant": row["variant"], "status": row["status"], "overrides": " ".join(row["overrides"])}
    out.update({f"bytes_{g}": (row.get("graph_bytes") or {}).get(g) for g in graphs})
    out["bytes_total"] = row.get("bytes_total")
    out.update({f"memory_{t}": (row.get("memory_bytes") or {}).get(t) for t in targets})
    out.update({k: row.get(k) for k in ("closed_acc", "source_closed_acc", "drop", "agreement", "mean_kl")})
    out["dataset_closed_acc"] = (row.get("dataset") or {}).get("closed_accuracy")
    out["gates"] = {True: "pass", False: "fail"}.get(row.get("gates_passed"), "")
    out["failed_gates"] = " ".join(row.get("failed_gates") or [])
    out["build_seconds"] = row.get("build_seconds")
    out["tokens_per_s"], out["ttft_ms"] = bench.get("decode_tokens_per_s"), bench.get("ttft_ms")
    out["pareto"] = "yes" if row.get("pareto") else ""
    out["error"] = row.get("error")
    return out


def _columns(rows: list[dict]) -> tuple[list[str], list[str]]:
    graphs: list[str] = []
    targets: list[str] = []
    for r in rows:
        graphs += [g for g in (r.get("graph_bytes") or {}) if g not in graphs]
        targets += [t for t in (r.get("memory_bytes") or {}) if t not in targets]
    return graphs, targets


def to_csv(rows: list[dict], targets: list[str]) -> str:
    graphs, _ = _columns(rows)
    flats = [flat(r, graphs, targets) for r in rows]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(flats[0]) if flats else ["variant"], lineterminator="\n")
    w.writeheader()
    for f in flats:
        w.writerow({k: _cell(v) for k, v in f.items()})
    return buf.getvalue()


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f} %"


def to_markdown(result: dict) -> str:
    """The table for people: one line per variant, the Pareto front starred, then the recommendations."""
    rows, targets = result["rows"], result["targets"]
    primary = result["primary_target"]
    head = ["variant", "status", "overrides", "graph bytes", f"device memory ({primary})", "accuracy", "drop",
            "agreement", "mean KL", "build"]
    if any(r.get("bench") for r in rows):
        head += ["tokens/s", "TTFT"]
    out = [f"# Sweep {result['sweep']}", "", f"{result['source']} · {len(rows)} variants · accuracy: "
           f"{result['accuracy_from']} · ★ Pareto front (accuracy vs device memory on {primary})", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mem = (r.get("memory_bytes") or {}).get(primary)
        cells = [("★ " if r.get("pareto") else "") + r["variant"],
                 r["status"] + (f": {r['error']}" if r.get("error") else "")
                 + (f" ({', '.join(r['failed_gates'])})" if r.get("failed_gates") else ""),
                 " ".join(r["overrides"]) or "–", human_bytes(r["bytes_total"]) if r.get("bytes_total") else "–",
                 human_bytes(mem) if mem else "–", _pct(accuracy(r)),
                 "–" if r.get("drop") is None else f"{r['drop']:.1f} pt", _pct(r.get("agreement")),
                 "–" if r.get("mean_kl") is None else f"{r['mean_kl']:.3g}",
                 "–" if r.get("build_seconds") is None else f"{r['build_seconds']:.0f} s"]
        if "tokens/s" in head:
            b = r.get("bench") or {}
            cells += ["–" if b.get("decode_tokens_per_s") is None else f"{b['decode_tokens_per_s']:.1f}",
                      "–" if b.get("ttft_ms") is None else f"{b['ttft_ms']:.0f} ms"]
        out.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    out += ["", "## Recommendation per target", ""]
    for t in targets:
        rec = result["recommendations"].get(t)
        out.append(f"- **{t}**: " + ("no variant passes its gates and fits" if rec is None else
                                     f"{rec['variant']} — accuracy {_pct(rec['accuracy'])}, device memory "
                                     f"{human_bytes(rec['memory_bytes'])}; recipe `{rec.get('recipe', '')}`"))
    return "\n".join(out) + "\n"


def write_results(out: Path, result: dict) -> dict[str, Path]:
    """``results.json``, ``results.csv``, ``results.md`` in ``out`` (each written atomically)."""
    paths = {"json": out / "results.json", "csv": out / "results.csv", "md": out / "results.md"}
    write_json_atomic(paths["json"], result)
    write_text_atomic(paths["csv"], to_csv(result["rows"], result["targets"]))
    write_text_atomic(paths["md"], to_markdown(result))
    return paths


def write_returned(root: Path, rel: str, files: dict[str, bytes], latest: Optional[str]) -> Path:
    """Write an artifact a Ray worker returned (its files, relative to the artifact folder) at ``root/rel``:
    staged and renamed into place, so a half-written artifact is never seen; ``latest`` as the worker had it."""
    from medlite.fileio import staged_folder

    final = root / rel
    if final.exists():
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with staged_folder(final) as tmp:
        for name, data in files.items():
            p = Path(tmp) / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
    if latest:
        write_text_atomic(final.parent / "latest", latest)
    return final
