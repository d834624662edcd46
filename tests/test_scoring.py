"""Scoring a dataset version on Ray Data and selecting from it: real CC documents, deterministic output, and
manifests whose counts add up."""

from __future__ import annotations

import json
import math
from collections import Counter

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from core.manifest import publish_table, verify_version
from core.versions import DatasetVersion
from pipelines.config import parse_config
from pipelines.score import score_version
from pipelines.selection import select_version
from pipelines.ultraclean import main as ultraclean_main
from stages.classifier import ClassifierConfig, QualityClassifier, train_classifier
from stages.readers import InputReader, ReadConfig


@pytest.fixture(scope="module")
def setup(ray_local, shared_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("scoring")
    reader = InputReader(shared_data / "crawl/CC-MAIN-2019-30-extracted.jsonl.gz", "jsonl", "cc", ReadConfig())
    docs = list(reader.run())[:240]
    contents = [d.text for d in docs] + ["", "  \n ", docs[0].text * 60]  # empty, blank, huge (> max_chars)
    languages = ["en" if i % 3 else "es" for i in range(len(contents))]  # two language groups of known size
    table = pa.table({"content": contents, "id": [str(i) for i in range(len(contents))], "language": languages})
    parent = publish_table(table, work / "data", name="t", rows_per_shard=100)
    classifier_config = ClassifierConfig.model_validate({
        "seeds": {"positive": {"sources": [{"path": str(shared_data / "text/wikitext-2/valid.txt"), "split": "line",
                                            "min_chars": 200, "max_documents": 150}]},
                  "negative": {"sources": [{"path": str(shared_data / "crawl/CC-MAIN-2019-30-extracted.jsonl.gz"),
                                            "text_key": "text", "max_documents": 150}]}},
        "fasttext": {"dim": 16, "bucket": 20_000, "epoch": 5, "lr": 0.5, "seed": 0, "minCount": 1},
        "languages": None,  # one classifier for both languages of the parent
    })
    classifier = train_classifier(classifier_config, work, work / "classifiers").path
    config = parse_config({"name": "t", "steps": ["score", "select"], "classifier": classifier_config.model_dump(),
                           "scoring": {"batch_size": 64, "workers": 2}, "output": {"rows_per_shard": 150},
                           "select": {"mode": "top_fraction", "top_fraction": 0.3, "per_language": True}})
    scored = score_version(config, parent, classifier, work / "out")
    return config, parent, classifier, scored, table, work


def test_scored_version_adds_scores_that_match_the_classifier(setup):
    _, parent, classifier_path, scored, table, _ = setup
    manifest = scored.manifest
    assert manifest["parent"] == parent.name and not verify_version(scored.version_path)
    assert manifest["accounting"] == {"records_in": len(table), "kept": len(table), "dropped": 0, "quarantined": 0,
                                      "quarantine_entries": 0}
    assert manifest["scoring"] == {"scored": len(table) - 2, "empty": 2, "no_classifier_for_language": 0,
                                   "truncated": 1}
    assert [s["rows"] for s in manifest["shards"]] == [150, 93]  # output.rows_per_shard, whatever the batches
    out = pa.concat_tables(pq.read_table(p) for p in DatasetVersion.open(scored.version_path).shard_paths)
    assert out.column_names == ["content", "id", "language", "score", "prob_pos", "prob_neg"]
    assert out["id"].to_pylist() == table["id"].to_pylist()  # order kept
    expected, _ = QualityClassifier.load(classifier_path).score(table["content"].to_pylist())
    got = out["score"].to_numpy(zero_copy_only=False).astype(np.float64)
    assert np.allclose(np.nan_to_num(got, nan=-1), np.nan_to_num(expected[:, 0], nan=-1), atol=1e-6)
    assert out["score"].null_count == 2
    assert np.allclose(out["prob_pos"].to_numpy(zero_copy_only=False), got, equal_nan=True)


def test_scoring_is_deterministic_and_reuses_a_finished_version(setup, tmp_path):
    config, parent, classifier, scored, _, work = setup
    again = score_version(config, parent, classifier, tmp_path / "out")
    assert again.version_path.name == scored.version_path.name
    assert [s["sha256"] for s in again.manifest["shards"]] == [s["sha256"] for s in scored.manifest["shards"]]
    assert score_version(config, parent, classifier, work / "out").reused


def test_top_fraction_per_language_selection_counts_add_up(setup):
    config, _, _, scored, table, work = setup
    selected = select_version(config, scored.version_path, work / "out")
    manifest = selected.manifest
    accounting = manifest["accounting"]
    assert manifest["parent"] == scored.version_path.name
    assert accounting["records_in"] == len(table) == accounting["kept"] + accounting["dropped"]
    assert manifest["stages"][0]["dropped"]["no_score"] == 2
    out = pa.concat_tables(pq.read_table(p) for p in DatasetVersion.open(selected.version_path).shard_paths)
    scored_table = pa.concat_tables(pq.read_table(p) for p in DatasetVersion.open(scored.version_path).shard_paths)
    valid = scored_table.filter(pc.is_valid(scored_table["score"]))
    for language, n in Counter(valid["language"].to_pylist()).items():
        scores = np.sort(valid.filter(pc.equal(valid["language"], language))["score"].to_numpy())[::-1]
        cutoff = scores[math.ceil(0.3 * n) - 1]
        kept = out.filter(pc.equal(out["language"], language))
        assert len(kept) == int((scores >= cutoff).sum()) >= math.ceil(0.3 * n)
        assert manifest["selection"]["by_language"][language]["kept"] == len(kept)
    assert accounting["kept"] == len(out) == manifest["totals"]["rows"]
    # one split per language, as Ultra-FineWeb's en and zh: each loads on its own with datasets
    assert manifest["splits"] == ["en", "es"]
    splits = datasets.load_dataset("parquet", data_files={
        split: str(selected.version_path / "data" / split / "*.parquet") for split in manifest["splits"]})
    for split in manifest["splits"]:
        assert set(splits[split]["language"]) == {split}
        assert splits[split].num_rows == manifest["selection"]["by_language"][split]["kept"]
    assert {"content", "score", "language"} <= set(splits["en"].column_names)
    assert verify_version(selected.version_path) == []


def test_threshold_selection_through_the_cli(setup, tmp_path, capsys):
    config, _, _, scored, _, _ = setup
    cfg = tmp_path / "job.yaml"
    data = config.model_dump(mode="json")
    data["select"] = {"mode": "threshold", "threshold": 0.5}
    cfg.write_text(json.dumps(data))  # JSON is YAML
    assert ultraclean_main(["select", "--config", str(cfg), "--version", str(scored.version_path),
                            "--output", str(tmp_path / "out")]) == 0
    version = DatasetVersion.open(tmp_path / "out")
    scores = pa.concat_tables(pq.read_table(p) for p in DatasetVersion.open(scored.version_path).shard_paths)["score"]
    expected = int(pc.sum(pc.cast(pc.greater_equal(scores, 0.5), pa.int64())).as_py())
    assert version.manifest["accounting"]["kept"] == expected
    assert "select:" in capsys.readouterr().out


def test_missing_classifier_and_wrong_labels_are_clear_errors(setup, tmp_path, capsys):
    config, parent, classifier, _, _, _ = setup
    cfg = tmp_path / "job.yaml"
    cfg.write_text(json.dumps(config.model_dump(mode="json")))
    assert ultraclean_main(["score", "--config", str(cfg), "--version", str(parent),
                            "--classifier", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o")]) == 2
    assert "not a trained classifier" in capsys.readouterr().err
    data = config.model_dump(mode="json")
    data["classifier"]["labels"] = {"positive": "good", "negative": "bad"}
    with pytest.raises(ValueError, match="the config expects"):
        score_version(parse_config(data), parent, classifier, tmp_path / "o")
    with pytest.raises(ValueError, match="run the score step on it first"):
        select_version(config, parent, tmp_path / "o")
