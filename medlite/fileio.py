"""Files written safely: hashes, atomic writes, folders renamed into place, writability checked first.

One copy of each for the whole package (stdlib only; torch-free), so a reader never sees half a
file, a killed run never leaves half a folder, and a read-only ``--out`` is refused with one line
before any model loads.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from medlite.errors import OutputError


def sha256_file(path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MB chunks (graphs and checkpoints can be GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)      # elsewhere: the classic set-and-restore
    os.umask(mask)
    return mask


def _public_mode(is_dir: bool, mode: int) -> int:
    """The mode an ordinary ``open``/``mkdir`` would have given: 0666 (0777 for folders and
    executables) minus the umask. tempfile's 0600/0700 are for the staging phase only."""
    full = 0o777 if is_dir or mode & 0o100 else 0o666
    return full & ~current_umask()


def publish_modes(path) -> Path:
    """Give ``path`` (a file, or a folder and everything in it) the umask's modes before it is
    renamed into place, so the temporary file's or folder's private mode does not survive."""
    path = Path(path)
    todo = [path]
    if path.is_dir() and not path.is_symlink():
        todo += [p for p in path.rglob("*") if not p.is_symlink()]
    for p in todo:
        st = p.stat()
        os.chmod(p, _public_mode(p.is_dir(), st.st_mode))
    return path


def write_bytes_atomic(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling + ``os.replace`` (readers never see a partial file).

    The file gets the umask's mode (like ``open``), not the temporary file's private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            os.fchmod(f.fileno(), _public_mode(False, 0))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path, text: str) -> Path:
    """:func:`write_bytes_atomic` for UTF-8 text."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path, data: Any, *, indent: int = 2) -> Path:
    """:func:`write_text_atomic` for JSON (``default=str`` for paths and the like)."""
    return write_text_atomic(path, json.dumps(data, indent=indent, default=str))


def replace_into_place(tmp, final) -> Path:
    """Rename a finished ``tmp`` (file or folder, on the same file system) to ``final``.

    An existing ``final`` is moved aside first (``.old-<name>-<pid>``) and removed afterwards, so
    ``final`` is always either the old complete copy or the new one.
    """
    tmp, final = Path(tmp), Path(final)
    old = None
    if final.exists() or final.is_symlink():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    return final


@contextlib.contextmanager
def staged_folder(final) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``final``; renamed into place when the block succeeds,
    removed when it raises. The folder and what was written in it get the umask's modes first
    (:func:`publish_modes`): mkdtemp's 0700 and tempfile-written 0600 files stay private only while staged."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        publish_modes(tmp)
        replace_into_place(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def ensure_writable_dir(path, what: str) -> Path:
    """Check that the folder ``path`` exists or can be created, and that files can be written in it.

    Raises :class:`~medlite.errors.OutputError` with one line (``{what} {path}: ...``) otherwise. Probes
    by creating and removing a file, since permission bits say nothing for root or read-only mounts.
    """
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise OutputError(f"{what} {p}: exists and is not a folder")
    base = _nearest_existing(p)
    if not base.is_dir():
        raise OutputError(f"{what} {p}: {base} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=base, prefix=".medlite-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        reason = e.strerror or str(e)
        raise OutputError(f"{what} {p}: cannot write in {base} ({reason}); choose another folder") from None
    return p


def ensure_writable_file(path, what: str) -> Path:
    """Like :func:`ensure_writable_dir` for a file to be written at ``path`` (its folder is checked)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise OutputError(f"{what} {p}: is a folder; give a file name")
    ensure_writable_dir(p.parent, what)
    return p
