"""Atomic writes, file hashes and the one JSON spelling used for hashing and manifests.

Every file this project writes goes through ``atomic_path``: the content lands in a uniquely named temporary file
beside the target and is renamed over it only when complete, so a reader (or a concurrent writer of the same
file) sees the old file or the new one, never half of one. On object storage (``core.storage``) the temporary file
is local and is uploaded when complete: an object is created whole or not at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from core.storage import is_remote, location, open_input, upload


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on error removed.

    The temporary name keeps the target's suffix (writers such as matplotlib choose the format by it) and a random
    part, so concurrent writers never share one. ``directory=True`` stages a whole directory; its target must not
    exist yet (a directory cannot be replaced atomically).
    """
    if is_remote(path):
        with tempfile.TemporaryDirectory(prefix="upload-") as scratch:
            tmp = Path(scratch) / f"staged{location(path).suffix}"
            if directory:
                tmp.mkdir()
            yield tmp
            upload(tmp, location(path))
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex}{path.suffix}")
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        if not directory:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def canonical_json(obj: Any) -> str:
    """The one JSON spelling used for hashing and for manifests: sorted keys, fixed separators."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, indent=2, default=str) + "\n"


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open_input(path) as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
