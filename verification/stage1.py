"""Stage 1: warmup + stable phase of the proxy on the base mix, trained once and shared by every verification.

The run lives in ``<work_dir>/stage1/<key>/``, where the key hashes what the checkpoint depends on: the base mix's
content (dataset version ids, or the sha256 of plain files), the proxy and stage-1 settings, and the model code.
``stage1.json`` is written last, so its presence means a finished checkpoint; a base mix that changed in any byte
gets a new key and a new run, never the old checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from core.code_version import code_version
from core.io import atomic_path, atomic_write_text, canonical_json, sha256_file
from core.storage import location
from core.versions import DatasetVersion
from model.data import DataSource
from model.train import TrainConfig, train
from verification.config import VerificationConfig

STAGE1_RECORD = "stage1.json"
SPLIT_NAMES = ("stage1", "anneal")


class Stage1Mismatch(ValueError):
    """A stage-1 checkpoint that was trained on another base mix or config than the one configured."""


@dataclass(frozen=True)
class Stage1Checkpoint:
    key: str
    directory: Path  # <work_dir>/stage1/<key>
    checkpoint_dir: Path  # model + tokenizer.json + trainer_state.pt: what every anneal starts from
    record: dict
    trained: bool  # whether this call trained it (False: reused)


def source_fingerprint(path: str, text_column: str = "content") -> dict:
    """What a data source's content is: a dataset version's id (content-addressed), else its files' sha256s."""
    if location(path).is_dir():
        return {"version_id": DatasetVersion.open(path).version_id, "text_column": text_column}
    files = DataSource(path, text_column=text_column).files()
    return {"sha256": [sha256_file(f) for f in files], "text_column": text_column}


def stage1_identity(config: VerificationConfig) -> dict:
    return {
        "base_mix": [
            {"fingerprint": source_fingerprint(s.path, s.text_column), "ratio": s.ratio} for s in config.base_mix
        ],
        "proxy": config.proxy.model_dump(),
        "stage1": config.stage1.model_dump(exclude={"resources", "checkpoint"}),
        "model_code": code_version("model"),
    }


def identity_key(identity: dict) -> str:
    return "s1-" + hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:16]


def split_base_source(path: str, text_column: str, reserve: float, out_dir: Path) -> dict[str, str]:
    """Two Parquet files (column ``content``): the documents stage 1 trains on, and the share ``reserve`` held out
    for the anneals, spread evenly through the source (document i is held out when floor((i+1) r) > floor(i r)).
    Written once per source content; a rerun finds them."""
    parts = {name: out_dir / f"{name}.parquet" for name in SPLIT_NAMES}
    if all(p.is_file() for p in parts.values()):
        return {name: str(p) for name, p in parts.items()}
    schema = pa.schema([("content", pa.string())])
    counts = dict.fromkeys(SPLIT_NAMES, 0)
    with contextlib.ExitStack() as stack:
        tmp = {name: stack.enter_context(atomic_path(parts[name])) for name in SPLIT_NAMES}
        writers = {name: stack.enter_context(pq.ParquetWriter(tmp[name], schema)) for name in SPLIT_NAMES}
        buffers: dict[str, list[str]] = {name: [] for name in SPLIT_NAMES}
        for i, text in enumerate(DataSource(path, text_column=text_column).documents()):
            name = "anneal" if math.floor((i + 1) * reserve) > math.floor(i * reserve) else "stage1"
            buffers[name].append(text)
            counts[name] += 1
            if len(buffers[name]) == 4096:
                writers[name].write_table(pa.table({"content": buffers[name]}, schema=schema))
                buffers[name] = []
        for name, writer in writers.items():
            if buffers[name]:
                writer.write_table(pa.table({"content": buffers[name]}, schema=schema))
        if min(counts.values()) == 0:
            raise ValueError(
                f"base source {path} has too few documents ({sum(counts.values())}) to hold out "
                f"{reserve:.0%} of them for the anneals"
            )
    return {name: str(p) for name, p in parts.items()}


def split_base_mix(config: VerificationConfig, identity: dict) -> list[dict]:
    """Per base source: its ratio and the paths of its stage-1 and anneal parts (in <work_dir>/base_mix/)."""
    root = Path(config.work_dir).resolve() / "base_mix"
    reserve = config.stage1.reserve_for_anneal
    splits = []
    for source, entry in zip(config.base_mix, identity["base_mix"]):
        key = hashlib.sha256(canonical_json([entry["fingerprint"], reserve]).encode()).hexdigest()[:16]
        parts = split_base_source(source.path, source.text_column, reserve, root / key)
        splits.append({"source": source.path, "ratio": source.ratio, **parts})
    return splits


def stage1_train_config(config: VerificationConfig, splits: list[dict], out_dir: Path) -> TrainConfig:
    proxy = config.proxy
    sources = [{"path": s["stage1"], "ratio": s["ratio"]} for s in splits]
    return TrainConfig.model_validate(
        {
            "out_dir": str(out_dir),
            "model": proxy.model,
            "tokenizer": {
                "train_on": [s["stage1"] for s in splits],
                "vocab_size": proxy.tokenizer_vocab_size,
            },
            "data": {
                "sources": sources,
                "eval_fraction": 0.02,
                "eval_sequences": 8,
                "seq_len": proxy.seq_len,
                "batch_size": proxy.batch_size,
                "grad_accum": proxy.grad_accum,
                "cache_dir": str(out_dir.parent.parent / "token_cache"),
            },
            "optim": {"lr": proxy.lr, "weight_decay": proxy.weight_decay},
            "schedule": {
                "warmup_steps": config.stage1.warmup_steps,
                "stable_steps": config.stage1.stable_steps,
                "decay_steps": 0,
            },
            "seed": config.stage1.seed,
            "device": proxy.device,
            "precision": proxy.precision,
            "eval_every": max(1, config.stage1.warmup_steps + config.stage1.stable_steps),
            "save_every": 1000,
            "keep_checkpoints": 1,
            "log_every": 10,
        }
    )


def train_stage1(train_config: TrainConfig) -> dict:
    """Train the warmup + stable phase; what ``Stage1Plan.finish`` records about the run."""
    started = time.perf_counter()
    result = train(train_config)
    return {
        "checkpoint": str(result.checkpoint_dir),
        "steps": result.steps,
        "tokens": result.tokens,
        "final_eval_loss": result.final_eval_loss,
        "seconds": time.perf_counter() - started,
    }


def open_stage1(directory: str | Path, identity: dict) -> Stage1Checkpoint:
    """A finished stage-1 directory, checked against the configured base mix and settings."""
    directory = Path(directory)
    record_path = directory / STAGE1_RECORD
    if not record_path.is_file():
        raise FileNotFoundError(
            f"no stage-1 checkpoint at {directory}: {STAGE1_RECORD} is missing (stage 1 never finished there); "
            "unset stage1.checkpoint to train it under work_dir"
        )
    record = json.loads(record_path.read_text())
    if record["identity"] != identity:
        differs = [part for part in identity if record["identity"].get(part) != identity[part]]
        raise Stage1Mismatch(
            f"stage-1 checkpoint {directory} does not match this config ({', '.join(differs)} changed"
            f"{': the base mix is not the one it was trained on' if 'base_mix' in differs else ''}); "
            "it cannot be reused: point stage1.checkpoint elsewhere or unset it to train a new one"
        )
    checkpoint_dir = directory / record["checkpoint"]
    if not (checkpoint_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"stage-1 record {record_path} names checkpoint {checkpoint_dir}, which is missing; "
            f"delete {directory} to retrain stage 1"
        )
    return Stage1Checkpoint(
        key=record["key"], directory=directory, checkpoint_dir=checkpoint_dir, record=record, trained=False
    )


def find_stage1(config: VerificationConfig) -> Stage1Checkpoint | None:
    """The finished stage-1 checkpoint for this base mix and config (``stage1.checkpoint`` or the cached one), or
    None when it still has to be trained."""
    identity = stage1_identity(config)
    if config.stage1.checkpoint is not None:
        return open_stage1(config.stage1.checkpoint, identity)
    directory = (Path(config.work_dir) / "stage1" / identity_key(identity)).resolve()
    return open_stage1(directory, identity) if (directory / STAGE1_RECORD).is_file() else None


@dataclass(frozen=True)
class Stage1Plan:
    """A stage-1 run to train: its base-mix splits are written; ``train_config`` goes to ``train_stage1`` (run where
    the job schedules it) and ``finish`` records the outcome."""

    key: str
    identity: dict
    directory: Path
    splits: list[dict]
    train_config: TrainConfig

    def finish(self, outcome: dict) -> Stage1Checkpoint:
        """Write ``stage1.json`` last: its presence is what marks the checkpoint finished."""
        outcome = dict(outcome)
        record = {
            "key": self.key,
            "identity": self.identity,
            "base_splits": self.splits,
            "checkpoint": str(Path(outcome.pop("checkpoint")).relative_to(self.directory)),
            **outcome,
        }
        atomic_write_text(self.directory / STAGE1_RECORD, json.dumps(record, indent=2))
        return Stage1Checkpoint(key=self.key, directory=self.directory,
                                checkpoint_dir=self.directory / record["checkpoint"], record=record, trained=True)


def plan_stage1(config: VerificationConfig) -> Stage1Plan:
    identity = stage1_identity(config)
    key = identity_key(identity)
    directory = (Path(config.work_dir) / "stage1" / key).resolve()
    splits = split_base_mix(config, identity)
    return Stage1Plan(key, identity, directory, splits, stage1_train_config(config, splits, directory))
