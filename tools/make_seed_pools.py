"""Deterministic generator of the embedded default job's seed pools, verification base mix and references.

Reads the original sentences in ``tools/seed_pools/{en,zh}.yaml`` (written for this project, Apache-2.0) and writes,
under ``pipelines/sample_data/seeds/`` (or ``--out-dir``):

* ``prose-{en,zh}.jsonl.gz``     positive seeds: documents of 5-8 sentences of one topic: hand-written ones, and
                                 fills of sentence frames with the topic's words (so there is enough text)
* ``web-{en,zh}.jsonl.gz``       negative seeds: raw-web-like pages (spam lines, navigation, cookie banners)
* ``reference-{en,zh}.jsonl.gz`` verification references: hand-written sentences held out of the seeds and frame
                                 fills never drawn for them
* ``base-mix.jsonl.gz``          the verification base mix: other topics and other web-like pages, both languages

No document, and no sentence, of a reference is in the seeds or the base mix, so the default job's verification
measures what the seeds bring to text of their domain (the job's config check refuses overlaps anyway). Output is
byte-identical on every run (seeded random draws, gzip with mtime 0).

    python tools/make_seed_pools.py [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "pipelines" / "sample_data" / "seeds"
LANGUAGES = {"en": " ", "zh": ""}  # how sentences join
HELD_OUT = {"en": 5, "zh": 4}  # sentences per prose topic kept for the reference only
DOCUMENTS = {"prose": 30, "reference": 10, "base": 45, "web": 200, "base_web": 60}


def _documents(sentences: list[str], count: int, size: tuple[int, int], joiner: str, rng: random.Random) -> list[str]:
    return [joiner.join(rng.sample(sentences, min(len(sentences), rng.randint(*size)))) for _ in range(count)]


class Fills:
    """Sentences of a topic from the shared frames, each drawn once: the seeds and the reference never share one."""

    def __init__(self, frames: list[str], slots: dict[str, list[str]], rng: random.Random):
        self.frames, self.slots, self.rng = frames, slots, rng
        self.used: set[str] = set()

    def fresh(self) -> str:
        while True:
            words = {name: self.rng.choice(choices) for name, choices in self.slots.items()}
            sentence = self.rng.choice(self.frames).format(**words)
            sentence = sentence[0].upper() + sentence[1:]
            if sentence not in self.used:
                self.used.add(sentence)
                return sentence


def _mixed_documents(hand: list[str], fills: Fills, count: int, size: tuple[int, int], joiner: str,
                     rng: random.Random) -> list[str]:
    """Documents of hand-written sentences and fresh frame fills (about two fills in three)."""
    documents = []
    for _ in range(count):
        sentences = [rng.choice(hand) if rng.random() < 0.35 else fills.fresh() for _ in range(rng.randint(*size))]
        documents.append(joiner.join(sentences))
    return documents


def _web_page(web: dict, rng: random.Random) -> str:
    fillers = web["fillers"]
    lines = [rng.choice(web["spam"] + web["boilerplate"]) for _ in range(rng.randint(3, 7))]
    return "\n".join(line.format(**{k: rng.choice(v) for k, v in fillers.items()}) for line in lines)


def build(language: str, bank: dict, rng: random.Random) -> dict[str, list[str]]:
    joiner = LANGUAGES[language]
    prose, reference = [], []
    for topic, sentences in bank["prose"].items():
        seeds, held = sentences[: -HELD_OUT[language]], sentences[-HELD_OUT[language]:]
        fills = Fills(bank["frames"], bank["slots"][topic], rng)
        prose += _mixed_documents(seeds, fills, DOCUMENTS["prose"], (5, 8), joiner, rng)
        reference += _mixed_documents(held, fills, DOCUMENTS["reference"], (3, 5), joiner, rng)
    base = [doc for sentences in bank["base"].values()
            for doc in _documents(sentences, DOCUMENTS["base"], (4, 7), joiner, rng)]
    return {
        f"prose-{language}": prose,
        f"reference-{language}": reference,
        f"web-{language}": [_web_page(bank["web"], rng) for _ in range(DOCUMENTS["web"])],
        "base-mix": base + [_web_page(bank["web"], rng) for _ in range(DOCUMENTS["base_web"])],
    }


def write_jsonl(path: Path, texts: list[str]) -> None:
    lines = "".join(json.dumps({"id": f"{path.name.split('.')[0]}-{i:04d}", "text": text}, ensure_ascii=False) + "\n"
                    for i, text in enumerate(texts))
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        f.write(lines.encode("utf-8"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", type=Path, default=OUT)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    pools: dict[str, list[str]] = {}
    for language in LANGUAGES:
        bank = yaml.safe_load((HERE / "seed_pools" / f"{language}.yaml").read_text(encoding="utf-8"))
        for name, texts in build(language, bank, random.Random(f"seed-pools-{language}")).items():
            pools.setdefault(name, []).extend(texts)
    for name, texts in sorted(pools.items()):
        write_jsonl(args.out_dir / f"{name}.jsonl.gz", texts)
        print(f"{name}: {len(texts)} documents, {sum(map(len, texts))} characters")


if __name__ == "__main__":
    main()
