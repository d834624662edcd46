"""The UltraClean quality classifier: fastText trained on positive vs negative seed pools, evaluated and versioned.

A trained classifier is an immutable directory ``<root>/<classifier_id>/`` (``<root>/latest`` names the newest):

    model.bin               the fastText model
    metadata.json           labels, normaliser settings, fastText hyperparameters, seed sources with their
                            version ids / sha256s, split sizes and held-out metrics
    score_histogram.png     held-out score distributions of both classes (metrics.json holds the numbers)

The id hashes the seed sources' identities, the whole classifier config and the code version, so re-training with
unchanged inputs reuses the directory. ``QualityClassifier.load`` rebuilds the normaliser from the metadata,
which makes training and scoring normalise identically by construction.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import re
import shutil
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
from core.versions import new_staging, open_entry, publish
from stages.normalize import NormalizeConfig, TextNormalizer
from stages.seeds import SeedPools, SeedsConfig, assemble_seed_pools

CLASSIFIER_FORMAT = "ultraclean-classifier/1"
METADATA_NAME = "metadata.json"
MODEL_NAME = "model.bin"
HISTOGRAM_NAME = "score_histogram.png"
LABEL_PREFIX = "__label__"
CLASSIFIER_ID = re.compile(r"c-[0-9a-f]{16}")
_M_PERTURB = -6  # glibc mallopt parameter (malloc.h)
# The code that shapes a trained classifier: a change here trains a new one.
CLASSIFIER_CODE = ("stages.classifier", "stages.normalize", "stages.seeds")


class FastTextParams(Strict):
    """``fasttext.train_supervised`` arguments, under fastText's own names; defaults from REFERENCE.md."""

    lr: PositiveFloat = 0.1
    dim: PositiveInt = 256
    epoch: PositiveInt = 3
    wordNgrams: PositiveInt = 2  # fastText's spelling, so the YAML matches its documentation
    minCount: PositiveInt = 1
    minn: NonNegativeInt = 0
    maxn: NonNegativeInt = 0
    bucket: PositiveInt = 2_000_000
    loss: Literal["softmax", "ns", "hs", "ova"] = "softmax"
    thread: PositiveInt = Field(1, description="fastText's lock-free SGD is reproducible only with one thread")
    seed: int = 0


class ClassifierLabels(Strict):
    positive: str = "hq"
    negative: str = "lq"

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
    """A loaded classifier: ``score(texts)`` gives P(positive) per document (NaN where the text normalises to nothing)."""

    def __init__(self, path: Path, metadata: dict, model: fasttext.FastText._FastText):
        self.path = path
        self.metadata = metadata
        self.model = model
        self.normalizer = TextNormalizer(NormalizeConfig.model_validate(metadata["normalize"]))
        self.labels: dict[str, str] = metadata["labels"]
        self.label_order = [self.labels["positive"], self.labels["negative"]]

    @classmethod
    def load(cls, path: str | Path, expected_labels: ClassifierLabels | None = None) -> QualityClassifier:
        """Open a classifier directory (or a root with ``latest``); check the model file and its labels."""
        path, metadata = open_entry(path, METADATA_NAME, CLASSIFIER_ID, CLASSIFIER_FORMAT,
                                    "a trained classifier (train one first)", ClassifierError)
        metadata_path = path / METADATA_NAME
        model_path = path / metadata["model_file"]
        if not model_path.is_file():
            raise ClassifierError(f"classifier model file missing: {model_path} (named in {metadata_path})")
        model = fasttext.load_model(str(model_path))
        model_labels = sorted(model.get_labels())
        if model_labels != sorted(metadata["labels"].values()):
            raise ClassifierError(
                f"{model_path} predicts labels {model_labels}, but {METADATA_NAME} declares "
                f"{sorted(metadata['labels'].values())}"
            )
        if expected_labels is not None and expected_labels.fasttext_labels() != metadata["labels"]:
            raise ClassifierError(
                f"classifier {path} has labels {metadata['labels']}, the config expects "
                f"{expected_labels.fasttext_labels()} (classifier.labels)"
            )
        return cls(path, metadata, model)

    @property
    def classifier_id(self) -> str:
        return self.metadata["classifier_id"]

    def probabilities(self, normalized: list[str]) -> np.ndarray:
        """[n, 2] probabilities of (positive, negative) label for already normalised, non-empty texts."""
        if not normalized:
            return np.empty((0, 2))
        labels, probs = self.model.predict(normalized, k=2)
        column = {label: i for i, label in enumerate(self.label_order)}
        out = np.zeros((len(normalized), 2))
        for row, (names, values) in enumerate(zip(labels, probs)):
            for name, value in zip(names, values):
                out[row, column[name]] = value
        # fastText's softmax can overshoot 1 by a rounding error
        return np.clip(out, 0.0, 1.0)

    def score(self, texts: list[str | None]) -> tuple[np.ndarray, dict]:
        """P(positive) per text, NaN for a missing/empty one; also how many texts were empty or truncated."""
        results = [self.normalizer.normalize(t) if t else ("", False) for t in texts]
        present = np.array([bool(t) for t, _ in results], dtype=bool)
        probs = np.full((len(texts), 2), np.nan)
        probs[present] = self.probabilities([t for t, _ in results if t])
        stats = {"empty": int((~present).sum()), "truncated": sum(cut for _, cut in results)}
        return probs, stats


# --- training -----------------------------------------------------------------------------------------------------


@dataclass
class ClassifierResult:
    path: Path
    metadata: dict
    reused: bool


def _split(n: int, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(n)
    held = max(1, round(n * fraction))
    return np.sort(order[held:]), np.sort(order[:held])


def classifier_id(config: ClassifierConfig, pools: SeedPools) -> str:
    payload = canonical_json({
        "seeds": {"positive": pools.positive.sources, "negative": pools.negative.sources},
        "config": config.model_dump(mode="json", exclude={"output_root"}),
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
    """Normalised seed documents: labelled training lines and held-out (text, is_positive) pairs."""

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


def split_pools(config: ClassifierConfig, pools: SeedPools) -> TrainingSplit:
    """Normalise both pools and hold eval_fraction of each out, with the seed pools' seed."""
    labels = config.labels.fasttext_labels()
    normalizer = TextNormalizer(config.normalize)
    rng = np.random.default_rng(config.seeds.seed)
    train_rows: list[tuple[str, str]] = []
    eval_rows: list[tuple[str, bool]] = []
    sizes = {}
    for which, pool in (("positive", pools.positive), ("negative", pools.negative)):
        texts = [normalizer(t) for t in pool.texts]
        texts = [t for t in texts if t]
        if len(texts) < 2:
            raise ClassifierError(f"seeds.{which}: {len(texts)} non-empty document(s) after normalisation; need >= 2")
        train_idx, eval_idx = _split(len(texts), config.eval_fraction, rng)
        train_rows += [(labels[which], texts[i]) for i in train_idx]
        eval_rows += [(texts[i], which == "positive") for i in eval_idx]
        sizes[which] = {"train": len(train_idx), "eval": len(eval_idx)}
    return TrainingSplit(train_rows, eval_rows, sizes, config.seeds.seed)


def train_classifier(config: ClassifierConfig, base_dir: Path, output_root: Path | None = None) -> ClassifierResult:
    """Assemble the seed pools, train fastText on the training split, evaluate on the held-out split, publish."""
    pools = assemble_seed_pools(config.seeds, base_dir)
    root = Path(output_root or config.output_root).resolve()
    cid = classifier_id(config, pools)
    final = root / cid
    if (final / METADATA_NAME).is_file():
        return ClassifierResult(final, json.loads((final / METADATA_NAME).read_text()), reused=True)

    split = split_pools(config, pools)
    staging = new_staging(root, cid)
    try:
        train_file = split.write_training_file(staging / "train.txt")
        fit_fasttext(train_file, config.fasttext, staging / MODEL_NAME)
        train_file.unlink()
        model = fasttext.load_model(str(staging / MODEL_NAME))

        metadata = {
            "format": CLASSIFIER_FORMAT,
            "classifier_id": cid,
            "model_file": MODEL_NAME,
            "model_sha256": sha256_file(staging / MODEL_NAME),
            "labels": config.labels.fasttext_labels(),
            "normalize": config.normalize.model_dump(mode="json"),
            "fasttext": config.fasttext.model_dump(mode="json"),
            "seeds": {
                "positive": pools.positive.sources,
                "negative": pools.negative.sources,
                "balance": pools.balance,
                "seed": config.seeds.seed,
            },
            "split": {"eval_fraction": config.eval_fraction, **split.sizes},
            "code_version": code_version(*CLASSIFIER_CODE),
        }
        classifier = QualityClassifier(staging, metadata, model)
        eval_texts = [t for t, _ in split.eval_rows]
        is_positive = np.array([p for _, p in split.eval_rows], dtype=bool)
        scores = classifier.probabilities(eval_texts)[:, 0]
        metadata["metrics"] = binary_metrics(scores, is_positive, config.decision_threshold)
        write_score_histogram(
            staging / HISTOGRAM_NAME, scores, is_positive, config.histogram_bins,
            f"{cid}: held-out ROC-AUC {metadata['metrics']['roc_auc']:.3f}",
        )
        atomic_write_text(staging / METADATA_NAME, canonical_json(metadata))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ClassifierResult(publish(staging, root, cid), metadata, reused=False)
