"""The ``medlite`` command line.

Only argparse and the standard library are imported here: every handler lives in the module that
does the work and is imported when its subcommand runs, so ``medlite --help`` is fast and works on
a machine without torch, TensorRT or any compression library.
"""
from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path

# subcommand -> "module:function"; each handler is ``fn(args, ctx) -> int``.
HANDLERS = {
    "inspect": "medlite.checkpoints.commands:cmd_inspect",
    "convert": "medlite.checkpoints.commands:cmd_convert",
    "ask": "medlite.cli:_cmd_ask",
    "demo random": "medlite.checkpoints.commands:cmd_demo_random",
    "demo model": "medlite.demo.commands:cmd_demo_model",
    "eval": "medlite.evaluation.commands:cmd_eval",
    "export": "medlite.export.commands:cmd_export",
    "validate": "medlite.build_commands:cmd_validate",
    "plan": "medlite.build_commands:cmd_plan",
    "build": "medlite.build_commands:cmd_build",
    "verify": "medlite.build_commands:cmd_verify",
    "recipes ls": "medlite.build_commands:cmd_recipes_ls",
    "recipes cp": "medlite.build_commands:cmd_recipes_cp",
}


def _add_model_args(p: argparse.ArgumentParser, *, positional: bool = False) -> None:
    """Options every model-taking command shares (no --model means the built-in demo model)."""
    if not positional:
        p.add_argument("--model", default=None, metavar="PATH",
                       help="checkpoint folder (legacy TinyLLaVA, TinyLLaVA Factory, HF Llava or a LoRA adapter); "
                            "default: the built-in micro TinyLLaVA-Med demo model")
    p.add_argument("--base", default=None, metavar="PATH",
                   help="base checkpoint a LoRA adapter (--model) was trained from")
    p.add_argument("--vision-tower", default=None, metavar="PATH",
                   help="local copy of the vision tower repo a legacy checkpoint names (mm_vision_tower); "
                        "nothing is ever downloaded")
    p.add_argument("--vision-weights", choices=["checkpoint", "tower"], default=None,
                   help="which vision weights win when the checkpoint and --vision-tower both carry different ones")
    p.add_argument("--template", default=None, help="override the chat template (e.g. vicuna_v1, phi, llama)")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used by the docs and tests)."""
    ap = argparse.ArgumentParser(
        prog="medlite",
        description="TinyLLaVA-Med → Jetson Xavier: checkpoints, medical calibration data, ONNX export, "
                    "recipes and versioned artifacts with accuracy gates.")
    from medlite import __version__

    ap.add_argument("--version", action="version", version=f"medlite {__version__}")
    ap.add_argument("--cache-dir", default=None, help="cache folder (default: user cache dir, or $MEDLITE_CACHE)")
    ap.add_argument("--quiet", action="store_true", help="only errors and results")
    ap.add_argument("--seed", type=int, default=0, help="seed for anything random (default 0)")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("inspect", help="detect a checkpoint's format and show its architecture and sizes")
    p.add_argument("path", nargs="?", default=None, help="checkpoint folder (default: the demo model)")
    _add_model_args(p, positional=True)
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("convert", help="write a canonical HF Llava folder that plain transformers loads")
    p.add_argument("path", help="checkpoint folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    _add_model_args(p, positional=True)

    p = sub.add_parser("ask", help="answer a question about an image (PyTorch checkpoint or ONNX artifact)")
    p.add_argument("args", nargs="+", metavar="[PATH] QUESTION",
                   help="optional checkpoint/artifact folder, then the question")
    p.add_argument("--image", required=True, help="image file: DICOM, NIfTI, PNG, JPEG, TIFF")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--frame", type=int, default=None, help="frame of a multi-frame DICOM")
    _add_model_args(p)

    demo = sub.add_parser("demo", help="built-in demo model and random-weight scale fixtures")
    dsub = demo.add_subparsers(dest="demo_command", metavar="WHAT")
    p = dsub.add_parser("random", help="write a random-weight checkpoint with a real or tiny configuration")
    p.add_argument("--preset", default="tinyllava-1.5b", help="tinyllava-1.5b or a tiny preset (tiny, tiny-phi, ...)")
    p.add_argument("--format", choices=["legacy", "factory", "hf"], default="legacy")
    p.add_argument("--out", required=True)
    p = dsub.add_parser("model", help="build (or locate) the built-in micro TinyLLaVA-Med demo model")
    p.add_argument("--force", action="store_true", help="retrain even if cached")

    p = sub.add_parser("eval", help="closed/open VQA accuracy of a model on a dataset")
    _add_model_args(p)
    p.add_argument("--dataset", default="builtin:micro-med-vqa",
                   help="builtin:micro-med-vqa, or a VQA-RAD / SLAKE / LLaVA-Med json")
    p.add_argument("--images", default=None, help="image folder for file datasets")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--out", default=None, help="write predictions and metrics JSON here")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("export", help="export vision / embed / decoder ONNX graphs and the runtime config")
    _add_model_args(p)
    p.add_argument("--out", required=True)
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    p.add_argument("--opset", type=int, default=17)

    def recipe_cmd(name: str, help_: str, *, model: bool = False, out: bool = False):
        p = sub.add_parser(name, help=help_)
        p.add_argument("recipe", help="recipe YAML file or shipped recipe name")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="recipe overrides, e.g. export.precision=fp32 check.min_agreement=0.99")
        p.add_argument("--json", action="store_true", help="one JSON object on stdout")
        if model:
            _add_model_args(p)
        if out:
            p.add_argument("--out", default="artifacts", help="artifact root (default ./artifacts)")
            p.add_argument("--force", action="store_true", help="rebuild even if an identical artifact exists")
        return p

    recipe_cmd("validate", "validate a recipe (every error at once, with YAML paths)")
    recipe_cmd("plan", "show stages, files and estimated bytes without running", model=True)
    recipe_cmd("build", "run a recipe and write a versioned artifact", model=True, out=True)

    p = sub.add_parser("verify", help="re-hash an artifact's files and re-run its reference checks")
    p.add_argument("artifact")
    p.add_argument("--json", action="store_true")
    p.add_argument("--skip-checks", action="store_true", help="only re-hash files")
    _add_model_args(p)

    rec = sub.add_parser("recipes", help="list or copy shipped recipes")
    rsub = rec.add_subparsers(dest="recipes_command", metavar="WHAT")
    rsub.add_parser("ls", help="list shipped recipes")
    p = rsub.add_parser("cp", help="copy a shipped recipe to edit it")
    p.add_argument("name")
    p.add_argument("dest")
    return ap


def _cmd_ask(args, ctx) -> int:
    """``ask [PATH] QUESTION``: ONNX artifacts run through the torch-free runtime, checkpoints in PyTorch."""
    if len(args.args) > 2:
        from medlite.errors import MedliteError

        raise MedliteError("ask takes at most a model/artifact path and one question (quote the question)")
    path, question = (args.args[0], args.args[1]) if len(args.args) == 2 else (args.model, args.args[0])
    if path:  # OUT/<model>/<recipe> means its latest artifact
        from medlite.artifacts import resolve_artifact_path

        path = str(resolve_artifact_path(Path(path)))
    args.model, args.question = path, question
    if path and (Path(path) / "medlite_runtime.json").is_file():
        from medlite.runtime.commands import cmd_ask_onnx

        return cmd_ask_onnx(args, ctx)
    from medlite.checkpoints.commands import cmd_ask

    return cmd_ask(args, ctx)


def _handler_key(args) -> str | None:
    if args.command == "demo":
        return f"demo {args.demo_command}" if args.demo_command else None
    if args.command == "recipes":
        return f"recipes {args.recipes_command}" if args.recipes_command else None
    return args.command


_OVERRIDE = re.compile(r"^[A-Za-z_][\w.\[\]]*=")
_FLAGS = {"--json", "--force", "--quiet", "--skip-checks", "-h", "--help"}


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Pull ``key=value`` recipe overrides out of a validate/plan/build command line.

    argparse cannot take positionals after options (``build r.yaml --model m a.b=1``), so overrides
    are collected wherever they stand, unless the token is the value of a preceding option.
    """
    if not argv or argv[0] not in ("validate", "plan", "build"):
        return argv, []
    rest, overrides = [argv[0]], []
    for i, tok in enumerate(argv[1:], start=1):
        prev = argv[i - 1]
        is_value = prev.startswith("-") and "=" not in prev and prev not in _FLAGS
        if _OVERRIDE.match(tok) and not is_value:
            overrides.append(tok)
        else:
            rest.append(tok)
    return rest, overrides


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, build the run context, dispatch, turn MedliteError into exit code 2."""
    parser = build_parser()
    argv, overrides = _split_overrides(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    if overrides:
        args.overrides = list(args.overrides) + overrides
    key = _handler_key(args)
    if key is None:
        parser.print_help()
        return 0 if args.command is None else 2
    from medlite.context import RunContext, default_cache_dir
    from medlite.errors import GateFailure, MedliteError

    ctx = RunContext(cache_dir=Path(args.cache_dir) if args.cache_dir else default_cache_dir(),
                     json_mode=bool(getattr(args, "json", False)), quiet=args.quiet, seed=args.seed)
    module, fn = HANDLERS[key].split(":")
    try:
        handler = getattr(importlib.import_module(module), fn)
        return int(handler(args, ctx) or 0)
    except GateFailure as e:
        print(str(e), file=sys.stderr)
        return 1
    except MedliteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
