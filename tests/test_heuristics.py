"""Our heuristic filters against datatrove's own classes on real web text: the same decision, the same reason, the
same text afterwards (C4 rewrites it), for every document; and the cached word tokenizer against datatrove's.

The reference runs with spaCy's memory zones turned off: they free lexemes that a later document can still reach,
and datatrove's own C4 rules then raised OverflowError on a garbage sentence offset about once in ten runs. A zone
only frees memory; the tokens and sentences are the same without one."""

from __future__ import annotations

import contextlib
import gzip
import json
import random
from collections import Counter
from itertools import islice

import pytest
from datatrove.data import Document
from datatrove.pipeline.filters.gopher_repetition_filter import find_all_duplicate
from datatrove.utils.word_tokenizers import load_word_tokenizer
from spacy.language import Language

from pipelines.config import load_config
from stages.heuristics import (
    FILTER_CLASSES,
    CachedWordTokenizer,
    FilterConfig,
    HeuristicFilter,
    growing_ngrams,
    repeated_ngram_chars,
)


@pytest.fixture(autouse=True)
def no_memory_zones(monkeypatch):
    monkeypatch.setattr(Language, "memory_zone", lambda self, mem=None: contextlib.nullcontext())


@pytest.fixture(scope="module")
def web_texts(shared_data) -> list[str]:
    """Real extracted web pages (Dolma's CC-MAIN-2019-30 excerpt) and WET plain text, some with their lines
    repeated so the repetition rules fire, some cut short so the length rules do."""
    with gzip.open(shared_data / "crawl/CC-MAIN-2019-30-extracted.jsonl.gz", "rt") as lines:
        texts = [json.loads(line)["text"] for line in islice(lines, 160)]
    texts += [text + "\n" + "\n".join(text.splitlines()[:8]) for text in texts[:20]]
    texts += [" ".join(text.split()[:40]) for text in texts[20:30]]
    texts += ["Nous avons\u00a0vu\tle chat\u2003noir. IS_ALPHA est là.\n\n\n(don't) U.S.A. e-mail: a@b.io :-)"]
    return texts


def test_cached_word_tokenizer_equals_datatrove(web_texts):
    datatrove = load_word_tokenizer("en")
    ours = CachedWordTokenizer("en")
    ours.max_cached = 3000  # the chunk cache and the spaCy pipeline start over many times along the way
    first_pipeline = ours.nlp
    for text in web_texts:
        assert ours.word_tokenize(text) == datatrove.word_tokenize(text)
        assert ours.span_tokenize(text) == datatrove.span_tokenize(text)
        for line in text.splitlines()[:5]:
            assert ours.span_tokenize(line) == datatrove.span_tokenize(line)
    assert 0 < len(ours.chunk_words) <= 3000 and len(ours.nlp.vocab) <= 3000 + 1000
    assert ours.nlp is not first_pipeline


def test_filters_decide_as_datatrove(web_texts):
    config, _ = load_config()
    variants = [*config.filters,
                FilterConfig(kind="c4", params={"split_paragraph": False}),
                FilterConfig(kind="c4", params={"min_num_sentences": 0, "filter_no_terminal_punct": True}),
                # datatrove's own way to turn C4's rules off, and a word-length bound that drops lines
                FilterConfig(kind="c4", params={"min_num_sentences": -1, "min_words_per_line": -1,
                                                "max_word_length": -1}),
                FilterConfig(kind="c4", params={"max_word_length": 12}),
                FilterConfig(kind="gopher_repetition", params={"dup_line_frac": None, "dup_para_frac": None,
                                                               "dup_line_char_frac": None, "dup_para_char_frac": None}),
                # the per-word rules decide: barely a length bound, stricter letter and stop-word shares
                FilterConfig(kind="gopher_quality", params={"min_doc_words": 1, "max_doc_words": 0,
                                                            "max_non_alpha_words_ratio": 0.9, "min_stop_words": 8})]
    outcomes: dict[str, set] = {}
    for filter_config in variants:
        ours = HeuristicFilter(filter_config)
        reference = FILTER_CLASSES[filter_config.kind](language="en", **filter_config.params)
        expected_drops: Counter = Counter()
        for number, text in enumerate(web_texts):
            expected = Document(text=text, id=str(number), metadata={"language": "en"})
            verdict = reference.filter(expected)
            expected_keep, expected_reason = verdict if isinstance(verdict, tuple) else (verdict, None)
            doc = Document(text=text, id=str(number), metadata={"language": "en"})
            kept = ours.process(doc)
            assert (kept is not None) == expected_keep, (filter_config.kind, number)
            if expected_keep:
                assert kept.text == expected.text, (filter_config.kind, number)
            else:
                expected_drops[expected_reason] += 1
            outcomes.setdefault(filter_config.kind, set()).add(expected_reason)
        assert dict(ours.accounting.dropped[ours.name]) == dict(expected_drops)
    # the comparison covers both outcomes of every rule set, and more than one reason of the Gopher rules
    assert all(None in reasons and len(reasons) >= 2 for reasons in outcomes.values()), outcomes
    assert len(outcomes["gopher_quality"]) >= 5 and len(outcomes["gopher_repetition"]) >= 3, outcomes


def test_minus_one_turns_a_c4_rule_off_and_is_refused_elsewhere():
    """datatrove documents -1 as "off" for three C4 thresholds: a config copied from it is accepted there, and only
    there; any other negative number is still an error naming the threshold."""
    FilterConfig(kind="c4", params={"min_num_sentences": -1, "min_words_per_line": -1, "max_word_length": -1})
    with pytest.raises(ValueError, match=r"min_num_sentences: -2 holds a negative number \(-1 turns it off\)"):
        FilterConfig(kind="c4", params={"min_num_sentences": -2})
    with pytest.raises(ValueError, match=r"min_doc_words: -1 holds a negative number \[type"):
        FilterConfig(kind="gopher_quality", params={"min_doc_words": -1})


def test_repeated_ngram_chars_equals_datatrove():
    """The walk over repeat candidates only, against datatrove's walk over every position, on word lists made of few
    words that also join into each other ("ab" + "c" = "a" + "bc"), so repeats, jumps over first occurrences and
    equal joins of different words all occur; sizes in any order, as a config may list them."""
    rng = random.Random(0)
    vocabulary = ["a", "b", "ab", "c", "bc", "d"]
    for _ in range(3000):
        words = [rng.choice(vocabulary[:rng.randint(1, 6)]) for _ in range(rng.randint(0, 50))]
        sizes = rng.sample(range(1, 8), rng.randint(1, 4))
        for n, grams in zip(sizes, growing_ngrams(words, sizes)):
            assert repeated_ngram_chars(grams, n) == find_all_duplicate(words, n), (words, n)
