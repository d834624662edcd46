"""The UltraClean job's YAML config: one pydantic model per section, every key checked, errors named by path."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

from core import config as core_config
from core.config import Strict
from stages.classifier import ClassifierConfig
from stages.dedup import DedupConfig
from stages.extract import ExtractConfig
from stages.heuristics import FilterConfig, default_filters
from stages.langid import LangIdConfig
from stages.readers import InputFormat, ReadConfig
from stages.scoring import ScoringConfig
from stages.select import SelectConfig
from verification.config import VerificationConfig

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
Step = Literal["ingest", "verify_seeds", "train_classifier", "score", "select", "verify_output"]
STEP_ORDER: tuple[Step, ...] = ("ingest", "verify_seeds", "train_classifier", "score", "select", "verify_output")


class InputSpec(Strict):
    path: str = Field(description="a file or a glob; relative paths are relative to the config file")
    format: InputFormat | None = Field(None, description="default: from the file name")
    source: str | None = Field(None, description="label for the `source` column; default: the file name")


class OutputConfig(Strict):
    root: str = Field("ultraclean-output", description="dataset root; relative paths are relative to the working dir")
    rows_per_shard: PositiveInt = 100_000
    row_group_rows: PositiveInt = 10_000
    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"
    tokenizer: str | None = Field(None, description="tokenizer.json used for the manifest's token counts")
    keep_work: bool = Field(False, description="keep the per-input intermediate parts after publishing")
    shared_filesystem: bool = Field(
        False, description="local paths (inputs, output root) are on a filesystem every node of the cluster mounts; "
        "without it a job on more than one node refuses local paths"
    )

    def parquet_options(self) -> dict:
        """Writer options shared by every shard and part: fixed, so the same rows give the same bytes."""
        compression = None if self.compression == "none" else self.compression
        return {"compression": compression, "write_statistics": True, "store_schema": False}


class RayConfig(Strict):
    address: str | None = Field(None, description="a running cluster ('auto', 'ray://...'); null starts one in-process")
    num_cpus: PositiveInt | None = Field(None, description="CPUs for an in-process cluster")
    max_retries: NonNegativeInt = Field(3, description="Ray re-runs a task whose worker died this many times")
    scheduling: Literal["default", "spread"] = Field(
        "default", description="'spread' places the tasks across the cluster's nodes instead of packing them"
    )
    resources: dict[str, PositiveFloat] = Field(
        default_factory=dict, description="custom Ray resources every task needs (e.g. to keep them on tagged nodes)"
    )

    def task_options(self) -> dict:
        """Options of every one-CPU task of the jobs: retries, custom resources, placement."""
        return {"num_cpus": 1, "max_retries": self.max_retries, "resources": dict(self.resources),
                "scheduling_strategy": self.scheduling.upper()}


class UltraCleanConfig(Strict):
    name: str = "ultraclean"
    steps: list[Step] = Field(
        default_factory=lambda: ["ingest"], description="what `python -m pipelines.ultraclean run` does, in order"
    )
    inputs: list[InputSpec] = Field(default_factory=list)
    read: ReadConfig = Field(default_factory=ReadConfig)
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    langid: LangIdConfig = Field(default_factory=LangIdConfig)
    filters: list[FilterConfig] = Field(default_factory=default_filters)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    classifier: ClassifierConfig | None = Field(None, description="quality classifier training (train_classifier)")
    scoring: ScoringConfig | None = Field(None, description="scoring a dataset version (score); defaults if absent")
    select: SelectConfig | None = Field(None, description="keeping the high-scoring documents (select)")
    verification: VerificationConfig | None = Field(
        None, description="annealing verification of the positive seed pools (verify_seeds) and of the output"
    )

    @model_validator(mode="after")
    def steps_have_what_they_need(self) -> UltraCleanConfig:
        if len(set(self.steps)) != len(self.steps) or self.steps != sorted(self.steps, key=STEP_ORDER.index):
            raise ValueError(f"steps must be distinct and in pipeline order {list(STEP_ORDER)}, got {self.steps}")
        if "ingest" in self.steps and not self.inputs:
            raise ValueError("inputs: the ingest step needs at least one input")
        if "train_classifier" in self.steps and self.classifier is None:
            raise ValueError("classifier: the train_classifier step needs a classifier section (seed pools)")
        if "select" in self.steps and self.select is None:
            raise ValueError("select: the select step needs a select section (threshold or top_fraction)")
        for step in ("verify_seeds", "verify_output"):
            if step in self.steps and self.verification is None:
                raise ValueError(f"verification: the {step} step needs a verification section (proxy, base mix)")
        if "verify_seeds" in self.steps and self.classifier is None:
            raise ValueError("classifier: verify_seeds verifies the classifier's positive seed sources; add that section")
        if self.scoring is None:
            self.scoring = ScoringConfig()
        return self


def parse_config(data: object, source: str = "<config>") -> UltraCleanConfig:
    return core_config.parse_config(UltraCleanConfig, data, source)


def load_config(path: str | Path | None = None) -> tuple[UltraCleanConfig, Path]:
    """Read and validate a YAML config (default: the embedded one); returns it with its directory."""
    return core_config.load_config(UltraCleanConfig, path or DEFAULT_CONFIG)
