"""Every ``tests/**/test_*.py`` is collected by the README's test command (``python -m pytest -q``).

pytest's default ``norecursedirs`` silently skips folders such as ``build`` (issue 28: the build
contract's tests never ran in CI for that reason). Two checks, both in a subprocess run from the
repository root with the project's own configuration (``pyproject.toml``: testpaths, addopts,
conftest ``collect_ignore``):

* discovery (fast): a stub plugin replaces each test module the python plugin accepts with a stub
  that yields one item, so the run walks the tree exactly like the README's command but imports no
  test module (a few seconds);
* full collection (it imports every test module, torch included: 11-18 s on 2 cores, measured
  2026-12-07): collection reports no error and every file yields a test (or is skipped as a whole,
  with its reason in the summary).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STUB_PLUGIN = '''\
import pytest


class _Stub(pytest.Item):
    def runtest(self):
        pass


class _File(pytest.File):
    def collect(self):
        yield _Stub.from_parent(self, name="discovered")


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makemodule(module_path, parent):
    """Called only for files that pass python_files, testpaths, norecursedirs and --ignore."""
    return _File.from_parent(parent, path=module_path)
'''


def wanted_files(root: Path = ROOT) -> set[str]:
    """Every ``test_*.py`` under ``root``/tests, as a path relative to ``root`` (posix)."""
    return {p.relative_to(root).as_posix() for p in (root / "tests").rglob("test_*.py")
            if "__pycache__" not in p.parts}


def collect(*extra: str, root: Path = ROOT, stub_dir: Path | None = None) -> tuple[int, dict[str, int], str]:
    """``python -m pytest --collect-only -qq`` run in ``root``: (rc, {file: number of tests}, output).

    With ``stub_dir`` the stub plugin (written there) replaces every test module: discovery only."""
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-qq", "-p", "no:cacheprovider", *extra]
    env = dict(os.environ)
    if stub_dir is not None:
        (stub_dir / "medlite_discover_stub.py").write_text(STUB_PLUGIN)
        cmd += ["-p", "medlite_discover_stub"]
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(stub_dir), env.get("PYTHONPATH")]))
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600, env=env)
    counts: dict[str, int] = {}
    for line in proc.stdout.splitlines():
        path, sep, n = line.rpartition(": ")
        if sep and path.endswith(".py") and n.strip().isdigit():
            counts[path] = int(n)
        elif line.startswith("SKIPPED [") and "] " in line:
            # a module skipped as a whole (e.g. importorskip of a GPU package): reported with its reason by
            # the README's command (-ra), so it is visible, not hidden
            counts.setdefault(line.split("] ", 1)[1].split(":", 1)[0], 0)
    return proc.returncode, counts, proc.stdout + proc.stderr


def _missing_message(missing: set[str], output: str) -> str:
    return (f"{len(missing)} test file(s) are not collected by `python -m pytest -q` (a folder named like "
            f"one of pytest's norecursedirs, e.g. build, hides them): {', '.join(sorted(missing))}\n"
            f"{output[-3000:]}")


def test_every_test_file_is_discovered(tmp_path):
    rc, counts, out = collect(stub_dir=tmp_path)
    assert rc == 0, out[-3000:]
    assert counts and all(n == 1 for n in counts.values()), out[-3000:]    # the stub ran, nothing imported
    wanted = wanted_files()
    assert len(wanted) > 50                         # the glob itself found the suite
    missing = wanted - set(counts)
    assert not missing, _missing_message(missing, out)


def test_the_discovery_check_fails_on_a_hidden_folder(tmp_path):
    """The check above can fail: in a copy of the project's pytest configuration, a test file in a folder
    named ``build`` is found by the glob and not by pytest (its sibling is)."""
    root = tmp_path / "project"
    (root / "tests" / "build").mkdir(parents=True)
    (root / "tests" / "pipeline").mkdir()
    (root / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    for folder in ("build", "pipeline"):
        (root / "tests" / folder / f"test_{folder}_probe.py").write_text("def test_probe():\n    pass\n")
    rc, counts, out = collect(root=root, stub_dir=tmp_path)
    assert rc == 0, out[-3000:]
    assert wanted_files(root) - set(counts) == {"tests/build/test_build_probe.py"}, out[-3000:]


def test_every_test_file_collects_tests():
    """The real collection (imports every test module; 11-18 s on 2 cores): no errors, and every file
    yields a test or is skipped as a whole with its reason in the summary."""
    rc, counts, out = collect()
    assert rc == 0, f"collection errors:\n{out[-6000:]}"
    missing = wanted_files() - set(counts)
    assert not missing, _missing_message(missing, out)
