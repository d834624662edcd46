"""The one text normaliser of the quality classifier, used unchanged at training and at scoring time.

fastText sees whitespace-separated tokens, so what counts as a token is decided here: a classifier trained on one
normalisation and scored with another silently degrades, which is why the settings travel with the saved model
(``metadata.json``) and the scorer rebuilds the normaliser from them rather than from the job's config.
"""

from __future__ import annotations

import logging
import re
from typing import Literal

from pydantic import Field, PositiveInt

from core.config import Strict

# fastText's own end-of-sentence token: it appends one per input line, so a newline mapped to it keeps the
# paragraph structure visible to the model without breaking the one-example-per-line training file.
EOS_TOKEN = "</s>"
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df]+")
_PUNCTUATION = re.compile(r"([^\w\s])")
_NEWLINES = re.compile(r"\s*\n\s*")
_SPACES = re.compile(r"\s+")
_SEPARATORS = re.compile(r"[\r\v\f\x1c-\x1e\x85\u2028\u2029]")


class NormalizeConfig(Strict):
    lowercase: bool = True
    fold_whitespace: bool = Field(True, description="collapse runs of spaces and tabs into one space")
    newlines: Literal["space", "eos"] = Field(
        "space", description="a line break becomes a space, or fastText's </s> token (keeps paragraph structure)"
    )
    punctuation: Literal["keep", "separate", "remove"] = Field(
        "separate", description="leave attached to words, split into tokens of their own, or delete"
    )
    segment_chinese: bool = Field(True, description="split runs of Chinese characters into words with jieba")
    max_chars: PositiveInt = Field(
        100_000, description="longer documents are scored on their first max_chars characters (counted as truncated)"
    )
    max_words: PositiveInt = Field(
        1024, description="and on their first max_words tokens (fastText's own line cap; far longer lines can drive its training to NaN)"
    )


class TextNormalizer:
    """``normalizer(text) -> str``: one line, no newline, ready for fastText training or ``predict``."""

    def __init__(self, config: NormalizeConfig):
        self.config = config
        self._jieba = None
        if config.segment_chinese:
            import jieba

            jieba.setLogLevel(logging.WARNING)
            jieba.initialize()  # load the dictionary now, not inside the first timed batch
            self._jieba = jieba

    def _segment(self, match: re.Match) -> str:
        return " " + " ".join(self._jieba.lcut(match.group(0), HMM=True)) + " "

    def __call__(self, text: str) -> str:
        return self.normalize(text)[0]

    def normalize(self, text: str) -> tuple[str, bool]:
        """The normalised text, and whether it was cut at ``max_chars`` or ``max_words``."""
        config = self.config
        truncated = len(text) > config.max_chars
        text = text[: config.max_chars]
        if config.lowercase:
            text = text.lower()
        if self._jieba is not None and _CJK.search(text):
            text = _CJK.sub(self._segment, text)
        if config.punctuation == "separate":
            text = _PUNCTUATION.sub(r" \1 ", text)
        elif config.punctuation == "remove":
            text = _PUNCTUATION.sub(" ", text)
        text = _NEWLINES.sub(f" {EOS_TOKEN} " if config.newlines == "eos" else " ", text.strip())
        # any other line separator (\r, \v, \f, U+2028) would still end a fastText example early
        text = _SPACES.sub(" ", text) if config.fold_whitespace else _SEPARATORS.sub(" ", text)
        words = text.split(maxsplit=config.max_words)
        if len(words) > config.max_words:
            text, truncated = " ".join(words[: config.max_words]), True
        return text, truncated
