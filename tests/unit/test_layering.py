"""The import rules of STYLE.md §2: the core is pure, nothing imports the CLI, stores never
import the client. Walks every module's imports with ast."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "unbroken"

# I/O, clocks, randomness and logging are shell business (STYLE.md §1).
CORE_FORBIDDEN = {
    "httpx",
    "httpcore",
    "starlette",
    "uvicorn",
    "redis",
    "anyio",
    "asyncio",
    "socket",
    "time",
    "logging",
    "os",
    "sys",
    "threading",
    "subprocess",
    "sqlite3",
    "pathlib",
    "io",
    "select",
    "selectors",
    "ssl",
    "urllib",
    "http",
    "secrets",
    "prometheus_client",
}
CORE_ALLOWED_INTERNAL = {"unbroken.errors", "unbroken.core"}


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """(module name, imported only under TYPE_CHECKING) for each import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[tuple[str, bool]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, False) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, False))
    return found


def modules(under: str) -> list[Path]:
    return sorted((SRC / under).rglob("*.py")) if under else sorted(SRC.rglob("*.py"))


@pytest.mark.parametrize("path", modules("core"), ids=lambda p: p.name)
def test_core_does_no_io(path: Path) -> None:
    """core/ imports only the stdlib's pure parts, msgspec, errors and core siblings."""
    for name, _ in imports_of(path):
        top = name.split(".")[0]
        assert top not in CORE_FORBIDDEN, f"{path.name} imports {name}"
        if top == "unbroken":
            assert any(name == a or name.startswith(a + ".") for a in CORE_ALLOWED_INTERNAL), (
                f"{path.name} imports {name}"
            )


@pytest.mark.parametrize("path", modules(""), ids=lambda p: str(p.relative_to(SRC)))
def test_nothing_imports_the_cli(path: Path) -> None:
    """Only cli/ (and `python -m unbroken`, the package's __main__) may import cli/."""
    if "cli" in path.relative_to(SRC).parts or path.relative_to(SRC) == Path("__main__.py"):
        return
    for name, _ in imports_of(path):
        assert name != "unbroken.cli", f"{path} imports {name}"
        assert not name.startswith("unbroken.cli."), f"{path} imports {name}"


def test_errors_imports_nothing_from_unbroken() -> None:
    """errors.py is the root of the import graph."""
    assert not [n for n, _ in imports_of(SRC / "errors.py") if n.startswith("unbroken")]


def test_stores_never_import_client_or_gateway() -> None:
    """stores/ sit below the client and the gateway."""
    for path in modules("stores") if (SRC / "stores").exists() else []:
        for name, _ in imports_of(path):
            assert not name.startswith(("unbroken.client", "unbroken.gateway")), (
                f"{path} imports {name}"
            )


def test_rule_catches_a_forbidden_import(tmp_path: Path) -> None:
    """The checker itself flags an I/O import (so the rule can fail)."""
    bad = tmp_path / "bad.py"
    bad.write_text("import socket\nfrom time import monotonic\n", encoding="utf-8")
    names = {n.split(".")[0] for n, _ in imports_of(bad)}
    assert names & CORE_FORBIDDEN == {"socket", "time"}
