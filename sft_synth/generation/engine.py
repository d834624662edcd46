"""The generation engine: continuous batching over decoding slots, plain or speculative decoding (FR-Spec optional).

Layout. A running batch keeps a token matrix `seq` [B, N] and a mask [B, N] (1 = a real token of that row); each
model's KV cache holds a prefix of those columns, the target's all but the last column, the draft's at most that,
and every row's newest token sits in the last column. A row's positions count its real tokens only, so a masked
column (left padding, a rejected draft) is invisible to that row and shifts none of its positions.

Ragged speculation. One decoding loop serves both modes; plain decoding is the k = 0 case. A step feeds each
model what its cache lacks, the draft proposes k tokens per row, the target scores them in one forward pass, and
every row commits its own accepted drafts plus the target's token. The new columns hold the drafts up to the
longest accepted prefix in the batch, then the target's tokens; a row that accepted fewer masks its rejected
drafts, and the caches are cropped to the new layout (a crop only forgets positions). A masked column is never
attended to again, so every row continues exactly as if it had been decoded alone, whatever its neighbours
accepted: lossless per row, and a row that accepts more advances further.

Continuous batching. When rows finish, or masked columns fill the caches, the batch is rebuilt before the next
step: surviving rows keep their real columns (packed to the right, which drops their holes), waiting prompts take
the free slots, and both caches are gathered into the new layout. The columns beyond the draft's cache are moved as
they are, so both caches stay prefixes of the new layout. Rows end one or two at a time, so a prompt about to take
a slot is prefilled together with those next in line, up to a batch, and they later take their slots without a
pass; prompts that continue a cached dialogue share that pass with new ones (each sees its own prefix through the
mask), grouped by length so that a long prompt does not make short ones pay for its padding.

The adaptive controller (speculative.DraftLengthController) picks k per step from the acceptance rate and a cost
model of the target and the draft at the current batch size, down to k = 0 where speculation would not pay.

Requests. Every row carries its own settings (temperature, nucleus, penalty, stop rules, length), so one batch can
decode a user turn beside an assistant turn. A finished request may hand the engine follow-up requests (a
dialogue's next turn), which queue behind the waiting ones: a run of dialogues keeps every slot busy from its first
turn to its last instead of draining the batch at the end of each turn.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tokenizers import Tokenizer
from torch import nn
from torch.nn import functional as F

from .chat_template import IM_END, apply_chat_template
from .frspec import FRSpecHead, TokenFrequencies
from .prefix_cache import LayerKV, PrefixCache, PrefixEntry
from .sampling import GenerationSettings, RowSampling, apply_repetition_penalty, logits_to_probs, sample
from .speculative import DraftLengthController, StepCost, verify_greedy, verify_sampling

Prompt = str | Sequence[Mapping[str, str]]
EOS_TOKENS = ("</s>", IM_END)
# Without measured step costs, a pass over this many tokens or fewer is taken to cost what reading the weights costs
# (a GPU serving a 7-8B model; a CPU's table, which benchmarks/generate.py measures, says a few tokens).
WEIGHT_BOUND_TOKENS = 256


class SpeculativeConfig(BaseModel):
    """How the draft model is used. frspec_fraction applies when the engine is given FR-Spec frequencies."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_draft_tokens: int = Field(4, ge=1, description="initial k")
    adaptive: bool = True
    min_draft_tokens: int = Field(1, ge=1)
    max_draft_tokens: int = Field(8, ge=1)
    draft_cost_ratio: float | None = Field(
        None, ge=0.0, description="draft step time / target step time; None: estimated from parameter counts"
    )
    frspec_fraction: float = Field(0.25, gt=0.0, le=1.0)
    target_step_costs: dict[int, float] = Field(
        default_factory=dict,
        description="time of a target forward pass over n tokens (rows x tokens per row) / a one-token pass, at "
        "measured n (linear between, the last slope beyond; benchmarks/generate.py measures them): empty = 1 at "
        "every n, a pass bound by reading the weights (a GPU at small batches); a CPU is compute-bound after a few",
    )
    draft_step_costs: dict[int, float] = Field(
        default_factory=dict, description="the same for the draft, by rows (one draft token per row)"
    )
    probe_interval: int = Field(
        16, ge=1, description="after this many steps without drafts, one step drafts again to re-measure acceptance"
    )

    @field_validator("target_step_costs", "draft_step_costs")
    @classmethod
    def _valid_step_costs(cls, costs: dict[int, float]) -> dict[int, float]:
        StepCost(costs)
        return costs


@dataclass
class GenerationStats:
    target_steps: int = 0
    accepted_lengths: list[int] = field(default_factory=list)  # tokens committed per target step
    drafted_tokens: int = 0
    accepted_drafts: int = 0
    reused_prompt_tokens: int = 0  # prompt tokens whose target keys and values came from the prefix cache

    @property
    def mean_accepted_length(self) -> float:
        return sum(self.accepted_lengths) / max(len(self.accepted_lengths), 1)


@dataclass
class Generation:
    text: str
    token_ids: list[int]  # generated tokens, including a terminating stop token
    finish_reason: str  # "stop" (stop token or stop string) or "length"
    prompt_token_ids: list[int]
    stats: GenerationStats


@dataclass
class Request:
    """A prompt to decode with its own settings; tag is the caller's, handed back with the generation."""

    prompt_token_ids: Sequence[int]
    settings: GenerationSettings
    tag: object = None


@dataclass
class _Row:
    """Decoding state of one request."""

    request: Request
    prompt_token_ids: list[int]
    stop_ids: set[int]  # the settings' stop tokens, and the engine's EOS tokens unless ignore_eos
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_text_end: int | None = None  # where a stop string starts in the decoded text
    stats: GenerationStats = field(default_factory=GenerationStats)
    cached_prompt: PrefixEntry | None = None  # its prompt in the prefix cache, until the whole row replaces it
    prompt_kv: dict[int, LayerKV] | None = None  # per model, its prompt's keys and values until it takes a slot

    @property
    def settings(self) -> GenerationSettings:
        return self.request.settings


@dataclass
class _Running:
    """The rows in the decoding slots and their shared column layout (see the module docstring)."""

    rows: list[_Row]
    seq: torch.Tensor  # [B, N] token ids
    mask: torch.Tensor  # [B, N] 1 = a real token of the row
    seen: torch.Tensor  # [B, V + 1] tokens in each row's context (repetition penalty); column V absorbs
    caches: list  # the target's KV cache, then the draft's when drafting
    # Set when a slot was refilled in place: the padding masks the caches keep may be stale for that row, so every
    # forward pass is given the whole mask until the next rebuild (which starts fresh caches).
    refilled: bool = False

    @property
    def width(self) -> int:
        return self.seq.shape[1]


def _cache_tensors(cache) -> list[torch.Tensor]:
    return [*cache.keys, *cache.values]


def _row_kv(cache, row: int, columns: torch.Tensor) -> LayerKV:
    """Copies of one row's keys and values at the given cache columns, per layer [heads, columns, head_dim]."""
    return [k[row, :, columns] for k in cache.keys], [v[row, :, columns] for v in cache.values]


def _packed_columns(mask: torch.Tensor, prefix: int, packed: int) -> torch.Tensor:
    """For every row and new column, the old column it takes (-1: padding): the real columns among the first
    `prefix` right-aligned into `packed` columns, then the columns from `prefix` on unchanged."""
    real = mask[:, :prefix].bool()
    destination = packed - real.sum(1, keepdim=True) + real.long().cumsum(1) - 1
    source = torch.full((mask.shape[0], packed + mask.shape[1] - prefix), -1, dtype=torch.long, device=mask.device)
    rows, columns = real.nonzero(as_tuple=True)
    source[rows, destination[rows, columns]] = columns
    source[:, packed:] = torch.arange(prefix, mask.shape[1], device=mask.device)
    return source


def _parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class GenerationEngine:
    """Generates from a MiniCPM-contract target, optionally drafting with a smaller model on the same tokenizer.

    target / draft: models with final_hidden(input_ids, attention_mask=, position_ids=, cache=) (hidden states
    before the LM head: hidden @ lm_head_weight().T are the logits), lm_head_weight() and new_cache(batch, max_len,
    device=, dtype=), whose caches have .length, .max_len and per-layer .keys / .values [B, heads, max_len, head_dim].
    max_batch_size is the number of decoding slots; more prompts wait for a slot. continuous_batching=False decodes
    static batches as Hugging Face's generate does: a finished row keeps its slot (decoding on, its tokens dropped)
    until every row of its batch has finished, the baseline that continuous batching is measured against.
    prefix_cache_tokens > 0 keeps the keys and values of finished rows (prompt and answer, both models) up to that
    many tokens, and a prompt that begins with one of them prefills only the rest (see prefix_cache).
    torch_compile=True runs the decoding steps of both models through torch.compile (a C++ compiler on a CPU; the first
    steps pay the compilation, some seconds per graph); outputs are those of the eager models up to float rounding.
    """

    def __init__(
        self,
        target: nn.Module,
        tokenizer: Tokenizer,
        draft: nn.Module | None = None,
        *,
        speculative: SpeculativeConfig | None = None,
        frspec_frequencies: TokenFrequencies | None = None,
        add_bos: bool = True,
        max_batch_size: int = 16,
        prefill_chunk_size: int = 1024,
        continuous_batching: bool = True,
        prefix_cache_tokens: int = 0,
        torch_compile: bool = False,
    ):
        self.target, self.draft, self.tokenizer = target.eval(), draft, tokenizer
        self.speculative = speculative or SpeculativeConfig()
        self.max_batch_size, self.prefill_chunk_size = max_batch_size, prefill_chunk_size
        self.continuous_batching = continuous_batching
        self.prefix_cache = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens else None
        self.bos_id = tokenizer.token_to_id("<s>") if add_bos else None
        if add_bos and self.bos_id is None:
            raise ValueError("add_bos=True but the tokenizer has no <s> token")
        self.eos_ids = [i for i in (tokenizer.token_to_id(t) for t in EOS_TOKENS) if i is not None]
        self.pad_id = tokenizer.token_to_id("<pad>") or 0
        self.device = next(target.parameters()).device
        # Decoding steps (a draft's proposals, the target's verification or plain step) through torch.compile;
        # prefill stays eager, its passes are bound by their tokens. On a CPU most of a small draft's step is
        # per-operator overhead (1.9 ms eager, 0.67 ms compiled for the benchmark's draft at 8 rows), which the
        # compiled graph fuses away. Graphs: one per model for one new token and one for several, each for one row
        # and for more; the two models share final_hidden's code, hence the higher recompile limit.
        self._compiled_steps = {}
        if torch_compile:
            # cache_size_limit is the older torch's name for it.
            limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
            setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))
            for model in (target, draft):
                if model is not None:
                    self._compiled_steps[id(model)] = torch.compile(model.final_hidden, dynamic=True)

        self.frspec_head: FRSpecHead | None = None
        if draft is not None:
            draft.eval()
            target_vocab, draft_vocab = target.config.vocab_size, draft.config.vocab_size
            if target_vocab != draft_vocab:
                raise ValueError(f"draft vocabulary ({draft_vocab}) differs from the target's ({target_vocab})")
            if frspec_frequencies is not None:
                frspec_frequencies.check_tokenizer(tokenizer)
                subset = frspec_frequencies.top_tokens(self.speculative.frspec_fraction, tuple(self.eos_ids))
                self.frspec_head = FRSpecHead(draft.lm_head_weight(), subset)
        elif frspec_frequencies is not None:
            raise ValueError("FR-Spec frequencies given without a draft model")

    @classmethod
    def from_pretrained(
        cls,
        target_dir: str | Path,
        draft_dir: str | Path | None = None,
        *,
        tokenizer_path: str | Path | None = None,
        frspec: bool | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        **engine_kwargs,
    ) -> GenerationEngine:
        """Load Hugging Face-layout checkpoints; frspec=None uses FR-Spec when the draft directory holds counts."""
        from model.minicpm import MiniCPMForCausalLM
        from model.tokenizer import load_tokenizer

        from .frspec import FREQUENCIES_FILE

        def load(path):
            return MiniCPMForCausalLM.from_pretrained(path, dtype=dtype, device=device or "cpu")

        tokenizer = load_tokenizer(tokenizer_path or target_dir)
        draft = load(draft_dir) if draft_dir is not None else None
        frequencies = None
        if draft_dir is not None and (frspec or (frspec is None and (Path(draft_dir) / FREQUENCIES_FILE).is_file())):
            frequencies = TokenFrequencies.load(draft_dir)
        return cls(load(target_dir), tokenizer, draft, frspec_frequencies=frequencies, **engine_kwargs)

    # ------------------------------------------------------------------ prompts and results

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        text = prompt if isinstance(prompt, str) else apply_chat_template(prompt)
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if self.bos_id is not None else []) + ids

    def generate(self, prompts: Sequence[Prompt], settings: GenerationSettings | None = None) -> list[Generation]:
        """Generate for plain-text prompts or chat message lists (rendered with the MiniCPM chat template)."""
        return self.generate_from_ids([self.encode_prompt(p) for p in prompts], settings)

    def generate_from_ids(
        self, prompts: Sequence[Sequence[int]], settings: GenerationSettings | None = None
    ) -> list[Generation]:
        settings = settings or GenerationSettings()
        generations: list[Generation | None] = [None] * len(prompts)

        def collect(request: Request, generation: Generation) -> tuple:
            generations[request.tag] = generation
            return ()

        self.serve([Request(p, settings, i) for i, p in enumerate(prompts)], collect, seed=settings.seed,
                   speculative=settings.speculative)
        return generations

    def serve(self, requests: Iterable[Request], on_finish: Callable[[Request, Generation], Iterable[Request]], *,
              seed: int = 0, speculative: bool = True) -> None:
        """Decode requests, each with its own settings, through the decoding slots. When one finishes,
        on_finish(request, generation) returns its follow-up requests (none, or a dialogue's next turn), which wait
        behind those already waiting. One random generator seeded by seed serves the whole stream, so the same
        requests and follow-ups give the same tokens. The draft runs when speculative is True (and the engine has
        one); a row whose settings say speculative=False commits only the target's tokens."""
        rows = deque(self._row(request) for request in requests)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        self._decode(rows, generator, speculative and self.draft is not None, on_finish)

    def _row(self, request: Request) -> _Row:
        if len(request.prompt_token_ids) == 0:
            raise ValueError("every prompt needs at least one token")
        settings = request.settings
        stop_ids = set(settings.stop_token_ids) | (set() if settings.ignore_eos else set(self.eos_ids))
        return _Row(request, list(request.prompt_token_ids), stop_ids)

    def _finish(self, row: _Row) -> Generation:
        ids = row.token_ids
        text_ids = ids[:-1] if row.finish_reason == "stop" and row.stop_text_end is None else ids
        text = self.tokenizer.decode(text_ids, skip_special_tokens=False)
        if row.stop_text_end is not None:
            text = text[: row.stop_text_end]
        return Generation(text, ids, row.finish_reason or "length", row.prompt_token_ids, row.stats)

    def _commit(self, row: _Row, tokens: list[int]) -> None:
        """Append tokens to a row one by one until one of them finishes it."""
        settings = row.settings
        for token in tokens:
            row.token_ids.append(token)
            if token in row.stop_ids:
                row.finish_reason = "stop"
                return
            if settings.stop:
                text = self.tokenizer.decode(row.token_ids, skip_special_tokens=False)
                found = [i for i in (text.find(s) for s in settings.stop) if i >= 0]
                if found:
                    row.finish_reason, row.stop_text_end = "stop", min(found)
                    return
            if len(row.token_ids) >= settings.max_new_tokens:
                row.finish_reason = "length"
                return

    # ------------------------------------------------------------------ model calls

    def _forward(self, model, tokens, mask, cache, *, last: int, head: FRSpecHead | None = None,
                 positions: torch.Tensor | None = None, padded: bool | None = None):
        """Run new tokens through a model on top of its cache; return logits of the last `last` positions.

        last == 0 only fills the cache, so it skips the LM head; with an FR-Spec head the logits cover its subset.
        mask covers at least the cache and the new tokens; positions (its cumulative count of real tokens less one)
        and padded (whether it has any padding) may be passed precomputed, so a decoding step computes them once.
        """
        start, end = cache.length, cache.length + tokens.shape[1]
        if padded is None:
            padded = not bool(mask.all())
        if positions is None:
            positions = (mask[:, :end].cumsum(-1) - 1).clamp_(min=0)
        compiled = self._compiled_steps.get(id(model)) if last else None
        if compiled is not None:
            # Fresh contiguous inputs and a mask even when nothing is padded: the graphs then depend on the number
            # of rows and of new tokens only, not on strides, offsets or a missing mask.
            fresh = {"memory_format": torch.contiguous_format}
            hidden = compiled(tokens.clone(**fresh), attention_mask=mask[:, :end].clone(**fresh),
                              position_ids=positions[:, start:end].clone(**fresh), cache=cache)
        else:
            hidden = model.final_hidden(tokens, attention_mask=mask[:, :end] if padded else None,
                                        position_ids=positions[:, start:end], cache=cache)
        if last == 0:
            return None
        # The LM head over the last positions only: the draft's first pass of a step feeds every token its cache
        # lacks, and a full-vocabulary head over all of them costs as much as the draft's layers.
        hidden = hidden[:, -last:]
        return (head(hidden) if head is not None else F.linear(hidden, model.lm_head_weight())).float()

    def _prefill(self, model, seq, mask, cache) -> None:
        """Fill a cache with all but the last token from where it stands, in chunks so that long prompts keep
        activations bounded."""
        for start in range(cache.length, seq.shape[1] - 1, self.prefill_chunk_size):
            end = min(start + self.prefill_chunk_size, seq.shape[1] - 1)
            self._forward(model, seq[:, start:end], mask, cache, last=0)

    def _new_cache(self, model, batch: int, max_len: int):
        parameter = next(model.parameters())
        cache = model.new_cache(batch, max_len, device=parameter.device, dtype=parameter.dtype)
        if self._compiled_steps:  # a cache that already holds a mask keeps `attention_mask is None` out of the guards
            cache.attention_mask = torch.ones(batch, max_len, dtype=torch.long, device=parameter.device)
        return cache

    def draft_cost_ratio(self) -> float:
        if self.speculative.draft_cost_ratio is not None:
            return self.speculative.draft_cost_ratio
        draft_params = _parameter_count(self.draft)
        if self.frspec_head is not None:
            vocab, hidden = self.draft.lm_head_weight().shape
            draft_params -= (vocab - self.frspec_head.token_ids.numel()) * hidden
        return draft_params / _parameter_count(self.target)

    def _controller(self) -> DraftLengthController:
        spec = self.speculative
        return DraftLengthController(
            initial=spec.num_draft_tokens,
            minimum=spec.min_draft_tokens,
            maximum=spec.max_draft_tokens,
            cost_ratio=self.draft_cost_ratio(),
            adaptive=spec.adaptive,
            target_costs=StepCost(spec.target_step_costs),
            draft_costs=StepCost(spec.draft_step_costs),
            probe_interval=spec.probe_interval,
        )

    # ------------------------------------------------------------------ decoding loop

    @torch.no_grad()
    def _decode(self, waiting: deque, generator: torch.Generator, use_draft: bool,
                on_finish: Callable[[Request, Generation], Iterable[Request]]) -> None:
        """Decode every row, max_batch_size at a time; a finished row's slot goes to the next waiting row."""
        models = [self.target, self.draft] if use_draft else [self.target]
        controller = self._controller() if use_draft else None
        max_k = self.speculative.max_draft_tokens if use_draft else 0
        running = None
        while True:
            finished = [i for i, row in enumerate(running.rows) if row.finish_reason is not None] if running else []
            if self.continuous_batching:
                new_layout = finished and not self._refill(running, finished, waiting, models)
            else:
                new_layout = running is not None and len(finished) == len(running.rows)
            if new_layout or running is None or running.width + max_k > running.caches[0].max_len:
                running = self._rebuild(running, waiting, models, max_k)
                if running is None:
                    return
            active = [row for row in running.rows if row.finish_reason is None]
            k = 0
            if use_draft and any(row.settings.speculative for row in active):
                remaining = max(row.settings.max_new_tokens - len(row.token_ids) for row in active)
                k = min(controller.choose(len(running.rows)), remaining - 1)
            accepted, ended = self._step(running, k, generator)
            if k:
                controller.update([n for n, row in zip(accepted, running.rows) if row.settings.speculative], k)
            for row in ended:
                waiting.extend(self._row(request) for request in on_finish(row.request, self._finish(row)))

    def _rebuild(self, running: _Running | None, waiting: deque, models: list, max_k: int) -> _Running | None:
        """The next layout: unfinished rows packed, waiting prompts prefilled into the free slots; None when done.
        A static batch keeps all its rows until every one has finished, and takes no prompt before. The caches
        leave room for the longest answer a row may write and max_k drafts."""
        kept = [i for i, row in enumerate(running.rows) if row.finish_reason is None] if running else []
        if kept and not self.continuous_batching:
            kept = list(range(len(running.rows)))
        free = self.max_batch_size - len(kept) if self.continuous_batching or not kept else 0
        admitted = [waiting.popleft() for _ in range(min(len(waiting), free))]
        if not kept and not admitted:
            return None
        n_kept, batch = len(kept), len(kept) + len(admitted)
        packed, tail = 0, 1
        if kept:
            keep = torch.tensor(kept, device=self.device)
            kept_mask = running.mask[keep]
            prefix = min(cache.length for cache in running.caches)  # the columns every cache holds
            packed, tail = int(kept_mask[:, :prefix].sum(1).max()), running.width - prefix
        if admitted:
            prompt_len = max(len(row.prompt_token_ids) for row in admitted)
            packed = max(packed, prompt_len - 1)
        width = packed + tail
        seq = torch.full((batch, width), self.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros((batch, width), dtype=torch.long, device=self.device)
        rows = [running.rows[i] for i in kept] + admitted if kept else admitted
        headroom = max(row.settings.max_new_tokens for row in rows) + max_k
        caches = [self._new_cache(model, batch, width + headroom) for model in models]
        vocab = self.target.config.vocab_size
        seen = torch.zeros((batch, vocab + 1), dtype=torch.bool, device=self.device)

        if kept:
            source = _packed_columns(kept_mask, prefix, packed)
            valid, columns = source >= 0, source.clamp(min=0)
            seq[:n_kept] = torch.where(valid, running.seq[keep].gather(1, columns), self.pad_id)
            mask[:n_kept] = torch.where(valid, kept_mask.gather(1, columns), 0)
            for old, new in zip(running.caches, caches):
                new.length = packed + old.length - prefix
                for old_tensor, new_tensor in zip(_cache_tensors(old), _cache_tensors(new)):
                    gathered = old_tensor[keep[:, None], :, columns[:, : new.length]]  # [rows, columns, heads, dim]
                    new_tensor[:n_kept, :, : new.length] = gathered.transpose(1, 2)
            seen[:n_kept] = running.seen[keep]
        if admitted:
            self._admit(admitted, torch.arange(n_kept, batch, device=self.device), packed, models, caches, seq, mask,
                        seen, waiting)
            if not kept:
                for cache in caches:
                    cache.length = packed
        return _Running(rows, seq, mask, seen, caches)

    def _refill(self, running: _Running, finished: list[int], waiting: deque, models: list) -> bool:
        """Give the finished rows' slots to waiting prompts in place, the other rows untouched; False when that is
        not possible (too few waiting prompts to fill them all, or a prompt longer than the columns every cache
        holds) and the batch must be rebuilt."""
        prefix = min(cache.length for cache in running.caches)
        admitted = list(itertools.islice(waiting, len(finished)))
        if len(admitted) < len(finished) or max(len(row.prompt_token_ids) for row in admitted) - 1 > prefix:
            return False
        for _ in admitted:
            waiting.popleft()
        slots = torch.tensor(finished, device=self.device)
        running.mask[slots] = 0
        running.seen[slots] = False
        self._admit(admitted, slots, prefix, models, running.caches, running.seq, running.mask, running.seen, waiting)
        for slot, row in zip(finished, admitted):
            running.rows[slot] = row
        running.refilled = True
        return True

    def _admit(self, admitted: list[_Row], slots: torch.Tensor, end: int, models: list, caches: list,
               seq: torch.Tensor, mask: torch.Tensor, seen: torch.Tensor, waiting: deque) -> None:
        """Write new prompts into empty slots: all but their last token right-aligned to column `end` (their cache
        columns too, copied from each row's prefilled keys and values), the last token in the last column; what lies
        between stays masked. Under continuous batching the prompts next in line are prefilled in the same pass, up
        to a batch in all: rows end one or two at a time, and every pass reads all the weights, so a pass over one
        short prompt costs a good part of one over eight; their slots later take them without a pass."""
        if any(row.prompt_kv is None for row in admitted):
            ahead = itertools.islice(waiting, self.max_batch_size - len(admitted)) if self.continuous_batching else ()
            self._prefill_prompts([row for row in [*admitted, *ahead] if row.prompt_kv is None], models)
        prompt_len = max(len(row.prompt_token_ids) for row in admitted)
        new_seq, new_mask = self._left_padded([row.prompt_token_ids for row in admitted], prompt_len)
        start = end - (prompt_len - 1)
        seq[slots, start:end], mask[slots, start:end] = new_seq[:, :-1], new_mask[:, :-1]
        seq[slots, -1], mask[slots, -1] = new_seq[:, -1], 1
        for slot, row in zip(slots.tolist(), admitted):
            first = end - (len(row.prompt_token_ids) - 1)
            for m, cache in enumerate(caches):
                for stored, tensor in zip([*row.prompt_kv[m][0], *row.prompt_kv[m][1]], _cache_tensors(cache)):
                    tensor[slot, :, first:end] = stored
            row.prompt_kv = None
        vocab = self.target.config.vocab_size
        seen[slots] = seen[slots].scatter(1, torch.where(new_mask.bool(), new_seq, vocab), True)

    def _prefill_prompts(self, rows: list[_Row], models: list) -> None:
        """Each model's keys and values of every row's prompt but its last token, kept on the row until it takes a
        slot. A prompt that begins with a cached prefix prefills only the rest. Rows go through in passes of
        similar lengths (see _prefill_groups), one per model and group."""
        if not rows:
            return
        hits = [self.prefix_cache.lookup(row.prompt_token_ids[:-1]) if self.prefix_cache is not None else (None, 0)
                for row in rows]
        new_tokens = [len(row.prompt_token_ids) - length for row, (_, length) in zip(rows, hits)]
        for group in self._prefill_groups(new_tokens):
            self._prefill_group([rows[i] for i in group], [hits[i] for i in group], models)
        if self.prefix_cache is not None:
            for row in rows:
                row.cached_prompt = self.prefix_cache.store(row.prompt_token_ids[:-1], row.prompt_kv)

    def _prefill_groups(self, new_tokens: list[int]) -> list[list[int]]:
        """Rows (by index) in passes that cost least in all by the target's step costs: a pass runs every row over
        its longest row's new tokens, so a 1,000-token prompt beside 30-token continuations of cached dialogues would
        make each of them pay for 1,000, while a pass per row pays each pass's fixed cost again. Rows sorted by new
        tokens, the cheapest split into runs of neighbours (a dynamic program over the at most max_batch_size rows)."""
        table = self.speculative.target_step_costs
        cost = StepCost(table) if table else (lambda n: max(1.0, n / WEIGHT_BOUND_TOKENS))
        order = sorted(range(len(new_tokens)), key=lambda i: new_tokens[i])
        best, cut = [0.0] + [float("inf")] * len(order), [0] * (len(order) + 1)
        for end in range(1, len(order) + 1):
            for begin in range(end):
                total = best[begin] + cost((end - begin) * new_tokens[order[end - 1]])
                if total < best[end]:
                    best[end], cut[end] = total, begin
        groups, end = [], len(order)
        while end:
            groups.append(order[cut[end]:end])
            end = cut[end]
        return groups[::-1]

    def _prefill_group(self, rows: list[_Row], hits: list, models: list) -> None:
        """One pass per model over rows with and without a cached prefix: a prefix's keys and values go into the
        pass's cache, right-aligned before the column where the new tokens begin, and the masked columns between are
        invisible to the row."""
        for row in rows:
            row.prompt_kv = {}
        for m, model in enumerate(models):
            # Per row, how many leading prompt tokens this model's keys and values come from the cache for.
            cached = [min(length, entry.kv[m][0][0].shape[1]) if entry is not None and m in entry.kv else 0
                      for entry, length in hits]
            prefix = max(cached)
            new_tokens = [row.prompt_token_ids[c:] for row, c in zip(rows, cached)]
            new_seq, new_mask = self._left_padded(new_tokens, max(map(len, new_tokens)))
            cached_tokens = torch.tensor(cached, device=self.device)[:, None]
            prefix_mask = torch.arange(prefix, device=self.device) >= prefix - cached_tokens  # right-aligned prefixes
            seq = torch.cat([new_seq.new_full((len(rows), prefix), self.pad_id), new_seq], dim=1)
            mask = torch.cat([prefix_mask.long(), new_mask], dim=1)
            fresh = self._new_cache(model, len(rows), seq.shape[1])
            fresh.length = prefix
            for g, (row, c, (entry, _)) in enumerate(zip(rows, cached, hits)):
                if c:
                    for stored, tensor in zip([*entry.kv[m][0], *entry.kv[m][1]], _cache_tensors(fresh)):
                        tensor[g, :, prefix - c : prefix] = stored[:, :c]
                if m == 0:
                    row.stats.reused_prompt_tokens = c
            self._prefill(model, seq, mask, fresh)
            for g, row in enumerate(rows):
                row.prompt_kv[m] = _row_kv(fresh, g, mask[g, :-1].nonzero().squeeze(1))

    def _left_padded(self, prompts: list[list[int]], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        seq = torch.full((len(prompts), length), self.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros((len(prompts), length), dtype=torch.long, device=self.device)
        for i, prompt in enumerate(prompts):
            seq[i, length - len(prompt) :] = torch.tensor(prompt)
            mask[i, length - len(prompt) :] = 1
        return seq, mask

    def _step(self, running: _Running, k: int, generator: torch.Generator) -> tuple[list[int], list[_Row]]:
        """One target forward pass: k drafts per row verified, each row committing its own share; the accepted
        counts, and the rows this step finished."""
        target_cache, draft_cache = running.caches[0], (running.caches[1] if len(running.caches) > 1 else None)
        seq, mask, seen = running.seq, running.mask, running.seen
        sampling = RowSampling.of([row.settings for row in running.rows], self.device)
        batch, n = seq.shape
        # The mask and positions of the committed sequence plus k drafts, shared by the draft and the target.
        full_mask = torch.cat([mask, mask.new_ones((batch, k))], dim=1)
        padded = running.refilled or not bool(full_mask.all())
        positions = (full_mask.cumsum(-1) - 1).clamp_(min=0)
        drafts, draft_probs = self._propose(k, seq, full_mask, positions, padded, draft_cache, seen, sampling,
                                            generator)
        logits = self._forward(
            self.target, torch.cat([seq, drafts], dim=1)[:, target_cache.length :], full_mask, target_cache,
            last=k + 1, positions=positions, padded=padded,
        )
        vocab = self.target.config.vocab_size
        target_seen = None
        if sampling.penalised:  # position j of the verification has seen the drafts before it
            drafted = torch.zeros((batch, k + 1, vocab + 1), dtype=torch.int32, device=self.device)
            drafted[:, 1:].scatter_(2, drafts[:, :, None], 1)
            target_seen = (seen[:, None, :] | (drafted.cumsum(dim=1) > 0))[..., :vocab]
        target_probs = logits_to_probs(logits, sampling, target_seen)

        greedy = sampling.all_greedy
        if k == 0:
            num_accepted = torch.zeros(batch, dtype=torch.long, device=self.device)
            next_token = sample(target_probs[:, 0], greedy, generator)
        elif greedy:
            num_accepted, next_token = verify_greedy(drafts, target_probs)
        else:
            num_accepted, next_token = verify_sampling(drafts, torch.stack(draft_probs, 1), target_probs, generator)
        plain = [i for i, row in enumerate(running.rows) if not row.settings.speculative]
        if k and plain:  # rows that asked for plain decoding take the target's own token
            plain = torch.tensor(plain, device=self.device)
            num_accepted[plain] = 0
            next_token[plain] = sample(target_probs[plain, 0], greedy, generator)

        # Each row keeps its accepted drafts; the target's token goes in the column after the longest accepted
        # prefix, and a row that accepted fewer masks its rejected drafts before it. Columns past that are cropped.
        accepted = num_accepted.tolist()
        longest = max(accepted)
        kept_drafts = torch.arange(longest, device=self.device) < num_accepted[:, None]
        running.seq = torch.cat([seq, drafts[:, :longest], next_token[:, None]], dim=1)
        running.mask = torch.cat([mask, kept_drafts.long(), mask.new_ones((batch, 1))], dim=1)
        target_cache.crop(n + longest)
        if draft_cache is not None:
            draft_cache.crop(min(draft_cache.length, n + longest))
        committed = torch.cat([torch.where(kept_drafts, drafts[:, :longest], vocab), next_token[:, None]], dim=1)
        seen.scatter_(1, committed, True)

        draft_rows, next_tokens = drafts.tolist(), next_token.tolist()
        ended = []
        for i, row in enumerate(running.rows):
            if row.finish_reason is not None:  # a finished row of a static batch
                continue
            row.stats.target_steps += 1
            row.stats.drafted_tokens += k if row.settings.speculative else 0
            row.stats.accepted_drafts += accepted[i]
            before = len(row.token_ids)
            self._commit(row, draft_rows[i][: accepted[i]] + [next_tokens[i]])
            row.stats.accepted_lengths.append(len(row.token_ids) - before)
            if row.finish_reason is not None:
                ended.append(row)
                if self.prefix_cache is not None:
                    self._remember(running, i)
        return accepted, ended

    def _remember(self, running: _Running, i: int) -> None:
        """Keep row i's tokens that the target's cache holds (prompt and answer; past a stop token too, harmless:
        a prefix's keys and values do not depend on what follows it), with each model's keys and values."""
        kv = {m: _row_kv(cache, i, running.mask[i, : cache.length].nonzero().squeeze(1))
              for m, cache in enumerate(running.caches)}
        held = running.caches[0].length
        self.prefix_cache.store(running.seq[i, :held][running.mask[i, :held].bool()].tolist(), kv)
        row = running.rows[i]
        if row.cached_prompt is not None:
            self.prefix_cache.discard(row.cached_prompt)
            row.cached_prompt = None

    def _propose(self, k, seq, full_mask, positions, padded, draft_cache, seen, sampling, generator):
        """Draft k tokens per row, one draft forward each; returns them [B, k] and their distributions.

        full_mask / positions cover the committed sequence plus the k drafts. The first forward feeds whatever the
        draft's cache lacks of the committed sequence, each later one the previous draft. Greedy drafts need no
        distribution (greedy verification only compares tokens), so none is built for them.
        """
        drafts = seq.new_empty((seq.shape[0], k))
        draft_probs = []
        penalise = sampling.penalised
        draft_seen = seen.clone() if penalise else None
        tokens = seq[:, draft_cache.length :] if k else None
        for j in range(k):
            logits = self._forward(
                self.draft, tokens, full_mask, draft_cache, last=1, head=self.frspec_head, positions=positions,
                padded=padded,
            )[:, 0]
            token, probs = self._draw_draft(logits, draft_seen, sampling, generator)
            if probs is not None:
                draft_probs.append(probs)
            drafts[:, j] = token
            tokens = drafts[:, j : j + 1]
            if penalise:
                draft_seen.scatter_(1, token[:, None], True)
        return drafts, draft_probs

    def _draw_draft(self, logits, seen, sampling: RowSampling, generator):
        """Draw one draft token per row; returns it and the full-vocabulary draft distribution (None when every row
        is greedy; a greedy row among sampled ones gets its one-hot distribution)."""
        head = self.frspec_head
        if seen is not None:
            seen = seen[:, : self.target.config.vocab_size]
            if head is not None:
                seen = seen[:, head.token_ids]
        if sampling.all_greedy:  # the argmax of the (penalised) logits, as the one-hot greedy distribution would give
            if seen is not None:
                logits = apply_repetition_penalty(logits.float(), seen, sampling.repetition_penalty)
            choice = logits.argmax(-1)
            return (choice if head is None else head.token_ids[choice]), None
        probs = logits_to_probs(logits, sampling, seen)
        choice = sample(probs, False, generator)
        if head is None:
            return choice, probs
        return head.token_ids[choice], head.scatter_to_vocab(probs)
