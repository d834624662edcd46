"""Verifiable instructions (IFEval style): each constraint is told to the user in words and checked in code.

A constraint is a plain dict ``{"kind": ..., **params}`` so that it travels through Parquet (as JSON) and Ray
unchanged. ``describe`` writes the sentence appended to the instruction; ``check`` decides whether a response
obeys it. Both live in one table per kind so that a new kind cannot be described without being checkable.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

_WORD = re.compile(r"\b\w+\b", re.UNICODE)
_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+\S", re.MULTILINE)


def count_words(text: str) -> int:
    return len(_WORD.findall(text))


def _parse_json_object(text: str) -> object | None:
    """The response as JSON, allowing one Markdown code fence around it, as models often add one."""
    stripped = text.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", stripped, flags=re.DOTALL)
    try:
        return json.loads(fenced.group(1) if fenced else stripped)
    except json.JSONDecodeError:
        return None


@dataclass(frozen=True)
class ConstraintKind:
    describe: Callable[[dict], str]
    check: Callable[[str, dict], bool]
    draw: Callable[[random.Random, list[str]], dict]  # params for a new seed; the list is the keyword pool


CONSTRAINTS: dict[str, ConstraintKind] = {
    "max_words": ConstraintKind(
        describe=lambda c: f"Answer in at most {c['words']} words.",
        check=lambda text, c: count_words(text) <= c["words"],
        draw=lambda rng, _: {"words": rng.choice([50, 80, 120, 200])},
    ),
    "min_words": ConstraintKind(
        describe=lambda c: f"Answer in at least {c['words']} words.",
        check=lambda text, c: count_words(text) >= c["words"],
        draw=lambda rng, _: {"words": rng.choice([20, 40, 80])},
    ),
    "include_keywords": ConstraintKind(
        describe=lambda c: "Use the words " + ", ".join(f'"{k}"' for k in c["keywords"]) + " in your answer.",
        check=lambda text, c: all(re.search(rf"\b{re.escape(k)}\b", text, re.IGNORECASE) for k in c["keywords"]),
        draw=lambda rng, pool: {"keywords": sorted(rng.sample(pool, min(2, len(pool))))},
    ),
    "exclude_keywords": ConstraintKind(
        describe=lambda c: "Do not use the words " + ", ".join(f'"{k}"' for k in c["keywords"]) + ".",
        check=lambda text, c: not any(re.search(rf"\b{re.escape(k)}\b", text, re.IGNORECASE) for k in c["keywords"]),
        draw=lambda rng, pool: {"keywords": sorted(rng.sample(pool, min(2, len(pool))))},
    ),
    "bullet_list": ConstraintKind(
        describe=lambda c: f"Format the answer as a bulleted list of exactly {c['items']} items.",
        check=lambda text, c: len(_BULLET.findall(text)) == c["items"],
        draw=lambda rng, _: {"items": rng.choice([3, 4, 5])},
    ),
    "json_output": ConstraintKind(
        describe=lambda c: "Reply with a single JSON object and nothing else.",
        check=lambda text, c: isinstance(_parse_json_object(text), dict),
        draw=lambda rng, _: {},
    ),
    "lowercase": ConstraintKind(
        describe=lambda c: "Write the whole answer in lowercase letters.",
        check=lambda text, c: text == text.lower() and any(ch.isalpha() for ch in text),
        draw=lambda rng, _: {},
    ),
    "end_with": ConstraintKind(
        describe=lambda c: f'End your answer with the exact phrase "{c["phrase"]}".',
        check=lambda text, c: text.rstrip().endswith(c["phrase"]),
        draw=lambda rng, _: {"phrase": rng.choice(["Is there anything else?", "Hope this helps.", "That is all."])},
    ),
}


def draw_constraints(rng: random.Random, kinds: list[str], count: int, keyword_pool: list[str]) -> list[dict]:
    """count constraints of distinct kinds; kinds that contradict each other are never drawn together."""
    conflicts = {frozenset({"max_words", "min_words"}), frozenset({"json_output", "bullet_list"}),
                 frozenset({"json_output", "end_with"}), frozenset({"include_keywords", "exclude_keywords"})}
    chosen: list[str] = []
    for kind in rng.sample(kinds, len(kinds)):
        if len(chosen) == count:
            break
        if all(frozenset({kind, other}) not in conflicts for other in chosen):
            chosen.append(kind)
    return [{"kind": kind, **CONSTRAINTS[kind].draw(rng, keyword_pool)} for kind in sorted(chosen)]


def describe(constraints: list[dict]) -> str:
    return " ".join(CONSTRAINTS[c["kind"]].describe(c) for c in constraints)


def violated(response: str, constraints: list[dict]) -> list[str]:
    """Kinds of the constraints the response breaks (empty: it obeys them all)."""
    return [c["kind"] for c in constraints if not CONSTRAINTS[c["kind"]].check(response, c)]
