"""Evaluation after an anneal: loss on held-out reference text, MMLU accuracy by log-likelihood.

Reference loss is the mean next-token loss over the first ``max_sequences`` windows of a reference set (documents
joined by ``</s>``, as in training), so every run is scored on exactly the same tokens. A multiple-choice item is
scored as lm-eval-harness does for small models: the log-likelihood of each answer text after the question, the
highest wins; length normalisation (mean per token) keeps long answers from losing by length alone.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from model.data import DataSource
from model.minicpm import MiniCPMForCausalLM
from model.tokenizer import eos_id
from model.train import autocast_context
from verification.config import MEAN_REFERENCE_LOSS, MMLU_ACCURACY, EvaluationConfig, MMLUConfig, ReferenceSet

CHOICE_LETTERS = "ABCD"


def reference_documents(reference: ReferenceSet) -> Iterator[str]:
    """A reference set's documents: blank-line paragraphs of a text file, or the ``field`` of JSONL/Parquet rows."""
    yield from DataSource(reference.path, text_column=reference.field).documents()


def reference_windows(reference: ReferenceSet, tokenizer: Tokenizer, seq_len: int) -> torch.Tensor:
    """[N, seq_len + 1] token windows: the reference set's first N * seq_len + 1 tokens, read lazily."""
    needed = reference.max_sequences * seq_len + 1
    separator = eos_id(tokenizer)
    tokens: list[int] = []
    for text in reference_documents(reference):
        tokens.extend(tokenizer.encode(text, add_special_tokens=False).ids)
        tokens.append(separator)
        if len(tokens) >= needed:
            break
    n = min(reference.max_sequences, (len(tokens) - 1) // seq_len)
    if n == 0:
        raise ValueError(
            f"reference set {reference.name} ({reference.path}) has {len(tokens)} tokens: "
            f"not one window of {seq_len} + 1"
        )
    flat = np.asarray(tokens[: n * seq_len + 1], dtype=np.int64)
    starts = np.arange(n) * seq_len
    return torch.from_numpy(np.stack([flat[s : s + seq_len + 1] for s in starts]))


@torch.no_grad()
def sequence_losses(
    model: MiniCPMForCausalLM, windows: torch.Tensor, *, batch_size: int, device: torch.device, precision: str
) -> np.ndarray:
    """Mean next-token loss (nats/token) of each window: the unit that paired comparisons resample."""
    losses = []
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size].to(device)
        with autocast_context(device, precision):
            logits = model(batch[:, :-1]).logits
        per_token = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="none")
        losses.append(per_token.view(len(batch), -1).mean(dim=1).double().cpu().numpy())
    return np.concatenate(losses)


def reference_loss(
    model: MiniCPMForCausalLM, windows: torch.Tensor, *, batch_size: int, device: torch.device, precision: str
) -> float:
    """Mean next-token loss (nats/token) over every predicted token of the windows (all of equal length)."""
    return float(sequence_losses(model, windows, batch_size=batch_size, device=device, precision=precision).mean())


@dataclass(frozen=True)
class ChoiceItem:
    subject: str
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices


def load_mmlu(config: MMLUConfig) -> list[ChoiceItem]:
    """MMLU CSVs (question, A, B, C, D, answer letter; no header), every file under path in sorted order."""
    root = Path(config.path)
    files = sorted(root.rglob("*.csv"))
    if not files:
        raise FileNotFoundError(f"no MMLU CSV files under {root}")
    items: list[ChoiceItem] = []
    for file in files:
        subject = file.stem.removesuffix("_dev").removesuffix("_val").removesuffix("_test")
        with open(file, newline="", encoding="utf-8") as f:
            for row_number, row in enumerate(csv.reader(f), 1):
                if len(row) != 6 or row[5].strip() not in CHOICE_LETTERS:
                    raise ValueError(
                        f"{file}:{row_number}: expected question, A, B, C, D, answer letter; got {row!r}"
                    )
                items.append(
                    ChoiceItem(subject, row[0], tuple(row[1:5]), CHOICE_LETTERS.index(row[5].strip()))
                )
                if config.max_items is not None and len(items) == config.max_items:
                    return items
    return items


def choice_prompt(item: ChoiceItem) -> str:
    return f"Question: {item.question}\nAnswer:"


@torch.no_grad()
def choice_logprobs(
    model: MiniCPMForCausalLM,
    context: list[int],
    continuations: list[list[int]],
    *,
    max_len: int,
    device: torch.device,
    precision: str,
) -> list[tuple[float, int]]:
    """(sum of log p(continuation | context), continuation length) per continuation, in one padded batch.

    The context is cut from the left so context + continuation fits max_len; right padding never changes the
    scores because attention is causal and padded positions are never read.
    """
    rows, spans = [], []
    for continuation in continuations:
        continuation = continuation[-(max_len - 1) :]
        keep = max_len - len(continuation)
        sequence = (context[-keep:] if keep > 0 else []) + continuation
        rows.append(sequence)
        spans.append((len(sequence) - len(continuation), len(sequence)))
    width = max(len(r) for r in rows)
    batch = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        batch[i, : len(row)] = torch.tensor(row)
    batch = batch.to(device)
    with autocast_context(device, precision):
        logits = model(batch).logits
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    scores = []
    for i, (start, end) in enumerate(spans):
        # the token at position t is predicted by the logits at t - 1
        targets = batch[i, start:end]
        picked = logprobs[i, start - 1 : end - 1].gather(-1, targets[:, None]).squeeze(-1)
        scores.append((picked.sum().item(), end - start))
    return scores


def choice_correct(
    model: MiniCPMForCausalLM,
    tokenizer: Tokenizer,
    items: list[ChoiceItem],
    *,
    length_normalized: bool,
    max_len: int,
    device: torch.device,
    precision: str,
) -> np.ndarray:
    """1.0 for each item answered right, else 0.0 (the mean is the accuracy)."""
    correct = []
    for item in items:
        context = tokenizer.encode(choice_prompt(item), add_special_tokens=False).ids
        continuations = [tokenizer.encode(" " + c, add_special_tokens=False).ids or [eos_id(tokenizer)]
                         for c in item.choices]
        scores = choice_logprobs(
            model, context, continuations, max_len=max_len, device=device, precision=precision
        )
        values = [total / n if length_normalized else total for total, n in scores]
        correct.append(float(int(np.argmax(values)) == item.answer))
    return np.array(correct)


class Evaluator:
    """Holds the tokenised reference windows and MMLU items, so many checkpoints are scored on identical inputs."""

    def __init__(self, config: EvaluationConfig, tokenizer: Tokenizer, seq_len: int):
        self.config = config
        self.tokenizer = tokenizer
        self.windows = {ref.name: reference_windows(ref, tokenizer, seq_len) for ref in config.reference_sets}
        self.mmlu = load_mmlu(config.mmlu) if config.mmlu is not None else []

    def evaluate(self, model: MiniCPMForCausalLM, *, device: torch.device, precision: str) -> dict[str, list[float]]:
        """Per metric, its value on every unit: ``loss:<reference set>`` per window, ``mmlu_accuracy`` per item
        (0 or 1). Baseline and candidate runs see the same units in the same order, so they pair up."""
        was_training = model.training
        model.eval()
        units = {
            f"loss:{name}": sequence_losses(
                model, windows, batch_size=self.config.batch_size, device=device, precision=precision
            ).tolist()
            for name, windows in self.windows.items()
        }
        if self.mmlu:
            units[MMLU_ACCURACY] = choice_correct(
                model,
                self.tokenizer,
                self.mmlu,
                length_normalized=self.config.mmlu.length_normalized,
                max_len=model.config.max_position_embeddings,
                device=device,
                precision=precision,
            ).tolist()
        model.train(was_training)
        return units


def summarize(units: dict[str, list[float]]) -> dict[str, float]:
    """Each metric's value (the mean over its units) and ``reference_loss``, the mean over reference sets."""
    metrics = {name: float(np.mean(values)) for name, values in units.items()}
    losses = [value for name, value in metrics.items() if name.startswith("loss:")]
    metrics[MEAN_REFERENCE_LOSS] = float(np.mean(losses))
    return metrics
