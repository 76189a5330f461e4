"""Helpers for the device-bundle tests: extract a bundle, run its runtime where medlite cannot be imported."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

FAKE_TRT = Path(__file__).resolve().parent / "fake_trt"
API_DATA = Path(__file__).resolve().parents[2] / "medlite" / "data" / "tensorrt-8.5-python-api-used.json"


def interpreter() -> list:
    """The Python that runs the device runtime: ``$MEDLITE_PY38`` (a Python 3.8 with numpy, onnxruntime,
    tokenizers and Pillow) when set, else this interpreter without its site hooks (``-S``), which
    drops medlite's editable-install hook while keeping the packages reachable via PYTHONPATH."""
    py38 = os.environ.get("MEDLITE_PY38")
    return [py38, "-s"] if py38 else [sys.executable, "-S"]


def device_env(tmp: Path, *, fake_trt: bool = False) -> dict:
    """Environment for a subprocess of the bundle: ``python3`` on PATH is :func:`interpreter`, the
    import path holds the packages (and the fake ``tensorrt``/``cuda`` when asked), never medlite."""
    bindir = tmp / "bin"
    bindir.mkdir(exist_ok=True)
    cmd = " ".join(interpreter())
    (bindir / "python3").write_text(f'#!/bin/sh\nexec {cmd} "$@"\n')
    (bindir / "python3").chmod(0o755)
    paths = [] if os.environ.get("MEDLITE_PY38") else [sysconfig.get_paths()["purelib"]]
    if fake_trt:
        paths.insert(0, str(FAKE_TRT))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FORCE", "PYTHONHOME")}
    env.update(PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=os.pathsep.join(paths),
               MEDLITE_TRT_API=str(API_DATA), MEDLITE_ORT_THREADS="2")
    return env


def extract(bundle: Path, dest: Path) -> Path:
    """``tar -xzf`` the bundle into ``dest``; returns its one top folder."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-xzf", str(bundle), "-C", str(dest)], check=True)
    (top,) = [p for p in dest.iterdir() if p.is_dir()]
    return top


def run(folder: Path, args: list, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python3 medlite_device.py ARGS`` in the bundle folder."""
    return subprocess.run(["python3", "medlite_device.py", *args], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=timeout)


def readme_commands(folder: Path) -> list:
    """The ``python3 medlite_device.py ...`` lines of the README's sh blocks, in order."""
    text = (folder / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    return [line.strip() for b in blocks for line in b.splitlines() if line.strip().startswith("python3 medlite_device.py")]


def tar_names(bundle: Path) -> list:
    with tarfile.open(bundle) as t:
        return t.getnames()
