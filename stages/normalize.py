"""The text preprocessing of the quality classifier, one object used unchanged at training and at scoring time.

fastText sees whitespace-separated tokens, so what counts as a token is decided here: a classifier trained on one
preprocessing and scored with another silently degrades, which is why the settings (and the subword tokenizer)
travel with the saved model and the scorer rebuilds the preprocessor from them, never from the job's config.

Two modes:
- ``released`` (default): Ultra-FineWeb's released recipe (openbmb/Ultra-FineWeb-classifier,
  ``preprocess_content.py``): runs of 3+ newlines become 2; lower-case; NFKD with combining marks dropped; subword
  tokenisation, each token decoded on its own and the pieces joined with spaces; ``\\n``, ``\\r``, ``\\t`` written as
  literal escapes; spaces squeezed; stripped. The released classifier used DeepSeek-V2's tokenizer; any Hugging Face
  ``tokenizer.json`` works, and without one a byte-level BPE is trained on the seed pools.
- ``jieba``: the project's earlier normaliser (punctuation split off, Chinese segmented with jieba).
"""

from __future__ import annotations

import logging
import re
import sys
import unicodedata
from pathlib import Path
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
_THREE_NEWLINES = re.compile(r"\n{3,}")
_RUNS_OF_SPACES = re.compile(r" {2,}")
_ESCAPES = str.maketrans({"\n": "\\n", "\r": "\\r", "\t": "\\t"})


class NormalizeConfig(Strict):
    mode: Literal["released", "jieba"] = Field("released", description="Ultra-FineWeb's recipe, or jieba + punctuation")
    tokenizer: str | None = Field(
        None, description="released: a tokenizer.json (any Hugging Face tokenizer); null: a BPE trained on the seeds"
    )
    tokenizer_vocab_size: PositiveInt = Field(16_000, description="released: the vocabulary of a BPE trained here")
    lowercase: bool = Field(True, description="jieba mode")
    fold_whitespace: bool = Field(True, description="jieba mode: collapse runs of spaces and tabs into one space")
    newlines: Literal["space", "eos"] = Field(
        "space", description="jieba mode: a line break becomes a space, or fastText's </s> token"
    )
    punctuation: Literal["keep", "separate", "remove"] = Field(
        "separate", description="jieba mode: leave attached to words, split into tokens of their own, or delete"
    )
    segment_chinese: bool = Field(True, description="jieba mode: split runs of Chinese characters into words")
    max_chars: PositiveInt = Field(
        100_000, description="longer documents are scored on their first max_chars characters (counted as truncated)"
    )
    max_words: PositiveInt = Field(1024, description="and on their first max_words tokens (fastText's line cap)")


class Normalizer:
    """``normalizer(text) -> str``: one line, no newline, ready for fastText training or ``predict``."""

    def __init__(self, config: NormalizeConfig):
        self.config = config

    def __call__(self, text: str) -> str:
        return self.normalize_batch([text])[0][0]

    def normalize_batch(self, texts: list[str]) -> list[tuple[str, bool]]:
        """Each text preprocessed, and whether it was cut at ``max_chars`` or ``max_words``."""
        limit = self.config.max_chars
        results = []
        for text, original in zip(self.transform([t[:limit] for t in texts]), texts):
            words = text.split(maxsplit=self.config.max_words)
            if len(words) > self.config.max_words:
                results.append((" ".join(words[: self.config.max_words]), True))
            else:
                results.append((text, len(original) > limit))
        return results

    def transform(self, texts: list[str]) -> list[str]:
        raise NotImplementedError


_COMBINING: dict[int, None] | None = None


def _drop_combining_marks(text: str) -> str:
    """``"".join(c for c in text if not unicodedata.combining(c))``, as the released recipe, at str.translate speed."""
    global _COMBINING
    if _COMBINING is None:
        _COMBINING = {cp: None for cp in range(sys.maxunicode + 1) if unicodedata.combining(chr(cp))}
    return text.translate(_COMBINING)


def prepare_for_tokenizer(text: str) -> str:
    """The released recipe's steps before tokenisation: 3+ newlines to 2, lower-case, NFKD without combining marks."""
    return _drop_combining_marks(unicodedata.normalize("NFKD", _THREE_NEWLINES.sub("\n\n", text).lower()))


class ReleasedNormalizer(Normalizer):
    def __init__(self, config: NormalizeConfig, tokenizer_path: str | Path):
        super().__init__(config)
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self._pieces: list[str] | None = None

    def pieces(self, ids: list[int]) -> list[str]:
        """Each token decoded on its own. A token that is only part of a character's bytes (byte-level BPE)
        decodes to U+FFFD on its own; such a run is decoded together, so a character is never lost."""
        if self._pieces is None:
            self._pieces = [self.tokenizer.decode([i]) for i in range(self.tokenizer.get_vocab_size())]
        table = self._pieces
        out, start = [], 0
        while start < len(ids):
            piece, end = table[ids[start]], start + 1
            if "\ufffd" in piece:  # the first bytes of a character: take the tokens that complete it (<= 4 bytes)
                for stop in range(start + 2, min(start + 4, len(ids)) + 1):
                    whole = self.tokenizer.decode(ids[start:stop])
                    if "\ufffd" not in whole:
                        piece, end = whole, stop
                        break
            out.append(piece)
            start = end
        return out

    def transform(self, texts: list[str]) -> list[str]:
        encodings = self.tokenizer.encode_batch([prepare_for_tokenizer(t) for t in texts], add_special_tokens=False)
        joined = (" ".join(self.pieces(e.ids)).translate(_ESCAPES) for e in encodings)
        return [_RUNS_OF_SPACES.sub(" ", text).strip() for text in joined]


class JiebaNormalizer(Normalizer):
    def __init__(self, config: NormalizeConfig):
        super().__init__(config)
        self._jieba = None
        if config.segment_chinese:
            import jieba

            jieba.setLogLevel(logging.WARNING)
            jieba.initialize()  # load the dictionary now, not inside the first timed batch
            self._jieba = jieba

    def _segment(self, match: re.Match) -> str:
        return " " + " ".join(self._jieba.lcut(match.group(0), HMM=True)) + " "

    def transform(self, texts: list[str]) -> list[str]:
        return [self._one(text) for text in texts]

    def _one(self, text: str) -> str:
        config = self.config
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
        return _SPACES.sub(" ", text) if config.fold_whitespace else _SEPARATORS.sub(" ", text)


def make_normalizer(config: NormalizeConfig, tokenizer_path: str | Path | None = None) -> Normalizer:
    """The preprocessor a config names; released mode needs the tokenizer file the classifier was trained with."""
    if config.mode == "jieba":
        return JiebaNormalizer(config)
    if tokenizer_path is None:
        raise ValueError("released preprocessing needs a tokenizer.json (normalize.tokenizer, or the classifier's own)")
    return ReleasedNormalizer(config, tokenizer_path)
