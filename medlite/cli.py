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
    "validate": "medlite.pipeline.commands:cmd_validate",
    "plan": "medlite.pipeline.commands:cmd_plan",
    "build": "medlite.pipeline.commands:cmd_build",
    "verify": "medlite.pipeline.commands:cmd_verify",
    "recipes ls": "medlite.pipeline.commands:cmd_recipes_ls",
    "recipes cp": "medlite.pipeline.commands:cmd_recipes_cp",
    "cache ls": "medlite.pipeline.cache_commands:cmd_cache_ls",
    "cache clear": "medlite.pipeline.cache_commands:cmd_cache_clear",
    "serve": "medlite.serve.commands:cmd_serve",
    "bench": "medlite.bench.commands:cmd_bench",
    "sweep": "medlite.sweep.commands:cmd_sweep",
    "bundle": "medlite.engines.bundle:cmd_bundle",
    "embed": "medlite.embeddings.commands:cmd_embed",
    "probe": "medlite.embeddings.commands:cmd_probe",
}


PRECISIONS = ("fp32", "fp16", "int8", "int4")     # one vocabulary for every command and recipe
DEFAULT_PRECISION = "fp16"                        # export's default = the shipped recipes' default
_DTYPE_ALIASES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}   # convert's old --dtype


def _global_flags(*, top: bool) -> argparse.ArgumentParser:
    """``--quiet``, ``--json``, ``--cache-dir``, ``--seed``: accepted before or after the subcommand.

    The subcommand copies default to SUPPRESS so they never overwrite a value given before it.
    """
    g = argparse.ArgumentParser(add_help=False)
    d = (lambda v: v) if top else (lambda v: argparse.SUPPRESS)
    g.add_argument("--cache-dir", default=d(None), metavar="DIR",
                   help="cache folder (default: the user cache dir, or $MEDLITE_CACHE)")
    g.add_argument("--quiet", action="store_true", default=d(False), help="print only errors and results")
    g.add_argument("--json", action="store_true", default=d(False),
                   help="print the result as one JSON object on stdout (progress stays on stderr)")
    g.add_argument("--seed", type=int, default=d(0), help="seed for anything random (default 0)")
    return g


class _Once(argparse.Action):
    """An option given at most once: a second value is an error, never silently the one that wins."""

    def __call__(self, parser, namespace, values, option_string=None):
        before = getattr(namespace, self.dest, None)
        if before is not None:
            parser.error(f"{option_string} given twice ({before} and {values}); give it once")
        setattr(namespace, self.dest, values)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """Options every model-taking command shares (no --model means the built-in demo model)."""
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
                    "recipes and versioned artifacts with accuracy gates.",
        parents=[_global_flags(top=True)])
    from medlite import __version__
    from medlite.devices import add_device_arg  # argparse only; torch loads when a device resolves

    ap.add_argument("--version", action="version", version=f"medlite {__version__}")
    flags = _global_flags(top=False)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    def command(parent, name: str, help_: str) -> argparse.ArgumentParser:
        return parent.add_parser(name, help=help_, description=help_, parents=[flags])

    p = command(sub, "inspect", "detect a checkpoint's format and show its architecture and sizes")
    p.add_argument("path", nargs="?", default=None, metavar="PATH", help="deprecated: use --model PATH")
    _add_model_args(p)

    p = command(sub, "convert", "write a canonical HF Llava folder that plain transformers loads")
    p.add_argument("path", nargs="?", default=None, metavar="PATH", help="deprecated: use --model PATH")
    _add_model_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (new or empty)")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default=None,
                   help="weight precision of the written folder (default: fp32)")
    p.add_argument("--dtype", choices=sorted(_DTYPE_ALIASES), default=None,
                   help="deprecated spelling of --precision (float16 = fp16)")

    p = command(sub, "ask", "answer questions about an image (PyTorch checkpoint or ONNX artifact)")
    p.add_argument("args", nargs="+", metavar="[PATH] QUESTION",
                   help="optional checkpoint/artifact folder, then one or more questions (quote each); "
                        "options may come anywhere: ask ARTIFACT --image scan.dcm \"is there a lesion?\"")
    p.add_argument("--image", required=True, metavar="FILE", action=_Once,
                   help="image file: DICOM, NIfTI, PNG, JPEG, TIFF (one per ask)")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N",
                   help="longest answer in tokens (default 32)")
    p.add_argument("--frame", type=int, default=None, metavar="N",
                   help="frame of a multi-frame DICOM / slice of a NIfTI volume (default: the middle one)")
    _add_model_args(p)
    add_device_arg(p, what="a checkpoint's PyTorch generation (ONNX artifacts run in ONNX Runtime)")

    demo = command(sub, "demo", "built-in demo model and random-weight scale fixtures")
    dsub = demo.add_subparsers(dest="demo_command", metavar="WHAT")
    p = command(dsub, "random", "write a random-weight checkpoint with a real or tiny configuration")
    p.add_argument("--preset", default="tiny",
                   help="tiny (default), tiny-phi, tiny-qwen2, tiny-stablelm, or tinyllava-1.5b "
                        "(full size: 3 GB written, ~1 min)")
    p.add_argument("--format", choices=["legacy", "factory", "hf"], default="legacy",
                   help="checkpoint format to write (default legacy TinyLLaVA)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (new or empty)")
    p = command(dsub, "model", "build (or locate) the built-in micro TinyLLaVA-Med demo model")
    p.add_argument("--force", action="store_true", help="retrain even if cached")

    p = command(sub, "eval", "closed/open VQA accuracy of a model on a dataset")
    _add_model_args(p)
    add_device_arg(p, what="a checkpoint's PyTorch generation")
    p.add_argument("--dataset", default="builtin:micro-med-vqa",
                   help="builtin:micro-med-vqa, or a VQA-RAD / SLAKE / LLaVA-Med json")
    p.add_argument("--images", default=None, metavar="DIR", help="image folder for file datasets")
    p.add_argument("--split", default="test", help="dataset split: train, validate or test (default test)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate only the first N questions")
    p.add_argument("--out", default=None, metavar="FILE", help="write predictions and metrics as a JSON file")

    p = command(sub, "export", "export vision / embed / decoder ONNX graphs and the runtime config")
    _add_model_args(p)
    add_device_arg(p, what="checking the choice only: the ONNX trace always runs on the CPU")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for the ONNX graphs")
    p.add_argument("--precision", choices=["fp32", "fp16"], default=DEFAULT_PRECISION,
                   help=f"graph precision (default {DEFAULT_PRECISION}, as the shipped recipes); int8 and "
                        "int4 come from a recipe's quantize stage (int4 runs only on ONNX Runtime, never "
                        "TensorRT 8.5)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17, the highest TensorRT 8.5 takes)")

    def recipe_cmd(name: str, help_: str, *, model: bool = False, out: bool = False):
        p = command(sub, name, help_)
        p.add_argument("recipe", help="recipe YAML file or shipped recipe name")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="recipe overrides, e.g. export.precision=fp32 check.min_agreement=0.99")
        if model:
            _add_model_args(p)
        if out:
            p.add_argument("--out", default="artifacts", metavar="DIR",
                           help="artifact root folder (default ./artifacts)")
            p.add_argument("--force", action="store_true", help="rebuild even if an identical artifact exists")
            add_device_arg(p, what="the build's PyTorch stages (ONNX export stays on the CPU)")
        return p

    recipe_cmd("validate", "validate a recipe (every error at once, with YAML paths)")
    recipe_cmd("plan", "show stages, files and estimated bytes without running", model=True)
    recipe_cmd("build", "run a recipe and write a versioned artifact", model=True, out=True)

    p = command(sub, "verify", "re-hash an artifact's files and re-run its reference checks")
    p.add_argument("artifact", help="artifact folder (or OUT/<model>/<recipe> for its latest)")
    p.add_argument("--skip-checks", action="store_true", help="only re-hash files")
    _add_model_args(p)

    p = command(sub, "serve", "a local web page to ask an artifact about a scan (needs medlite[serve])")
    from medlite.serve.commands import add_serve_args  # argparse + stdlib only; the web stack loads on run

    add_serve_args(p)

    p = command(sub, "bench", "latency, time to first token, decode tokens/s and peak RSS on this machine")
    from medlite.bench.commands import add_bench_args  # argparse only; the model loads on run

    add_bench_args(p)

    p = command(sub, "sweep", "build recipe variants, tabulate accuracy vs device memory, recommend one per device")
    from medlite.sweep.commands import add_sweep_args  # argparse only; builds load on run

    add_sweep_args(p)

    p = command(sub, "bundle", "one reproducible .tar.gz to copy to the Jetson (graphs, runtime, references)")
    from medlite.engines.bundle import add_bundle_args  # argparse only; the artifact loads on run

    add_bundle_args(p)

    from medlite.embeddings.commands import add_embed_args, add_probe_args  # argparse only

    p = command(sub, "embed", "one vector per image (pooled projector or vision-tower output) for classifiers")
    add_embed_args(p)
    p = command(sub, "probe", "logistic-regression probe on embeddings vs a majority-class baseline "
                              "(needs medlite[probe])")
    add_probe_args(p)

    cache = command(sub, "cache", "the stage-output cache: list (default) or clear")
    csub = cache.add_subparsers(dest="cache_command", metavar="WHAT")
    command(csub, "ls", "list cached stage outputs with their sizes (most recently used first)")
    command(csub, "clear", "remove every cached stage output")

    rec = command(sub, "recipes", "list (default) or copy shipped recipes")
    rsub = rec.add_subparsers(dest="recipes_command", metavar="WHAT")
    command(rsub, "ls", "list shipped recipes")
    p = command(rsub, "cp", "copy a shipped recipe to edit it")
    p.add_argument("name", help="shipped recipe name (see `medlite recipes ls`)")
    p.add_argument("dest", help="file to write, or a folder to put NAME.yaml in (never overwrites)")
    return ap


def _cmd_ask(args, ctx) -> int:
    """``ask [PATH] QUESTION...``: ONNX artifacts run through the torch-free runtime, checkpoints in PyTorch.

    The first word is the model when it looks like a path (:func:`medlite.model_choice.looks_like_path`):
    then it must be a model, never a question, so a mistyped path is an error, not a question answered by
    the built-in demo model. Every other word is a question (each answered in turn, the model loaded once).
    """
    from medlite.errors import DataError
    from medlite.model_choice import check_model_path, looks_like_path

    words = list(args.args)
    path = args.model
    if words and looks_like_path(words[0]):
        if path is not None:
            raise DataError(f"ask: two models given (--model {path} and {words[0]}); name one")
        path = words.pop(0)
        check_model_path(path, command="ask", option="PATH")
    if not words:
        raise DataError(f"ask: no question given; write it in quotes after the image: medlite ask "
                        f"{path or 'MODEL'} --image {args.image} \"QUESTION\"")
    questions = [w.strip() for w in words]
    if any(not q for q in questions):
        raise DataError("ask: a question is empty; write the question in quotes after the image option")
    if args.max_new_tokens < 1:
        raise DataError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if path:  # OUT/<model>/<recipe> (or its latest file) means its latest artifact
        from medlite.artifacts import resolve_artifact_path

        path = str(resolve_artifact_path(Path(path)))
    args.model, args.questions, args.question = path, questions, questions[0]
    if path and Path(path).is_dir() and not _is_artifact(Path(path)) and not any(
            (Path(path) / f).is_file() for f in ("config.json", "adapter_config.json")):
        raise DataError(f"{path}: not a model folder: no medlite_runtime.json or manifest.json (an ONNX export or "
                        "artifact) and no config.json (a checkpoint)")
    if path and _is_artifact(Path(path)):
        from medlite.runtime.commands import cmd_ask_onnx

        return cmd_ask_onnx(args, ctx)
    from medlite.checkpoints.commands import cmd_ask

    return cmd_ask(args, ctx)


def _is_artifact(path: Path) -> bool:
    """An ONNX export or built artifact: its runtime config, or a manifest (a deleted config is then
    caught by the manifest check instead of falling back to PyTorch)."""
    return (path / "medlite_runtime.json").is_file() or (path / "manifest.json").is_file()


def _deprecated_positionals(args, ctx) -> None:
    """The old spellings keep working for now, with a warning that names the new one."""
    from medlite.errors import MedliteError

    path = getattr(args, "path", None)
    if path is not None:
        if args.model is not None and Path(args.model) != Path(path):
            raise MedliteError(f"{args.command}: give the model once, as --model PATH (got {path} and {args.model})")
        ctx.warn(f"`medlite {args.command} PATH` is deprecated: use `medlite {args.command} --model {path}`")
        args.model = path
    dtype = getattr(args, "dtype", None)
    if dtype is not None:
        new = _DTYPE_ALIASES[dtype]
        if getattr(args, "precision", None) not in (None, new):
            raise MedliteError(f"convert: --dtype {dtype} and --precision {args.precision} disagree; use --precision")
        ctx.warn(f"--dtype {dtype} is deprecated: use --precision {new}")
        args.precision = new


def _handler_key(args) -> str | None:
    if args.command == "demo":
        return f"demo {args.demo_command}" if args.demo_command else None
    if args.command == "recipes":
        return f"recipes {args.recipes_command or 'ls'}"      # `medlite recipes` alone lists them
    if args.command == "cache":
        return f"cache {args.cache_command or 'ls'}"
    return args.command


_OVERRIDE = re.compile(r"^[A-Za-z_][\w.\[\]]*=")
_FLAGS = {"--json", "--force", "--quiet", "--skip-checks", "-h", "--help"}   # options that take no value


_GLOBAL_VALUED = {"--cache-dir", "--seed"}      # global options before the command that take a value


def _command_index(argv: list[str]):
    """Where the subcommand stands: global options (``--cache-dir DIR --quiet``) may come before it."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 1 if "=" in argv[i] or argv[i] not in _GLOBAL_VALUED else 2
    return i if i < len(argv) else None


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Pull ``key=value`` recipe overrides out of a validate/plan/build command line.

    argparse cannot take positionals after options (``build r.yaml --model m a.b=1``), so overrides
    are collected wherever they stand, unless the token is the value of a preceding option.
    """
    start = _command_index(argv)
    if start is None or argv[start] not in ("validate", "plan", "build"):
        return argv, []
    rest, overrides = list(argv[:start + 1]), []
    for i, tok in enumerate(argv[start + 1:], start=start + 1):
        prev = argv[i - 1]
        is_value = prev.startswith("-") and "=" not in prev and prev not in _FLAGS
        if _OVERRIDE.match(tok) and not is_value:
            overrides.append(tok)
        else:
            rest.append(tok)
    return rest, overrides


def _model_hint(args, extra: list[str]) -> str:
    """A stray folder on the command line of a command that takes ``--model``: say where it goes."""
    if len(extra) != 1 or extra[0].startswith("-") or not Path(extra[0]).exists() or \
            not hasattr(args, "model"):
        return ""
    return f" (a model or artifact folder goes after --model: medlite {args.command} --model {extra[0]})"


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, build the run context, dispatch, turn MedliteError into exit code 2."""
    parser = build_parser()
    argv, overrides = _split_overrides(list(sys.argv[1:] if argv is None else argv))
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "ask" and not any(x.startswith("-") for x in extra):
        args.args = list(args.args) + extra     # `ask ARTIFACT --image f "question"`: words after options
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}{_model_hint(args, extra)}")
    if overrides:
        args.overrides = list(args.overrides) + overrides
    key = _handler_key(args)
    if key is None:
        parser.print_help()
        return 0 if args.command is None else 2
    from medlite.context import RunContext, checked_cache_dir
    from medlite.errors import GateFailure, MedliteError
    from medlite.model_choice import check_named_models

    try:
        # a named model that is not there stops here: one line, before any stage or the demo model runs
        check_named_models(args)
        ctx = RunContext(cache_dir=checked_cache_dir(args.cache_dir),
                         json_mode=bool(getattr(args, "json", False)), quiet=args.quiet, seed=args.seed)
        _deprecated_positionals(args, ctx)
        module, fn = HANDLERS[key].split(":")
        handler = getattr(importlib.import_module(module), fn)
        rc = int(handler(args, ctx) or 0)
        sys.stdout.flush()      # a closed pipe (`| head`) shows here, not at interpreter exit
        return rc
    except GateFailure as e:
        print(str(e), file=sys.stderr)
        return 1
    except MedliteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return _stdout_closed()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _stdout_closed() -> int:
    """The reader of stdout went away (``medlite inspect --json | head``): stop quietly, as ``cat`` does.

    stdout is pointed at /dev/null so the interpreter's final flush does not raise again; 141 = 128 + SIGPIPE.
    """
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):   # stdout has no file descriptor (captured): nothing left to flush
        pass
    return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
