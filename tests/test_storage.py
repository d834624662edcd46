"""UltraClean on object storage and on a cluster of two nodes, against a real S3 API on localhost.

The S3 server is moto's threaded server: a real HTTP endpoint that s3fs (and so our code) talks to through the
standard environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), exactly as it would talk to AWS or MinIO;
nothing of ours is mocked. The cluster is ``ray.cluster_utils.Cluster``: a head and a second node, each its own
raylet process, with a custom resource that lets each node run one ingest task at a time, so both nodes work.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import yaml

from core.config import ConfigError
from core.manifest import verify_version
from core.storage import glob_files, location, mirror_dir
from core.versions import DatasetVersion
from model.data import DataSource
from pipelines.config import parse_config
from pipelines.ingest import run_ingest
from pipelines.score import score_version
from pipelines.selection import select_version
from pipelines.verify import verify
from stages.classifier import ClassifierConfig, train_classifier
from verification.config import parse_verification_config

REPO = Path(__file__).resolve().parents[1]
BUCKET = "crawl-bucket"  # made by the s3_env fixture (conftest.py)
INPUT_NAMES = ["CC-MAIN-2020-34-excerpt.warc.gz", "CC-MAIN-2024-22-sample.warc.gz", "CC-MAIN-2024-22-sample.warc.wet.gz"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def crawl(shared_data, s3_env, tmp_path_factory):
    """The same crawl files on local disk and in the bucket."""
    local = tmp_path_factory.mktemp("crawl")
    sources = [shared_data / "crawl" / name for name in INPUT_NAMES] + [REPO / "pipelines/sample_data/sample.jsonl.gz"]
    fs = location(f"s3://{BUCKET}").fs
    for source in sources:
        shutil.copyfile(source, local / source.name)
        fs.put_file(str(source), f"{BUCKET}/crawl/{source.name}")
    return local


def _config(inputs: str, **overrides) -> dict:
    config = {"name": "bucket", "inputs": [{"path": inputs}], "output": {"rows_per_shard": 8},
              "langid": {"keep_languages": None, "min_score": 0.3}}
    config.update(overrides)
    return config


def _manifest_bytes(version) -> bytes:
    return (location(version) / "manifest.json").read_bytes()


@pytest.fixture(scope="module")
def local_run(crawl, tmp_path_factory):
    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    result = run_ingest(parse_config(_config(str(crawl / "*"))), REPO, tmp_path_factory.mktemp("local") / "out")
    return result


def test_ingest_from_and_to_the_bucket_matches_the_local_run(local_run, s3_env):
    assert glob_files(f"s3://{BUCKET}/crawl/*.warc.gz") == [f"s3://{BUCKET}/crawl/{n}" for n in INPUT_NAMES[:2]]
    config = parse_config(_config(f"s3://{BUCKET}/crawl/*", output={"rows_per_shard": 8, "keep_work": True}))
    result = run_ingest(config, REPO, f"s3://{BUCKET}/out")
    assert str(result.version_path) == f"s3://{BUCKET}/out/{local_run.version_path.name}"
    assert len(result.manifest["shards"]) > 2
    # the same bytes: every shard, and the manifest (inputs are named and fingerprinted by content, not by place)
    assert _manifest_bytes(result.version_path) == _manifest_bytes(local_run.version_path)
    for shard in result.manifest["shards"]:
        remote = (result.version_path / shard["path"]).read_bytes()
        assert remote == (local_run.version_path / shard["path"]).read_bytes()
    assert (location(f"s3://{BUCKET}/out") / "latest").read_text().strip() == local_run.version_path.name
    assert verify_version(f"s3://{BUCKET}/out") == []
    assert DatasetVersion.open(f"s3://{BUCKET}/out").version_id == local_run.manifest["version_id"]


def test_bucket_version_verifies_and_resumes_from_what_is_on_the_bucket(local_run, s3_env):
    root = location(f"s3://{BUCKET}/resume")
    config = parse_config(_config(f"s3://{BUCKET}/crawl/*", output={"rows_per_shard": 8, "keep_work": True}))
    first = run_ingest(config, REPO, str(root))
    version = first.version_path
    shards = sorted(str(p) for p in (version / "data").glob("*.parquet"))
    # tampering shows: a changed shard and a file the manifest does not list
    good = location(shards[0]).read_bytes()
    location(shards[0]).write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    (version / "data" / "extra.parquet").write_bytes(b"not listed")
    problems = verify_version(str(version))
    assert any("sha256 differs" in p for p in problems) and any("extra.parquet: not listed" in p for p in problems)
    (version / "data" / "extra.parquet").unlink()
    location(shards[0]).write_bytes(good)
    # an interrupted run: no manifest (written last), no latest, one part and most shards missing
    (version / "manifest.json").unlink()
    (root / "latest").unlink()
    for shard in shards[1:]:
        location(shard).unlink()
    work = root / ".work" / version.name / "parts"
    stats_before = (work / "part-00000.parquet.json").read_bytes()
    (work / "part-00001.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        DatasetVersion.open(str(version))
    resumed = run_ingest(config, REPO, str(root))
    assert not resumed.reused
    assert (work / "part-00000.parquet.json").read_bytes() == stats_before
    assert _manifest_bytes(resumed.version_path) == _manifest_bytes(local_run.version_path)
    assert verify_version(str(root)) == []
    assert run_ingest(config, REPO, str(root)).reused


def test_classifier_score_and_select_on_the_bucket(local_run, shared_data, tmp_path):
    """Artefact roots on the store: a classifier trained into the bucket scores the bucket's version (Ray Data reads
    it through the same filesystem) into the bucket, and the selection lands there too, as on local disk."""
    classifier_config = ClassifierConfig.model_validate({
        "seeds": {"positive": {"sources": [{"path": str(shared_data / "text/wikitext-2/valid.txt"), "split": "line",
                                            "min_chars": 200, "max_documents": 100}]},
                  "negative": {"sources": [{"path": str(shared_data / "crawl/CC-MAIN-2019-30-extracted.jsonl.gz"),
                                            "text_key": "text", "max_documents": 100}]}},
        "fasttext": {"dim": 8, "bucket": 10_000, "epoch": 3, "lr": 0.5, "seed": 0, "minCount": 1},
        "languages": None,
    })
    classifier = train_classifier(classifier_config, tmp_path, f"s3://{BUCKET}/classifiers").path
    assert str(classifier).startswith(f"s3://{BUCKET}/classifiers/")
    assert (location(f"s3://{BUCKET}/classifiers") / "latest").read_text().strip() == classifier.name
    config = parse_config({**_config(f"s3://{BUCKET}/crawl/*"), "steps": ["score", "select"],
                           "scoring": {"batch_size": 8, "workers": 1},
                           "select": {"mode": "top_fraction", "top_fraction": 0.5}})
    parent = run_ingest(config, REPO, f"s3://{BUCKET}/out").version_path  # the bucket's version, reused
    results = {}
    for where, root, source in (("bucket", f"s3://{BUCKET}/steps", parent),
                                ("local", str(tmp_path / "steps"), local_run.version_path)):
        scored = score_version(config, source, f"s3://{BUCKET}/classifiers", root)
        selected = select_version(config, scored.version_path, root)
        results[where] = (scored, selected)
        assert verify_version(str(scored.version_path)) == [] and verify_version(root) == []
    for bucket, local in zip(results["bucket"], results["local"]):
        assert _manifest_bytes(bucket.version_path) == _manifest_bytes(local.version_path)
    assert 0 < results["bucket"][1].manifest["totals"]["rows"] < local_run.manifest["totals"]["rows"]


def test_verification_works_in_a_bucket_and_resumes_on_a_fresh_node(s3_env, shared_data):
    """verification.work_dir on the store: stage 1, the anneals and the report land in the bucket; a second run from
    an empty local disk (another node) finds them there and trains nothing."""
    wiki = [d for d in DataSource(str(shared_data / "text/wikitext-2/valid.txt")).documents() if len(d.split()) >= 20]
    with location(f"s3://{BUCKET}/pools/wiki.parquet").open("wb") as sink:
        pq.write_table(pa.table({"content": wiki[:400]}), sink)
    work = f"s3://{BUCKET}/verification"
    config = parse_verification_config({
        "work_dir": work,
        "base_mix": [{"path": str(shared_data / "text/tinyshakespeare.txt"), "ratio": 1.0}],
        "candidates": [{"name": "wiki", "path": f"s3://{BUCKET}/pools/wiki.parquet"}],
        "proxy": {"model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                            "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64,
                            "dim_model_base": 16}, "tokenizer_vocab_size": 512, "seq_len": 32, "batch_size": 8},
        "stage1": {"warmup_steps": 2, "stable_steps": 10},
        "anneal": {"decay_steps": 6, "candidate_ratio": 0.5, "seeds": [0, 1]},
        "evaluation": {"reference_sets": [{"name": "wikitext", "path": str(shared_data / "text/wikitext-2/test.txt"),
                                           "max_sequences": 8}]},
        "decision": {"metric": "loss:wikitext", "min_effect": 0.03},
    })
    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    shutil.rmtree(mirror_dir(work), ignore_errors=True)  # no local copy left by an earlier run on this machine
    first = verify(config)
    assert first.stage1.trained
    assert str(first.report_path).startswith(work + "/reports/") and first.report_path.is_file()
    assert (first.report_path.parent / "anneal_curves.png").is_file()
    assert len(glob_files(f"{work}/stage1/*/*.json")) >= 1
    shutil.rmtree(mirror_dir(work))  # a fresh node: nothing local
    again = verify(config)
    assert not again.stage1.trained
    assert again.runs == first.runs  # the anneal records, read back from the store, not re-run
    assert again.decisions == first.decisions


@pytest.fixture(scope="module")
def two_nodes(s3_env):
    """A head (with the job server) and a second node on this machine, one ingest slot each; the driver connects
    to the head."""
    from ray.cluster_utils import Cluster

    ray.shutdown()
    dashboard = _free_port()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"ingest_slot": 1}, "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": dashboard})
    cluster.add_node(num_cpus=1, resources={"ingest_slot": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_two_nodes_write_the_same_version_to_the_bucket(local_run, two_nodes, tmp_path):
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    ray_options = {"scheduling": "spread", "resources": {"ingest_slot": 1}}
    config = parse_config(_config(f"s3://{BUCKET}/crawl/*", output={"rows_per_shard": 8, "keep_work": True},
                                  ray=ray_options))
    result = run_ingest(config, REPO, f"s3://{BUCKET}/two-nodes")
    assert _manifest_bytes(result.version_path) == _manifest_bytes(local_run.version_path)
    parts = location(f"s3://{BUCKET}/two-nodes/.work/{result.version_path.name}/parts")
    nodes = {json.loads(p.read_text())["node"] for p in parts.glob("*.json")}
    assert nodes == {n["NodeID"] for n in ray.nodes() if n["Alive"]}  # both nodes did ingest work

    # local paths on two nodes: refused before any work, unless the config vouches for a shared filesystem
    local = parse_config(_config(f"s3://{BUCKET}/crawl/*", ray=ray_options))
    with pytest.raises(ConfigError, match="2 nodes.*local path"):
        run_ingest(local, REPO, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    shared = parse_config(_config(f"s3://{BUCKET}/crawl/*", ray=ray_options,
                                  output={"rows_per_shard": 8, "shared_filesystem": True}))
    assert run_ingest(shared, REPO, tmp_path / "out").manifest == local_run.manifest


def test_ray_job_submit_with_a_working_dir(local_run, s3_env, two_nodes, tmp_path):
    """The README's cluster command against the two-node cluster: the job ships with its working directory and
    the store's variables, reads and writes the bucket."""
    config_path = tmp_path / "job.yaml"
    config_path.write_text(yaml.safe_dump(_config(f"s3://{BUCKET}/crawl/*",
                                                  output={"root": f"s3://{BUCKET}/job", "rows_per_shard": 8})))
    runtime_env = {"working_dir": str(REPO), "excludes": [".git"], "env_vars": s3_env}
    submit = [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", two_nodes,
              "--runtime-env-json", json.dumps(runtime_env),
              "--", "python", "-m", "pipelines.ultraclean", "--config", str(config_path)]
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    deadline = time.monotonic() + 90
    while True:  # the head's job agent starts a little after the node; the job server says so until it is up
        done = subprocess.run(submit, check=False, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in done.stderr + done.stdout or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout
    assert _manifest_bytes(f"s3://{BUCKET}/job/{local_run.version_path.name}") == _manifest_bytes(local_run.version_path)
