"""The sentences the mock's answers are made of, cut into pieces (one token each).

Answers read as text (a demo shows them) while mixing English, Chinese, punctuation, emoji
(with skin tones, ZWJ sequences and flags) and the characters that break naive clients:
JSON escapes, tabs, U+2028 and U+0085 (line breaks to `str.splitlines()`, data to SSE).
Imports only the standard library.
"""

from __future__ import annotations

import random
import re
from itertools import chain

__all__ = ["ANSWER_SENTENCES", "REASONING_SENTENCES", "VOCABULARY", "draw_pieces"]

# fmt: off
_ENGLISH = (
    "The stream resumes exactly where it broke.",
    "Every chunk arrives once, in order, and whole.",
    "A reset in the middle of an answer is not the end of the answer 🚀.",
    "Keep-alive comments are not content.",
    "The model continues from the prefix, byte for byte.",
    "Retries are cheap; duplicates are not.",
    "Café, naïve, Straße — Unicode crosses every boundary ✨.",
    'She said "resume" and it did.',
    "Tokens flow over TCP, one write at a time.",
    "Backslashes \\ and tabs\tsurvive JSON too.",
    "Line\u2028separators and next\u0085lines are data, not line breaks.",
    "👩‍💻 Debugging streams is easier with a deterministic mock.",
    "The usage chunk comes last, with the finish reason.",
    "Pay 50€ or ½ of it, the answer stays the same.",
    "Nothing is lost and nothing is repeated 👍🏽.",
    "Streaming is just a long answer delivered in small pieces.",
    "When the connection drops, the client asks for the rest.",
    "Is the answer complete? Only the finish reason can tell.",
    "Use `prefix: true` on the beta endpoint to continue.",
    "Latency hides in queues, not in tokens.",
)
_CHINESE = (
    "流式传输的数据会完整到达。",
    "断点续传让回答继续下去。",
    "模型从前缀的末尾接着写。",
    "每个令牌只出现一次，不多也不少。",
    "连接重置之后，我们重试。",
    "缓存命中可以降低成本。",
    "推理内容先于回答出现。",
    "你好，世界！🌏",
    "保持连接的注释不是内容。",
    "我们用确定性的文本来测试 🧩。",
    "中文和English混在一起也没问题。",
    "结果必须逐字节一致。",
    "网络会断，回答不会断。🇨🇳",
    "请稍候，答案马上就到？",
)
_THINKING = (
    "Let me think about the question first.",
    "Wait, compare the two cases again.",
    "Step one: read the prefix. Step two: continue.",
    "Let me check the edge cases 🤔.",
    "So the answer should be complete.",
    "Hmm, the user mixes languages; answer in both.",
    "首先，检查用户的问题。",
    "所以答案应该是完整的。",
    "嗯，也许需要再确认一下。",
    "然后对比两种情况。",
)
# fmt: on

# A latin word (with its leading space), a run of CJK characters, or any other character.
_TOKEN = re.compile(r" ?[A-Za-z0-9'’`:\-€½]+| ?[\u4e00-\u9fff]+|\s|.", re.S)
_EMOJI_JOIN = "\u200d"


def _pieces(sentence: str) -> tuple[str, ...]:
    """Cut a sentence into token-sized pieces: words, 1-2 CJK characters, punctuation, whole
    emoji (ZWJ sequences, skin tones and flags kept together)."""
    out: list[str] = []
    for match in _TOKEN.finditer(sentence):
        piece = match.group()
        if "\u4e00" <= piece[-1] <= "\u9fff" and len(piece.strip()) > 2:
            text = piece.strip()
            lead = piece[: len(piece) - len(text)]
            chunks = [text[i : i + 2] for i in range(0, len(text), 2)]
            chunks[0] = lead + chunks[0]
            out.extend(chunks)
        elif len(piece) > 8:
            out.extend((piece[:5], piece[5:]))  # a long word is two tokens
        elif out and (
            piece == _EMOJI_JOIN
            or out[-1].endswith(_EMOJI_JOIN)
            or "\U0001f3fb" <= piece <= "\U0001f3ff"  # skin tone
            or (
                "\U0001f1e6" <= piece <= "\U0001f1ff"
                and "\U0001f1e6" <= out[-1][-1] <= "\U0001f1ff"
                and len(out[-1]) == 1
            )
        ):
            out[-1] += piece
        else:
            out.append(piece)
    return tuple(out)


def _with_space(sentence: str) -> str:
    # Sentences follow each other: English ones start with a space, Chinese ones do not.
    return " " + sentence if sentence[0].isascii() else sentence


# The paragraph break is a "sentence" of its own, drawn now and then.
ANSWER_SENTENCES: tuple[tuple[str, ...], ...] = (
    *(_pieces(_with_space(s)) for s in _ENGLISH + _CHINESE),
    ("\n\n",),
)
REASONING_SENTENCES: tuple[tuple[str, ...], ...] = (
    *(_pieces(_with_space(s)) for s in _THINKING),
    ("\n",),
)

# Every piece an answer can hold, for the renderer's pre-encoded JSON table.
VOCABULARY: tuple[str, ...] = tuple(
    dict.fromkeys(chain.from_iterable(ANSWER_SENTENCES + REASONING_SENTENCES))
)


def draw_pieces(
    rng: random.Random, n: int, sentences: tuple[tuple[str, ...], ...]
) -> tuple[str, ...]:
    """The first `n` pieces of a sequence of sentences drawn by `rng`.

    The draw is sequential, so the first k pieces are the same whatever `n` is: a longer
    answer only appends.
    """
    if n <= 0:
        return ()
    out: list[str] = []
    batch = max(4, n // 8)
    while len(out) < n:
        out.extend(chain.from_iterable(rng.choices(sentences, k=batch)))
    return tuple(out[:n])
