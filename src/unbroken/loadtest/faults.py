"""The fault mix of a bench run: which requests get a mock fault header or a proxy cut, and
where a mock fault breaks a stream. Pure: parsing and arithmetic only."""

from __future__ import annotations

import re
from dataclasses import dataclass

from unbroken.errors import ConfigError

__all__ = ["CutRule", "FaultMix", "parse_cut", "parse_fault_mix"]

_CUT = re.compile(r"^cut(?:\s+(after_bytes|after_ms)=(\d+(?:\.\d+)?))?$")
_AFTER = re.compile(r"(?:^|\s)after=(\d+)")
# Kinds of mock faults that break a stream in the middle (the cut the recovery figures
# are about); the others refuse, slow or mangle a request.
_CUTS = ("reset", "close", "stall", "malformed", "error", "done_early", "insufficient")


@dataclass(frozen=True, slots=True)
class CutRule:
    """Where the proxy cuts a connection: after `after_bytes` bytes of the response, or
    `after_ms` after the response's first byte (whichever is set)."""

    after_bytes: int | None = None
    after_ms: float | None = None

    def __str__(self) -> str:
        if self.after_ms is not None:
            return f"cut after_ms={self.after_ms:g}"
        return f"cut after_bytes={self.after_bytes}"


def parse_cut(spec: str) -> CutRule:
    """Parse a proxy fault: `cut after_bytes=B` or `cut after_ms=T` (`cut` alone: 2000 bytes).

    Raises:
        ConfigError: naming the spec when it is not one of those.
    """
    match = _CUT.match(spec.strip())
    if match is None:
        raise ConfigError(f"bad proxy fault {spec!r}: use 'cut after_bytes=B' or 'cut after_ms=T'")
    name, value = match.groups()
    if name == "after_ms":
        return CutRule(after_ms=float(value))
    return CutRule(after_bytes=int(float(value)) if value else 2000)


@dataclass(frozen=True, slots=True)
class FaultMix:
    """One entry of the fault mix: `spec` sent as `X-Mock-Fault` (or a proxy cut) with
    probability `probability`."""

    spec: str
    probability: float
    proxy: CutRule | None = None

    @property
    def cut_after(self) -> int | None:
        """The mock chunk the fault breaks the stream after (`after=N`), if it names one."""
        if self.proxy is not None or not any(self.spec.startswith(k) for k in _CUTS):
            return None
        match = _AFTER.search(self.spec)
        return int(match.group(1)) if match else 2  # the mock's default `after`


def parse_fault_mix(text: str, *, proxy: CutRule | None = None) -> FaultMix:
    """Parse `[PROBABILITY:]SPEC` (the mock CLI's form); probability defaults to 1.

    Raises:
        ConfigError: naming the value when the probability is not within 0-1.
    """
    head, sep, rest = text.partition(":")
    probability = 1.0
    spec = text
    if sep:
        try:
            probability = float(head)
            spec = rest.strip()
        except ValueError:
            spec = text
    if not 0.0 <= probability <= 1.0 or not spec:
        raise ConfigError(f"bad fault {text!r}: use [PROBABILITY:]SPEC with 0 <= P <= 1")
    return FaultMix(spec, probability, proxy)
