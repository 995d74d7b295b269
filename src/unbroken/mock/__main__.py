"""`python -m unbroken.mock [--host H] [--port P] [--seed S] [--loop asyncio|uvloop]
[--no-pace]`: serve the mock DeepSeek without the `[cli]` extra (benchmarks start it this
way). Prints the base URL once listening."""

from __future__ import annotations

import argparse
import sys

from unbroken.mock.config import DEFAULT_PORT, MockConfig
from unbroken.mock.server import serve


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments and serve until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m unbroken.mock", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument(
        "--no-pace",
        action="store_true",
        help="every timed stream on its own task (MockConfig.paced off), for comparisons",
    )
    args = parser.parse_args(argv)

    def ready(url: str) -> None:
        sys.stdout.write(f"mock DeepSeek listening on {url}\n")
        sys.stdout.flush()

    config = MockConfig(seed=args.seed, paced=not args.no_pace)
    serve(config, args.host, args.port, on_ready=ready, loop=args.loop)


if __name__ == "__main__":
    main()
