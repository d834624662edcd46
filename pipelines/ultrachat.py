"""``python -m pipelines.ultrachat``: UltraChat v2 synthesis, locally or under ``ray job submit``.

    python -m pipelines.ultrachat [--config configs/ultrachat.yaml] [--output DIR]   # run (resumes)
    python -m pipelines.ultrachat verify DIR                                        # re-check a version's checksums

Three phases. (1) Seeds are drawn per family and cut into chunks; Ray actors, one generation engine each, turn
chunks into dialogues, each chunk written atomically as a part under ``<root>/.work/<generation id>/``. A part
that exists is not generated again, so a re-run continues from what was written, and the generation id (seeds,
models, chat template, generation settings, code) keeps parts of different runs apart. Prompts are written in the
chat template that comes with the target's tokenizer (ChatML when it has none). (2) One Ray task per part runs the
per-dialogue filters (length and repetition, answers against the gold answer, grounding in the passage, tool calls,
constraints, language, decontamination) and the task checks of the quality report. (3) Exact and near duplicates
are removed across the run (first in seed order kept) and the survivors are written as a dataset version in the
UltraClean scheme, with quality.json / quality.png. Filters are not part of the generation id: re-filtering reuses
parts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.util import ActorPool
from tqdm import tqdm

from core.accounting import Accounting
from core.code_version import code_version
from core.config import ConfigError
from core.io import atomic_path, canonical_json, sha256_file
from core.manifest import build_manifest, dataset_card, finish_version
from core.runtime import ensure_ray, gather, require_reachable
from core.storage import AnyPath, location, read_parquet, remove_tree, resolve_root
from core.versions import (
    WORK_DIR,
    compute_version_id,
    entry_dir,
    published_manifest,
    resolve_latest,
    version_lock,
)
from model.tokenizer import load_tokenizer
from model.train import CHECKPOINT_NAME
from pipelines.ultraclean import verify_main
from sft_synth.chat_format import CHAT_TEMPLATE
from sft_synth.config import FAMILIES, UltraChatConfig, load_config, resolve_path
from sft_synth.dataset import (
    CARD_DESCRIPTION,
    CARD_LOADING,
    PART_SCHEMA,
    SHARD_SCHEMA,
    arrow_messages,
    card_sections,
    write_shard,
)
from sft_synth.filters import (
    BenchmarkIndex,
    as_document,
    benchmark_files,
    dialogue_filters,
    duplicates,
)
from sft_synth.generation.chat_template import ChatTemplate, ChatTemplateError
from sft_synth.quality import GenerationChecks, part_checks, quality_report, quality_section, write_quality
from sft_synth.seeds import Seed, build_seeds, source_fingerprints
from stages.dedup import MinHasher, dedup_keys

PARTS_DIR = "parts"
# The code that shapes a synthesized dataset: the synthesis package, the stages its filters reuse, the model code
# that generates, and this job.
SYNTHESIS_CODE = ("sft_synth", "stages", "model", "pipelines.ultrachat")


@dataclass
class UltraChatResult:
    version_path: AnyPath
    manifest: dict
    reused: bool
    seconds: float
    chunks_generated: int


def resolve_checkpoint(path: str, base_dir: Path, what: str) -> Path:
    """A model directory: itself, or what the `latest` pointer of a training run or checkpoints dir names."""
    checkpoint = resolve_path(path, base_dir)
    for root in (checkpoint, checkpoint / "checkpoints"):
        if not (checkpoint / "config.json").is_file():
            checkpoint = resolve_latest(root, CHECKPOINT_NAME) or checkpoint
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


def chat_template(models: dict) -> ChatTemplate:
    """The chat template belongs with the tokenizer (the target's directory unless models.tokenizer names another)."""
    tokenizer = Path(models["tokenizer"])
    return ChatTemplate.from_checkpoint(tokenizer.parent if tokenizer.is_file() else tokenizer)


def check_chat_template(template: ChatTemplate, config: UltraChatConfig, where: str) -> None:
    """Fail before any generation when the template refuses a conversation the enabled families will send it."""
    conversations = [["system", "user", "assistant", "user"]]
    if config.families.tool_use is not None:
        conversations.append(["system", "user", "assistant", "tool"])
    for roles in conversations:
        try:
            template.render([{"role": role, "content": "x"} for role in roles])
        except ChatTemplateError as error:
            raise ConfigError(f"models: the chat template of {where} cannot render a {' / '.join(roles)} "
                              f"conversation: {error}") from error


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
        self.template = chat_template(models)
        # A checkpoint's template writes its own BOS token where it wants one; ChatML prompts get <s> first.
        self.engine = GenerationEngine.from_pretrained(
            models["target"], models["draft"], tokenizer_path=models["tokenizer"], frspec=self.config.models.frspec,
            device=self.config.models.device, dtype=dtype, speculative=self.config.models.speculative,
            max_batch_size=self.config.models.max_batch_size, add_bos=self.template.is_chatml,
            prefix_cache_tokens=self.config.models.prefix_cache_tokens, torch_compile=self.config.models.torch_compile,
        )
        self.model_ids = models["ids"]

    def generate(self, chunk: dict) -> dict:
        from sft_synth.dialogue import DialogueSynthesizer

        started = time.perf_counter()
        family = chunk["family"]
        synthesizer = DialogueSynthesizer(self.engine, family, getattr(self.config.families, family), self.config.seed,
                                          self.template)
        records = synthesizer.synthesize([Seed(**seed) for seed in chunk["seeds"]], chunk["index"])
        rows = [
            {**record, "order": chunk["first_order"] + position, "language": None,
             "generation_settings": chunk["generation_settings"], "models": self.model_ids,
             "messages": arrow_messages(record["messages"])}
            for position, record in enumerate(records)
        ]
        with atomic_path(chunk["part_path"]) as tmp:
            pq.write_table(pa.Table.from_pylist(rows, schema=PART_SCHEMA), tmp)
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
    todo = [chunk for chunk in chunks if not location(chunk["part_path"]).is_file()]
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
    """Phase 2 for one part: the per-dialogue filters; kept rows come back with their dedup keys, and the task
    checks of every generated dialogue with them."""
    config = UltraChatConfig.model_validate(config_data)
    records = read_parquet(part_path).to_pylist()
    checks = part_checks(records, config.filters)
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
    return {"kept": kept, "accounting": accounting.as_dict(), "stages": [stage.name for stage in stages],
            "checks": checks}


def content_config(config: UltraChatConfig) -> dict:
    """The config as it shapes the dataset: no cluster, no output location, models by id (in the generation id)
    rather than by where they happen to be stored."""
    return config.model_dump(mode="json", exclude={"ray": True, "output": {"root", "keep_work", "shared_filesystem"},
                                                   "models": {"target", "draft", "tokenizer"}})


@dataclass(frozen=True)
class SynthesisPlan:
    """What a run will produce, decided before any generation: the ids and where the parts go."""

    models: dict
    seeds: dict[str, list[Seed]]
    inputs: list[dict]
    config: dict  # the config as it shapes the dataset, with the generation id: what the version id hashes
    generation_id: str
    version_id: str
    index: BenchmarkIndex | None


def plan_synthesis(config: UltraChatConfig, base_dir: Path) -> SynthesisPlan:
    """Models and seeds resolved; the generation id (seeds, models, generation settings, code) and the version id
    (that plus the filters and benchmark files): re-filtering the same generation reuses its parts."""
    models = resolve_models(config, base_dir)
    seeds = build_seeds(config, base_dir)
    code = code_version(*SYNTHESIS_CODE)
    generation_config = config.model_dump(mode="json", include={"seed", "chunk_size", "models", "families"})
    generation_config["models"] |= {"target": models["ids"]["target"], "draft": models["ids"]["draft"]}
    template = chat_template(models)
    check_chat_template(template, config, models["tokenizer"])
    generation_config["chat_template"] = template.source
    seed_digest = hashlib.sha256(canonical_json({f: [s.as_dict() for s in v] for f, v in seeds.items()}).encode())
    generation_id = "g-" + hashlib.sha256(
        canonical_json({"config": generation_config, "seeds": seed_digest.hexdigest(), "code": code}).encode()
    ).hexdigest()[:16]
    decontamination = config.filters.decontamination
    index = None
    if decontamination.enabled and decontamination.benchmarks:
        index = BenchmarkIndex.load(decontamination, base_dir)
    inputs = source_fingerprints(config, base_dir) + [
        {"benchmark": spec.format, "files": [{"name": f.name, "sha256": sha256_file(f)} for f in files]}
        for spec, files in benchmark_files(decontamination, base_dir)
    ]
    shaping = {**content_config(config), "generation_id": generation_id}
    version_id = compute_version_id(inputs=inputs, config=shaping, code=code, parent=None)
    return SynthesisPlan(models, seeds, inputs, shaping, generation_id, version_id, index)


@dataclass
class FilterResults:
    """Phase 2's outcome: kept rows in seed order; per family the filters' accounting and the task checks."""

    kept: list[dict]
    accounting: dict[str, Accounting]
    checks: dict[str, GenerationChecks]
    stages: list[str]


def filter_parts(config: UltraChatConfig, chunks: list[dict], index: BenchmarkIndex | None) -> FilterResults:
    config_data = config.model_dump(mode="json")
    index_ref = ray.put(index)
    results = gather([filter_part.remote(chunk["part_path"], config_data, index_ref) for chunk in chunks],
                     "ultrachat: filter", labels=[location(chunk["part_path"]).name for chunk in chunks])
    accounting: dict[str, Accounting] = {}
    checks: dict[str, GenerationChecks] = {}
    for chunk, result in zip(chunks, results):  # a part holds one family
        family = chunk["family"]
        accounting[family] = accounting.get(family, Accounting()) + Accounting.from_dict(result["accounting"])
        checks[family] = checks.get(family, GenerationChecks()) + result["checks"]
    kept = sorted((row for r in results for row in r["kept"]), key=lambda row: row["order"])
    return FilterResults(kept, accounting, checks, results[0]["stages"] if results else [])


def generation_accounting(chunks: list[dict], filtered: Accounting) -> Accounting:
    """Seeds in; a seed whose part holds no dialogue counts as dropped by generation; then the filters."""
    seeds = sum(len(chunk["seeds"]) for chunk in chunks)
    generation = Accounting(records_in=seeds)
    generation.drop("generation", "no_dialogue", seeds - filtered.records_in)
    return generation + replace(filtered, records_in=0)


def family_accounting(chunks: list[dict], filtered: dict[str, Accounting], deduplicated: dict[str, Accounting]
                      ) -> dict[str, Accounting]:
    """Per family: its seeds through generation, the filters and dedup."""
    families = dict.fromkeys(chunk["family"] for chunk in chunks)
    return {family: generation_accounting([c for c in chunks if c["family"] == family],
                                          filtered.get(family, Accounting())) + deduplicated.get(family, Accounting())
            for family in families}


def remove_duplicates(config: UltraChatConfig, kept: list[dict]) -> tuple[list[dict], dict[str, Accounting]]:
    """Phase 3: exact and near duplicates across the run, the first in seed order kept; accounting per family."""
    frame = pl.DataFrame(
        {"order": [r["order"] for r in kept], "content_hash": [r["content_hash"] for r in kept],
         "minhash_bands": [r["minhash_bands"] for r in kept]},
        schema={"order": pl.Int64, "content_hash": pl.UInt64, "minhash_bands": pl.List(pl.UInt64)},
    )
    exact, near = duplicates(frame, config.filters.dedup)
    removed = set(exact.tolist()) | set(near.tolist())
    family_of = {row["order"]: row["family"] for row in kept}
    accounting: dict[str, Accounting] = {}
    for reason, orders in (("exact_duplicate", exact), ("near_duplicate", near)):
        for order in orders.tolist():
            accounting.setdefault(family_of[order], Accounting()).drop("dedup", reason)
    return [row for row in kept if row["order"] not in removed], accounting


def run_ultrachat(config: UltraChatConfig, base_dir: Path, output_root: str | os.PathLike | None = None
                  ) -> UltraChatResult:
    """Synthesise the configured dialogues into a dataset version under the output root (a local path or an fsspec
    URL), or reuse the finished one with the same id."""
    started = time.perf_counter()
    root = resolve_root(output_root or config.output.root)
    plan = plan_synthesis(config, base_dir)
    with version_lock(root, plan.version_id):
        manifest = published_manifest(root, plan.version_id)
        if manifest is not None:
            return UltraChatResult(root / plan.version_id, manifest, True, time.perf_counter() - started, 0)
        final, manifest, generated = _synthesize_version(config, plan, root)
    return UltraChatResult(final, manifest, False, time.perf_counter() - started, generated)


def _synthesize_version(config: UltraChatConfig, plan: SynthesisPlan, root: AnyPath) -> tuple[AnyPath, dict, int]:
    ensure_ray(config.ray.address, config.ray.num_cpus)
    require_reachable([root], config.output.shared_filesystem)
    work = root / WORK_DIR / plan.generation_id
    chunks = plan_chunks(config, plan.seeds, work / PARTS_DIR)
    generated = generate_parts(config, chunks, plan.models)
    filtered = filter_parts(config, chunks, plan.index)
    survivors, deduplicated = remove_duplicates(config, filtered.kept)
    per_family = family_accounting(chunks, filtered.accounting, deduplicated)
    stage_order = ["generation", *filtered.stages, "dedup"]

    version_dir = entry_dir(root, plan.version_id)
    tokenizer = load_tokenizer(plan.models["tokenizer"])
    template = chat_template(plan.models)
    per_shard = config.output.rows_per_shard
    compression = None if config.output.compression == "none" else config.output.compression
    shards = [write_shard(survivors[start : start + per_shard], version_dir, number, compression, tokenizer, template)
              for number, start in enumerate(range(0, max(len(survivors), 1), per_shard))]
    quality = quality_report(list(config.families.enabled()), per_family, stage_order, filtered.checks, survivors)
    reports = [{"path": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
               for path in write_quality(quality, version_dir)]
    manifest = build_manifest(
        version_id=plan.version_id, name=config.name, kind="ultrachat-sft", parent=None,
        code_version=code_version(*SYNTHESIS_CODE), inputs=plan.inputs, config=plan.config,
        schema=SHARD_SCHEMA, shards=shards, accounting=sum(per_family.values(), Accounting()),
        stage_order=stage_order,
        extra={"models": plan.models["ids"], "generation_id": plan.generation_id,
               "chat_template": template.source or CHAT_TEMPLATE, "reports": reports,
               "families": {f: sum(1 for r in survivors if r["family"] == f) for f in config.families.enabled()}},
    )
    final = finish_version(version_dir, manifest, dataset_card(
        manifest, description=CARD_DESCRIPTION, rows_label="dialogues", inputs_label="seeds",
        loading=CARD_LOADING, sections=(*card_sections(manifest), quality_section(quality))))
    if not config.output.keep_work:
        remove_tree(work)
    return final, manifest, generated


def format_summary(result: UltraChatResult) -> str:
    manifest = result.manifest
    lines = [f"{'stage':<22}{'in':>7}{'out':>7}{'dropped':>9}  top reasons"]
    for row in manifest["stages"]:
        reasons = sorted(row["dropped"].items(), key=lambda kv: -kv[1])[:3]
        lines.append(f"{row['stage']:<22}{row['in']:>7}{row['out']:>7}{sum(row['dropped'].values()):>9}  "
                     f"{', '.join(f'{k}={v}' for k, v in reasons)}")
    totals = manifest["totals"]
    lines.append(f"{totals['rows']} dialogues kept ({', '.join(f'{k}: {v}' for k, v in manifest['families'].items())}); "
                 f"{result.chunks_generated} chunks generated this run; {result.seconds:.1f} s wall")
    return "\n".join(lines)


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.ultrachat", description="Synthesize SFT dialogues.")
    parser.add_argument("--config", help="YAML config (default: configs/ultrachat.yaml)")
    parser.add_argument("--output", help="dataset root, overriding output.root")
    args = parser.parse_args(argv)
    config, base_dir = load_config(args.config)
    result = run_ultrachat(config, base_dir, args.output)
    if result.reused:
        print(f"version {result.version_path.name} already complete at {result.version_path}: nothing to do")
    else:
        print(format_summary(result))
    print(f"dataset version: {result.version_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["verify"]:
            return verify_main(argv[1:], "python -m pipelines.ultrachat verify")
        return _run(argv[1:] if argv[:1] == ["run"] else argv)
    except (ConfigError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
