"""Throughput from raw SSE bytes to typed chunk objects, side by side in one run.

One DeepSeek-format stream of N chunks (default 200,000; mixed Chinese/English/emoji text,
a reasoner's reasoning then answer, usage on the last chunk) is fed in ~1.5 KiB reads to:

  unbroken   ChatStreamDecoder.feed -> ChatCompletionChunk (typed msgspec Structs)
  openai     the official SDK's own path: its SSEDecoder + json.loads + its chunk model
             (ChatCompletionChunk via the client's _process_response_data)
  httpx-sse  httpx-sse's SSEDecoder over httpx's line splitting + json.loads (dicts)
  floor      split on blank lines + orjson.loads into plain dicts (no spec, no types)

Every path decodes the same stream the same number of times (--repeat, default 5); the
median run is reported, with chunks/s, us/chunk and ratios. What a path builds once (the
openai client, its response object) is built before the clock starts; only decoding is
timed, each run from a fresh decoder.
Run: python bench/decode.py [--chunks N] [--repeat R]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterator

import orjson

from unbroken.core import ChatStreamDecoder

READ_SIZE = 1536  # ~1.5 KiB reads, as a proxy or TLS record boundary would cut them

_WORDS = [
    "Hello",
    " 世界",
    "，",
    " stream",
    "ing",
    " 🚀",
    " 数据",
    " is",
    " fine",
    "。",
    "\n",
    " ok",
]


def make_stream(n_chunks: int) -> bytes:
    head = (
        '"id":"5f1e2a9c-0b7d-4d1e-9a31-1b2c3d4e5f60","object":"chat.completion.chunk",'
        '"created":1735689600,"model":"deepseek-reasoner",'
        '"system_fingerprint":"fp_5417b77867_prod0820_fp8_kvcache"'
    )
    out = [
        f'data: {{{head},"choices":[{{"index":0,"delta":{{"role":"assistant","content":null,'
        f'"reasoning_content":""}},"logprobs":null,"finish_reason":null}}]}}\n\n'
    ]
    half = n_chunks // 3
    for i in range(1, n_chunks - 1):
        word = json.dumps(_WORDS[i % len(_WORDS)] + str(i % 7), ensure_ascii=False)
        if i < half:
            delta = f'"content":null,"reasoning_content":{word}'
        else:
            delta = f'"content":{word},"reasoning_content":null'
        out.append(
            f'data: {{{head},"choices":[{{"index":0,"delta":{{{delta}}},"logprobs":null,'
            f'"finish_reason":null}}]}}\n\n'
        )
    out.append(
        f'data: {{{head},"choices":[{{"index":0,"delta":{{"content":"","reasoning_content":null}},'
        f'"logprobs":null,"finish_reason":"stop"}}],"usage":{{"prompt_tokens":6,'
        f'"completion_tokens":{n_chunks},"total_tokens":{n_chunks + 6},'
        f'"prompt_tokens_details":{{"cached_tokens":0}},'
        f'"completion_tokens_details":{{"reasoning_tokens":{half}}},'
        f'"prompt_cache_hit_tokens":0,"prompt_cache_miss_tokens":6}}}}\n\n'
    )
    out.append("data: [DONE]\n\n")
    return "".join(out).encode()


def reads(blob: bytes) -> list[bytes]:
    return [blob[i : i + READ_SIZE] for i in range(0, len(blob), READ_SIZE)]


Runner = Callable[[list[bytes]], int]


def prepare_unbroken() -> Runner:
    def run(parts: list[bytes]) -> int:
        decoder = ChatStreamDecoder()
        n = 0
        for part in parts:
            n += len(decoder.feed(part))
        n += len(decoder.flush())
        assert decoder.done
        return n

    return run


def prepare_openai() -> Runner:
    import httpx2
    from openai import OpenAI
    from openai._streaming import SSEDecoder
    from openai.types.chat import ChatCompletionChunk

    # Built once, outside the timing: a client and a response, as a stream would have them.
    client = OpenAI(api_key="sk-bench", base_url="http://127.0.0.1:9/")
    response = httpx2.Response(200, request=httpx2.Request("POST", "http://127.0.0.1:9/"))
    process = client._process_response_data

    def run(parts: list[bytes]) -> int:
        n = 0
        for sse in SSEDecoder().iter_bytes(iter(parts)):
            if sse.data.startswith("[DONE]"):
                break
            chunk = process(data=sse.json(), cast_to=ChatCompletionChunk, response=response)
            assert chunk.object == "chat.completion.chunk"
            n += 1
        return n

    return run


def prepare_httpx_sse() -> Runner:
    from httpx._decoders import LineDecoder, TextDecoder
    from httpx_sse._decoders import SSEDecoder

    def run(parts: list[bytes]) -> int:
        text = TextDecoder()
        lines = LineDecoder()
        sse = SSEDecoder()

        def all_lines() -> Iterator[str]:
            for part in parts:
                yield from lines.decode(text.decode(part))
            yield from lines.decode(text.flush())
            yield from lines.flush()

        n = 0
        for line in all_lines():
            event = sse.decode(line.rstrip("\n"))
            if event is None:
                continue
            if event.data == "[DONE]":
                break
            json.loads(event.data)
            n += 1
        return n

    return run


def prepare_floor() -> Runner:
    loads = orjson.loads

    def run(parts: list[bytes]) -> int:
        buf = b""
        n = 0
        for part in parts:
            buf += part
            blocks = buf.split(b"\n\n")
            buf = blocks.pop()
            for block in blocks:
                payload = block[6:]
                if payload == b"[DONE]":
                    return n
                loads(payload)
                n += 1
        return n

    return run


def measure(run: Runner, parts: list[bytes], repeat: int) -> tuple[float, int]:
    times = []
    n = 0
    for _ in range(repeat):
        start = time.perf_counter()
        n = run(parts)
        times.append(time.perf_counter() - start)
    return statistics.median(times), n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    blob = make_stream(args.chunks)
    parts = reads(blob)
    print(
        f"stream: {args.chunks:,} chunks, {len(blob) / 2**20:.1f} MiB, "
        f"{len(parts):,} reads of {READ_SIZE} B; every path: median of {args.repeat} runs"
    )

    rows: dict[str, float] = {}
    for name, prepare in [
        ("floor (split+orjson)", prepare_floor),
        ("unbroken", prepare_unbroken),
        ("httpx-sse + json", prepare_httpx_sse),
        ("openai SDK path", prepare_openai),
    ]:
        seconds, n = measure(prepare(), parts, args.repeat)
        # The role chunk, the data chunks and the usage chunk; [DONE] is not a chunk.
        assert n == args.chunks, f"{name} decoded {n} chunks of {args.chunks}"
        rows[name] = n / seconds
        print(f"  {name:<22} {n / seconds:>12,.0f} chunks/s  {1e6 * seconds / n:7.2f} us/chunk")

    ours = rows["unbroken"]
    print(f"unbroken vs openai SDK path: {ours / rows['openai SDK path']:.1f}x")
    print(f"unbroken vs httpx-sse+json : {ours / rows['httpx-sse + json']:.1f}x")
    print(f"floor vs unbroken          : {rows['floor (split+orjson)'] / ours:.2f}x")


if __name__ == "__main__":
    main()
