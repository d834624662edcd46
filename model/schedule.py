"""Warmup-stable-decay (WSD) learning rate, as a pure function of the step.

A pure function makes resume exact (the step is the whole scheduler state) and lets the two annealing stages be
two runs: warmup + stable (decay_steps = 0), then decay only (warmup_steps = stable_steps = 0) from its checkpoint.
"""

from __future__ import annotations

import math

DECAY_SHAPES = ("linear", "cosine", "1-sqrt", "exp")


def wsd_lr(
    step: int,
    *,
    max_lr: float,
    warmup_steps: int,
    stable_steps: int,
    decay_steps: int,
    decay_shape: str = "exp",
    min_lr_ratio: float = 0.1,
) -> float:
    """Learning rate used by optimizer step ``step`` (0-based).

    Warmup rises linearly to max_lr, reaching it on its last step; decay ends at max_lr * min_lr_ratio on its last
    step. Shapes: linear, cosine, 1-sqrt, and exp (geometric, MiniCPM's exponential decay). Steps past the end
    stay at the final value.
    """
    if decay_shape not in DECAY_SHAPES:
        raise ValueError(f"decay_shape {decay_shape!r} is not one of {DECAY_SHAPES}")
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step < warmup_steps + stable_steps or decay_steps == 0:
        return max_lr
    progress = min(1.0, (step - warmup_steps - stable_steps + 1) / decay_steps)
    min_lr = max_lr * min_lr_ratio
    if decay_shape == "exp":
        return max_lr * min_lr_ratio**progress
    if decay_shape == "linear":
        fraction = 1.0 - progress
    elif decay_shape == "cosine":
        fraction = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        fraction = 1.0 - math.sqrt(progress)
    return min_lr + (max_lr - min_lr) * fraction
