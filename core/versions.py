"""Immutable, content-addressed dataset versions and the ``latest`` pointer of every artefact root.

A version is a directory ``<root>/<version_id>/`` holding Parquet shards under ``data/``, a ``manifest.json``
(``core.manifest``) and a dataset card ``README.md``. Shards are written in place and the manifest last, as object
storage allows (it has no rename): a version exists once its manifest, which lists and checksums every shard, is
there, and readers open nothing else; ``<root>/latest`` then names it. The id hashes everything the content depends
on (inputs, the config as it shapes content, the code, the parent), so the same inputs and config give the same id,
a finished version is reused instead of rebuilt, and an interrupted one resumes from the shards already written.
Roots may be local paths or fsspec URLs (``core.storage``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from core.io import atomic_path, atomic_write_text, canonical_json
from core.storage import AnyPath, glob_files, is_remote, location

MANIFEST_NAME = "manifest.json"
CARD_NAME = "README.md"
LATEST_NAME = "latest"
SHARD_DIR = "data"
WORK_DIR = ".work"
MANIFEST_FORMAT = "ultraclean-dataset/1"
VERSION_ID = re.compile(r"v-[0-9a-f]{16}")


def compute_version_id(*, inputs: list[dict], config: dict, code: str, parent: str | None) -> str:
    payload = canonical_json({"inputs": inputs, "config": config, "code": code, "parent": parent})
    return "v-" + hashlib.sha256(payload.encode()).hexdigest()[:16]


def point_latest(root: str | os.PathLike, name: str) -> None:
    """Make ``<root>/latest`` name the entry ``name`` of ``root`` (written atomically)."""
    atomic_write_text(location(root) / LATEST_NAME, name + "\n")


def resolve_latest(root: str | os.PathLike, pattern: re.Pattern) -> AnyPath | None:
    """The entry ``<root>/latest`` names, or None without a pointer. A name not of our form is refused, so a
    tampered pointer cannot lead outside the root."""
    pointer = location(root) / LATEST_NAME
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    if not pattern.fullmatch(name):
        raise ValueError(f"{pointer} holds {name[:80]!r}, which is not an entry name of this root")
    return location(root) / name


def open_entry(path: str | os.PathLike, marker: str, pattern: re.Pattern, expected_format: str, what: str,
               error: type[Exception] = FileNotFoundError) -> tuple[AnyPath, dict]:
    """An artefact directory and its JSON ``marker`` file (``manifest.json``, ``metadata.json``): ``path`` itself
    when it holds one, else the entry its ``latest`` pointer names. Raises ``error`` naming what is missing."""
    path = location(path)
    if not (path / marker).is_file():
        path = resolve_latest(path, pattern) or path
    marker_path = path / marker
    if not marker_path.is_file():
        raise error(f"{path} is not {what}: no {marker} (and no '{LATEST_NAME}' pointer to one)")
    data = json.loads(marker_path.read_text())
    if data.get("format") != expected_format:
        raise error(f"{marker_path}: unknown format {data.get('format')!r} (expected {expected_format!r})")
    return path, data


@dataclass(frozen=True)
class DatasetVersion:
    path: AnyPath
    manifest: dict

    @classmethod
    def open(cls, path: str | os.PathLike) -> DatasetVersion:
        """Open a version directory, or the version that a dataset root's ``latest`` pointer names."""
        return cls(*open_entry(path, MANIFEST_NAME, VERSION_ID, MANIFEST_FORMAT, "a dataset version"))

    @property
    def version_id(self) -> str:
        return self.manifest["version_id"]

    @property
    def shard_paths(self) -> list[AnyPath]:
        return [inside(self.path, shard["path"]) for shard in self.manifest["shards"]]


def inside(directory: AnyPath, relative: str) -> AnyPath:
    """``directory / relative``, refused when a path read back from a manifest would lead outside the directory."""
    directory = location(directory)
    path = directory / relative
    if is_remote(directory):
        escapes = PurePosixPath(relative).is_absolute() or ".." in PurePosixPath(relative).parts or "://" in relative
    else:
        escapes = Path(relative).is_absolute() or not path.resolve().is_relative_to(directory.resolve())
    if escapes:
        raise ValueError(f"{relative!r} leads outside {directory}: refused")
    return path


def published_manifest(root: str | os.PathLike, version_id: str) -> dict | None:
    """The manifest of ``<root>/<version_id>`` if that version is finished (a re-run then does nothing).

    A run that crashed between publishing the version and moving ``latest`` left the root without a valid pointer;
    finding the finished version repairs it.
    """
    manifest = location(root) / version_id / MANIFEST_NAME
    if not manifest.is_file():
        return None
    try:
        current = resolve_latest(root, VERSION_ID)
    except ValueError:
        current = None
    if current is None or not (current / MANIFEST_NAME).is_file():
        point_latest(root, version_id)
    return json.loads(manifest.read_text())


@contextlib.contextmanager
def version_lock(root: str | os.PathLike, name: str) -> Iterator[None]:
    """Hold ``<root>/.work/<name>.lock`` while the entry ``name`` is written. A second run for the same entry says
    so and waits; when it gets the lock the entry is usually published, and it reuses it.

    Object storage has no lock that a crashed run gives back, so a remote root takes none: two runs of the same
    entry there write the same bytes to the same names (the content is a function of the id), and the later one's
    objects replace the earlier one's with equal ones.
    """
    if is_remote(root):
        yield
        return
    lock_path = Path(root) / WORK_DIR / f"{name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            print(f"{name} is being written by another run ({lock.read().strip() or 'unknown process'}); waiting "
                  f"for it to finish", file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}\n")
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def entry_dir(root: str | os.PathLike, name: str) -> AnyPath:
    """``<root>/<name>``, where an entry's files are written in place (its marker file last)."""
    directory = location(root) / name
    if not is_remote(directory):
        directory.mkdir(parents=True, exist_ok=True)
    return directory


def publish_directory(staging: Path, root: str | os.PathLike, name: str, marker: str) -> AnyPath:
    """Copy a finished local directory into ``<root>/<name>``, its ``marker`` file last (the entry exists from then
    on, on a local disk or a bucket alike), and point ``latest`` at it."""
    final = entry_dir(root, name)
    files = sorted(p for p in staging.rglob("*") if p.is_file() and p != staging / marker) + [staging / marker]
    for file in files:
        with atomic_path(final / file.relative_to(staging).as_posix()) as tmp:
            shutil.copyfile(file, tmp)
    point_latest(root, name)
    return final


def resolve_parquet_files(source: str | os.PathLike) -> list[AnyPath]:
    """Parquet files of a version directory, a dataset root (via ``latest``), a single file or a glob, in order."""
    source_path = location(source)
    if source_path.is_dir():
        return DatasetVersion.open(source_path).shard_paths
    if source_path.is_file():
        return [source_path]
    matches = [location(p) for p in glob_files(str(source)) if p.endswith(".parquet")]
    if not matches:
        raise FileNotFoundError(f"no Parquet data at {source}: not a dataset version, a Parquet file or a glob that matches")
    return matches
