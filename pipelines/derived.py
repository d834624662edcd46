"""Versions derived from one parent version by one step (score, select): their id, reuse, manifest and card.

A derived version's id hashes its parent, the step's settings and the step's code; its manifest accounts for every
parent row (kept, or dropped with a reason) in the same format as an ingested version.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from core.accounting import Accounting
from core.code_version import code_version
from core.io import atomic_write_text, canonical_json
from core.manifest import PARQUET_LOADING, build_manifest, dataset_card, split_loading
from core.versions import (
    CARD_NAME,
    MANIFEST_NAME,
    SHARD_DIR,
    DatasetVersion,
    compute_version_id,
    new_staging,
    publish,
    published_manifest,
    version_lock,
)
from pipelines.config import UltraCleanConfig
from pipelines.ingest import CARD_DESCRIPTION


@dataclass
class StepResult:
    version_path: Path
    manifest: dict
    reused: bool
    seconds: float


@dataclass(frozen=True)
class DerivedVersion:
    """Where a step's version from ``parent`` goes, and its manifest if it is published already."""

    step: str
    step_config: dict
    code: tuple[str, ...]
    parent: DatasetVersion
    root: Path
    version_id: str

    @classmethod
    def plan(cls, config: UltraCleanConfig, parent: DatasetVersion, step: str, step_config: dict,
             code: tuple[str, ...], output_root: Path | None) -> DerivedVersion:
        root = Path(output_root or config.output.root).resolve()
        version_id = compute_version_id(inputs=cls.inputs_of(parent), config={step: step_config},
                                        code=code_version(*code), parent=parent.version_id)
        return cls(step, step_config, code, parent, root, version_id)

    @staticmethod
    def inputs_of(parent: DatasetVersion) -> list[dict]:
        return [{"version_id": parent.version_id, "rows": parent.manifest["totals"]["rows"]}]

    @contextlib.contextmanager
    def writing(self) -> Iterator[Path | None]:
        """Under this version's lock (a concurrent run of the same step waits, then reuses it): None when the version
        is published already, else a fresh staging directory with ``data/``, removed if the step fails."""
        with version_lock(self.root, self.version_id):
            if published_manifest(self.root, self.version_id) is not None:
                yield None
                return
            staging = new_staging(self.root, self.version_id)
            (staging / SHARD_DIR).mkdir()
            try:
                yield staging
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise

    def reused(self, started: float) -> StepResult | None:
        """The published version, when this step already ran on this parent with these settings."""
        manifest = published_manifest(self.root, self.version_id)
        if manifest is None:
            return None
        return StepResult(self.root / self.version_id, manifest, reused=True, seconds=time.perf_counter() - started)

    def publish(self, staging: Path, config: UltraCleanConfig, schema: pa.Schema, shards: list[dict],
                dropped: Counter, extra: dict) -> tuple[Path, dict]:
        """Write the manifest (failing unless every parent row is accounted for) and the card; publish."""
        records_in = self.parent.manifest["totals"]["rows"]
        accounting = Accounting(records_in=records_in, dropped={self.step: Counter(dropped)})
        manifest = build_manifest(
            version_id=self.version_id, name=config.name, kind=f"ultraclean-{self.step}", parent=self.parent.version_id,
            code_version=code_version(*self.code), inputs=self.inputs_of(self.parent),
            config={self.step: self.step_config}, schema=schema, shards=shards, accounting=accounting,
            stage_order=[self.step], extra=extra,
        )
        atomic_write_text(staging / MANIFEST_NAME, canonical_json(manifest))
        loading = split_loading(manifest["splits"]) if manifest.get("splits") else PARQUET_LOADING
        atomic_write_text(staging / CARD_NAME, dataset_card(manifest, description=CARD_DESCRIPTION, loading=loading))
        return publish(staging, self.root, self.version_id), manifest
