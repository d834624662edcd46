"""Immutable, content-addressed dataset versions.

A version is a directory ``<root>/<version_id>/`` holding Parquet shards under ``data/``, a ``manifest.json``
(shards with rows, bytes and sha256; accounting of every input record; the config; the parent version) and a
dataset card ``README.md``. ``<root>/latest`` names the newest version. A version is assembled in a staging
directory and renamed into place, so a reader never sees half a version.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

MANIFEST_NAME = "manifest.json"
CARD_NAME = "README.md"
LATEST_NAME = "latest"
SHARD_DIR = "data"
MANIFEST_FORMAT = "ultraclean-dataset/1"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write via a temp file in the same directory and os.replace, so readers see all or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_figure(figure, path: str | Path) -> None:
    """A matplotlib figure as PNG, atomically, without the version/date stamp (identical bytes on re-run); closes it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex}.png")
    figure.tight_layout()
    figure.savefig(tmp, dpi=100, metadata={"Software": None})
    plt.close(figure)
    os.replace(tmp, path)


def canonical_json(obj: Any) -> str:
    """The one JSON spelling used for hashing and for manifests: sorted keys, fixed separators."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, indent=2, default=str) + "\n"


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def code_version(packages: tuple[str, ...] = ("pipelines", "stages")) -> str:
    """Package version plus a hash of the source that shapes dataset content, so a code change makes a new id."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg_version = version("ultraclean-factory")
    except PackageNotFoundError:
        pkg_version = "0+unknown"
    digest = hashlib.sha256()
    repo = Path(__file__).resolve().parents[1]
    for package in packages:
        for source in sorted((repo / package).rglob("*.py")):
            digest.update(source.relative_to(repo).as_posix().encode())
            digest.update(source.read_bytes())
    return f"{pkg_version}+{digest.hexdigest()[:12]}"


def compute_version_id(*, inputs: list[dict], config: dict, code: str, parent: str | None) -> str:
    payload = canonical_json({"inputs": inputs, "config": config, "code": code, "parent": parent})
    return "v-" + hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class DatasetVersion:
    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: str | Path) -> DatasetVersion:
        """Open a version directory, or the version that a dataset root's ``latest`` pointer names."""
        path = Path(path)
        if (path / LATEST_NAME).is_file() and not (path / MANIFEST_NAME).is_file():
            path = path / (path / LATEST_NAME).read_text().strip()
        manifest_path = path / MANIFEST_NAME
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{path} is not a dataset version: no {MANIFEST_NAME} (and no '{LATEST_NAME}' pointer)")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"{manifest_path}: unknown manifest format {manifest.get('format')!r}")
        return cls(path=path, manifest=manifest)

    @property
    def version_id(self) -> str:
        return self.manifest["version_id"]

    @property
    def shard_paths(self) -> list[Path]:
        return [self.path / shard["path"] for shard in self.manifest["shards"]]


def resolve_parquet_files(source: str | Path) -> list[Path]:
    """Parquet files of a version directory, a dataset root (via ``latest``), a single file or a glob, in order."""
    source_path = Path(source)
    if source_path.is_dir():
        return DatasetVersion.open(source_path).shard_paths
    if source_path.is_file():
        return [source_path]
    matches = sorted(Path(p) for p in glob.glob(str(source), recursive=True) if p.endswith(".parquet"))
    if not matches:
        raise FileNotFoundError(f"no Parquet data at {source}: not a dataset version, a Parquet file or a glob that matches")
    return matches


def verify_version(path: str | Path) -> list[str]:
    """Re-check every shard's size and sha256 against the manifest; returns the problems found (empty: intact)."""
    version = DatasetVersion.open(path)
    problems = []
    for shard in version.manifest["shards"]:
        shard_path = version.path / shard["path"]
        if not shard_path.is_file():
            problems.append(f"{shard['path']}: missing")
            continue
        if shard_path.stat().st_size != shard["bytes"]:
            problems.append(f"{shard['path']}: {shard_path.stat().st_size} bytes, manifest says {shard['bytes']}")
        elif sha256_file(shard_path) != shard["sha256"]:
            problems.append(f"{shard['path']}: sha256 differs from the manifest")
    return problems


def publish_version(staging: Path, root: Path, version_id: str) -> Path:
    """Move a fully written staging directory into place and point ``latest`` at it."""
    final = root / version_id
    if final.exists():
        raise FileExistsError(f"version {version_id} already exists at {final}; versions are immutable")
    os.replace(staging, final)
    atomic_write_text(root / LATEST_NAME, version_id + "\n")
    return final


def describe_shard(path: Path, tokenizer: str | None = None, text_column: str = "content") -> dict:
    """A shard's manifest entry: its path inside the version, rows, bytes, sha256, characters, tokens (if counted)."""
    column = pq.read_table(path, columns=[text_column])[text_column]
    tokens = None
    if tokenizer:
        from tokenizers import Tokenizer

        encoder = Tokenizer.from_file(tokenizer)
        texts = [c or "" for c in column.to_pylist()]
        tokens = sum(len(e.ids) for e in encoder.encode_batch(texts, add_special_tokens=False))
    return {
        "path": f"{SHARD_DIR}/{Path(path).name}",
        "rows": len(column),
        "bytes": Path(path).stat().st_size,
        "sha256": sha256_file(path),
        "characters": pc.sum(pc.utf8_length(column)).as_py() or 0,  # code points, as len(str); nulls count 0
        "tokens": tokens,
    }


def shard_totals(shards: list[dict]) -> dict:
    tokens = [s["tokens"] for s in shards]
    return {
        "rows": sum(s["rows"] for s in shards),
        "bytes": sum(s["bytes"] for s in shards),
        "characters": sum(s["characters"] for s in shards),
        "tokens": sum(tokens) if tokens and all(t is not None for t in tokens) else None,
    }


def dataset_card(manifest: dict) -> str:
    totals, accounting = manifest["totals"], manifest["accounting"]
    stage_lines = "\n".join(
        f"| {s['stage']} | {s['in']} | {s['out']} | {sum(s['dropped'].values())} | {s['quarantined']} | "
        f"{', '.join(f'{k}: {v}' for k, v in s['dropped'].items()) or '-'} |"
        for s in manifest["stages"]
    )
    return f"""# {manifest['name']} — dataset version `{manifest['version_id']}`

Web text filtered by UltraClean (Ultra-FineWeb style): one document per row.
Produced by `ultraclean-factory {manifest['code_version']}`; parent version: {manifest['parent'] or 'none'}.

| | |
|---|---|
| documents | {totals['rows']} |
| shards | {len(manifest['shards'])} |
| characters | {totals['characters']} |
| tokens | {totals['tokens'] if totals['tokens'] is not None else 'not counted'} |
| input records | {accounting['records_in']} (kept {accounting['kept']}, dropped {accounting['dropped']}, quarantined {accounting['quarantined']}) |

## Columns
{chr(10).join(f'- `{name}`: {dtype}' for name, dtype in manifest['schema'].items())}

## Where every input record went
| stage | in | out | dropped | quarantined | reasons |
|---|---|---|---|---|---|
{stage_lines}

Quarantined inputs and their errors: `quarantine.jsonl`. Checksums: `manifest.json` (`python -m pipelines.ultraclean verify <this directory>`).

## Loading
```python
import datasets, polars, pyarrow.dataset
files = [f"<this directory>/{{s['path']}}" for s in manifest["shards"]]
datasets.load_dataset("parquet", data_files=files, split="train")
polars.read_parquet(files)
pyarrow.dataset.dataset(files).to_table()
```
"""
