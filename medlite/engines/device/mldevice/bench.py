"""``bench``: image encode, prefill, time to first token, decode tokens/s, with Jetson power and memory.

Figures are medians over ``--runs``; power/RAM/GPU load come from tegrastats samples taken during
each phase (``mldevice.tegra``), with the nvpmodel mode. ``bench.json`` goes to
``artifact/device/`` (the folder the manifest declares for device-built files, not hashed).
"""
from __future__ import annotations

import json
import platform
import resource
import statistics
import time
from pathlib import Path

from mldevice import tegra


def _one(vlm, image, question: str, max_new_tokens: int) -> dict:
    marks = []
    t0 = time.perf_counter()
    vlm.image_embeddings(image)
    t1 = time.perf_counter()
    ans = vlm.answer_batch([image], [question], max_new_tokens=max_new_tokens,
                           on_step=lambda out: marks.append((time.perf_counter(), len(out[0]))))
    steps = len(marks)
    first = marks[0][0] if marks else time.perf_counter()
    last = marks[-1][0] if marks else first
    return {"encode_s": t1 - t0, "ttft_s": first - t1, "t_start": t0, "t_encoded": t1, "t_first": first,
            "t_end": last, "decode_steps": max(0, steps - 1),
            "decode_tok_s": (steps - 1) / (last - first) if steps > 1 and last > first else None, "answer": ans[0]}


def run_bench(root: Path, vlm, image, args) -> int:
    """Measure, print a table and write bench.json (unless --no-write)."""
    sampler = tegra.Sampler()
    try:
        _one(vlm, image, args.question, args.max_new_tokens)         # warm-up
        runs = [_one(vlm, image, args.question, args.max_new_tokens) for _ in range(max(1, args.runs))]
    finally:
        sampler.stop()
    med = lambda k: statistics.median([r[k] for r in runs if r[k] is not None]) if any(  # noqa: E731
        r[k] is not None for r in runs) else None
    phases = {"image_encode": sampler.phase(runs[-1]["t_start"], runs[-1]["t_encoded"]),
              "prefill": sampler.phase(runs[-1]["t_encoded"], runs[-1]["t_first"]),
              "decode": sampler.phase(runs[-1]["t_first"], runs[-1]["t_end"])}
    out = {"format": "medlite-device-bench/1", "backend": vlm.runs, "host": platform.node(),
           "machine": platform.machine(), "jetson": tegra.is_jetson(), "nvpmodel": tegra.nvpmodel_mode(),
           "runs": len(runs), "max_new_tokens": args.max_new_tokens, "answer": runs[-1]["answer"],
           "image_encode_ms": round(1000 * med("encode_s"), 2), "time_to_first_token_ms": round(1000 * med("ttft_s"), 2),
           "decode_tokens_per_s": None if med("decode_tok_s") is None else round(med("decode_tok_s"), 2),
           "decode_steps": runs[-1]["decode_steps"],
           "process_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 3),
           "phases": phases, "paper": tegra.PAPER}
    watts = phases["decode"].get("watts")
    ram = max((p.get("peak_ram_gb") for p in phases.values() if isinstance(p.get("peak_ram_gb"), float)), default=None)
    print(f"backend        {', '.join(f'{k}: {v}' for k, v in sorted(vlm.runs.items()))}")
    print(f"nvpmodel       {out['nvpmodel']}")
    print(f"image encode   {out['image_encode_ms']} ms")
    print(f"first token    {out['time_to_first_token_ms']} ms (after the image is encoded)")
    print(f"decode         {out['decode_tokens_per_s']} tokens/s ({out['decode_steps']} steps)")
    print(f"power (decode) {watts if watts is not None else 'n/a'} W   paper: {tegra.PAPER['watts']} W")
    print(f"peak RAM       {ram if ram is not None else tegra.NOT_A_JETSON} GB (system, tegrastats)   "
          f"paper: {tegra.PAPER['memory_gb']} GB; this process {out['process_peak_rss_gb']} GB")
    if not args.no_write:
        dest = root / "artifact" / "device" / "bench.json"
        dest.parent.mkdir(exist_ok=True)
        dest.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {dest}")
    return 0
