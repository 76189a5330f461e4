"""The ``medlite`` argument parser (argparse and the standard library only; every handler's own
arguments come from the module that runs it, imported without its heavy dependencies)."""
from __future__ import annotations

import argparse

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

    ap.add_argument("--version", action="version", version=f"medlite {__version__}")
    flags = _global_flags(top=False)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    def command(parent, name: str, help_: str) -> argparse.ArgumentParser:
        return parent.add_parser(name, help=help_, description=help_, parents=[flags])

    _model_commands(sub, command)
    _recipe_commands(sub, command)
    _artifact_commands(sub, command)
    return ap


def _model_commands(sub, command) -> None:
    """Commands on a checkpoint: inspect, convert, ask, demo, eval, export."""
    from medlite.devices import add_device_arg  # argparse only; torch loads when a device resolves

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
    p.add_argument("args", nargs="*", metavar="[PATH] QUESTION",
                   help="optional checkpoint/artifact folder, then one or more questions (quote each); "
                        "options may come anywhere: ask ARTIFACT --image scan.dcm \"is there a lesion?\"")
    p.add_argument("--question", action="append", dest="extra_questions", default=None, metavar="Q",
                   help="a question (repeatable; after the positional ones): follow-up questions on one image "
                        "reuse its prompt-prefix KV cache on an ONNX artifact, prefilling only their own tokens")
    p.add_argument("--image", required=True, metavar="FILE", action=_Once,
                   help="image file: DICOM, NIfTI, PNG, JPEG, TIFF (one per ask)")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N",
                   help="longest answer in tokens (default 32)")
    p.add_argument("--frame", type=int, default=None, metavar="N",
                   help="frame of a multi-frame DICOM / slice of a NIfTI volume (default: the middle one)")
    p.add_argument("--standin", action="store_true",
                   help="an extracted device bundle: run its graphs on ONNX Runtime behind the engine interface "
                        "instead of TensorRT engines (a dry run without a GPU)")
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


def _recipe_commands(sub, command) -> None:
    """validate / plan / build RECIPE [KEY=VALUE ...]."""
    from medlite.devices import add_device_arg  # argparse only; torch loads when a device resolves

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


def _artifact_commands(sub, command) -> None:
    """Commands on artifacts and tools: verify, serve, bench, sweep, bundle, embed, probe, cache, recipes."""
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
