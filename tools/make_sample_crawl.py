"""Deterministic generator of the embedded UltraClean sample crawl (a developer tool: it does not ship).

Builds, from the original prose in ``tools/sample_crawl/prose.yaml`` and the page table in
``tools/sample_crawl/pages.yaml``:

* ``sample.warc.gz``  -- a tiny WARC (one warcinfo record, then a request and a response record per page)
  exercising ingest -> extract -> language id -> heuristic filters -> dedup, with the awkward real-world cases:
  a GB2312 page, a Latin-1 page with no charset, a 404, an image, spam, boilerplate, exact and near duplicates;
* ``sample.jsonl.gz`` -- a dozen ``{"id", "text", "url", "date"}`` documents.

The output is byte-identical on every run: WARC-Date values and WARC-Record-IDs are fixed, warcio's gzip members
carry mtime 0, and the JSONL is written through ``gzip.GzipFile(mtime=0)``; tests/test_sample_crawl.py checks the
shipped files against it.

    python tools/make_sample_crawl.py [--out-dir DIR]       (default: pipelines/sample_data/)
"""

from __future__ import annotations

import argparse
import gzip
import html
import io
import json
import struct
import zlib
from pathlib import Path

import yaml
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "pipelines" / "sample_data"
WARC_NAME = "sample.warc.gz"
JSONL_NAME = "sample.jsonl.gz"
CRAWL_DAY = "2024-03-04"


def load(name: str) -> dict:
    return yaml.safe_load((HERE / "sample_crawl" / name).read_text(encoding="utf-8"))


def text_of(prose: dict, key: str) -> dict:
    """An article of prose.yaml: an entry of ``articles`` or a top-level text (title, paragraphs, maybe author)."""
    return prose["articles"].get(key) or prose[key]


def edited(paragraphs: list[str], edits: list[dict]) -> list[str]:
    """Paragraphs with a near duplicate's edits: replace words, append to a paragraph, add a paragraph."""
    paragraphs = list(paragraphs)
    for edit in edits:
        if "add_paragraph" in edit:
            paragraphs.append(edit["add_paragraph"])
        elif "append" in edit:
            paragraphs[edit["paragraph"]] += edit["append"]
        else:
            paragraphs[edit["paragraph"]] = paragraphs[edit["paragraph"]].replace(*edit["replace"])
    return paragraphs


# --- HTML builders ----------------------------------------------------------------------------------------


def _esc(text: str) -> str:
    return html.escape(text, quote=False)


def article_html(
    *,
    site: str,
    title: str,
    author: str,
    paragraphs: list[str],
    nav: list[str],
    footer: str,
    lang: str = "en",
    charset: str | None = "utf-8",
    date_text: str = "4 March 2024",
    related: list[str] | None = None,
) -> str:
    meta = f'  <meta charset="{charset}">\n' if charset else ""
    nav_items = "\n".join(
        f'      <li><a href="/{n.lower().replace(" ", "-")}/">{_esc(n)}</a></li>' for n in nav
    )
    body = "\n".join(f"      <p>{_esc(p)}</p>" for p in paragraphs)
    aside = ""
    if related:
        links = "\n".join(
            f'        <li><a href="/articles/{r.lower().replace(" ", "-")}/">{_esc(r)}</a></li>'
            for r in related
        )
        aside = f'    <aside class="related">\n      <h2>Related reading</h2>\n      <ul>\n{links}\n      </ul>\n    </aside>\n'
    byline = f'      <p class="byline">By {_esc(author)} | {date_text}</p>\n' if author else ""
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="{lang}">\n'
        "<head>\n"
        f"{meta}"
        f"  <title>{_esc(title)} - {_esc(site)}</title>\n"
        '  <meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '  <link rel="stylesheet" href="/static/site.css">\n'
        '  <script src="/static/menu.js" defer></script>\n'
        "</head>\n"
        "<body>\n"
        f'  <header class="site-header">\n    <a class="logo" href="/">{_esc(site)}</a>\n'
        f'    <nav class="main-nav">\n      <ul>\n{nav_items}\n      </ul>\n    </nav>\n  </header>\n'
        "  <main>\n    <article>\n"
        f"      <h1>{_esc(title)}</h1>\n"
        f"{byline}"
        f"{body}\n"
        "    </article>\n"
        f"{aside}"
        "  </main>\n"
        f'  <footer class="site-footer">\n    <p>{footer}</p>\n'
        '    <p><a href="/about/">About</a> | <a href="/contact/">Contact</a> | <a href="/privacy/">Privacy</a></p>\n'
        "  </footer>\n"
        "</body>\n"
        "</html>\n"
    )


def spam_html(prose: dict) -> str:
    links = "\n".join(
        f'    <li><a href="http://cheap-deals.example.net/{i}">{_esc(k)}</a></li>'
        for i, k in enumerate(prose["spam_links"] * 2)
    )
    lines = "\n".join(f"    <p>{_esc(s)}</p>" for s in prose["spam_lines"])
    return (
        '<!DOCTYPE html>\n<html>\n<head>\n  <meta charset="utf-8">\n'
        "  <title>CHEAP WATCHES BUY CHEAP BEST PRICE CLICK HERE</title>\n"
        '  <meta name="keywords" content="cheap watches, buy cheap, best price, replica, discount, click here">\n'
        "</head>\n<body>\n"
        "  <h1>CHEAP WATCHES BEST PRICE</h1>\n"
        f'  <div class="content">\n{lines}\n  </div>\n'
        f'  <ul class="links">\n{links}\n  </ul>\n'
        "  <p>cheap watches | buy cheap | best price | click here</p>\n"
        "</body>\n</html>\n"
    )


def boilerplate_html() -> str:
    nav = ["Home", "News", "Sport", "Weather", "Shop", "Events", "Jobs", "Sign in", "Register", "Help"]
    nav_items = "\n".join(f'      <li><a href="/{n.lower().replace(" ", "-")}/">{n}</a></li>' for n in nav)
    foot_cols = []
    for heading, items in [
        ("Company", ["About us", "Careers", "Press", "Advertise"]),
        ("Support", ["Help centre", "Contact", "Accessibility", "Status"]),
        ("Legal", ["Terms of use", "Privacy policy", "Cookie settings", "Imprint"]),
        ("Follow", ["Newsletter", "RSS", "Podcasts", "Apps"]),
    ]:
        lis = "\n".join(f'        <li><a href="/{i.lower().replace(" ", "-")}/">{i}</a></li>' for i in items)
        foot_cols.append(
            f'    <div class="col">\n      <h4>{heading}</h4>\n      <ul>\n{lis}\n      </ul>\n    </div>'
        )
    cols = "\n".join(foot_cols)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n  <meta charset="utf-8">\n'
        "  <title>Home - Riverside Portal</title>\n</head>\n<body>\n"
        '  <div class="cookie-banner"><p>This site uses cookies. <a href="/cookies/">Accept</a> '
        '<a href="/cookies/settings/">Settings</a></p></div>\n'
        f"  <header>\n    <nav>\n      <ul>\n{nav_items}\n      </ul>\n    </nav>\n"
        '    <form action="/search"><input type="text" name="q" placeholder="Search"><button>Go</button></form>\n'
        "  </header>\n"
        '  <main>\n    <div class="hero"><h2>Welcome</h2><p>Sign in to continue.</p></div>\n'
        '    <div class="tiles"><a href="/news/">Latest</a> <a href="/sport/">Scores</a> '
        '<a href="/weather/">Forecast</a> <a href="/shop/">Deals</a></div>\n  </main>\n'
        f"  <footer>\n{cols}\n    <p>&copy; 2024 Riverside Portal. All rights reserved.</p>\n  </footer>\n"
        "</body>\n</html>\n"
    )


def not_found_html() -> str:
    return (
        '<!DOCTYPE html>\n<html>\n<head><meta charset="utf-8"><title>404 Not Found</title></head>\n'
        "<body>\n  <h1>Not Found</h1>\n  <p>The requested URL was not found on this server.</p>\n"
        "  <hr>\n  <address>example-httpd Server at www.hearthandloaf.example Port 443</address>\n</body>\n</html>\n"
    )


def tiny_png() -> bytes:
    """A valid 1x1 grey PNG, built byte by byte (deterministic)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00\x80", 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def page_body(page: dict, prose: dict) -> bytes:
    builder = page["builder"]
    if builder == "spam":
        return spam_html(prose).encode("utf-8")
    if builder == "boilerplate":
        return boilerplate_html().encode("utf-8")
    if builder == "not_found":
        return not_found_html().encode("utf-8")
    if builder == "png":
        return tiny_png()
    text = text_of(prose, page["article"])
    doc = article_html(
        site=page["site"],
        title=text["title"],
        author=page.get("author", text.get("author", "")),
        paragraphs=edited(text["paragraphs"], page.get("edits", [])),
        nav=page["nav"],
        footer=page.get("footer", f"&copy; 2024 {_esc(page['site'])}. All rights reserved."),
        lang=page["lang"],
        charset=page["charset"],
        date_text=page["date_text"],
        related=page["related"],
    )
    return doc.encode(page["encoding"])


def build_pages(table: dict, prose: dict) -> list[dict]:
    pages = []
    for entry in table["pages"]:
        page = {**table["defaults"], **entry}
        pages.append({"key": page["key"], "url": page["url"], "status": page["status"],
                      "content_type": page["content_type"], "body": page_body(page, prose), "kind": page["kind"]})
    return pages


# --- writers ------------------------------------------------------------------------------------------------


def _rid(n: int) -> str:
    return f"<urn:uuid:00000000-0000-0000-0000-{n:012d}>"


def _date(n: int) -> str:
    return f"{CRAWL_DAY}T10:{n // 60:02d}:{n % 60:02d}Z"


def write_warc(path: Path, pages: list[dict]) -> None:
    buf = io.BytesIO()
    writer = WARCWriter(buf, gzip=True, warc_version="1.0")

    info = (
        b"software: ultraclean-sample-generator/1.0 (warcio)\r\n"
        b"format: WARC File Format 1.0\r\n"
        b"description: Small synthetic sample crawl for the UltraClean pipeline. "
        b"All page text is original and written for this project.\r\n"
        b"license: Apache-2.0\r\n"
        b"isPartOf: ultraclean-sample\r\n"
        b"robots: classic\r\n"
    )
    n = 1
    rec = writer.create_warc_record(
        "",
        "warcinfo",
        payload=io.BytesIO(info),
        length=len(info),
        warc_content_type="application/warc-fields",
        warc_headers_dict={"WARC-Record-ID": _rid(n), "WARC-Date": _date(0), "WARC-Filename": WARC_NAME},
    )
    writer.write_record(rec)
    warcinfo_id = _rid(n)

    for i, p in enumerate(pages, start=1):
        url = p["url"]
        host = url.split("/")[2]
        path_q = "/" + url.split("/", 3)[3] if url.count("/") >= 3 else "/"
        date = _date(i)
        req_id, resp_id = _rid(n + 1), _rid(n + 2)
        n += 2

        req_headers = StatusAndHeaders(
            f"GET {path_q} HTTP/1.1",
            [
                ("Host", host),
                ("User-Agent", "UltraCleanSampleBot/1.0 (+https://example.org/ultraclean-bot)"),
                ("Accept", "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
                ("Accept-Language", "en-US,en;q=0.5"),
                ("Accept-Encoding", "identity"),
                ("Connection", "close"),
            ],
            is_http_request=True,
        )
        req = writer.create_warc_record(
            url,
            "request",
            http_headers=req_headers,
            warc_headers_dict={
                "WARC-Record-ID": req_id,
                "WARC-Date": date,
                "WARC-Warcinfo-ID": warcinfo_id,
                "WARC-Concurrent-To": resp_id,
            },
        )

        body: bytes = p["body"]
        resp_headers = StatusAndHeaders(
            p["status"],
            [
                ("Date", "Mon, 04 Mar 2024 10:00:00 GMT"),
                ("Server", "example-httpd/2.4"),
                ("Content-Type", p["content_type"]),
                ("Content-Length", str(len(body))),
                ("Connection", "close"),
            ],
            protocol="HTTP/1.1",
        )
        resp = writer.create_warc_record(
            url,
            "response",
            payload=io.BytesIO(body),
            length=len(body),
            http_headers=resp_headers,
            warc_headers_dict={
                "WARC-Record-ID": resp_id,
                "WARC-Date": date,
                "WARC-Warcinfo-ID": warcinfo_id,
                "WARC-IP-Address": f"192.0.2.{i}",
            },
        )
        writer.write_record(req)
        writer.write_record(resp)

    path.write_bytes(buf.getvalue())


def jsonl_docs(table: dict, prose: dict) -> list[dict]:
    docs = []
    for entry in table["jsonl"]:
        if "new_good" in entry:
            source = prose["jsonl_new_good"][entry["new_good"]]
            text, url = source["text"], source["url"]
        elif entry.get("spam"):
            text, url = prose["jsonl_spam"], entry["url"]
        elif "article" in entry:
            text = "\n".join(edited(text_of(prose, entry["article"])["paragraphs"], entry.get("edits", [])))
            url = entry["url"]
        else:
            text, url = entry["text"], entry["url"]
        docs.append((entry["id"], text, url))
    return [
        {"id": i, "text": t, "url": u, "date": f"{CRAWL_DAY}T1{k % 10}:00:00Z"}
        for k, (i, t, u) in enumerate(docs)
    ]


def write_jsonl(path: Path, docs: list[dict]) -> None:
    raw = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
        for d in docs:
            gz.write((json.dumps(d, ensure_ascii=False, sort_keys=False) + "\n").encode("utf-8"))
    path.write_bytes(raw.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", type=Path, default=OUT)
    args = ap.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    prose, table = load("prose.yaml"), load("pages.yaml")
    write_warc(args.out_dir / WARC_NAME, build_pages(table, prose))
    write_jsonl(args.out_dir / JSONL_NAME, jsonl_docs(table, prose))
    for name in (WARC_NAME, JSONL_NAME):
        p = args.out_dir / name
        print(f"wrote {p} ({p.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
