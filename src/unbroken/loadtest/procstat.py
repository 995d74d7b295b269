"""CPU time of local server processes (Linux `/proc`), so a bench run can say what its load
cost the server: CPU seconds, cores busy, CPU per request and per token."""

from __future__ import annotations

import os
from pathlib import Path

from unbroken.errors import ConfigError

__all__ = ["cpu_seconds", "server_cost"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process `pid` (all its threads).

    Raises:
        ConfigError: when the process does not exist or `/proc` is not there.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    except OSError:
        raise ConfigError(f"no process {pid} to watch (needs Linux /proc)") from None
    # The command name (field 2) may hold spaces; fields after its closing ")" are fixed.
    fields = stat[stat.rindex(")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return ticks / os.sysconf("SC_CLK_TCK")


def server_cost(
    cpu_s: float, duration_s: float, requests: int, tokens: int
) -> dict[str, float | None]:
    """What the watched processes spent: CPU seconds, cores busy on average, CPU ms per
    completed request and CPU microseconds per token received."""
    return {
        "cpu_s": cpu_s,
        "cores": cpu_s / duration_s if duration_s > 0 else None,
        "cpu_ms_per_request": cpu_s * 1000.0 / requests if requests else None,
        "cpu_us_per_token": cpu_s * 1e6 / tokens if tokens else None,
    }
