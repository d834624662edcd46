"""Heuristic quality filters (Gopher repetition and quality, C4, FineWeb), run through datatrove's implementations.

Each rule set applies to the languages it is configured for (the rules are word-based and tuned for English by
default); a document in another language passes it untouched. Thresholds go to the datatrove class unchanged, so
the names in the YAML are the names in datatrove's documentation.

The decisions are datatrove's, word for word, at a fraction of its cost (tests/test_heuristics.py holds them to
datatrove's own classes on real pages; benchmarks/ingest.py times both). Two things made these rules most of an
ingest's time: datatrove splits words with spaCy inside a memory zone, so every token of every document builds a
fresh lexeme, and its C4 rules run spaCy's sentencizer on every kept line of a document to count sentences up to a
minimum of five. ``CachedWordTokenizer`` splits words once per distinct whitespace-separated chunk (what spaCy's
own tokenizer cache assumes: a chunk's tokens do not depend on its neighbours), ``C4Rules`` stops counting
sentences once the minimum is reached, ``GopherRepetitionRules`` builds each size of n-grams from the last and walks
only the positions that can repeat, and ``GopherQualityRules`` tests each distinct word once.
"""

from __future__ import annotations

import inspect
import operator
import typing
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterator
from functools import cache
from itertools import islice
from typing import Any, Literal

import numpy as np
from datatrove.data import Document
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
)
from datatrove.pipeline.filters.c4_filters import CITATION_REGEX, ELLIPSIS, END_PUNCTUATION, POLICY_SUBSTRINGS
from datatrove.pipeline.filters.gopher_repetition_filter import find_duplicates
from datatrove.utils.text import PUNCTUATION_SET, split_into_sentences, split_into_words
from datatrove.utils.word_tokenizers import SpaCyTokenizer, WordTokenizer, load_word_tokenizer
from pydantic import Field, TypeAdapter, ValidationError, model_validator

from core.config import Strict
from stages.base import Stage


class CachedWordTokenizer(WordTokenizer):
    """datatrove's word tokenizer for a language, with the words of each whitespace-separated chunk computed once.

    Only for spaCy's rule-based tokenizers, which split text at whitespace and then each chunk on its own (prefixes,
    suffixes, infixes, exceptions): a chunk's words are the same wherever it occurs, so a document's words are the
    concatenation of its chunks' words. The chunks a document brings that are not known yet are tokenized in one
    spaCy call, joined by single spaces (a token never spans a space). Other tokenizers (jieba, MeCab, ...) are
    called as datatrove calls them.

    Words and sentences come from a spaCy pipeline built as datatrove builds it, but used without memory zones:
    datatrove's zones free lexemes that a later document can still reach (we saw spaCy raise ``OverflowError`` from
    a sentence's garbage end offset about once in ten test runs). Memory stays bounded instead by starting the
    pipeline and the chunk cache over once they hold ``max_cached`` entries.
    """

    max_cached = 1 << 17  # about 30 MB of chunks and words, as much again of spaCy lexemes

    def __init__(self, language: str):
        super().__init__(language)
        self.datatrove = load_word_tokenizer(language)
        self.nlp = None
        if isinstance(self.datatrove, SpaCyTokenizer) and self.datatrove.language != "ja":
            self.nlp = self._pipeline()
            if type(self.nlp.tokenizer).__name__ != "Tokenizer":  # a segmenter (zh, ko...): not chunk by chunk
                self.nlp = None
        self.chunk_words: dict[str, tuple[str, ...]] = {}

    def _pipeline(self):
        import spacy

        config = self.datatrove.config
        nlp = spacy.blank(self.language, config=config) if config is not None else spacy.blank(self.language)
        nlp.add_pipe("sentencizer")
        return nlp

    def _bounded(self) -> None:
        if len(self.nlp.vocab) > self.max_cached:
            self.nlp = self._pipeline()

    def word_tokenize(self, text: str) -> list[str]:
        if self.nlp is None:
            return self.datatrove.word_tokenize(text)
        try:
            return self._chunked_words(text)
        except Exception:
            if "IS_ALPHA" in text:  # a string that breaks spaCy: datatrove retries without it, so do we
                return self._chunked_words(text.replace("IS_ALPHA", ""))
            raise

    def _chunked_words(self, text: str) -> list[str]:
        chunks = text.split()
        known = self.chunk_words
        unknown = [chunk for chunk in dict.fromkeys(chunks) if chunk not in known]
        if len(known) + len(unknown) > self.max_cached:
            known.clear()
            unknown = list(dict.fromkeys(chunks))
        if unknown:
            joined = " ".join(unknown)
            words: list[str] = []
            position = 0
            self.nlp.max_length = len(joined) + 10
            for token in self.nlp.tokenizer(joined):
                words.append(token.text)
                if token.whitespace_ or token.i == len(token.doc) - 1:
                    known[unknown[position]] = tuple(words)
                    words, position = [], position + 1
            self._bounded()
        return [word for chunk in chunks for word in known[chunk]]

    def sent_tokenize(self, text: str) -> list[str]:
        return self.datatrove.sent_tokenize(text)

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        if self.nlp is None:
            return self.datatrove.span_tokenize(text)
        self.nlp.max_length = len(text) + 10
        try:
            doc = self.nlp(text)
        except Exception:
            if "IS_ALPHA" not in text:
                raise
            doc = self.nlp(text.replace("IS_ALPHA", ""))  # as datatrove: the spans are then of the shorter text
        spans = [(sentence.start_char, sentence.end_char) for sentence in doc.sents]
        self._bounded()
        return spans


@cache
def cached_word_tokenizer(language: str) -> CachedWordTokenizer:
    """One per language and process, shared by every rule set (so a document's chunks are tokenized once)."""
    return CachedWordTokenizer(language)


def ngrams(words: list[str], n: int, separator: str) -> Iterator[str]:
    return map(separator.join, zip(*(islice(words, start, None) for start in range(n))))


def growing_ngrams(words: list[str], sizes: list[int]) -> Iterator[list[str]]:
    """The n-grams of ``words`` joined without spaces (as datatrove's repetition rules join them), for each of
    ``sizes`` in turn, lazily; each next size is the previous n-grams with one word appended, not a fresh join."""
    grams, size = [], 0
    for n in sizes:
        if n < size or size == 0:
            grams, size = list(ngrams(words, n, "")), n
        while size < n:
            grams = list(map(operator.add, grams, words[size:]))
            size += 1
        yield grams


def repeated_ngram_chars(grams: list[str], n: int) -> int:
    """datatrove's ``find_all_duplicate`` on the n-grams ``grams``: characters in n-grams seen before, walking the
    n-grams in order and jumping past each repeat.

    Only a position whose n-gram occurred earlier can be a repeat; every other position the walk reaches is simply
    added to what it has seen. So the walk in Python visits those positions alone (most documents have few or
    none), found in C: the n-gram at such a position was seen if its first occurrence was not jumped over, or if
    an earlier visited position of this walk held it."""
    first = dict(zip(reversed(grams), range(len(grams) - 1, -1, -1)))  # the earliest position is written last
    if len(first) == len(grams):
        return 0
    first_position = np.fromiter(map(first.__getitem__, grams), dtype=np.int64, count=len(grams))
    later = np.flatnonzero(first_position != np.arange(len(grams))).tolist()
    jumped_starts: list[int] = []  # positions start..start+n-2 after each repeat are never visited
    revisited: set[str] = set()
    repeated = position = 0
    for candidate in later:
        if candidate < position:
            continue
        gram = grams[candidate]
        earliest = first[gram]
        jump = bisect_right(jumped_starts, earliest) - 1
        if jump < 0 or jumped_starts[jump] + n - 1 <= earliest or gram in revisited:
            repeated += len(gram)
            jumped_starts.append(candidate + 1)
            position = candidate + n
        else:
            revisited.add(gram)
            position = candidate + 1
    return repeated


class GopherRepetitionRules(GopherRepetitionFilter):
    """datatrove's Gopher repetition rules with the n-gram counts done in C (``Counter`` over one ``map``)."""

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        text = doc.text
        if not text:
            return False, "empty"
        paragraphs = self.paragraph_exp.split(text.strip())
        repeats, chars = find_duplicates(paragraphs)
        if self.dup_para_frac and repeats / len(paragraphs) > self.dup_para_frac:
            return False, "dup_para_frac"
        if self.dup_para_char_frac and chars / len(text) > self.dup_para_char_frac:
            return False, "dup_para_char_frac"
        lines = self._line_splitter.split(text)
        repeats, chars = find_duplicates(lines)
        if self.dup_line_frac and repeats / len(lines) > self.dup_line_frac:
            return False, "dup_line_frac"
        if self.dup_line_char_frac and chars / len(text) > self.dup_line_char_frac:
            return False, "dup_line_char_frac"
        words = split_into_words(text, self.language)
        for n, share in self.top_n_grams:
            if len(words) >= n:
                # most_common keeps the first n-gram seen among equally frequent ones, as datatrove's does
                gram, count = Counter(ngrams(words, n, " ")).most_common(1)[0]
                if len(gram) * count / len(text) > share:
                    return False, f"top_{n}_gram"
        sizes = [n for n, _ in self.dup_n_grams]
        for (n, share), grams in zip(self.dup_n_grams, growing_ngrams(words, sizes)):
            if repeated_ngram_chars(grams, n) / len(text) > share:
                return False, f"duplicated_{n}_n_grams"
        return True


class GopherQualityRules(GopherQualityFilter):
    """datatrove's Gopher quality rules with the per-word tests (has a non-punctuation character, has a letter) run
    once per distinct word and weighted by its count: most of a document's words are repeats."""

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        text = doc.text
        words = split_into_words(text, self.language)
        n_words = len(words)
        counts = Counter(words)
        non_symbol = {word: count for word, count in counts.items() if any(ch not in PUNCTUATION_SET for ch in word)}
        n_non_symbol_words = sum(non_symbol.values())
        if self.min_doc_words and n_non_symbol_words < self.min_doc_words:
            return False, "gopher_short_doc"
        if self.max_doc_words and n_non_symbol_words > self.max_doc_words:
            return False, "gopher_long_doc"
        # datatrove's np.mean of an empty list is nan, which passes both bounds
        chars = sum(len(word) * count for word, count in non_symbol.items())
        avg_word_length = chars / n_non_symbol_words if n_non_symbol_words else float("nan")
        if self.min_avg_word_length and avg_word_length < self.min_avg_word_length:
            return False, "gopher_below_avg_threshold"
        if self.max_avg_word_length and avg_word_length > self.max_avg_word_length:
            return False, "gopher_above_avg_threshold"
        if self.max_symbol_word_ratio and text.count("#") / n_words > self.max_symbol_word_ratio:
            return False, "gopher_too_many_hashes"
        if self.max_symbol_word_ratio and (text.count("...") + text.count("…")) / n_words > self.max_symbol_word_ratio:
            return False, "gopher_too_many_ellipsis"
        lines = text.splitlines()
        if (self.max_bullet_lines_ratio
                and sum(line.lstrip().startswith(("•", "-")) for line in lines) / len(lines) > self.max_bullet_lines_ratio):
            return False, "gopher_too_many_bullets"
        if (self.max_ellipsis_lines_ratio
                and sum(line.rstrip().endswith(("...", "…")) for line in lines) / len(lines) > self.max_ellipsis_lines_ratio):
            return False, "gopher_too_many_end_ellipsis"
        if self.max_non_alpha_words_ratio:
            alpha_words = sum(count for word, count in counts.items() if any(ch.isalpha() for ch in word))
            if alpha_words / n_words < self.max_non_alpha_words_ratio:
                return False, "gopher_below_alpha_threshold"
        if self.min_stop_words and len(self.stop_words.intersection(counts)) < self.min_stop_words:
            return False, "gopher_enough_stop_words"
        return True


class C4Rules(C4QualityFilter):
    """datatrove's C4 rules, counting sentences only until ``min_num_sentences``: beyond it the count decides
    nothing, and counting meant a sentencizer run per kept line."""

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        lines = doc.text.splitlines() if self.split_paragraph else split_into_sentences(doc.text, self.language)
        sentences, kept_lines = 0, []
        for line in lines:
            line = line.strip()
            words = line.split()
            if self.max_word_length != -1 and any(len(word) > self.max_word_length for word in words):
                continue
            if self.remove_citations:
                line = CITATION_REGEX.sub("", line)
            if self.filter_no_terminal_punct and (not line.endswith(END_PUNCTUATION) or line.endswith(ELLIPSIS)):
                continue
            if len(words) < self.min_words_per_line:
                continue
            lowered = line.lower()
            if self.filter_lorem_ipsum and "lorem ipsum" in lowered:
                return False, "lorem_ipsum"
            if self.filter_javascript and "javascript" in lowered:
                continue
            if self.filter_curly_bracket and "{" in line:
                return False, "curly_bracket"
            if self.filter_policy and any(p in lowered for p in POLICY_SUBSTRINGS):
                continue
            if sentences < self.min_num_sentences:
                sentences += len(split_into_sentences(line, self.language)) if self.split_paragraph else 1
            kept_lines.append(line)
        if self.min_num_sentences != -1 and sentences < self.min_num_sentences:
            return False, "too_few_sentences"
        doc.text = ("\n" if self.split_paragraph else " ").join(kept_lines).strip()
        return True


FILTER_CLASSES = {
    "gopher_repetition": GopherRepetitionFilter,
    "gopher_quality": GopherQualityFilter,
    "c4": C4QualityFilter,
    "fineweb": FineWebQualityFilter,
}
FAST_RULES = {"gopher_repetition": GopherRepetitionRules, "gopher_quality": GopherQualityRules, "c4": C4Rules}
_NOT_THRESHOLDS = {"self", "exclusion_writer", "language", "batch_size"}
_FRACTION_WORDS = ("ratio", "frac", "thr", "grams")  # thresholds on shares of a document: at most 1
# datatrove's C4 rules take -1 for "this rule off" (its docstring and defaults); the Gopher rules take None
OFF_AT_MINUS_ONE = {"c4": {"min_num_sentences", "min_words_per_line", "max_word_length"}}


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _numbers(value: Any) -> list[float]:
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _numbers(v)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def check_threshold(kind: str, name: str, value: Any) -> None:
    """A threshold has the type datatrove declares for it (no string where a number goes), is not negative (but for
    datatrove's -1 that turns a C4 rule off), and a share of a document is at most 1. Raises ValueError naming the
    threshold."""
    annotation = inspect.signature(FILTER_CLASSES[kind].__init__).parameters[name].annotation
    arguments = typing.get_args(annotation)
    if typing.get_origin(annotation) is tuple and len(arguments) == 1:  # datatrove's tuple[tuple[int, float]]
        annotation = tuple[arguments[0], ...]
    try:
        TypeAdapter(annotation).validate_python(_as_tuples(value), strict=True)
    except ValidationError as error:
        raise ValueError(f"{name}: {value!r} is not a {annotation} ({error.errors()[0]['msg']})") from None
    can_be_off = name in OFF_AT_MINUS_ONE.get(kind, ())
    if value == -1 and can_be_off:
        return
    numbers = _numbers(value)
    if any(n < 0 for n in numbers):
        raise ValueError(f"{name}: {value!r} holds a negative number{' (-1 turns it off)' if can_be_off else ''}")
    if any(word in name for word in _FRACTION_WORDS) and any(isinstance(n, float) and n > 1 for n in numbers):
        raise ValueError(f"{name}: {value!r} holds a share above 1")


class FilterConfig(Strict):
    kind: Literal["gopher_repetition", "gopher_quality", "c4", "fineweb"]
    enabled: bool = True
    languages: list[str] = Field(default_factory=lambda: ["en"])
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def known_params(self) -> FilterConfig:
        accepted = set(inspect.signature(FILTER_CLASSES[self.kind].__init__).parameters) - _NOT_THRESHOLDS
        unknown = sorted(set(self.params) - accepted)
        if unknown:
            raise ValueError(f"{self.kind} has no threshold(s) {unknown}; accepted: {sorted(accepted)}")
        for name, value in self.params.items():
            check_threshold(self.kind, name, value)
        return self


def default_filters() -> list[FilterConfig]:
    return [FilterConfig(kind=kind) for kind in FILTER_CLASSES]


class HeuristicFilter(Stage):
    """One datatrove rule set; the drop reason is the rule that fired (e.g. ``gopher_short_doc``)."""

    def __init__(self, config: FilterConfig, accounting=None):
        super().__init__(accounting)
        self.name = f"filter_{config.kind}"
        rules = FAST_RULES.get(config.kind, FILTER_CLASSES[config.kind])
        self.filters = {
            language: rules(language=cached_word_tokenizer(language), **config.params) for language in config.languages
        }

    def process(self, doc: Document) -> Document | None:
        rule_set = self.filters.get(doc.metadata["language"])
        if rule_set is None:
            return doc
        verdict = rule_set.filter(doc)
        keep, reason = verdict if isinstance(verdict, tuple) else (verdict, "rejected")
        if keep:
            return doc
        self.drop(reason)
        return None
