"""Which model a command uses, from its command-line arguments — one place for every handler.

``--model PATH`` (or a recipe's ``model``) names a checkpoint folder; without one, commands use the
built-in demo model (:mod:`medlite.demo`), trained on first use. The loader options
(``--base``, ``--vision-tower``, ``--vision-weights``, ``--template``) travel with the choice.

Lives outside :mod:`medlite.checkpoints` so that the loader never imports the demo model (the demo
model imports the loader to write and evaluate itself).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from medlite.errors import CheckpointError

DEMO_SOURCE = "builtin:demo-model"


def _absolute(p) -> Optional[str]:
    # One spelling per folder: loader notes and the runtime config quote these paths, and the same
    # checkpoint given as "ckpt" or "/abs/ckpt" must give byte-identical artifacts.
    return str(Path(p).expanduser().resolve()) if p else None


@dataclass
class ModelChoice:
    """Which checkpoint a command uses, and the loader options from the command line."""

    path: Optional[str] = None           # None: the built-in demo model
    base: Optional[str] = None
    vision_tower: Optional[str] = None
    vision_weights: Optional[str] = None
    template: Optional[str] = None

    @classmethod
    def from_args(cls, args, recipe=None, recipe_source: Optional[str] = None) -> "ModelChoice":
        """``--model`` wins over the recipe's ``model`` (resolved relative to the recipe file)."""
        path = getattr(args, "model", None)
        if path is None and recipe is not None and getattr(recipe, "model", None):
            p = Path(recipe.model).expanduser()
            if not p.is_absolute() and recipe_source:
                p = Path(recipe_source).parent / p
            path = str(p)
        return cls(_absolute(path), _absolute(getattr(args, "base", None)),
                   _absolute(getattr(args, "vision_tower", None)), getattr(args, "vision_weights", None),
                   getattr(args, "template", None))

    @property
    def label(self) -> str:
        """The source as the manifest records it: the folder, or :data:`DEMO_SOURCE`."""
        return self.path or DEMO_SOURCE

    def folder(self, ctx) -> Path:
        """The checkpoint folder: ``path``, or the demo model's cache folder (built on first use).

        A medlite artifact or ONNX export is not a checkpoint: refused with the commands that take one.
        """
        if self.path is None:
            cached = cached_demo_folder(ctx)
            if cached is not None:
                return cached
            from medlite.demo.model import ensure_demo_model

            return Path(ensure_demo_model(ctx))     # imports torch: trains the demo model on first use
        path = Path(self.path).expanduser()
        if (path / "medlite_runtime.json").is_file() or (path / "manifest.json").is_file():
            raise CheckpointError(f"{path}: this is a medlite artifact (ONNX graphs), not a checkpoint; check it "
                                  f"with `medlite verify {path}` or ask it with `medlite ask {path} --image FILE "
                                  f"\"QUESTION\"`; --model takes the checkpoint it was built from")
        return path

    def load(self, ctx, *, dtype=None):
        """The :class:`~medlite.checkpoints.LoadedModel` (``dtype`` None: float32)."""
        from medlite.checkpoints import load_model

        return load_model(self.folder(ctx), ctx=ctx, base=self.base, vision_tower=self.vision_tower,
                          vision_weights=self.vision_weights, dtype=dtype, template=self.template)

    def inspect(self, ctx):
        """Architecture, sizes and notes without loading: :class:`medlite.checkpoints.headers.CheckpointFacts`,
        read from config.json and safetensors headers without torch where it can (:mod:`medlite.checkpoints.headers`)."""
        from medlite.checkpoints.headers import inspect_facts

        return inspect_facts(self.folder(ctx), ctx=ctx, base=self.base, vision_tower=self.vision_tower,
                             vision_weights=self.vision_weights, template=self.template)


def demo_key_without_torch() -> str:
    """:func:`medlite.demo.model.demo_model_key` of the default recipe, with the library versions read from
    the installed distributions instead of importing torch / transformers (which takes seconds).

    tests/checkpoints/test_header_inspect.py checks it equals ``demo_model_key()``; should the two ever
    differ, :func:`cached_demo_folder` finds nothing and the demo model resolves the slow way, never wrongly.
    """
    import hashlib
    import importlib.util
    import json
    from importlib.metadata import version

    from medlite.demo.micro_vqa import VERSION
    from medlite.demo.model import _HASHED_MODULES
    from medlite.demo.train import DemoRecipe

    h = hashlib.sha256()
    for mod in _HASHED_MODULES:
        h.update(mod.encode())
        h.update(Path(importlib.util.find_spec(mod).origin).read_bytes())
    h.update(json.dumps(DemoRecipe().to_dict(), sort_keys=True).encode())
    h.update(f"{VERSION}|torch {version('torch')}|transformers {version('transformers')}|"
             f"tokenizers {version('tokenizers')}".encode())
    return h.hexdigest()[:16]


def cached_demo_folder(ctx) -> Optional[Path]:
    """The built-in demo model's folder when it is already built and cached (torch-free), else None."""
    from medlite.demo.model import _complete

    try:
        folder = Path(ctx.cache_dir) / "demo-model" / demo_key_without_torch()
    except (ImportError, OSError):  # no distribution record (PackageNotFoundError): ensure_demo_model decides
        return None
    return folder if _complete(folder) else None


def load_source(choice: ModelChoice, ctx, *, dtype=None) -> tuple[Any, str]:
    """Load the chosen checkpoint; returns ``(LoadedModel, source label for the manifest)``."""
    return choice.load(ctx, dtype=dtype), choice.label


def load_from_args(args, ctx, *, dtype=None, on_device: bool = True):
    """The model a command's ``--model`` (+ loader options) names, or the demo model without one.

    With ``--device`` resolving to a GPU (and ``on_device``), the model is moved there; on the CPU it
    stays exactly as loaded. The device is resolved before loading, so a wrong one fails first.
    """
    from medlite.devices import is_cpu, resolve_device

    device = resolve_device(getattr(args, "device", None)) if hasattr(args, "device") else None
    loaded = ModelChoice.from_args(args).load(ctx, dtype=dtype)
    if on_device and not is_cpu(device):
        loaded.model.to(device)
    return loaded


# -- model paths on the command line ----------------------------------------------------------------
# A word ending in one of these names a model file, never a question (``ask copies/goood.onnx``).
MODEL_SUFFIXES = (".onnx", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".json", ".yaml", ".yml",
                  ".tar.gz", ".tgz", ".tar", ".zip")
# What each command takes as its model, for the error that names a missing or wrong one.
_KINDS = {"verify": "an artifact folder", "bundle": "an artifact folder", "serve": "an artifact or ONNX export folder",
          "ask": "a checkpoint, ONNX export or artifact folder", "bench": "a checkpoint, ONNX export or artifact folder"}
_CHECKED_OPTIONS = (("model", "--model"), ("path", "PATH"), ("artifact", "ARTIFACT"), ("base", "--base"),
                    ("vision_tower", "--vision-tower"))


def _exists(word: str) -> bool:
    try:
        return Path(word).expanduser().exists()
    except (OSError, ValueError):    # a question too long for a file name, or with a NUL byte
        return False


def looks_like_path(word: str) -> bool:
    """A command-line word that names a model, not a question: it exists, or it is one word (no spaces)
    with a path separator, a leading ``~`` or a model-file suffix (``.onnx``, ``.safetensors``, ``.tar.gz`` ...)."""
    import os

    w = word.strip()
    if not w:
        return False
    if _exists(w):
        return True
    if any(c.isspace() for c in w):
        return False
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return any(s in w for s in seps) or w.startswith("~") or w.lower().endswith(MODEL_SUFFIXES)


def check_model_path(path: str, *, command: str, option: str = "--model") -> None:
    """Refuse a named model that is not there, or a file that is not a model, in one line naming it.

    Called before a command does anything (no stage line, no demo model): a named model never falls back
    to another one. ``OUT/<model>/<recipe>/latest`` (a text file) is an artifact, as ``serve`` takes it.
    """
    p = Path(path).expanduser()
    kind = "a checkpoint folder" if option in ("--base", "--vision-tower") else \
        _KINDS.get(command, "a checkpoint folder")
    if not _exists(path):
        where = p.parent if p.parent != p else None
        hint = f" ({where} does not exist either)" if where is not None and not where.exists() else ""
        raise CheckpointError(f"{path}: no such file or folder ({option} takes {kind}){hint}")
    if p.is_file():
        if p.name == "latest":
            return
        if p.name in ("medlite_runtime.json", "manifest.json", "config.json") or \
                p.name.lower().endswith(MODEL_SUFFIXES):
            raise CheckpointError(f"{path}: is a file, not {kind}; give the folder that holds it: {p.parent}")
        raise CheckpointError(f"{path}: is a file, not {kind} ({option} takes {kind})")


def check_named_models(args) -> None:
    """:func:`check_model_path` for every model path a parsed command line names."""
    command = getattr(args, "command", "") or ""
    for attr, option in _CHECKED_OPTIONS:
        value = getattr(args, attr, None)
        if isinstance(value, str) and value:
            check_model_path(value, command=command, option=option)
