"""Commands of the `unbroken` CLI: parse, build settings, call the SDK, render."""

from __future__ import annotations

import typer
from rich.console import Console

from unbroken.errors import ConfigError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="unbroken: whole answers")


def _version(value: bool) -> None:
    if value:
        from unbroken import __version__

        print(f"unbroken {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="print the version and exit"
    ),
) -> None:
    """Streaming chat completions that arrive whole."""


def _register() -> None:
    # Commands defined in their own modules join the one app here.
    from unbroken.cli.bench_cmds import bench
    from unbroken.cli.chat_cmds import ask, chat
    from unbroken.cli.gateway_cmds import demo, serve
    from unbroken.cli.keys_cmds import keys_app

    app.command()(demo)
    app.command()(serve)
    app.command()(chat)
    app.command()(ask)
    app.add_typer(keys_app, name="keys")
    app.command()(bench)


_register()


# `unbroken mock --port` default: unbroken.mock.DEFAULT_PORT, repeated here so that the other
# commands do not import the mock (and uvicorn) just to build their help.
MOCK_PORT = 8787


@app.command()
def mock(
    host: str = typer.Option("127.0.0.1", help="address to bind (loopback by default)"),
    port: int = typer.Option(MOCK_PORT, help="port to listen on; 0 picks a free one"),
    seed: int = typer.Option(0, help="seed of the deterministic answers"),
    ttft_ms: float = typer.Option(0.0, help="time to first token, ms"),
    token_ms: float = typer.Option(0.0, help="interval between tokens, ms"),
    queue_ms: float = typer.Option(0.0, help="time queued before inference (keep-alives), ms"),
    keepalive_ms: float = typer.Option(1000.0, help="interval of keep-alives, ms"),
    fault: list[str] = typer.Option(  # noqa: B008 - typer declares options this way
        [], help="server-wide fault [PROBABILITY:]SPEC, repeatable (see docs/mock.md)"
    ),
    fault_seed: int = typer.Option(0, help="seed of the server-wide fault draws"),
    api_key: list[str] = typer.Option(  # noqa: B008 - typer declares options this way
        [], help="accepted API key, repeatable; default: any Bearer key"
    ),
) -> None:
    """Serve the mock DeepSeek API (with its fault injector) until Ctrl+C."""
    from unbroken.mock import FaultRule, Latency, MockConfig
    from unbroken.mock import serve as serve_mock

    def fault_rule(text: str) -> FaultRule:
        # `[PROBABILITY:]SPEC`, e.g. `0.05:503` or `reset after=5`.
        head, sep, rest = text.partition(":")
        try:
            probability = float(head)
        except ValueError:
            return FaultRule(text)
        return FaultRule(rest.strip() if sep else text, probability=probability if sep else 1.0)

    console = Console(stderr=True)
    try:
        config = MockConfig(
            seed=seed,
            latency=Latency(
                ttft_ms=ttft_ms, token_ms=token_ms, queue_ms=queue_ms, keepalive_ms=keepalive_ms
            ),
            faults=tuple(fault_rule(text) for text in fault),
            fault_seed=fault_seed,
            api_keys=frozenset(api_key) if api_key else None,
        )
    except ConfigError as exc:
        console.print(f"unbroken mock: {exc.message}", style="red", soft_wrap=True, markup=False)
        raise typer.Exit(2) from None

    def ready(url: str) -> None:
        print(f"mock DeepSeek listening on {url}", flush=True)
        console.print(
            f"[dim]point a client at {url} (prefix resume: {url}/beta); Ctrl+C stops[/dim]"
        )

    try:
        serve_mock(config, host, port, on_ready=ready)
    except OSError as exc:
        console.print(
            f"unbroken mock: cannot listen on {host}:{port}: {exc}",
            style="red",
            soft_wrap=True,
            markup=False,
        )
        raise typer.Exit(1) from None
