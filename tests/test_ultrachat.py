"""UltraChat v2 synthesis: seeds, filters against planted examples, the chat format, and the whole job on Ray.

The end-to-end run uses tiny random-weight MiniCPM models (a target and a smaller draft, so speculative decoding
runs) and a BPE tokenizer trained on TinyShakespeare: the dialogues are gibberish, so the e2e config keeps only
the checks gibberish can pass honestly (length, constraints that a 12-token answer always meets, guided tool calls
with string arguments, decontamination, dedup); every filter is tested on planted good and bad examples.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import datasets
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from core.config import ConfigError
from core.manifest import publish_table, verify_version
from core.storage import location
from model.minicpm import MiniCPMConfig, MiniCPMForCausalLM
from model.tokenizer import train_bpe_tokenizer
from pipelines.ultrachat import main, plan_chunks, plan_synthesis, run_ultrachat
from sft_synth.chat_format import render_prompt, render_with_template
from sft_synth.config import (
    AnswersFilterConfig,
    DecontaminationConfig,
    GroundingFilterConfig,
    LanguageFilterConfig,
    LengthFilterConfig,
    load_config,
    parse_config,
)
from sft_synth.constraints import CONSTRAINTS, violated
from sft_synth.dataset import PART_SCHEMA, arrow_messages, render_row
from sft_synth.filters import (
    AnswerFilter,
    BenchmarkIndex,
    ConstraintFilter,
    DecontaminationFilter,
    GroundingFilter,
    LanguageFilter,
    LengthRepetitionFilter,
    ToolCallFilter,
    answer_problem,
    as_document,
    duplicates,
    parse_number,
)
from sft_synth.quality import assistant_replies, distinct_n, self_similarity
from sft_synth.seeds import build_seeds, gold_answer
from sft_synth.tools import openai_tool_call, parse_tool_calls
from stages.dedup import DedupConfig, MinHasher, dedup_keys

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".." / "shared" / "data"
GSM8K = DATA / "bench" / "gsm8k"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"], "additionalProperties": False}}}
NOTE = {"type": "function", "function": {
    "name": "save_note", "description": "Save a note.",
    "parameters": {"type": "object", "properties": {"title": {"type": "string"}, "body": {"type": "string"}},
                   "required": ["title", "body"]}}}
ANSWER = ("Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to make "
          "sugar and release oxygen. It happens mostly in the leaves, inside small structures called chloroplasts.")


def record(family="knowledge", answer=ANSWER, *, question="How do plants make their food?", order=0, **extra):
    return {
        "id": f"{family}-{order}", "family": family, "order": order, "truncated": False, "tool_call_error": None,
        "tools": "", "constraints": "", "language": None,
        "messages": [{"role": "system", "content": "Be helpful."}, {"role": "user", "content": question},
                     {"role": "assistant", "content": answer}],
        **extra,
    }


def run_stage(stage, records):
    kept = [doc.metadata["record"] for doc in stage.run(as_document(r) for r in records)]
    return kept, {reason: n for reasons in stage.accounting.dropped.values() for reason, n in reasons.items()}


# ---------------------------------------------------------------------------------------------------- filters


def test_length_and_repetition_filter_rejects_planted_bad_dialogues():
    stage = LengthRepetitionFilter(LengthFilterConfig(min_chars=20, max_chars=1000, max_repeated_ngram_fraction=0.3))
    loop = "the cat sat on the mat " * 20
    bad = [record(answer="Yes.", order=1), record(answer="x" * 1001, order=2), record(answer=loop, order=3),
           record(order=4, truncated=True)]
    kept, reasons = run_stage(stage, [record(), *bad])
    assert [r["order"] for r in kept] == [0]
    assert reasons == {"assistant_too_short": 1, "assistant_too_long": 1, "repetition": 1, "truncated": 1}


def test_language_filter_keeps_english_and_drops_other_languages():
    stage = LanguageFilter(LanguageFilterConfig(keep_languages=["en"], min_score=0.5))
    german = record(order=1, answer="Die Photosynthese ist der Vorgang, bei dem grüne Pflanzen mit Sonnenlicht, "
                                    "Wasser und Kohlendioxid Zucker herstellen und Sauerstoff abgeben.")
    kept, reasons = run_stage(stage, [record(), german])
    assert [r["order"] for r in kept] == [0] and kept[0]["language"] == "en"
    assert reasons == {"language_de": 1}


CONSTRAINT_CASES = [
    ({"kind": "max_words", "words": 5}, "One two three four five.", "One two three four five six."),
    ({"kind": "min_words", "words": 3}, "one two three", "one two"),
    ({"kind": "include_keywords", "keywords": ["energy", "simple"]}, "Simple: energy flows.", "Energy flows."),
    ({"kind": "exclude_keywords", "keywords": ["energy"]}, "Power flows.", "Energy flows."),
    ({"kind": "bullet_list", "items": 2}, "- first\n- second", "- first\n- second\n- third"),
    ({"kind": "json_output"}, '```json\n{"a": 1}\n```', 'Here: {"a": 1}'),
    ({"kind": "lowercase"}, "all lower case.", "Not all lower."),
    ({"kind": "end_with", "phrase": "That is all."}, "Done. That is all.", "That is all. Done."),
]


@pytest.mark.parametrize(("constraint", "good", "bad"), CONSTRAINT_CASES)
def test_constraint_checkers(constraint, good, bad):
    assert violated(good, [constraint]) == []
    assert violated(bad, [constraint]) == [constraint["kind"]]


def test_every_constraint_kind_is_covered_by_a_checker_case():
    assert {case[0]["kind"] for case in CONSTRAINT_CASES} == set(CONSTRAINTS)


def test_constraint_filter_checks_the_answer_to_the_instruction():
    constraints = json.dumps([{"kind": "max_words", "words": 40}, {"kind": "include_keywords", "keywords": ["sugar"]}])
    good = record("instruction", constraints=constraints)
    bad = record("instruction", answer=ANSWER.replace("sugar", "food"), order=1, constraints=constraints)
    kept, reasons = run_stage(ConstraintFilter(), [good, bad, record(order=2)])
    assert [r["order"] for r in kept] == [0, 2]
    assert reasons == {"constraint_include_keywords": 1}


GSM8K_QUESTION = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                  "How many clips did Natalia sell altogether in April and May?")


def reasoning(answer, gold="72", order=0):
    return record("reasoning", answer=answer, question=GSM8K_QUESTION, order=order,
                  source_seed={"id": "train.jsonl:0", "source": "train.jsonl", "text": GSM8K_QUESTION, "answer": gold})


def test_answer_filter_keeps_only_replies_whose_final_number_is_the_gold_answer():
    replies = [
        ("In May she sold 48 / 2 = 24 clips, so 48 + 24 = 72 in all.\n#### 72", "72", None),
        ("48 + 24 = 72. The answer is 72.", "72", None),
        ("Altogether that is $1,200.00.", "1200", None),  # currency, separators and decimals compare as numbers
        ("She sold 48 + 24 clips, 72 in total.", "72", None),  # no marker: the last number
        ("She sold 48 + 24 = 70 clips.\n#### 70", "72", "answer_wrong"),
        ("The answer is 72, since 24 were sold in May.", "72", None),  # the stated answer, not the last number
        ("In April the clips went out,\nin May the half came about.", "72", "answer_missing"),  # verse, no number
        ("#### 72", None, None),  # no gold answer: nothing to check
    ]
    records = [reasoning(text, gold, order) for order, (text, gold, _) in enumerate(replies)]
    records.append(record(order=len(records), answer="No numbers here at all, and this is no reasoning dialogue."))
    kept, reasons = run_stage(AnswerFilter(AnswersFilterConfig()), records)
    assert [r["order"] for r in kept] == [i for i, case in enumerate(replies) if case[2] is None] + [len(replies)]
    assert reasons == {"answer_wrong": 1, "answer_missing": 1}


def test_answer_check_on_every_gsm8k_train_solution():
    """Real data: each worked solution passes against its own gold answer and fails against another item's."""
    tolerance = AnswersFilterConfig().relative_tolerance
    items = [json.loads(line) for line in (GSM8K / "train.jsonl").read_text().splitlines()]
    golds = [gold_answer(item["answer"]) for item in items]
    own = Counter(answer_problem(reasoning(item["answer"], gold), tolerance) for item, gold in zip(items, golds))
    assert own == {None: len(items)}
    shifted = Counter(answer_problem(reasoning(item["answer"], gold), tolerance)
                      for item, gold, own_gold in zip(items, golds[1:], golds)
                      if parse_number(gold) != parse_number(own_gold))
    assert shifted == {"answer_wrong": sum(shifted.values())}


def test_grounding_filter_measures_content_word_overlap_with_the_passage():
    passage = ("Photosynthesis takes place in chloroplasts. Green plants absorb sunlight with chlorophyll and turn "
               "water and carbon dioxide into glucose, releasing oxygen.")
    seed = {"id": "docs:0", "source": "docs", "text": passage, "answer": None}
    # content words of the answer: chloroplasts, absorb, sunlight, release, oxygen, leaves -> 4 of 6 in the passage
    grounded = record(answer="Chloroplasts absorb sunlight and release oxygen from the leaves.", source_seed=seed)
    # volcanoes, erupt, magma, rises, crust, oxygen -> 1 of 6
    drifted = record(answer="Volcanoes erupt when magma rises through the crust, with oxygen.", order=1,
                     source_seed=seed)
    other_family = {**drifted, "family": "instruction", "order": 2}
    kept, reasons = run_stage(GroundingFilter(GroundingFilterConfig(min_overlap=0.5)), [grounded, drifted, other_family])
    assert [r["order"] for r in kept] == [0, 2] and reasons == {"ungrounded": 1}
    kept, _ = run_stage(GroundingFilter(GroundingFilterConfig(min_overlap=0.15)), [drifted])
    assert len(kept) == 1  # 1/6 = 0.167 passes a threshold of 0.15


def tool_dialogue(order, name="get_weather", arguments=None, *, answered=True):
    call = openai_tool_call("call_0", name, {"city": "Paris"} if arguments is None else arguments)
    messages = [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [call]}]
    if answered:
        messages.append({"role": "tool", "tool_call_id": "call_0", "content": '{"temperature": 21}'})
    messages.append({"role": "assistant", "content": "It is 21 degrees in Paris."})
    return {**record("tool_use", order=order), "messages": messages, "tools": json.dumps([WEATHER, NOTE])}


def test_tool_call_filter_validates_calls_against_the_schema():
    bad = [
        tool_dialogue(1, arguments={"city": "Paris", "days": "two"}),  # wrong type
        tool_dialogue(2, arguments={"town": "Paris"}),  # required property missing, unknown property
        tool_dialogue(3, name="book_flight"),  # no such tool
        tool_dialogue(4, answered=False),
        {**record("tool_use", order=5), "tools": json.dumps([WEATHER])},  # answered without calling
        {**record("tool_use", order=6), "tools": json.dumps([WEATHER]), "tool_call_error": "tool call is not JSON"},
        record(order=7, answer='<tool_call>{"name": "get_weather"}</tool_call>'),  # a call left in plain text
    ]
    kept, reasons = run_stage(ToolCallFilter(), [tool_dialogue(0, arguments={"city": "Paris", "days": 2}), *bad])
    assert [r["order"] for r in kept] == [0]
    assert reasons == {"tool_call_schema": 3, "tool_result_missing": 1, "tool_call_missing": 1,
                       "tool_call_tool_call_is_not_JSON": 1, "tool_call_stray_text": 1}


def test_tool_calls_are_parsed_from_model_text():
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert parse_tool_calls(text) == [{"name": "get_weather", "arguments": {"city": "Oslo"}}]
    assert parse_tool_calls("<tool_call>{name: get_weather}</tool_call>") is None
    assert parse_tool_calls("No call here.") == []


def test_exact_and_near_duplicates_are_removed_keeping_the_first():
    base = ANSWER + " " + "Chlorophyll absorbs mostly red and blue light and reflects green light, " * 3
    texts = [base, base.upper().replace(",", ""),  # exact after normalisation
             base.replace("green plants", "plants"),  # one edit: near duplicate
             "A completely different answer about volcanoes, magma chambers and eruptions of many kinds."]
    hasher = MinHasher(DedupConfig().minhash)
    keys = [dedup_keys(t, "en", hasher) for t in texts]
    frame = pl.DataFrame({"order": [3, 5, 8, 9], "content_hash": [k[0] for k in keys],
                          "minhash_bands": [k[1] for k in keys]},
                         schema={"order": pl.Int64, "content_hash": pl.UInt64, "minhash_bands": pl.List(pl.UInt64)})
    exact, near = duplicates(frame, DedupConfig())
    assert exact.tolist() == [5] and near.tolist() == [8]


@pytest.fixture(scope="module")
def benchmark_index():
    config = DecontaminationConfig(benchmarks=[{"path": str(GSM8K / "test.jsonl"), "format": "gsm8k"},
                                               {"path": str(DATA / "bench" / "mmlu" / "val" / "*.csv"),
                                                "format": "mmlu"}])
    return BenchmarkIndex.load(config, REPO)


def test_decontamination_removes_a_planted_benchmark_item(benchmark_index):
    test_question = json.loads((GSM8K / "test.jsonl").read_text().splitlines()[5])["question"]
    mmlu_question = "How did the lunar maria form?"  # 5 words: too short to index, too generic to count
    mmlu_long = ("The giant impact that created the Moon left smooth areas that we call the maria")
    planted = [
        record("reasoning", question=f"Please help with this: {test_question.upper()}", order=1),
        record(order=2, answer=f"As the textbook says, {mmlu_long}."),
        record(order=3, question=mmlu_question),
    ]
    kept, reasons = run_stage(DecontaminationFilter(benchmark_index), [record(), *planted])
    assert [r["order"] for r in kept] == [0, 3]
    assert reasons == {"contaminated_gsm8k": 1, "contaminated_mmlu": 1}
    # seeds come from GSM8K *train*; the evaluation items are the test split
    train_question = json.loads((GSM8K / "train.jsonl").read_text().splitlines()[0])["question"]
    assert benchmark_index.match(train_question) is None


# ---------------------------------------------------------------------------------------------------- chat format


def test_chat_template_matches_the_engine_format():
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    expected = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    assert render_with_template(messages) == render_prompt(messages, add_generation_prompt=False) == expected
    tool_messages = tool_dialogue(0)["messages"]
    rendered = render_with_template(tool_messages, [WEATHER])
    assert rendered == render_prompt(tool_messages, [WEATHER], add_generation_prompt=False)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>' in rendered
    assert "<|im_start|>tool\n{\"temperature\": 21}<|im_end|>" in rendered


# ---------------------------------------------------------------------------------------------------- the job


def tiny_model(vocab: int, hidden: int, layers: int, seed: int) -> MiniCPMForCausalLM:
    torch.manual_seed(seed)
    config = MiniCPMConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    return MiniCPMForCausalLM(config).eval()


def document_version(root: Path, texts: list[str]) -> Path:
    """A dataset version holding `content` rows."""
    return publish_table(pa.table({"content": texts}), root, name="documents")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    work = tmp_path_factory.mktemp("ultrachat")
    shakespeare = (DATA / "text" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    tokenizer = train_bpe_tokenizer([shakespeare[:100_000]], 400, work / "tokenizer.json")
    for name, (hidden, layers, seed) in {"target": (64, 2, 0), "draft": (32, 1, 1)}.items():
        tiny_model(tokenizer.get_vocab_size(), hidden, layers, seed).save_pretrained(work / name)
        tokenizer.save(str(work / name / "tokenizer.json"))
    paragraphs = [p for p in shakespeare.split("\n\n") if len(p) > 300][:40]
    document_version(work / "docs", paragraphs + ["\n\n".join(paragraphs[i : i + 12]) for i in range(0, 36, 12)])

    short = {"max_new_tokens": 12, "temperature": 0.8}
    common = {"turns": 2, "system_prompt": "You are a helpful assistant.", "assistant": short, "user": short,
              "user_prompt": "You are a user. Ask about: {material}"}
    config = {
        "name": "ultrachat-test", "seed": 0, "chunk_size": 2,
        "models": {"target": "target", "draft": "draft", "max_batch_size": 4,
                   "speculative": {"num_draft_tokens": 3}},
        "families": {
            "knowledge": {**common, "count": 3, "source": {"path": "docs", "min_chars": 300, "max_chars": 600}},
            "reasoning": {**common, "count": 2, "source": str(GSM8K / "train.jsonl")},
            # a 12-token answer always meets these; the checkers themselves are tested above
            "instruction": {**common, "count": 2, "tasks": ["Explain {topic}."], "topics": ["tides", "bread"],
                            "constraint_kinds": ["max_words", "exclude_keywords"],
                            "keywords": ["zeitgeist", "quixotic", "xylophone"]},
            "long_context": {**common, "count": 2, "turns": 1, "material_chars": 300,
                             "source": {"path": "docs", "min_chars": 3000, "max_chars": 4000}},
            "tool_use": {**common, "count": 2, "turns": 1, "call_mode": "guided", "tools": [WEATHER, NOTE],
                         "tools_per_seed": 2, "tool_prompt": "You are {tool}. Answer {call}.", "tool": short},
        },
        "filters": {"length": {"min_chars": 0, "max_repeated_ngram_fraction": 1.0, "drop_truncated": False},
                    "language": {"enabled": False}, "answers": {"enabled": False}, "grounding": {"enabled": False},
                    "decontamination": {"benchmarks": [{"path": str(GSM8K / "test.jsonl"), "format": "gsm8k"}]}},
        "output": {"root": "out", "keep_work": True},
        "ray": {"num_actors": 2, "cpus_per_actor": 1},
    }
    (work / "ultrachat.yaml").write_text(yaml.safe_dump(config))
    return work


@pytest.fixture(scope="module")
def first_run(job, ray_local):
    assert main(["--config", str(job / "ultrachat.yaml"), "--output", str(job / "out")]) == 0
    return json.loads((job / "out" / (job / "out" / "latest").read_text().strip() / "manifest.json").read_text())


def _obeys(text: str, constraint: dict) -> bool:
    """An oracle written apart from sft_synth.constraints, for the kinds it can decide without ambiguity."""
    kind = constraint["kind"]
    if kind == "lowercase":
        return text.lower() == text and text.upper() != text
    if kind == "end_with":
        return text.rstrip()[-len(constraint["phrase"]):] == constraint["phrase"]
    if kind in ("max_words", "min_words"):
        words = len(re.findall(r"\w+", text))
        return words <= constraint["words"] if kind == "max_words" else words >= constraint["words"]
    if kind == "json_output":
        body = text.strip().removeprefix("```json").removeprefix("```").removesuffix("```")
        try:
            return isinstance(json.loads(body), dict)
        except ValueError:
            return False
    return True


def test_end_to_end_run_writes_a_valid_dataset_in_every_family(job, first_run):
    version = job / "out" / first_run["version_id"]
    assert verify_version(version) == [] and main(["verify", str(version)]) == 0
    assert set(first_run["families"]) == {"knowledge", "reasoning", "instruction", "long_context",
                                                    "tool_use"}
    assert all(count >= 1 for count in first_run["families"].values())
    stages = {row["stage"]: row for row in first_run["stages"]}
    assert stages["generation"]["in"] == 11 and first_run["accounting"]["records_in"] == 11
    assert first_run["models"]["target"].startswith("target@") and first_run["models"]["draft"].startswith("draft@")

    rows = pq.read_table(version / "data" / "shard-00000.parquet").to_pylist()
    gsm8k_train = {json.loads(line)["question"] for line in (GSM8K / "train.jsonl").read_text().splitlines()}
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        assert roles[0] == "system" and roles[1] == "user" and roles[-1] == "assistant"
        assert json.loads(row["generation_settings"])["assistant"]["max_new_tokens"] == 12
        assert row["models"] == first_run["models"]
        if row["family"] == "reasoning":
            assert row["messages"][1]["content"] in gsm8k_train
        if row["family"] == "long_context":
            assert row["messages"][1]["content"].startswith(row["source_seed"]["text"])
        if row["family"] == "tool_use":
            call = row["messages"][2]["tool_calls"][0]
            assert roles[:5] == ["system", "user", "assistant", "tool", "assistant"]
            assert row["messages"][3]["tool_call_id"] == call["id"]
            tool = next(t for t in json.loads(row["tools"]) if t["function"]["name"] == call["function"]["name"])
            assert set(json.loads(call["function"]["arguments"])) == set(tool["function"]["parameters"]["required"])
        if row["family"] == "instruction":
            assert row["messages"][1]["content"].startswith("Explain ")
            for constraint in json.loads(row["constraints"]):
                assert _obeys(row["messages"][2]["content"], constraint), constraint


def test_output_loads_with_datasets_and_renders_with_the_chat_template(job, first_run):
    version = job / "out" / first_run["version_id"]
    parquet = datasets.load_dataset("parquet", data_files=str(version / "data" / "*.parquet"), split="train")
    jsonl = datasets.load_dataset("json", data_files=str(version / "jsonl" / "*.jsonl"), split="train")
    assert len(parquet) == len(jsonl) == first_run["totals"]["rows"]
    assert parquet["id"] == jsonl["id"]
    total = 0
    for row in parquet:
        tools = json.loads(row["tools"]) if row["tools"] else None
        text = render_with_template(row["messages"], tools)
        assert text == render_row(row)
        assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_end|>\n")
        total += len(text)
    assert total == first_run["totals"]["characters"]


def test_rerun_reuses_and_resume_after_interruption_writes_no_duplicates(job, first_run):
    root = job / "out"
    config_path = str(job / "ultrachat.yaml")
    config, base_dir = load_config(config_path)
    again = run_ultrachat(config, base_dir, root)
    assert again.reused and again.version_path.name == first_run["version_id"]

    # Interrupted run: the version was never published and one chunk's part never finished.
    version = root / first_run["version_id"]
    before = pq.read_table(version / "data" / "shard-00000.parquet").to_pylist()
    shutil.rmtree(version)
    (root / "latest").unlink()
    parts = sorted((root / ".work").glob("g-*/parts/part-*.parquet"))
    assert len(parts) == 6
    parts[2].rename(parts[2].with_name(f".{parts[2].name}.tmp"))  # a half-written part is not a part
    resumed = run_ultrachat(config, base_dir, root)
    assert resumed.chunks_generated == 1 and resumed.version_path.name == first_run["version_id"]
    after = pq.read_table(resumed.version_path / "data" / "shard-00000.parquet").to_pylist()
    assert after == before
    assert len({row["id"] for row in after}) == len(after)


def test_seeds_are_deterministic_and_drawn_from_their_sources(job):
    config = parse_config(yaml.safe_load((job / "ultrachat.yaml").read_text()))
    seeds = build_seeds(config, job)
    assert build_seeds(config, job) == seeds
    assert {f: len(s) for f, s in seeds.items()} == {"knowledge": 3, "reasoning": 2, "instruction": 2,
                                                     "long_context": 2, "tool_use": 2}
    other = build_seeds(config.model_copy(update={"seed": 1}), job)
    assert [s.id for s in other["reasoning"]] != [s.id for s in seeds["reasoning"]]
    for seed in seeds["long_context"]:
        assert 3000 <= len(seed.attachment) <= 4000 and seed.attachment.startswith(seed.material)
    for seed in seeds["instruction"]:
        assert seed.opening.startswith("Explain ") and len(seed.constraints) == 2
        assert CONSTRAINTS[seed.constraints[0]["kind"]].describe(seed.constraints[0]) in seed.opening
    for seed in seeds["tool_use"]:
        assert seed.tool == seed.tools[0]["function"]["name"] and len(seed.tools) == 2
    gsm8k = [json.loads(line) for line in (GSM8K / "train.jsonl").read_text().splitlines()]
    for seed in seeds["reasoning"]:
        item = gsm8k[int(seed.id.rsplit(":", 1)[1])]
        assert seed.opening == item["question"]
        assert seed.answer == item["answer"].split("\n")[-1].removeprefix("#### ") and seed.answer.isdigit()


def test_config_errors_name_the_key_and_missing_models_are_named(job, tmp_path):
    data = yaml.safe_load((job / "ultrachat.yaml").read_text())
    broken = copy.deepcopy(data)
    broken["families"]["tool_use"]["tools"][0]["function"]["parameters"] = {"type": "object", "required": "city"}
    with pytest.raises(ConfigError, match="families.tool_use.tools"):
        parse_config(broken)
    broken = copy.deepcopy(data)
    broken["filters"]["lenght"] = {}
    with pytest.raises(ConfigError, match="filters.lenght"):
        parse_config(broken)
    config = parse_config({**data, "models": {"target": "no-such-model"}})
    with pytest.raises(FileNotFoundError, match="models.target: no model at .*no-such-model"):
        run_ultrachat(config, tmp_path, tmp_path / "out")


def test_quality_report_of_a_version_holds_hand_computed_figures(job, ray_local, tmp_path):
    """Parts written by hand where the generation would write them: the job filters them and reports on them."""
    config = parse_config({
        "name": "quality-test", "seed": 0, "chunk_size": 4, "models": {"target": str(job / "target")},
        "families": {"reasoning": {"count": 3, "turns": 1, "system_prompt": "Solve it.", "user_prompt": "{material}",
                                   "source": str(GSM8K / "train.jsonl")}},
        "filters": {"length": {"min_chars": 0}, "language": {"enabled": False}},
        "output": {"root": str(tmp_path / "out")},
    })
    plan = plan_synthesis(config, job)
    [chunk] = plan_chunks(config, plan.seeds, tmp_path / "out" / ".work" / plan.generation_id / "parts")
    seeds = plan.seeds["reasoning"]
    golds = [seed.answer for seed in seeds]
    assert len(set(golds)) == 3 and all(gold.isdigit() for gold in golds)
    replies = [f"The answer is {golds[0]}.", f"The answer is {golds[1]}.", "I do not know."]
    rows = [{"id": f"reasoning-{i}", "family": "reasoning", "order": i, "truncated": False, "tool_call_error": None,
             "tools": "", "constraints": "", "language": None, "generated_tokens": 5, "generation_settings": "{}",
             "models": {"target": "t", "draft": None},
             "source_seed": {"id": seed.id, "source": seed.source, "text": seed.material, "answer": seed.answer},
             "messages": arrow_messages([{"role": "system", "content": "Solve it."},
                                         {"role": "user", "content": seed.opening},
                                         {"role": "assistant", "content": reply}])}
            for i, (seed, reply) in enumerate(zip(seeds, replies))]
    Path(chunk["part_path"]).parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=PART_SCHEMA), chunk["part_path"])

    result = run_ultrachat(config, job, tmp_path / "out")
    assert result.chunks_generated == 0 and verify_version(result.version_path) == []
    report = json.loads((result.version_path / "quality.json").read_text())["families"]["reasoning"]
    assert (result.version_path / "quality.png").read_bytes()[:4] == b"\x89PNG"
    assert report["seeds"] == report["generated"] == 3 and report["kept"] == 2
    stages = {s["stage"]: s for s in report["stages"]}
    assert stages["filter_answers"] == {"stage": "filter_answers", "in": 3, "out": 2, "pass_rate": 0.666667,
                                        "dropped": {"answer_missing": 1}}
    assert stages["generation"]["pass_rate"] == stages["dedup"]["pass_rate"] == 1.0
    assert report["answers"] == {"checked": 3, "correct": 2, "wrong": 0, "missing": 1, "accuracy": 0.666667}
    # kept replies "the answer is G0" and "the answer is G1": 5 of 8 words, 4 of 6 bigrams, 3 of 4 trigrams distinct;
    # trigram sets {the answer is, answer is G0} and {the answer is, answer is G1} share 1 of 3
    assert report["distinct"] == {"1": 0.625, "2": 0.666667, "3": 0.75}
    assert report["self_similarity"] == {"dialogues": 2, "mean_jaccard": 0.333333, "mean_nearest_jaccard": 0.333333}
    assert report["turns"] == {"1": 2}
    assert report["assistant_chars"]["counts"] == [0, 2] + [0] * 9  # 16 to 20 characters each
    card = (result.version_path / "README.md").read_text()
    assert ("| reasoning | 3 | 2 | filter_answers 67% | answer_missing: 1 | answers correct 67% (0 wrong, 1 no number) "
            "| 0.62/0.67/0.75 | 0.333 / 0.333 |") in card


def test_distinct_n_and_self_similarity_on_hand_computed_dialogues():
    def dialogue(*replies):
        return {"messages": [{"role": "user", "content": "q"}, *({"role": "assistant", "content": r} for r in replies)]}

    dialogues = [dialogue("A b, c d."), dialogue("a b c e"), dialogue("x y", "z w v")]
    replies = [reply for d in dialogues for reply in assistant_replies(d)]
    # words a b c d | a b c e | x y | z w v: 13 words, 10 distinct; bigrams ab bc cd | ab bc ce | xy | zw wv: 9, 7 distinct
    assert distinct_n(replies, 1) == round(10 / 13, 6) and distinct_n(replies, 2) == round(7 / 9, 6)
    assert distinct_n(["one two"], 3) is None
    # trigram sets {abc, bcd}, {abc, bce}, {zwv}: J12 = 1/3, J13 = J23 = 0; nearest 1/3, 1/3, 0
    assert self_similarity(dialogues) == {"dialogues": 3, "mean_jaccard": round(1 / 9, 6),
                                          "mean_nearest_jaccard": round(2 / 9, 6)}


def test_the_job_writes_the_same_version_to_object_storage(job, first_run, s3_env):
    """The same job with its output root on the store (a real S3 API on localhost): the same manifest, shards and
    JSONL twins, byte for byte, and ``verify`` passes on the bucket."""
    bucket = location("s3://crawl-bucket/ultrachat")
    assert main(["--config", str(job / "ultrachat.yaml"), "--output", str(bucket)]) == 0
    version = (bucket / "latest").read_text().strip()
    assert version == first_run["version_id"]
    assert (bucket / version / "manifest.json").read_bytes() == (job / "out" / version / "manifest.json").read_bytes()
    assert verify_version(str(bucket)) == []
