"""The compiled chunk path (unbroken/_native.py, tools/compile_native.py): the tests run the
sources (coverage), a process started without `UNBROKEN_PURE_PYTHON=1` runs the
extensions `make` built, one with it the sources, and a source changed since the build runs
as a source, with a warning."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import unbroken
from unbroken import _native

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"


def _compile_script() -> Any:
    spec = importlib.util.spec_from_file_location(
        "compile_native", ROOT / "tools/compile_native.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


COMPILE = _compile_script()
MODULES = [COMPILE._module(file) for file in COMPILE.MODULES]

# What a process reports: its mode, and the file each chunk-path module was loaded from.
PROBE = (
    "import importlib, json, unbroken._native as n; "
    f"names = {MODULES!r}; "
    "print(json.dumps([n.STATE, [importlib.import_module(m).__file__ for m in names]]))"
)


def built() -> None:
    """Skip (fail in CI, which asks for every binary) when the extensions were not built."""
    if COMPILE.up_to_date():
        return
    reason = "the chunk path is not compiled here (make runs tools/compile_native.py)"
    if os.environ.get("UNBROKEN_REQUIRE_BINARIES") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def _probe(src: Path, pure: bool) -> tuple[str, list[str], str]:
    # Not measured by coverage (its `patch = ["subprocess"]`): a copy of the package in
    # `src` would be reported as a second, barely run package next to the checkout's.
    env = {
        k: v
        for k, v in os.environ.items()
        if k != _native.PURE_ENV and not k.startswith("COVERAGE_PROCESS_")
    }
    env["PYTHONPATH"] = str(src)
    if pure:
        env[_native.PURE_ENV] = "1"
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    state, files = json.loads(done.stdout)
    return state, files, done.stderr


def test_this_process_runs_the_sources() -> None:
    assert not _native.COMPILED
    assert _native.compiled_modules() == []
    package = Path(unbroken.__file__).parent
    for name in MODULES:
        module = sys.modules.get(name) or importlib.import_module(name)
        assert module.__file__ == str(package.joinpath(*name.split(".")[1:])) + ".py"


def test_a_process_runs_the_extensions_built() -> None:
    built()
    state, files, _ = _probe(SRC, pure=False)
    assert state.startswith("compiled with mypyc")
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    for name, file in zip(MODULES, files, strict=True):
        assert Path(file).is_relative_to(_native.DIRECTORY), name
        assert file.endswith(suffix), name


def test_a_process_asked_for_pure_python_runs_the_sources() -> None:
    state, files, _ = _probe(SRC, pure=True)
    assert state == f"pure Python ({_native.PURE_ENV}=1)"
    for name, file in zip(MODULES, files, strict=True):
        assert file == str(SRC.joinpath(*name.split("."))) + ".py"


def test_a_source_changed_since_the_build_runs_as_a_source(tmp_path: Path) -> None:
    built()
    shutil.copytree(
        SRC / "unbroken", tmp_path / "unbroken", ignore=shutil.ignore_patterns("__pycache__")
    )
    changed = tmp_path / "unbroken/core/stream.py"
    changed.write_text(changed.read_text(encoding="utf-8") + "\n# changed\n", encoding="utf-8")
    state, files, stderr = _probe(tmp_path, pure=False)
    assert state == "pure Python (sources changed since the build)"
    assert "unbroken.core.stream changed since the chunk path was compiled" in stderr
    assert all(file.endswith(".py") for file in files)
    # A copy that only moved (new times, same bytes) still runs the extensions.
    shutil.copy(SRC / "unbroken/core/stream.py", changed)
    state, files, _ = _probe(tmp_path, pure=False)
    assert state.startswith("compiled with mypyc")
    assert not any(file.endswith(".py") for file in files)
