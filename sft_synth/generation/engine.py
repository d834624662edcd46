"""The generation engine: batched prefill and decode with KV caches, plain or speculative (optionally FR-Spec).

One decoding loop serves both modes; plain decoding is the k = 0 case of speculative decoding. A step holds the
invariant that each model's cache stores a prefix of the committed sequence: the target's cache everything but
the last committed token, the draft's at most that. A step feeds each model what its cache lacks, the draft
proposes k tokens one at a time, the target scores all of them in one forward pass, and both caches are cropped
back to the committed prefix, which is exact because a crop only forgets positions.

Batched speculative decoding advances every row by the same number of tokens, the smallest accepted prefix of
any unfinished row plus one, so the rows keep one shared cache length. That stays lossless: any prefix of a
speculative sample is a sample of the target, and a row that accepted more drafts keeps the token at the cut,
which is its accepted draft or its own correction, both drawn from the target's distribution at that position.
The price is that a batch accepts only what its worst row accepts: speculation pays at small batches (latency),
plain batched decoding at large ones (throughput); max_batch_size and GenerationSettings.speculative choose.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from tokenizers import Tokenizer
from torch import nn

from .chat_template import IM_END, apply_chat_template
from .frspec import FRSpecHead, TokenFrequencies
from .sampling import GenerationSettings, apply_repetition_penalty, logits_to_probs, sample
from .speculative import DraftLengthController, verify_greedy, verify_sampling

Prompt = str | Sequence[Mapping[str, str]]
EOS_TOKENS = ("</s>", IM_END)


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
    verify_cost_ratio: float = Field(
        0.0, ge=0.0,
        description="extra target time per additional verified token / target step time: about 0 where a "
        "step is bound by reading the weights (GPU), larger where scoring k + 1 tokens costs more than one (CPU)",
    )


@dataclass
class GenerationStats:
    target_steps: int = 0
    accepted_lengths: list[int] = field(default_factory=list)  # tokens committed per target step
    drafted_tokens: int = 0
    accepted_drafts: int = 0

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
class _Row:
    """Decoding state of one prompt."""

    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_text_end: int | None = None  # where a stop string starts in the decoded text
    stats: GenerationStats = field(default_factory=GenerationStats)


def _parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class GenerationEngine:
    """Generates from a MiniCPM-contract target, optionally drafting with a smaller model on the same tokenizer.

    target / draft: models with forward(input_ids, attention_mask=, position_ids=, cache=) -> .logits,
    new_cache(batch, max_len, device=, dtype=) and caches with .length / .crop(n). FR-Spec needs the draft's
    final_hidden(...) and lm_head_weight().
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
    ):
        self.target, self.draft, self.tokenizer = target.eval(), draft, tokenizer
        self.speculative = speculative or SpeculativeConfig()
        self.max_batch_size, self.prefill_chunk_size = max_batch_size, prefill_chunk_size
        self.bos_id = tokenizer.token_to_id("<s>") if add_bos else None
        if add_bos and self.bos_id is None:
            raise ValueError("add_bos=True but the tokenizer has no <s> token")
        self.eos_ids = [i for i in (tokenizer.token_to_id(t) for t in EOS_TOKENS) if i is not None]
        self.pad_id = tokenizer.token_to_id("<pad>") or 0
        self.device = next(target.parameters()).device

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
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        generator = torch.Generator(device=self.device).manual_seed(settings.seed)
        results: list[Generation] = []
        for start in range(0, len(prompts), self.max_batch_size):
            batch = [_Row(list(p)) for p in prompts[start : start + self.max_batch_size]]
            self._decode_batch(batch, settings, generator)
            results.extend(self._finish(row) for row in batch)
        return results

    def _finish(self, row: _Row) -> Generation:
        ids = row.token_ids
        text_ids = ids[:-1] if row.finish_reason == "stop" and row.stop_text_end is None else ids
        text = self.tokenizer.decode(text_ids, skip_special_tokens=False)
        if row.stop_text_end is not None:
            text = text[: row.stop_text_end]
        return Generation(text, ids, row.finish_reason or "length", row.prompt_token_ids, row.stats)

    def _commit(self, row: _Row, tokens: list[int], settings: GenerationSettings, stop_ids: set[int]) -> None:
        """Append tokens to a row one by one until one of them finishes it."""
        for token in tokens:
            row.token_ids.append(token)
            if token in stop_ids:
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
        kwargs = {
            "attention_mask": mask[:, :end] if padded else None,
            "position_ids": positions[:, start:end],
            "cache": cache,
        }
        if last == 0 or head is not None:
            hidden = model.final_hidden(tokens, **kwargs)
            return head(hidden[:, -last:]).float() if last else None
        return model(tokens, **kwargs).logits[:, -last:]

    def _prefill(self, model, seq, mask, cache) -> None:
        """Fill a cache with all but the last token, in chunks so that long prompts keep activations bounded."""
        for start in range(0, seq.shape[1] - 1, self.prefill_chunk_size):
            end = min(start + self.prefill_chunk_size, seq.shape[1] - 1)
            self._forward(model, seq[:, start:end], mask, cache, last=0)

    def _new_cache(self, model, batch: int, max_len: int):
        parameter = next(model.parameters())
        return model.new_cache(batch, max_len, device=parameter.device, dtype=parameter.dtype)

    def draft_cost_ratio(self) -> float:
        if self.speculative.draft_cost_ratio is not None:
            return self.speculative.draft_cost_ratio
        draft_params = _parameter_count(self.draft)
        if self.frspec_head is not None:
            vocab, hidden = self.draft.lm_head_weight().shape
            draft_params -= (vocab - self.frspec_head.token_ids.numel()) * hidden
        return draft_params / _parameter_count(self.target)

    # ------------------------------------------------------------------ decoding loop

    @torch.no_grad()
    def _decode_batch(self, rows: list[_Row], settings: GenerationSettings, generator: torch.Generator) -> None:
        use_draft = settings.speculative and self.draft is not None
        spec = self.speculative
        controller = (
            DraftLengthController(
                initial=spec.num_draft_tokens,
                minimum=spec.min_draft_tokens,
                maximum=spec.max_draft_tokens,
                cost_ratio=self.draft_cost_ratio(),
                adaptive=spec.adaptive,
                verify_cost_ratio=spec.verify_cost_ratio,
            )
            if use_draft
            else None
        )
        stop_ids = set(settings.stop_token_ids) | (set() if settings.ignore_eos else set(self.eos_ids))
        batch, longest = len(rows), max(len(r.prompt_token_ids) for r in rows)
        seq = torch.full((batch, longest), self.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros((batch, longest), dtype=torch.long, device=self.device)
        for i, row in enumerate(rows):  # left padding: every row's next token goes in the same column
            seq[i, longest - len(row.prompt_token_ids) :] = torch.tensor(row.prompt_token_ids)
            mask[i, longest - len(row.prompt_token_ids) :] = 1
        max_len = longest + settings.max_new_tokens + (spec.max_draft_tokens if use_draft else 0) + 1
        vocab = self.target.config.vocab_size
        penalise = settings.repetition_penalty != 1.0
        # Tokens in each row's context, for the repetition penalty; column `vocab` absorbs the padding.
        seen = torch.zeros((batch, vocab + 1), dtype=torch.bool, device=self.device)
        if penalise:
            seen.scatter_(1, torch.where(mask.bool(), seq, vocab), True)

        padded = not bool(mask.all())  # left padding never goes away: decided once per batch
        target_cache = self._new_cache(self.target, batch, max_len)
        self._prefill(self.target, seq, mask, target_cache)
        if use_draft:
            draft_cache = self._new_cache(self.draft, batch, max_len)
            self._prefill(self.draft, seq, mask, draft_cache)

        while True:
            active = [i for i, row in enumerate(rows) if row.finish_reason is None]
            if not active:
                return
            remaining = max(settings.max_new_tokens - len(rows[i].token_ids) for i in active)
            k = min(controller.k, remaining - 1) if use_draft else 0
            # The mask and positions of the committed sequence plus k drafts, shared by the draft and the target.
            full_mask = torch.cat([mask, mask.new_ones((batch, k))], dim=1)
            positions = (full_mask.cumsum(-1) - 1).clamp_(min=0)
            drafts, draft_probs = self._propose(
                k, seq, full_mask, positions, padded, draft_cache if use_draft else None, seen, settings, generator
            )

            context = torch.cat([seq, drafts], dim=1)
            n = seq.shape[1]
            logits = self._forward(
                self.target, context[:, target_cache.length :], full_mask, target_cache, last=k + 1,
                positions=positions, padded=padded,
            )
            target_seen = None
            if penalise:  # position j of the verification has seen the drafts before it
                drafted = torch.zeros((batch, k + 1, vocab + 1), dtype=torch.int32, device=self.device)
                drafted[:, 1:].scatter_(2, drafts[:, :, None], 1)
                target_seen = (seen[:, None, :] | (drafted.cumsum(dim=1) > 0))[..., :vocab]
            target_probs = logits_to_probs(logits, settings, target_seen)

            if k == 0:
                num_accepted = torch.zeros(batch, dtype=torch.long, device=self.device)
                next_token = sample(target_probs[:, 0], settings.greedy, generator)
            elif settings.greedy:
                num_accepted, next_token = verify_greedy(drafts, target_probs)
            else:
                num_accepted, next_token = verify_sampling(drafts, torch.stack(draft_probs, 1), target_probs, generator)

            accepted = num_accepted.tolist()
            step = min(accepted[i] for i in active)
            cut_token = next_token if step == k else torch.where(num_accepted > step, drafts[:, step], next_token)
            committed = torch.cat([drafts[:, :step], cut_token[:, None]], dim=1)

            seq = torch.cat([seq, committed], dim=1)
            mask = torch.cat([mask, torch.ones_like(committed)], dim=1)
            target_cache.crop(n + step)
            if use_draft:
                draft_cache.crop(min(draft_cache.length, n + step))
                if k:
                    controller.update([accepted[i] for i in active], k)
            if penalise:
                seen.scatter_(1, committed, True)

            committed_rows = committed.tolist()
            for i in active:
                row = rows[i]
                row.stats.target_steps += 1
                row.stats.drafted_tokens += k
                row.stats.accepted_drafts += accepted[i]
                before = len(row.token_ids)
                self._commit(row, committed_rows[i], settings, stop_ids)
                row.stats.accepted_lengths.append(len(row.token_ids) - before)

    def _propose(self, k, seq, full_mask, positions, padded, draft_cache, seen, settings, generator):
        """Draft k tokens per row, one draft forward each; returns them [B, k] and their distributions.

        full_mask / positions cover the committed sequence plus the k drafts. The first forward feeds whatever the
        draft's cache lacks of the committed sequence, each later one the previous draft. Greedy drafts need no
        distribution (greedy verification only compares tokens), so none is built for them.
        """
        drafts = seq.new_empty((seq.shape[0], k))
        draft_probs = []
        penalise = settings.repetition_penalty != 1.0
        draft_seen = seen.clone() if penalise else None
        tokens = seq[:, draft_cache.length :] if k else None
        for j in range(k):
            logits = self._forward(
                self.draft, tokens, full_mask, draft_cache, last=1, head=self.frspec_head, positions=positions,
                padded=padded,
            )[:, 0]
            token, probs = self._draw_draft(logits, draft_seen, settings, generator)
            if probs is not None:
                draft_probs.append(probs)
            drafts[:, j] = token
            tokens = drafts[:, j : j + 1]
            if penalise:
                draft_seen.scatter_(1, token[:, None], True)
        return drafts, draft_probs

    def _draw_draft(self, logits, seen, settings, generator):
        """Draw one draft token per row; returns it and the full-vocabulary draft distribution (None if greedy)."""
        head = self.frspec_head
        if seen is not None:
            seen = seen[:, : self.target.config.vocab_size]
            if head is not None:
                seen = seen[:, head.token_ids]
        if settings.greedy:  # the argmax of the (penalised) logits, as the one-hot greedy distribution would give
            if seen is not None:
                logits = apply_repetition_penalty(logits.float(), seen, settings.repetition_penalty)
            choice = logits.argmax(-1)
            return (choice if head is None else head.token_ids[choice]), None
        probs = logits_to_probs(logits, settings, seen)
        choice = sample(probs, False, generator)
        if head is None:
            return choice, probs
        return head.token_ids[choice], head.scatter_to_vocab(probs)
