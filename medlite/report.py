"""``report.md`` and ``report.json`` of an artifact: status, gates, metrics, files, disagreements.

Both are written before the manifest and hashed by it, so they contain nothing volatile (no dates,
timings or temporary paths); timings live in ``build-info.json``.
"""
from __future__ import annotations

import json
from pathlib import Path

from medlite.units import human_bytes

REPORT_MD, REPORT_JSON = "report.md", "report.json"
MAX_ROWS = 500          # per-question rows kept in report.json
MAX_MD_DISAGREEMENTS = 20


def _files(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size
            for p in sorted(folder.rglob("*")) if p.is_file()}


def report_json(manifest: dict, rows: list[dict], files: dict[str, int]) -> dict:
    """The machine-readable report."""
    return {
        "status": manifest["status"], "version": manifest["version"], "model": manifest["model"],
        "recipe": manifest["recipe"], "target": manifest["target"]["name"],
        "stages": manifest["stages"], "metrics": manifest["metrics"], "gates": manifest["gates"],
        "files": files, "sections": manifest.get("sections", {}), "warnings": manifest.get("warnings", []),
        "questions": rows[:MAX_ROWS], "questions_truncated": max(0, len(rows) - MAX_ROWS),
    }


def _stage_details(m: dict, stage_reports: dict) -> list[str]:
    """Per stage: bytes before/after, and the lines the stage wrote for the report."""
    out = []
    for name, sec in m.get("sections", {}).items():
        lines = list(stage_reports.get(name, []))
        if sec.get("bytes_before") is not None and sec.get("bytes_after") is not None:
            b0, b1 = sec["bytes_before"], sec["bytes_after"]
            lines.insert(0, f"- bytes {human_bytes(b0)} → {human_bytes(b1)} ({b1 / b0:.2f}×)" if b0 else
                         f"- bytes → {human_bytes(b1)}")
        if lines:
            out += [f"### {name}", ""] + lines + [""]
    graphs = m.get("graphs") or {}
    if graphs:
        out += ["### graphs", "", "| graph | precision | runs on | quantization |", "|---|---|---|---|"]
        for g, info in graphs.items():
            where = "TensorRT (and ONNX Runtime)" if info["runtime"] == "tensorrt" else \
                f"ONNX Runtime only — {info['runtime_reason']}"
            q = info.get("quantization") or {}
            out.append(f"| {g} | {info.get('precision')} | {where} | {q.get('scheme', '—')} |")
        out.append("")
    return out


def _device_text(d: dict | None) -> str:
    """``cpu`` or ``cuda:0 (NVIDIA H100 80GB HBM3, 85.05 GB)``; the peak GPU memory of each phase varies between
    identical builds, so it is on the stage lines and in ``build-info.json``, not in this hashed report."""
    from medlite.devices import describe_line

    if not d or d.get("type", "cpu") == "cpu":
        return "cpu"
    return describe_line(d) + " (peak GPU memory per phase: the stage lines and `build-info.json`)"


def report_md(manifest: dict, rows: list[dict], files: dict[str, int], stage_reports: dict | None = None,
              memory: dict | None = None) -> str:
    """The human-readable report (Markdown); ``memory``: the device-memory estimate (:func:`device_memory`)."""
    from medlite.checks import Gate

    m, t = manifest, manifest["target"]
    mark = "PASSED" if m["status"] == "passed" else "FAILED"
    out = [f"# {m['model']} · {m['recipe']['name']} {m['version']} — {mark}", ""]
    out += [f"- target: **{t['name']}** ({t['description']}, {t['arch']}, TensorRT {t['tensorrt']}, "
            f"opset ≤ {t['max_opset']}, {t['usable_memory_gb']} GB usable of {t['memory_gb']} GB, "
            f"{t['bandwidth_gbs']} GB/s)",
            f"- source: {m['source'].get('format')} checkpoint `{m['source'].get('path')}` "
            f"({len(m['source'].get('files', {}))} files hashed)",
            f"- built on: {_device_text(m.get('device'))}",
            f"- medlite {m['medlite_version']}; recipe sha256 `{m['recipe']['sha256'][:12]}`"
            + (f"; overrides: {', '.join(m['recipe']['overrides'])}" if m['recipe'].get('overrides') else ""),
            ""]
    out += ["## Stages", ""] + [f"- {'✓' if s.get('ok', True) else '✗'} **{s['name']}**: {s['detail']}"
                                for s in m["stages"]] + [""]
    out += _stage_details(m, stage_reports or {})
    out += ["Per-phase timings (references, artifact, each stage) are in `build-info.json` (not hashed: "
            "they differ between identical builds).", ""]
    if m["gates"]:
        out += ["## Gates", "", "| gate | result |", "|---|---|"]
        for g in m["gates"]:
            gate = Gate(**g)
            state = {True: "pass", False: "**FAIL**", None: "reported"}[gate.passed]
            out.append(f"| {gate.name} | {state}: {gate.describe()} |")
        out.append("")
    sec = m.get("sections", {})
    if "export" in sec or "engines" in sec:
        out += ["## Deployment", ""]
        if "export" in sec:
            e = sec["export"]
            trt = ", ".join(f"{g} {'ok' if c['ok'] else 'FAILS'}" for g, c in e.get("trt_check", {}).items())
            out.append(f"- ONNX {e['precision']} opset {e['opset']}; TensorRT {t['tensorrt']} operator check: {trt}")
        if memory:
            # the one device-memory model (medlite.engines.memory): the same figure as plan and build_engines.sh
            out.append(f"- estimated device memory {memory['line']}; KV cache and activations at "
                       f"{memory['context_tokens']} tokens × batch {memory['batch']} ({memory['context_from']})"
                       + (f"; not included: {memory['not_included']}" if memory.get("not_included") else ""))
        if "engines" in sec:
            out.append("- build the TensorRT engines on the Jetson: `engines/build_engines.sh` "
                       "(engines are not portable across GPUs or TensorRT versions)")
        out.append("")
    if m["metrics"]:
        out += ["## Metrics", "", "| metric | value |", "|---|---|"]
        out += [f"| {k} | {v} |" for k, v in m["metrics"].items()] + [""]
    dis = [r for r in rows if not r.get("agree", True)]
    if rows:
        out += [f"## Disagreements ({len(dis)} of {len(rows)} questions)", ""]
        if dis:
            out += ["| qid | modality | question | source | artifact | KL |", "|---|---|---|---|---|---|"]
            for r in dis[:MAX_MD_DISAGREEMENTS]:
                cells = [str(r[k]).replace("|", "\\|").replace("\n", " ")
                         for k in ("qid", "modality", "question", "source", "artifact", "kl")]
                out.append("| " + " | ".join(cells) + " |")
            if len(dis) > MAX_MD_DISAGREEMENTS:
                out.append(f"\n… {len(dis) - MAX_MD_DISAGREEMENTS} more in report.json")
        else:
            out.append("Every answer of the artifact equals the source model's (after normalisation).")
        out.append("")
    out += ["## Files", "", "| file | size |", "|---|---|"]
    out += [f"| {name} | {human_bytes(size)} |" for name, size in files.items()]
    out += ["", f"Every file's sha256 is in `manifest.json`; `medlite verify {m['model']}/{m['recipe']['name']}/"
                f"{m['version']}` re-checks them and re-runs the gates.", ""]
    if m.get("warnings"):
        out += ["## Warnings", ""] + [f"- {w}" for w in m["warnings"]] + [""]
    pk = ", ".join(f"{k} {v}" for k, v in m["packages"].items() if v)
    out += ["## Environment", "", pk, ""]
    return "\n".join(out)


def write_reports(folder: Path, manifest: dict, rows: list[dict], stage_reports: dict | None = None) -> None:
    """Write ``report.json`` and ``report.md`` into the artifact folder (before the manifest hashes it).

    ``stage_reports``: stage name -> the markdown lines its StageResult wrote."""
    folder = Path(folder)
    files = _files(folder)
    memory = device_memory(folder, manifest)
    rj = report_json(manifest, rows, files)
    rj["device_memory"] = memory
    (folder / REPORT_JSON).write_text(json.dumps(rj, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                                      encoding="utf-8")
    (folder / REPORT_MD).write_text(report_md(manifest, rows, files, stage_reports, memory), encoding="utf-8")


def device_memory(folder: Path, manifest: dict) -> dict | None:
    """The artifact's device-memory estimate: the engines stage's (engines.json) where it has one, else
    the same model for the export on ONNX Runtime at the decoder's maximum positions."""
    from medlite.engines.memory import for_export
    from medlite.engines.targets import TARGETS
    from medlite.runtime.config import CONFIG_FILE

    eng = manifest.get("sections", {}).get("engines")
    if eng and eng.get("memory", {}).get("line"):
        return eng["memory"]
    cfg_path = Path(folder) / CONFIG_FILE
    target = TARGETS.get(manifest["target"]["name"])
    if target is None or not cfg_path.is_file():
        return None
    return for_export(folder, json.loads(cfg_path.read_text(encoding="utf-8")), target).to_dict()
