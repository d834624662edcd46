"""Sampling transforms, speculative verification math, adaptive draft length and the chat template.

The statistical tests compare speculative sampling against explicit categorical distributions: the independent
reference for the min(1, p/q) / residual / bonus rules.
"""

import math

import pytest
import torch
from pydantic import ValidationError

from sft_synth.generation import (
    DraftLengthController,
    GenerationSettings,
    SpeculativeConfig,
    StepCost,
    apply_chat_template,
    verify_greedy,
    verify_sampling,
)
from sft_synth.generation.sampling import (
    RowSampling,
    apply_repetition_penalty,
    filter_top_k_top_p,
    logits_to_probs,
    sample,
)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors: a parallel region costs more than it saves, and on a busy machine its threads stall."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Upper 0.1% point of the chi-square distribution (Wilson-Hilferty); a correct sampler exceeds it 1 time in 1000.
def chi_square_critical(dof: int, z: float = 3.0902) -> float:
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a zero-probability outcome was sampled"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()), int(keep.sum()) - 1


def test_repetition_penalty_hand_computed():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert torch.equal(out, torch.tensor([[1.0, -4.0, 1.0, 0.5]]))


def test_top_k_and_top_p_filter_hand_computed():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept_k = torch.isfinite(filter_top_k_top_p(logits, top_k=2, top_p=1.0))
    assert kept_k.tolist() == [[True, True, False, False, False]]
    # Mass before each token in rank order: 0, .5, .7, .85, .95 -> top_p=0.8 keeps the first three.
    kept_p = torch.isfinite(filter_top_k_top_p(logits, top_k=0, top_p=0.8))
    assert kept_p.tolist() == [[True, True, True, False, False]]
    # The most likely token survives even a tiny top_p.
    assert torch.isfinite(filter_top_k_top_p(logits, top_k=0, top_p=1e-6)).tolist() == [[True] + [False] * 4]


def test_logits_to_probs_temperature_and_greedy():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    probs = logits_to_probs(logits, GenerationSettings(temperature=0.5))
    assert torch.allclose(probs, torch.softmax(logits / 0.5, dim=-1))
    assert logits_to_probs(logits, GenerationSettings(temperature=0.0)).tolist() == [[0.0, 0.0, 1.0]]


def test_rows_with_their_own_settings_are_processed_as_if_alone():
    """A batch mixing greedy and sampled rows, nuclei, top-k and penalties: each row's distribution is exactly the
    one its own settings give it alone (and a uniform batch keeps the single-setting path)."""
    settings = [
        GenerationSettings(temperature=0.7, top_p=0.9),
        GenerationSettings(temperature=0.0, repetition_penalty=1.3),
        GenerationSettings(temperature=0.9, top_k=7, repetition_penalty=1.2),
        GenerationSettings(temperature=1.0),
    ]
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 500, generator=generator) * 3
    seen = torch.rand(4, 3, 500, generator=generator) < 0.05
    mixed = logits_to_probs(logits, RowSampling.of(settings), seen)
    for row, row_settings in enumerate(settings):
        alone = logits_to_probs(logits[row : row + 1], row_settings, seen[row : row + 1])[0]
        assert torch.equal(mixed[row], alone)
    assert mixed[1].max(-1).values.tolist() == [1.0] * 3  # the greedy row is one-hot
    assert torch.isfinite(torch.log(mixed[2])).sum(-1).tolist() == [7] * 3  # top-k 7 on that row only
    uniform = RowSampling.of([settings[0]] * 3)
    assert uniform.temperature == 0.7 and not uniform.any_greedy and not uniform.penalised


def test_settings_reject_unknown_and_invalid_fields():
    with pytest.raises(ValidationError, match="extra"):
        GenerationSettings(max_tokens=3)
    with pytest.raises(ValidationError):
        GenerationSettings(top_p=0.0)


def test_verify_greedy_hand_computed():
    drafts = torch.tensor([[1, 2, 3], [4, 4, 4], [0, 1, 2]])
    target_choice = torch.tensor([[1, 2, 0, 4], [0, 1, 1, 1], [0, 1, 2, 3]])
    target_probs = torch.nn.functional.one_hot(target_choice, 5).float()
    accepted, next_token = verify_greedy(drafts, target_probs)
    assert accepted.tolist() == [2, 0, 3]
    assert next_token.tolist() == [0, 0, 3]  # correction, correction, bonus


@pytest.mark.parametrize("case", ["overlapping", "disjoint_support", "draft_equals_target"])
def test_speculative_sampling_first_token_matches_target(case):
    """One draft token: the committed token (accepted draft or correction) must be distributed as p."""
    p = torch.tensor([0.05, 0.4, 0.25, 0.2, 0.1, 0.0])
    q = {
        "overlapping": torch.tensor([0.3, 0.1, 0.1, 0.2, 0.1, 0.2]),
        "disjoint_support": torch.tensor([0.0, 0.0, 0.0, 0.0, 0.5, 0.5]),
        "draft_equals_target": p.clone(),
    }[case]
    n = 200_000
    generator = torch.Generator().manual_seed(1234)
    drafts = torch.multinomial(q, n, replacement=True, generator=generator)[:, None]
    target_probs = torch.stack([p, torch.full_like(p, 1 / 6)])[None].expand(n, 2, 6)
    accepted, next_token = verify_sampling(drafts, q[None, None].expand(n, 1, 6), target_probs, generator)
    first = torch.where(accepted == 1, drafts[:, 0], next_token)
    stat, dof = chi_square(torch.bincount(first, minlength=6).double(), p.double())
    assert stat < chi_square_critical(dof), (case, stat)
    # The acceptance rate of speculative sampling is sum(min(p, q)).
    assert abs(accepted.double().mean() - torch.minimum(p, q).sum()) < 0.005


def test_speculative_sampling_bonus_and_second_position():
    """Two drafts with position-dependent p and q: the joint of the first two committed tokens is p1 x p2."""
    p1, p2 = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.2, 0.2, 0.6])
    q1, q2 = torch.tensor([0.4, 0.4, 0.2]), torch.tensor([0.5, 0.1, 0.4])
    bonus = torch.tensor([1.0, 0.0, 0.0])
    n = 200_000
    generator = torch.Generator().manual_seed(7)
    d1 = torch.multinomial(q1, n, replacement=True, generator=generator)
    d2 = torch.multinomial(q2, n, replacement=True, generator=generator)
    drafts = torch.stack([d1, d2], dim=1)
    # p2 does not depend on the first token here, so the target's distributions are the same for every row.
    target_probs = torch.stack([p1, p2, bonus])[None].expand(n, 3, 3)
    accepted, next_token = verify_sampling(drafts, torch.stack([q1, q2])[None].expand(n, 2, 3), target_probs, generator)
    assert (next_token[accepted == 2] == 0).all()  # all accepted: the bonus comes from the third distribution
    keep = accepted >= 1  # rows that committed two tokens from these distributions
    second = torch.where(accepted[keep] == 2, drafts[keep, 1], next_token[keep])
    first = drafts[keep, 0]
    joint = torch.bincount(first * 3 + second, minlength=9).double()
    # Conditioned on the first draft being accepted, the first token is distributed as min(p1, q1) normalised.
    accepted_first = torch.minimum(p1, q1) / torch.minimum(p1, q1).sum()
    stat, dof = chi_square(joint, torch.outer(accepted_first, p2).flatten().double())
    assert stat < chi_square_critical(dof), stat


def test_draft_length_controller_follows_acceptance():
    controller = DraftLengthController(initial=4, minimum=1, maximum=8, cost_ratio=0.1)
    # Expected tokens per step: (1 - a^(k+1)) / (1 - a); a = 0.5, k = 2 -> 1.75.
    assert controller.expected_tokens(0.5, 2) == pytest.approx(1.75)
    for _ in range(30):
        controller.update([8, 8], 8)  # every draft accepted
    assert controller.choose(2) == 8 and controller.acceptance_rate > 0.99
    for _ in range(60):
        controller.update([0, 0], 8)  # every draft rejected: a step of k drafts costs more and commits 1 token
    assert controller.choose(2) == 0 and controller.acceptance_rate < 0.05
    fixed = DraftLengthController(initial=3, minimum=1, maximum=8, cost_ratio=0.1, adaptive=False)
    fixed.update([0], 3)
    assert fixed.choose(8) == 3


def test_draft_length_controller_weighs_draft_cost():
    # At a = 0.8 the best k shrinks as the draft gets more expensive relative to the target.
    cheap = DraftLengthController(initial=1, minimum=1, maximum=10, cost_ratio=0.02).best_length(0.8)
    costly = DraftLengthController(initial=1, minimum=1, maximum=10, cost_ratio=0.5).best_length(0.8)
    assert cheap > costly >= 1


def test_step_cost_interpolates_measured_points():
    flat = StepCost()
    assert flat(1) == flat(64) == 1.0
    curve = StepCost({8: 2.0, 24: 3.0})  # (1, 1.0) is implied
    assert curve(1) == 1.0 and curve(8) == 2.0 and curve(16) == pytest.approx(2.5)
    assert curve(4) == pytest.approx(1 + 3 / 7)  # between 1 and 8 tokens
    assert curve(40) == pytest.approx(4.0)  # beyond the last point, its segment's slope (1 / 16 per token)
    with pytest.raises(ValueError, match="token counts >= 1"):
        StepCost({0: 1.0})
    with pytest.raises(ValueError, match="step costs"):
        SpeculativeConfig(target_step_costs={8: -1.0})


def test_draft_length_controller_weighs_verification_cost():
    # Where scoring k + 1 tokens costs more than one (a CPU past its compute bound), fewer drafts pay.
    free = DraftLengthController(initial=1, minimum=1, maximum=10, cost_ratio=0.05).best_length(0.8)
    costly = DraftLengthController(initial=1, minimum=1, maximum=10, cost_ratio=0.05,
                                   target_costs=StepCost({2: 1.3}))
    assert free > costly.best_length(0.8) >= 1
    with pytest.raises(ValueError, match="cost_ratio"):
        DraftLengthController(initial=1, minimum=1, maximum=2, cost_ratio=-0.1)


def test_draft_length_controller_hand_computed_costs_and_batch_size():
    # A CPU-like target: a pass costs 1 + 0.05 per extra token up to 8 tokens, then 0.02 per token.
    controller = DraftLengthController(initial=2, minimum=1, maximum=8, cost_ratio=0.1,
                                       target_costs=StepCost({8: 1.35, 48: 2.15}), draft_costs=StepCost({8: 1.14}))
    # Batch 8, k = 3: the target reads 32 tokens, 1.35 + 0.02 * 24 = 1.83; three draft steps over 8 rows,
    # 3 * 0.1 * 1.14 = 0.342; plain decoding reads 8 tokens, 1.35.
    assert controller.step_cost(8, 3) == pytest.approx(2.172)
    assert controller.step_cost(8, 0) == pytest.approx(1.35)
    # a = 0.8, k = 3 commits 1 + .8 + .64 + .512 = 2.952 tokens per row: 2.952 * 1.35 / 2.172 against plain.
    assert controller.speedup(0.8, 8, 3) == pytest.approx(2.952 * 1.35 / 2.172)
    # The larger the batch, the more a verified token costs against a plain step: k shrinks, then speculation stops.
    lengths = [controller.best_length(0.8, batch) for batch in (1, 8, 64, 512)]
    assert lengths == sorted(lengths, reverse=True) and lengths[0] > lengths[1] and lengths[-1] == 0
    # Whatever k it picks, the model never expects speculation to lose against plain decoding.
    for rate in (0.0, 0.3, 0.6, 0.9):
        for batch in (1, 4, 16, 64):
            k = controller.best_length(rate, batch)
            assert k == 0 or controller.speedup(rate, batch, k) > 1.0


def test_draft_length_controller_probes_after_steps_without_drafts():
    controller = DraftLengthController(initial=2, minimum=1, maximum=4, cost_ratio=0.5, probe_interval=3)
    for _ in range(20):
        controller.update([0], 2)
    choices = [controller.choose(1) for _ in range(8)]
    assert choices == [0, 0, 0, 1, 0, 0, 0, 1]


def test_sample_draws_from_the_distribution():
    """Inverse-CDF sampling: rows follow their own (unnormalised) probabilities; zero-probability tokens never."""
    p = torch.tensor([[0.0, 0.5, 0.0, 0.25, 0.25, 0.0], [0.3, 0.0, 0.1, 0.0, 0.0, 0.2]])
    n = 100_000
    draws = sample(p.repeat_interleave(n, 0), False, torch.Generator().manual_seed(3)).view(2, n)
    for row, probs in zip(draws, p):
        stat, dof = chi_square(torch.bincount(row, minlength=6).double(), (probs / probs.sum()).double())
        assert stat < chi_square_critical(dof), stat
    assert sample(p, True, None).tolist() == [1, 0]


def test_chat_template_minicpm_format():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert apply_chat_template(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert apply_chat_template(messages[1:], add_generation_prompt=False) == "<|im_start|>user\nHi<|im_end|>\n"
    with pytest.raises(ValueError, match="role"):
        apply_chat_template([{"role": "robot", "content": "x"}])
