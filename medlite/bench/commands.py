"""``medlite bench``: image-encode latency, prefill, time to first token, decode tokens/s, peak RSS.

On an artifact (or ONNX export folder) it runs the artifact's ONNX Runtime graphs on this
machine's CPU; on a checkpoint it runs PyTorch eager. Results print as a table (or one JSON object
with ``--json``) and, for an artifact, are written next to it as ``bench.json`` — a volatile file
the manifest does not hash (medlite/artifacts.py), so the artifact's hashes stay valid. Results are
printed before the file is written: a read-only artifact loses nothing (a warning says so).
"""
from __future__ import annotations

import json
from pathlib import Path

BENCH_FILE = "bench.json"


def add_bench_args(p) -> None:
    """The ``bench`` subcommand's options (argparse only; called by ``medlite.cli``)."""
    p.add_argument("--model", default=None, metavar="PATH",
                   help="artifact / ONNX export folder (ONNX Runtime) or checkpoint folder (PyTorch); "
                        "OUT/<model>/<recipe> means its latest artifact; default: the built-in demo model")
    p.add_argument("--image", default=None, help="image file (default: the first held-out Micro Med-VQA image)")
    p.add_argument("--question", default=None, help="question (default: that image's first question)")
    p.add_argument("--followup-question", default=None, metavar="Q",
                   help="the second question on the same image timed for followup_ttft_ms, with the image's "
                        "prompt-prefix KV cache kept (default: the question again)")
    p.add_argument("--runs", type=int, default=5, help="timed runs; figures are medians (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="tokens each timed run generates (default 32): the decode figure is timed over all of "
                        "them, past the answer's end; the answer shown stops where it ends")
    p.add_argument("--stop-at-eos", action="store_true",
                   help="stop each run where the answer ends, as ask does (a short answer gives no decode figure)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="the answer and its token count include every generated token, past its end")
    p.add_argument("--no-write", action="store_true", help="do not write bench.json next to the artifact")
    p.add_argument("--standin", action="store_true",
                   help="an extracted device bundle: its graphs on ONNX Runtime behind the engine interface "
                        "instead of TensorRT engines")
    from medlite.devices import add_device_arg

    add_device_arg(p, what="a checkpoint's PyTorch runs (ONNX artifacts run in ONNX Runtime)")


def _prompt(args, ctx):
    """(image, image label, question): the user's or the first held-out builtin pair."""
    from medlite.errors import DataError

    if args.image:
        from medlite.runtime.vlm import load_input_image

        if not args.question:
            raise DataError("--image needs --question")
        return load_input_image(args.image, ctx), str(args.image), args.question
    from medlite.evaluation.vqa import load_dataset

    s = load_dataset("builtin:micro-med-vqa", split="test")[0]
    # the image's own id (the question id embeds the view, "cr-tibia/fNone/v000": no frame is not "fNone")
    return s.load_image(), f"builtin:micro-med-vqa test image {s.image_id}", args.question or s.question


def _backend(args, ctx):
    from medlite.bench.backends import OrtBackend, TorchBackend

    if args.model:
        from medlite.artifacts import resolve_artifact_path

        folder = Path(resolve_artifact_path(Path(args.model)))
        from medlite.engines.bundle_host import ARTIFACT_DIR, is_bundle, open_bundle_vlm

        if is_bundle(folder):                # an extracted device bundle: its engines (or --standin)
            vlm = open_bundle_vlm(folder, standin=bool(getattr(args, "standin", False)), ctx=ctx)
            return OrtBackend(folder / ARTIFACT_DIR, ctx=ctx, max_new_tokens=args.max_new_tokens,
                              ignore_eos=args.ignore_eos, stop_at_eos=args.stop_at_eos, vlm=vlm), folder / ARTIFACT_DIR
        if (folder / "medlite_runtime.json").is_file():
            return OrtBackend(folder, ctx=ctx, max_new_tokens=args.max_new_tokens, ignore_eos=args.ignore_eos,
                              stop_at_eos=args.stop_at_eos), folder
    from medlite.model_choice import load_from_args

    loaded = load_from_args(args, ctx)
    loaded = loaded[0] if isinstance(loaded, tuple) else loaded
    return TorchBackend(loaded, max_new_tokens=args.max_new_tokens, ignore_eos=args.ignore_eos,
                        stop_at_eos=args.stop_at_eos), None


def run_bench(args, ctx):
    """Measure; returns ``(BenchResult, artifact folder or None)``."""
    from medlite.bench.measure import (MIN_DECODE_STEPS, BenchResult, host_info, median_ms, peak_rss_bytes,
                                       summarize, timed_runs)
    from medlite.errors import DataError

    if args.runs < 1 or args.warmup < 0 or args.max_new_tokens < 1:
        raise DataError(f"--runs {args.runs} / --warmup {args.warmup} / --max-new-tokens {args.max_new_tokens}: "
                        "runs and max-new-tokens must be >= 1, warmup >= 0")
    if args.stop_at_eos and args.ignore_eos:
        raise DataError("--stop-at-eos and --ignore-eos contradict each other: name one")
    backend, folder = _backend(args, ctx)
    image, label, question = _prompt(args, ctx)
    backend.check(question)   # prompt + --max-new-tokens within the context, before anything runs
    with ctx.progress("image encode", total=args.warmup + args.runs) as advance:
        def encode():
            backend.encode(image)
            advance(1)
        enc = median_ms(encode, args.runs, args.warmup)
    with ctx.progress("generate", total=args.warmup + args.runs) as advance:
        runs = timed_runs(lambda: backend.generate(image, question), args.runs, args.warmup, advance)
    s = summarize(runs)
    ids = backend.answer_ids(runs[-1].ids)
    s["tokens"] = len(ids)
    followup = getattr(args, "followup_question", None) or question
    if hasattr(backend, "followup"):
        with ctx.progress("follow-up question", total=args.warmup + args.runs) as advance:
            got = backend.followup(image, question, followup, args.runs, args.warmup, advance)
        if got is not None:
            s["followup_ttft_ms"], s["followup_prefill_tokens"] = got
    details = {"ignore_eos": bool(args.ignore_eos), "stop_at_eos": bool(args.stop_at_eos),
               "decode_timed_over": "the answer only" if backend.stops_early else
               f"a fixed {args.max_new_tokens}-token generation, past the answer's end",
               "min_decode_steps": MIN_DECODE_STEPS, "followup_question": followup}
    res = BenchResult(model=str(folder or args.model or "builtin:demo-model"), kind=backend.kind,
                      runtime=backend.runtime, precision=backend.precision, question=question, image=label,
                      prompt_tokens=backend.prompt_tokens(question), runs=args.runs, warmup=args.warmup,
                      max_new_tokens=args.max_new_tokens, image_encode_ms=enc, answer=backend.answer_text(ids),
                      peak_rss_bytes=peak_rss_bytes(), threads=backend.threads, host=host_info(),
                      details=details, **s)
    return res, folder


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _decode(r) -> str:
    steps = _count(r.decode_steps, "step")
    if r.decode_tokens_per_s is None:
        return f"not measured: {steps} timed, fewer than {r.details['min_decode_steps']} ({_too_few(r)})"
    return f"{r.decode_tokens_per_s:.1f} tokens/s ({steps} timed over {r.details['decode_timed_over']})"


def _followup(r) -> str:
    if r.followup_ttft_ms is None:
        return "not measured (this runtime keeps no prefix cache)"
    return (f"{r.followup_ttft_ms:.1f} ms (a second question on the same image: image and prompt prefix "
            f"cached, {_count(r.followup_prefill_tokens, 'token')} prefilled)")


def _too_few(r) -> str:
    """Why a run had too few decode steps, and what gives a figure."""
    if r.details.get("stop_at_eos"):
        return "the answer ended early; drop --stop-at-eos to time a fixed token count"
    return f"raise --max-new-tokens to at least {r.details['min_decode_steps'] + 1}"


def _table(r) -> str:
    from medlite.units import human_bytes

    rows = [("model", f"{r.model} ({r.kind}, {r.runtime}, {r.precision})"),
            ("prompt", f"{r.prompt_tokens} tokens · {r.question!r} · {r.image}"),
            ("image encode", f"{r.image_encode_ms:.1f} ms"), ("prefill", f"{r.prefill_ms:.1f} ms"),
            ("time to first token", f"{r.ttft_ms:.1f} ms"), ("follow-up TTFT", _followup(r)), ("decode", _decode(r)),
            ("peak RSS", human_bytes(r.peak_rss_bytes)), ("threads", str(r.threads)),
            ("runs", f"median of {r.runs} after {_count(r.warmup, 'warm-up')}"),
            ("answer", f"{r.answer!r} ({_count(r.tokens, 'token')})")]
    return "\n".join(f"{k:>20}  {v}" for k, v in rows)


def _write(folder: Path, data: dict, ctx) -> None:
    """bench.json next to the artifact; a folder that cannot be written costs a warning, not the results."""
    from medlite.fileio import write_text_atomic

    path = folder / BENCH_FILE
    try:
        write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    except OSError as e:
        ctx.warn(f"could not write {path}: {e.strerror or e} — the results above are not saved "
                 "(--no-write skips the file; --json prints them as JSON)")
        return
    ctx.info(f"wrote {path}")


def cmd_bench(args, ctx) -> int:
    """Handler of ``medlite bench``: the results first (stdout), then bench.json next to an artifact."""
    res, folder = run_bench(args, ctx)
    data = res.to_dict()
    if res.decode_tokens_per_s is None:
        ctx.warn(f"decode speed not measured: {_count(res.decode_steps, 'decode step')} timed, fewer than "
                 f"{res.details['min_decode_steps']} ({_too_few(res)})")
    print(json.dumps(data, sort_keys=True) if ctx.json_mode else _table(res), flush=True)
    if folder is not None and not args.no_write:
        _write(folder, data, ctx)
    return 0


__all__ = ["BENCH_FILE", "add_bench_args", "cmd_bench", "run_bench"]
