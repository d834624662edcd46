"""Where files live: local paths and fsspec URLs (``s3://``, ``gs://``, ``file://``) behind one path type.

``location`` turns what a config or a caller gives into a ``pathlib.Path`` (local paths and ``file://`` URLs) or a
``UPath`` (any other fsspec URL); both spell ``/``, ``open``, ``is_file``, ``glob``, ``read_text`` the same way, so
the jobs handle both with one code path. Credentials and endpoints come from the environment the filesystem library
reads (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``GOOGLE_APPLICATION_CREDENTIALS``, ...), never from a config.

Object stores have no rename and no directories: a file is uploaded whole once written (an object appears
complete or not at all), and a dataset version is complete when its manifest, written last, is there.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from upath import UPath

# s3fs caches directory listings per process; a listing must see what other processes (Ray tasks) wrote since
_PROTOCOL_OPTIONS = {"s3": {"use_listings_cache": False}, "s3a": {"use_listings_cache": False}}

AnyPath = Path | UPath


def is_remote(path: str | os.PathLike) -> bool:
    """True for an fsspec URL other than ``file://``."""
    if isinstance(path, UPath):
        return path.protocol not in ("", "file", "local")
    text = str(path)
    return "://" in text and not text.startswith("file://")


def location(path: str | os.PathLike) -> AnyPath:
    """The path type for ``path``: ``UPath`` for remote URLs, ``Path`` for the rest (``file://`` stripped)."""
    if isinstance(path, UPath) and is_remote(path):
        return path
    text = str(path)
    if text.startswith("file://"):
        return Path(text.removeprefix("file://"))
    if "://" in text:
        protocol = text.split("://", 1)[0]
        return UPath(text, **_PROTOCOL_OPTIONS.get(protocol, {}))
    return Path(text)


def resolve_root(path: str | os.PathLike, base: Path | None = None) -> AnyPath:
    """An absolute location: a remote URL as it is, a local path made absolute (against ``base`` when relative)."""
    where = location(path)
    if is_remote(where):
        return where
    return ((base / where) if base is not None and not where.is_absolute() else where).resolve()


def open_input(path: str | os.PathLike) -> io.BufferedReader:
    """A buffered binary read stream (``peek`` included) of a local file or a remote object, read in blocks."""
    where = location(path)
    if not is_remote(where):
        return open(where, "rb")
    return io.BufferedReader(where.open("rb"), buffer_size=1 << 20)


def glob_files(pattern: str) -> list[str]:
    """Files matching a glob (``**`` recursive), sorted, as the strings ``location`` takes back."""
    where = location(pattern)
    if not is_remote(where):
        return sorted(glob.glob(str(where), recursive=True))
    protocol = where.protocol
    return sorted(f"{protocol}://{match}" for match in where.fs.glob(where.path) if where.fs.isfile(match))


def remove_tree(path: str | os.PathLike) -> None:
    """Remove a directory (or prefix) and everything under it; nothing there is fine."""
    where = location(path)
    if not is_remote(where):
        shutil.rmtree(where, ignore_errors=True)
        return
    try:
        where.fs.rm(where.path, recursive=True)
    except FileNotFoundError:
        pass


def upload(local: Path, target: AnyPath) -> None:
    """Copy a finished local file or directory to ``target`` (a remote object is created whole or not at all)."""
    if local.is_dir():
        for file in sorted(p for p in local.rglob("*") if p.is_file()):
            target.fs.put_file(str(file), (target / file.relative_to(local).as_posix()).path)
    else:
        target.fs.put_file(str(local), target.path)


def local_copy(path: str | os.PathLike) -> Path:
    """A local file with ``path``'s content, for libraries that only open local files (fastText): ``path`` itself
    when local, else a download cached under the temp directory by URL and size (artefacts are immutable)."""
    where = location(path)
    if not is_remote(where):
        return where
    size = where.stat().st_size
    key = hashlib.sha256(f"{where}|{size}".encode()).hexdigest()[:16]
    cached = Path(tempfile.gettempdir()) / "ultraclean-cache" / key / where.name
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_name(f".{cached.name}.{uuid.uuid4().hex}")
        where.fs.get_file(where.path, str(partial))
        os.replace(partial, cached)
    return cached


def mirror_dir(root: str | os.PathLike) -> Path:
    """Where ``mirrored`` keeps the local copy of a remote root: the same path on every node (named by the URL)."""
    return Path(tempfile.gettempdir()) / "ultraclean-mirror" / hashlib.sha256(str(root).encode()).hexdigest()[:16]


def _files(directory: Path) -> dict[str, tuple[int, int]]:
    """Finished files under a directory (an atomic write's hidden temporary is not one), with size and mtime."""
    return {p.relative_to(directory).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in directory.rglob("*") if p.is_file() and not any(q.startswith(".") for q in p.parts)}


@contextlib.contextmanager
def mirrored(root: str | os.PathLike, only: list[str] | None = None) -> Iterator[Path]:
    """A local working directory for code that writes in place (torch checkpoints, memory-mapped token caches).

    A local ``root`` is yielded as it is. For a remote one, ``mirror_dir(root)`` first receives what the store holds
    under the sub-paths ``only`` (everything when None) that it lacks, so finished work is found again; when the
    block ends, failure or not, every file it added or changed is uploaded, so that work survives the process (and
    a re-run on any node resumes from the store).
    """
    where = location(root)
    if not is_remote(where):
        yield Path(where)
        return
    local = mirror_dir(where)
    local.mkdir(parents=True, exist_ok=True)
    prefixes = only if only is not None else [""]
    stored = set()
    for prefix in prefixes:
        base = where / prefix if prefix else where
        for remote in (base.rglob("*") if base.is_dir() else []):
            if not remote.is_file():
                continue
            name = remote.relative_to(where).as_posix()
            stored.add(name)
            target = local / name
            if not (target.is_file() and target.stat().st_size == remote.stat().st_size):
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
                where.fs.get_file(remote.path, str(partial))
                os.replace(partial, target)
    # what the store has already; anything else under the prefixes (new, changed, or left locally by an earlier
    # run whose upload never happened) goes up when the block ends
    synced = {name: stamp for name, stamp in _files(local).items() if name in stored}
    try:
        yield local
    finally:
        for name, stamp in sorted(_files(local).items()):
            inside_prefixes = any(not p or name == p or name.startswith(p.rstrip("/") + "/") for p in prefixes)
            if inside_prefixes and synced.get(name) != stamp:
                where.fs.put_file(str(local / name), (where / name).path)


def read_parquet(path: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    with open_input(path) as stream:
        return pq.read_table(stream, columns=columns)


def parquet_schema(path: str | os.PathLike) -> pa.Schema:
    with open_input(path) as stream:
        return pq.read_schema(stream)


def parquet_rows(path: str | os.PathLike) -> int:
    with open_input(path) as stream:
        return pq.read_metadata(stream).num_rows


def arrow_dataset_source(paths: list) -> dict:
    """``paths`` and ``filesystem`` for Arrow-based readers (Ray Data's ``read_parquet``): local paths as they are,
    remote ones as paths of their fsspec filesystem wrapped for Arrow, so that the environment's endpoint and
    credentials apply as everywhere else."""
    locations = [location(p) for p in paths]
    remote = [p for p in locations if is_remote(p)]
    if not remote:
        return {"paths": [str(p) for p in locations]}
    if len(remote) != len(locations) or len({p.protocol for p in remote}) > 1:
        raise ValueError(f"one dataset cannot mix local files and files of several stores: {paths[:3]}...")
    return {"paths": [p.path for p in remote], "filesystem": pafs.PyFileSystem(pafs.FSSpecHandler(remote[0].fs))}
