"""Stage 2: one decay-only run from the stage-1 checkpoint, with or without a candidate, then its evaluation.

A candidate anneal draws ``candidate_ratio`` of its sequences from the candidate and the rest from the base mix in
its own proportions; the baseline anneal draws everything from the base mix. Both take the same steps, batch and
seed, so the token budget and the base-mix order they start from are the same. A finished run keeps its
``metrics.json`` in a directory keyed by everything it depends on, so asking again costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from core.code_version import code_version
from core.io import atomic_write_text, canonical_json
from model.data import DataSource, tokenize_source
from model.minicpm import MiniCPMForCausalLM
from model.tokenizer import load_tokenizer
from model.train import TrainConfig, pick_device, train
from verification.config import BASELINE, Candidate, Resources, VerificationConfig
from verification.evaluate import Evaluator, summarize
from verification.stage1 import Stage1Checkpoint, source_fingerprint

METRICS_NAME = "metrics.json"
# The trainer's own periodic eval on the mix is not what verification scores; keep it to a token amount.
TRAINER_EVAL_FRACTION = 0.02


class CandidateTooSmall(ValueError):
    """A candidate pool with fewer distinct sequences than its share of the anneal draws."""


@dataclass(frozen=True)
class AnnealRun:
    name: str  # a candidate's name, or "baseline"
    seed: int
    candidate: Candidate | None
    resources: Resources

    @classmethod
    def baseline(cls, config: VerificationConfig, seed: int) -> AnnealRun:
        return cls(BASELINE, seed, None, config.anneal.resources)

    @classmethod
    def for_candidate(cls, config: VerificationConfig, candidate: Candidate, seed: int) -> AnnealRun:
        return cls(candidate.name, seed, candidate, candidate.resources or config.anneal.resources)

    def sources(self, config: VerificationConfig, stage1: Stage1Checkpoint) -> list[dict]:
        """The base mix's held-out anneal parts in its proportions, plus the candidate at candidate_ratio."""
        splits = stage1.record["base_splits"]
        total = sum(s["ratio"] for s in splits)
        base_share = 1.0 if self.candidate is None else 1.0 - config.anneal.candidate_ratio
        sources = [{"path": s["anneal"], "ratio": base_share * s["ratio"] / total} for s in splits]
        if self.candidate is not None:
            sources.append(
                {
                    "path": self.candidate.path,
                    "ratio": config.anneal.candidate_ratio,
                    "text_column": self.candidate.text_column,
                }
            )
        return sources

    def directory(self, config: VerificationConfig, stage1: Stage1Checkpoint) -> Path:
        identity = {
            "stage1": stage1.key,
            "candidate": None
            if self.candidate is None
            else source_fingerprint(self.candidate.path, self.candidate.text_column),
            "anneal": config.anneal.model_dump(exclude={"seeds", "resources"}),
            "evaluation": config.evaluation.model_dump(),
            "seed": self.seed,
            "code": code_version("model", "verification.anneal", "verification.evaluate"),
        }
        key = hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:16]
        return Path(config.work_dir).resolve() / "anneal" / f"{self.name}-seed{self.seed}-{key}"

    def train_config(self, config: VerificationConfig, stage1: Stage1Checkpoint, out_dir: Path) -> TrainConfig:
        proxy, anneal = config.proxy, config.anneal
        return TrainConfig.model_validate(
            {
                "out_dir": str(out_dir),
                "init_from": str(stage1.checkpoint_dir),
                "init_optimizer": True,
                "data": {
                    "sources": self.sources(config, stage1),
                    "eval_fraction": TRAINER_EVAL_FRACTION,
                    "eval_sequences": 4,
                    "seq_len": proxy.seq_len,
                    "batch_size": proxy.batch_size,
                    "grad_accum": proxy.grad_accum,
                    "cache_dir": str(Path(config.work_dir).resolve() / "token_cache"),
                },
                "optim": {"lr": proxy.lr, "weight_decay": proxy.weight_decay},
                "schedule": {
                    "warmup_steps": 0,
                    "stable_steps": 0,
                    "decay_steps": anneal.decay_steps,
                    "decay_shape": anneal.decay_shape,
                    "min_lr_ratio": anneal.min_lr_ratio,
                },
                "seed": self.seed,
                "device": proxy.device,
                "precision": proxy.precision,
                "eval_every": anneal.decay_steps,
                "save_every": anneal.decay_steps,
                "keep_checkpoints": 1,
                "log_every": 10,
            }
        )


def candidate_sequences_needed(config: VerificationConfig) -> int:
    """How many sequences one candidate anneal draws from the candidate (the mixer keeps exact proportions)."""
    drawn = config.anneal.decay_steps * config.proxy.batch_size * config.proxy.grad_accum
    return math.ceil(config.anneal.candidate_ratio * drawn)


def check_candidate_size(config: VerificationConfig, candidate: Candidate, stage1: Stage1Checkpoint) -> int:
    """Tokenise the candidate (into the shared token cache the anneals read) and fail clearly if it is too small
    for its share of the budget without repeating more than anneal.max_candidate_epochs. Returns its tokens."""
    tokenizer = load_tokenizer(stage1.checkpoint_dir)
    cache_dir = Path(config.work_dir).resolve() / "token_cache"
    source = DataSource(candidate.path, text_column=candidate.text_column)
    tokens = len(tokenize_source(source, tokenizer, cache_dir))
    seq_len = config.proxy.seq_len
    windows = (tokens - 1) // seq_len
    train_windows = windows - math.ceil(windows * TRAINER_EVAL_FRACTION)
    needed = candidate_sequences_needed(config)
    epochs = config.anneal.max_candidate_epochs
    if train_windows * epochs < needed:
        raise CandidateTooSmall(
            f"candidate {candidate.name} ({candidate.path}) is too small for the anneal: it has {tokens} tokens "
            f"({train_windows} training sequences of {seq_len}), and the anneal draws {needed} sequences from it "
            f"(candidate_ratio {config.anneal.candidate_ratio} x {config.anneal.decay_steps} steps x "
            f"{config.proxy.batch_size * config.proxy.grad_accum} sequences) with at most {epochs} epoch(s); "
            f"give it at least {math.ceil(needed / epochs) * seq_len + 1} tokens, or lower anneal.decay_steps, "
            "anneal.candidate_ratio, or raise anneal.max_candidate_epochs"
        )
    return tokens


def run_anneal(run: AnnealRun, config: VerificationConfig, stage1: Stage1Checkpoint) -> dict:
    """Train the decay phase, evaluate the final checkpoint, record both; reuse a finished record."""
    out_dir = run.directory(config, stage1)
    metrics_path = out_dir / METRICS_NAME
    if metrics_path.is_file():
        return json.loads(metrics_path.read_text())
    started = time.perf_counter()
    result = train(run.train_config(config, stage1, out_dir))
    train_seconds = time.perf_counter() - started
    device = pick_device(config.proxy.device)
    model = MiniCPMForCausalLM.from_pretrained(result.checkpoint_dir, dtype=torch.float32, device=device)
    evaluator = Evaluator(config.evaluation, load_tokenizer(result.checkpoint_dir), config.proxy.seq_len)
    units = evaluator.evaluate(model, device=device, precision=config.proxy.precision)
    log = json.loads(result.loss_log_path.read_text())
    record = {
        "name": run.name,
        "seed": run.seed,
        "directory": str(out_dir),
        "checkpoint": str(result.checkpoint_dir),
        "tokens": result.tokens,
        "metrics": summarize(units),
        "units": units,
        "curve": [{"step": r["step"], "loss": r["loss"], "lr": r["lr"]} for r in log["train"]],
        "train_seconds": train_seconds,
        "seconds": time.perf_counter() - started,
    }
    atomic_write_text(metrics_path, json.dumps(record, indent=1))
    return record
