"""`unbroken serve` and `unbroken demo`: parse options, build settings, run the gateway.

Registered on the CLI app by `cli/commands.py`. The gateway, uvicorn and the mock are
imported inside the commands, so `unbroken --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from unbroken import _native
from unbroken.errors import ConfigError

__all__ = ["demo", "serve"]

# `unbroken demo` listens here by default: settings.DEFAULT_GATEWAY_PORT, repeated so the
# option's help does not import the settings module's defaults at definition time.
DEMO_PORT = 8788
# The fault the demo injects: the upstream connection is reset after 12 chunks, once.
DEMO_FAULT = "reset after=12 times=1"
DEMO_MESSAGES = [{"role": "user", "content": "Explain in a few words why streams break."}]


def _fail(console: Console, message: str) -> typer.Exit:
    console.print(f"[red]unbroken: {escape(message)}[/red]")
    return typer.Exit(2)


def serve(
    host: str | None = typer.Option(
        None, help="address to bind (default 127.0.0.1, or gateway.host in the config)"
    ),
    port: int | None = typer.Option(None, help="port (default 8788, or gateway.port); 0 = free"),
    upstream: str | None = typer.Option(
        None,
        help="upstream base URL (default https://api.deepseek.com, or base_url in the config); "
        "the key comes from DEEPSEEK_API_KEY or the config",
    ),
    config: str | None = typer.Option(
        None, "--config", "-c", help="TOML config file (see docs/unbroken.example.toml)"
    ),
    allow_unauthenticated: bool = typer.Option(
        False,
        "--allow-unauthenticated",
        help="allow serving a non-loopback address without gateway keys (anyone who can "
        "reach it can spend your upstream credit)",
    ),
    log_level: str = typer.Option("info", help="debug, info, warning or error"),
    log_format: str | None = typer.Option(
        None, "--log-format", help="text or json (default: gateway.log_format, text)"
    ),
    workers: int | None = typer.Option(
        None,
        help="gateway processes on the port (default: one per core with a Redis store, "
        "else 1); several need gateway.store = redis:// and shared sessions",
    ),
) -> None:
    """Serve the OpenAI-compatible gateway until SIGTERM or Ctrl+C (then drain)."""
    from unbroken.gateway.accesslog import configure_logging
    from unbroken.gateway.app import create_app
    from unbroken.gateway.server import bind
    from unbroken.gateway.server import serve as run_server
    from unbroken.gateway.workers import check_workers, default_workers, serve_workers
    from unbroken.settings import Settings

    err = Console(stderr=True)
    try:
        settings = Settings.load(None if config is None else Path(config))
        changes: dict[str, Any] = {}
        if log_format is not None:
            changes["log_format"] = log_format
        if host is not None:
            changes["host"] = host
        if port is not None:
            changes["port"] = port
        if allow_unauthenticated:
            changes["allow_unauthenticated"] = True
        gateway_settings = dataclasses.replace(settings.gateway, **changes)
        if upstream is not None:
            if gateway_settings.routes:
                raise ConfigError(
                    "--upstream sets the single default route; the config already lists "
                    "[[gateway.routes]], so set base_url there instead"
                )
            settings = dataclasses.replace(settings, base_url=upstream)
        settings = dataclasses.replace(settings, gateway=gateway_settings)
        gateway_settings.check_exposure()
        n_workers = workers if workers is not None else default_workers(gateway_settings)
        check_workers(gateway_settings, n_workers)
    except ConfigError as exc:
        raise _fail(err, exc.message) from None
    g = settings.gateway
    configure_logging(log_level, g.log_format)
    # Compiled with mypyc (built by `make`) or the sources: the CPU per chunk differs.
    logging.getLogger("unbroken.gateway.server").info("chunk path: %s", _native.STATE)
    if not g.keys and not g.keys_in_store:
        where = "loopback only" if g.is_loopback else "WITHOUT authentication (allowed by flag)"
        err.print(f"[yellow]no gateway keys configured: serving {where}[/yellow]")
    if not any(r.api_key for r in settings.upstream_routes()):
        err.print("[yellow]no upstream key: set DEEPSEEK_API_KEY or api_key_env[/yellow]")
    upstreams = ", ".join(f"{r.name}={r.base_url}" for r in settings.upstream_routes())
    processes = f", {n_workers} workers" if n_workers > 1 else ""

    def ready(url: str) -> None:
        print(
            f"unbroken gateway on {url} (upstream {upstreams}{processes}); Ctrl+C or SIGTERM "
            "drains",
            flush=True,
        )

    try:
        if n_workers > 1:
            code = serve_workers(settings, n_workers, on_ready=ready)
            if code:
                raise typer.Exit(code)
            return
        sock = bind(g.host, g.port)
    except OSError as exc:
        raise _fail(err, f"cannot listen on {g.host}:{g.port}: {exc.strerror or exc}") from None
    app = create_app(settings)
    run_server(app, sock, on_ready=ready)


def demo(
    port: int = typer.Option(DEMO_PORT, help="gateway port; 0 picks a free one"),
    once: bool = typer.Option(
        False, "--once", help="exit after the self-demonstration instead of serving"
    ),
    seed: int = typer.Option(7, help="seed of the mock's deterministic answers"),
) -> None:
    """The gateway in front of the embedded mock DeepSeek: prints how to call it, shows one
    stream surviving an upstream reset, then serves until Ctrl+C."""
    from unbroken.gateway.app import create_app
    from unbroken.mock import Latency, MockConfig, MockServer, ServerThread
    from unbroken.settings import GatewaySettings, Settings

    out = Console(highlight=False)
    err = Console(stderr=True)
    mock_config = MockConfig(seed=seed, latency=Latency(token_ms=10.0))
    mock = MockServer(mock_config)
    try:
        mock.start()
    except RuntimeError as exc:
        raise _fail(err, f"the embedded mock did not start: {exc}") from None
    settings = Settings(
        api_key="sk-demo",
        base_url=mock.url,
        gateway=GatewaySettings(
            port=port,
            forward_headers=("x-mock-*",),
            retry_wait_initial_s=0.05,
            retry_wait_max_s=0.5,
        ),
    )
    try:
        # lifespan on: the gateway closes its upstream connections when the demo stops.
        server = ServerThread(create_app(settings), "127.0.0.1", port, lifespan="on")
    except OSError as exc:
        mock.stop()
        raise _fail(err, f"cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}") from None
    try:
        server.start()
        _banner(out, server.url)
        _self_demo(out, server.url, mock, mock_config)
        if once:
            return
        out.print("\n[bold]Serving until Ctrl+C.[/bold]")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            out.print("bye")
    finally:
        server.stop()
        mock.stop()


def _banner(out: Console, url: str) -> None:
    out.print(f"[bold green]unbroken gateway[/bold green] on [bold]{url}[/bold] -> mock DeepSeek")
    out.print("No key needed (loopback, no gateway keys). Try:\n")
    out.print(
        f"  curl -N {url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
        "    -H 'X-Mock-Fault: reset after=8 times=1' \\\n"
        '    -d \'{"model": "deepseek-chat", "stream": true, '
        '"messages": [{"role": "user", "content": "hi"}]}\'\n',
        markup=False,
        soft_wrap=True,
    )
    out.print(
        "  python -c \"from openai import OpenAI; c = OpenAI(base_url='" + url + "/v1', "
        "api_key='unused'); s = c.chat.completions.create(model='deepseek-chat', "
        "messages=[{'role': 'user', 'content': 'hi'}], stream=True); "
        "[print(k.choices[0].delta.content or '', end='') for k in s if k.choices]\"\n",
        markup=False,
        soft_wrap=True,
    )
    out.print(f"  or open {url}/ in a browser for the chat page\n", markup=False)


# What the demo shows of the final event's `unbroken` field.
_META_KEYS = ("route", "attempts", "retries", "resumes", "fallbacks")


def _final_meta(data: bytes) -> dict[str, object]:
    """The `unbroken` field of the stream's final event, found in one read."""
    import json

    for line in data.split(b"\n"):
        if line.startswith(b"data: {") and b'"unbroken"' in line:
            meta = json.loads(line[6:]).get("unbroken")
            return meta if isinstance(meta, dict) else {}
    return {}


def _self_demo(out: Console, url: str, mock: object, mock_config: object) -> None:
    import httpx

    from unbroken.core import ChatStreamDecoder, ChunkAccumulator
    from unbroken.mock import MockConfig, MockServer, answer_text

    assert isinstance(mock, MockServer)  # noqa: S101 - typed loosely to keep imports lazy
    assert isinstance(mock_config, MockConfig)  # noqa: S101
    out.print(
        f"[bold]Self-demonstration:[/bold] one streamed answer through the gateway; the mock "
        f"resets the upstream connection ({DEMO_FAULT}).\n"
    )
    decoder = ChatStreamDecoder()
    answer = ChunkAccumulator()
    meta: dict[str, object] = {}
    headers = {"X-Mock-Fault": DEMO_FAULT, "X-Mock-Fault-Key": uuid.uuid4().hex}
    body = {"model": "deepseek-chat", "messages": DEMO_MESSAGES, "stream": True}
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=30.0
    ) as response:
        for data in response.iter_raw():
            for chunk in decoder.feed(data):
                answer.feed(chunk)
                if not chunk.choices and b'"unbroken"' in data:
                    meta = _final_meta(data)
                for choice in chunk.choices:
                    if choice.delta is not None and choice.delta.content:
                        out.print(choice.delta.content, end="", markup=False)
    out.print()
    _, expected = answer_text("deepseek-chat", DEMO_MESSAGES, config=mock_config)
    got = answer.content(0)
    stats = mock.stats()
    resets = stats["faults"].get("reset", 0)
    out.print(
        f"\nupstream: {stats['requests_total']} requests, {resets} reset; "
        "gateway: " + " ".join(f"{k}={meta.get(k)}" for k in _META_KEYS)
    )
    if got == expected:
        out.print(
            f"[green]The client got the whole answer ({len(got)} chars), identical to the "
            "fault-free one: no gap, no repeat.[/green]"
        )
    else:
        out.print("[red]The answer differs from the fault-free one.[/red]")
        raise typer.Exit(1)
