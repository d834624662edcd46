"""UltraClean ingest: crawl files -> extract -> language id -> heuristic filters -> dedup -> versioned shards.

Three Ray phases. (1) One task per input file streams it through the per-document stages and writes an
intermediate Parquet part plus its accounting; a finished part is skipped on re-run. (2) Exact and MinHash
duplicates are found across all parts (``pipelines.dedup``: a map-reduce over hash partitions). (3) One task per
output shard writes the kept documents, in run order, into the version's directory; the manifest is written last.
Inputs and the output root may be local or fsspec URLs (``core.storage``); every task reads and writes them itself,
so on a cluster no file passes through the driver.
"""

from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from core.accounting import Accounting
from core.code_version import code_version
from core.config import ConfigError
from core.io import atomic_path, atomic_write_text, sha256_file
from core.manifest import QUARANTINE_NAME, build_manifest, dataset_card, describe_shard, finish_version
from core.runtime import ensure_ray, gather, peak_rss_mb, require_reachable, reset_peak_rss
from core.storage import (
    AnyPath,
    glob_files,
    is_remote,
    location,
    read_parquet,
    remove_tree,
    resolve_root,
)
from core.versions import SHARD_DIR, WORK_DIR, compute_version_id, entry_dir, published_manifest, version_lock
from pipelines.config import UltraCleanConfig
from pipelines.dedup import ORDER_BITS, deduplicate, removed_count, removed_orders
from stages.base import Stage
from stages.dedup import MinHasher, dedup_keys
from stages.extract import HtmlExtractor
from stages.heuristics import HeuristicFilter
from stages.langid import LanguageIdentifier
from stages.readers import InputReader, detect_format

SHARD_SCHEMA = pa.schema(
    [
        ("content", pa.string()),
        ("id", pa.string()),
        ("url", pa.string()),
        ("date", pa.string()),
        ("language", pa.string()),
        ("language_score", pa.float64()),
        ("source", pa.string()),
    ]
)
PART_SCHEMA = SHARD_SCHEMA.append(pa.field("order", pa.int64())).append(pa.field("content_hash", pa.uint64())).append(
    pa.field("minhash_bands", pa.list_(pa.uint64()))
)
# The code that shapes an ingested version's rows: the stages and this job (ordering, dedup, sharding).
INGEST_CODE = ("stages", "pipelines.ingest")
CARD_DESCRIPTION = "Web text filtered by UltraClean (Ultra-FineWeb style): one document per row."


@dataclass(frozen=True)
class ResolvedInput:
    index: int
    path: str
    format: str | None
    source: str
    problem: str | None = None  # why the input cannot be read at all: it is quarantined whole, never opened

    @property
    def name(self) -> str:
        return Path(self.path).name


@dataclass
class IngestResult:
    version_path: AnyPath
    manifest: dict
    reused: bool
    seconds: float
    stage_seconds: dict[str, float]


def unreadable_reason(path: Path) -> str | None:
    """Why ``path`` cannot be read as an input (None: a regular file we may open). Checked before anything opens it:
    a FIFO would block a reader forever, a directory or a symlink loop would end the run with a traceback."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:  # dangling symlink, symlink loop, vanished, no permission to look
        return f"cannot be resolved: {error.strerror or error}"
    if not stat.S_ISREG(mode):
        kind = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket",
                stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}.get(stat.S_IFMT(mode), "special")
        return f"not a regular file ({kind})"
    if not os.access(path, os.R_OK):
        return "not readable (permission denied)"
    return None


def resolve_inputs(config: UltraCleanConfig, base_dir: Path) -> list[ResolvedInput]:
    """Every file the input globs match, in config then name order; one that cannot be read carries the reason."""
    resolved: list[ResolvedInput] = []
    for position, spec in enumerate(config.inputs):
        pattern = str(resolve_root(spec.path, base_dir))
        try:
            matches = glob_files(pattern)
        except OSError as error:  # no such bucket, no credentials, endpoint unreachable
            raise ConfigError(f"inputs[{position}].path: cannot list {spec.path!r}: {error}") from None
        if not matches:
            raise ConfigError(f"inputs[{position}].path: no file matches {spec.path!r} (looked at {pattern})")
        for match in matches:
            path = location(match if is_remote(match) else os.path.abspath(match))
            problem, fmt = (None if is_remote(path) else unreadable_reason(path)), spec.format
            if problem is None and fmt is None:
                try:
                    fmt = detect_format(path)
                except ValueError as error:
                    problem = str(error)
            resolved.append(ResolvedInput(len(resolved), str(path), fmt, spec.source or path.name, problem))
    return resolved


@ray.remote
def fingerprint_input(path: str) -> dict:
    """What an input contributes to the version id: its name, size and sha256 (streamed, local or remote), so the
    same bytes give the same id wherever they are stored."""
    return {"name": location(path).name, "bytes": location(path).stat().st_size, "sha256": sha256_file(path)}


def document_stages(config: UltraCleanConfig, accounting: Accounting) -> list[Stage]:
    """The per-document stages after the reader, in order."""
    stages: list[Stage] = [HtmlExtractor(config.extract, accounting), LanguageIdentifier(config.langid, accounting)]
    return stages + [HeuristicFilter(f, accounting) for f in config.filters if f.enabled]


def check_stages(config: UltraCleanConfig) -> None:
    """Build every stage once on the driver, before any work: a missing model or an unusable setting fails the run
    here, with the key, instead of in every task."""
    try:
        document_stages(config, Accounting())
    except FileNotFoundError as error:
        raise ConfigError(f"langid.model_path: {error}") from None
    except (TypeError, ValueError) as error:
        raise ConfigError(f"filters: a filter cannot be built with its params: {error}") from None
    if config.dedup.minhash.enabled:
        MinHasher(config.dedup.minhash)


def _document_stream(config: UltraCleanConfig, item: ResolvedInput, accounting: Accounting):
    reader = InputReader(location(item.path), item.format, item.source, config.read, accounting)
    docs = reader.run()
    for stage in document_stages(config, accounting):
        docs = stage.run(docs)
    return docs


def _part_rows(docs, item: ResolvedInput, config: UltraCleanConfig):
    hasher = MinHasher(config.dedup.minhash) if config.dedup.minhash.enabled else None
    for number, doc in enumerate(docs):
        language = doc.metadata["language"]
        exact, bands = dedup_keys(doc.text, language, hasher)
        yield {
            "content": doc.text,
            "id": doc.id,
            "url": doc.metadata["url"],
            "date": doc.metadata["date"],
            "language": language,
            "language_score": doc.metadata["language_score"],
            "source": doc.metadata["source"],
            "order": (item.index << ORDER_BITS) | number,
            "content_hash": exact,
            "minhash_bands": bands,
        }


@ray.remote
def process_input(item: ResolvedInput, config_data: dict, part_path: str) -> dict:
    """Phase 1 for one input file. Returns its accounting; resumes from a finished part."""
    part, stats_path = location(part_path), location(part_path + ".json")
    if part.is_file() and stats_path.is_file():
        return json.loads(stats_path.read_text())
    config = UltraCleanConfig.model_validate(config_data)
    accounting = Accounting()
    started = time.perf_counter()
    reset_peak_rss()
    kept = 0
    # Bad input is quarantined by the stages themselves; any exception that reaches here is a failure of ours (a
    # bug, no memory, no disk): it fails the task, and the run, without a part or a resume record for this input.
    with atomic_path(part) as tmp, pq.ParquetWriter(tmp, PART_SCHEMA, **config.output.parquet_options()) as writer:
        batch: list[dict] = []
        for row in _part_rows(_document_stream(config, item, accounting), item, config):
            batch.append(row)
            if len(batch) >= 1000:
                writer.write_table(pa.Table.from_pylist(batch, schema=PART_SCHEMA))
                kept, batch = kept + len(batch), []
        writer.write_table(pa.Table.from_pylist(batch, schema=PART_SCHEMA))
        kept += len(batch)
    accounting.seconds["total"] = time.perf_counter() - started
    result = {"input": asdict(item), "kept": kept, "accounting": accounting.as_dict(), "peak_rss_mb": peak_rss_mb(),
              "node": ray.get_runtime_context().get_node_id()}
    atomic_write_text(stats_path, json.dumps(result, sort_keys=True))
    return result


@ray.remote
def write_shard(pieces: list[tuple[int, str, int, int]], removed: list[str], out_path: str, config_data: dict) -> dict:
    """Phase 3: one output shard, in run order, from the given ranges of the parts' surviving rows (written
    atomically; a finished shard is kept on resume)."""
    config = UltraCleanConfig.model_validate(config_data)
    out = location(out_path)
    if not out.is_file():
        tables = []
        for part, part_path, start, stop in pieces:
            table = read_parquet(part_path)
            gone = pc.is_in(table["order"], value_set=pa.array(removed_orders(removed, part), pa.int64()))
            tables.append(table.filter(pc.invert(gone)).slice(start, stop - start))
        shard = pa.concat_tables(tables).select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA)
        with atomic_path(out) as tmp:
            pq.write_table(shard, tmp, row_group_size=config.output.row_group_rows, **config.output.parquet_options())
    return describe_shard(out, out.parent.parent, config.output.tokenizer)


def plan_shards(surviving: list[tuple[int, str, int]], rows_per_shard: int) -> list[list[tuple[int, str, int, int]]]:
    """Shards of ``rows_per_shard`` rows over the parts' surviving rows in run order: per shard, the ranges
    ``(part, path, start, stop)`` it takes. Counts only: no process holds the orders of the run."""
    shards: list[list[tuple[int, str, int, int]]] = [[]]
    room = rows_per_shard
    for part, path, count in surviving:
        start = 0
        while start < count:
            if room == 0:
                shards.append([])
                room = rows_per_shard
            take = min(room, count - start)
            shards[-1].append((part, path, start, start + take))
            start += take
            room -= take
    return [shard for shard in shards if shard]


INGEST_SECTIONS = {"name", "read", "extract", "langid", "filters", "dedup", "output"}


def content_config(config: UltraCleanConfig) -> dict:
    """The config as it shapes the ingested content: no cluster address, no output location, no later steps."""
    data = config.model_dump(mode="json", include=INGEST_SECTIONS)
    for key in ("root", "keep_work", "shared_filesystem"):
        data["output"].pop(key)
    return data


def run_ingest(config: UltraCleanConfig, base_dir: Path, output_root: str | os.PathLike | None = None) -> IngestResult:
    """Ingest the configured inputs into a dataset version, or reuse the finished one with the same id.

    Fails, publishing nothing, when a config value or the environment is unusable (before any work) or when an
    input's task fails for good (a failure of ours, not bad input); a re-run then resumes from the finished inputs.
    """
    started = time.perf_counter()
    inputs = resolve_inputs(config, base_dir)
    check_stages(config)
    root = resolve_root(output_root or config.output.root)
    ensure_ray(config.ray.address, config.ray.num_cpus)
    readable = [item for item in inputs if item.problem is None]
    require_reachable([root, *(item.path for item in readable)], config.output.shared_filesystem)
    fingerprint = fingerprint_input.options(**config.ray.task_options())
    fingerprints = dict(zip([item.index for item in readable],
                            gather([fingerprint.remote(item.path) for item in readable], "ingest: fingerprints",
                                   labels=[item.path for item in readable])))
    input_ids = [{**fingerprints[item.index], "format": item.format, "source": item.source} if item.problem is None
                 else {"name": item.name, "source": item.source, "unreadable": item.problem} for item in inputs]
    version_id = compute_version_id(inputs=input_ids, config=content_config(config),
                                    code=code_version(*INGEST_CODE), parent=None)
    with version_lock(root, version_id):
        manifest = published_manifest(root, version_id)
        if manifest is not None:
            return IngestResult(root / version_id, manifest, reused=True, seconds=time.perf_counter() - started,
                                stage_seconds={})
        final, manifest, total = _ingest_version(config, inputs, input_ids, root, version_id)
    return IngestResult(final, manifest, reused=False, seconds=time.perf_counter() - started,
                        stage_seconds=dict(total.seconds))


def _ingest_version(config: UltraCleanConfig, inputs: list[ResolvedInput], input_ids: list[dict], root: AnyPath,
                    version_id: str) -> tuple[AnyPath, dict, Accounting]:
    work = root / WORK_DIR / version_id
    config_data = config.model_dump(mode="json")
    readable = [item for item in inputs if item.problem is None]
    part_paths = {item.index: str(work / "parts" / f"part-{item.index:05d}.parquet") for item in readable}
    task = process_input.options(**config.ray.task_options())
    results = gather([task.remote(item, config_data, part_paths[item.index]) for item in readable],
                     "ingest: inputs", labels=[item.path for item in readable])
    accounting_of = {item.index: Accounting.from_dict(result["accounting"]) for item, result in zip(readable, results)}
    accountings = []
    for item in inputs:
        if item.problem is None:
            accountings.append(accounting_of[item.index])
        else:
            unreadable = Accounting()
            unreadable.quarantine(item.name, "file", f"input skipped: {item.problem}", 0, "read")
            accountings.append(unreadable)

    kept = {item.index: result["kept"] for item, result in zip(readable, results)}
    duplicates = deduplicate([(i, part_paths[i]) for i in sorted(part_paths)], sum(kept.values()), config.dedup,
                             work / "dedup", config.ray.task_options())
    dedup = Accounting()
    dedup.drop("dedup", "exact_duplicate", duplicates.exact)
    dedup.drop("dedup", "minhash_duplicate", duplicates.near)
    version_dir = entry_dir(root, version_id)
    surviving = [(i, part_paths[i], kept[i] - removed_count(duplicates.removed, i)) for i in sorted(part_paths)]
    shards = write_shards(surviving, duplicates.removed, version_dir, config)

    total = sum(accountings, Accounting()) + dedup
    filters = [f"filter_{f.kind}" for f in config.filters if f.enabled]
    manifest = build_manifest(
        version_id=version_id, name=config.name, kind="ultraclean-ingest", parent=None,
        code_version=code_version(*INGEST_CODE), inputs=input_ids, config=content_config(config),
        schema=SHARD_SCHEMA, shards=shards, accounting=total, stage_order=["read", "extract", "language", *filters,
                                                                         "dedup"],
        extra={"input_accounting": [{"name": item.name, "records_in": a.records_in,
                                     "quarantine_entries": len(a.quarantined)} for item, a in zip(inputs, accountings)]},
    )
    quarantine = "".join(json.dumps(entry.as_dict(), sort_keys=True, ensure_ascii=False) + "\n"
                         for entry in total.quarantined)
    final = finish_version(version_dir, manifest, dataset_card(manifest, description=CARD_DESCRIPTION),
                           {QUARANTINE_NAME: quarantine})
    if not config.output.keep_work:
        remove_tree(work)
    return final, manifest, total


def write_shards(surviving: list[tuple[int, str, int]], removed: list[str], version_dir: AnyPath,
                 config: UltraCleanConfig) -> list[dict]:
    """Phase 3: the surviving documents, in run order, into shards of rows_per_shard (a task each)."""
    config_data = config.model_dump(mode="json")
    task = write_shard.options(**config.ray.task_options())
    refs = [task.remote(plan, removed, str(version_dir / SHARD_DIR / f"shard-{number:05d}.parquet"), config_data)
            for number, plan in enumerate(plan_shards(surviving, config.output.rows_per_shard))]
    return gather(refs, "emit: shards", labels=[f"shard {number}" for number in range(len(refs))])
