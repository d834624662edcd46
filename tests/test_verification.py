"""Efficient verification: real prose kept, broken text not, stage 1 trained once, clear errors, exact scoring."""

import gzip
import json
import math
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from core.config import ConfigError
from model.data import DataSource
from model.minicpm import MiniCPMConfig, MiniCPMForCausalLM
from pipelines.verify import verify
from verification.anneal import CandidateTooSmall
from verification.config import DecisionConfig, ReferenceSet, parse_verification_config
from verification.controls import shuffle_within_lines
from verification.decide import INCONCLUSIVE, KEEP, REJECT, UNDERPOWERED, decide, paired_interval
from verification.evaluate import choice_logprobs, reference_loss, reference_windows
from verification.overlap import check_independence
from verification.report import CURVES_NAME, DELTAS_NAME
from verification.stage1 import Stage1Mismatch

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
WIKI_VALID = DATA / "text" / "wikitext-2" / "valid.txt"
PROXY = {
    "model": {
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "scale_emb": 12,
        "scale_depth": 1.4,
        "dim_model_base": 16,
        "initializer_range": 0.1,
    },
    "tokenizer_vocab_size": 1024,
    "seq_len": 64,
    "batch_size": 16,
    "lr": 0.01,
}


def write_parquet(path: Path, texts: list[str]) -> str:
    pq.write_table(pa.table({"content": texts}), path)
    return str(path)


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    """WikiText-2 valid split in two halves (base mix / candidate), the candidate with its words shuffled, and real
    web text (Common Crawl extractions), as Parquet in a temp dir."""
    root = tmp_path_factory.mktemp("pools")
    docs = [d for d in DataSource(str(WIKI_VALID)).documents() if len(d.split()) >= 20]
    half = len(docs) // 2
    rng = random.Random(0)

    def shuffled(text: str) -> str:
        words = text.split()
        rng.shuffle(words)
        return " ".join(words)

    with gzip.open(DATA / "crawl" / "CC-MAIN-2019-30-extracted.jsonl.gz", "rt") as f:
        web = [json.loads(line)["text"] for line in f]
    return {
        "wiki_base": write_parquet(root / "wiki_base.parquet", docs[:half]),
        "wiki": write_parquet(root / "wiki.parquet", docs[half:]),
        "wiki_shuffled": write_parquet(root / "wiki_shuffled.parquet", [shuffled(d) for d in docs[half:]]),
        "web": write_parquet(root / "web.parquet", web),
        "tiny": write_parquet(root / "tiny.parquet", [docs[half][:300]]),
    }


def config_dict(work_dir: Path, pools: dict, **overrides) -> dict:
    config = {
        "work_dir": str(work_dir),
        "base_mix": [
            {"path": str(DATA / "text" / "tinyshakespeare.txt"), "ratio": 0.5},
            {"path": pools["wiki_base"], "ratio": 0.5},
        ],
        "candidates": [
            {"name": "wiki", "path": pools["wiki"]},
            {"name": "wiki-shuffled", "path": pools["wiki_shuffled"]},
            {"name": "web", "path": pools["web"]},
        ],
        "proxy": PROXY,
        "stage1": {"warmup_steps": 10, "stable_steps": 150},
        "anneal": {"decay_steps": 60, "candidate_ratio": 0.7, "seeds": [0, 1]},
        "evaluation": {
            "reference_sets": [
                {"name": "wikitext", "path": str(DATA / "text" / "wikitext-2" / "test.txt"), "max_sequences": 32},
                {"name": "gsm8k", "path": str(DATA / "bench" / "gsm8k" / "test.jsonl"), "field": "answer",
                 "max_sequences": 16},
            ],
            "mmlu": {"path": str(DATA / "bench" / "mmlu" / "dev"), "max_items": 8},
        },
        "decision": {"metric": "loss:wikitext", "min_effect": 0.03},
    }
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def verified(pools, tmp_path_factory, ray_local):
    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("verify")
    config = parse_verification_config(config_dict(work, pools))
    return config, verify(config)


def test_real_prose_is_kept_and_broken_text_is_not(verified):
    config, result = verified
    decisions = result.decisions
    assert decisions["wiki"].verdict == KEEP, decisions["wiki"].reason
    assert decisions["web"].verdict == REJECT, decisions["web"].reason
    # Shuffled words keep WikiText's vocabulary, which at this proxy size is worth much of what the syntax adds: it
    # may beat the baseline, but never its own control (a shuffle of a shuffle), so it is never kept; and it stays
    # below real prose on every seed by more than the noise.
    shuffled = decisions["wiki-shuffled"]
    assert shuffled.verdict != KEEP and shuffled.versus_control.low <= 0, shuffled.reason
    for seed in config.anneal.seeds:
        assert decisions["wiki"].versus_baseline.per_seed[seed] - shuffled.versus_baseline.per_seed[seed] > 0.05
    assert decisions["wiki"].versus_control.low > 0
    assert result.kept == ["wiki"]

    report = json.loads(result.report_path.read_text())
    assert report["decisions"]["web"]["verdict"] == REJECT
    assert set(report["controls_vs_baseline"]) == {"wiki", "wiki-shuffled", "web"}  # each control beside its candidate
    assert set(report["deltas"]["wiki.control"]) == {"loss:wikitext", "loss:gsm8k", "reference_loss", "mmlu_accuracy"}
    assert len(report["curves"]) == 7 * len(config.anneal.seeds)  # baseline + 3 candidates + 3 controls
    for name in (CURVES_NAME, DELTAS_NAME):
        assert (result.report_path.parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Every anneal used the same budget, and every candidate run really held the candidate at its ratio.
    assert {r["tokens"] for r in result.runs} == {60 * 16 * 64}


def test_stage1_is_trained_once_and_reused(verified, pools):
    config, first = verified
    assert first.stage1.trained
    again = verify(config)
    assert not again.stage1.trained and again.stage1.key == first.stage1.key
    assert len(list((Path(config.work_dir) / "stage1").iterdir())) == 1
    assert {d.verdict for d in again.decisions.values()} == {d.verdict for d in first.decisions.values()}
    assert again.decisions["wiki"] == first.decisions["wiki"]  # reused runs, seeded bootstrap: the same intervals


def test_changed_base_mix_retrains_and_a_mismatched_checkpoint_is_refused(pools, tmp_path, ray_local):
    cheap = {"stage1": {"warmup_steps": 1, "stable_steps": 2}, "anneal": {"decay_steps": 2, "seeds": [0, 1]},
             "candidates": [{"name": "wiki", "path": pools["wiki"]}]}
    config = parse_verification_config(config_dict(tmp_path, pools, **cheap))
    first = verify(config)
    changed_docs = pq.read_table(pools["wiki_base"])["content"].to_pylist()[1:]
    changed_mix = [config.base_mix[0].model_dump(), {"path": write_parquet(tmp_path / "b.parquet", changed_docs)}]
    changed = parse_verification_config(config_dict(tmp_path, pools, **cheap, base_mix=changed_mix))
    second = verify(changed)
    assert first.stage1.trained and second.stage1.trained and first.stage1.key != second.stage1.key
    assert len(list((tmp_path / "stage1").iterdir())) == 2

    stale = changed.model_copy(update={"stage1": changed.stage1.model_copy(
        update={"checkpoint": str(first.stage1.directory)})})
    with pytest.raises(Stage1Mismatch, match="base mix is not the one it was trained on"):
        verify(stale)
    missing = changed.model_copy(update={"stage1": changed.stage1.model_copy(
        update={"checkpoint": str(tmp_path / "nowhere")})})
    with pytest.raises(FileNotFoundError, match="no stage-1 checkpoint"):
        verify(missing)

    too_small = [{"name": "tiny", "path": pools["tiny"]}]
    with pytest.raises(CandidateTooSmall, match="tiny .* too small .* draws 10 sequences"):
        verify(config, candidates=parse_verification_config(
            config_dict(tmp_path, pools, **{**cheap, "candidates": too_small})).candidates)


def _runs(values: np.ndarray, metric: str = "loss:ref") -> dict[int, dict]:
    """seed -> unit values, from an array [seeds, units]."""
    return {seed: {metric: row.tolist()} for seed, row in enumerate(values)}


def test_constant_paired_differences_give_a_point_interval():
    rule = DecisionConfig(metric="loss:ref", min_effect=0.01)
    baseline = np.random.default_rng(0).normal(5.0, 0.3, size=(3, 64))
    interval = paired_interval("loss:ref", _runs(baseline - 0.05), _runs(baseline), rule)
    assert interval.estimate == pytest.approx(0.05) and interval.low == pytest.approx(0.05)
    assert interval.high == pytest.approx(0.05) and interval.per_seed == pytest.approx({0: 0.05, 1: 0.05, 2: 0.05})


def test_interval_width_is_the_standard_error_of_the_paired_mean():
    """Differences of mean 0.02 and standard deviation 0.1 over 3 seeds x 400 windows: the 95% interval is the mean
    plus or minus 1.96 standard errors, 1.96 x 0.1 / sqrt(1200) = 0.0057 (within the bootstrap's own error)."""
    rng = np.random.default_rng(1)
    baseline = rng.normal(5.0, 0.5, size=(3, 400))
    candidate = baseline - rng.normal(0.02, 0.1, size=(3, 400))
    interval = paired_interval("loss:ref", _runs(candidate), _runs(baseline), DecisionConfig(metric="loss:ref"))
    assert interval.half_width == pytest.approx(1.96 * 0.1 / math.sqrt(1200), rel=0.25)
    assert interval.low < interval.estimate < interval.high and abs(interval.estimate - 0.02) < 0.01


def test_verdicts_follow_the_intervals_and_the_control():
    rule = DecisionConfig(metric="loss:ref", min_effect=0.01)
    rng = np.random.default_rng(2)
    baseline = rng.normal(5.0, 0.3, size=(2, 256))

    def noisy(shift: float, sd: float = 0.02) -> dict[int, dict]:
        return _runs(baseline - shift - rng.normal(0, sd, size=baseline.shape))

    assert decide("good", noisy(0.05), _runs(baseline), noisy(0.0), rule).verdict == KEEP
    # as good as its own control: only its words help, so it is rejected however well it does against the baseline
    same_as_control = decide("words", noisy(0.05), _runs(baseline), noisy(0.05), rule)
    assert same_as_control.verdict == REJECT and same_as_control.versus_baseline.low > 0
    assert "only its words help" in same_as_control.reason
    assert decide("bad", noisy(-0.05), _runs(baseline), noisy(-0.05), rule).verdict == REJECT
    # no effect either way, resolved, and a control that is worse: neither keep nor reject
    assert decide("flat", noisy(0.0), _runs(baseline), noisy(-0.05), rule).verdict == INCONCLUSIVE
    wide = decide("noise", noisy(0.005, sd=0.5), _runs(baseline), noisy(0.0, sd=0.5), rule)
    assert wide.verdict == UNDERPOWERED and wide.versus_baseline.half_width > rule.min_effect, wide.reason
    accuracy = DecisionConfig(metric="mmlu_accuracy", min_effect=0.05)
    right = {s: {"mmlu_accuracy": [1.0] * 60 + [0.0] * 40} for s in (0, 1)}
    wrong = {s: {"mmlu_accuracy": [1.0] * 30 + [0.0] * 70} for s in (0, 1)}
    assert decide("mmlu", right, wrong, wrong, accuracy).verdict == KEEP  # higher accuracy is better


def test_controls_and_graded_series_shuffle_within_lines_only():
    rng = random.Random(0)
    text = "the cat sat on the mat\n\nand then it slept all day\n红楼梦是中国古典小说"
    shuffled = shuffle_within_lines(text, rng)
    for before, after in zip(text.split("\n"), shuffled.split("\n")):
        assert sorted(before) == sorted(after)  # the same characters (and, where spaced, the same words)
        assert " " not in before or sorted(before.split()) == sorted(after.split())
    assert shuffled != text and shuffled.split("\n")[1] == ""
    lines = [f"line {i} has a few words in it for shuffling" for i in range(200)]
    half = shuffle_within_lines("\n".join(lines), random.Random(1), share=0.5).split("\n")
    assert sum(a != b for a, b in zip(lines, half)) == pytest.approx(100, abs=20)  # each line at p = 0.5


def tiny_model(vocab: int = 300, seed: int = 0) -> MiniCPMForCausalLM:
    torch.manual_seed(seed)
    return MiniCPMForCausalLM(MiniCPMConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=64, scale_emb=12, dim_model_base=8)).eval()


def test_batched_choice_scores_equal_one_sequence_at_a_time():
    model = tiny_model()
    context = list(range(10, 40))
    continuations = [[5], [7, 8, 9], [100, 101, 102, 103, 104], list(range(200, 250))]
    batched = choice_logprobs(model, context, continuations, max_len=64, device=torch.device("cpu"),
                              precision="fp32")
    for (total, n), continuation in zip(batched, continuations):
        sequence = (context + continuation)[-64:]
        logprobs = torch.log_softmax(model(torch.tensor([sequence])).logits[0], dim=-1)
        start = len(sequence) - len(continuation)
        expected = sum(logprobs[t - 1, sequence[t]].item() for t in range(start, len(sequence)))
        assert n == len(continuation)
        assert total == pytest.approx(expected, abs=1e-4)


def test_reference_loss_of_a_uniform_model_is_log_vocab(tmp_path):
    from model.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer([WIKI_VALID], 300, tmp_path / "tok.json")
    windows = reference_windows(ReferenceSet(name="w", path=str(WIKI_VALID), max_sequences=5), tokenizer, 16)
    assert windows.shape == (5, 17)
    assert torch.equal(windows[1, 0], windows[0, -1])  # windows tile the stream, overlapping by one token
    model = tiny_model(vocab=tokenizer.get_vocab_size())
    torch.nn.init.zeros_(model.model.embed_tokens.weight)  # tied head: all logits 0
    loss = reference_loss(model, windows, batch_size=2, device=torch.device("cpu"), precision="fp32")
    assert loss == pytest.approx(math.log(tokenizer.get_vocab_size()), rel=1e-6)


def test_config_errors_name_the_key(pools, tmp_path):
    good = config_dict(tmp_path, pools)
    with pytest.raises(ConfigError, match=r"anneal\.ratio"):
        parse_verification_config({**good, "anneal": {**good["anneal"], "ratio": 0.3}})
    with pytest.raises(ConfigError, match="names no reference set"):
        parse_verification_config({**good, "decision": {"metric": "loss:hellaswag"}})
    with pytest.raises(ConfigError, match="at least 2"):
        parse_verification_config({**good, "anneal": {**good["anneal"], "seeds": [0]}})
    with pytest.raises(ConfigError, match="baseline"):
        parse_verification_config({**good, "candidates": [{"name": "baseline", "path": pools["wiki"]}]})


def test_reference_sets_that_overlap_a_training_mix_are_refused(pools, tmp_path):
    config = parse_verification_config(config_dict(tmp_path, pools))
    candidates = config.candidates
    same_file = config.model_copy(update={"evaluation": config.evaluation.model_copy(update={"reference_sets": [
        ReferenceSet(name="leak", path=pools["wiki_base"])]})})
    with pytest.raises(ConfigError, match=r"leak is the same file as the base_mix source .*wiki_base"):
        check_independence(same_file, candidates)
    shared = write_parquet(tmp_path / "shared.parquet", pq.read_table(pools["wiki"])["content"].to_pylist()[5:9])
    overlapping = config.model_copy(update={"evaluation": config.evaluation.model_copy(update={"reference_sets": [
        ReferenceSet(name="copied", path=shared)]})})
    with pytest.raises(ConfigError, match=r"copied shares 4 document\(s\) with the candidate wiki"):
        check_independence(overlapping, candidates)
    check_independence(config, candidates)  # WikiText test shares no document with the training text


@pytest.mark.parametrize("name", ["verify-tiny.yaml", "verify-cpu.yaml", "verify-0.5b.yaml"])
def test_shipped_configs_validate_and_keep_references_out_of_the_training_mix(name, tmp_path):
    from verification.config import load_verification_config

    config = load_verification_config(Path(__file__).resolve().parents[1] / "configs" / name)
    config = config.model_copy(update={"work_dir": str(tmp_path)})
    assert config.anneal.candidate_ratio == 0.3
    if name != "verify-0.5b.yaml":  # the GPU config names the user's data
        assert all(Path(s.path).exists() for s in config.base_mix)
        check_independence(config, config.candidates)


def test_ultraclean_job_trains_the_classifier_on_verified_seeds_only(verified, pools, tmp_path):
    """``steps: [verify_seeds, train_classifier]``: of two positive seed sources, only the one verification keeps
    reaches the classifier. The verification section is the fixture's (same work dir), so its runs are reused."""
    from pipelines.config import parse_config
    from pipelines.ultraclean import run_steps

    verification_config, _ = verified
    job = parse_config({
        "steps": ["verify_seeds", "train_classifier"],
        "classifier": {
            "output_root": str(tmp_path / "classifiers"),
            "seeds": {
                "positive": {"sources": [{"path": pools["wiki"]}, {"path": pools["web"]}]},
                "negative": {"sources": [{"path": pools["web"]}]},  # raw web text, as in the paper
            },
            "fasttext": {"dim": 16, "epoch": 2, "bucket": 20000},
        },
        "verification": verification_config.model_dump(),
    })
    run_steps(job, tmp_path, job.steps)
    classifier_dir = tmp_path / "classifiers" / (tmp_path / "classifiers" / "latest").read_text().strip()
    metadata = json.loads((classifier_dir / "metadata.json").read_text())
    assert [s["path"] for s in metadata["seeds"]["positive"]] == [pools["wiki"]]
    assert len(list((Path(verification_config.work_dir) / "stage1").iterdir())) == 1  # stage 1 reused, not retrained


def test_verify_seeds_step_needs_its_sections():
    from pipelines.config import parse_config

    with pytest.raises(ConfigError, match="verify_seeds step needs a verification section"):
        parse_config({"steps": ["verify_seeds", "train_classifier"], "classifier": {
            "seeds": {"positive": {"sources": [{"path": "a.txt"}]}, "negative": {"sources": [{"path": "b.txt"}]}}}})


def test_underpowered_verification_stops_the_ultraclean_job_before_training(monkeypatch, pools, tmp_path):
    """An underpowered verdict is no verdict: the job must not go on to train on seeds it could not verify."""
    from types import SimpleNamespace

    from pipelines import ultraclean
    from pipelines.config import parse_config
    from verification.decide import Decision, Interval

    wide = Interval(0.01, -0.2, 0.22, {0: 0.01, 1: 0.01})
    decisions = {"wiki": Decision("wiki", UNDERPOWERED, "loss:wikitext", wide, wide, "intervals too wide")}
    monkeypatch.setattr(ultraclean, "verify", lambda config, candidates: SimpleNamespace(
        decisions=decisions, kept=[], report_path=tmp_path / "report.json"))
    monkeypatch.setattr(ultraclean, "format_decisions", lambda result: "")
    job = parse_config({
        "steps": ["verify_seeds", "train_classifier"],
        "classifier": {"output_root": str(tmp_path / "classifiers"),
                       "seeds": {"positive": {"sources": [{"path": pools["wiki"]}]},
                                 "negative": {"sources": [{"path": pools["web"]}]}}},
        "verification": config_dict(tmp_path, pools),
    })
    with pytest.raises(ultraclean.VerificationRejected, match=r"could not decide on the seed sources \['wiki'\]"):
        ultraclean.run_steps(job, tmp_path, job.steps)
    assert not (tmp_path / "classifiers").exists()
