"""Versioned build artifacts: layout, content-derived versions, manifests, atomic writes, verification.

Layout::

    OUT/<model>/<recipe>/<version>/      one artifact (ONNX graphs, recipe.yaml, manifest.json, report.*)
    OUT/<model>/<recipe>/latest          text file: the version of the newest *passing* artifact
    OUT/<model>/<recipe>/.tmp-<version>-<pid>/   a build in progress (renamed into place when complete)

``<version>`` is ``<recipe version>+<7 hex digits>`` hashed from the source checkpoint's file hashes,
the resolved recipe, the calibration set hash and the medlite version, so identical inputs give the
same version and a rebuild can be reused after re-hashing its files.

``manifest.json`` lists the sha256 and size of every file except itself and the *volatile* files
(``build-info.json``: timings, host, date), which are kept out so that two builds of the same
inputs produce byte-identical manifests. The manifest never contains a temporary path.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from medlite.errors import MedliteError
from medlite.fileio import replace_into_place, sha256_file, write_text_atomic

MANIFEST = "manifest.json"
RECIPE_FILE = "recipe.yaml"
VOLATILE = ("build-info.json", "bench.json")   # written, never hashed: timings, host name, date
# Files the device writes after the build (TensorRT engines are specific to the GPU and TensorRT version
# that built them, so they are built on the Jetson): declared in every manifest under "device_files"
# and never hashed. Only names matching a declared pattern inside the declared folder are exempt; any
# other extra file still fails verification.
DEVICE_DIR = "device"
DEVICE_FILES = {"folder": DEVICE_DIR, "patterns": ["*.engine", "timing.cache", "bench.json", "*.log"],
                "written_by": "engines/build_engines.sh and the bundle's medlite_device.py bench, on the device"}
LATEST = "latest"
FORMAT = "medlite-artifact/1"
# Packages whose versions can change an artifact's numbers; recorded in every manifest.
RECORDED_PACKAGES = ("medlite", "torch", "transformers", "tokenizers", "onnx", "onnxruntime", "onnxscript",
                     "numpy", "pydantic", "llmcompressor", "nvidia-modelopt", "compressed-tensors")
_TMP = re.compile(r"^\.(tmp|old)-(?P<version>.+)-(?P<pid>\d+)$")


class ArtifactError(MedliteError):
    """An artifact folder is missing, incomplete or does not match its manifest."""


# -- hashing and versions -------------------------------------------------------------------------
def canonical_json(obj: Any) -> str:
    """Stable JSON text for hashing: sorted keys, no whitespace variation, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def sha256_json(obj: Any) -> str:
    """sha256 of :func:`canonical_json`."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


def compute_version(recipe_version: str, *, source: dict, recipe: dict,
                    calibration_sha256: Optional[str], medlite_version: str, packages: Optional[dict] = None) -> str:
    """``<recipe_version>+<short hash>`` of everything that determines the artifact's content.

    ``source`` is the checkpoint's identity (:func:`source_identity`): file hashes, never paths.
    ``packages`` are the versions of the libraries that change the artifact's numbers (torch,
    onnxruntime, llmcompressor, ... as the recipe's stages declare): upgrading one gives a new version.
    """
    payload = {"source": source, "recipe": recipe, "calibration": calibration_sha256, "medlite": medlite_version,
               "packages": packages or {}}
    return f"{recipe_version}+{sha256_json(payload)[:7]}"


def _without_paths(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _without_paths(v) for k, v in sorted(obj.items())
                if not (k == "path" or k.endswith("_path"))}
    if isinstance(obj, (list, tuple)):
        return [_without_paths(v) for v in obj]
    return obj


def source_identity(source_info: dict, template_name: Optional[str] = None) -> dict:
    """What identifies a model's content: every recorded file hash (checkpoint, adapter and base,
    separate vision tower), which vision weights won, and the chat template — without any path, so
    moving a checkpoint keeps the version and changing a byte of it does not."""
    keep = ("format", "files", "adapter", "vision_tower", "vision_weights", "dtype", "text_backbone")
    ident = _without_paths({k: source_info.get(k) for k in keep})
    ident["template"] = template_name
    return ident


def is_device_file(rel: str, declared: Optional[dict]) -> bool:
    """Whether ``rel`` (posix path in an artifact) is a device-built file the manifest declares."""
    if not isinstance(declared, dict) or not declared.get("folder"):
        return False
    head, _, name = rel.partition("/")
    if head != str(declared["folder"]).strip("/") or not name or "/" in name:
        return False
    return any(fnmatch.fnmatchcase(name, pat) for pat in declared.get("patterns", ()))


def hash_files(folder: Path, device_files: Optional[dict] = None) -> dict[str, dict]:
    """``{relative posix path: {"sha256", "bytes"}}`` of every file under ``folder`` except the
    manifest, the volatile files and the declared device-built files, sorted by path."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_dir() or rel == MANIFEST or rel in VOLATILE or is_device_file(rel, device_files):
            continue
        out[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return out


def package_versions(names=RECORDED_PACKAGES) -> dict[str, Optional[str]]:
    """Installed versions (None for packages that are not installed)."""
    from importlib import metadata

    out: dict[str, Optional[str]] = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def safe_name(text: str) -> str:
    """A folder-name-safe form of a model or recipe name."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-.").lower()
    return s or "model"


# -- layout ---------------------------------------------------------------------------------------
def recipe_dir(out_root: Path, model_name: str, recipe_name: str) -> Path:
    """``OUT/<model>/<recipe>``: the parent of every version of one recipe on one model."""
    return Path(out_root) / safe_name(model_name) / safe_name(recipe_name)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # exists, owned by someone else
        return True
    return True


def clean_stale(parent: Path) -> list[Path]:
    """Remove ``.tmp-*``/``.old-*`` folders left by builds whose process no longer runs."""
    removed = []
    if not parent.is_dir():
        return removed
    for p in parent.iterdir():
        m = _TMP.match(p.name)
        if m and p.is_dir() and not _pid_alive(int(m.group("pid"))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


class Staging:
    """Write an artifact into ``parent/.tmp-<version>-<pid>`` and rename it into place on commit.

    Use as a context manager: leaving the block without :meth:`commit` (an exception) removes the
    temporary folder; a killed process leaves it behind and the next build's :func:`clean_stale`
    removes it. ``rename`` within one folder is atomic, so ``parent/<version>`` is either absent or
    complete.
    """

    def __init__(self, parent: Path, version: str):
        self.parent, self.version = Path(parent), version
        self.final = self.parent / version
        self.path = self.parent / f".tmp-{version}-{os.getpid()}"
        self.committed = False

    def __enter__(self) -> "Staging":
        self.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(self.parent)
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir()
        return self

    def commit(self) -> Path:
        """Move the finished folder to ``parent/<version>``, replacing an older copy if present."""
        replace_into_place(self.path, self.final)
        self.committed = True
        return self.final

    def __exit__(self, *exc) -> bool:
        if not self.committed and self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)
        return False


def update_latest(parent: Path, version: str) -> None:
    """Point ``parent/latest`` at ``version`` (a text file: works on every file system)."""
    write_text_atomic(Path(parent) / LATEST, version + "\n")


def read_latest(parent: Path) -> Optional[str]:
    """The version ``latest`` names, or None."""
    p = Path(parent) / LATEST
    return p.read_text(encoding="utf-8").strip() if p.is_file() else None


# -- manifests and verification -------------------------------------------------------------------
def write_manifest(folder: Path, manifest: dict) -> dict:
    """Hash the folder's files into ``manifest["files"]`` and write ``manifest.json`` (stable text)."""
    manifest = dict(manifest)
    manifest.setdefault("device_files", DEVICE_FILES)
    manifest["files"] = hash_files(folder, manifest["device_files"])
    text = json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    (Path(folder) / MANIFEST).write_text(text, encoding="utf-8")
    return manifest


def read_manifest(folder: Path) -> dict:
    """The artifact's manifest; ArtifactError when missing or unreadable."""
    p = Path(folder) / MANIFEST
    if not p.is_file():
        raise ArtifactError(f"{folder}: no {MANIFEST} — not a medlite artifact (or an incomplete one)")
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{p}: unreadable manifest: {e}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT or not isinstance(m.get("files"), dict):
        raise ArtifactError(f"{p}: not a {FORMAT} manifest")
    return m


def verify_files(folder: Path, manifest: Optional[dict] = None) -> list[str]:
    """Problems found by re-hashing: one line per changed, missing or extra file (empty = intact)."""
    folder = Path(folder)
    manifest = manifest if manifest is not None else read_manifest(folder)
    recorded: dict[str, dict] = manifest["files"]
    actual = hash_files(folder, manifest.get("device_files"))
    problems = []
    for name in sorted(set(recorded) | set(actual)):
        rec, act = recorded.get(name), actual.get(name)
        if act is None:
            problems.append(f"{name}: missing")
        elif rec is None:
            problems.append(f"{name}: extra file not in the manifest")
        elif act["bytes"] != rec["bytes"]:
            problems.append(f"{name}: size {act['bytes']} bytes, manifest says {rec['bytes']}")
        elif act["sha256"] != rec["sha256"]:
            problems.append(f"{name}: sha256 mismatch (content changed)")
    return problems


@dataclass
class Artifact:
    """An opened, hash-checked artifact."""

    path: Path
    manifest: dict

    @property
    def status(self) -> str:
        return self.manifest.get("status", "unknown")

    @property
    def version(self) -> str:
        return self.manifest.get("version", self.path.name)

    def recipe_text(self) -> str:
        return (self.path / RECIPE_FILE).read_text(encoding="utf-8")


def resolve_artifact_path(path: Path) -> Path:
    """An artifact folder, or ``OUT/<model>/<recipe>`` or ``OUT/<model>/<recipe>/latest`` (resolved through
    the ``latest`` file); ArtifactError when ``latest`` names a version that is not there."""
    path = Path(path).expanduser()
    if path.name == LATEST and path.is_file():     # the text file itself, as `serve` takes it
        path = path.parent
    if not (path / MANIFEST).is_file():
        latest = read_latest(path)
        if latest and (path / latest / MANIFEST).is_file():
            return path / latest
        if latest:
            raise ArtifactError(f"{path / LATEST}: names version {latest!r}, but {path / latest} is not an "
                                f"artifact (no {MANIFEST}); rebuild it or name a version folder")
    return path


def open_artifact(path: Path, *, check_hashes: bool = True) -> Artifact:
    """Open an artifact, re-hashing every file; ArtifactError naming each changed/missing/extra file."""
    path = resolve_artifact_path(Path(path))
    if not path.is_dir():
        raise ArtifactError(f"{path}: no such artifact folder")
    manifest = read_manifest(path)
    if check_hashes:
        problems = verify_files(path, manifest)
        if problems:
            raise ArtifactError(f"{path}: files do not match {MANIFEST}:\n" + "\n".join(f"  {p}" for p in problems))
    return Artifact(path=path, manifest=manifest)
