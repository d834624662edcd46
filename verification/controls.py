"""Negative controls and graded series: a text with its words shuffled within each line.

A control keeps a candidate's vocabulary and its amount of text and loses its structure, so a candidate that does not
beat its own control brings nothing but words; verification anneals every candidate's control beside it. The same
shuffling at a share of the lines gives a graded series (real -> half shuffled -> shuffled) for dose-response checks.
Text without spaces between words (Chinese, Japanese) is shuffled by character.
"""

from __future__ import annotations

import hashlib
import random
import re

import pyarrow as pa
import pyarrow.parquet as pq

from core.io import atomic_path, canonical_json
from model.data import DataSource
from verification.config import Candidate

CONTROL_SUFFIX = ".control"
_SPACED = re.compile(r"\S\s+\S")


def shuffle_line(line: str, rng: random.Random) -> str:
    """The line's words (or characters, where words are not separated) in a random order."""
    if _SPACED.search(line.strip()):
        words = line.split()
        rng.shuffle(words)
        return " ".join(words)
    characters = list(line.strip())
    rng.shuffle(characters)
    return "".join(characters)


def shuffle_within_lines(text: str, rng: random.Random, share: float = 1.0) -> str:
    """``text`` with each non-empty line shuffled with probability ``share`` (so ``share`` of the lines of a corpus,
    even one whose documents are single lines), the others as they were."""
    return "\n".join(shuffle_line(line, rng) if line.strip() and rng.random() < share else line
                     for line in text.split("\n"))


def write_shuffled(source: DataSource, path, share: float, seed: int) -> None:
    """The source's documents, each shuffled within lines at ``share``, as Parquet (column ``content``)."""
    rng = random.Random(seed)
    texts = [shuffle_within_lines(text, rng, share) for text in source.documents()]
    with atomic_path(path) as tmp:
        pq.write_table(pa.table({"content": texts}), tmp)


def control_for(candidate: Candidate, fingerprint: dict, directory) -> Candidate:
    """The candidate's control (written once under ``directory``, keyed by the candidate's content)."""
    key = hashlib.sha256(canonical_json([fingerprint, "shuffled within lines"]).encode()).hexdigest()[:16]
    path = directory / f"{candidate.name}-{key}.parquet"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_shuffled(DataSource(candidate.path, text_column=candidate.text_column), path, 1.0, int(key[:8], 16))
    # constructed, not validated: the .control suffix is reserved for these
    return Candidate.model_construct(name=candidate.name + CONTROL_SUFFIX, path=str(path),
                                     text_column="content", resources=candidate.resources)
