"""The ``medlite`` command line.

Only argparse and the standard library are imported here: every handler lives in the module that
does the work and is imported when its subcommand runs, so ``medlite --help`` is fast and works on
a machine without torch, TensorRT or any compression library.
"""
from __future__ import annotations

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


# The parser lives in medlite/cli_parser.py; these names stay importable from here.
from medlite.cli_parser import _DTYPE_ALIASES, DEFAULT_PRECISION, PRECISIONS, build_parser  # noqa: F401,E402


def _cmd_ask(args, ctx) -> int:
    """``ask [PATH] QUESTION...``: ONNX artifacts run through the torch-free runtime, checkpoints in PyTorch.

    The first word is the model when it looks like a path (:func:`medlite.model_choice.looks_like_path`):
    then it must be a model, never a question, so a mistyped path is an error, not a question answered by
    the built-in demo model. Every other word is a question (each answered in turn, the model loaded once).
    """
    from medlite.errors import DataError
    from medlite.model_choice import check_model_path, looks_like_path

    words = list(args.args)
    asked = list(getattr(args, "extra_questions", None) or [])   # --question Q (repeatable)
    path = args.model
    if words and looks_like_path(words[0]):
        if path is not None:
            raise DataError(f"ask: two models given (--model {path} and {words[0]}); name one")
        path = words.pop(0)
        check_model_path(path, command="ask", option="PATH")
    words += asked
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
    from medlite.engines.bundle_host import is_bundle   # stdlib-only module: no heavy import

    if path and is_bundle(Path(path)):       # an extracted device bundle: its own engine runtime
        from medlite.engines.bundle_host import cmd_ask_bundle

        return cmd_ask_bundle(args, ctx)
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
