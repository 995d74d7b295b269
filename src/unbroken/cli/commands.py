"""Commands of the `unbroken` CLI: parse, build settings, call the SDK, render."""

from __future__ import annotations

import random

import typer
from rich.console import Console

from unbroken.core import ChatStreamDecoder, ChunkAccumulator, TextEvent, classify_end

app = typer.Typer(no_args_is_help=True, add_completion=False, help="unbroken: whole answers")


@app.callback()
def root() -> None:
    """Streaming chat completions that arrive whole."""


# A recorded deepseek-chat stream (protocol.md TV01 shape) with multi-byte characters, so
# the demo shows reads cut inside UTF-8 characters reassembled exactly.
_HEAD = (
    '"id":"c1","object":"chat.completion.chunk","created":1735689600,'
    '"model":"deepseek-chat","system_fingerprint":"fp_t"'
)
_WORDS = ["Hello", "，", "世界", "! ", "Streams ", "arrive ", "whole ", "🚀", "."]


def _recorded_stream() -> bytes:
    parts = [
        f'data: {{{_HEAD},"choices":[{{"index":0,"delta":{{"role":"assistant","content":""}},'
        '"logprobs":null,"finish_reason":null}]}\n\n'
    ]
    for word in _WORDS:
        parts.append(
            f'data: {{{_HEAD},"choices":[{{"index":0,"delta":{{"content":"{word}"}},'
            '"logprobs":null,"finish_reason":null}]}\n\n'
        )
    parts.append(
        f'data: {{{_HEAD},"choices":[{{"index":0,"delta":{{"content":""}},"logprobs":null,'
        '"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":9,'
        '"total_tokens":21,"prompt_cache_hit_tokens":0,"prompt_cache_miss_tokens":12}}\n\n'
        ": keep-alive\n\ndata: [DONE]\n\n"
    )
    return "".join(parts).encode()


@app.command()
def demo(seed: int = typer.Option(7, help="seed of the random read boundaries")) -> None:
    """Decode a recorded DeepSeek stream cut at random byte boundaries."""
    console = Console()
    blob = _recorded_stream()
    rng = random.Random(seed)  # noqa: S311 - read boundaries, not cryptography
    decoder = ChatStreamDecoder()
    accumulator = ChunkAccumulator()
    position = 0
    n_reads = 0
    while position < len(blob):
        size = rng.randint(1, 40)
        for chunk in decoder.feed(blob[position : position + size]):
            for event in accumulator.feed_events(chunk):
                if isinstance(event, TextEvent):
                    console.print(event.text, end="", markup=False, highlight=False)
        position += size
        n_reads += 1
    decoder.flush()
    end = classify_end(accumulator, decoder)
    usage = accumulator.usage
    console.print()
    console.print(
        f"[dim]{n_reads} reads, {accumulator.n_chunks} chunks, end state {end.state.value}, "
        f"usage {usage.total_tokens if usage else '?'} tokens[/dim]"
    )
