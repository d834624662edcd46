"""``python -m pipelines.ultrachat``: UltraChat v2 synthesis, locally or under ``ray job submit``.

    python -m pipelines.ultrachat [--config configs/ultrachat.yaml] [--output DIR]   # run (resumes)
    python -m pipelines.ultrachat verify DIR                                        # re-check a version's checksums

Three phases. (1) Seeds are drawn per family and cut into chunks; Ray actors, one generation engine each, turn
chunks into dialogues, each chunk written atomically as a part under ``<root>/.work/<generation id>/``. A part
that exists is not generated again, so a re-run continues from what was written, and the generation id (seeds,
models, generation settings, code) keeps parts of different runs apart. (2) One Ray task per part runs the
per-dialogue filters (length and repetition, tool calls, constraints, language, decontamination). (3) Exact and
near duplicates are removed across the run (first in seed order kept) and the survivors are written as a
dataset version in the UltraClean scheme. Filters are not part of the generation id: re-filtering reuses parts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.util import ActorPool
from tqdm import tqdm

from pipelines.config import ConfigError
from pipelines.runtime import ensure_ray, gather
from pipelines.ultraclean import report_verification
from pipelines.versioning import (
    CARD_NAME,
    MANIFEST_NAME,
    DatasetVersion,
    atomic_write_text,
    canonical_json,
    code_version,
    compute_version_id,
    publish_version,
    sha256_file,
    verify_version,
)
from sft_synth.config import FAMILIES, UltraChatConfig, load_config, resolve_path
from sft_synth.dataset import (
    PART_SCHEMA,
    SYNTHESIS_PACKAGES,
    arrow_messages,
    build_manifest,
    dataset_card,
    stage_rows,
    write_shard,
)
from sft_synth.filters import (
    BenchmarkIndex,
    as_document,
    benchmark_files,
    dedup_keys,
    dialogue_filters,
    duplicates,
)
from sft_synth.seeds import Seed, build_seeds, source_fingerprints
from stages.base import Accounting
from stages.dedup import MinHasher

PARTS_DIR = "parts"


@dataclass
class UltraChatResult:
    version_path: Path
    manifest: dict
    reused: bool
    seconds: float
    chunks_generated: int


def resolve_checkpoint(path: str, base_dir: Path, what: str) -> Path:
    """A model directory: itself, or what the `latest` pointer of a training run or checkpoints dir names."""
    checkpoint = resolve_path(path, base_dir)
    for pointer in (checkpoint / "latest", checkpoint / "checkpoints" / "latest"):
        if not (checkpoint / "config.json").is_file() and pointer.is_file():
            checkpoint = pointer.parent / pointer.read_text().strip()
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(
            f"{what}: no model at {checkpoint} (expected a checkpoint dir with config.json and model.safetensors, or "
            f"a training run / checkpoints dir with a `latest` pointer); train one with `python -m model.train`"
        )
    return checkpoint


def model_id(checkpoint: Path) -> str:
    """Directory name plus a hash of the config and weights: the same id means the same model."""
    digest = hashlib.sha256()
    for file in sorted(checkpoint.glob("*.json")) + sorted(checkpoint.glob("*.safetensors")):
        digest.update(file.name.encode())
        digest.update(sha256_file(file).encode())
    return f"{checkpoint.name}@{digest.hexdigest()[:12]}"


def resolve_models(config: UltraChatConfig, base_dir: Path) -> dict:
    models = config.models
    target = resolve_checkpoint(models.target, base_dir, "models.target")
    draft = resolve_checkpoint(models.draft, base_dir, "models.draft") if models.draft else None
    tokenizer = resolve_path(models.tokenizer, base_dir) if models.tokenizer else target
    return {
        "target": str(target), "draft": str(draft) if draft else None, "tokenizer": str(tokenizer),
        "ids": {"target": model_id(target), "draft": model_id(draft) if draft else None},
    }


@ray.remote
class DialogueWorker:
    """One generation engine, loaded once, turning chunks of seeds into part files."""

    def __init__(self, config_data: dict, models: dict, threads: int):
        import torch

        from sft_synth.generation import GenerationEngine

        torch.set_num_threads(threads)
        self.config = UltraChatConfig.model_validate(config_data)
        dtype = getattr(torch, self.config.models.dtype) if self.config.models.dtype else None
        self.engine = GenerationEngine.from_pretrained(
            models["target"], models["draft"], tokenizer_path=models["tokenizer"], frspec=self.config.models.frspec,
            device=self.config.models.device, dtype=dtype, speculative=self.config.models.speculative,
            max_batch_size=self.config.models.max_batch_size,
        )
        self.model_ids = models["ids"]

    def generate(self, chunk: dict) -> dict:
        from sft_synth.dialogue import DialogueSynthesizer

        started = time.perf_counter()
        family = chunk["family"]
        synthesizer = DialogueSynthesizer(self.engine, family, getattr(self.config.families, family), self.config.seed)
        records = synthesizer.synthesize([Seed(**seed) for seed in chunk["seeds"]], chunk["index"])
        rows = [
            {**record, "order": chunk["first_order"] + position, "language": None,
             "generation_settings": chunk["generation_settings"], "models": self.model_ids,
             "messages": arrow_messages(record["messages"])}
            for position, record in enumerate(records)
        ]
        part = Path(chunk["part_path"])
        tmp = part.with_name(f".{part.name}.tmp")
        pq.write_table(pa.Table.from_pylist(rows, schema=PART_SCHEMA), tmp)
        tmp.replace(part)
        return {"index": chunk["index"], "rows": len(rows), "seconds": time.perf_counter() - started,
                "generated_tokens": sum(r["generated_tokens"] for r in rows)}


def generation_settings(config: UltraChatConfig, family: str) -> str:
    family_config = getattr(config.families, family)
    settings = {"turns": family_config.turns, "assistant": family_config.assistant.model_dump(mode="json"),
                "user": family_config.user.model_dump(mode="json"),
                "speculative": config.models.speculative.model_dump(mode="json") if config.models.draft else None}
    if family == "tool_use":
        settings |= {"tool": family_config.tool.model_dump(mode="json"), "call_mode": family_config.call_mode}
    return json.dumps(settings, sort_keys=True)


def plan_chunks(config: UltraChatConfig, seeds: dict[str, list[Seed]], parts_dir: Path) -> list[dict]:
    """Seeds cut into chunks of one family, in family then seed order; order numbers follow the same order."""
    chunks, order = [], 0
    for family in FAMILIES:
        family_seeds = seeds.get(family, [])
        settings = generation_settings(config, family) if family_seeds else ""
        for start in range(0, len(family_seeds), config.chunk_size):
            batch = family_seeds[start : start + config.chunk_size]
            index = len(chunks)
            chunks.append({"index": index, "family": family, "first_order": order, "generation_settings": settings,
                           "seeds": [seed.as_dict() for seed in batch],
                           "part_path": str(parts_dir / f"part-{index:05d}-{family}.parquet")})
            order += len(batch)
    return chunks


def generate_parts(config: UltraChatConfig, chunks: list[dict], models: dict) -> int:
    """Generate the chunks that have no part yet on a pool of actors; returns how many were generated."""
    todo = [chunk for chunk in chunks if not Path(chunk["part_path"]).is_file()]
    if not todo:
        return 0
    options = {"num_cpus": config.ray.cpus_per_actor, "num_gpus": config.ray.gpus_per_actor,
               "max_restarts": config.ray.max_restarts, "max_task_retries": config.ray.max_restarts}
    threads = max(1, int(config.ray.cpus_per_actor))
    config_data = config.model_dump(mode="json")
    actors = [DialogueWorker.options(**options).remote(config_data, models, threads)
              for _ in range(min(config.ray.num_actors, len(todo)))]
    pool = ActorPool(actors)
    done = 0
    with tqdm(total=len(todo), desc="ultrachat: generate", unit="chunk") as bar:
        for summary in pool.map_unordered(lambda actor, chunk: actor.generate.remote(chunk), todo):
            done += 1
            bar.set_postfix(tokens_per_s=f"{summary['generated_tokens'] / summary['seconds']:.0f}")
            bar.update(1)
    for actor in actors:
        ray.kill(actor)
    return done


@ray.remote
def filter_part(part_path: str, config_data: dict, index: BenchmarkIndex | None) -> dict:
    """Phase 2 for one part: the per-dialogue filters; kept rows come back with their dedup keys."""
    config = UltraChatConfig.model_validate(config_data)
    records = pq.read_table(part_path).to_pylist()
    accounting = Accounting(records_in=len(records))
    docs = (as_document(record) for record in records)
    stages = dialogue_filters(config.filters, index, accounting)
    for stage in stages:
        docs = stage.run(docs)
    hasher = MinHasher(config.filters.dedup.minhash) if config.filters.dedup.minhash.enabled else None
    kept = []
    for doc in docs:
        record = doc.metadata["record"]
        record["content_hash"], record["minhash_bands"] = dedup_keys(doc.text, record["language"] or "en", hasher)
        kept.append(record)
    return {"kept": kept, "accounting": accounting.as_dict(), "stages": [stage.name for stage in stages]}


def content_config(config: UltraChatConfig) -> dict:
    """The config as it shapes the dataset: no cluster, no output location, models by id (in the generation id)
    rather than by where they happen to be stored."""
    return config.model_dump(mode="json", exclude={"ray": True, "output": {"root", "keep_work"},
                                                   "models": {"target", "draft", "tokenizer"}})


def run_ultrachat(config: UltraChatConfig, base_dir: Path, output_root: Path | None = None) -> UltraChatResult:
    started = time.perf_counter()
    root = Path(output_root or config.output.root).resolve()
    models = resolve_models(config, base_dir)
    seeds = build_seeds(config, base_dir)
    code = code_version(SYNTHESIS_PACKAGES)
    generation_config = config.model_dump(mode="json", include={"seed", "chunk_size", "models", "families"})
    generation_config["models"] |= {"target": models["ids"]["target"], "draft": models["ids"]["draft"]}
    seed_digest = hashlib.sha256(canonical_json({f: [s.as_dict() for s in v] for f, v in seeds.items()}).encode())
    generation_id = "g-" + hashlib.sha256(
        canonical_json({"config": generation_config, "seeds": seed_digest.hexdigest(), "code": code}).encode()
    ).hexdigest()[:16]
    index = None
    decontamination = config.filters.decontamination
    if decontamination.enabled and decontamination.benchmarks:
        index = BenchmarkIndex.load(decontamination, base_dir)
    inputs = source_fingerprints(config, base_dir) + [
        {"benchmark": spec.format, "files": [{"name": f.name, "sha256": sha256_file(f)} for f in files]}
        for spec, files in benchmark_files(decontamination, base_dir)
    ]
    version_id = compute_version_id(inputs=inputs, config={**content_config(config), "generation_id": generation_id},
                                    code=code, parent=None)
    final = root / version_id
    if (final / MANIFEST_NAME).is_file():
        return UltraChatResult(final, json.loads((final / MANIFEST_NAME).read_text()), True,
                               time.perf_counter() - started, 0)

    ensure_ray(config.ray.address, config.ray.num_cpus)
    work = root / ".work" / generation_id
    (work / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    chunks = plan_chunks(config, seeds, work / PARTS_DIR)
    generated = generate_parts(config, chunks, models)

    config_data = config.model_dump(mode="json")
    index_ref = ray.put(index)
    results = gather([filter_part.remote(chunk["part_path"], config_data, index_ref) for chunk in chunks],
                     "ultrachat: filter")
    failed = [r for r in results if isinstance(r, Exception)]
    if failed:
        raise RuntimeError(f"filtering failed (re-run to resume): {failed[0]}")
    accountings = [Accounting.from_dict(r["accounting"]) for r in results]
    kept = sorted((row for r in results for row in r["kept"]), key=lambda row: row["order"])

    dedup_config = config.filters.dedup
    exact, near = duplicates(
        pl.DataFrame({"order": [r["order"] for r in kept], "content_hash": [r["content_hash"] for r in kept],
                      "minhash_bands": [r["minhash_bands"] for r in kept]},
                     schema={"order": pl.Int64, "content_hash": pl.UInt64, "minhash_bands": pl.List(pl.UInt64)}),
        dedup_config,
    )
    removed = set(exact.tolist()) | set(near.tolist())
    survivors = [row for row in kept if row["order"] not in removed]

    staging = work / "staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    from model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(models["tokenizer"])
    per_shard = config.output.rows_per_shard
    compression = None if config.output.compression == "none" else config.output.compression
    shards = [write_shard(survivors[start : start + per_shard], staging, number, compression, tokenizer)
              for number, start in enumerate(range(0, max(len(survivors), 1), per_shard))]

    dropped_by_stage: dict[str, Counter] = {}
    for accounting in accountings:
        for stage, reasons in accounting.dropped.items():
            dropped_by_stage.setdefault(stage, Counter()).update(reasons)
    filter_names = results[0]["stages"] if results else []
    stage_list = [("generation", {}, 0)] + [(name, dict(dropped_by_stage.get(name, {})), 0) for name in filter_names]
    stage_list.append(("dedup", {"exact_duplicate": len(exact), "near_duplicate": len(near)}, 0))
    stages = stage_rows(sum(len(chunk["seeds"]) for chunk in chunks), stage_list)
    manifest = build_manifest(
        version_id=version_id, name=config.name, inputs=inputs, config=content_config(config),
        models=models["ids"], generation_id=generation_id, shards=shards, stages=stages,
        families={f: sum(1 for r in survivors if r["family"] == f) for f in config.families.enabled()},
    )
    atomic_write_text(staging / MANIFEST_NAME, canonical_json(manifest))
    atomic_write_text(staging / CARD_NAME, dataset_card(manifest))
    final = publish_version(staging, root, version_id)
    if not config.output.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return UltraChatResult(final, manifest, False, time.perf_counter() - started, generated)


def format_summary(result: UltraChatResult) -> str:
    manifest = result.manifest
    lines = [f"{'stage':<22}{'in':>7}{'out':>7}{'dropped':>9}  top reasons"]
    for row in manifest["stages"]:
        reasons = sorted(row["dropped"].items(), key=lambda kv: -kv[1])[:3]
        lines.append(f"{row['stage']:<22}{row['in']:>7}{row['out']:>7}{sum(row['dropped'].values()):>9}  "
                     f"{', '.join(f'{k}={v}' for k, v in reasons)}")
    totals = manifest["totals"]
    lines.append(f"{totals['rows']} dialogues kept ({', '.join(f'{k}: {v}' for k, v in totals['families'].items())}); "
                 f"{result.chunks_generated} chunks generated this run; {result.seconds:.1f} s wall")
    return "\n".join(lines)


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.ultrachat", description="Synthesize SFT dialogues.")
    parser.add_argument("--config", help="YAML config (default: configs/ultrachat.yaml)")
    parser.add_argument("--output", help="dataset root, overriding output.root")
    args = parser.parse_args(argv)
    config, base_dir = load_config(args.config)
    result = run_ultrachat(config, base_dir, Path(args.output) if args.output else None)
    if result.reused:
        print(f"version {result.version_path.name} already complete at {result.version_path}: nothing to do")
    else:
        print(format_summary(result))
    print(f"dataset version: {result.version_path}")
    return 0


def _verify(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.ultrachat verify")
    parser.add_argument("version", help="a version directory, or a dataset root (checks its latest version)")
    args = parser.parse_args(argv)
    version = DatasetVersion.open(args.version)
    problems = verify_version(version.path)
    for shard in version.manifest["shards"]:
        jsonl = version.path / shard["jsonl"]["path"]
        if not jsonl.is_file() or sha256_file(jsonl) != shard["jsonl"]["sha256"]:
            problems.append(f"{shard['jsonl']['path']}: missing or sha256 differs from the manifest")
    return report_verification(version, problems)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["verify"]:
            return _verify(argv[1:])
        return _run(argv[1:] if argv[:1] == ["run"] else argv)
    except (ConfigError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
