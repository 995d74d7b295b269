"""The chunk path compiled with mypyc, when it was built: which one this process runs.

`make` (tools/compile_native.py) compiles the modules a relayed chunk goes through into C
extensions kept apart from their sources, in src/unbroken/_compiled/, with a manifest of
the sources they were built from. Imported first by the package, this module puts a finder
in front of the import system that loads those extensions in place of the sources, unless:
- `UNBROKEN_PURE_PYTHON=1` is set (the tests set it for themselves and the processes they
  start: coverage cannot see compiled code; tests/integration/test_native_gateway.py runs
  gateways on the extensions);
- none were built (no C compiler), or for another Python;
- a source changed since the build: the sources run, and a warning says to rebuild.

Why: compiled, the gateway spends less CPU per relayed chunk (docs/gateway.md, Performance).
Imports the standard library only.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

__all__ = ["COMPILED", "MANIFEST", "PURE_ENV", "STATE", "compiled_modules", "mypyc_attr"]

if TYPE_CHECKING:
    # mypyc reads the decorator by its name in mypy_extensions (a build-time package only).
    from mypy_extensions import mypyc_attr as mypyc_attr
else:

    def mypyc_attr(*_args: Any, **_kwargs: Any) -> Any:
        """mypy_extensions' class decorator for mypyc's options, a no-op when run (the
        compiled modules import it from here: this module is never compiled)."""
        return lambda cls: cls


# Set to 1, the process runs the sources even where the extensions were built.
PURE_ENV = "UNBROKEN_PURE_PYTHON"

PACKAGE = Path(__file__).resolve().parent
DIRECTORY = PACKAGE / "_compiled"
MANIFEST = DIRECTORY / "manifest.json"

logger = logging.getLogger("unbroken")


class _Finder(importlib.abc.MetaPathFinder):
    """Finds the built extensions by module name (the compiled modules and mypyc's shared
    library); every other name goes on to the import system's own finders."""

    def __init__(self, paths: dict[str, str]) -> None:
        self.paths = paths

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        where = self.paths.get(fullname)
        if where is None:
            return None
        loader = importlib.machinery.ExtensionFileLoader(fullname, where)
        return importlib.util.spec_from_file_location(fullname, where, loader=loader)


def source_digest(path: Path) -> str:
    """The SHA-256 of a source file (what the manifest records per compiled module)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _changed(module: str, entry: dict[str, Any]) -> bool:
    """Whether the source of `module` differs from the one it was built from: its size and
    modification time first (a stat), its digest when they differ (a checkout rewrites)."""
    source = PACKAGE.parent.joinpath(*module.split(".")).with_suffix(".py")
    try:
        stat = source.stat()
        if [stat.st_size, stat.st_mtime_ns] == entry.get("stat"):
            return False
        return source_digest(source) != entry.get("sha256")
    except OSError:
        return True


def _load() -> tuple[dict[str, str], str]:
    """The extensions to load by module name, and the state to report."""
    if os.environ.get(PURE_ENV) == "1":
        return {}, f"pure Python ({PURE_ENV}=1)"
    try:
        manifest = json.loads(MANIFEST.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}, "pure Python (the compiled chunk path is not built)"
    if manifest.get("suffix") != importlib.machinery.EXTENSION_SUFFIXES[0]:
        return {}, "pure Python (the compiled chunk path was built for another Python)"
    modules: dict[str, dict[str, Any]] = manifest["modules"]
    stale = sorted(name for name, entry in modules.items() if _changed(name, entry))
    if stale:
        logger.warning(
            "unbroken: %s changed since the chunk path was compiled; running the sources "
            "(run `make` or `python tools/compile_native.py` to compile again)",
            ", ".join(stale),
        )
        return {}, "pure Python (sources changed since the build)"
    paths = {name: str(DIRECTORY / entry["file"]) for name, entry in modules.items()}
    for name, file in manifest["shared"].items():
        paths[name] = str(DIRECTORY / file)
    return paths, f"compiled with mypyc ({len(modules)} modules)"


def compiled_modules() -> list[str]:
    """The modules this process loads compiled (none when it runs the sources)."""
    return sorted(name for name in _PATHS if not name.endswith("__mypyc"))


_PATHS, STATE = _load()
COMPILED = bool(_PATHS)
if COMPILED:
    sys.meta_path.insert(0, _Finder(_PATHS))
