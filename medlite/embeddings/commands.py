"""``medlite embed`` and ``medlite probe``: argparse options (stdlib only) and the two handlers."""
from __future__ import annotations

import json
from pathlib import Path

from medlite.embeddings import POOLS, SOURCES


def add_embed_args(p) -> None:
    """The ``embed`` subcommand's options (argparse only; called by ``medlite.cli``)."""
    p.add_argument("--model", default=None, metavar="PATH",
                   help="artifact / ONNX export folder (ONNX Runtime, no torch) or checkpoint folder (PyTorch); "
                        "OUT/<model>/<recipe> means its latest artifact; default: the built-in demo model")
    p.add_argument("--images", nargs="+", required=True, metavar="DIR|FILE",
                   help="image files, folders (recursive) or globs: DICOM, NIfTI, PNG, JPEG, TIFF")
    p.add_argument("--out", required=True, metavar="FILE", help="embeddings file: .npz, or .parquet (needs pyarrow)")
    p.add_argument("--from", dest="source", choices=list(SOURCES), default="projector",
                   help="projector: the image embeddings the language model sees (default; artifacts have only "
                        "these); vision: the vision tower's output before the projector (checkpoints only)")
    p.add_argument("--pool", choices=list(POOLS), default="mean",
                   help="how the image's tokens become one vector: mean (default), max, or first token")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="images per forward pass (default 8)")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out images that cannot be decoded (each named in a warning) instead of stopping")
    for flag, kw in (("--base", {"metavar": "PATH", "help": "base checkpoint of a LoRA adapter (--model)"}),
                     ("--vision-tower", {"metavar": "PATH", "help": "local vision tower a legacy checkpoint names"}),
                     ("--vision-weights", {"choices": ["checkpoint", "tower"],
                                           "help": "which vision weights win when both carry different ones"})):
        p.add_argument(flag, default=None, **kw)


def add_probe_args(p) -> None:
    """The ``probe`` subcommand's options (argparse only)."""
    p.add_argument("--embeddings", required=True, metavar="FILE", help="file written by `medlite embed`")
    p.add_argument("--labels", required=True, metavar="CSV",
                   help="CSV with columns file,label (file: the name stored in the embeddings file, or its base name)")
    p.add_argument("--test-size", type=float, default=0.25, metavar="F",
                   help="held-out fraction of the stratified split (default 0.25; at least one per class)")
    p.add_argument("--c", type=float, default=1.0, metavar="C", help="inverse L2 strength of the probe (default 1.0)")
    p.add_argument("--max-iter", type=int, default=1000, metavar="N", help="solver iterations (default 1000)")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="BLAS/OpenMP threads for the probe (default 1: its matrices are small, extra threads "
                        "only contend)")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the results as a JSON file")


def _bytes(n: int) -> str:
    from medlite.units import human_bytes

    return human_bytes(n)


def _identity(m: dict) -> str:
    """One phrase naming the model version: artifact version, export graph hash or checkpoint format."""
    if m["kind"] == "artifact":
        return f"artifact {m.get('version')}"
    if m["kind"] == "onnx-export":
        return f"ONNX export, {m['vision_graph']} sha256 {m['vision_graph_sha256'][:12]}"
    return f"{m.get('source', {}).get('format', '')} checkpoint".strip()


def cmd_embed(args, ctx) -> int:
    """Handler of ``medlite embed``."""
    from medlite.embeddings.embed import run_embed

    res = run_embed(args, ctx)
    if ctx.json_mode:
        print(json.dumps(res.to_dict(), sort_keys=True, default=str))
        return 0
    skipped = f"; {res.skipped} unreadable left out" if res.skipped else ""
    rows = [("wrote", f"{res.out} ({res.images} image{'s' if res.images != 1 else ''} x {res.dim} floats{skipped})"),
            ("model", f"{res.model['path']} ({_identity(res.model)}; {res.runtime['name']} {res.runtime['version']})"),
            ("vectors", f"{res.pool}-pooled {res.source} output"),
            ("load", f"{res.load_s:.1f} s"),
            ("embed", f"{res.embed_s:.1f} s, {res.images_per_s:.2f} images/s"),
            ("peak RSS", _bytes(res.peak_rss_bytes))]
    print("\n".join(f"{k:>9}  {v}" for k, v in rows))
    return 0


def cmd_probe(args, ctx) -> int:
    """Handler of ``medlite probe``."""
    import numpy as np

    from medlite.embeddings.probe import match_labels, read_labels, run_probe, sklearn_modules
    from medlite.embeddings.store import read_embeddings
    from medlite.errors import DataError
    from medlite.fileio import ensure_writable_file, write_json_atomic

    sklearn_modules()                                   # missing extra: say so before reading anything
    if args.out:
        ensure_writable_file(args.out, "--out")
    data = read_embeddings(args.embeddings)
    X, y, names = match_labels(data, read_labels(args.labels), labels_path=args.labels,
                               emb_path=args.embeddings, ctx=ctx)
    bad = [n for n, v in zip(names, X) if not np.isfinite(v).all()]
    if bad:
        raise DataError(f"{args.embeddings}: {len(bad)} embeddings are not finite (NaN/inf), e.g. {', '.join(bad[:3])}")
    res = run_probe(X, y, test_size=args.test_size, seed=args.seed, c=args.c, max_iter=args.max_iter,
                    labels_path=args.labels, threads=args.threads)
    res.update({"embeddings": str(Path(args.embeddings)), "labels": str(Path(args.labels)),
                "embedding_model": {k: data.metadata.get("model", {}).get(k) for k in ("kind", "path", "version")},
                "embedding": {k: data.metadata.get(k) for k in ("from", "pool", "dim")}})
    if not res["probe"]["converged"]:
        ctx.warn(f"the probe did not converge in {args.max_iter} iterations (raise --max-iter)")
    if args.out:
        write_json_atomic(args.out, res)
    if ctx.json_mode:
        print(json.dumps(res, sort_keys=True))
        return 0
    p, b = res["probe"], res["baseline"]
    rows = [("data", f"{res['samples']} images, {len(res['classes'])} classes, {res['dim']} dims; "
                     f"stratified split {res['train']} train / {res['test']} test (seed {res['seed']})"),
            ("probe", f"accuracy {p['accuracy']:.3f}, macro-F1 {p['macro_f1']:.3f}"),
            ("baseline", f"accuracy {b['accuracy']:.3f}, macro-F1 {b['macro_f1']:.3f} ({b['model']})"),
            ("train", f"{p['train_s'] * 1e3:.1f} ms ({res['threads']} thread{'s' if res['threads'] > 1 else ''})"),
            ("inference", f"{p['inference_s'] * 1e3:.2f} ms ({p['inference_ms_per_image']:.3f} ms/image)"),
            ("memory", f"probe {_bytes(p['model_bytes'])}, peak RSS {_bytes(res['peak_rss_bytes'])}"),
            ("verdict", "beats the majority-class baseline" if res["beats_baseline"]
             else "does NOT beat the majority-class baseline")]
    print("\n".join(f"{k:>9}  {v}" for k, v in rows))
    return 0
