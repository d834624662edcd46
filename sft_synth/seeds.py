"""Seeds: what each dialogue starts from, per family, drawn deterministically from the configured sources.

knowledge     a passage of a document from an UltraClean dataset version; the user simulator asks about it
reasoning     a problem (GSM8K train question); it is the first user message verbatim; its gold answer is kept
instruction   a task on a topic plus verifiable constraints; the first user message verbatim
long_context  a long document from a dataset version, attached to the first user message; the simulator asks
tool_use      a few tool schemas and the tool the request is meant for; the simulator writes the request

Documents and problems are chosen by the smallest keyed hashes of their locators, in one streaming pass: the
choice depends only on the source and the seed, never on memory or on how the source is sharded.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from core.io import sha256_file
from core.versions import DatasetVersion, resolve_parquet_files
from sft_synth.config import TextSourceConfig, UltraChatConfig, resolve_path
from sft_synth.constraints import describe, draw_constraints


@dataclass
class Seed:
    family: str
    id: str  # stable across runs: "<source>:<locator>"
    source: str  # dataset version id, file name, or "config"
    material: str  # what the user simulator works from
    opening: str | None = None  # the first user message verbatim; None: the simulator writes it
    attachment: str = ""  # a document placed before the first user message (long context)
    constraints: list[dict] = field(default_factory=list)
    tools: list[dict] = field(default_factory=list)
    tool: str | None = None  # the tool the request is meant for
    answer: str | None = None  # the gold final answer, when the source knows it (GSM8K)

    def as_dict(self) -> dict:
        return asdict(self)


def _rank(seed: int, family: str, locator: str) -> bytes:
    return hashlib.sha256(f"{seed}\0{family}\0{locator}".encode()).digest()


def _choose(items: Iterator[tuple[str, object]], count: int, seed: int, family: str) -> list[tuple[str, object]]:
    """count items with the smallest keyed hashes, ordered by that hash: a seeded sample in one pass."""
    ranked = heapq.nsmallest(count, ((_rank(seed, family, loc), loc, item) for loc, item in items))
    return [(loc, item) for _, loc, item in ranked]


def excerpt(text: str, max_chars: int) -> str:
    """At most max_chars of text, cut at a paragraph or sentence end when one falls in the second half."""
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    cut = max(head.rfind("\n"), head.rfind(". ") + 1)
    return head[:cut].rstrip() if cut > max_chars // 2 else head.rstrip()


def _documents(source: TextSourceConfig, base_dir: Path) -> tuple[str, Iterator[tuple[str, str]]]:
    """(source label, stream of (locator, text)) for documents of at least min_chars."""
    path = resolve_path(source.path, base_dir)
    try:
        label = DatasetVersion.open(path).version_id if path.is_dir() else path.name
    except FileNotFoundError:
        label = path.name
    files = resolve_parquet_files(path)

    def stream():
        for file in files:
            parquet = pq.ParquetFile(file)
            if source.text_column not in parquet.schema_arrow.names:
                raise KeyError(f"{file} has no column {source.text_column!r} (columns: {parquet.schema_arrow.names})")
            row = 0
            for batch in parquet.iter_batches(columns=[source.text_column], batch_size=1024):
                for text in batch.column(0).to_pylist():
                    if text and len(text) >= source.min_chars:
                        yield f"{file.name}:{row}", text
                    row += 1

    return label, stream()


def knowledge_seeds(config: UltraChatConfig, base_dir: Path) -> list[Seed]:
    family = config.families.knowledge
    label, docs = _documents(family.source, base_dir)
    return [
        Seed("knowledge", f"{label}:{loc}", label, excerpt(text, family.source.max_chars))
        for loc, text in _choose(docs, family.count, config.seed, "knowledge")
    ]


def long_context_seeds(config: UltraChatConfig, base_dir: Path) -> list[Seed]:
    family = config.families.long_context
    label, docs = _documents(family.source, base_dir)
    seeds = []
    for loc, text in _choose(docs, family.count, config.seed, "long_context"):
        document = excerpt(text, family.source.max_chars)
        seeds.append(Seed("long_context", f"{label}:{loc}", label, excerpt(document, family.material_chars),
                          attachment=document))
    return seeds


def reasoning_seeds(config: UltraChatConfig, base_dir: Path) -> list[Seed]:
    family = config.families.reasoning
    path = resolve_path(family.source, base_dir)
    if not path.is_file():
        raise FileNotFoundError(f"families.reasoning.source: no problem file at {path}")

    def problems():
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f):
                if line.strip():
                    item = json.loads(line)
                    answer = item.get(family.answer_field) if family.answer_field else None
                    yield str(number), (item[family.question_field], gold_answer(answer))

    return [
        Seed("reasoning", f"{path.name}:{loc}", path.name, question, opening=question, answer=answer)
        for loc, (question, answer) in _choose(problems(), family.count, config.seed, "reasoning")
    ]


def gold_answer(solution: str | None) -> str | None:
    """The final answer of a worked solution: what follows GSM8K's '####' marker, else the whole text."""
    if solution is None:
        return None
    return str(solution).rpartition("####")[2].strip()


def instruction_seeds(config: UltraChatConfig, base_dir: Path) -> list[Seed]:
    family = config.families.instruction
    seeds = []
    for number in range(family.count):
        rng = random.Random(f"{config.seed}:instruction:{number}")
        task = rng.choice(family.tasks).format(topic=rng.choice(family.topics))
        constraints = draw_constraints(rng, family.constraint_kinds, family.constraints_per_seed, family.keywords)
        instruction = f"{task} {describe(constraints)}"
        seeds.append(Seed("instruction", f"config:{number}", "config", instruction, opening=instruction,
                          constraints=constraints))
    return seeds


def tool_use_seeds(config: UltraChatConfig, base_dir: Path) -> list[Seed]:
    family = config.families.tool_use
    seeds = []
    for number in range(family.count):
        rng = random.Random(f"{config.seed}:tool_use:{number}")
        tools = rng.sample(family.tools, min(family.tools_per_seed, len(family.tools)))
        function = tools[0]["function"]
        material = f"the tool `{function['name']}`: {function.get('description', '')}"
        seeds.append(Seed("tool_use", f"config:{number}:{function['name']}", "config", material, tools=tools,
                          tool=function["name"]))
    return seeds


BUILDERS = {
    "knowledge": knowledge_seeds,
    "reasoning": reasoning_seeds,
    "instruction": instruction_seeds,
    "long_context": long_context_seeds,
    "tool_use": tool_use_seeds,
}


def build_seeds(config: UltraChatConfig, base_dir: Path) -> dict[str, list[Seed]]:
    return {name: BUILDERS[name](config, base_dir) for name in config.families.enabled()}


def source_fingerprints(config: UltraChatConfig, base_dir: Path) -> list[dict]:
    """What the seeds were drawn from: dataset version ids, or file names and sha256s."""
    found = []
    for name, family in config.families.enabled().items():
        source = getattr(family, "source", None)
        if source is None:
            continue
        path = resolve_path(source if isinstance(source, str) else source.path, base_dir)
        if path.is_dir():
            found.append({"family": name, "version_id": DatasetVersion.open(path).version_id})
        else:
            files = [path] if path.is_file() else resolve_parquet_files(path)
            found.append({"family": name, "files": [{"name": f.name, "sha256": sha256_file(f)} for f in files]})
    return found
