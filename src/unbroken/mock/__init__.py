"""The mock DeepSeek: a faithful, fast, deterministic stand-in for the DeepSeek API with a
fault injector (docs/mock.md). Re-exports only.

    from unbroken.mock import MockConfig, MockServer, answer_text

    with MockServer(MockConfig(seed=1)) as mock:
        ...  # point any OpenAI-compatible client at mock.url

Needs uvicorn (the `[mock]` or `[gateway]` extra); httptools makes it fast.
"""

from unbroken.mock.app import MockApp, create_app
from unbroken.mock.config import DEFAULT_PORT, FaultRule, Latency, MockConfig
from unbroken.mock.expect import answer_text
from unbroken.mock.faults import FaultSpecError, parse_faults
from unbroken.mock.server import MockServer, ServerThread, serve

__all__ = [
    "DEFAULT_PORT",
    "FaultRule",
    "FaultSpecError",
    "Latency",
    "MockApp",
    "MockConfig",
    "MockServer",
    "ServerThread",
    "answer_text",
    "create_app",
    "parse_faults",
    "serve",
]
