"""WARC and WET reading that resynchronises: one damaged byte costs the record it sits in, and the quarantine entry
gives that record's byte span. The spans expected here are found independently of the reader: gzip members by
walking the file with zlib, uncompressed records with warcio's offsets."""

from __future__ import annotations

import gzip
import io
import re
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from warcio.archiveiterator import ArchiveIterator
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from stages import readers
from stages.readers import InputReader, ReadConfig

REPO = Path(__file__).resolve().parents[1]
EXCERPT = "crawl/CC-MAIN-2020-34-excerpt.warc.gz"


def _read(path: Path, fmt: str = "warc", **read):
    reader = InputReader(path, fmt, path.name, ReadConfig(**read))
    docs = list(reader.run())
    accounting = reader.accounting
    assert accounting.records_in == len(docs) + accounting.dropped_total + accounting.quarantined_records
    return docs, accounting


def _gzip_members(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each gzip member, by inflating member after member."""
    spans, start = [], 0
    while start < len(data):
        inflate = zlib.decompressobj(31)
        inflate.decompress(data[start:])
        end = len(data) - len(inflate.unused_data)
        spans.append((start, end))
        start = end
    return spans


def _span(entry) -> tuple[int, int]:
    found = re.match(r"bytes (\d+)-(\d+)", entry.locator)
    assert found, entry.locator
    return int(found.group(1)), int(found.group(2))


def _flipped(data: bytes, position: int) -> bytes:
    damaged = bytearray(data)
    damaged[position] ^= 0xFF
    return bytes(damaged)


def test_one_flipped_byte_costs_exactly_one_record(shared_data, tmp_path):
    original = (shared_data / EXCERPT).read_bytes()
    position = len(original) // 10
    (tmp_path / "flipped.warc.gz").write_bytes(_flipped(original, position))
    clean_docs, clean = _read(shared_data / EXCERPT)
    docs, accounting = _read(tmp_path / "flipped.warc.gz")

    assert accounting.records_in == clean.records_in == 16
    lost = {doc.id for doc in clean_docs} - {doc.id for doc in docs}
    assert len(lost) == 1 and len(docs) == len(clean_docs) - 1
    assert [doc.text for doc in docs] == [doc.text for doc in clean_docs if doc.id not in lost]
    [entry] = accounting.quarantined
    member = next(span for span in _gzip_members(original) if span[0] <= position < span[1])
    assert _span(entry) == member and entry.records == 1 and "gzip" in entry.error


def test_a_truncated_file_keeps_every_whole_record(shared_data, tmp_path):
    original = (shared_data / EXCERPT).read_bytes()
    cut = len(original) // 2
    (tmp_path / "truncated.warc.gz").write_bytes(original[:cut])
    docs, accounting = _read(tmp_path / "truncated.warc.gz")
    whole = [span for span in _gzip_members(original) if span[1] <= cut]
    responses_whole = sum(1 for record in ArchiveIterator(io.BytesIO(original[: whole[-1][1]]))
                          if record.rec_type == "response")
    [entry] = accounting.quarantined
    assert _span(entry) == (whole[-1][1], cut) and "ends inside" in entry.error
    assert len(docs) == responses_whole and accounting.records_in == responses_whole + entry.records


@pytest.fixture
def uncompressed(shared_data, tmp_path) -> tuple[bytes, list[tuple[int, str]]]:
    data = gzip.decompress((shared_data / EXCERPT).read_bytes())
    records = ArchiveIterator(io.BytesIO(data))
    starts = [(records.get_record_offset(), record.rec_type) for record in records]
    return data, starts


@pytest.mark.parametrize("damage", ["warc_line", "content_length_grows", "content_length_shrinks"])
def test_a_damaged_uncompressed_record_costs_that_record(uncompressed, tmp_path, damage):
    data, starts = uncompressed
    response = [i for i, (_, kind) in enumerate(starts) if kind == "response"][2]
    start, end = starts[response][0], starts[response + 1][0]
    digit = data.index(b"Content-Length: ", start) + len(b"Content-Length: ")
    if damage == "warc_line":
        damaged = _flipped(data, start + 2)
    elif damage == "content_length_grows":  # the declared record swallows the next ones
        damaged = data[:digit] + b"9" + data[digit + 1:]
    else:
        damaged = data[:digit] + b"0" + data[digit + 1:]
    (tmp_path / "damaged.warc").write_bytes(damaged)
    (tmp_path / "clean.warc").write_bytes(data)
    clean_docs, _ = _read(tmp_path / "clean.warc")
    docs, accounting = _read(tmp_path / "damaged.warc")
    assert accounting.records_in == 16 and len(docs) == 15
    [entry] = accounting.quarantined
    assert _span(entry) == (start, end) and entry.records == 1
    assert {doc.id for doc in clean_docs} - {doc.id for doc in docs} == {clean_docs[2].id}


def _wet_with_conversions(source: Path, copies: int) -> tuple[bytes, list[tuple[int, int]]]:
    """The real WET sample's conversion record, ``copies`` times with distinct record ids, one gzip member each."""
    data, members = source.read_bytes(), []
    while data:
        inflate = zlib.decompressobj(31)
        members.append(inflate.decompress(data))
        data = inflate.unused_data
    info, conversion = members
    out = [gzip.compress(info, mtime=0)]
    for copy in range(copies):
        out.append(gzip.compress(conversion.replace(b"0a5b2ee0c42d>", b"0a5b2ee0c%03d>" % copy), mtime=0))
    return b"".join(out), _gzip_members(b"".join(out))


def test_wet_reading_resynchronises(shared_data, tmp_path):
    data, spans = _wet_with_conversions(shared_data / "crawl/CC-MAIN-2024-22-sample.warc.wet.gz", 10)
    fifth = spans[5]
    (tmp_path / "damaged.warc.wet.gz").write_bytes(_flipped(data, (fifth[0] + fifth[1]) // 2))
    docs, accounting = _read(tmp_path / "damaged.warc.wet.gz", "wet")
    assert accounting.records_in == 10 and len(docs) == 9 and len({doc.id for doc in docs}) == 9
    [entry] = accounting.quarantined
    assert _span(entry) == fifth and entry.records == 1
    assert all("Escopete" in doc.text for doc in docs)


def test_garbage_between_members_costs_no_record(shared_data, tmp_path):
    original = (shared_data / EXCERPT).read_bytes()
    spans = _gzip_members(original)
    cut, garbage = spans[10][0], b"\x00junk\x1f\x8b\x08 not a member"  # with a false gzip magic inside
    (tmp_path / "garbage.warc.gz").write_bytes(original[:cut] + garbage + original[cut:])
    docs, accounting = _read(tmp_path / "garbage.warc.gz")
    assert len(docs) == 16 and accounting.records_in == 16
    [entry] = accounting.quarantined
    assert _span(entry) == (cut, cut + len(garbage)) and entry.records == 0


def _write_big_warc(path: Path, page_bytes: int) -> None:
    """A response holding an HTML page of ``page_bytes``, then a small one, each its own gzip member."""
    with open(path, "wb") as out:
        writer = WARCWriter(out, gzip=True)
        paragraph = b"<p>" + b"All work and no play makes a long page. " * 24 + b"</p>\n"
        body = b"<html><body>" + paragraph * (page_bytes // len(paragraph)) + b"</body></html>"
        for url, payload in (("https://example.com/big", body), ("https://example.com/small", paragraph * 20)):
            http = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
            writer.write_record(writer.create_warc_record(url, "response", payload=io.BytesIO(payload),
                                                          http_headers=http))


# Peak RSS growth while reading, in a fresh process: the high-water mark (VmHWM) is reset after the imports
# (ru_maxrss would keep the forked parent's peak across exec).
PEAK_RSS = """
import re, sys
from pathlib import Path
from stages import readers
from stages.readers import InputReader, ReadConfig
def status(key):
    return int(re.search(key + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) // 1024
reader = InputReader(Path(sys.argv[1]), "warc", "big", ReadConfig(max_document_bytes=int(sys.argv[2])))
Path("/proc/self/clear_refs").write_text("5")
before = status("VmRSS")
docs = [len(doc.text) for doc in reader.run()]
print(status("VmHWM") - before, len(docs), reader.accounting.records_in, len(reader.accounting.quarantined))
"""


def _rss_growth_mb(path: Path, cap: int) -> tuple[int, int, int, int]:
    run = subprocess.run([sys.executable, "-c", PEAK_RSS, str(path), str(cap)], cwd=REPO, capture_output=True,
                         text=True, check=True)
    return tuple(int(n) for n in run.stdout.split())


def test_a_50_mb_page_does_not_raise_memory_beyond_the_cap(tmp_path):
    path = tmp_path / "big.warc.gz"
    _write_big_warc(path, 50 << 20)
    growth, kept, records, quarantined = _rss_growth_mb(path, 1 << 20)
    assert (kept, records, quarantined) == (1, 2, 1)  # the big page is quarantined as too big, the next one read
    assert growth < 24, f"reading a 50 MB page under a 1 MB cap grew the process by {growth} MB"
    # the same measure does see a page that is read whole: it is not a number that stays small regardless
    uncapped_growth, kept, _, _ = _rss_growth_mb(path, 100 << 20)
    assert kept == 2 and uncapped_growth > 50


def test_html_charset_declared_then_utf8_then_detected(monkeypatch):
    """The declared charset wins, UTF-8 comes next, and detection (a pass over the whole payload) runs only when
    both fail; a payload no charset decodes raises, naming what was tried."""
    page = "<html><body><p>Grüße aus Köln – à bientôt, señor.</p></body></html>"
    cp1252 = page.encode("cp1252")
    calls = []
    detect = readers.detect_encoding
    monkeypatch.setattr(readers, "detect_encoding", lambda payload: calls.append(payload) or detect(payload))
    assert readers.decode_html(page.encode("utf-8"), "text/html") == page
    assert readers.decode_html(cp1252, "text/html; charset=windows-1252") == page
    assert calls == []
    assert readers.decode_html(cp1252, "text/html") == page  # not UTF-8: detected
    assert calls == [cp1252]
    monkeypatch.setattr(readers, "detect_encoding", lambda payload: "ascii")
    with pytest.raises(UnicodeDecodeError, match=r"tried \['utf-8', 'utf-8, stray bytes replaced', 'ascii'\]"):
        readers.decode_html(cp1252, "")


def test_utf8_page_with_stray_bytes_keeps_its_text():
    """A UTF-8 page with a stray byte is decoded as a browser decodes it, the byte a U+FFFD and every other character
    intact (three of the annotated real pages are such pages); a page in a single-byte charset, whose accented letters
    are all invalid UTF-8, is still decoded by its detected charset, even when it claims to be UTF-8."""
    page = "<html><body><p>" + "Grüße aus Köln – à bientôt, señor. " * 3 + "</p></body></html>"
    stray = page.encode("utf-8").replace(b"<p>", b"<p>\xff", 1)
    for content_type in ("text/html; charset=utf-8", "text/html"):
        assert readers.decode_html(stray, content_type) == page.replace("<p>", "<p>\ufffd", 1)
    cp1252 = page.encode("cp1252")
    assert readers.decode_html(cp1252, "text/html; charset=utf-8") == page
    mixed = page.encode("utf-8") + "ü ö ä é".encode("cp1252")  # 4 stray bytes against 21 valid characters
    with pytest.raises(UnicodeDecodeError, match="too many"):
        readers._decode_lenient_utf8(mixed)
