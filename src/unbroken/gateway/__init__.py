"""The gateway: an OpenAI-compatible ASGI service in front of DeepSeek (`unbroken serve`).

Imports core, client, stores, instrumentation and settings (the `[gateway]` extra); nothing
below it imports the gateway. See docs/gateway.md.
"""

from unbroken.gateway.app import Gateway, build_upstream, create_app

__all__ = ["Gateway", "build_upstream", "create_app"]
