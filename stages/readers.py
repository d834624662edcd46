"""Readers: stream WARC, WET, JSONL(.gz) and Parquet inputs into documents, one record at a time.

A reader counts every record it meets (``records_in``). A record it cannot turn into a document is quarantined
with the error. In a WARC or WET file a damaged gzip member or malformed record costs only itself: it is quarantined
with its byte span and reading goes on at the next one (``stages.warc``). In a JSONL file a stream that breaks
part-way (a truncated gzip) ends that input with a file-level entry; the records read before the break stay in the run.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from datatrove.data import Document
from fastwarc.warc import ArchiveIterator, WarcRecordType
from pydantic import Field, PositiveInt
from resiliparse.parse.encoding import detect_encoding

from core.config import Strict
from core.storage import open_input
from stages.base import Stage
from stages.warc import CHUNK, FRAME_ERRORS, Damage, frames

InputFormat = Literal["warc", "wet", "jsonl", "parquet"]
_CHARSET = re.compile(rb"charset\s*=\s*[\"']?([A-Za-z0-9_.:-]+)", re.IGNORECASE)
_STREAM_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile, OSError, ValueError)


class ReadConfig(Strict):
    max_document_bytes: PositiveInt = 10_000_000
    max_consecutive_errors: PositiveInt = Field(
        20, description="after this many bad records in a row, the rest of the file is quarantined as one entry"
    )
    text_key: str = "text"
    id_key: str = "id"
    url_key: str = "url"
    date_key: str = "date"
    parquet_batch_rows: PositiveInt = 1024


def detect_format(path: Path) -> InputFormat:
    name = path.name.lower()
    for suffix in (".gz", ".zst"):
        name = name.removesuffix(suffix)
    if name.endswith(".wet"):
        return "wet"
    if name.endswith(".wat"):
        raise ValueError(f"{path.name}: WAT files hold crawl metadata, not documents; give the WARC or WET file")
    if name.endswith((".warc", ".arc")):
        return "warc"
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    raise ValueError(f"{path.name}: cannot tell the input format from the name; set format: warc|wet|jsonl|parquet")


def _open_maybe_gzip(path: Path) -> BinaryIO:
    raw = open_input(path)
    if raw.read(2) == b"\x1f\x8b":
        raw.seek(0)
        return gzip.GzipFile(fileobj=raw)  # type: ignore[return-value]
    raw.seek(0)
    return raw


def _read_capped(stream, limit: int) -> bytes:
    """At most ``limit + 1`` bytes of a payload, read in bounded pieces: one byte more than the cap tells a payload
    that is too big, and what is beyond it is never read into memory."""
    pieces, size = [], 0
    while size <= limit and (piece := stream.read(min(CHUNK, limit + 1 - size))):
        pieces.append(piece)
        size += len(piece)
    return b"".join(pieces)


def _skip_past_newline(stream) -> tuple[int, int]:
    """Read past the rest of an over-long line in bounded chunks: (bytes read, bytes of the line without its \\n)."""
    skipped = 0
    while chunk := stream.readline(1 << 20):
        skipped += len(chunk)
        if chunk.endswith(b"\n"):
            return skipped, skipped - 1
    return skipped, skipped


def _charsets(payload: bytes, content_type: str) -> Iterator[str]:
    declared = _CHARSET.search(content_type.encode()) or _CHARSET.search(payload[:4096])
    if declared:
        yield declared.group(1).decode("ascii", "ignore")
    yield "utf-8"
    yield _LENIENT_UTF8
    yield detect_encoding(payload)  # a guess over the whole payload: only when none of the above decodes it


# UTF-8 with a few stray bytes (a truncated character, one byte of another charset pasted in), decoded as browsers
# do, each bad byte a U+FFFD; only when the payload is evidently UTF-8: many valid multi-byte characters per bad one.
# A page in a single-byte charset has almost none (its accented letters are each a bad byte), so it still goes on to
# detection instead of losing its accents.
_LENIENT_UTF8 = "utf-8, stray bytes replaced"
MIN_VALID_PER_STRAY = 10


def _decode_lenient_utf8(payload: bytes) -> str:
    text = payload.decode("utf-8", errors="replace")
    replaced = text.count("\ufffd")
    stray = replaced - payload.count("\ufffd".encode())  # a page may hold U+FFFD itself
    valid_multi_byte = len(text) - len(text.encode("ascii", "ignore")) - replaced
    if valid_multi_byte < MIN_VALID_PER_STRAY * stray:
        raise UnicodeDecodeError("utf-8", payload, 0, 1, f"{stray} stray bytes: too many for UTF-8 text")
    return text


def decode_html(payload: bytes, content_type: str) -> str:
    """Decode with the declared charset, else UTF-8, else UTF-8 with a few stray bytes replaced, else a detected
    charset; raise when nothing decodes cleanly."""
    tried: list[str] = []
    for encoding in _charsets(payload, content_type):
        if encoding in tried:
            continue
        tried.append(encoding)
        try:
            return _decode_lenient_utf8(payload) if encoding == _LENIENT_UTF8 else payload.decode(encoding)
        except (UnicodeDecodeError, LookupError):
            continue
    bad = payload.decode("utf-8", errors="replace").find("\ufffd")
    raise UnicodeDecodeError("utf-8", payload, max(bad, 0), max(bad, 0) + 1, f"no charset decodes it (tried {tried})")


class InputReader(Stage):
    """Turn one input file into documents; ``source`` is the label written into the ``source`` column."""

    name = "read"

    def __init__(self, path: Path, fmt: InputFormat, source: str, config: ReadConfig, accounting=None):
        super().__init__(accounting)
        self.path, self.format, self.source, self.config = path, fmt, source, config

    def run(self, data=None, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        reader = {"warc": self._read_warc, "wet": self._read_warc, "jsonl": self._read_jsonl, "parquet": self._read_parquet}
        yield from reader[self.format]()

    def _too_big(self, size: int, locator: str) -> bool:
        if size > self.config.max_document_bytes:
            self.quarantine(self.path.name, locator, f"document of {size} bytes exceeds max_document_bytes={self.config.max_document_bytes}")
            return True
        return False

    def _read_warc(self) -> Iterator[Document]:
        """Records frame by frame (``stages.warc``). A document is yielded once the bytes after its record are
        checked (the rest of its gzip member, or the next record's start), so a damaged frame never leaves half a
        record in the run: its records go into one quarantine entry with the frame's byte span."""
        wanted = WarcRecordType.response if self.format == "warc" else WarcRecordType.conversion
        pending: list[Document] = []  # read from the current frame, not yet checked
        frame_start, parsed, unsettled, seen = -1, False, False, 0
        with open_input(self.path) as raw:
            for frame in frames(raw):
                if isinstance(frame, Damage):
                    ours = frame.start == frame_start  # the frame just read, or a span no frame came from
                    self._quarantine_damage(frame, len(pending) + unsettled if ours else 0, ours and parsed)
                    pending, unsettled = [], False
                    continue
                yield from pending
                pending, frame_start, parsed = [], frame.start, False
                try:
                    for record in ArchiveIterator(frame, parse_http=self.format == "warc", auto_decode="all",
                                                  stream_detect=False):
                        yield from pending  # the record before this one was read to its end
                        pending, parsed, seen = [], True, seen + 1
                        locator = f"record {seen} {record.record_id or ''} at byte {frame.start}"
                        if record.record_type == WarcRecordType.unknown:
                            self.accounting.records_in += 1
                            self.quarantine(self.path.name, locator, "malformed WARC record: WARC-Type "
                                            f"{record.headers.get('WARC-Type')!r} is not a WARC record type")
                        elif record.record_type == wanted:
                            self.accounting.records_in += 1
                            unsettled = True
                            doc = self._warc_document(record, locator)
                            unsettled = False
                            if doc is not None:
                                pending.append(doc)
                except OSError as error:  # FastWARC: the bytes are whole but are not a WARC record
                    frame.malformed = f"malformed WARC record: {error}"
                except FRAME_ERRORS:
                    pass  # the frame keeps its error; ``frames`` reports the damaged span next
        yield from pending

    def _quarantine_damage(self, damage: Damage, lost: int, parsed: bool) -> None:
        """One entry for a damaged span: the records it cost, counted in. When no record header in it could be
        read, its start tells whether it held a document (a WARC-Type of another kind costs none; an unknown one
        counts as one document lost, so a damaged file never counts as fewer records than it read)."""
        if not parsed:
            kind = damage.record_type()
            wanted = "response" if self.format == "warc" else "conversion"
            if kind == wanted or (kind is None and damage.head.startswith(b"WARC/")):
                self.accounting.records_in += 1
                lost += 1
        self.quarantine(self.path.name, f"bytes {damage.start}-{damage.end} ({damage.unit})",
                        f"damaged {damage.unit}, skipped; reading went on after it: {damage.error}", records=lost)

    def _warc_document(self, record, locator: str) -> Document | None:
        headers = record.headers
        doc_id = (record.record_id or "").strip("<>") or f"{self.path.name}:{locator}"
        url = headers.get("WARC-Target-URI", "")
        date = headers.get("WARC-Date", "")
        payload = _read_capped(record.reader, self.config.max_document_bytes)
        if self._too_big(max(len(payload), record.content_length), locator):
            return None
        if self.format == "wet":
            try:
                text = payload.decode("utf-8")
            except UnicodeDecodeError as error:
                self.quarantine(self.path.name, locator, f"WET text is not valid UTF-8: {error}")
                return None
            kind = "text"
        else:
            http = record.http_headers if record.is_http else None
            status = http.status_code if http is not None else None
            content_type = http.get("Content-Type", "") if http is not None else ""
            if status != 200:
                self.drop(f"http_status_{status}")
                return None
            if "html" not in content_type.lower():
                self.drop("not_html")
                return None
            try:
                text = decode_html(payload, content_type)
            except UnicodeDecodeError as error:
                self.quarantine(self.path.name, locator, f"undecodable HTML: {error}")
                return None
            kind = "html"
        if not text.strip():
            self.drop("empty")
            return None
        return Document(text=text, id=doc_id, metadata={"url": url, "date": date, "source": self.source, "kind": kind})

    def _read_jsonl(self) -> Iterator[Document]:
        line_number = offset = failures_in_a_row = 0
        limit = self.config.max_document_bytes + 1  # a line is never held further than this
        try:
            with _open_maybe_gzip(self.path) as stream:
                while raw_line := stream.readline(limit):
                    line_number += 1
                    offset += len(raw_line)
                    locator = f"line {line_number}"
                    quarantined_before = len(self.accounting.quarantined)
                    if len(raw_line) == limit and not raw_line.endswith(b"\n"):
                        skipped, rest_of_line = _skip_past_newline(stream)
                        offset += skipped
                        self.accounting.records_in += 1
                        self._too_big(len(raw_line) + rest_of_line, locator)
                    elif raw_line.strip():
                        self.accounting.records_in += 1
                        doc = self._json_document(raw_line, locator)
                        if doc is not None:
                            yield doc
                    else:
                        continue
                    failed = len(self.accounting.quarantined) > quarantined_before
                    failures_in_a_row = failures_in_a_row + 1 if failed else 0
                    if failures_in_a_row == self.config.max_consecutive_errors:
                        self._quarantine_rest(stream, line_number, offset)
                        return
        except _STREAM_ERRORS as error:
            self.quarantine(self.path.name, f"after line {line_number}",
                            f"stream broken, rest of the file skipped: {type(error).__name__}: {error}", records=0)

    def _quarantine_rest(self, stream, line_number: int, offset: int) -> None:
        """The rest of a file that gave nothing but errors, as one entry: its records counted, never held."""
        records = end = 0
        has_text = False  # the line being read has more than whitespace (blank lines are not records)
        while chunk := stream.readline(1 << 20):
            end += len(chunk)
            has_text = has_text or bool(chunk.strip())
            if chunk.endswith(b"\n"):
                records, has_text = records + has_text, False
        records += has_text
        self.accounting.records_in += records
        self.quarantine(self.path.name, f"after line {line_number}: bytes {offset}-{offset + end} (uncompressed)",
                        f"{self.config.max_consecutive_errors} bad records in a row: the rest of the file "
                        f"({records} records; binary or garbled?) is quarantined as one entry", records=records)

    def _json_document(self, raw_line: bytes, locator: str) -> Document | None:
        if self._too_big(len(raw_line.rstrip(b"\r\n")), locator):
            return None
        try:
            row = json.loads(raw_line.decode("utf-8"))
        except UnicodeDecodeError as error:
            self.quarantine(self.path.name, locator, f"not valid UTF-8: {error}")
            return None
        except json.JSONDecodeError as error:
            self.quarantine(self.path.name, locator, f"invalid JSON: {error}")
            return None
        if not isinstance(row, dict) or not isinstance(row.get(self.config.text_key), str):
            self.quarantine(self.path.name, locator, f"no string field {self.config.text_key!r}")
            return None
        return self._row_document(row, locator)

    def _row_document(self, row: dict, locator: str) -> Document | None:
        text = row[self.config.text_key]
        if not text.strip():
            self.drop("empty")
            return None
        metadata = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
        # Dolma-style records keep the crawl's own URL and date under metadata.warc_*
        url = row.get(self.config.url_key) or metadata.get("warc_url") or metadata.get(self.config.url_key) or ""
        date = row.get(self.config.date_key) or metadata.get("warc_date") or metadata.get(self.config.date_key) or ""
        doc_id = row.get(self.config.id_key)
        return Document(
            text=text,
            id=str(doc_id) if doc_id not in (None, "") else f"{self.path.name}:{locator}",
            metadata={"url": str(url), "date": str(date), "source": self.source, "kind": "text"},
        )

    def _read_parquet(self) -> Iterator[Document]:
        with open_input(self.path) as raw:
            yield from self._parquet_rows(raw)

    def _parquet_rows(self, raw: BinaryIO) -> Iterator[Document]:
        try:
            parquet = pq.ParquetFile(raw)
        except (pa.ArrowException, OSError) as error:
            self.quarantine(self.path.name, "file", f"not a readable Parquet file: {error}", records=0)
            return
        schema = parquet.schema_arrow
        text_field = schema.field(self.config.text_key) if self.config.text_key in schema.names else None
        if text_field is None or not (pa.types.is_string(text_field.type) or pa.types.is_large_string(text_field.type)):
            found = ", ".join(f"{f.name}: {f.type}" for f in schema)
            self.quarantine(self.path.name, "schema",
                            f"wrong schema: needs a string column {self.config.text_key!r}; found ({found})",
                            records=parquet.metadata.num_rows)
            self.accounting.records_in += parquet.metadata.num_rows
            return
        optional = [self.config.id_key, self.config.url_key, self.config.date_key]
        columns = [self.config.text_key] + [c for c in optional if c in schema.names]
        row_number = 0
        try:
            for batch in parquet.iter_batches(batch_size=self.config.parquet_batch_rows, columns=columns):
                for row in batch.to_pylist():
                    row_number += 1
                    self.accounting.records_in += 1
                    locator = f"row {row_number}"
                    if row[self.config.text_key] is None:
                        self.drop("empty")
                        continue
                    if self._too_big(len(row[self.config.text_key].encode("utf-8")), locator):
                        continue
                    doc = self._row_document(row, locator)
                    if doc is not None:
                        yield doc
        except (pa.ArrowException, OSError) as error:
            self.quarantine(self.path.name, f"after row {row_number}",
                            f"Parquet data unreadable, rest of the file skipped: {error}", records=0)
