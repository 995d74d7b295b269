"""The `unbroken` command line (typer + rich). Imports everything; nothing imports it."""

from __future__ import annotations

import sys

__all__ = ["main"]


def main() -> None:
    """Entry point of the `unbroken` command."""
    try:
        from unbroken.cli.commands import app
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        sys.stderr.write(
            f"unbroken: the command line needs the [cli] extra ({exc.name} is missing); "
            "install it with: pip install 'unbroken[cli]'\n"
        )
        raise SystemExit(2) from exc
    app()
