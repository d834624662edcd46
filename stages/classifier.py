"""The UltraClean quality classifier: fastText trained on positive vs negative seed pools, one per language.

A trained classifier is an immutable directory ``<root>/<classifier_id>/`` (``<root>/latest`` names the newest):

    metadata.json               labels, preprocessing settings, fastText hyperparameters, and per language: its seed
                                documents, split sizes and held-out metrics (precision, recall, F1, ROC-AUC)
    tokenizer.json              the subword tokenizer of the released preprocessing (trained on the seeds, or copied)
    <language>/model.bin        the fastText model of that language (``all`` when one model serves every language)
    <language>/score_histogram.png   held-out score distributions of both classes

As in Ultra-FineWeb, each language has its own classifier (``languages``, default en and zh): the seed documents are
split by their detected language (fastText lid.176), each language with seeds in both pools gets a model, and a
document is scored by its language's model. The id hashes the seed sources' identities, the whole config and the
code, so re-training unchanged inputs reuses the directory. ``QualityClassifier.load`` rebuilds the preprocessing
from the metadata and the stored tokenizer, so training and scoring preprocess identically by construction.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import fasttext
import numpy as np
from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

from core.code_version import code_version
from core.config import Strict
from core.figures import save_figure
from core.io import atomic_write_text, canonical_json, sha256_file
from core.storage import AnyPath, local_copy, resolve_root
from core.versions import open_entry, publish_directory
from model.tokenizer import train_bpe_tokenizer
from stages.langid import LangIdConfig, LanguageIdentifier
from stages.normalize import NormalizeConfig, Normalizer, make_normalizer, prepare_for_tokenizer
from stages.seeds import SeedPools, SeedsConfig, assemble_seed_pools, balance_pools

CLASSIFIER_FORMAT = "ultraclean-classifier/2"
METADATA_NAME = "metadata.json"
MODEL_NAME = "model.bin"
TOKENIZER_NAME = "tokenizer.json"
HISTOGRAM_NAME = "score_histogram.png"
LABEL_PREFIX = "__label__"
ALL_LANGUAGES = "all"
CLASSIFIER_ID = re.compile(r"c-[0-9a-f]{16}")
_M_PERTURB = -6  # glibc mallopt parameter (malloc.h)
# The code that shapes a trained classifier: a change here trains a new one.
CLASSIFIER_CODE = ("stages.classifier", "stages.normalize", "stages.seeds", "model.tokenizer")


class FastTextParams(Strict):
    """``fasttext.train_supervised`` arguments, under fastText's own names; defaults from REFERENCE.md."""

    lr: PositiveFloat = 0.1
    dim: PositiveInt = 256
    epoch: PositiveInt = 3
    wordNgrams: PositiveInt = 3  # fastText's spelling, so the YAML matches its documentation
    minCount: PositiveInt = 5
    minn: NonNegativeInt = 0
    maxn: NonNegativeInt = 0
    bucket: PositiveInt = Field(200_000, description="not published; 200k x dim 256 floats = 205 MB per model")
    loss: Literal["softmax", "ns", "hs", "ova"] = "softmax"
    thread: PositiveInt = Field(1, description="fastText's lock-free SGD is reproducible only with one thread")
    seed: int = 0


class ClassifierLabels(Strict):
    positive: str = "pos"  # the released classifier's __label__pos / __label__neg
    negative: str = "neg"

    @model_validator(mode="after")
    def distinct(self) -> ClassifierLabels:
        if self.positive == self.negative:
            raise ValueError(f"positive and negative labels must differ (both {self.positive!r})")
        if any(c.isspace() for c in self.positive + self.negative):
            raise ValueError("labels cannot contain whitespace (fastText splits on it)")
        return self

    def fasttext_labels(self) -> dict[str, str]:
        return {"positive": LABEL_PREFIX + self.positive, "negative": LABEL_PREFIX + self.negative}


class ClassifierConfig(Strict):
    output_root: str = Field("ultraclean-classifiers", description="classifier root; relative to the working dir")
    seeds: SeedsConfig
    labels: ClassifierLabels = Field(default_factory=ClassifierLabels)
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)
    fasttext: FastTextParams = Field(default_factory=FastTextParams)
    languages: list[str] | None = Field(
        default_factory=lambda: ["en", "zh"],
        description="one classifier per language, seeds split by detected language; null: one for every language",
    )
    langid: LangIdConfig = Field(default_factory=LangIdConfig, description="how seed documents' languages are told")
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="held out of each pool for evaluation")
    decision_threshold: float = Field(0.5, ge=0.0, le=1.0, description="score cut for precision/recall/F1")
    histogram_bins: PositiveInt = 40


class ClassifierError(ValueError):
    """A classifier that cannot be trained or used as configured: missing files, mismatched labels."""


# --- metrics ------------------------------------------------------------------------------------------------------


def roc_auc(scores: np.ndarray, is_positive: np.ndarray) -> float:
    """Area under the ROC curve as the Mann-Whitney statistic, ties counted half (average ranks)."""
    scores, is_positive = np.asarray(scores, np.float64), np.asarray(is_positive, bool)
    n_pos, n_neg = int(is_positive.sum()), int((~is_positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC-AUC needs both classes")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    first_rank = np.cumsum(counts) - counts + 1
    average_rank = first_rank + (counts - 1) / 2.0
    positive_ranks = average_rank[inverse][is_positive].sum()
    return float((positive_ranks - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def binary_metrics(scores: np.ndarray, is_positive: np.ndarray, threshold: float) -> dict:
    predicted = np.asarray(scores) >= threshold
    is_positive = np.asarray(is_positive, bool)
    tp = int((predicted & is_positive).sum())
    fp = int((predicted & ~is_positive).sum())
    fn = int((~predicted & is_positive).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "threshold": threshold,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "accuracy": float((predicted == is_positive).mean()),
        "roc_auc": roc_auc(scores, is_positive),
        "positives": int(is_positive.sum()),
        "negatives": int((~is_positive).sum()),
    }


def write_score_histogram(path: Path, scores: np.ndarray, is_positive: np.ndarray, bins: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    edges = np.linspace(0.0, 1.0, bins + 1)
    axes.hist(scores[is_positive], bins=edges, alpha=0.6, label=f"positive seeds (n={int(is_positive.sum())})")
    axes.hist(scores[~is_positive], bins=edges, alpha=0.6, label=f"negative seeds (n={int((~is_positive).sum())})")
    axes.set_xlabel("score = P(positive label)")
    axes.set_ylabel("held-out documents")
    axes.set_title(title)
    axes.legend()
    save_figure(figure, path)


# --- the model in use ---------------------------------------------------------------------------------------------


class QualityClassifier:
    """A loaded classifier: ``score(texts, languages)`` gives P(positive) per document, NaN where the text
    preprocesses to nothing or its language has no model."""

    def __init__(self, path: Path, metadata: dict, models: dict[str, fasttext.FastText._FastText],
                 normalizer: Normalizer):
        self.path = path
        self.metadata = metadata
        self.models = models
        self.normalizer = normalizer
        self.labels: dict[str, str] = metadata["labels"]
        self.label_order = [self.labels["positive"], self.labels["negative"]]

    @classmethod
    def load(cls, path: str | os.PathLike, expected_labels: ClassifierLabels | None = None) -> QualityClassifier:
        """Open a classifier directory (or a root with ``latest``); check the model files and their labels."""
        path, metadata = open_entry(path, METADATA_NAME, CLASSIFIER_ID, CLASSIFIER_FORMAT,
                                    "a trained classifier (train one first)", ClassifierError)
        if expected_labels is not None and expected_labels.fasttext_labels() != metadata["labels"]:
            raise ClassifierError(
                f"classifier {path} has labels {metadata['labels']}, the config expects "
                f"{expected_labels.fasttext_labels()} (classifier.labels)"
            )
        models = {}
        for language, entry in metadata["languages"].items():
            model_path = path / entry["model_file"]
            if not model_path.is_file():
                raise ClassifierError(f"classifier model file missing: {model_path} (named in {METADATA_NAME})")
            models[language] = fasttext.load_model(str(local_copy(model_path)))
            if sorted(models[language].get_labels()) != sorted(metadata["labels"].values()):
                raise ClassifierError(f"{model_path} predicts labels {sorted(models[language].get_labels())}, but "
                                      f"{METADATA_NAME} declares {sorted(metadata['labels'].values())}")
        tokenizer = local_copy(path / metadata["tokenizer_file"]) if metadata["tokenizer_file"] else None
        normalizer = make_normalizer(NormalizeConfig.model_validate(metadata["normalize"]), tokenizer)
        return cls(path, metadata, models, normalizer)

    @property
    def classifier_id(self) -> str:
        return self.metadata["classifier_id"]

    def model_for(self, language: str | None) -> fasttext.FastText._FastText | None:
        return self.models.get(ALL_LANGUAGES) or self.models.get(language or "")

    def probabilities(self, model: fasttext.FastText._FastText, preprocessed: list[str]) -> np.ndarray:
        """[n, 2] probabilities of the (positive, negative) label for preprocessed, non-empty texts."""
        if not preprocessed:
            return np.empty((0, 2))
        labels, probs = model.predict(preprocessed, k=2)
        column = {label: i for i, label in enumerate(self.label_order)}
        out = np.zeros((len(preprocessed), 2))
        for row, (names, values) in enumerate(zip(labels, probs)):
            for name, value in zip(names, values):
                out[row, column[name]] = value
        # fastText's softmax can overshoot 1 by a rounding error
        return np.clip(out, 0.0, 1.0)

    def score(self, texts: list[str | None], languages: list[str | None] | None = None) -> tuple[np.ndarray, dict]:
        """P(positive label), P(negative label) per text (NaN: empty text, or no model for its language); also how
        many texts were empty, truncated, or in a language without a model."""
        languages = languages if languages is not None else [None] * len(texts)
        present = [i for i, t in enumerate(texts) if t and not t.isspace()]
        results = self.normalizer.normalize_batch([texts[i] for i in present])
        probs = np.full((len(texts), 2), np.nan)
        by_model: dict[int, tuple[fasttext.FastText._FastText, list[int], list[str]]] = {}
        unscored = 0
        for i, (text, _) in zip(present, results):
            model = self.model_for(languages[i])
            if model is None:
                unscored += 1
            elif text:
                by_model.setdefault(id(model), (model, [], []))[1].append(i)
                by_model[id(model)][2].append(text)
        for model, rows, preprocessed in by_model.values():
            probs[rows] = self.probabilities(model, preprocessed)
        empty = len(texts) - len(present) + sum(1 for text, _ in results if not text)
        stats = {"empty": empty, "truncated": sum(cut for _, cut in results), "no_model": unscored}
        return probs, stats


# --- training -----------------------------------------------------------------------------------------------------


@dataclass
class ClassifierResult:
    path: AnyPath
    metadata: dict
    reused: bool


def _split(n: int, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(n)
    held = max(1, round(n * fraction))
    return np.sort(order[held:]), np.sort(order[:held])


def classifier_id(config: ClassifierConfig, pools: SeedPools) -> str:
    tokenizer = config.normalize.tokenizer
    payload = canonical_json({
        "seeds": {"positive": pools.positive.sources, "negative": pools.negative.sources},
        "config": config.model_dump(mode="json", exclude={"output_root"}),
        "tokenizer": sha256_file(tokenizer) if tokenizer else None,
        "code": code_version(*CLASSIFIER_CODE),
    })
    return "c-" + hashlib.sha256(payload.encode()).hexdigest()[:16]


@contextlib.contextmanager
def zero_filled_allocations():
    """Make glibc hand out zero-filled memory for the duration (``M_PERTURB`` = 0xFF: allocations are filled with
    the byte's complement, 0).

    Why: fastText (the NumPy-2 wheel, built from fastText's master) allocates the input embedding matrix with
    ``posix_memalign`` (intgemm's AlignedVector), which does not clear memory, and ``DenseMatrix::uniform`` with
    ``thread=1`` fills only the first tenth of it (it splits the matrix into 10 blocks and fills one per thread).
    The other nine tenths (most word rows and every hashed n-gram bucket) start as whatever the heap held, often
    the weights of a model trained earlier in the process: training on the same file with the same seed gave
    different models, and sometimes "Encountered NaN". Zero-filled, those rows start at 0, as they did in fastText
    0.9.2's release (a zero-initialised std::vector), and every run gives the same model. On a libc without
    ``mallopt`` nothing changes.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        yield
        return
    mallopt(_M_PERTURB, 0xFF)
    try:
        yield
    finally:
        mallopt(_M_PERTURB, 0)


def fit_fasttext(train_file: Path, params: FastTextParams, model_path: Path) -> None:
    with zero_filled_allocations():
        try:
            model = fasttext.train_supervised(input=str(train_file), verbose=0, **params.model_dump())
        except RuntimeError as error:
            raise ClassifierError(f"fastText training failed on {train_file.name}: {error} "
                                  f"(settings: {params.model_dump()})") from None
    model.save_model(str(model_path))


@dataclass
class TrainingSplit:
    """One language's preprocessed seed documents: labelled training lines and held-out (text, is_positive)."""

    train_rows: list[tuple[str, str]]
    eval_rows: list[tuple[str, bool]]
    sizes: dict
    seed: int

    def write_training_file(self, path: Path) -> Path:
        """fastText's input: one ``__label__x text`` line per document, shuffled (its SGD sees lines in file order,
        so the classes must interleave)."""
        order = np.random.default_rng([self.seed, 1]).permutation(len(self.train_rows))
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(f"{self.train_rows[i][0]} {self.train_rows[i][1]}\n" for i in order)
        return path


def split_language(config: ClassifierConfig, positive: list[str], negative: list[str], normalizer: Normalizer,
                   which: str) -> TrainingSplit:
    """Balance, preprocess and hold out ``eval_fraction`` of each pool of one language."""
    rng = np.random.default_rng(config.seeds.seed)
    positive, negative, balance = balance_pools(positive, negative, config.seeds.balance, rng)
    labels = config.labels.fasttext_labels()
    train_rows: list[tuple[str, str]] = []
    eval_rows: list[tuple[str, bool]] = []
    sizes: dict = {"balance": balance}
    for pool_name, pool in (("positive", positive), ("negative", negative)):
        texts = [t for t, _ in normalizer.normalize_batch(pool) if t]
        if len(texts) < 2:
            raise ClassifierError(f"seeds.{pool_name} ({which}): {len(texts)} non-empty document(s) after "
                                  "preprocessing; need >= 2")
        train_idx, eval_idx = _split(len(texts), config.eval_fraction, rng)
        train_rows += [(labels[pool_name], texts[i]) for i in train_idx]
        eval_rows += [(texts[i], pool_name == "positive") for i in eval_idx]
        sizes[pool_name] = {"train": len(train_idx), "eval": len(eval_idx)}
    return TrainingSplit(train_rows, eval_rows, sizes, config.seeds.seed)


def pools_by_language(config: ClassifierConfig, pools: SeedPools) -> tuple[dict[str, tuple[list, list]], dict]:
    """Seed documents per classifier language (``all`` when languages is null), and the languages skipped (no
    seeds in one of the pools) with the counts that left them out."""
    if config.languages is None:
        return {ALL_LANGUAGES: (pools.positive.texts, pools.negative.texts)}, {}
    identifier = LanguageIdentifier(config.langid)
    split: dict[str, tuple[list, list]] = {language: ([], []) for language in config.languages}
    for side, texts in ((0, pools.positive.texts), (1, pools.negative.texts)):
        for text in texts:
            language, _ = identifier.identify(text)
            if language in split:
                split[language][side].append(text)
    skipped = {language: {"positive": len(pos), "negative": len(neg)}
               for language, (pos, neg) in split.items() if len(pos) < 2 or len(neg) < 2}
    return {language: pair for language, pair in split.items() if language not in skipped}, skipped


def prepare_tokenizer(config: ClassifierConfig, pools: SeedPools, staging: Path) -> str | None:
    """The released preprocessing's subword tokenizer, stored with the classifier: the configured file copied, or
    a byte-level BPE trained on the seed pools (after the recipe's own lower-casing and NFKD)."""
    if config.normalize.mode != "released":
        return None
    target = staging / TOKENIZER_NAME
    if config.normalize.tokenizer:
        shutil.copyfile(config.normalize.tokenizer, target)
    else:
        texts = (prepare_for_tokenizer(t) for t in pools.positive.texts + pools.negative.texts)
        train_bpe_tokenizer(texts, config.normalize.tokenizer_vocab_size, target)
    return TOKENIZER_NAME


def train_classifier(config: ClassifierConfig, base_dir: Path, output_root: str | os.PathLike | None = None
                     ) -> ClassifierResult:
    """Assemble the seed pools, train one fastText model per language on its training split, evaluate each on its
    held-out split, publish."""
    pools = assemble_seed_pools(config.seeds, base_dir)
    root = resolve_root(output_root or config.output_root)
    cid = classifier_id(config, pools)
    final = root / cid
    if (final / METADATA_NAME).is_file():
        return ClassifierResult(final, json.loads((final / METADATA_NAME).read_text()), reused=True)
    by_language, skipped = pools_by_language(config, pools)
    if not by_language:
        raise ClassifierError(f"no language has seeds in both pools (languages {config.languages}: {skipped}); "
                              "add seeds, or set classifier.languages to null for one classifier")
    with tempfile.TemporaryDirectory(prefix=f"{cid}-") as scratch:
        staging = Path(scratch)
        tokenizer_file = prepare_tokenizer(config, pools, staging)
        normalizer = make_normalizer(config.normalize, staging / tokenizer_file if tokenizer_file else None)
        metadata = {
            "format": CLASSIFIER_FORMAT,
            "classifier_id": cid,
            "labels": config.labels.fasttext_labels(),
            "normalize": config.normalize.model_dump(mode="json"),
            "tokenizer_file": tokenizer_file,
            "fasttext": config.fasttext.model_dump(mode="json"),
            "seeds": {"positive": pools.positive.sources, "negative": pools.negative.sources,
                      "seed": config.seeds.seed},
            "languages": {},
            "skipped_languages": skipped,
            "eval_fraction": config.eval_fraction,
            "code_version": code_version(*CLASSIFIER_CODE),
        }
        models = {}
        for language, (positive, negative) in by_language.items():
            entry, models[language] = _train_language(config, language, positive, negative, normalizer, staging)
            metadata["languages"][language] = entry
        atomic_write_text(staging / METADATA_NAME, canonical_json(metadata))
        final = publish_directory(staging, root, cid, METADATA_NAME)
    return ClassifierResult(final, metadata, reused=False)


def _train_language(config: ClassifierConfig, language: str, positive: list[str], negative: list[str],
                    normalizer: Normalizer, staging: Path) -> tuple[dict, fasttext.FastText._FastText]:
    directory = staging / language
    directory.mkdir()
    split = split_language(config, positive, negative, normalizer, language)
    train_file = split.write_training_file(directory / "train.txt")
    fit_fasttext(train_file, config.fasttext, directory / MODEL_NAME)
    train_file.unlink()
    model = fasttext.load_model(str(directory / MODEL_NAME))
    probe = QualityClassifier(staging, {"labels": config.labels.fasttext_labels()}, {language: model}, normalizer)
    is_positive = np.array([p for _, p in split.eval_rows], dtype=bool)
    scores = probe.probabilities(model, [t for t, _ in split.eval_rows])[:, 0]
    metrics = binary_metrics(scores, is_positive, config.decision_threshold)
    write_score_histogram(directory / HISTOGRAM_NAME, scores, is_positive, config.histogram_bins,
                          f"{language}: held-out ROC-AUC {metrics['roc_auc']:.3f}")
    entry = {"model_file": f"{language}/{MODEL_NAME}", "model_sha256": sha256_file(directory / MODEL_NAME),
             "histogram": f"{language}/{HISTOGRAM_NAME}", "split": split.sizes, "metrics": metrics}
    return entry, model
