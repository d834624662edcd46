"""Trainer for the proxy model: AdamW, WSD schedule, gradient accumulation and clipping, exact resume.

One run trains ``warmup_steps + stable_steps + decay_steps`` optimizer steps. A run directory holds
``checkpoints/step-NNNNNN/`` (a Hugging Face-layout model directory plus tokenizer.json and trainer_state.pt),
``checkpoints/latest``, ``loss_log.json`` and ``loss_curve.png``. Started again on the same out_dir, a run resumes
from its latest checkpoint with the optimizer, data position and RNG it had, so the loss trajectory continues
exactly. Annealing stage 2 is a run with ``init_from`` a stage-1 checkpoint and only ``decay_steps``.

    python -m model.train configs/proxy-tiny.yaml [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import Field, field_validator, model_validator
from tqdm import tqdm

from core.config import Strict
from core.figures import save_figure
from core.io import atomic_path, atomic_write_text
from core.versions import point_latest, resolve_latest
from model.data import DataSource, PackedDataset
from model.minicpm import MiniCPMConfig, MiniCPMForCausalLM
from model.schedule import DECAY_SHAPES, wsd_lr
from model.tokenizer import TOKENIZER_NAME, load_tokenizer, train_bpe_tokenizer

TRAINER_STATE_NAME = "trainer_state.pt"
CHECKPOINT_NAME = re.compile(r"step-\d{6}")


class SourceConfig(Strict):
    path: str
    ratio: float = Field(1.0, gt=0)
    text_column: str = "content"

    def to_source(self) -> DataSource:
        return DataSource(path=self.path, ratio=self.ratio, text_column=self.text_column)


class TokenizerConfig(Strict):
    # An existing tokenizer.json (or a directory holding one); otherwise one is trained on train_on into out_dir.
    path: str | None = None
    train_on: list[str] = Field(default_factory=list)
    vocab_size: int = Field(4096, ge=262)


class DataConfig(Strict):
    sources: list[SourceConfig] = Field(min_length=1)
    # Dedicated eval sets; when empty, the last eval_fraction of every train source is held out instead.
    eval_sources: list[SourceConfig] = Field(default_factory=list)
    eval_fraction: float = Field(0.05, ge=0, lt=1)
    eval_sequences: int = Field(64, ge=1)  # per eval source, so periodic evaluation stays cheap
    seq_len: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    grad_accum: int = Field(1, gt=0)
    cache_dir: str | None = None  # token caches; default <out_dir>/token_cache


class OptimConfig(Strict):
    lr: float = Field(gt=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float | None = 1.0


class ScheduleConfig(Strict):
    warmup_steps: int = Field(0, ge=0)
    stable_steps: int = Field(0, ge=0)
    decay_steps: int = Field(0, ge=0)
    decay_shape: Literal[DECAY_SHAPES] = "exp"  # type: ignore[valid-type]
    min_lr_ratio: float = Field(0.1, gt=0, le=1)

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.stable_steps + self.decay_steps


class TrainConfig(Strict):
    out_dir: str
    model: dict[str, Any] | None = None  # MiniCPMConfig fields; vocab_size defaults to the tokenizer's
    init_from: str | None = None  # a checkpoint directory to start from instead of a fresh model
    init_optimizer: bool = False  # also take AdamW moments from init_from's trainer_state.pt
    tokenizer: TokenizerConfig = TokenizerConfig()
    data: DataConfig
    optim: OptimConfig
    schedule: ScheduleConfig
    seed: int = 0
    device: str = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    eval_every: int = Field(100, gt=0)
    save_every: int = Field(500, gt=0)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, gt=0)
    # End this invocation after that step (checkpointed); running again resumes. For preemptible slots.
    stop_at_step: int | None = Field(None, gt=0)

    @field_validator("model")
    @classmethod
    def _valid_model(cls, model: dict[str, Any] | None) -> dict[str, Any] | None:
        if model is not None:
            MiniCPMConfig.from_dict({"vocab_size": 1, **model})
        return model

    @model_validator(mode="after")
    def _one_model_source(self) -> TrainConfig:
        if (self.model is None) == (self.init_from is None):
            raise ValueError(
                "give exactly one of `model` (a fresh model) and `init_from` (a checkpoint directory)"
            )
        if self.init_optimizer and self.init_from is None:
            raise ValueError("init_optimizer needs init_from")
        if self.schedule.total_steps == 0:
            raise ValueError("schedule has no steps: warmup_steps + stable_steps + decay_steps is 0")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        with open(path) as f:
            raw = yaml.safe_load(f)
        try:
            return cls.model_validate(raw)
        except ValueError as e:
            raise ValueError(f"invalid training config {path}:\n{e}") from None


@dataclass
class TrainResult:
    checkpoint_dir: Path  # the last checkpoint: loadable with MiniCPMForCausalLM.from_pretrained
    final_eval_loss: float
    loss_log_path: Path
    steps: int
    tokens: int


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast on devices that support it (auto: CUDA with bf16); fp32 otherwise."""
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "bf16" and device.type == "cuda" and not cuda_bf16:
        raise ValueError(
            f"precision bf16 requested but {torch.cuda.get_device_name(device)} does not support bf16"
        )
    if precision == "bf16" or (precision == "auto" and cuda_bf16):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def param_groups(model: MiniCPMForCausalLM, weight_decay: float) -> list[dict]:
    """muP: hidden matrices learn at lr / width_mult; embeddings and norms at lr, without weight decay."""
    embed = model.model.embed_tokens.weight
    matrices = [p for p in model.parameters() if p.ndim == 2 and p is not embed]
    others = [p for p in model.parameters() if p.ndim != 2 or p is embed]
    return [
        {"params": matrices, "weight_decay": weight_decay, "lr_scale": 1.0 / model.config.width_mult},
        {"params": others, "weight_decay": 0.0, "lr_scale": 1.0},
    ]


@torch.no_grad()
def evaluate(model, batches, *, device: torch.device, precision: str = "auto") -> float:
    """Mean next-token loss over all tokens of the batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for input_ids, labels in batches:
        with autocast_context(device, precision):
            loss = model(input_ids.to(device), labels=labels.to(device)).loss
        total += loss.item() * labels.numel()
        count += labels.numel()
    model.train(was_training)
    if count == 0:
        raise ValueError("evaluation set is empty")
    return total / count


def train(config: TrainConfig | dict | str | Path) -> TrainResult:
    if isinstance(config, (str, Path)):
        config = TrainConfig.from_yaml(config)
    elif isinstance(config, dict):
        config = TrainConfig.model_validate(config)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(config.device)
    torch.manual_seed(config.seed)

    tokenizer = _prepare_tokenizer(config, out_dir)
    model = _build_model(config, tokenizer.get_vocab_size()).to(device).train()
    optimizer = torch.optim.AdamW(
        param_groups(model, config.optim.weight_decay),
        lr=config.optim.lr,
        betas=config.optim.betas,
        eps=config.optim.eps,
    )
    train_data, eval_data = _build_data(config, tokenizer, out_dir)

    def run_eval() -> float:
        return evaluate(
            model,
            eval_data.sequences(config.data.batch_size, config.data.eval_sequences),
            device=device,
            precision=config.precision,
        )

    checkpoints = out_dir / "checkpoints"
    checkpoint_dir = resolve_latest(checkpoints, CHECKPOINT_NAME)
    step, log = _restore(config, checkpoint_dir, model, optimizer, train_data, device)
    total = config.schedule.total_steps
    end = min(total, config.stop_at_step or total)
    tokens_per_step = config.data.batch_size * config.data.grad_accum * config.data.seq_len
    progress = tqdm(total=end, initial=step, desc="train", unit="step", disable=step >= end)
    while step < end:
        lr = _learning_rate(config, step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        loss, grad_norm = _optimizer_step(config, model, optimizer, train_data, device)
        step += 1
        log["train"].append(
            {"step": step, "lr": lr, "loss": loss, "grad_norm": grad_norm, "tokens": step * tokens_per_step}
        )
        progress.update(1)
        if step % config.log_every == 0:
            progress.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
        if step % config.eval_every == 0 or step == total:
            log["eval"].append({"step": step, "loss": run_eval()})
        if step % config.save_every == 0 or step == end:
            checkpoint_dir = _save_checkpoint(
                checkpoints, step, model, optimizer, train_data, log, tokenizer, config, device
            )
            _write_loss_log(out_dir, log)
    progress.close()

    if checkpoint_dir is None:
        raise RuntimeError(
            f"{out_dir}: nothing to train (stop_at_step={config.stop_at_step}) and no checkpoint"
        )
    if not log["eval"] or log["eval"][-1]["step"] != step:
        log["eval"].append({"step": step, "loss": run_eval()})
    _write_loss_log(out_dir, log)
    return TrainResult(
        checkpoint_dir=checkpoint_dir,
        final_eval_loss=log["eval"][-1]["loss"],
        loss_log_path=out_dir / "loss_log.json",
        steps=step,
        tokens=step * tokens_per_step,
    )


def _build_model(config: TrainConfig, tokenizer_vocab: int) -> MiniCPMForCausalLM:
    """A fresh model from config.model, or the init_from checkpoint; either must cover the tokenizer."""
    if config.init_from is not None:
        model = MiniCPMForCausalLM.from_pretrained(config.init_from, dtype=torch.float32)
        source = config.init_from
    else:
        model = MiniCPMForCausalLM(MiniCPMConfig.from_dict({"vocab_size": tokenizer_vocab, **config.model}))
        source = "model"
    if model.config.vocab_size < tokenizer_vocab:
        raise ValueError(f"{source}: vocab_size {model.config.vocab_size} < tokenizer's {tokenizer_vocab}")
    return model


def _build_data(config: TrainConfig, tokenizer, out_dir: Path) -> tuple[PackedDataset, PackedDataset]:
    """The mixed training stream, and the eval set: dedicated eval sources, else each train source's tail."""
    cache_dir = Path(config.data.cache_dir) if config.data.cache_dir else out_dir / "token_cache"
    common = {"tokenizer": tokenizer, "seq_len": config.data.seq_len, "seed": config.seed, "cache_dir": cache_dir}
    train_sources = [s.to_source() for s in config.data.sources]
    train_data = PackedDataset(train_sources, **common, eval_fraction=config.data.eval_fraction)
    if config.data.eval_sources:
        eval_sources = [s.to_source() for s in config.data.eval_sources]
        return train_data, PackedDataset(eval_sources, **common, split="eval", eval_fraction=1.0)
    return train_data, PackedDataset(train_sources, **common, split="eval", eval_fraction=config.data.eval_fraction)


def _restore(config: TrainConfig, checkpoint: Path | None, model, optimizer, train_data: PackedDataset,
             device: torch.device) -> tuple[int, dict]:
    """Resume from this run's latest checkpoint (step, log, weights, optimizer, data position, RNG), else start at
    step 0, taking the optimizer's moments from init_from when asked."""
    if checkpoint is None:
        if config.init_optimizer:
            optimizer.load_state_dict(_load_trainer_state(Path(config.init_from))["optimizer"])
        return 0, {"train": [], "eval": []}
    state = _load_trainer_state(checkpoint)
    model.load_state_dict(MiniCPMForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).state_dict())
    optimizer.load_state_dict(state["optimizer"])
    train_data.load_state_dict(state["data"])
    torch.set_rng_state(state["rng"]["torch"])
    if device.type == "cuda" and state["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"], state["log"]


def _learning_rate(config: TrainConfig, step: int) -> float:
    schedule = config.schedule
    return wsd_lr(
        step,
        max_lr=config.optim.lr,
        warmup_steps=schedule.warmup_steps,
        stable_steps=schedule.stable_steps,
        decay_steps=schedule.decay_steps,
        decay_shape=schedule.decay_shape,
        min_lr_ratio=schedule.min_lr_ratio,
    )


def _optimizer_step(config: TrainConfig, model, optimizer, train_data: PackedDataset,
                    device: torch.device) -> tuple[float, float | None]:
    """One optimizer step over grad_accum micro-batches; returns the step's loss and the pre-clip gradient norm."""
    step_loss = 0.0
    for _ in range(config.data.grad_accum):
        input_ids, labels = train_data.next_batch(config.data.batch_size)
        with autocast_context(device, config.precision):
            loss = model(input_ids.to(device), labels=labels.to(device)).loss / config.data.grad_accum
        loss.backward()
        step_loss += loss.item()
    grad_norm = None
    if config.optim.grad_clip is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip).item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, grad_norm


def _prepare_tokenizer(config: TrainConfig, out_dir: Path):
    if config.tokenizer.path is not None:
        return load_tokenizer(config.tokenizer.path)
    if config.init_from is not None and (Path(config.init_from) / TOKENIZER_NAME).is_file():
        return load_tokenizer(config.init_from)
    own = out_dir / TOKENIZER_NAME
    if own.is_file():
        return load_tokenizer(own)
    if not config.tokenizer.train_on:
        raise ValueError(
            "no tokenizer: set tokenizer.path, init_from a checkpoint with tokenizer.json, or tokenizer.train_on"
        )
    documents = (doc for path in config.tokenizer.train_on for doc in DataSource(path).documents())
    return train_bpe_tokenizer(documents, config.tokenizer.vocab_size, own)


def _load_trainer_state(checkpoint: Path) -> dict:
    state_path = checkpoint / TRAINER_STATE_NAME
    if not state_path.is_file():
        raise FileNotFoundError(f"no {TRAINER_STATE_NAME} in {checkpoint}")
    # CPU first: the RNG state must stay a CPU tensor; optimizer.load_state_dict moves moments to the params.
    # weights_only: the state holds only tensors and plain values, so a crafted file cannot run code when loaded
    try:
        return torch.load(state_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{state_path} holds more than tensors and plain values; refused, since loading it could "
                         f"run code ({str(error).splitlines()[0]})") from None


def _save_checkpoint(checkpoints: Path, step, model, optimizer, data, log, tokenizer, config, device) -> Path:
    """Written into a temp directory and renamed, then ``latest`` moves: a crash never leaves half a checkpoint."""
    final = checkpoints / f"step-{step:06d}"
    if final.exists():  # left by a run that stopped before moving `latest` to it
        shutil.rmtree(final)
    with atomic_path(final, directory=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save(str(tmp / TOKENIZER_NAME))
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "data": data.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
            },
            "log": log,
            "config": config.model_dump(),
        }
        torch.save(state, tmp / TRAINER_STATE_NAME)
    point_latest(checkpoints, final.name)
    for old in sorted(checkpoints.glob("step-*"))[: -config.keep_checkpoints]:
        shutil.rmtree(old)
    return final


def _write_loss_log(out_dir: Path, log: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    atomic_write_text(out_dir / "loss_log.json", json.dumps(log, indent=1))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in log["train"]], [r["loss"] for r in log["train"]], lw=0.8, label="train")
    if log["eval"]:
        ax.plot([r["step"] for r in log["eval"]], [r["loss"] for r in log["eval"]], "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    lr_ax = ax.twinx()
    lr_ax.plot(
        [r["step"] for r in log["train"]], [r["lr"] for r in log["train"]], color="grey", ls="--", lw=0.8
    )
    lr_ax.set_ylabel("learning rate")
    ax.legend()
    save_figure(fig, out_dir / "loss_curve.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", help="training YAML (see configs/proxy-tiny.yaml)")
    parser.add_argument("--out-dir", help="override out_dir")
    args = parser.parse_args()
    config = TrainConfig.from_yaml(args.config)
    if args.out_dir:
        config = config.model_copy(update={"out_dir": args.out_dir})
    result = train(config)
    print(
        json.dumps(
            {
                "checkpoint_dir": str(result.checkpoint_dir),
                "final_eval_loss": result.final_eval_loss,
                "steps": result.steps,
                "tokens": result.tokens,
                "loss_log": str(result.loss_log_path),
            }
        )
    )


if __name__ == "__main__":
    main()
