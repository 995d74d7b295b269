"""Packed event storage for the memory stream log (stores/streamlog.py): a log's events as
raw-deflate blocks of `BLOCK_EVENTS` events, compressed against the log's first event, all
in one bytearray (no object per block), plus the raw events of the block being filled and
an array of lengths. Imports zlib and array.

Why: one bytes object per event kept a finished 200-chunk answer in ~62 KB (54 KB of JSON
plus object headers), most of the gateway's memory per stream (bench/gateway.py). Chunks of
one answer repeat their id, model and fingerprint: blocks at zlib level 1 with the first
event as preset dictionary hold them in ~11 bytes an event.
"""

from __future__ import annotations

import zlib
from array import array
from collections.abc import Sequence

__all__ = ["BLOCK_EVENTS", "PackedEvents"]

# Events per compressed block. 16, not 32: a live answer keeps up to this many events raw
# (~300 bytes each) on top of the 8 the relay's producer keeps anyway (gateway/streams.py
# `LOCAL_TAIL_EVENTS`): 1.5 KB less per live answer at 100-119 chunks (bench/hotpath.py
# --memory; bench/stream_memory.py traced: 14.1 -> 9.4 payloads held), for ~11 bytes an
# event compressed instead of ~10 and ~0.15 us more per chunk (bench/hotpath.py: a seal
# costs ~6-10 us, mostly fixed). 8 saved 0.2 KB more for another 0.3 us.
BLOCK_EVENTS = 16
# zlib's fastest level: level 6 saved 10% more for 2.3x the time.
LEVEL = 1
# Raw deflate (no header, no checksum) with an 8 KiB window and a smaller hash table than
# zlib's default: a chunk repeats the one before it, so nothing is lost against 32 KiB and
# memLevel 8, whose ~260 KB of state per compressor cost more to set up and clear than
# compressing a 16-event block (bench/hotpath.py: with them, 16-event blocks cost ~0.15 us
# more per chunk; memLevel 1 was slower again, its hash chains too long).
WBITS = -13
MEM_LEVEL = 6
# The preset dictionary is the log's first event, cut to this.
ZDICT_MAX_BYTES = 4096


class PackedEvents:
    """The events of one log, numbered from 1 (see the module docstring)."""

    __slots__ = ("_ends", "_lengths", "_live", "_packed", "_zdict")

    def __init__(self) -> None:
        # The compressed blocks, one after the other, and where each ends.
        self._packed = bytearray()
        self._ends = array("I")
        # Two bytes an event while every event is below 64 KiB (`_grow` widens it).
        self._lengths = array("H")
        self._live: list[bytes] = []
        self._zdict = b""

    def __len__(self) -> int:
        return len(self._lengths)

    def length(self, seq: int) -> int:
        """The payload size of event `seq`."""
        return self._lengths[seq - 1]

    def extend(self, payloads: Sequence[bytes]) -> None:
        """Append events; a block that fills up is compressed."""
        for payload in payloads:
            self.add(payload)

    def add(self, payload: bytes) -> None:
        """Append one event (the relay's hot path)."""
        lengths = self._lengths
        if not lengths:
            self._zdict = payload[:ZDICT_MAX_BYTES]
        try:
            lengths.append(len(payload))
        except OverflowError:
            self._grow(len(payload))
        live = self._live
        live.append(payload)
        if len(live) >= BLOCK_EVENTS:
            self._seal()

    def _grow(self, size: int) -> None:
        self._lengths = array("I", self._lengths)
        self._lengths.append(size)

    def seal(self) -> None:
        """Compress the open block (the log ended: nothing follows)."""
        if self._live:
            self._seal()

    def _seal(self) -> None:
        packer = zlib.compressobj(LEVEL, zlib.DEFLATED, WBITS, MEM_LEVEL, zdict=self._zdict)
        packed = self._packed
        packed += packer.compress(b"".join(self._live))
        packed += packer.flush()
        self._ends.append(len(packed))
        self._live.clear()

    def _inflate(self, block: int) -> bytes:
        start = self._ends[block - 1] if block else 0
        unpacker = zlib.decompressobj(WBITS, zdict=self._zdict)
        return unpacker.decompress(self._packed[start : self._ends[block]]) + unpacker.flush()

    def get(self, first: int, last: int) -> list[bytes]:
        """Events `first` to `last` (inclusive, within 1..len)."""
        out: list[bytes] = []
        lengths = self._lengths
        n_sealed = len(self._ends)
        seq = first
        while seq <= last:
            block = (seq - 1) // BLOCK_EVENTS
            start = block * BLOCK_EVENTS + 1
            if block < n_sealed:
                raw = self._inflate(block)
                offset = sum(lengths[start - 1 : seq - 1])
                end = min(last, start + BLOCK_EVENTS - 1)
                for i in range(seq - 1, end):
                    size = lengths[i]
                    out.append(raw[offset : offset + size])
                    offset += size
                seq = end + 1
            else:
                out.extend(self._live[seq - start : last - start + 1])
                break
        return out
