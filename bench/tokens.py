"""How far the token estimate (unbroken.core.tokens) is from real token counts.

The estimate bills an attempt that broke before its usage chunk, or a server that sends no
usage. Here it is compared with the counts the mock DeepSeek reports as `completion_tokens`
for its own answers (mixed English, Chinese, emoji and punctuation; chat, reasoner and JSON
mode), answer by answer. Real servers tokenize differently: this measures the estimate on
the mock's text and vocabulary only.

Prints, per kind of answer: answers, real and estimated tokens in total, the ratio, the
median and p90 of the per-answer error, and how often the estimate was above the real count.
Run: python bench/tokens.py [--answers N]
"""

from __future__ import annotations

import argparse
import statistics

from unbroken.core.tokens import estimate_tokens
from unbroken.mock.text import generate_answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers", type=int, default=2000, help="answers per kind")
    args = parser.parse_args()
    kinds = {
        "chat": {"thinking": False, "json_mode": False},
        "reasoner": {"thinking": True, "json_mode": False},
        "json mode": {"thinking": False, "json_mode": True},
    }
    print(
        f"{'kind':<10} {'answers':>7} {'real':>9} {'estimate':>9} {'ratio':>6} "
        f"{'err p50':>8} {'err p90':>8} {'over':>6}"
    )
    for name, options in kinds.items():
        real_total = est_total = over = 0
        errors = []
        for i in range(args.answers):
            conversation = [{"role": "user", "content": f"question {i}: json please"}]
            answer = generate_answer(
                options["thinking"], conversation, seed=i, json_mode=options["json_mode"]
            )
            real = answer.n_tokens
            estimate = estimate_tokens(answer.content_text) + estimate_tokens(answer.reasoning_text)
            real_total += real
            est_total += estimate
            over += estimate > real
            errors.append(abs(estimate - real) / real)
        deciles = statistics.quantiles(errors, n=10)
        print(
            f"{name:<10} {args.answers:>7} {real_total:>9,} {est_total:>9,} "
            f"{est_total / real_total:>6.2f} {statistics.median(errors):>7.1%} "
            f"{deciles[-1]:>7.1%} {over / args.answers:>6.0%}"
        )


if __name__ == "__main__":
    main()
