"""Compile the gateway's chunk path with mypyc into src/unbroken/_compiled/ (`make` runs it).

The modules in `MODULES` are compiled from a copy of the sources into C extensions, which
are kept apart from the sources with a manifest of the sources' digests; unbroken/_native.py
loads them in place of the sources (`UNBROKEN_PURE_PYTHON=1` runs the sources). A no-op when
the extensions are up to date. Without mypyc, a C compiler or Python's headers, or when the
compile fails, it says so in one line and leaves the sources to run (exit status 0; 1 with
`--require` or UNBROKEN_REQUIRE_BINARIES=1).
Run: `python tools/compile_native.py [--require] [--force]`.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
# Where unbroken/_native.py looks for the extensions and their manifest (its format is
# written here and read there).
DIRECTORY = SRC / "unbroken" / "_compiled"
MANIFEST = DIRECTORY / "manifest.json"
PURE_ENV = "UNBROKEN_PURE_PYTHON"

# The modules a relayed chunk runs through (bench/hotpath.py --bytecodes), and the gateway's
# accept and eager start of each answer, compiled together (calls between them are C calls).
# gateway/streams.py is not: mypyc compiles no async generator there and no `del` of an
# attribute (its producer's per-chunk step is: gateway/relay.py `ProducerCore`); nor are
# client/_common.py and core/flow.py: they subclass builtin types.
MODULES = [
    "unbroken/_wait.py",
    "unbroken/client/_engine.py",
    "unbroken/core/accumulator.py",
    "unbroken/core/attempt.py",
    "unbroken/core/sse.py",
    "unbroken/core/stream.py",
    "unbroken/gateway/accept.py",
    "unbroken/gateway/direct.py",
    "unbroken/gateway/eager.py",
    "unbroken/gateway/relay.py",
    "unbroken/gateway/upstream.py",
    "unbroken/stores/packed.py",
    "unbroken/stores/streamlog.py",
]


def _module(file: str) -> str:
    return file.removesuffix(".py").replace("/", ".")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def up_to_date() -> bool:
    """Whether the built extensions match this Python and the current sources."""
    try:
        manifest = json.loads(MANIFEST.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    modules = manifest.get("modules", {})
    if manifest.get("suffix") != importlib.machinery.EXTENSION_SUFFIXES[0]:
        return False
    if sorted(modules) != sorted(_module(file) for file in MODULES):
        return False
    return all(_digest(SRC / file) == modules[_module(file)]["sha256"] for file in MODULES)


def missing() -> str | None:
    """What the compile needs and this machine lacks, if anything."""
    if importlib.util.find_spec("mypyc") is None:
        return "mypyc (pip install mypy)"
    compiler = shlex.split(sysconfig.get_config_var("CC") or "cc")
    if not compiler or shutil.which(compiler[0]) is None:
        return f"a C compiler ({compiler[0] if compiler else 'cc'})"
    if not Path(sysconfig.get_paths()["include"], "Python.h").exists():
        return "Python's headers (Python.h; Debian: python3-dev)"
    return None


def compile_into(target: Path) -> int:
    """Compile `MODULES` from a copy of the sources; the extensions go to `target` (by
    path under src/) with the manifest. How many modules."""
    with tempfile.TemporaryDirectory(prefix="unbroken-mypyc-") as tmp:
        work = Path(tmp, "src")
        shutil.copytree(
            SRC / "unbroken",
            work / "unbroken",
            ignore=shutil.ignore_patterns("_compiled", "__pycache__", "*.so", "static"),
        )
        # mypyc reads no config from the project here: its own defaults (the sources pass
        # `mypy --strict` already), and a package installed without types is only slower to
        # call (a build without the dev extras); its C build goes to the copy's build/.
        done = subprocess.run(
            [sys.executable, "-m", "mypyc", "--ignore-missing-imports", *MODULES],
            cwd=work,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            last = (done.stdout + done.stderr).strip().splitlines()[-1:]
            raise RuntimeError(f"mypyc failed: {last[0] if last else done.returncode}")
        suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
        modules = {}
        for file in MODULES:
            built = (work / file).with_suffix(suffix)
            relative = built.relative_to(work)
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(built, target / relative)
            stat = (SRC / file).stat()
            modules[_module(file)] = {
                "file": str(relative),
                "sha256": _digest(SRC / file),
                "stat": [stat.st_size, stat.st_mtime_ns],
            }
        shared = {}
        for lib in work.glob(f"*__mypyc{suffix}"):
            shutil.move(lib, target / lib.name)
            shared[lib.name.removesuffix(suffix)] = lib.name
        manifest = {"suffix": suffix, "modules": modules, "shared": shared}
        (target / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return len(modules)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--require", action="store_true", help="fail when it cannot compile")
    parser.add_argument("--force", action="store_true", help="compile even when up to date")
    args = parser.parse_args()
    # CI (.ci/run) asks for every binary the tests use: a compile that cannot run fails there.
    require = args.require or os.environ.get("UNBROKEN_REQUIRE_BINARIES") == "1"
    if not args.force and up_to_date():
        return 0
    lacking = missing()
    started = time.monotonic()
    target = Path(tempfile.mkdtemp(prefix="_compiled.", dir=SRC / "unbroken"))
    try:
        if lacking is not None:
            raise RuntimeError(f"it needs {lacking}")
        n = compile_into(target)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        shutil.rmtree(target, ignore_errors=True)
        shutil.rmtree(DIRECTORY, ignore_errors=True)
        print(f"unbroken: the chunk path is not compiled and runs as pure Python: {exc}")
        return 1 if require else 0
    # In place in one rename, so a process starting meanwhile sees the old build or the new.
    old = DIRECTORY.with_name(f"_compiled.old.{os.getpid()}")
    if DIRECTORY.exists():
        DIRECTORY.rename(old)
    target.rename(DIRECTORY)
    shutil.rmtree(old, ignore_errors=True)
    print(
        f"unbroken: compiled the chunk path with mypyc ({n} modules, "
        f"{time.monotonic() - started:.0f} s); {PURE_ENV}=1 runs the sources"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
