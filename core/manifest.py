"""The one manifest builder and dataset card of every dataset version (ingest, score, select, UltraChat).

The manifest lists each shard (rows, bytes, sha256, characters, tokens), the inputs, the config as it shapes the
content, and the stage table: per stage, records in and out, dropped with their reasons, quarantined. The builder
counts the kept rows from the shards themselves and refuses a manifest whose accounting does not add up
(``records_in == kept + dropped + quarantined``), so a version can never hide a lost record.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core.accounting import Accounting
from core.io import atomic_path, atomic_write_text, canonical_json, sha256_file
from core.storage import AnyPath, location, read_parquet, remove_tree
from core.versions import (
    CARD_NAME,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    SHARD_DIR,
    VERSION_ID,
    compute_version_id,
    entry_dir,
    inside,
    point_latest,
    resolve_latest,
)

QUARANTINE_NAME = "quarantine.jsonl"


class AccountingMismatch(RuntimeError):
    """The shards written and the accounting of the input records disagree: a record was lost or counted twice."""


def count_tokens(texts: list[str], tokenizer_path: str | None) -> int | None:
    """Tokens over texts with a ``tokenizer.json`` (no special tokens), None without a tokenizer."""
    if not tokenizer_path:
        return None
    from tokenizers import Tokenizer

    encoder = Tokenizer.from_file(str(tokenizer_path))
    return sum(len(e.ids) for e in encoder.encode_batch(texts, add_special_tokens=False)) if texts else 0


def describe_shard(path: str | os.PathLike, version_dir: str | os.PathLike, tokenizer: str | None = None,
                   text_column: str = "content") -> dict:
    """A shard's manifest entry: its path inside the version, rows, bytes, sha256, characters, tokens (if counted)."""
    column = read_parquet(path, columns=[text_column])[text_column]
    return {
        "path": location(path).relative_to(location(version_dir)).as_posix(),
        "rows": len(column),
        "bytes": location(path).stat().st_size,
        "sha256": sha256_file(path),
        "characters": pc.sum(pc.utf8_length(column)).as_py() or 0,  # code points, as len(str); nulls count 0
        "tokens": count_tokens([c or "" for c in column.to_pylist()], tokenizer),
    }


def shard_totals(shards: list[dict]) -> dict:
    tokens = [s["tokens"] for s in shards]
    return {
        "rows": sum(s["rows"] for s in shards),
        "bytes": sum(s["bytes"] for s in shards),
        "characters": sum(s["characters"] for s in shards),
        "tokens": sum(tokens) if tokens and all(t is not None for t in tokens) else None,
    }


def stage_table(accounting: Accounting, order: list[str]) -> list[dict]:
    """Per stage, in pipeline order: records in, out, dropped (with reasons) and quarantined."""
    unknown = sorted((set(accounting.dropped) | {e.stage for e in accounting.quarantined}) - set(order))
    if unknown:
        raise AccountingMismatch(f"records were dropped or quarantined by stages {unknown} outside {order}")
    rows, remaining = [], accounting.records_in
    for stage in order:
        dropped = dict(sorted(accounting.dropped.get(stage, {}).items()))
        quarantined = sum(e.records for e in accounting.quarantined if e.stage == stage)
        out = remaining - sum(dropped.values()) - quarantined
        rows.append({"stage": stage, "in": remaining, "out": out, "dropped": dropped, "quarantined": quarantined})
        remaining = out
    return rows


def build_manifest(
    *, version_id: str, name: str, kind: str, parent: str | None, code_version: str, inputs: list[dict],
    config: dict, schema: pa.Schema, shards: list[dict], accounting: Accounting, stage_order: list[str],
    extra: dict | None = None,
) -> dict:
    """A version's manifest; raises ``AccountingMismatch`` unless every input record is kept, dropped or quarantined."""
    stages = stage_table(accounting, stage_order)
    kept = sum(s["rows"] for s in shards)
    dropped = sum(sum(s["dropped"].values()) for s in stages)
    quarantined = accounting.quarantined_records
    if accounting.records_in != kept + dropped + quarantined:
        raise AccountingMismatch(f"accounting does not add up: {accounting.records_in} in != {kept} kept + "
                                 f"{dropped} dropped + {quarantined} quarantined")
    return {
        "format": MANIFEST_FORMAT,
        "kind": kind,
        "version_id": version_id,
        "name": name,
        "parent": parent,
        "code_version": code_version,
        "inputs": inputs,
        "config": config,
        "schema": {f.name: str(f.type) for f in schema},
        "shards": shards,
        "totals": shard_totals(shards),
        "accounting": {"records_in": accounting.records_in, "kept": kept, "dropped": dropped,
                       "quarantined": quarantined, "quarantine_entries": len(accounting.quarantined)},
        "stages": stages,
        **(extra or {}),
    }


PARQUET_LOADING = """```python
import datasets, polars, pyarrow.dataset
files = [f"<this directory>/{s['path']}" for s in manifest["shards"]]
datasets.load_dataset("parquet", data_files=files, split="train")
polars.read_parquet(files)
pyarrow.dataset.dataset(files).to_table()
```"""


def split_loading(splits: list[str]) -> str:
    """The loading recipe of a version whose shards are split by language under ``data/<split>/``."""
    files = ", ".join(f'"{split}": f"{{version}}/{SHARD_DIR}/{split}/*.parquet"' for split in splits)
    return f"""One split per language ({", ".join(splits)}), as Ultra-FineWeb's `en` and `zh`:
```python
import datasets
version = "<this directory>"
datasets.load_dataset("parquet", data_files={{{files}}})
```"""


def dataset_card(manifest: dict, *, description: str, rows_label: str = "documents",
                 inputs_label: str = "input records", loading: str = PARQUET_LOADING,
                 sections: tuple[str, ...] = ()) -> str:
    """The ``README.md`` of a version: what it is, its size, its columns, where every input record went, how to load
    it; ``sections`` are markdown blocks of the dataset kind's own (inserted before the loading recipe)."""
    totals, accounting = manifest["totals"], manifest["accounting"]
    stage_lines = "\n".join(
        f"| {s['stage']} | {s['in']} | {s['out']} | {sum(s['dropped'].values())} | {s['quarantined']} | "
        f"{', '.join(f'{k}: {v}' for k, v in s['dropped'].items()) or '-'} |"
        for s in manifest["stages"]
    )
    columns = "\n".join(f"- `{name}`: {dtype}" for name, dtype in manifest["schema"].items())
    extra = "".join(f"{section.strip()}\n\n" for section in sections)
    return f"""# {manifest['name']} — dataset version `{manifest['version_id']}`

{description.strip()}
Produced by `ultraclean-factory {manifest['code_version']}`; parent version: {manifest['parent'] or 'none'}.

| | |
|---|---|
| {rows_label} | {totals['rows']} |
| shards | {len(manifest['shards'])} |
| characters | {totals['characters']} |
| tokens | {totals['tokens'] if totals['tokens'] is not None else 'not counted'} |
| {inputs_label} | {accounting['records_in']} (kept {accounting['kept']}, dropped {accounting['dropped']}, quarantined {accounting['quarantined']}) |

## Columns
{columns}

## Where every input record went
| stage | in | out | dropped | quarantined | reasons |
|---|---|---|---|---|---|
{stage_lines}

Quarantined inputs and their errors: `quarantine.jsonl` (when any). Checksums: `manifest.json`
(`python -m pipelines.ultraclean verify <this directory>`).

{extra}## Loading
{loading}
"""


def finish_version(directory: AnyPath, manifest: dict, card: str, files: dict[str, str] | None = None) -> AnyPath:
    """Complete a version whose shards are written: its other ``files`` and card, then the manifest, last (from
    then on the version exists), then ``latest``. Object storage has no rename, so this order is the publication."""
    for name, text in {**(files or {}), CARD_NAME: card}.items():
        atomic_write_text(directory / name, text)
    atomic_write_text(directory / MANIFEST_NAME, canonical_json(manifest))
    point_latest(location(directory).parent, location(directory).name)
    return directory


def publish_table(table: pa.Table, root: str | os.PathLike, *, name: str, rows_per_shard: int = 100_000,
                  text_column: str = "content") -> AnyPath:
    """Publish an in-memory table (documents from elsewhere) as a dataset version of its own, ids from its bytes."""
    slices = [table.slice(start, rows_per_shard) for start in range(0, max(len(table), 1), rows_per_shard)]
    buffers = []
    for piece in slices:
        sink = pa.BufferOutputStream()
        pq.write_table(piece, sink, compression="zstd", store_schema=False)
        buffers.append(sink.getvalue())
    inputs = [{"shard_sha256": [hashlib.sha256(buffer).hexdigest() for buffer in buffers]}]
    version_id = compute_version_id(inputs=inputs, config={"name": name}, code="publish_table", parent=None)
    directory = entry_dir(root, version_id)
    try:
        paths = []
        for number, buffer in enumerate(buffers):
            paths.append(directory / SHARD_DIR / f"shard-{number:05d}.parquet")
            with atomic_path(paths[-1]) as tmp:
                tmp.write_bytes(buffer.to_pybytes())
        shards = [describe_shard(p, directory, text_column=text_column) for p in paths]
        manifest = build_manifest(
            version_id=version_id, name=name, kind="imported-table", parent=None, code_version="publish_table",
            inputs=inputs, config={"name": name}, schema=table.schema, shards=shards,
            accounting=Accounting(records_in=len(table)), stage_order=["import"],
        )
    except BaseException:
        remove_tree(directory)
        raise
    return finish_version(directory, manifest, dataset_card(manifest, description=f"`{name}`, imported as a table."))


def verify_version(path: str | os.PathLike) -> list[str]:
    """Everything a version's manifest claims, re-checked; the problems found (empty: intact).

    The id is recomputed from the manifest's inputs, config, code version and parent; the accounting must add up
    stage by stage and match the shards; the totals must be the shards' sums; exactly the listed files may be there,
    each with its size and sha256; no listed path may lead outside the version.
    """
    path = location(path)
    if not (path / MANIFEST_NAME).is_file():
        path = resolve_latest(path, VERSION_ID) or path
    try:
        manifest = json.loads((path / MANIFEST_NAME).read_text())
    except FileNotFoundError:
        return [f"{MANIFEST_NAME}: missing in {path}"]
    except (ValueError, UnicodeDecodeError) as error:
        return [f"{MANIFEST_NAME}: not valid JSON ({error})"]
    missing = sorted({"format", "version_id", "inputs", "config", "code_version", "parent", "shards", "totals",
                      "accounting", "stages"} - set(manifest)) if isinstance(manifest, dict) else ["(everything)"]
    if missing:
        return [f"{MANIFEST_NAME}: missing {', '.join(missing)}"]
    problems = _identity_problems(path, manifest) + _accounting_problems(manifest) + _file_problems(path, manifest)
    return problems


def _identity_problems(path: AnyPath, manifest: dict) -> list[str]:
    problems = []
    if manifest["format"] != MANIFEST_FORMAT:
        problems.append(f"format {manifest['format']!r} is not {MANIFEST_FORMAT!r}")
    recomputed = compute_version_id(inputs=manifest["inputs"], config=manifest["config"],
                                    code=manifest["code_version"], parent=manifest["parent"])
    if recomputed != manifest["version_id"]:
        problems.append(f"version_id {manifest['version_id']} does not match its inputs, config and code "
                        f"(they give {recomputed}): the manifest was edited")
    if path.name != manifest["version_id"]:
        problems.append(f"directory {path.name} holds version {manifest['version_id']}")
    return problems


def _accounting_problems(manifest: dict) -> list[str]:
    problems = []
    shards, stages, accounting = manifest["shards"], manifest["stages"], manifest["accounting"]
    try:
        totals = shard_totals(shards)
    except (KeyError, TypeError) as error:
        return [f"shards: malformed entry ({error})"]
    if totals != manifest["totals"]:
        problems.append(f"totals {manifest['totals']} are not the shards' sums {totals}")
    kept, records_in = accounting.get("kept"), accounting.get("records_in")
    dropped = sum(sum(stage["dropped"].values()) for stage in stages)
    quarantined = sum(stage["quarantined"] for stage in stages)
    if kept != totals["rows"]:
        problems.append(f"accounting says {kept} kept, the shards hold {totals['rows']} rows")
    if (accounting.get("dropped"), accounting.get("quarantined")) != (dropped, quarantined):
        problems.append(f"accounting ({accounting.get('dropped')} dropped, {accounting.get('quarantined')} "
                        f"quarantined) differs from the stage table ({dropped}, {quarantined})")
    if records_in != totals["rows"] + dropped + quarantined:
        problems.append(f"accounting does not add up: {records_in} in != {totals['rows']} kept + {dropped} dropped "
                        f"+ {quarantined} quarantined")
    remaining = records_in
    for stage in stages:
        if stage["in"] != remaining or stage["out"] != stage["in"] - sum(stage["dropped"].values()) - stage["quarantined"]:
            problems.append(f"stage {stage['stage']}: {stage['in']} in, {stage['out']} out does not follow")
        remaining = stage["out"]
    if stages and remaining != totals["rows"]:
        problems.append(f"the last stage lets {remaining} through, the shards hold {totals['rows']}")
    return problems


def _file_problems(path: AnyPath, manifest: dict) -> list[str]:
    problems, listed = [], {MANIFEST_NAME, CARD_NAME, QUARANTINE_NAME}
    entries = [e for shard in manifest["shards"] for e in [shard] + ([shard["jsonl"]] if "jsonl" in shard else [])]
    entries += manifest.get("reports", [])  # figures written with the version (path, bytes, sha256 like shards)
    for entry in entries:
        try:
            file = inside(path, entry["path"])
        except ValueError as error:
            problems.append(str(error))
            continue
        listed.add(Path(entry["path"]).as_posix())
        if not file.is_file():
            problems.append(f"{entry['path']}: missing")
        elif file.stat().st_size != entry["bytes"]:
            problems.append(f"{entry['path']}: {file.stat().st_size} bytes, manifest says {entry['bytes']}")
        elif sha256_file(file) != entry["sha256"]:
            problems.append(f"{entry['path']}: sha256 differs from the manifest")
    present = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    problems += [f"{name}: not listed in the manifest" for name in sorted(present - listed)]
    return problems
