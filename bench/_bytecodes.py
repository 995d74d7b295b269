"""A `sys.settrace` tracer that counts the bytecodes run per function (bench/hotpath.py and
bench/sdk_request.py): a figure the host's load does not move."""

from __future__ import annotations

import collections
from types import FrameType
from typing import Any

TraceFunction = Any  # sys.settrace's callable: (frame, event, arg) -> itself or None


def opcode_tracer(counts: collections.Counter[str]) -> TraceFunction:
    """A tracer adding one to `counts["<path under unbroken/>:<function>"]` per bytecode."""

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        if event == "opcode":
            code = frame.f_code
            where = code.co_filename.rpartition("/unbroken/")[2] or code.co_filename
            counts[f"{where}:{code.co_name}"] += 1
        return tracer

    return tracer
