"""Inflates a gzip file into memory on one thread per core, verified as gzip verifies it.

A deflate stream cannot simply be cut in pieces: each block starts at the bit where the one before
it ends, and a match may copy any of the 32 KiB inflated before it. So the compressed bytes are
split into one piece per core, and each piece after the first starts at a block header found by
its bit pattern near the piece's nominal start (one that begins on a byte boundary, as about one
block in eight does, so that ISA-L can start there). It inflates against a window of zeros in place
of the 32 KiB it cannot know yet. When the piece before it reaches that header, it inflates on
with the true window and compares: once both agree on 32 KiB in a row, every later byte of the
next piece is exact too (from there on, its matches copy only bytes that both agree on), and the
bytes before that point come from the piece before. A piece that does not agree soon enough (the
header was a coincidence, or its data leans on the window for too long) is dropped, and the
piece before it inflates its range itself. The whole output is then checked against gzip's
CRC-32 and length, as a sequential gunzip would. On CIFAR-10 the bytes that depend on the unknown
window end 64 kB into a piece, and the pieces join about 140 kB after it starts.

ISA-L drops the GIL while it inflates, so the pieces run on separate cores. The output can be
read while it inflates: `wait`, `view` and `read_into` block until the bytes they need are
exact. A file without gzip's magic number is read as it is (a plain tar).
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
from isal import isal_zlib

log = logging.getLogger(__name__)

WINDOW = 1 << 15  # how far back a deflate match may reach
IN_CHUNK = 1 << 20  # compressed bytes inflated between two reports of progress to readers
# Compressed bytes per call to ISA-L: their output (about 70 kB) then stays below malloc's mmap
# threshold, in memory it reuses. Calls of 256 kB or more made most outputs fresh mappings,
# whose page faults cost 0.2-0.4 s of system time per CIFAR-10 archive.
FEED_STEP = 1 << 16
OUT_CHUNK = 1 << 20  # the most one call may inflate: a bomb meets the size check in small steps
JOIN_STEP = 1 << 14  # compressed bytes per step while two pieces are compared
MIN_PIECE = 8 << 20  # compressed bytes a piece needs to be worth a thread of its own
SEARCH_SPAN = 4 << 20  # how far past its nominal start a piece looks for a block header
VERIFY_SPAN = 8 << 20  # how far two pieces are compared before the later one is dropped
TRIAL_OUT = 1 << 16  # a found header must inflate this much to be taken as a block
SEARCH_STEP = 1 << 16  # compressed bytes whose headers are tested at once
ZEROS = bytes(WINDOW)

_IsalError = cast("type[Exception]", isal_zlib.error)  # its stub calls it an instance


class GzipError(Exception):
    """The file is not a whole, valid gzip stream (the message says what is wrong)."""


class LimitExceeded(Exception):
    """The file inflates to more bytes than the caller allowed."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"inflates to more than {limit:,} bytes")
        self.limit = limit


class _Stopped(Exception):
    """The reader closed the inflater, or the piece was dropped: its worker ends quietly."""


def cores() -> int:
    """How many cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(eq=False)
class _Piece:
    """One piece of the compressed stream and what it has inflated so far."""

    nominal: int  # where it was meant to start; its block header lies at or after this
    buffer: np.ndarray  # reserved at the caller's limit: only the pages written become memory
    start: int | None = None  # its first compressed byte, once located
    located: bool = False  # its start is settled (a block header found, or none: dropped)
    dropped: bool = False  # the piece before inflates its range instead
    skip: int = 0  # leading bytes the piece before supplies instead
    size: int = 0  # bytes inflated into `buffer`
    next: _Piece | None = None  # the piece it handed over to, once joined
    stream_end: int | None = None  # file offset just past the final deflate block, if it got there
    finished: bool = False  # it inflates nothing more
    error: Exception | None = None  # its own failure: final only once it is joined


class Inflater:
    """The inflated bytes of `path`, produced by background threads and read as they come."""

    def __init__(self, path: Path, limit: int, pieces: int | None = None) -> None:
        self.limit = limit
        self.error: Exception | None = None  # the stream's own error, once final
        self.done = False  # all bytes are there and verified (or `error` is set)
        self._changed = threading.Condition()
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._data = _map(path)
        self._total = 0  # bytes inflated by all pieces, to bound memory on a bomb
        self._verifying = False
        if self._data[:2].tobytes() != b"\x1f\x8b":  # a plain tar: the file is the output
            whole = _Piece(0, self._data, 0, located=True, size=len(self._data), finished=True)
            self._pieces = [whole]
            if len(self._data) > limit:
                self.error = LimitExceeded(limit)
            self.done = True
            return
        try:
            body = _gzip_header_end(self._data)
        except GzipError as error:
            self.error, self.done = error, True
            self._pieces = []
            return
        count = max(1, min(pieces or cores(), (len(self._data) - body) // MIN_PIECE))
        span = (len(self._data) - body) // count
        self._pieces = [
            _Piece(body + k * span, np.empty(limit, dtype=np.uint8)) for k in range(count)
        ]
        first = self._pieces[0]
        first.start, first.located = body, True
        for k, piece in enumerate(self._pieces):
            thread = threading.Thread(target=self._run, args=(k, piece), name="inflate")
            thread.daemon = True  # a reader that dies does not keep the process alive
            self._threads.append(thread)
            thread.start()
        log.debug("inflating %s in %d pieces", path, count)

    # --- for the reader ---------------------------------------------------------------------

    def wait(self, end: int) -> int:
        """How many bytes are there once `end` are, or once the stream has ended short of it."""
        with self._changed:
            self._changed.wait_for(lambda: self._available() >= end or self.done)
            return self._available()

    def view(self, start: int, end: int) -> memoryview:
        """Bytes [start, end) once they are there: a view when one piece holds them all."""
        available = self.wait(end)
        if available < end:
            raise EOFError(f"the stream ends at byte {available:,}, before byte {end:,}")
        with self._changed:
            segments = self._segments()
        parts = [
            segment[max(start, low) - low : min(end, high) - low]
            for low, high, segment in segments
            if low < end and high > start
        ]
        if len(parts) == 1:
            return parts[0].data
        return np.concatenate(parts).data if parts else memoryview(b"")

    def read_into(self, position: int, buffer: memoryview) -> int:
        """Copies what is there of [position, position + len(buffer)); returns how much."""
        available = self.wait(position + len(buffer))
        count = max(0, min(len(buffer), available - position))
        if count:
            buffer[:count] = self.view(position, position + count)
        return count

    def parts(self) -> int:
        """How many pieces have delivered bytes so far (joined ones; dropped ones do not count)."""
        with self._changed:
            return len(self._segments())

    def finish(self) -> None:
        """Waits until every byte is there and verified (gzip's CRC-32 and length)."""
        with self._changed:
            self._changed.wait_for(lambda: self.done)

    def close(self) -> None:
        """Stops the threads (when the reader stopped early) and waits for them."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        for thread in self._threads:
            thread.join()

    # --- the chain of pieces (call with the lock held) --------------------------------------

    def _segments(self) -> list[tuple[int, int, np.ndarray]]:
        """(start, end, bytes) in the output of each exact part, in order."""
        segments, offset = [], 0
        piece: _Piece | None = self._pieces[0] if self._pieces else None
        while piece is not None:
            length = piece.size - piece.skip
            segments.append((offset, offset + length, piece.buffer[piece.skip : piece.size]))
            offset += length
            piece = piece.next
        return segments

    def _available(self) -> int:
        segments = self._segments()
        return segments[-1][1] if segments else 0

    def _last_joined(self) -> _Piece:
        piece = self._pieces[0]
        while piece.next is not None:
            piece = piece.next
        return piece

    def _settle(self) -> Callable[[], None] | None:
        """After any change: the stream's error, or the work that verifies its end, if due."""
        if self.done or self.error is not None or self._verifying:
            return None
        last = self._last_joined()
        if last.error is not None:
            self.error = last.error
        elif (
            last.stream_end is not None
            and last.finished
            and all(p.finished or p.dropped or p is last for p in self._pieces)
        ):
            self._verifying = True  # once: whichever thread completes the chain verifies it
            return lambda: self._verify(last)
        elif self._available() > self.limit:
            self.error = LimitExceeded(self.limit)
        if self.error is not None:
            self.done, self._stopping = True, True
        return None

    def _update(self, change: Callable[[], None] | None = None) -> None:
        """Applies `change` under the lock, wakes the waiters and settles the stream."""
        with self._changed:
            if change is not None:
                change()
            verify = self._settle()
            self._changed.notify_all()
        if verify is not None:
            verify()

    # --- the workers ------------------------------------------------------------------------

    def _run(self, index: int, piece: _Piece) -> None:
        try:
            if index > 0:
                start = _find_block(self._data, piece.nominal, piece.nominal + SEARCH_SPAN)

                def locate() -> None:
                    piece.start, piece.located, piece.dropped = start, True, start is None

                self._update(locate)
                if start is None:
                    log.debug("piece %d: no block header near byte %d", index, piece.nominal)
                    return
                decoder = isal_zlib.decompressobj(wbits=-15, zdict=ZEROS)
            else:
                decoder = isal_zlib.decompressobj(wbits=-15)
            self._inflate(index, piece, decoder)
        except _Stopped:
            pass
        except Exception as error:
            piece.error = error  # final only if the piece is (or gets) joined
        finally:

            def finish() -> None:
                piece.finished = True

            self._update(finish)

    def _inflate(self, index: int, piece: _Piece, decoder: isal_zlib.Decompress) -> None:
        """Inflates the piece's range, then joins the next piece or takes over its range."""
        assert piece.start is not None
        position = piece.start
        for later in self._pieces[index + 1 :]:
            target = later.nominal  # its block header lies at or after its nominal start
            while True:
                if position >= target:
                    self._await_located(piece, later)
                    if later.start is None or position >= later.start:
                        break
                    target = later.start
                end = min(position + IN_CHUNK, target)
                stream_end = self._feed(piece, decoder, position, end)
                if stream_end is not None:
                    return self._end_stream(piece, index, stream_end)
                position = end
            if later.dropped:
                continue
            if position != later.start:  # an earlier comparison inflated past it
                self._drop(later)
                continue
            outcome, position = self._join(piece, decoder, later, position)
            if outcome == "joined":
                return None
            if outcome == "ended":  # the stream ended while the two were compared
                return self._end_stream(piece, index, position)
        while True:  # the last piece: on to the end of the deflate stream
            end = min(position + IN_CHUNK, len(self._data))
            if end == position:
                raise GzipError("the file ends before the deflate stream does (truncated)")
            stream_end = self._feed(piece, decoder, position, end)
            if stream_end is not None:
                return self._end_stream(piece, index, stream_end)
            position = end

    def _join(
        self, piece: _Piece, decoder: isal_zlib.Decompress, later: _Piece, position: int
    ) -> tuple[str, int]:
        """Inflates on into `later`'s range until both agree on a window of bytes in a row.

        Returns ("joined", -) once they agree; ("dropped", the next compressed byte) when they
        do not within VERIFY_SPAN, and this piece goes on alone; ("ended", the end of the
        deflate stream) when the stream ends first.
        """
        base = piece.size  # this piece's output at `later`'s first block
        agree_from = 0  # both agree on [agree_from, checked)
        checked = 0
        while True:
            produced = piece.size - base
            found = self._await_output(piece, later, produced)
            if found > checked:
                mine = piece.buffer[base + checked : base + found]
                theirs = later.buffer[checked:found]
                differ = np.flatnonzero(mine != theirs)
                if len(differ):
                    agree_from = checked + int(differ[-1]) + 1
                checked = found
            if checked == produced and produced - agree_from >= WINDOW:
                with self._changed:
                    if piece.dropped or self._stopping:
                        raise _Stopped
                    later.skip, piece.next = produced, later
                self._update()
                log.debug("joined a piece after %d bytes", produced)
                return "joined", position
            if produced >= VERIFY_SPAN or (later.finished and later.size <= produced):
                self._drop(later)
                return "dropped", position
            end = min(position + JOIN_STEP, len(self._data))
            if end == position:
                raise GzipError("the file ends before the deflate stream does (truncated)")
            stream_end = self._feed(piece, decoder, position, end)
            if stream_end is not None:
                self._drop(later)
                return "ended", stream_end
            position = end

    def _drop(self, later: _Piece) -> None:
        log.debug("dropped the piece found at byte %s", later.start)

        def drop() -> None:
            later.dropped = True

        self._update(drop)

    def _end_stream(self, piece: _Piece, index: int, stream_end: int) -> None:
        """The deflate stream ended inside this piece: the pieces after it hold no blocks."""

        def end() -> None:
            piece.stream_end = stream_end
            for later in self._pieces[index + 1 :]:
                later.dropped = True

        self._update(end)

    def _feed(
        self, piece: _Piece, decoder: isal_zlib.Decompress, start: int, end: int
    ) -> int | None:
        """Inflates compressed bytes [start, end) into the piece; the stream's end if reached."""
        size = piece.size  # published to readers once, at the end
        try:
            for step in range(start, end, FEED_STEP):
                data: bytes | memoryview = self._data[step : min(step + FEED_STEP, end)].data
                while data:
                    if self._stopping or piece.dropped:
                        raise _Stopped
                    try:
                        out = decoder.decompress(data, OUT_CHUNK)
                    except _IsalError as error:
                        raise GzipError(f"corrupt deflate data ({error})") from None
                    grown = size + len(out) - piece.size
                    if size + len(out) > self.limit or self._total + grown > self._budget():
                        raise LimitExceeded(self.limit)
                    piece.buffer[size : size + len(out)] = np.frombuffer(out, np.uint8)
                    size += len(out)
                    if decoder.eof:
                        return min(step + FEED_STEP, end) - len(decoder.unused_data)
                    data = decoder.unconsumed_tail
            return None
        finally:

            def grow() -> None:
                self._total += size - piece.size
                piece.size = size

            self._update(grow)

    def _budget(self) -> int:
        # Pieces being compared inflate the same bytes twice, for up to VERIFY_SPAN each.
        return self.limit + (len(self._pieces) - 1) * (VERIFY_SPAN + OUT_CHUNK)

    def _await_located(self, piece: _Piece, later: _Piece) -> None:
        """Waits until `later` has found its start (or found none)."""
        with self._changed:
            self._wait(lambda: later.located, piece)

    def _await_output(self, piece: _Piece, later: _Piece, count: int) -> int:
        """Waits until `later` has inflated `count` bytes or stopped; how many of them it has."""
        with self._changed:
            self._wait(lambda: later.size >= count or later.finished, piece)
            return min(count, later.size)

    def _wait(self, ready: Callable[[], bool], piece: _Piece) -> None:
        """With the lock held: waits for `ready`, unless `piece` is dropped or all stop."""
        self._changed.wait_for(lambda: ready() or self._stopping or piece.dropped)
        if self._stopping or piece.dropped:
            raise _Stopped

    def _verify(self, last: _Piece) -> None:
        """Checks gzip's trailer, inflates any further gzip members, and ends the stream."""
        try:
            assert last.stream_end is not None
            with self._changed:
                segments = self._segments()
            trailer = self._data[last.stream_end : last.stream_end + 8].tobytes()
            if len(trailer) < 8:
                raise GzipError("the file ends inside gzip's trailer (truncated)")
            crc = 0
            for _, _, segment in segments:
                crc = isal_zlib.crc32(segment, crc)
            length = segments[-1][1]
            if int.from_bytes(trailer[:4], "little") != crc:
                raise GzipError("the inflated bytes fail gzip's CRC-32 check")
            if int.from_bytes(trailer[4:], "little") != length % 2**32:
                raise GzipError("the inflated length differs from gzip's record of it")
            self._more_members(last, last.stream_end + 8)
        except Exception as error:
            self.error = error
        with self._changed:
            self.done = True
            self._changed.notify_all()

    def _more_members(self, last: _Piece, position: int) -> None:
        """Inflates the gzip members that may follow the first (as `cat a.gz b.gz` makes)."""
        rest = self._data[position:]
        while rest.any():  # zero padding after the stream is allowed
            rest = rest[int(np.flatnonzero(rest)[0]) :]
            if rest[:2].tobytes() != b"\x1f\x8b":
                raise GzipError("unexpected bytes after the gzip stream")
            decoder = isal_zlib.decompressobj(wbits=31)
            try:
                out = decoder.decompress(rest.data, self.limit - last.size + 1)
            except _IsalError as error:
                raise GzipError(f"corrupt deflate data ({error})") from None
            if last.size + len(out) > self.limit or decoder.unconsumed_tail:
                raise LimitExceeded(self.limit)
            if not decoder.eof:
                raise GzipError("the file ends before the deflate stream does (truncated)")
            last.buffer[last.size : last.size + len(out)] = np.frombuffer(out, np.uint8)
            with self._changed:
                last.size += len(out)
            rest = rest[len(rest) - len(decoder.unused_data) :]


def _map(path: Path) -> np.ndarray:
    """The file's bytes, mapped rather than read (the page cache already holds them)."""
    with path.open("rb") as file:
        if os.fstat(file.fileno()).st_size == 0:
            return np.empty(0, dtype=np.uint8)
        return np.frombuffer(mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ), np.uint8)


def _gzip_header_end(data: np.ndarray) -> int:
    """The offset of the deflate stream, after gzip's header (RFC 1952, 2.3)."""
    head = data[:10].tobytes()
    if len(head) < 10:
        raise GzipError("the file ends inside gzip's header (truncated)")
    if head[2] != 8:
        raise GzipError(f"unknown compression method {head[2]} (gzip uses 8, deflate)")
    flags, position = head[3], 10
    if flags & 0xE0:
        raise GzipError(f"reserved gzip header flags are set ({flags:#04x})")
    if flags & 0x04:  # FEXTRA
        extra = data[position : position + 2].tobytes()
        position += 2 + int.from_bytes(extra.ljust(2, b"\0"), "little")
    for flag in (0x08, 0x10):  # FNAME, FCOMMENT: zero-terminated
        if flags & flag:
            zeros = np.flatnonzero(data[position : position + (1 << 16)] == 0)
            if not len(zeros):
                raise GzipError("gzip's header has an unterminated name or comment")
            position += int(zeros[0]) + 1
    if flags & 0x02:  # FHCRC
        position += 2
    if position >= len(data):
        raise GzipError("the file ends inside gzip's header (truncated)")
    return position


# --- finding a block header ---------------------------------------------------------------------


def _find_block(data: np.ndarray, start: int, stop: int) -> int | None:
    """The first byte-aligned dynamic-Huffman block in [start, stop) that inflates, if any."""
    stop = min(stop, len(data) - 32)
    for low in range(start, stop, SEARCH_STEP):
        high = min(low + SEARCH_STEP, stop)
        for offset in _header_candidates(data[low : high + 16]):
            if _inflates(data, low + int(offset)):
                return low + int(offset)
    return None


def _header_candidates(region: np.ndarray) -> np.ndarray:
    """Offsets in `region` (less its last 16 bytes) whose bits read as a dynamic block header.

    The header: BFINAL 0, BTYPE 2, HLIT <= 29, HDIST <= 29, then HCLEN + 4 code lengths of 3
    bits whose code is complete (zlib rejects any other). About 1 in 2,000 offsets of random
    bytes passes; a real header always does.
    """
    first, second = region[:-16], region[1:-15]
    offsets = np.flatnonzero(((first & 7) == 4) & ((first >> 3) <= 29) & ((second & 31) <= 29))
    # Bits 16-79 of each header as one little-endian word: the code lengths start at its bit 1.
    words = region[offsets[:, None] + np.arange(2, 10)].view("<u8").ravel()
    count = (second[offsets] >> 5) + ((words & 1) << 3).astype(np.uint8) + 4
    kraft = np.zeros(len(offsets), dtype=np.int64)
    for j in range(19):
        length = ((words >> np.uint64(1 + 3 * j)) & np.uint64(7)).astype(np.int64)
        kraft += np.where((length > 0) & (j < count), 128 >> length, 0)
    return offsets[kraft == 128]


def _inflates(data: np.ndarray, start: int) -> bool:
    decoder = isal_zlib.decompressobj(wbits=-15, zdict=ZEROS)
    try:
        out = decoder.decompress(data[start : start + 4 * TRIAL_OUT].data, TRIAL_OUT)
    except _IsalError:
        return False
    return len(out) == TRIAL_OUT or decoder.eof
