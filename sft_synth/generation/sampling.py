"""Sampling settings and the logits -> probabilities transform shared by plain and speculative decoding.

Speculative sampling is lossless with respect to the distribution the target actually samples from, so the
target's probabilities must be the *processed* ones (repetition penalty, temperature, top-k, top-p); the draft is
processed the same way because a draft that matches that distribution is accepted more often.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field


class GenerationSettings(BaseModel):
    """How to sample a generation. temperature == 0 means greedy decoding."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 disables top-k filtering")
    repetition_penalty: float = Field(1.0, gt=0.0)
    stop: list[str] = Field(default_factory=list, description="stop strings; the text is cut before them")
    stop_token_ids: list[int] = Field(default_factory=list, description="in addition to the engine's EOS ids")
    ignore_eos: bool = False
    seed: int = 0
    speculative: bool = Field(True, description="use the engine's draft model when it has one")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


SAMPLING_FIELDS = {"temperature": torch.float32, "top_p": torch.float32, "top_k": torch.long,
                   "repetition_penalty": torch.float32}


@dataclass(frozen=True)
class RowSampling:
    """The sampling settings of the rows of a batch, so rows decoded together (a user turn beside an assistant
    turn) each keep their own temperature, nucleus, top-k and repetition penalty. A setting every row shares is a
    number, processed exactly as a single setting is; one that differs is a [B] tensor."""

    temperature: float | torch.Tensor  # 0 = greedy
    top_p: float | torch.Tensor
    top_k: int | torch.Tensor  # 0 = no top-k filter
    repetition_penalty: float | torch.Tensor
    all_greedy: bool
    any_greedy: bool
    penalised: bool

    @classmethod
    def of(cls, settings: Sequence[GenerationSettings], device: torch.device | str = "cpu") -> RowSampling:
        values = {}
        for name, dtype in SAMPLING_FIELDS.items():
            column = [getattr(s, name) for s in settings]
            values[name] = column[0] if len(set(column)) == 1 else torch.tensor(column, dtype=dtype, device=device)
        greedy = [s.greedy for s in settings]
        return cls(**values, all_greedy=all(greedy), any_greedy=any(greedy),
                   penalised=any(s.repetition_penalty != 1.0 for s in settings))


def _per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] broadcasting against like [B, ..., V]."""
    return values.view(-1, *[1] * (like.dim() - 1))


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float | torch.Tensor) -> torch.Tensor:
    """CTRL-style penalty (as in Hugging Face): seen tokens' positive logits are divided, negative multiplied.

    logits [B, ..., V] float, seen [B, ..., V] bool (tokens already in the context); penalty a number or [B].
    """
    if isinstance(penalty, torch.Tensor):
        penalty = _per_row(penalty, logits)
    elif penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int | torch.Tensor, top_p: float | torch.Tensor) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf; the most likely token always stays.
    top_k / top_p are numbers or [B], one per row (top_k 0 and top_p 1 filter nothing)."""
    top_k = torch.as_tensor(top_k, device=logits.device).expand(logits.shape[0])
    rows = (top_k > 0) & (top_k < logits.shape[-1])
    if bool(rows.any()):
        values = torch.topk(logits, int(top_k[rows].max()), dim=-1).values
        index = _per_row(top_k.clamp(1, values.shape[-1]) - 1, values).expand(*values.shape[:-1], 1)
        logits = logits.masked_fill((logits < values.gather(-1, index)) & _per_row(rows, logits), float("-inf"))
    if isinstance(top_p, torch.Tensor):
        # Rows without a nucleus compare against 2, which no mass reaches.
        top_p = _per_row(torch.where(top_p < 1.0, top_p, 2.0), logits) if bool((top_p < 1.0).any()) else 1.0
    if isinstance(top_p, torch.Tensor) or top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # A token is dropped when the tokens ranked above it already cover top_p of the mass.
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def logits_to_probs(logits: torch.Tensor, settings: GenerationSettings | RowSampling,
                    seen: torch.Tensor | None = None) -> torch.Tensor:
    """The distribution a token is drawn from: [B, ..., V] logits -> [B, ..., V] float32 probabilities, under one
    setting for every row or the rows' own (RowSampling).

    Greedy rows get a one-hot distribution on the argmax, which makes greedy decoding a special case of sampling
    (and greedy verification a special case of speculative sampling).
    """
    if isinstance(settings, GenerationSettings):
        settings = RowSampling.of([settings], logits.device)
    logits = logits.float()
    if seen is not None and settings.penalised:
        logits = apply_repetition_penalty(logits, seen, settings.repetition_penalty)
    if settings.all_greedy:
        return _one_hot_argmax(logits)
    temperature = settings.temperature
    if isinstance(temperature, torch.Tensor):
        temperature = _per_row(torch.where(temperature == 0, 1.0, temperature), logits)
    probs = torch.softmax(filter_top_k_top_p(logits / temperature, settings.top_k, settings.top_p), dim=-1)
    if settings.any_greedy:  # some rows greedy, so the temperatures differ: a tensor
        probs = torch.where(_per_row(settings.temperature == 0, probs), _one_hot_argmax(logits), probs)
    return probs


def _one_hot_argmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)


def sample(probs: torch.Tensor, greedy: bool, generator: torch.Generator | None) -> torch.Tensor:
    """Draw one token per row of [N, V] probabilities (need not sum to 1) -> [N] int64. Greedy draws use no randomness.

    Inverse-CDF sampling with one uniform per row over a float64 cumulative sum: exact up to float64 rounding, and
    an order of magnitude cheaper than torch.multinomial for one draw from a large vocabulary (which matters in the
    draft loop). A zero-probability token is never drawn.
    """
    if greedy:
        return probs.argmax(-1)
    cdf = probs.double().cumsum(-1)
    u = torch.rand((probs.shape[0], 1), generator=generator, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    # The first index whose cumulative mass exceeds u; the last column if u rounded up to the total.
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)
