"""The `unbroken` command line (typer + rich). Imports everything; nothing imports it."""

from __future__ import annotations

import enum
import sys

__all__ = ["ExitStatus", "main"]


class ExitStatus(enum.IntEnum):
    """Exit codes of the `unbroken` command (httpie `status.py` style)."""

    OK = 0
    ERROR = 1  # the upstream or the network failed
    USAGE = 2  # bad arguments or configuration
    INTERRUPTED = 130  # Ctrl+C


def main() -> None:
    """Entry point: runs the command; an UnbrokenError becomes one red line and an exit
    status (a traceback only with UNBROKEN_DEBUG=1)."""
    try:
        from unbroken.cli.commands import app
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        sys.stderr.write(
            f"unbroken: the command line needs the [cli] extra ({exc.name} is missing); "
            "install it with: pip install 'unbroken[cli]'\n"
        )
        raise SystemExit(ExitStatus.USAGE) from exc
    from unbroken.errors import ConfigError, InvalidRequestError, UnbrokenError
    from unbroken.settings import debug_enabled

    try:
        app()
    except UnbrokenError as exc:
        if debug_enabled():
            raise
        status = (
            ExitStatus.USAGE
            if isinstance(exc, ConfigError | InvalidRequestError)
            else ExitStatus.ERROR
        )
        line = f"unbroken: {exc.message}"
        sys.stderr.write(f"\x1b[31m{line}\x1b[0m\n" if sys.stderr.isatty() else line + "\n")
        raise SystemExit(status) from None
