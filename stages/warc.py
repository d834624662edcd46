"""WARC framing that resynchronises: a damaged gzip member or a malformed record costs that frame, not the file.

A frame is the unit that can be damaged on its own: one gzip member in a compressed file (Common Crawl writes one
record per member, as the WARC standard recommends), one record in an uncompressed file. ``frames`` yields a
``Frame`` per unit, whose ``read`` streams its decompressed bytes in bounded pieces, so no record is ever held
whole. When the caller comes back for the next frame, the previous one is verified to its end (the gzip CRC and
length, or the ``\\r\\n\\r\\n`` after an uncompressed record's ``Content-Length``); a frame that fails is reported
as a ``Damage`` with its byte span in the file, and reading goes on at the next gzip member (found by its magic
bytes and a header that inflates to ``WARC/``) or at the next ``WARC/1.`` line.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

# zlib's API, and it inflates about twice as fast as the zlib CPython links (measured in benchmarks/ingest.py)
from zlib_ng import zlib_ng as zlib

CHUNK = 1 << 16
GZIP_MAGIC = b"\x1f\x8b\x08"
WARC_LINE = re.compile(rb"WARC/1\.[01]\r?\n")
_CONTENT_LENGTH = re.compile(rb"^content-length:[ \t]*(\d+)[ \t]*\r?$", re.IGNORECASE | re.MULTILINE)
_WARC_TYPE = re.compile(rb"^WARC-Type:[ \t]*([A-Za-z]+)", re.IGNORECASE | re.MULTILINE)
MAX_HEADER_BYTES = 1 << 16
INFLATE_INPUT = 1 << 14
HEAD_BYTES = 4096  # what a frame keeps of its start, to name the record type of a frame whose header did not parse
# what reading a damaged frame raises: zlib on bad deflate data or CRC, EOFError on a file that ends inside a frame
FRAME_ERRORS = (zlib.error, EOFError, ValueError)


class _Cursor:
    """The raw file read ahead in chunks; ``offset`` is the file offset of ``buffer[0]``. A bytearray, because
    deleting from its front does not copy the rest."""

    def __init__(self, raw: BinaryIO):
        self.raw, self.buffer, self.offset = raw, bytearray(), 0

    def fill(self) -> bool:
        chunk = self.raw.read(CHUNK)
        self.buffer += chunk
        return bool(chunk)

    def take(self, count: int) -> bytes:
        taken = bytes(self.buffer[:count])
        self.skip(count)
        return taken

    def skip(self, count: int) -> None:
        del self.buffer[:count]
        self.offset += count

    def seek(self, offset: int) -> None:
        self.raw.seek(offset)
        self.buffer, self.offset = bytearray(), offset

    def at_end(self) -> bool:
        return not self.buffer and not self.fill()


@dataclass
class Damage:
    """A span of the file that could not be read: ``head`` is what inflated of its start (may be empty)."""

    start: int
    end: int
    error: str
    head: bytes
    unit: str = "record"  # what the span is: a "gzip member" or an uncompressed "record"

    def record_type(self) -> str | None:
        found = _WARC_TYPE.search(self.head)
        return found.group(1).decode().lower() if found else None


class Frame:
    """One gzip member or one uncompressed record, read as a stream. A read error marks the frame damaged."""

    def __init__(self, cursor: _Cursor):
        self.cursor, self.start = cursor, cursor.offset
        self.output = b""
        self.head = b""
        self.finished = False
        self.error: str | None = None  # the bytes are damaged: reading resynchronises past them
        self.malformed: str | None = None  # the bytes are whole but do not parse as records: set by the caller

    def read(self, size: int = CHUNK) -> bytes:
        size = CHUNK if size is None or size < 0 else min(size, CHUNK)  # never much of the frame at once
        try:
            while not self.finished and len(self.output) < size:
                self._advance()
        except FRAME_ERRORS as error:
            self.error = self.error or (f"corrupt gzip data ({error})" if isinstance(error, zlib.error) else str(error))
            raise
        data, self.output = self.output[:size], self.output[size:]
        return data

    def drain(self) -> None:
        """Read (and check) the frame to its end without holding it."""
        while self.read(CHUNK):
            pass

    def _produce(self, data: bytes) -> None:
        if len(self.head) < HEAD_BYTES:
            self.head += data[: HEAD_BYTES - len(self.head)]
        self.output += data

    def _advance(self) -> None:
        raise NotImplementedError

    # FastWARC reads a Python stream through these
    def tell(self) -> int:
        return 0

    def seek(self, offset: int, whence: int = 0) -> int:
        raise OSError("a WARC frame is read forward only")

    def close(self) -> None:
        pass


class _GzipMember(Frame):
    def __init__(self, cursor: _Cursor):
        super().__init__(cursor)
        self.inflate = zlib.decompressobj(31)

    def _advance(self) -> None:
        if not self.cursor.buffer and not self.cursor.fill():
            raise EOFError("the file ends inside this gzip member (truncated)")
        data = self.cursor.buffer[:INFLATE_INPUT]  # bounded: what zlib leaves over is copied per call
        self._produce(self.inflate.decompress(data, CHUNK))
        self.finished = self.inflate.eof
        # at the member's end the input left over is in unused_data (zlib may leave a stale unconsumed_tail too)
        left = self.inflate.unused_data if self.finished else self.inflate.unconsumed_tail
        self.cursor.skip(len(data) - len(left))


class _PlainRecord(Frame):
    """An uncompressed record: its header block, ``Content-Length`` bytes, then the ``\\r\\n\\r\\n`` that ends it."""

    def __init__(self, cursor: _Cursor, header_bytes: int, length: int):
        super().__init__(cursor)
        self._produce(cursor.take(header_bytes))
        self.remaining = length

    def _advance(self) -> None:
        if self.remaining:
            if not self.cursor.buffer and not self.cursor.fill():
                raise EOFError(f"the file ends {self.remaining} bytes before this record does (truncated)")
            data = self.cursor.take(min(self.remaining, len(self.cursor.buffer)))
            self.remaining -= len(data)
            self._produce(data)
            return
        while len(self.cursor.buffer) < 4 and self.cursor.fill():
            pass
        self.finished = True
        if self.cursor.buffer[:4] != b"\r\n\r\n":
            raise ValueError("the record does not end where its Content-Length says")
        self.cursor.skip(4)


def frames(raw: BinaryIO) -> Iterator[Frame | Damage]:
    """Frames of a WARC or WET file, gzip-compressed per member or uncompressed. ``raw`` must be seekable: after a
    damaged frame, reading resumes just past the frame's first byte, where the search for the next one starts."""
    cursor = _Cursor(raw)
    cursor.fill()
    compressed = cursor.buffer.startswith(GZIP_MAGIC[:2])
    unit = "gzip member" if compressed else "record"
    while not cursor.at_end():
        start = cursor.offset
        frame: Frame | Damage = _GzipMember(cursor) if compressed else _plain_record(cursor)
        if isinstance(frame, Frame):
            yield frame
            if frame.error is None:
                try:
                    frame.drain()  # to its end, which checks the gzip CRC and length, or the record's trailer
                except FRAME_ERRORS:
                    pass  # kept in frame.error
            if frame.error is None:
                if frame.malformed is not None:
                    yield Damage(start, cursor.offset, frame.malformed, frame.head, unit)
                continue
            frame = Damage(start, 0, frame.error, _inflated_head(cursor, start) if compressed else frame.head)
        frame.unit = unit
        frame.end = _next_gzip_member(cursor, start + 1) if compressed else _next_warc_line(cursor, start + 1)
        yield frame


def _plain_record(cursor: _Cursor) -> Frame | Damage:
    """The header block of an uncompressed record, checked enough to know where the record ends."""
    while b"\r\n\r\n" not in cursor.buffer[:MAX_HEADER_BYTES] and len(cursor.buffer) < MAX_HEADER_BYTES:
        if not cursor.fill():
            break
    end = cursor.buffer.find(b"\r\n\r\n", 0, MAX_HEADER_BYTES)
    head = bytes(cursor.buffer[:HEAD_BYTES])
    if not WARC_LINE.match(cursor.buffer):
        return Damage(cursor.offset, 0, "malformed WARC record: no WARC/1.x line where a record should start", head)
    if end < 0:
        return Damage(cursor.offset, 0, f"malformed WARC record: no end of header within {MAX_HEADER_BYTES} bytes",
                      head)
    length = _CONTENT_LENGTH.search(cursor.buffer, 0, end + 2)
    if length is None:
        return Damage(cursor.offset, 0, "malformed WARC record: no Content-Length header", head)
    return _PlainRecord(cursor, end + 4, int(length.group(1)))


def _inflated_head(cursor: _Cursor, start: int) -> bytes:
    """What inflates of a damaged member's start, fed to zlib in small steps: a call that fails returns nothing, so
    the header before the damage is only seen this way."""
    cursor.seek(start)
    cursor.fill()
    inflate, head, data = zlib.decompressobj(31), b"", bytes(cursor.buffer)
    for step in range(0, len(data), 256):
        try:
            head += inflate.decompress(data[step:step + 256])
        except zlib.error:
            break
        if len(head) >= HEAD_BYTES or inflate.eof:
            break
    return head[:HEAD_BYTES]


def _next_gzip_member(cursor: _Cursor, offset: int) -> int:
    """The offset of the first gzip member at or after ``offset`` whose start inflates to a WARC header (the
    cursor is left there), or the file's end."""
    cursor.seek(offset)
    while True:
        found = cursor.buffer.find(GZIP_MAGIC)
        if found < 0:
            cursor.skip(max(len(cursor.buffer) - len(GZIP_MAGIC) + 1, 0))
            if not cursor.fill():
                cursor.skip(len(cursor.buffer))
                return cursor.offset
            continue
        cursor.skip(found)
        while len(cursor.buffer) < CHUNK and cursor.fill():
            pass
        try:
            if zlib.decompressobj(31).decompress(cursor.buffer, 8).startswith(b"WARC/"):
                return cursor.offset
        except zlib.error:
            pass
        cursor.skip(1)


def _next_warc_line(cursor: _Cursor, offset: int) -> int:
    """The offset of the first ``WARC/1.x`` line starting at or after ``offset`` (the cursor is left there), or the
    file's end."""
    cursor.seek(offset - 1)  # the byte before: a record starts at a line start
    while True:
        while len(cursor.buffer) < CHUNK and cursor.fill():
            pass
        found = re.search(rb"\n(?=WARC/1\.[01]\r?\n)", cursor.buffer)
        if found:
            cursor.skip(found.end())
            return cursor.offset
        if len(cursor.buffer) <= 16:
            cursor.skip(len(cursor.buffer))
            return cursor.offset
        cursor.skip(len(cursor.buffer) - 16)
