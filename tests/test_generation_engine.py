"""The generation engine on real (tiny, random-weight) MiniCPM models and on an explicit bigram model.

Exactness: greedy speculative decoding (with and without FR-Spec, batched with padding) reproduces plain greedy
decoding token for token; a cropped KV cache continues exactly like a fresh one. Distribution: speculative
sampling through the whole engine reproduces the target's sequence distribution, computed exactly for a bigram
model whose next-token table is known.
"""

import copy
import itertools
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from model.minicpm import MiniCPMConfig, MiniCPMForCausalLM
from model.tokenizer import train_bpe_tokenizer
from sft_synth.generation import (
    GenerationEngine,
    GenerationSettings,
    Request,
    SpeculativeConfig,
    TokenFrequencies,
)
from sft_synth.generation.frspec import tokenizer_fingerprint
from sft_synth.generation.prefix_cache import BLOCK_TOKENS, PrefixCache


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors: a parallel region costs more than it saves, and on a busy machine its threads stall."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
SHAKESPEARE = DATA / "text" / "tinyshakespeare.txt"
PROMPTS = ["ROMEO:", "To be, or not to be", [{"role": "user", "content": "Speak, friend."}], "A"]
GREEDY = GenerationSettings(max_new_tokens=24, temperature=0.0, ignore_eos=True)


def tiny_model(vocab_size: int, hidden: int, layers: int, seed: int) -> MiniCPMForCausalLM:
    torch.manual_seed(seed)
    # A wide initialisation makes random logits peaked, so greedy choices are far from ties.
    config = MiniCPMConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.5,
    )
    return MiniCPMForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    text = SHAKESPEARE.read_text(encoding="utf-8")[:100_000]
    return train_bpe_tokenizer([text], 400, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def models(tokenizer):
    vocab = tokenizer.get_vocab_size()
    target = tiny_model(vocab, 64, 2, seed=0)
    # A perturbed copy of the target agrees with it often but not always: both accept and reject paths run.
    close_draft = copy.deepcopy(target)
    with torch.no_grad():
        for p in close_draft.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return SimpleNamespace(target=target, close_draft=close_draft, small_draft=tiny_model(vocab, 32, 1, seed=1))


@pytest.fixture(scope="module")
def frequencies(tokenizer):
    return TokenFrequencies.count(SHAKESPEARE, tokenizer)


@pytest.fixture(scope="module")
def plain_greedy(models, tokenizer):
    return GenerationEngine(models.target, tokenizer).generate(PROMPTS, GREEDY)


def test_batched_plain_decoding_matches_one_prompt_at_a_time(models, tokenizer, plain_greedy):
    engine = GenerationEngine(models.target, tokenizer)
    for prompt, batched in zip(PROMPTS, plain_greedy):
        assert engine.generate([prompt], GREEDY)[0].token_ids == batched.token_ids
    # And against a cache-free reference: argmax of a full forward pass over the whole sequence each step.
    ids = list(plain_greedy[0].prompt_token_ids)
    for _ in range(GREEDY.max_new_tokens):
        ids.append(int(models.target(torch.tensor([ids])).logits[0, -1].argmax()))
    assert ids[len(plain_greedy[0].prompt_token_ids) :] == plain_greedy[0].token_ids


@pytest.mark.parametrize("draft_name", ["close_draft", "small_draft"])
@pytest.mark.parametrize("use_frspec", [False, True])
def test_greedy_speculative_equals_plain_greedy(models, tokenizer, frequencies, plain_greedy, draft_name, use_frspec):
    engine = GenerationEngine(
        models.target, tokenizer, getattr(models, draft_name),
        frspec_frequencies=frequencies if use_frspec else None,
        speculative=SpeculativeConfig(num_draft_tokens=3, max_draft_tokens=5, draft_cost_ratio=0.1),
    )
    results = engine.generate(PROMPTS, GREEDY)
    for plain, speculative in zip(plain_greedy, results):
        assert speculative.token_ids == plain.token_ids
        assert speculative.text == plain.text
        stats = speculative.stats
        assert sum(stats.accepted_lengths) == GREEDY.max_new_tokens
        assert stats.target_steps == len(stats.accepted_lengths) <= GREEDY.max_new_tokens
    if draft_name == "close_draft":  # the near-copy's drafts are accepted, so acceptances are verified too
        assert all(r.stats.accepted_drafts > 0 for r in results)
        alone = engine.generate(PROMPTS[:1], GREEDY)[0]
        assert alone.token_ids == plain_greedy[0].token_ids
        assert alone.stats.target_steps < GREEDY.max_new_tokens


# Prompts of 2 to 40 tokens: rows of one batch differ in length from the start.
UNEVEN_PROMPTS = [
    " ".join(SHAKESPEARE.read_text(encoding="utf-8")[2000 * i : 2000 * i + 400].split()[: 2 + 5 * i]) for i in range(9)
]


@pytest.fixture(scope="module")
def uneven_settings(models, tokenizer):
    """Greedy, stopping at a token the target emits often, so the generations end at different lengths."""
    engine = GenerationEngine(models.target, tokenizer)
    outputs = [engine.generate([p], GREEDY)[0].token_ids for p in UNEVEN_PROMPTS]
    counts = torch.bincount(torch.tensor([t for ids in outputs for t in ids[4:]]))
    return GREEDY.model_copy(update={"max_new_tokens": 32, "stop_token_ids": [int(counts.argmax())]})


@pytest.fixture(scope="module")
def uneven_alone(models, tokenizer, uneven_settings):
    engine = GenerationEngine(models.target, tokenizer)
    return [engine.generate([p], uneven_settings)[0] for p in UNEVEN_PROMPTS]


def decode_batch_sizes(engine: GenerationEngine) -> list[int]:
    """Record the batch size of every decoding step of the engine's target (the passes that need logits; a prefill
    only fills a cache)."""
    sizes: list[int] = []
    forward = engine._forward

    def recording(model, tokens, *args, last, **kwargs):
        if model is engine.target and last:
            sizes.append(tokens.shape[0])
        return forward(model, tokens, *args, last=last, **kwargs)

    engine._forward = recording
    return sizes


@pytest.mark.parametrize("batch_size", [1, 3, 8])
@pytest.mark.parametrize("draft_name", [None, "close_draft", "small_draft"])
def test_batches_of_uneven_rows_equal_each_prompt_alone(models, tokenizer, frequencies, uneven_settings, uneven_alone,
                                                        batch_size, draft_name):
    """Ragged speculation and continuous batching change nothing in any row's greedy output."""
    lengths = [len(g.token_ids) for g in uneven_alone]
    assert len(set(lengths)) > 3 and min(lengths) < uneven_settings.max_new_tokens  # the rows do end unevenly
    draft = getattr(models, draft_name) if draft_name else None
    engine = GenerationEngine(
        models.target, tokenizer, draft, frspec_frequencies=frequencies if draft_name == "small_draft" else None,
        max_batch_size=batch_size,
        speculative=SpeculativeConfig(num_draft_tokens=3, max_draft_tokens=5, draft_cost_ratio=0.1),
    )
    sizes = decode_batch_sizes(engine)
    results = engine.generate(UNEVEN_PROMPTS, uneven_settings)
    for alone, batched in zip(uneven_alone, results):
        assert batched.token_ids == alone.token_ids
        assert batched.text == alone.text and batched.finish_reason == alone.finish_reason
    # Continuous batching: a freed slot takes the next prompt at once, so the batch only shrinks once none waits.
    assert sizes[0] == batch_size and all(a >= b for a, b in itertools.pairwise(sizes))
    if draft_name == "close_draft":
        steps = [r.stats.target_steps for r in results]
        assert sum(steps) < sum(lengths)
        # Ragged: rows of one step commit different numbers of tokens (a shared cut would make them all equal).
        # The first batch_size rows start together, so their j-th steps are the same step while both run.
        first = [r.stats.accepted_lengths for r in results[:batch_size]]
        per_step = [{lengths[j] for lengths in first if j < len(lengths)} for j in range(max(map(len, first)))]
        assert batch_size == 1 or max(map(len, per_step)) > 1


def test_static_batches_keep_finished_rows_until_the_batch_ends(models, tokenizer, uneven_settings, uneven_alone):
    """The static baseline decodes as Hugging Face's generate: each batch of 3 runs, all 3 rows wide, until its
    longest row ends (one target step per token of that row); continuous batching takes fewer steps, same outputs."""
    engine = GenerationEngine(models.target, tokenizer, max_batch_size=3, continuous_batching=False)
    sizes = decode_batch_sizes(engine)
    static = engine.generate(UNEVEN_PROMPTS, uneven_settings)
    static_sizes = list(sizes)
    engine.continuous_batching = True
    continuous = engine.generate(UNEVEN_PROMPTS, uneven_settings)
    lengths = [len(g.token_ids) for g in uneven_alone]
    expected = [size for begin in range(0, len(lengths), 3)
                for size in [len(lengths[begin : begin + 3])] * max(lengths[begin : begin + 3])]
    assert static_sizes == expected
    assert len(sizes) - len(static_sizes) < len(static_sizes)
    for alone, a, b in zip(uneven_alone, static, continuous):
        assert a.token_ids == b.token_ids == alone.token_ids and a.text == alone.text
        assert a.stats.target_steps == len(alone.token_ids)


@pytest.mark.skipif(shutil.which("c++") is None, reason="torch.compile on a CPU builds its kernels with a C++ compiler")
def test_compiled_decoding_steps_give_the_eager_outputs(models, tokenizer, frequencies, uneven_settings, uneven_alone):
    """torch_compile=True: the draft's and the target's decoding steps run as whole compiled graphs (no graph
    break, no fallback to eager), a handful of them, and every row of speculative FR-Spec decoding through 3 slots
    still equals plain eager decoding of its prompt alone."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    engine = GenerationEngine(
        models.target, tokenizer, models.small_draft, frspec_frequencies=frequencies, max_batch_size=3,
        speculative=SpeculativeConfig(num_draft_tokens=3, max_draft_tokens=5, draft_cost_ratio=0.1),
        torch_compile=True,
    )
    results = engine.generate(UNEVEN_PROMPTS, uneven_settings)
    assert [r.token_ids for r in results] == [a.token_ids for a in uneven_alone]
    # Every compiled frame is one whole graph (a graph break would split it, a fallback would leave it uncounted),
    # at most one per model for one new token and for several, for one row and for more.
    frames = counters["frames"]
    assert not counters["graph_break"] and frames["ok"] == frames["total"] == counters["stats"]["unique_graphs"]
    assert 4 <= frames["ok"] <= 8
    graphs = frames["total"]
    engine.generate(UNEVEN_PROMPTS[:2], uneven_settings)  # the same kinds of step again: no new graph
    assert frames["total"] == graphs


def own_settings(uneven_settings: GenerationSettings) -> list[GenerationSettings]:
    """Per prompt, greedy settings of its own (length, stop rule, repetition penalty, speculation on or off) or
    sampling at T=0.9."""
    variants = [
        uneven_settings,
        uneven_settings.model_copy(update={"max_new_tokens": 7}),
        uneven_settings.model_copy(update={"repetition_penalty": 1.3}),
        uneven_settings.model_copy(update={"speculative": False}),
        uneven_settings.model_copy(update={"stop_token_ids": [], "max_new_tokens": 20}),
        uneven_settings.model_copy(update={"temperature": 0.9, "top_p": 0.9, "repetition_penalty": 1.1}),
    ]
    return [variants[i % len(variants)] for i in range(len(UNEVEN_PROMPTS))]


@pytest.mark.parametrize("draft_name", [None, "close_draft"])
def test_rows_with_their_own_settings_decode_as_if_alone(models, tokenizer, uneven_settings, draft_name):
    """One batch mixes greedy rows of different lengths, stop rules and penalties with sampled rows (so drafts are
    verified by speculative sampling, greedy rows through their one-hot distributions): every greedy row equals
    its prompt decoded alone, and a row that asked for plain decoding commits no drafts."""
    settings = own_settings(uneven_settings)
    alone_engine = GenerationEngine(models.target, tokenizer)
    alone = [alone_engine.generate([p], s)[0] for p, s in zip(UNEVEN_PROMPTS, settings)]
    draft = getattr(models, draft_name) if draft_name else None
    engine = GenerationEngine(models.target, tokenizer, draft, max_batch_size=4,
                              speculative=SpeculativeConfig(num_draft_tokens=3, adaptive=False))
    results: dict[int, object] = {}
    requests = [Request(engine.encode_prompt(p), s, i) for i, (p, s) in enumerate(zip(UNEVEN_PROMPTS, settings))]
    engine.serve(requests, lambda request, generation: results.setdefault(request.tag, generation) and (), seed=5)
    assert sorted(results) == list(range(len(UNEVEN_PROMPTS)))
    for i, (s, reference) in enumerate(zip(settings, alone)):
        if s.greedy:
            assert results[i].token_ids == reference.token_ids and results[i].finish_reason == reference.finish_reason
        if not s.speculative or draft is None:
            assert results[i].stats.drafted_tokens == 0 and set(results[i].stats.accepted_lengths) == {1}
    assert len(results[1].token_ids) <= 7
    if draft is not None:
        assert sum(results[0].stats.accepted_lengths) > len(results[0].stats.accepted_lengths)


def test_follow_up_requests_join_the_queue_while_other_rows_decode(models, tokenizer, uneven_settings):
    """Chains of requests (a dialogue's turns): each finished request hands over the next, built from its answer.
    With 2 slots, a chain of short answers runs all its links beside one long answer, instead of waiting for it
    at every link; and every greedy link equals its prompt decoded alone."""
    short = uneven_settings.model_copy(update={"max_new_tokens": 3, "stop_token_ids": []})
    long = uneven_settings.model_copy(update={"max_new_tokens": 40, "stop_token_ids": []})
    engine = GenerationEngine(models.target, tokenizer, max_batch_size=2)
    finished: list[tuple[str, int]] = []
    short_tokens: list[int] = []

    def on_finish(request, generation):
        chain, link = request.tag
        finished.append((chain, link))
        if chain == "short":
            short_tokens.extend(generation.token_ids)
        if chain == "short" and link < 3:
            return [Request(list(request.prompt_token_ids) + generation.token_ids, short, (chain, link + 1))]
        return []

    first = engine.encode_prompt(UNEVEN_PROMPTS[3])
    long_prompt = engine.encode_prompt(UNEVEN_PROMPTS[5])
    engine.serve([Request(long_prompt, long, ("long", 0)), Request(first, short, ("short", 0))], on_finish)
    assert finished == [("short", 0), ("short", 1), ("short", 2), ("short", 3), ("long", 0)]
    # Greedy links continue one another, so the chain's answers are the prompt's first 12 greedy tokens alone.
    alone = GenerationEngine(models.target, tokenizer).generate_from_ids(
        [first], short.model_copy(update={"max_new_tokens": 12}))[0]
    assert short_tokens == alone.token_ids


@pytest.mark.parametrize("continuous", [True, False])
@pytest.mark.parametrize("draft_name", [None, "close_draft"])
def test_prefix_cache_reuses_the_first_turn_and_changes_no_output(models, tokenizer, uneven_settings, draft_name,
                                                                  continuous):
    """Second-turn prompts that begin with the first turn's prompt and answer take their keys and values from the
    prefix cache (all of the context but the answer's last token, which no cache held when the row ended) and decode
    exactly what an engine without the cache decodes."""
    def engine(prefix_cache_tokens):
        return GenerationEngine(
            models.target, tokenizer, getattr(models, draft_name) if draft_name else None, max_batch_size=3,
            continuous_batching=continuous, prefix_cache_tokens=prefix_cache_tokens,
            speculative=SpeculativeConfig(num_draft_tokens=3, max_draft_tokens=5, draft_cost_ratio=0.1),
        )

    warm, cold = engine(4096), engine(0)
    first_prompts = [warm.encode_prompt(p) for p in UNEVEN_PROMPTS]
    first = warm.generate_from_ids(first_prompts, uneven_settings)
    assert [g.token_ids for g in first] == [g.token_ids for g in cold.generate_from_ids(first_prompts, uneven_settings)]
    assert all(g.stats.reused_prompt_tokens == 0 for g in first)
    follow_up = tokenizer.encode(" Speak again, and tell me more.").ids
    second_prompts = [p + g.token_ids + follow_up for p, g in zip(first_prompts, first)]
    second = warm.generate_from_ids(second_prompts, uneven_settings)
    expected = cold.generate_from_ids(second_prompts, uneven_settings)
    assert [g.token_ids for g in second] == [g.token_ids for g in expected]
    for prompt, answer, again in zip(first_prompts, first, second):
        context = len(prompt) + len(answer.token_ids) - 1
        reused = again.stats.reused_prompt_tokens
        assert context <= reused < len(again.prompt_token_ids) if context >= BLOCK_TOKENS else reused == 0
    assert sum(g.stats.reused_prompt_tokens > 0 for g in second) >= len(second) // 2


def test_a_prompt_admitted_while_another_decodes_reuses_its_prompt(models, tokenizer, uneven_settings, uneven_alone):
    """Two slots: the shorter answer ends first and its slot takes a prompt that extends the other, still decoding,
    prompt; that prompt's keys and values are in the cache from its prefill on, so all of it is reused."""
    lengths = [len(g.token_ids) for g in uneven_alone]
    long_prompts = [i for i, g in enumerate(uneven_alone) if len(g.prompt_token_ids) > BLOCK_TOKENS + 1]
    decoding = max(long_prompts, key=lambda i: lengths[i])
    ending = min(range(len(lengths)), key=lambda i: lengths[i])
    assert lengths[ending] < lengths[decoding]
    warm = GenerationEngine(models.target, tokenizer, max_batch_size=2, prefix_cache_tokens=4096)
    first = uneven_alone[decoding].prompt_token_ids
    prompts = [first, uneven_alone[ending].prompt_token_ids, first + tokenizer.encode(" and more").ids]
    results = warm.generate_from_ids(prompts, uneven_settings)
    expected = GenerationEngine(models.target, tokenizer, max_batch_size=2).generate_from_ids(prompts, uneven_settings)
    assert [g.token_ids for g in results] == [g.token_ids for g in expected]
    assert results[2].stats.reused_prompt_tokens == len(first) - 1
    # When the rows end, each prompt entry gives way to its prompt and answer: one entry per row remains.
    assert len(warm.prefix_cache) == sum(len(p) - 1 >= BLOCK_TOKENS for p in prompts)


def prefill_passes(engine: GenerationEngine) -> list[int]:
    """Record the rows of every prefill pass of the engine's target."""
    rows: list[int] = []
    prefill = engine._prefill

    def recording(model, seq, mask, cache):
        if model is engine.target:
            rows.append(seq.shape[0])
        return prefill(model, seq, mask, cache)

    engine._prefill = recording
    return rows


def prompt_kv_alone(engine: GenerationEngine, models_used: list, prompt: list[int]) -> dict:
    """Each model's keys and values of all but the prompt's last token, the prompt prefilled on its own."""
    row = engine._row(Request(prompt, GREEDY))
    engine._prefill_prompts([row], models_used)
    return row.prompt_kv


@pytest.mark.parametrize("draft_name", [None, "close_draft"])
def test_prompts_with_and_without_a_cached_prefix_share_a_prefill_pass(models, tokenizer, uneven_alone, draft_name):
    """Continuations of cached dialogues (of different prefix lengths) and new prompts prefilled in one pass give each
    prompt the keys and values it gets prefilled alone without a cache, for the target and the draft."""
    draft = getattr(models, draft_name) if draft_name else None
    warm = GenerationEngine(models.target, tokenizer, draft, prefix_cache_tokens=4096)
    cold = GenerationEngine(models.target, tokenizer, draft)
    models_used = [models.target] + ([draft] if draft else [])
    cached = [g.prompt_token_ids + g.token_ids for g in uneven_alone[5:]]
    for context in cached:
        warm.prefix_cache.store(context, prompt_kv_alone(cold, models_used, context + [0]))
    more = tokenizer.encode(" Speak again.").ids
    prompts = [context + more for context in cached] + [g.prompt_token_ids for g in uneven_alone[:3]]
    rows = [warm._row(Request(prompt, GREEDY)) for prompt in prompts]
    passes = prefill_passes(warm)
    warm._prefill_prompts(rows, models_used)
    assert passes == [len(rows)]
    assert [row.stats.reused_prompt_tokens for row in rows] == [len(c) for c in cached] + [0, 0, 0]
    for row, prompt in zip(rows, prompts):
        alone = prompt_kv_alone(cold, models_used, prompt)
        for m in range(len(models_used)):
            for got, expected in zip([*row.prompt_kv[m][0], *row.prompt_kv[m][1]], [*alone[m][0], *alone[m][1]]):
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_prefill_passes_group_rows_by_the_measured_cost_of_their_new_tokens(models, tokenizer):
    """A 1,000-token prompt gets a pass of its own, the short ones share one: by the cost table (a pass over n tokens
    costs 1, 2, 9 at 1, 8, 64 tokens and 0.125 more per token beyond: 138.25 against 139.4 with a pass per row and
    501 all together) and, without a table, by passes costing the same up to WEIGHT_BOUND_TOKENS tokens."""
    measured = GenerationEngine(models.target, tokenizer, speculative=SpeculativeConfig(target_step_costs={8: 2.0, 64: 9.0}))
    unmeasured = GenerationEngine(models.target, tokenizer)
    for engine in (measured, unmeasured):
        assert engine._prefill_groups([30, 1000, 25, 28]) == [[2, 3, 0], [1]]
    assert unmeasured._prefill_groups([30, 30, 30]) == [[0, 1, 2]]
    # Pure compute (a pass costs its tokens): sharing a pass saves nothing, padding costs, so every row goes alone.
    linear = GenerationEngine(models.target, tokenizer, speculative=SpeculativeConfig(target_step_costs={2: 2.0}))
    assert sorted(map(sorted, linear._prefill_groups([3, 9, 5]))) == [[0], [1], [2]]


def test_waiting_prompts_are_prefilled_a_batch_at_a_time(models, tokenizer, uneven_settings, uneven_alone):
    """Rows of uneven lengths end one or two at a time, yet the prompts that take their slots were prefilled a batch
    at a time: 9 prompts through 3 slots in 4 passes (3 rows, then 3, 2 and 1; a pass per refill took 6)."""
    engine = GenerationEngine(models.target, tokenizer, max_batch_size=3)
    passes = prefill_passes(engine)
    results = engine.generate_from_ids([g.prompt_token_ids for g in uneven_alone], uneven_settings)
    assert [g.token_ids for g in results] == [g.token_ids for g in uneven_alone]
    assert passes == [3, 3, 2, 1]


def test_prefix_cache_finds_the_longest_prefix_and_evicts_the_least_recently_used():
    def kv(n):
        return {0: ([torch.zeros(1, n, 2)], [torch.zeros(1, n, 2)])}

    cache = PrefixCache(capacity_tokens=100)
    a, b, c, d = (list(range(start, start + n)) for start, n in ((0, 40), (100, 50), (200, 30), (300, 30)))
    cache.store(a, kv(40))
    cache.store(a[:10], kv(10))  # under one block: nothing to find it by, so not kept
    assert cache.tokens == 40
    entry, length = cache.lookup(a[:35] + [999, 1000])  # two whole blocks found by hash, 3 more tokens compared
    assert entry.token_ids == a and length == 35
    assert cache.lookup(a[:15] + [7] * 20) == (None, 0)  # shares less than one block
    assert cache.lookup([5, *a]) == (None, 0)
    cache.store(b, kv(50))
    cache.store(c, kv(30))  # 120 tokens > 100: a, the least recently used, goes
    assert cache.lookup(a) == (None, 0) and cache.tokens == 80
    assert cache.lookup(c)[1] == 30 and cache.lookup(b)[1] == 50  # b is now the most recently used
    entry = cache.store(d, kv(30))
    assert cache.lookup(c) == (None, 0) and cache.lookup(b)[1] == 50 and cache.lookup(d)[1] == 30
    cache.discard(entry)
    assert cache.lookup(d) == (None, 0) and cache.tokens == 50 and len(cache) == 1


def test_speculative_sampling_is_deterministic_by_seed(models, tokenizer, frequencies):
    engine = GenerationEngine(models.target, tokenizer, models.close_draft, frspec_frequencies=frequencies)
    settings = GenerationSettings(max_new_tokens=16, temperature=0.9, top_p=0.95, repetition_penalty=1.1, seed=5)
    first, again = engine.generate(PROMPTS, settings), engine.generate(PROMPTS, settings)
    assert [g.token_ids for g in first] == [g.token_ids for g in again]
    other = engine.generate(PROMPTS, settings.model_copy(update={"seed": 6}))
    assert [g.token_ids for g in other] != [g.token_ids for g in first]


def test_cache_rollback_is_exact(models):
    """Feeding rejected tokens and cropping them leaves no trace: bit-identical to never having fed them."""
    target = models.target
    prefix, rejected, accepted = torch.tensor([[5, 17, 42, 7]]), torch.tensor([[99, 3, 12]]), torch.tensor([[8, 250]])
    rolled_back_cache, direct_cache = target.new_cache(1, 16), target.new_cache(1, 16)
    target(prefix, cache=rolled_back_cache)
    target(rejected, cache=rolled_back_cache)
    rolled_back_cache.crop(prefix.shape[1])
    rolled_back = target(accepted, cache=rolled_back_cache).logits
    target(prefix, cache=direct_cache)
    direct = target(accepted, cache=direct_cache).logits
    assert torch.equal(rolled_back, direct)
    assert rolled_back_cache.length == direct_cache.length == 6
    for layer in range(target.config.num_hidden_layers):
        assert torch.equal(rolled_back_cache.keys[layer][:, :, :6], direct_cache.keys[layer][:, :, :6])
        assert torch.equal(rolled_back_cache.values[layer][:, :, :6], direct_cache.values[layer][:, :, :6])
    # And the cached computation agrees with one uncached pass over the whole sequence.
    whole = target(torch.cat([prefix, accepted], dim=1)).logits[:, -accepted.shape[1] :]
    torch.testing.assert_close(rolled_back, whole, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("with_draft", [False, True])
def test_stop_strings_stop_tokens_and_max_tokens(models, tokenizer, plain_greedy, with_draft):
    engine = GenerationEngine(models.target, tokenizer, models.close_draft if with_draft else None)
    reference = plain_greedy[1]

    short = engine.generate([PROMPTS[1]], GREEDY.model_copy(update={"max_new_tokens": 5}))[0]
    assert short.token_ids == reference.token_ids[:5] and short.finish_reason == "length"

    stop_token = reference.token_ids[6]
    stopped = engine.generate([PROMPTS[1]], GREEDY.model_copy(update={"stop_token_ids": [stop_token]}))[0]
    end = reference.token_ids.index(stop_token) + 1
    assert stopped.token_ids == reference.token_ids[:end] and stopped.finish_reason == "stop"
    assert stopped.text == tokenizer.decode(reference.token_ids[: end - 1], skip_special_tokens=False)

    # A stop string made of the text of tokens 8-9: generation ends at the token completing its first occurrence.
    stop = tokenizer.decode(reference.token_ids[8:10], skip_special_tokens=False)
    cut = engine.generate([PROMPTS[1]], GREEDY.model_copy(update={"stop": [stop]}))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == reference.text[: reference.text.find(stop)]
    assert cut.token_ids == reference.token_ids[: len(cut.token_ids)]
    assert stop in tokenizer.decode(cut.token_ids, skip_special_tokens=False)
    assert stop not in tokenizer.decode(cut.token_ids[:-1], skip_special_tokens=False)


def test_eos_ends_generation_unless_ignored(models, tokenizer, plain_greedy):
    engine = GenerationEngine(models.target, tokenizer)
    reference = plain_greedy[0]
    # Make the target's 4th greedy token the end-of-turn marker by teaching the engine it is an EOS id.
    engine.eos_ids = [reference.token_ids[3]]
    ended = engine.generate([PROMPTS[0]], GREEDY.model_copy(update={"ignore_eos": False}))[0]
    assert ended.finish_reason == "stop" and ended.token_ids == reference.token_ids[: reference.token_ids.index(reference.token_ids[3]) + 1]


def test_frspec_frequencies_subset_and_round_trip(tokenizer, tmp_path):
    text = SHAKESPEARE.read_text(encoding="utf-8")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(text.splitlines(keepends=True)[:3000]), encoding="utf-8")
    frequencies = TokenFrequencies.count(corpus, tokenizer, batch_size=256)
    expected = torch.zeros(tokenizer.get_vocab_size(), dtype=torch.long)
    for line in corpus.read_text(encoding="utf-8").splitlines(keepends=True):
        for token in tokenizer.encode(line, add_special_tokens=False).ids:
            expected[token] += 1
    assert torch.equal(frequencies.counts, expected)

    subset = frequencies.top_tokens(0.25, always_include=(2,))
    ranked = sorted(range(expected.numel()), key=lambda t: (-int(expected[t]), t))[: math.ceil(0.25 * expected.numel())]
    assert subset.tolist() == sorted(set(ranked) | {2})

    frequencies.save(tmp_path)
    loaded = TokenFrequencies.load(tmp_path)
    assert torch.equal(loaded.counts, frequencies.counts)
    loaded.check_tokenizer(tokenizer)
    other = train_bpe_tokenizer([text[:50_000]], 300, tmp_path / "other")
    with pytest.raises(ValueError, match="recount"):
        loaded.check_tokenizer(other)
    with pytest.raises(FileNotFoundError, match="FR-Spec"):
        TokenFrequencies.load(tmp_path / "missing")


def test_frequencies_from_a_dataset_version(tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["to be or not to be", "that is the question", ""]
    pq.write_table(pa.table({"content": texts, "id": ["a", "b", "c"]}), tmp_path / "shard.parquet")
    counts = TokenFrequencies.count(tmp_path / "shard.parquet", tokenizer).counts
    assert int(counts.sum()) == sum(len(tokenizer.encode(t, add_special_tokens=False).ids) for t in texts)
    with pytest.raises(KeyError, match="text"):
        TokenFrequencies.count(tmp_path / "shard.parquet", tokenizer, text_column="text")


# ---------------------------------------------------------------------------------------------- bigram model


class BigramCache:
    """Keeps no keys or values: a bigram model needs no context."""

    def __init__(self, max_len: int):
        self.length, self.max_len = 0, max_len
        self.keys, self.values = [], []

    def crop(self, n: int) -> None:
        assert 0 <= n <= self.length
        self.length = n


class BigramLM(nn.Module):
    """Next-token logits depend only on the current token: logits = table[token]. Needs no real cache."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=table.shape[0])
        self.embed = nn.Parameter(torch.eye(table.shape[0]))
        self.head = nn.Parameter(table.T.contiguous())

    def new_cache(self, batch_size, max_len, device=None, dtype=None):
        return BigramCache(max_len)

    def lm_head_weight(self):
        return self.head

    def final_hidden(self, input_ids, *, attention_mask=None, position_ids=None, cache=None):
        if cache is not None:
            cache.length += input_ids.shape[1]
        return self.embed[input_ids]


def bigram_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models

    return Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))


@pytest.mark.parametrize("use_frspec", [False, True])
def test_speculative_sampling_reproduces_the_target_sequence_distribution(use_frspec):
    vocab, length, samples = 4, 3, 4000
    generator = torch.Generator().manual_seed(0)
    target_table = torch.randn(vocab, vocab, generator=generator) * 1.5
    draft_table = target_table + 0.5 * torch.randn(vocab, vocab, generator=generator)
    tokenizer = bigram_tokenizer(vocab)
    frequencies = None
    if use_frspec:  # the draft can only propose tokens 1 and 2; tokens 0 and 3 come from corrections only
        frequencies = TokenFrequencies(torch.tensor([1, 5, 4, 0]), tokenizer_fingerprint(tokenizer), "test")
    engine = GenerationEngine(
        BigramLM(target_table), tokenizer, BigramLM(draft_table), add_bos=False, max_batch_size=4,
        frspec_frequencies=frequencies,
        speculative=SpeculativeConfig(num_draft_tokens=2, max_draft_tokens=3, frspec_fraction=0.5),
    )
    if use_frspec:
        assert engine.frspec_head.token_ids.tolist() == [1, 2]
    settings = GenerationSettings(max_new_tokens=length, temperature=0.8, seed=11)
    results = engine.generate_from_ids([[0]] * samples, settings)
    assert any(max(r.stats.accepted_lengths) > 1 for r in results)
    assert_sequence_distribution(results, target_table, 0.8, length)


def assert_sequence_distribution(results, table: torch.Tensor, temperature: float, length: int) -> None:
    """Chi-square test of the generated sequences against the bigram's exact sequence distribution at temperature."""
    vocab = table.shape[0]
    counts = torch.zeros([vocab] * length, dtype=torch.float64)
    for result in results:
        counts[tuple(result.token_ids)] += 1
    next_token = torch.softmax(table.double() / temperature, dim=-1)
    exact = torch.zeros([vocab] * length, dtype=torch.float64)
    for seq in itertools.product(range(vocab), repeat=length):
        prob, previous = 1.0, 0
        for token in seq:
            prob, previous = prob * next_token[previous, token], token
        exact[seq] = prob
    expected, observed = exact.flatten() * len(results), counts.flatten()
    # Cells expected fewer than 5 times are pooled, as the chi-square approximation needs.
    rare = expected < 5
    if rare.any():
        expected = torch.cat([expected[~rare], expected[rare].sum()[None]])
        observed = torch.cat([observed[~rare], observed[rare].sum()[None]])
    stat = float(((observed - expected) ** 2 / expected).sum())
    dof = expected.numel() - 1
    critical = dof * (1 - 2 / (9 * dof) + 3.0902 * math.sqrt(2 / (9 * dof))) ** 3  # chi-square upper 0.1%
    assert stat < critical, stat


def test_rows_sampled_at_different_temperatures_in_one_batch_each_keep_their_distribution():
    """Speculative sampling with per-row settings: rows at T=0.6 and T=1.5 (and greedy rows) share every batch,
    and each group's sequences follow the target's distribution at its own temperature."""
    vocab, length, samples = 4, 3, 3000
    generator = torch.Generator().manual_seed(1)
    target_table = torch.randn(vocab, vocab, generator=generator) * 1.5
    draft_table = target_table + 0.5 * torch.randn(vocab, vocab, generator=generator)
    engine = GenerationEngine(
        BigramLM(target_table), bigram_tokenizer(vocab), BigramLM(draft_table), add_bos=False, max_batch_size=6,
        speculative=SpeculativeConfig(num_draft_tokens=2, max_draft_tokens=3),
    )
    settings = [GenerationSettings(max_new_tokens=length, temperature=t) for t in (0.6, 1.5, 0.0)]
    results: dict[int, list] = {0: [], 1: [], 2: []}
    engine.serve([Request([0], settings[i % 3], i % 3) for i in range(3 * samples)],
                 lambda request, generation: results[request.tag].append(generation) or (), seed=4)
    assert any(max(r.stats.accepted_lengths) > 1 for r in results[0] + results[1])
    assert_sequence_distribution(results[0], target_table, 0.6, length)
    assert_sequence_distribution(results[1], target_table, 1.5, length)
    greedy = {tuple(r.token_ids) for r in results[2]}
    assert len(greedy) == 1  # the greedy rows all follow the argmax chain
    expected, previous = [], 0
    for _ in range(length):
        previous = int(target_table[previous].argmax())
        expected.append(previous)
    assert greedy == {tuple(expected)}


def test_from_pretrained_loads_checkpoints_tokenizer_and_frspec(models, tokenizer, frequencies, plain_greedy, tmp_path):
    target_dir, draft_dir = tmp_path / "target", tmp_path / "draft"
    models.target.save_pretrained(target_dir)
    tokenizer.save(str(target_dir / "tokenizer.json"))
    models.small_draft.save_pretrained(draft_dir)
    with pytest.raises(FileNotFoundError, match="FR-Spec"):
        GenerationEngine.from_pretrained(target_dir, draft_dir, frspec=True)
    assert GenerationEngine.from_pretrained(target_dir, draft_dir).frspec_head is None
    frequencies.save(draft_dir)
    engine = GenerationEngine.from_pretrained(target_dir, draft_dir)
    assert engine.frspec_head.token_ids.numel() >= math.ceil(0.25 * tokenizer.get_vocab_size())
    # The chat prompt is rendered with the MiniCPM template after <s>.
    chat = PROMPTS[2]
    expected_prompt = [tokenizer.token_to_id("<s>")] + tokenizer.encode(
        "<|im_start|>user\nSpeak, friend.<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False
    ).ids
    assert engine.encode_prompt(chat) == expected_prompt
    assert expected_prompt.count(tokenizer.token_to_id("<|im_start|>")) == 2
    assert [g.token_ids for g in engine.generate(PROMPTS, GREEDY)] == [g.token_ids for g in plain_greedy]
