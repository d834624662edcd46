"""Speculative decoding: verification of drafted tokens and the adaptive draft length.

Verification follows Leviathan et al. (2023) / Chen et al. (2023): drafted token x is accepted with probability
min(1, p(x)/q(x)); at the first rejection the next token is drawn from normalise(max(0, p - q)); when every draft
is accepted a bonus token is drawn from the target's next distribution. The committed tokens are then distributed
exactly as if sampled from the target one by one. Greedy verification accepts while the target's argmax equals
the draft and needs no randomness.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from typing import NamedTuple

import torch

from .sampling import sample


class Verification(NamedTuple):
    """Per row: how many drafted tokens were accepted, and the token the target contributes after them."""

    num_accepted: torch.Tensor  # [B] int64 in [0, k]
    next_token: torch.Tensor  # [B] int64: the correction (if a draft was rejected) or the bonus token


def _leading_true(mask: torch.Tensor) -> torch.Tensor:
    """[B, k] bool -> [B] count of leading True values (accepted prefix length)."""
    return mask.long().cumprod(dim=-1).sum(dim=-1)


def verify_greedy(draft_tokens: torch.Tensor, target_probs: torch.Tensor) -> Verification:
    """draft_tokens [B, k]; target_probs [B, k+1, V] (one-hot or not: only the argmax matters)."""
    target_choice = target_probs.argmax(dim=-1)
    num_accepted = _leading_true(draft_tokens == target_choice[:, :-1])
    next_token = target_choice.gather(1, num_accepted[:, None]).squeeze(1)
    return Verification(num_accepted, next_token)


def verify_sampling(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None,
) -> Verification:
    """Lossless speculative sampling.

    draft_tokens [B, k] sampled from draft_probs [B, k, V]; target_probs [B, k+1, V] are the target's
    distributions at the k drafted positions plus the one after them.
    """
    batch, k = draft_tokens.shape
    p_draft = target_probs[:, :k].gather(2, draft_tokens[..., None]).squeeze(-1)
    q_draft = draft_probs.gather(2, draft_tokens[..., None]).squeeze(-1)
    uniform = torch.rand(batch, k, generator=generator, device=draft_tokens.device)
    # u < p/q written without the division; q(x) > 0 for a sampled x.
    num_accepted = _leading_true(uniform * q_draft < p_draft)

    rows = torch.arange(batch, device=draft_tokens.device)
    p_next = target_probs[rows, num_accepted]
    # After k acceptances the "draft" distribution is zero, so the residual is p itself: the bonus token.
    q_padded = torch.cat([draft_probs, torch.zeros_like(draft_probs[:, :1])], dim=1)
    residual = (p_next - q_padded[rows, num_accepted]).clamp_(min=0.0)
    mass = residual.sum(dim=-1, keepdim=True)
    # A rejection implies p(x) < q(x), hence positive residual mass; rounding can still leave none.
    residual = torch.where(mass > 0, residual / mass.clamp(min=torch.finfo(residual.dtype).tiny), p_next)
    next_token = sample(residual, False, generator)
    return Verification(num_accepted, next_token)


class StepCost:
    """The time of a forward pass by the number of tokens it reads (rows x tokens per row), relative to a one-token
    pass: linear between measured points, with the last segment's slope beyond them; no points: 1 at every size
    (a step bound by reading the weights, as on a GPU at small batches).

    A table rather than a line: on a CPU a pass over a few tokens is bound by reading the weights and a pass over
    many by compute, so the cost per added token falls as the pass grows (the 19.9M benchmark target: 1, 1.9, 3.3,
    4.2 at 1, 8, 32, 48 tokens), and a line through the one-token step overprices verification at batch 8.
    """

    def __init__(self, points: Mapping[int, float] | None = None):
        table = {1: 1.0, **(points or {})}
        if any(n < 1 for n in table) or any(t <= 0 for t in table.values()):
            raise ValueError(f"step costs need token counts >= 1 and positive times, got {dict(points or {})}")
        self.tokens = sorted(table)
        self.times = [float(table[n]) for n in self.tokens]

    def __call__(self, tokens: int) -> float:
        if len(self.tokens) == 1:
            return self.times[0]
        i = min(max(bisect.bisect_right(self.tokens, tokens) - 1, 0), len(self.tokens) - 2)
        (n0, n1), (t0, t1) = self.tokens[i : i + 2], self.times[i : i + 2]
        return max(t0 + (t1 - t0) * (tokens - n0) / (n1 - n0), 0.0)


class DraftLengthController:
    """Chooses the number of drafted tokens k for each step, k = 0 (plain decoding) where speculation does not pay.

    With per-token acceptance rate a, a row drafting k tokens commits (1 - a^(k+1)) / (1 - a) tokens on average
    (each row commits its own share). A step's cost, in one-token target steps, is the target's pass over B (k + 1)
    tokens, target_costs(B (k + 1)), plus k draft steps over B rows, c draft_costs(B) each (c = draft step time /
    target step time). k maximises committed tokens per unit of cost against plain decoding's B / target_costs(B),
    so the more a verified token costs against a plain step the more acceptance speculation needs to pay.
    The rate is a decayed count of accepted drafts over accepted drafts plus rejections, so it follows the text
    being generated; it starts from a weak prior centred on `prior_rate`. A step without drafts measures nothing,
    so after probe_interval of them one step drafts again.
    """

    def __init__(
        self,
        *,
        initial: int,
        minimum: int,
        maximum: int,
        cost_ratio: float,
        adaptive: bool = True,
        decay: float = 0.9,
        prior_rate: float = 0.7,
        prior_weight: float = 2.0,
        target_costs: StepCost | None = None,
        draft_costs: StepCost | None = None,
        probe_interval: int = 16,
    ):
        if not 1 <= minimum <= initial <= maximum:
            raise ValueError(f"need 1 <= minimum ({minimum}) <= initial ({initial}) <= maximum ({maximum})")
        if cost_ratio < 0:
            raise ValueError(f"cost_ratio must be >= 0, got {cost_ratio}")
        self.initial, self.minimum, self.maximum = initial, minimum, maximum
        self.cost_ratio = cost_ratio
        self.target_costs = target_costs or StepCost()
        self.draft_costs = draft_costs or StepCost()
        self.adaptive = adaptive
        self.decay = decay
        self.probe_interval = probe_interval
        self.steps_without_drafts = 0
        self.accepted = prior_rate * prior_weight
        self.rejected = (1.0 - prior_rate) * prior_weight

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def update(self, num_accepted: list[int], num_drafted: int) -> None:
        """Record one verification step: per row, the accepted count out of num_drafted drafts."""
        accepted = float(sum(num_accepted))
        rejected = float(sum(1 for n in num_accepted if n < num_drafted))
        self.accepted = self.decay * self.accepted + accepted
        self.rejected = self.decay * self.rejected + rejected

    def choose(self, batch_size: int) -> int:
        """k for the next step of a batch of batch_size rows."""
        if not self.adaptive:
            return self.initial
        k = self.best_length(self.acceptance_rate, batch_size)
        self.steps_without_drafts = self.steps_without_drafts + 1 if k == 0 else 0
        if self.steps_without_drafts > self.probe_interval:
            self.steps_without_drafts = 0
            return self.best_length(self.acceptance_rate, batch_size, allow_plain=False)
        return k

    def expected_tokens(self, rate: float, k: int) -> float:
        if rate >= 1.0:
            return k + 1.0
        return (1.0 - rate ** (k + 1)) / (1.0 - rate)

    def step_cost(self, batch_size: int, k: int) -> float:
        """A step's time in one-token target steps: the target over batch_size * (k + 1) tokens, k draft steps."""
        return self.target_costs(batch_size * (k + 1)) + k * self.cost_ratio * self.draft_costs(batch_size)

    def speedup(self, rate: float, batch_size: int, k: int) -> float:
        """Expected tokens/s of drafting k per step relative to plain decoding at the same batch size."""
        return self.expected_tokens(rate, k) * self.step_cost(batch_size, 0) / self.step_cost(batch_size, k)

    def best_length(self, rate: float, batch_size: int = 1, allow_plain: bool = True) -> int:
        candidates = ([0] if allow_plain else []) + list(range(self.minimum, self.maximum + 1))
        return max(candidates, key=lambda k: (self.speedup(rate, batch_size, k), -k))
