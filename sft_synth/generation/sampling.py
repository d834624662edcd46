"""Per-call sampling settings and the logits -> probabilities transform shared by plain and speculative decoding.

Speculative sampling is lossless with respect to the distribution the target actually samples from, so the
target's probabilities must be the *processed* ones (repetition penalty, temperature, top-k, top-p); the draft is
processed the same way because a draft that matches that distribution is accepted more often.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field


class GenerationSettings(BaseModel):
    """How to sample one batch of generations. temperature == 0 means greedy decoding."""

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


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty (as in Hugging Face): seen tokens' positive logits are divided, negative multiplied.

    logits [..., V] float, seen [..., V] bool (tokens already in the context).
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf; the most likely token always stays."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # A token is dropped when the tokens ranked above it already cover top_p of the mass.
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def logits_to_probs(logits: torch.Tensor, settings: GenerationSettings, seen: torch.Tensor | None = None) -> torch.Tensor:
    """The distribution a token is drawn from: [..., V] logits -> [..., V] float32 probabilities.

    Greedy settings give a one-hot distribution on the argmax, which makes greedy decoding a special case of
    sampling (and greedy verification a special case of speculative sampling).
    """
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, settings.repetition_penalty)
    if settings.greedy:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = filter_top_k_top_p(logits / settings.temperature, settings.top_k, settings.top_p)
    return torch.softmax(logits, dim=-1)


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
