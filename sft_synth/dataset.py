"""The synthesized SFT dataset on disk: one dialogue per row, Parquet and JSONL shards of a dataset version.

Rows hold ``messages`` (``{role, content}``; assistant tool calls in the OpenAI shape with ``tool_calls``, tool
results with ``tool_call_id``), ``family``, ``source_seed`` (with the gold answer where the seed knows it), ``tools`` (JSON, as LLaMA-Factory expects), the
instruction ``constraints`` (JSON), the generation settings and the model ids. Versions follow the UltraClean
scheme (``core.versions``, ``core.manifest``): manifest with shards, accounting and stage table, a card, ``latest``.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from core.io import atomic_path, atomic_write_text, sha256_file
from core.storage import AnyPath
from core.versions import SHARD_DIR
from sft_synth.chat_format import CHATML, render_prompt
from sft_synth.generation.chat_template import ChatTemplate

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
    ("source_seed", pa.struct([("id", pa.string()), ("source", pa.string()), ("text", pa.string()),
                               ("answer", pa.string())])),
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


def arrow_messages(messages: list[dict]) -> list[dict]:
    """Every message with all four fields, None where a field does not apply."""
    return [{"role": m["role"], "content": m.get("content") or "", "tool_calls": m.get("tool_calls"),
             "tool_call_id": m.get("tool_call_id")} for m in messages]


def json_messages(messages: list[dict]) -> list[dict]:
    """Messages as chat APIs spell them: only the fields that apply."""
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def row_tools(row: dict) -> list[dict] | None:
    return json.loads(row["tools"]) if row["tools"] else None


def render_row(row: dict, template: ChatTemplate = CHATML) -> str:
    """The training text of a row, as the synthesis engine saw it."""
    return render_prompt(row["messages"], row_tools(row), add_generation_prompt=False, template=template)


def write_shard(rows: list[dict], directory: AnyPath, number: int, compression: str | None,
                tokenizer: Tokenizer | None, template: ChatTemplate = CHATML) -> dict:
    """One Parquet shard and its JSONL twin, written atomically; returns the manifest entry."""
    name = f"shard-{number:05d}"
    parquet_path = directory / SHARD_DIR / f"{name}.parquet"
    jsonl_path = directory / JSONL_DIR / f"{name}.jsonl"
    table = pa.Table.from_pylist([{**row, "messages": arrow_messages(row["messages"])} for row in rows],
                                 schema=SHARD_SCHEMA)
    with atomic_path(parquet_path) as tmp:
        pq.write_table(table, tmp, compression=compression, store_schema=False)
    lines = [json.dumps({**{k: row[k] for k in SHARD_SCHEMA.names}, "messages": json_messages(row["messages"])},
                        ensure_ascii=False, sort_keys=True) for row in rows]
    atomic_write_text(jsonl_path, "".join(line + "\n" for line in lines))
    texts = [render_row(row, template) for row in rows]
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


CARD_DESCRIPTION = """Multi-turn SFT dialogues synthesized UltraChat v2 style (a user simulator and an assistant on one local
engine), filtered and decontaminated: one dialogue per row."""


def card_sections(manifest: dict) -> tuple[str, ...]:
    """The UltraChat parts of the dataset card: models, families, the message format."""
    families = ", ".join(f"{name}: {count}" for name, count in manifest["families"].items())
    models = manifest["models"]
    return (
        f"""## Generation
Generation `{manifest['generation_id']}`; models: target `{models['target']}`, draft `{models['draft'] or 'none'}`.
Dialogues per family: {families}. Shards: Parquet (`data/`) and the same rows as JSON lines (`jsonl/`).""",
        """## Messages
`messages` is a list of `{role, content}`; an assistant's function call carries `tool_calls`
(`[{id, type: "function", function: {name, arguments}}]`, arguments a JSON string) and the tool's answer
`tool_call_id`, as in the OpenAI chat API. `tools` holds the JSON tool schemas offered in that dialogue.""",
    )


CARD_LOADING = """```python
import datasets
ds = datasets.load_dataset("parquet", data_files="<this directory>/data/*.parquet", split="train")
ds = datasets.load_dataset("json", data_files="<this directory>/jsonl/*.jsonl", split="train")
```
TRL (`SFTTrainer`) and axolotl (`type: chat_template`, `field_messages: messages`) read the `messages` column as is;
LLaMA-Factory reads it as `sharegpt` with `tags: {role_tag: role, content_tag: content}`. The chat template the
data was generated in is `chat_template` in `manifest.json` (a Hugging Face Jinja template)."""
