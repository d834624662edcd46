"""Filters for synthesized dialogues, as stages (``stages.base.Stage``) over one document per dialogue.

A dialogue travels as a datatrove ``Document`` whose text is its user and assistant messages and whose metadata is
the whole record, so the filters share the UltraClean stage contract: every dialogue not yielded is counted with
a reason. Exact and near-duplicate removal needs the whole run and is done afterwards with ``stages.dedup``.
"""

from __future__ import annotations

import csv
import glob
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import xxhash
from datatrove.data import Document

from sft_synth.config import (
    AnswersFilterConfig,
    BenchmarkSpec,
    DecontaminationConfig,
    FiltersConfig,
    GroundingFilterConfig,
    LanguageFilterConfig,
    LengthFilterConfig,
    resolve_path,
)
from sft_synth.constraints import violated
from sft_synth.tools import TOOL_CALL_OPEN, call_errors, check_tools
from stages.base import Stage
from stages.dedup import (
    DedupConfig,
    duplicate_edges,
    near_duplicates,
    normalize_for_dedup,
)
from stages.langid import LangIdConfig, LanguageIdentifier


def dialogue_text(record: dict) -> str:
    """What a dialogue says: its user and assistant messages (not the shared system prompt)."""
    return "\n\n".join(m["content"] for m in record["messages"] if m["role"] in ("user", "assistant") and m["content"])


def as_document(record: dict) -> Document:
    return Document(text=dialogue_text(record), id=record["id"], metadata={"record": record, "source": record["family"]})


def repeated_ngram_fraction(text: str, n: int) -> float:
    """Share of word n-gram occurrences that repeat an earlier one (0: none repeats; near 1: a loop)."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


class LengthRepetitionFilter(Stage):
    name = "filter_length"

    def __init__(self, config: LengthFilterConfig, accounting=None):
        super().__init__(accounting)
        self.config = config

    def process(self, doc: Document) -> Document | None:
        record = doc.metadata["record"]
        if self.config.drop_truncated and record["truncated"]:
            self.drop("truncated")
            return None
        for message in record["messages"]:
            if message["role"] not in ("user", "assistant") or message.get("tool_calls"):
                continue
            size = len(message["content"])
            if size < self.config.min_chars:
                self.drop(f"{message['role']}_too_short")
                return None
            if size > self.config.max_chars:
                self.drop(f"{message['role']}_too_long")
                return None
            if message["role"] == "assistant" and (
                repeated_ngram_fraction(message["content"], self.config.ngram) > self.config.max_repeated_ngram_fraction
            ):
                self.drop("repetition")
                return None
        return doc


class LanguageFilter(Stage):
    """fastText lid.176 (the UltraClean language-id model) on the assistant's messages."""

    name = "filter_language"

    def __init__(self, config: LanguageFilterConfig, accounting=None):
        super().__init__(accounting)
        self.config = config
        self.identifier = LanguageIdentifier(LangIdConfig(model_path=config.model_path))

    def process(self, doc: Document) -> Document | None:
        record = doc.metadata["record"]
        answers = " ".join(m["content"] for m in record["messages"] if m["role"] == "assistant" and m["content"])
        language, score = self.identifier.identify(answers)
        record["language"] = language
        if self.config.keep_languages is not None and language not in self.config.keep_languages:
            self.drop(f"language_{language}")
            return None
        if score < self.config.min_score:
            self.drop("language_score_below_min")
            return None
        return doc


class ConstraintFilter(Stage):
    """Instruction following: the answer to the constrained instruction must obey every constraint."""

    name = "filter_constraints"

    def process(self, doc: Document) -> Document | None:
        record = doc.metadata["record"]
        if not record["constraints"]:
            return doc
        answer = next(m["content"] for m in record["messages"] if m["role"] == "assistant")
        broken = violated(answer, json.loads(record["constraints"]))
        if broken:
            self.drop(f"constraint_{broken[0]}")
            return None
        return doc


def tool_call_problem(record: dict) -> str | None:
    """Why a dialogue's tool calls are unusable (None: fine): stray call text anywhere; in tool use, a missing
    call, one that does not fit its schema, or one without a tool result."""
    messages = record["messages"]
    if any(m["role"] == "assistant" and TOOL_CALL_OPEN in m["content"] for m in messages):
        return "tool_call_stray_text"
    if record["family"] != "tool_use":
        return None
    if record.get("tool_call_error"):
        return f"tool_call_{record['tool_call_error'].replace(' ', '_')}"
    calls = [call for m in messages if m.get("tool_calls") for call in m["tool_calls"]]
    if not calls:
        return "tool_call_missing"
    tools = check_tools(json.loads(record["tools"]))
    if any(call_errors(call["function"]["name"], call["function"]["arguments"], tools) for call in calls):
        return "tool_call_schema"
    answered = {m.get("tool_call_id") for m in messages if m["role"] == "tool"}
    if any(call["id"] not in answered for call in calls):
        return "tool_result_missing"
    return None


class ToolCallFilter(Stage):
    """Tool use: at least one call, every call fits its schema and gets a tool result; no stray call text."""

    name = "filter_tool_calls"

    def process(self, doc: Document) -> Document | None:
        problem = tool_call_problem(doc.metadata["record"])
        if problem is not None:
            self.drop(problem)
            return None
        return doc


# A number as answers write it: optional sign and currency, thousands separators, decimals ("-$1,200.50").
_NUMBER = r"-?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_FINAL_ANSWER_PATTERNS = (
    re.compile(rf"####\s*({_NUMBER})"),
    re.compile(rf"\\boxed\{{\s*({_NUMBER})"),
    re.compile(rf"answer\s*(?:is|:|=)\s*:?\s*(?:\*\*)?\s*({_NUMBER})", re.IGNORECASE),
)


def parse_number(text: str) -> float | None:
    cleaned = re.sub(r"[\s$,]", "", text)
    try:
        return float(cleaned)
    except ValueError:
        return None


def final_answer(text: str) -> float | None:
    """The final numeric answer of a reply: the last '#### N', '\\boxed{N}' or 'the answer is N', else the last
    number in the text; None when the reply has no number at all."""
    for pattern in _FINAL_ANSWER_PATTERNS:
        found = pattern.findall(text)
        if found:
            return parse_number(found[-1])
    numbers = re.findall(_NUMBER, text)
    return parse_number(numbers[-1]) if numbers else None


def answer_problem(record: dict, relative_tolerance: float) -> str | None:
    """Why a reasoning dialogue's first reply misses its seed's gold answer (None: it matches, or no gold)."""
    gold = parse_number((record["source_seed"] or {}).get("answer") or "")
    if gold is None:
        return None
    reply = next((m["content"] for m in record["messages"] if m["role"] == "assistant"), "")
    value = final_answer(reply)
    if value is None:
        return "answer_missing"
    return None if abs(value - gold) <= relative_tolerance * max(abs(gold), 1.0) else "answer_wrong"


class AnswerFilter(Stage):
    """Reasoning: the first reply's final answer must equal the gold answer of the seed problem (GSM8K)."""

    name = "filter_answers"

    def __init__(self, config: AnswersFilterConfig, accounting=None):
        super().__init__(accounting)
        self.config = config

    def process(self, doc: Document) -> Document | None:
        record = doc.metadata["record"]
        problem = answer_problem(record, self.config.relative_tolerance) if record["family"] == "reasoning" else None
        if problem is not None:
            self.drop(problem)
            return None
        return doc


# English function words: they say nothing about where an answer's content comes from.
STOPWORDS = frozenset({
    "a", "about", "above", "after", "again", "against", "all", "also", "am", "an", "and", "any", "are", "as", "at",
    "be", "because", "been", "before", "being", "below", "between", "both", "but", "by", "can", "could", "did", "do",
    "does", "doing", "down", "during", "each", "few", "for", "from", "further", "had", "has", "have", "having", "he",
    "her", "here", "hers", "herself", "him", "himself", "his", "how", "i", "if", "in", "into", "is", "it", "its",
    "itself", "just", "me", "more", "most", "my", "myself", "no", "nor", "not", "now", "of", "off", "on", "once",
    "only", "or", "other", "our", "ours", "ourselves", "out", "over", "own", "same", "she", "should", "so", "some",
    "such", "than", "that", "the", "their", "theirs", "them", "themselves", "then", "there", "these", "they", "this",
    "those", "through", "to", "too", "under", "until", "up", "very", "was", "we", "were", "what", "when", "where",
    "which", "while", "who", "whom", "why", "will", "with", "would", "you", "your", "yours", "yourself", "yourselves"
})
# Han characters one by one (Chinese has no spaces); other scripts as runs of letters.
_CONTENT_WORD = re.compile(r"[\u3400-\u9fff]|[^\W\d_\u3400-\u9fff]+")


def content_words(text: str) -> set[str]:
    return {w for w in _CONTENT_WORD.findall(text.lower()) if w not in STOPWORDS and (len(w) > 2 or w > "\u3400")}


def grounding(answer: str, passage: str) -> float:
    """Share of the answer's distinct content words that occur in the passage (0 when it has none)."""
    words = content_words(answer)
    return len(words & content_words(passage)) / len(words) if words else 0.0


class GroundingFilter(Stage):
    """Knowledge: the assistant's answers must draw on the seed passage (content-word overlap)."""

    name = "filter_grounding"

    def __init__(self, config: GroundingFilterConfig, accounting=None):
        super().__init__(accounting)
        self.config = config

    def process(self, doc: Document) -> Document | None:
        record = doc.metadata["record"]
        if record["family"] == "knowledge":
            answers = " ".join(m["content"] for m in record["messages"] if m["role"] == "assistant")
            if grounding(answers, record["source_seed"]["text"]) < self.config.min_overlap:
                self.drop("ungrounded")
                return None
        return doc


class BenchmarkIndex:
    """Word n-grams of evaluation items (normalised as for dedup). An item shorter than n words (but at least
    min_item_words) is indexed whole, as one n-gram of its own length."""

    def __init__(self, ngram: int, min_item_words: int):
        self.ngram, self.min_item_words = ngram, min_item_words
        self.grams: dict[int, dict[int, str]] = {}  # length -> gram hash -> benchmark name

    def add(self, text: str, benchmark: str) -> None:
        words = normalize_for_dedup(text).split()
        if len(words) < self.min_item_words:
            return
        n = min(self.ngram, len(words))
        table = self.grams.setdefault(n, {})
        for gram in self._hashes(words, n):
            table.setdefault(gram, benchmark)

    @staticmethod
    def _hashes(words: list[str], n: int) -> Iterator[int]:
        for i in range(len(words) - n + 1):
            yield xxhash.xxh64_intdigest(" ".join(words[i : i + n]))

    def match(self, text: str) -> str | None:
        """The benchmark one of whose n-grams the text contains, or None."""
        words = normalize_for_dedup(text).split()
        for n, table in self.grams.items():
            for gram in self._hashes(words, n):
                if gram in table:
                    return table[gram]
        return None

    def __len__(self) -> int:
        return sum(len(table) for table in self.grams.values())

    @classmethod
    def load(cls, config: DecontaminationConfig, base_dir: Path) -> BenchmarkIndex:
        index = cls(config.ngram, config.min_item_words)
        for spec, files in benchmark_files(config, base_dir):
            for file in files:
                for text in _benchmark_texts(file, spec.format):
                    index.add(text, spec.format)
        return index


def benchmark_files(config: DecontaminationConfig, base_dir: Path) -> list[tuple[BenchmarkSpec, list[Path]]]:
    found = []
    for position, spec in enumerate(config.benchmarks):
        pattern = str(resolve_path(spec.path, base_dir))
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
        if not files:
            raise FileNotFoundError(f"filters.decontamination.benchmarks[{position}].path: no file matches {pattern}")
        found.append((spec, files))
    return found


def _benchmark_texts(path: Path, kind: str) -> Iterator[str]:
    if kind == "gsm8k":
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    item = json.loads(line)
                    yield item["question"]
                    yield item["answer"]
    elif kind == "mmlu":  # rows: question, A, B, C, D, answer (no header)
        with open(path, encoding="utf-8", newline="") as f:
            for row in csv.reader(f):
                if len(row) >= 6:
                    yield row[0]
                    yield " ".join(row[:5])


class DecontaminationFilter(Stage):
    name = "decontamination"

    def __init__(self, index: BenchmarkIndex, accounting=None):
        super().__init__(accounting)
        self.index = index

    def process(self, doc: Document) -> Document | None:
        benchmark = self.index.match(doc.text)
        if benchmark is not None:
            self.drop(f"contaminated_{benchmark}")
            return None
        return doc


def dialogue_filters(config: FiltersConfig, index: BenchmarkIndex | None, accounting) -> list[Stage]:
    """The per-dialogue stages, in order; cheap checks first."""
    stages: list[Stage] = [LengthRepetitionFilter(config.length, accounting)]
    if config.answers.enabled:
        stages.append(AnswerFilter(config.answers, accounting))
    if config.grounding.enabled:
        stages.append(GroundingFilter(config.grounding, accounting))
    if config.tool_calls:
        stages.append(ToolCallFilter(accounting))
    if config.constraints:
        stages.append(ConstraintFilter(accounting))
    if config.language.enabled:
        stages.append(LanguageFilter(config.language, accounting))
    if index is not None:
        stages.append(DecontaminationFilter(index, accounting))
    return stages


def duplicates(keys: pl.DataFrame, config: DedupConfig) -> tuple[np.ndarray, np.ndarray]:
    """Orders of exact duplicates and of near-duplicates (disjoint); each group keeps its first in run order.

    keys: columns order (int64), content_hash (uint64), minhash_bands (list of uint64).
    """
    empty = np.empty(0, np.int64)
    exact = np.sort(duplicate_edges(keys, ["content_hash"])["order"].to_numpy()) if config.exact else empty
    near = empty
    if config.minhash.enabled and len(keys):
        remaining = keys.filter(~pl.col("order").is_in(exact))
        edges = [duplicate_edges(remaining.select("order", pl.col("minhash_bands").list.get(b).alias("key")), ["key"])
                 for b in range(config.minhash.num_bands)]
        near = near_duplicates(pl.concat(edges))
    return exact, near
