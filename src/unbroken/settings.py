"""Settings: one frozen object built once (from env and an optional TOML file) and passed down.

The only module that reads `os.environ`. Imports `unbroken.errors` only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from unbroken.errors import ConfigError

__all__ = ["DEFAULT_BASE_URL", "Settings"]

# DeepSeek's documented OpenAI-format base URL (protocol.md §1.1).
DEFAULT_BASE_URL = "https://api.deepseek.com"


def _int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw[:40]!r}") from None


@dataclass(frozen=True, slots=True)
class Settings:
    """Process-wide settings; every field has a safe default.

    Attributes:
        api_key: the upstream key (`DEEPSEEK_API_KEY`); never logged or shown in a repr.
        base_url: the upstream base URL (`UNBROKEN_BASE_URL`).
        max_event_bytes: the largest SSE event accepted (`UNBROKEN_MAX_EVENT_BYTES`).
    """

    api_key: str | None = None
    base_url: str = DEFAULT_BASE_URL
    max_event_bytes: int = 16 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_event_bytes < 1024:
            raise ConfigError(
                f"UNBROKEN_MAX_EVENT_BYTES must be >= 1024, got {self.max_event_bytes}"
            )
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"UNBROKEN_BASE_URL must start with http:// or https://, got {self.base_url[:60]!r}"
            )

    def __repr__(self) -> str:
        key = "None" if self.api_key is None else "'***'"
        return (
            f"Settings(api_key={key}, base_url={self.base_url!r}, "
            f"max_event_bytes={self.max_event_bytes})"
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from `DEEPSEEK_API_KEY` and `UNBROKEN_*` variables.

        Raises:
            ConfigError: a variable is malformed; the message names it.
        """
        env = os.environ if environ is None else environ
        return cls(
            api_key=env.get("DEEPSEEK_API_KEY") or None,
            base_url=env.get("UNBROKEN_BASE_URL") or DEFAULT_BASE_URL,
            max_event_bytes=_int(env, "UNBROKEN_MAX_EVENT_BYTES", 16 * 1024 * 1024),
        )
