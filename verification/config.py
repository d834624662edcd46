"""The verification config: one pydantic model per section, every key checked, errors named by key path.

Relative data paths are relative to the directory the config came from (the config file's, or the UltraClean
config's when verification is a section of it); ``resolve_paths`` turns them absolute once, at load time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PositiveInt, field_validator, model_validator

from core.config import Strict, load_config, parse_config
from model.minicpm import MiniCPMConfig
from model.schedule import DECAY_SHAPES

BASELINE = "baseline"
MEAN_REFERENCE_LOSS = "reference_loss"
MMLU_ACCURACY = "mmlu_accuracy"


class Resources(Strict):
    """What one Ray task (a stage-1 run, or one anneal plus its evaluation) asks the cluster for."""

    num_cpus: float = Field(1, gt=0)
    num_gpus: float = Field(0, ge=0)


class MixSource(Strict):
    path: str = Field(description="a dataset version or root, Parquet file or glob, or a plain-text file")
    ratio: float = Field(1.0, gt=0)
    text_column: str = "content"


class Candidate(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    path: str
    text_column: str = "content"
    resources: Resources | None = Field(None, description="default: anneal.resources")

    @field_validator("name")
    @classmethod
    def _not_baseline(cls, name: str) -> str:
        if name == BASELINE:
            raise ValueError(f"{BASELINE!r} names the base-mix-only anneal; pick another candidate name")
        if name.endswith(".control"):
            raise ValueError(f"{name!r}: names ending in .control are the automatic controls'")
        return name


class ProxyConfig(Strict):
    """The proxy model and the data shape shared by both stages (changing any of it retrains stage 1)."""

    model: dict[str, Any] = Field(description="MiniCPMConfig fields; vocab_size defaults to the tokenizer's")
    tokenizer_vocab_size: int = Field(2048, ge=262, description="BPE trained on the base mix in stage 1")
    seq_len: PositiveInt = 128
    batch_size: PositiveInt = 16
    grad_accum: PositiveInt = 1
    lr: float = Field(0.01, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    device: str = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"

    @field_validator("model")
    @classmethod
    def _valid_model(cls, model: dict[str, Any]) -> dict[str, Any]:
        MiniCPMConfig.from_dict({"vocab_size": 1, **model})
        return model


class Stage1Config(Strict):
    warmup_steps: int = Field(ge=0)
    stable_steps: PositiveInt
    seed: int = 0
    # The anneals must read base-mix text stage 1 never saw, as in the paper; otherwise the baseline anneal repeats
    # data while a candidate brings fresh text, and every candidate, broken ones included, looks good.
    reserve_for_anneal: float = Field(
        0.3, gt=0, lt=1, description="share of each base source's documents held out of stage 1 for the anneals"
    )
    checkpoint: str | None = Field(
        None, description="a finished stage-1 directory to reuse, never retrain (it must match the base mix)"
    )
    resources: Resources = Field(default_factory=Resources)


class AnnealConfig(Strict):
    decay_steps: PositiveInt
    decay_shape: Literal[DECAY_SHAPES] = "exp"  # type: ignore[valid-type]
    min_lr_ratio: float = Field(0.1, gt=0, le=1)
    candidate_ratio: float = Field(0.3, gt=0, lt=1, description="share of anneal sequences from the candidate")
    # 1.0: the candidate must hold enough distinct sequences for its share of the budget (no repetition).
    max_candidate_epochs: float = Field(1.0, gt=0)
    seeds: list[int] = Field([0, 1], min_length=2, description="one anneal per seed; >= 2 so noise is measured")
    resources: Resources = Field(default_factory=Resources)

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct: {seeds}")
        return seeds


class ReferenceSet(Strict):
    """Held-out text whose loss after the anneal is the main signal (ModelTunnel v2's smooth indicator)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    path: str = Field(description="a text file (blank-line documents), JSONL, Parquet file or dataset version")
    field: str = Field("content", description="the text field of JSONL/Parquet rows (GSM8K: answer)")
    max_sequences: PositiveInt = Field(32, description="the first N windows of seq_len tokens are scored")


class MMLUConfig(Strict):
    path: str = Field(description="a directory of MMLU CSVs (question, A, B, C, D, answer), searched recursively")
    max_items: PositiveInt | None = Field(None, description="the first N items in sorted file order")
    length_normalized: bool = Field(True, description="mean log-prob per choice token instead of the sum")


class EvaluationConfig(Strict):
    reference_sets: list[ReferenceSet] = Field(min_length=1)
    mmlu: MMLUConfig | None = None
    batch_size: PositiveInt = 16

    @field_validator("reference_sets")
    @classmethod
    def _unique_names(cls, sets: list[ReferenceSet]) -> list[ReferenceSet]:
        names = [s.name for s in sets]
        if len(set(names)) != len(names):
            raise ValueError(f"reference set names must be unique: {names}")
        return sets


class DecisionConfig(Strict):
    """Verdicts from paired-bootstrap confidence intervals of the improvement (verification/decide.py):
    keep: better than the baseline (interval above zero) and than the candidate's own shuffled control by more than
    min_effect; reject: worse than the baseline, or no better than the control by min_effect; underpowered: else, an
    interval wider than 2 x min_effect; inconclusive: resolved, neither."""

    metric: str = Field(
        MEAN_REFERENCE_LOSS,
        description=f"{MEAN_REFERENCE_LOSS!r} (mean over reference sets), 'loss:<reference set name>', "
        f"or {MMLU_ACCURACY!r}",
    )
    min_effect: float = Field(0.01, gt=0, description="the smallest effect that matters, in the metric's unit")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="of the two-sided bootstrap intervals")
    bootstrap: PositiveInt = Field(2000, ge=200, description="resamples (over seeds, then sequences within a seed)")


class VerificationConfig(Strict):
    work_dir: str = Field("verification-work", description="stage-1 cache, anneal runs and reports (a local path or "
                          "an fsspec URL: then every process works in a local mirror that it syncs with the store)")
    base_mix: list[MixSource] = Field(min_length=1)
    candidates: list[Candidate] = Field(default_factory=list)
    proxy: ProxyConfig
    stage1: Stage1Config
    anneal: AnnealConfig
    evaluation: EvaluationConfig
    decision: DecisionConfig = Field(default_factory=DecisionConfig)

    @model_validator(mode="after")
    def _consistent(self) -> VerificationConfig:
        names = [c.name for c in self.candidates]
        if len(set(names)) != len(names):
            raise ValueError(f"candidate names must be unique: {names}")
        metric = self.decision.metric
        reference_names = [s.name for s in self.evaluation.reference_sets]
        if metric.startswith("loss:"):
            if metric.removeprefix("loss:") not in reference_names:
                raise ValueError(
                    f"decision.metric {metric!r} names no reference set (have: {reference_names})"
                )
        elif metric == MMLU_ACCURACY:
            if self.evaluation.mmlu is None:
                raise ValueError(f"decision.metric {metric!r} needs an evaluation.mmlu section")
        elif metric != MEAN_REFERENCE_LOSS:
            raise ValueError(
                f"decision.metric {metric!r} is not {MEAN_REFERENCE_LOSS!r}, 'loss:<name>' or {MMLU_ACCURACY!r}"
            )
        return self

    def resolve_paths(self, base_dir: str | Path) -> VerificationConfig:
        """A copy with every data path absolute (relative ones taken from base_dir); work_dir is left alone."""
        base = Path(base_dir)

        def absolute(path: str) -> str:
            return str(path if Path(path).is_absolute() else (base / path).resolve())

        data = self.model_dump()
        for entry in data["base_mix"] + data["candidates"] + data["evaluation"]["reference_sets"]:
            entry["path"] = absolute(entry["path"])
        if data["evaluation"]["mmlu"] is not None:
            data["evaluation"]["mmlu"]["path"] = absolute(data["evaluation"]["mmlu"]["path"])
        return VerificationConfig.model_validate(data)


def parse_verification_config(data: object, source: str = "<config>") -> VerificationConfig:
    return parse_config(VerificationConfig, data, source)


def load_verification_config(path: str | Path) -> VerificationConfig:
    """Read, validate and resolve a YAML config; relative data paths are relative to the file."""
    config, base_dir = load_config(VerificationConfig, path)
    return config.resolve_paths(base_dir)
