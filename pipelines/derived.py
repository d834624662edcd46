"""Versions derived from one parent version by one step (score, select): their id, reuse, manifest and card.

A derived version's id hashes its parent, the step's settings and the step's code; its manifest accounts for every
parent row (kept, or dropped with a reason) in the same format as an ingested version.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa

from core.accounting import Accounting
from core.code_version import code_version
from core.manifest import PARQUET_LOADING, build_manifest, dataset_card, finish_version, split_loading
from core.storage import AnyPath, remove_tree, resolve_root
from core.versions import DatasetVersion, compute_version_id, entry_dir, published_manifest, version_lock
from pipelines.config import UltraCleanConfig
from pipelines.ingest import CARD_DESCRIPTION


@dataclass
class StepResult:
    version_path: AnyPath
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
    root: AnyPath
    version_id: str

    @classmethod
    def plan(cls, config: UltraCleanConfig, parent: DatasetVersion, step: str, step_config: dict,
             code: tuple[str, ...], output_root: str | os.PathLike | None) -> DerivedVersion:
        root = resolve_root(output_root or config.output.root)
        version_id = compute_version_id(inputs=cls.inputs_of(parent), config={step: step_config},
                                        code=code_version(*code), parent=parent.version_id)
        return cls(step, step_config, code, parent, root, version_id)

    @staticmethod
    def inputs_of(parent: DatasetVersion) -> list[dict]:
        return [{"version_id": parent.version_id, "rows": parent.manifest["totals"]["rows"]}]

    @contextlib.contextmanager
    def writing(self) -> Iterator[AnyPath | None]:
        """Under this version's lock (a concurrent run of the same step waits, then reuses it): None when the version
        is published already, else the version's directory to write shards into, removed if the step fails."""
        with version_lock(self.root, self.version_id):
            if published_manifest(self.root, self.version_id) is not None:
                yield None
                return
            directory = entry_dir(self.root, self.version_id)
            try:
                yield directory
            except BaseException:
                remove_tree(directory)
                raise

    def reused(self, started: float) -> StepResult | None:
        """The published version, when this step already ran on this parent with these settings."""
        manifest = published_manifest(self.root, self.version_id)
        if manifest is None:
            return None
        return StepResult(self.root / self.version_id, manifest, reused=True, seconds=time.perf_counter() - started)

    def publish(self, directory: AnyPath, config: UltraCleanConfig, schema: pa.Schema, shards: list[dict],
                dropped: Counter, extra: dict) -> tuple[AnyPath, dict]:
        """Write the card and the manifest (failing unless every parent row is accounted for); publish."""
        records_in = self.parent.manifest["totals"]["rows"]
        accounting = Accounting(records_in=records_in, dropped={self.step: Counter(dropped)})
        manifest = build_manifest(
            version_id=self.version_id, name=config.name, kind=f"ultraclean-{self.step}", parent=self.parent.version_id,
            code_version=code_version(*self.code), inputs=self.inputs_of(self.parent),
            config={self.step: self.step_config}, schema=schema, shards=shards, accounting=accounting,
            stage_order=[self.step], extra=extra,
        )
        loading = split_loading(manifest["splits"]) if manifest.get("splits") else PARQUET_LOADING
        card = dataset_card(manifest, description=CARD_DESCRIPTION, loading=loading)
        return finish_version(directory, manifest, card), manifest
