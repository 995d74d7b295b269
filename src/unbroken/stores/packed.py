"""Packed event storage for the memory stream log (stores/streamlog.py): a log's events in
blocks of `BLOCK_EVENTS` events, all in one bytearray (no object per block or event), plus
the block being filled and an array of lengths. Imports zlib and array.

Why: one bytes object per event kept a finished 200-chunk answer in ~62 KB (54 KB of JSON
plus object headers), most of the gateway's memory per stream (bench/gateway.py). Chunks of
one answer repeat their id, model and fingerprint around a few bytes of text.

Templates: the log learns a *template* from two consecutive events that share a head and a
tail (all but the text of two text chunks: `..."content":"` and `"},"logprobs":...`); an
event that starts with the head and ends with the tail is kept as its middle only, both in
the open block and, when every event of a sealed block fits and their middles are short, in
the sealed block (uncompressed: a token's few bytes, ~5 bytes an event against deflate's
~11, and no zlib call). Every other block is raw deflate of the block as it was kept open
(its middles and whole events, behind a header naming which are middles and their
template), compressed against a preset dictionary (the log's first template's head, or the
block's first event). Reads rebuild each event
byte for byte (head + middle + tail): a template only ever applies to events that start and
end with it and are at least as long as both together.

Text: `text` gives a choice's text in a range of events (what the SDK's answer accumulator
reads back when the log holds the text: gateway/streams.py `Producer.text_since`), a block
of middles without rebuilding its events where it can (core.wire `template_text`).
"""

from __future__ import annotations

import struct
import zlib
from array import array
from collections.abc import Sequence
from typing import Final, Protocol

from unbroken.core.wire import chunk_text, template_reads, values_text

__all__ = ["BLOCK_EVENTS", "PackedEvents", "TemplateSource"]

# Events per block. Smaller blocks hold fewer raw events while open; with templates the
# open block holds middles only (~40 bytes an event less than whole events), so this only
# weighs the compression of untemplated blocks (~11 bytes an event at 16, ~10 at 32) and
# the cost of a seal (a deflate ~6-10 us, mostly fixed; a block of middles ~0.3 us).
BLOCK_EVENTS: Final = 16
# zlib's fastest level: level 6 saved 10% more for 2.3x the time.
LEVEL = 1
# Raw deflate (no header, no checksum) with an 8 KiB window and a smaller hash table than
# zlib's default: a chunk repeats the one before it, so nothing is lost against 32 KiB and
# memLevel 8, whose ~260 KB of state per compressor cost more to set up and clear than
# compressing a 16-event block (bench/hotpath.py: with them, 16-event blocks cost ~0.15 us
# more per chunk; memLevel 1 was slower again, its hash chains too long).
WBITS = -13
MEM_LEVEL = 6
# The preset dictionary is cut to this.
ZDICT_MAX_BYTES = 4096
# A template's head and tail together are at least this long (else it is not worth one).
MIN_TEMPLATE_BYTES = 32
# A sealed block of templated events keeps their middles uncompressed when they average at
# most this many bytes (deflate takes ~11 bytes an event of such blocks); else it is
# deflated whole.
RAW_MAX_BYTES = 12
# Templates one log keeps (a block names its template in 4 bits; 0 is a deflated block).
MAX_TEMPLATES = 15
_KIND_BITS = 4
_KIND_MASK = (1 << _KIND_BITS) - 1
# A deflated block's header (`_seal`): which of its events are middles (a bit each, of
# BLOCK_EVENTS <= 16), the lengths of their template's head and tail; then those.
_HEADER = struct.Struct("<HII")
_BACKSLASH = ord("\\")  # a byte of `bytes`, as indexing reads it
_NO_TEMPLATES: tuple[bytes, ...] = ()


class TemplateSource(Protocol):
    """What may already hold a template's bytes (the SDK stream whose chunks are added:
    `AsyncStream.text_template`)."""

    def text_template(self) -> tuple[bytes, bytes] | None:
        """A head and a tail, or None."""


class PackedEvents:
    """The events of one log, numbered from 1 (see the module docstring). Nothing is added
    after `seal`.

    `source`, when set, is asked for its template at the first event of a block the
    current template does not fit (while the block holds no middle): an event that fits
    the source's is kept as its middle under those very objects (the decoder of a relayed
    answer learned them from that chunk: an answer's first text chunk is a middle, and no
    template is learned from two events); a template learned from two events is kept as
    the source's objects when their bytes are equal (the same ~300 bytes;
    bench/stream_memory.py). Whoever sets it unsets it."""

    __slots__ = (
        "_at",
        "_cut",
        "_ends",
        "_head",
        "_lengths",
        "_n_used",
        "_packed",
        "_tail",
        "_templates",
        "_tried",
        "_whole",
        "_wholes",
        "_zdict",
        "source",
    )

    def __init__(self) -> None:
        # The sealed blocks, one after the other, and for each `end << 4 | kind`: where it
        # ends, and 0 for deflated or the number of the template whose middles it holds.
        # Then the open block (from the last end): its events one after the other, each as
        # its middle under the current template, or whole (bit i of `_whole` set; set off
        # the hot path). One bytearray, not one more for the open block: ~60 bytes less
        # per live stream, and a block of middles is sealed where it is, with no copy.
        self._packed = bytearray()
        self._ends = array("Q")
        # Two bytes an event while every event is below 64 KiB (`_grow` widens it).
        self._lengths = array("H")
        self._whole = 0
        # The open block's whole events as they were added (also in `_packed`): its reads
        # take them as they are (an answer's end reads its last events, whole, and its
        # text, around its role and usage chunks), not cut out of `_packed` one by one.
        # None while it holds none (a long answer's blocks after its first).
        self._wholes: list[bytes] | None = None
        # The templates learned (head, tail, head, tail...); the current one is the last,
        # also in `_head` and `_tail` (empty: none). `_n_used` of them are named by blocks.
        self._templates = _NO_TEMPLATES
        self._head = b""
        self._tail = b""
        self._at = self._cut = 0  # the head's length, and the head's and the tail's
        self._n_used = 0
        self._tried = False  # a template was learned (or tried) in the open block
        self._zdict: bytes | None = None  # chosen at the first deflate
        self.source: TemplateSource | None = None

    def __len__(self) -> int:
        return len(self._lengths)

    def length(self, seq: int) -> int:
        """The payload size of event `seq`."""
        return self._lengths[seq - 1]

    def extend(self, payloads: Sequence[bytes]) -> None:
        """Append events; a block that fills up is sealed."""
        for payload in payloads:
            self.add(payload)

    def add(self, payload: bytes) -> None:
        """Append one event (the relay's hot path: ~0.2 us more than appending it to a list,
        ~0.3 us less than its share of a deflated block's seal; bench/hotpath.py)."""
        lengths = self._lengths
        size = len(payload)
        try:
            lengths.append(size)
        except OverflowError:
            lengths = self._grow(size)
        cut = self._cut
        if cut and size >= cut and payload.startswith(self._head) and payload.endswith(self._tail):
            at = self._at
            block = self._packed
            block += payload[at : at + size - cut]
        elif self._tried:
            # No template is learned again in this block (an answer's usage chunk, its
            # final event and [DONE] after its text): kept whole.
            self._keep_whole(payload, (len(lengths) - 1) % BLOCK_EVENTS)
        else:
            self._miss(payload)
        if not len(lengths) % BLOCK_EVENTS:
            self._seal()

    def add_other(self, payload: bytes) -> None:
        """`add` of an event the current template was found not to fit (the memory log's
        `append_one` checks it before this call): no second check."""
        lengths = self._lengths
        try:
            lengths.append(len(payload))
        except OverflowError:
            lengths = self._grow(len(payload))
        if self._tried:
            self._keep_whole(payload, (len(lengths) - 1) % BLOCK_EVENTS)
        else:
            self._miss(payload)
        if not len(lengths) % BLOCK_EVENTS:
            self._seal()

    def _miss(self, payload: bytes) -> None:
        """An event the template does not fit, in a block where no template was learned
        (or tried) yet: while every event of the block is whole, the source's template
        when the event fits it (the decoder learned it from this very chunk: no bytes
        compared nor copied, and the answer's first text chunk is a middle already), else
        one learned from this event and the whole one before it (not the log's first: a
        role chunk), once a block at most; else kept whole."""
        lengths = self._lengths
        n = (len(lengths) - 1) % BLOCK_EVENTS  # its place in the block
        whole = self._whole
        if whole != (1 << n) - 1:
            self._tried = True  # a middle in the block: no template is learned in it
        else:
            source = self.source
            # (Not for the log's first event: an answer's role chunk, before any text.)
            shared = None if source is None or len(lengths) == 1 else source.text_template()
            if shared is not None:
                head, tail = shared
                cut = len(head) + len(tail)
                if (
                    len(payload) >= cut >= MIN_TEMPLATE_BYTES
                    and payload.startswith(head)
                    and payload.endswith(tail)
                    and self._learn(head, tail)
                ):
                    self._packed += payload[len(head) : len(payload) - len(tail)]
                    return
            wholes = self._wholes
            if n > 0 and len(lengths) > 2 and wholes is not None:
                self._tried = True
                learned = _template(wholes[-1], payload)  # (the event before: whole)
                if learned is not None:
                    head, tail = learned
                    if shared is not None and shared[0] == head and shared[1] == tail:
                        head, tail = shared  # the source's objects, not equal copies
                    if self._learn(head, tail):
                        self._packed += payload[len(head) : len(payload) - len(tail)]
                        return
        self._keep_whole(payload, n)

    def _keep_whole(self, payload: bytes, n: int) -> None:
        """Keep `payload`, the open block's event `n` (from 0), whole: its bytes as they
        are, and the object itself until the block is sealed (`_wholes`)."""
        self._whole |= 1 << n
        self._packed += payload
        wholes = self._wholes
        if wholes is None:
            self._wholes = [payload]
        else:
            wholes.append(payload)

    def _learn(self, head: bytes, tail: bytes) -> bool:
        """Make `head` and `tail` the current template (the open block's events from now
        on); False at the bound of templates."""
        templates = self._templates
        if not templates:  # (a log's first)
            self._templates = (head, tail)
        else:
            if len(templates) // 2 > self._n_used:
                templates = templates[:-2]  # the current one: no block names it yet
            elif len(templates) // 2 >= MAX_TEMPLATES:
                return False
            self._templates = (*templates, head, tail)
        self._head = head
        self._tail = tail
        self._at = len(head)
        self._cut = len(head) + len(tail)
        self._tried = True
        return True

    def _grow(self, size: int) -> array[int]:
        lengths = self._lengths = array("I", self._lengths)
        lengths.append(size)
        return lengths

    def seal(self) -> None:
        """Seal the open block (the log ended: nothing follows)."""
        self.source = None
        if len(self._lengths) > len(self._ends) * BLOCK_EVENTS:
            self._seal()

    def _seal(self) -> None:
        ends = self._ends
        n = len(self._lengths) - len(ends) * BLOCK_EVENTS
        packed = self._packed
        start = ends[-1] >> _KIND_BITS if ends else 0  # (`_open_at`)
        whole = self._whole
        if not whole and len(packed) - start <= RAW_MAX_BYTES * n:
            kind = self._n_used = len(self._templates) // 2  # the middles stay as they are
        else:
            # The block as it is kept open (its middles and whole events, one after the
            # other) is deflated behind a header: which events are middles, and their
            # template's head and tail (in the block: a template only some deflated blocks
            # use takes none of the `MAX_TEMPLATES`). Not its events rebuilt: an answer's
            # first block holds the role chunk whole and middles, and deflating ~16x the
            # bytes took ~10 us of the ~50 a 200-chunk answer's log cost.
            kind = 0
            coded = ~whole & ((1 << n) - 1)
            head, tail = (self._head, self._tail) if coded else (b"", b"")
            zdict = self._zdict
            if zdict is None:
                first = len(self._ends) * BLOCK_EVENTS
                # The template's head, else the block's first event (whole: no middles).
                zdict = self._head or bytes(packed[start : start + self._lengths[first]])
                zdict = self._zdict = zdict[:ZDICT_MAX_BYTES]
            packer = zlib.compressobj(LEVEL, zlib.DEFLATED, WBITS, MEM_LEVEL, zdict=zdict)
            header = _HEADER.pack(coded, len(head), len(tail)) + head + tail
            if start:
                with memoryview(packed) as view:
                    body = packer.compress(header) + packer.compress(view[start:])
                del packed[start:]
            else:  # the log's first block (a short answer's all): no view, no copy
                body = packer.compress(header) + packer.compress(packed)
                packed.clear()
            packed += body + packer.flush()
        ends.append(len(packed) << _KIND_BITS | kind)
        self._whole = 0
        self._wholes = None
        self._tried = False

    def _open_at(self) -> int:
        """Where the open block starts in `_packed`."""
        ends = self._ends
        return ends[-1] >> _KIND_BITS if ends else 0

    def _rebuild(
        self,
        data: bytes | bytearray,
        first: int,
        count: int,
        coded: int,
        head: bytes,
        tail: bytes,
        offset: int = 0,
    ) -> list[bytes]:
        """The `count` events from event index `first` (0-based) whose pieces `data` holds
        one after the other from `offset`: whole, or (bit i of `coded`) the middle of
        `head` + ... + `tail`."""
        out: list[bytes] = []
        lengths = self._lengths
        cut = len(head) + len(tail)
        for i in range(count):
            size = lengths[first + i]
            if coded >> i & 1:
                end = offset + size - cut
                out.append(head + data[offset:end] + tail)
            else:
                end = offset + size
                out.append(bytes(data[offset:end]))
            offset = end
        return out

    def _block(self, block: int) -> list[bytes]:
        """The events of sealed block `block` (0-based)."""
        ends = self._ends
        start = ends[block - 1] >> _KIND_BITS if block else 0
        end, kind = ends[block] >> _KIND_BITS, ends[block] & _KIND_MASK
        first = block * BLOCK_EVENTS
        count = min(BLOCK_EVENTS, len(self._lengths) - first)
        if kind:
            head, tail = self._templates[2 * kind - 2], self._templates[2 * kind - 1]
            return self._rebuild(
                self._packed[start:end], first, count, (1 << count) - 1, head, tail
            )
        raw, coded, head, tail, at = self._inflate(start, end)
        return self._rebuild(raw, first, count, coded, head, tail, at)

    def _inflate(self, start: int, end: int) -> tuple[bytes, int, bytes, bytes, int]:
        """The deflated block kept in `_packed[start:end]` (see `_seal`): its bytes, which
        of its events are middles, their template's head and tail, and where its pieces
        start in those bytes (after the header)."""
        unpacker = zlib.decompressobj(WBITS, zdict=self._zdict or b"")
        raw = unpacker.decompress(self._packed[start:end]) + unpacker.flush()
        coded, n_head, n_tail = _HEADER.unpack_from(raw)
        at = _HEADER.size
        head = raw[at : at + n_head]
        tail = raw[at + n_head : at + n_head + n_tail]
        return raw, coded, head, tail, at + n_head + n_tail

    def text(self, first: int, last: int, index: int, reasoning: bool) -> list[str]:
        """The pieces of choice `index`'s content (its reasoning with `reasoning`) in
        events `first` to `last` (within 1..len), as core.wire `chunk_text` reads them:
        consecutive blocks of middles all under one template, not escaped, are read as they
        are kept (one decode of them all, not one per event: ~10x less work; and one per
        run of blocks, not per block: an answer's end reads its text back at once)."""
        n_sealed = len(self._ends)
        # What each template's chunks bring of the text (`template_reads`), asked once per
        # template, not once per block: two decodes of a probe chunk each.
        reads: dict[tuple[bytes, bytes], bool | None] = {}
        if first > n_sealed * BLOCK_EVENTS:  # all in the open block (a short answer's all)
            return self._open_text(n_sealed, first, last, reads, index, reasoning)
        pieces: list[str] = []
        seq = first
        single = 0  # up to this event, blocks are read one at a time
        while seq <= last:
            block = (seq - 1) // BLOCK_EVENTS
            if block >= n_sealed:
                pieces += self._open_text(n_sealed, seq, last, reads, index, reasoning)
                break
            start = block * BLOCK_EVENTS + 1
            end = min(last, start + BLOCK_EVENTS - 1)
            if seq == start:
                middles = self._middles(block, n_sealed, end if seq <= single else last)
                if middles is not None:
                    text = self._values_text(middles, reads, index, reasoning)
                    if text is None and middles[0] > end:
                        # Not all string contents: the run's blocks one at a time (not
                        # runs again from each of them: that would read it over and over).
                        single = middles[0]
                        middles = self._middles(block, n_sealed, end)
                        if middles is not None:
                            text = self._values_text(middles, reads, index, reasoning)
                    if text is not None and middles is not None:
                        if text:
                            pieces.append(text)
                        seq = middles[0] + 1
                        continue
            if not self._ends[block] & _KIND_MASK:
                ends = self._ends
                raw, coded, head, tail, at = self._inflate(
                    ends[block - 1] >> _KIND_BITS if block else 0, ends[block] >> _KIND_BITS
                )
                first0 = block * BLOCK_EVENTS
                pieces += self._pieces(
                    raw, at, first0, seq, end, coded, (head, tail), reads, index, reasoning
                )
            else:
                pieces += chunk_text(self.get(seq, end), index, reasoning)
            seq = end + 1
        return pieces

    def _open_text(
        self,
        n_sealed: int,
        seq: int,
        last: int,
        reads: dict[tuple[bytes, bytes], bool | None],
        index: int,
        reasoning: bool,
    ) -> list[str]:
        """`text` of events `seq` to `last` of the open block (a short answer's all): its
        runs of middles read as they are kept, its whole events decoded (`_pieces`)."""
        start = n_sealed * BLOCK_EVENTS
        coded = ~self._whole & ((1 << (len(self._lengths) - start)) - 1)
        packed = self._packed
        data = bytes(packed[self._ends[-1] >> _KIND_BITS :] if n_sealed else packed)
        template = (self._head, self._tail)
        return self._pieces(data, 0, start, seq, last, coded, template, reads, index, reasoning)

    def _pieces(
        self,
        data: bytes,
        offset: int,
        first: int,
        seq: int,
        last: int,
        coded: int,
        template: tuple[bytes, bytes],
        reads: dict[tuple[bytes, bytes], bool | None],
        index: int,
        reasoning: bool,
    ) -> list[str]:
        """`text` of events `seq` to `last` of a block whose events from index `first`
        (0-based) `data` holds one after the other from `offset`: whole, or (bit i of
        `coded`) the middle of `template`. Each run of its middles is read at once as a
        block of middles is (`_run_text`), the other events decoded one by one; a middle
        ending in an odd run of backslashes is decoded as its event (an escape never spans
        two of them then: escapes within a middle, such as `\\"`, are read in the run).
        Why: an answer's first and last blocks hold whole events (the role chunk, the
        usage chunk), and decoding all their events was most of the read-back of an
        answer's text at its end."""
        head, tail = template
        cut = len(head) + len(tail)
        lengths = self._lengths
        pieces: list[str] = []
        events: list[bytes] = []  # whole events, not decoded yet
        i = seq - 1 - first  # (the block's events before `seq` are passed over)
        if i:
            offset += sum(lengths[first : first + i]) - cut * (coded & ((1 << i) - 1)).bit_count()
        stop = last - first
        while i < stop:
            rest = coded >> i
            if rest & 1:
                # A run of middles, found from the bits (to the next whole event): its
                # bytes at once (a sum in C), not one slice per event.
                whole = ~rest
                j = min(stop, i + (whole & -whole).bit_length() - 1)
                sizes = lengths[first + i : first + j]
                end = offset + sum(sizes) - cut * (j - i)
                text = None
                # (A middle ending in an odd run of backslashes would escape the next one's
                # first byte, read together: such a run is decoded as its events.)
                if data.find(b"\\", offset, end) < 0 or not _odd_end(data, offset, sizes, cut):
                    if template not in reads:
                        reads[template] = template_reads(head, tail, index, reasoning)
                    text = values_text(data[offset:end], reads[template])
                if text is None:  # (not all string contents, or escapes as above)
                    for size in sizes:
                        size += offset - cut
                        events.append(head + data[offset:size] + tail)
                        offset = size
                else:
                    if events:
                        pieces += chunk_text(events, index, reasoning)
                        events = []
                    if text:
                        pieces.append(text)
                    offset = end
            else:
                j = min(stop, i + (rest & -rest).bit_length() - 1) if rest else stop
                for size in lengths[first + i : first + j]:
                    end = offset + size
                    events.append(data[offset:end])
                    offset = end
            i = j
        if events:
            pieces += chunk_text(events, index, reasoning)
        return pieces

    @staticmethod
    def _values_text(
        middles: tuple[int, bytes, bytes, bytes],
        reads: dict[tuple[bytes, bytes], bool | None],
        index: int,
        reasoning: bool,
    ) -> str | None:
        _, head, tail, values = middles
        template = (head, tail)
        if template not in reads:
            reads[template] = template_reads(head, tail, index, reasoning)
        return values_text(values, reads[template])

    def _middles(
        self, block: int, n_sealed: int, stop: int
    ) -> tuple[int, bytes, bytes, bytes] | None:
        """The middles of sealed block `block` and of the blocks after it under the same template,
        all their events as middles and up to event `stop` at most: the last event's
        number, the template's head and tail, and the middles one after the other; None
        when block `block` is not such a block or does not end by `stop`."""
        ends = self._ends
        lengths = self._lengths
        n = len(lengths)
        begin = ends[block - 1] >> _KIND_BITS if block else 0
        first = block * BLOCK_EVENTS  # (0-based)
        kind = ends[block] & _KIND_MASK
        last = min(n, (block + 1) * BLOCK_EVENTS)
        if not kind or last > stop:
            return None
        head, tail = self._templates[2 * kind - 2], self._templates[2 * kind - 1]
        finish = ends[block] >> _KIND_BITS
        # The sealed blocks after it under the same template (they follow one another in
        # `_packed`), and the open block's first events when they are middles of it.
        while block + 1 < n_sealed:
            if ends[block + 1] & _KIND_MASK != kind or min(n, (block + 2) * BLOCK_EVENTS) > stop:
                break
            block += 1
            finish = ends[block] >> _KIND_BITS
            last = min(n, (block + 1) * BLOCK_EVENTS)
        if block + 1 == n_sealed and self._head == head and self._tail == tail:
            run = self._open_run(n_sealed, stop)
            if run is not None:
                last, finish = run
        data = bytes(self._packed[begin:finish])
        # Read as one JSON string, a middle ending in a backslash that escapes nothing (an
        # odd run of them) would escape the next one's first byte: such a run is read block
        # by block, event by event. An escaped backslash (`\\\\`, an even run) ends one
        # well. Only the blocks holding a backslash are looked at, found from the
        # backslashes themselves (an answer's few escapes), not by a search in each block.
        at = data.find(b"\\")
        if at >= 0:
            cut = len(head) + len(tail)
            block = first // BLOCK_EVENTS  # the run's first block, whose middles start
            start = 0  # here in `data`
            while at >= 0:
                until = (ends[block] >> _KIND_BITS if block < n_sealed else finish) - begin
                if at >= until:  # not in this block: the next one
                    block += 1
                    start = until
                    continue
                seq = block * BLOCK_EVENTS
                if _odd_end(data, start, lengths[seq : min(last, seq + BLOCK_EVENTS)], cut):
                    return None
                at = data.find(b"\\", until)
        return last, head, tail, data

    def _open_run(self, n_sealed: int, stop: int) -> tuple[int, int] | None:
        """The open block's first events kept as middles (all of them, or those before its
        first whole one: an answer's last chunks, usage and final event, are whole), up to
        event `stop`: the last one's number and where its middle ends in `_packed`; None
        when there is none. They are middles of the current template: a template is learned
        only after whole events of the block."""
        cut = self._cut
        if not cut:
            return None
        lengths = self._lengths
        first = n_sealed * BLOCK_EVENTS
        whole = self._whole
        count = min(
            len(lengths) - first if not whole else (whole & -whole).bit_length() - 1,
            stop - first,
        )
        if count <= 0:
            return None
        if first + count == len(lengths):
            return first + count, len(self._packed)
        sizes = lengths[first : first + count]
        return first + count, self._open_at() + sum(sizes) - count * cut

    def get(self, first: int, last: int) -> list[bytes]:
        """Events `first` to `last` (inclusive, within 1..len)."""
        n_sealed = len(self._ends)
        if first > n_sealed * BLOCK_EVENTS:  # all in the open block (an answer's end reads)
            return self._open_from(first - 1 - n_sealed * BLOCK_EVENTS, last - first + 1)
        out: list[bytes] = []
        seq = first
        while seq <= last:
            block = (seq - 1) // BLOCK_EVENTS
            start = block * BLOCK_EVENTS + 1
            if block < n_sealed:
                events = self._block(block)
                end = min(last, start + len(events) - 1)
                out.extend(events[seq - start : end - start + 1])
            else:
                end = last
                out += self._open_from(seq - start, end - seq + 1)
            seq = end + 1
        return out

    def _open_from(self, skip: int, count: int) -> list[bytes]:
        """`count` events of the open block after its first `skip`: only those rebuilt (a
        reader asks for the last few events of the block, an answer's end for its last
        ones; rebuilding the block's all, as a seal does, was most of that read), its whole
        ones as they were added (`_wholes`; an answer's last events: no loop). Where the
        middles start is the sizes before them less a template's bytes for each middle,
        all counted in C (a sum, a bit count)."""
        every = self._whole
        whole = every >> skip
        wholes = self._wholes
        # The whole events before them (their place in `_wholes`).
        k = (every & ((1 << skip) - 1)).bit_count()
        mask = (1 << count) - 1
        if whole & mask == mask and wholes is not None:
            return wholes[k : k + count]
        lengths = self._lengths
        ends = self._ends
        first = len(ends) * BLOCK_EVENTS + skip
        cut = self._cut
        start = ends[-1] >> _KIND_BITS if ends else 0  # (`_open_at`)
        if skip:
            start += sum(lengths[first - skip : first]) - cut * (skip - k)
        packed = self._packed
        head = self._head
        tail = self._tail
        out: list[bytes] = []
        for i in range(first, first + count):
            end = start + lengths[i]
            if whole & 1 and wholes is not None:
                out.append(wholes[k])
                k += 1
            else:
                end -= cut
                out.append(head + packed[start:end] + tail)
            whole >>= 1
            start = end
        return out


def _odd_end(data: bytes, offset: int, sizes: array[int], cut: int) -> bool:
    """Whether a middle ends in an odd run of backslashes: the middles of events of these
    `sizes` (less `cut`), one after the other in `data` from `offset`. A plain loop over
    them: compiled (tools/compile_native.py), each last byte is read in place (a chain of
    map and accumulate iterators cost ~3 us a block there, most of the read-back of an
    answer whose text holds escapes)."""
    end = offset
    for size in sizes:
        size -= cut
        end += size
        # (An empty middle has no last byte: the byte before it is another's.)
        if size and data[end - 1] == _BACKSLASH:
            at = end
            while at > end - size and data[at - 1] == _BACKSLASH:
                at -= 1
            if (end - at) % 2:
                return True
    return False


def _template(prev: bytes, cur: bytes) -> tuple[bytes, bytes] | None:
    """The head and tail `cur` shares with `prev`, cut where a JSON string's value starts
    (after `:"`) and ends (its closing quote), so the next chunks' text falls between them;
    None when they share less than `MIN_TEMPLATE_BYTES`. Only on a miss, once an answer or
    block at most."""
    limit = min(len(prev), len(cur))
    # The shared head's length: the bytes before the first that differs, found from the
    # highest bit set in the two heads XORed as big-endian integers (in C, no search).
    differ = int.from_bytes(prev[:limit], "big") ^ int.from_bytes(cur[:limit], "big")
    lo = limit - (differ.bit_length() + 7) // 8
    value = cur.rfind(b':"', 0, lo)
    head = value + 2 if value >= 0 else cur.rfind(b'"', 0, lo) + 1
    # The shared tail's (not reaching into the head), the same way from the ends.
    span = limit - head
    differ = int.from_bytes(prev[len(prev) - span :], "little") ^ int.from_bytes(
        cur[len(cur) - span :], "little"
    )
    lo = span - (differ.bit_length() + 7) // 8
    # The closing quote: the first quote of the shared tail not escaped by a backslash.
    quote = cur.find(b'"', len(cur) - lo)
    while quote > 0 and cur[quote - 1] == 0x5C:
        quote = cur.find(b'"', quote + 1)
    tail = len(cur) - quote if quote >= 0 else 0
    if head + tail < MIN_TEMPLATE_BYTES:
        return None
    return cur[:head], cur[len(cur) - tail :]
