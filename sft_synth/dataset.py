"""The synthesized SFT dataset on disk: one dialogue per row, Parquet and JSONL shards of a dataset version.

Rows hold ``messages`` (``{role, content}``; assistant tool calls in the OpenAI shape with ``tool_calls``, tool
results with ``tool_call_id``), ``family``, ``source_seed``, ``tools`` (JSON, as LLaMA-Factory expects), the
instruction ``constraints`` (JSON), the generation settings and the model ids. Versions follow the UltraClean
scheme (``pipelines.versioning``): manifest with shards, accounting and stage table, a card, ``latest``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from pipelines.versioning import MANIFEST_FORMAT, SHARD_DIR, atomic_write_text, code_version, sha256_file
from sft_synth.chat_format import CHAT_TEMPLATE, render_prompt

JSONL_DIR = "jsonl"
TOOL_CALL = pa.struct([
    ("id", pa.string()),
    ("type", pa.string()),
    ("function", pa.struct([("name", pa.string()), ("arguments", pa.string())])),
])
MESSAGE = pa.struct([
    ("role", pa.string()),
    ("content", pa.string()),
    ("tool_calls", pa.list_(TOOL_CALL)),
    ("tool_call_id", pa.string()),
])
SHARD_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("family", pa.string()),
    ("messages", pa.list_(MESSAGE)),
    ("tools", pa.string()),
    ("constraints", pa.string()),
    ("source_seed", pa.struct([("id", pa.string()), ("source", pa.string()), ("text", pa.string())])),
    ("language", pa.string()),
    ("generated_tokens", pa.int64()),
    ("generation_settings", pa.string()),
    ("models", pa.struct([("target", pa.string()), ("draft", pa.string())])),
])
# Generated, not yet filtered: the shard columns plus what the filters and the run order need.
PART_SCHEMA = (
    SHARD_SCHEMA.append(pa.field("order", pa.int64()))
    .append(pa.field("truncated", pa.bool_()))
    .append(pa.field("tool_call_error", pa.string()))
)


SYNTHESIS_PACKAGES = ("pipelines", "stages", "sft_synth")  # the code that shapes a synthesis dataset


def arrow_messages(messages: list[dict]) -> list[dict]:
    """Every message with all four fields, None where a field does not apply."""
    return [{"role": m["role"], "content": m.get("content") or "", "tool_calls": m.get("tool_calls"),
             "tool_call_id": m.get("tool_call_id")} for m in messages]


def json_messages(messages: list[dict]) -> list[dict]:
    """Messages as chat APIs spell them: only the fields that apply."""
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def row_tools(row: dict) -> list[dict] | None:
    return json.loads(row["tools"]) if row["tools"] else None


def render_row(row: dict) -> str:
    """The training text of a row, as the synthesis engine saw it."""
    return render_prompt(row["messages"], row_tools(row), add_generation_prompt=False)


def write_shard(rows: list[dict], directory: Path, number: int, compression: str | None,
                tokenizer: Tokenizer | None) -> dict:
    """One Parquet shard and its JSONL twin, written atomically; returns the manifest entry."""
    name = f"shard-{number:05d}"
    parquet_path = directory / SHARD_DIR / f"{name}.parquet"
    jsonl_path = directory / JSONL_DIR / f"{name}.jsonl"
    parquet_path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist([{**row, "messages": arrow_messages(row["messages"])} for row in rows],
                                 schema=SHARD_SCHEMA)
    tmp = parquet_path.with_name(f".{parquet_path.name}.tmp")
    pq.write_table(table, tmp, compression=compression, store_schema=False)
    tmp.replace(parquet_path)
    lines = [json.dumps({**{k: row[k] for k in SHARD_SCHEMA.names}, "messages": json_messages(row["messages"])},
                        ensure_ascii=False, sort_keys=True) for row in rows]
    atomic_write_text(jsonl_path, "".join(line + "\n" for line in lines))
    texts = [render_row(row) for row in rows]
    tokens = None
    if tokenizer is not None:
        tokens = sum(len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False)) if texts else 0
    return {
        "path": f"{SHARD_DIR}/{parquet_path.name}",
        "rows": len(rows),
        "bytes": parquet_path.stat().st_size,
        "sha256": sha256_file(parquet_path),
        "characters": sum(len(t) for t in texts),
        "tokens": tokens,
        "jsonl": {"path": f"{JSONL_DIR}/{jsonl_path.name}", "bytes": jsonl_path.stat().st_size,
                  "sha256": sha256_file(jsonl_path)},
    }


def stage_rows(records_in: int, stages: list[tuple[str, dict[str, int], int]]) -> list[dict]:
    """The manifest's stage table from (stage, dropped reasons, quarantined) in pipeline order."""
    rows, remaining = [], records_in
    for stage, dropped, quarantined in stages:
        out = remaining - sum(dropped.values()) - quarantined
        rows.append({"stage": stage, "in": remaining, "out": out, "dropped": dict(sorted(dropped.items())),
                     "quarantined": quarantined})
        remaining = out
    return rows


def build_manifest(*, version_id: str, name: str, inputs: list[dict], config: dict, models: dict,
                   generation_id: str, shards: list[dict], stages: list[dict], families: dict[str, int]) -> dict:
    records_in = stages[0]["in"] if stages else 0
    kept = sum(s["rows"] for s in shards)
    dropped = sum(sum(s["dropped"].values()) for s in stages)
    quarantined = sum(s["quarantined"] for s in stages)
    if records_in != kept + dropped + quarantined:
        raise RuntimeError(f"accounting does not add up: {records_in} in != {kept} kept + {dropped} dropped + "
                           f"{quarantined} quarantined")
    tokens = [s["tokens"] for s in shards]
    return {
        "format": MANIFEST_FORMAT,
        "kind": "ultrachat-sft",
        "version_id": version_id,
        "name": name,
        "parent": None,
        "code_version": code_version(SYNTHESIS_PACKAGES),
        "generation_id": generation_id,
        "inputs": inputs,
        "models": models,
        "config": config,
        "schema": {f.name: str(f.type) for f in SHARD_SCHEMA},
        "chat_template": CHAT_TEMPLATE,
        "shards": shards,
        "totals": {
            "rows": kept,
            "bytes": sum(s["bytes"] for s in shards),
            "characters": sum(s["characters"] for s in shards),
            "tokens": sum(tokens) if tokens and all(t is not None for t in tokens) else None,
            "families": families,
        },
        "accounting": {"records_in": records_in, "kept": kept, "dropped": dropped, "quarantined": quarantined,
                       "quarantine_entries": quarantined},
        "stages": stages,
    }


def dataset_card(manifest: dict) -> str:
    totals, accounting = manifest["totals"], manifest["accounting"]
    stage_lines = "\n".join(
        f"| {s['stage']} | {s['in']} | {s['out']} | {sum(s['dropped'].values())} | {s['quarantined']} | "
        f"{', '.join(f'{k}: {v}' for k, v in s['dropped'].items()) or '-'} |"
        for s in manifest["stages"]
    )
    families = ", ".join(f"{name}: {count}" for name, count in totals["families"].items())
    models = manifest["models"]
    return f"""# {manifest['name']} — dataset version `{manifest['version_id']}`

Multi-turn SFT dialogues synthesized UltraChat v2 style (a user simulator and an assistant on one local engine),
filtered and decontaminated: one dialogue per row.
Produced by `ultraclean-factory {manifest['code_version']}`; generation `{manifest['generation_id']}`.
Models: target `{models['target']}`, draft `{models['draft'] or 'none'}`.

| | |
|---|---|
| dialogues | {totals['rows']} ({families}) |
| shards | {len(manifest['shards'])} Parquet (`data/`) + JSONL (`jsonl/`) |
| characters | {totals['characters']} |
| tokens | {totals['tokens'] if totals['tokens'] is not None else 'not counted'} |
| seeds | {accounting['records_in']} (kept {accounting['kept']}, dropped {accounting['dropped']}, failed {accounting['quarantined']}) |

## Columns
{chr(10).join(f'- `{name}`: {dtype}' for name, dtype in manifest['schema'].items())}

`messages` is a list of `{{role, content}}`; an assistant's function call carries `tool_calls`
(`[{{id, type: "function", function: {{name, arguments}}}}]`, arguments a JSON string) and the tool's answer
`tool_call_id`, as in the OpenAI chat API. `tools` holds the JSON tool schemas offered in that dialogue.

## Where every seed went
| stage | in | out | dropped | failed | reasons |
|---|---|---|---|---|---|
{stage_lines}

## Loading
```python
import datasets
ds = datasets.load_dataset("parquet", data_files="<this directory>/data/*.parquet", split="train")
ds = datasets.load_dataset("json", data_files="<this directory>/jsonl/*.jsonl", split="train")
```
TRL (`SFTTrainer`) and axolotl (`type: chat_template`, `field_messages: messages`) read the `messages` column as is;
LLaMA-Factory reads it as `sharegpt` with `tags: {{role_tag: role, content_tag: content}}`. The chat template the
data was generated in is `chat_template` in `manifest.json` (a Hugging Face Jinja template).
"""
