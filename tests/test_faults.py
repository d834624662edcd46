"""Faults injected on purpose, and what each gets: our failures publish nothing, bad input is quarantined, and
nothing read back from our own files is trusted further than it can be checked. (README: "Faults tried".)"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import pytest
import torch
import yaml

from core.config import ConfigError
from core.manifest import verify_version
from core.versions import DatasetVersion, resolve_parquet_files
from pipelines.config import parse_config
from pipelines.ingest import run_ingest
from stages.readers import InputReader, ReadConfig

REPO = Path(__file__).resolve().parents[1]
PROSE = (
    "Tide pools form where the sea retreats twice a day and leaves water trapped among the rocks. Anemones, crabs "
    "and small fish live there, and each must survive heat, cold and changing salt until the tide comes back in. "
    "Visitors who lift a stone should always put it back the way it was, because the animals beneath depend on it."
)


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return path


def _config(inputs: list[dict], **overrides) -> dict:
    return {"name": "faults", "inputs": inputs, "langid": {"keep_languages": None, "min_score": 0.0},
            "filters": [], **overrides}


def _versions(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("v-*") if (p / "manifest.json").is_file()) if root.is_dir() else []


def _cli(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.ultraclean", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, check=False, env={**os.environ, **(env or {})})


# --- 1. a failure of ours fails the run ------------------------------------------------------------------------

KILLER = textwrap.dedent("""
    import os
    if os.environ.get("FAULT_KILL_INPUT"):
        import stages.readers as readers
        original = readers.InputReader.run
        def run(self, data=None, rank=0, world_size=1):
            if self.path.name == os.environ["FAULT_KILL_INPUT"]:
                os._exit(1)  # the worker dies as if killed, on every retry
            yield from original(self, data, rank, world_size)
        readers.InputReader.run = run
""")


def test_a_worker_that_dies_past_its_retries_fails_the_run_and_publishes_nothing(tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    _jsonl(inputs / "a-good.jsonl", [PROSE])
    _jsonl(inputs / "b-doomed.jsonl", [PROSE + " Again."])
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(_config([{"path": "inputs/*.jsonl"}],
                                                              ray={"max_retries": 1})))
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(KILLER)  # loaded by the driver and every Ray worker it starts
    env = {"PYTHONPATH": f"{hooks}{os.pathsep}{REPO}", "FAULT_KILL_INPUT": "b-doomed.jsonl"}
    failed = _cli(["--config", "job.yaml", "--output", "out"], tmp_path, env)
    assert failed.returncode == 1, failed.stderr[-2000:]
    assert "b-doomed.jsonl" in failed.stderr and "nothing was published" in failed.stderr
    out = tmp_path / "out"
    assert _versions(out) == [] and not (out / "latest").exists()
    [work] = list((out / ".work").glob("v-*/parts"))
    assert (work / "part-00000.parquet.json").is_file()  # the good input's finished part is kept for the re-run
    assert not list(work.glob("part-00001*"))  # no part, no resume record for the input that failed

    resumed = _cli(["--config", "job.yaml", "--output", "out"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    [version] = _versions(out)
    assert version.name == work.parent.name  # the id the failed run would have published
    assert DatasetVersion.open(out).manifest["accounting"]["records_in"] == 2


# --- 2. config and environment errors fail before any work -------------------------------------------------------


@pytest.mark.parametrize("overrides, key", [
    ({"langid": {"model_path": "no/such/lid.176.ftz"}}, "langid.model_path"),
    ({"dedup": {"minhash": {"seed": -1}}}, "dedup.minhash.seed"),
    ({"filters": [{"kind": "gopher_quality", "params": {"min_doc_words": "fifty"}}]}, "min_doc_words"),
    ({"filters": [{"kind": "gopher_quality", "params": {"min_doc_words": -3}}]}, "min_doc_words"),
    ({"filters": [{"kind": "gopher_repetition", "params": {"dup_line_frac": 3.0}}]}, "dup_line_frac"),
])
def test_config_and_environment_errors_name_the_key_and_publish_nothing(ray_local, tmp_path, overrides, key):
    good = _jsonl(tmp_path / "good.jsonl", [PROSE])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        run_ingest(parse_config(_config([{"path": str(good)}], **overrides)), REPO, tmp_path / "out")
    assert _versions(tmp_path / "out") == [] and not (tmp_path / "out" / "latest").exists()


# --- 3. inputs that are not regular files -------------------------------------------------------------------------


def test_directories_symlink_loops_dangling_links_and_fifos_are_quarantined_not_fatal(ray_local, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    _jsonl(inputs / "good.jsonl", [PROSE])
    (inputs / "subdir.jsonl").mkdir()
    (inputs / "loop.jsonl").symlink_to(inputs / "loop.jsonl")
    (inputs / "dangling.jsonl").symlink_to(tmp_path / "gone.jsonl")
    os.mkfifo(inputs / "pipe.jsonl")
    signal.alarm(120)  # a FIFO that is opened blocks forever: fail the test instead of hanging it
    try:
        result = run_ingest(parse_config(_config([{"path": str(inputs / "*.jsonl")}])), REPO, tmp_path / "out")
    finally:
        signal.alarm(0)
    errors = {json.loads(line)["source"]: json.loads(line)["error"]
              for line in (result.version_path / "quarantine.jsonl").read_text().splitlines()}
    assert "a directory" in errors["subdir.jsonl"] and "a FIFO" in errors["pipe.jsonl"]
    assert "cannot be resolved" in errors["loop.jsonl"] and "cannot be resolved" in errors["dangling.jsonl"]
    assert result.manifest["accounting"]["kept"] == 1 and verify_version(result.version_path) == []


# --- 4. two runs into one root ------------------------------------------------------------------------------------


def test_two_concurrent_runs_into_one_root_publish_one_version(tmp_path):
    _jsonl(tmp_path / "docs.jsonl", [PROSE, PROSE.replace("Tide", "Rock")])
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(_config([{"path": "docs.jsonl"}])))
    command = [sys.executable, "-m", "pipelines.ultraclean", "--config", "job.yaml", "--output", "out"]
    runs = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outcomes = [run.communicate(timeout=240) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outcomes]
    [version] = _versions(tmp_path / "out")
    assert verify_version(version) == []
    assert sum("nothing to do" in out for out, _ in outcomes) == 1  # the second run waited, then reused it


# --- 5, 7, 8. what verify and the readers of our own files trust ----------------------------------------------------


@pytest.fixture()
def version(ray_local, tmp_path) -> Path:
    good = _jsonl(tmp_path / "good.jsonl", [PROSE, PROSE.replace("Tide", "Rock"), "   "])
    return run_ingest(parse_config(_config([{"path": str(good)}])), REPO, tmp_path / "out").version_path


def _edit_manifest(version: Path, edit) -> None:
    manifest = json.loads((version / "manifest.json").read_text())
    edit(manifest)
    (version / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("edit, problem", [
    (lambda m: m["accounting"].update(kept=m["accounting"]["kept"] + 1), "kept"),
    (lambda m: m["stages"][0]["dropped"].update(empty=0), "does not add up"),
    (lambda m: m["config"]["read"].update(max_document_bytes=5), "was edited"),
    (lambda m: m["inputs"][0].update(sha256="0" * 64), "was edited"),
    (lambda m: m.update(shards=[], totals={"rows": 0, "bytes": 0, "characters": 0, "tokens": None}),
     "not listed in the manifest"),
    (lambda m: m["shards"][0].update(path="../../../etc/passwd"), "leads outside"),
])
def test_verify_catches_an_edited_manifest(version, edit, problem):
    assert verify_version(version) == []
    _edit_manifest(version, edit)
    assert any(problem in p for p in verify_version(version)), verify_version(version)


def test_verify_catches_extra_files_and_broken_json(version):
    (version / "data" / "shard-99999.parquet").write_bytes(b"smuggled")
    assert verify_version(version) == ["data/shard-99999.parquet: not listed in the manifest"]
    (version / "manifest.json").write_text("{ broken")
    [problem] = verify_version(version)
    assert "not valid JSON" in problem


def test_a_lost_latest_pointer_is_repaired_when_the_version_is_reused(ray_local, version):
    root = version.parent
    (root / "latest").unlink()  # as if the run died between publishing the version and writing `latest`
    config = parse_config(_config([{"path": str(root.parent / "good.jsonl")}]))
    again = run_ingest(config, REPO, root)
    assert again.reused and (root / "latest").read_text().strip() == version.name


@pytest.mark.parametrize("pointer", ["/etc", "../../..", "v-0123456789abcdef/../../x"])
def test_latest_pointers_outside_the_root_are_refused(version, pointer):
    (version.parent / "latest").write_text(pointer)
    with pytest.raises(ValueError, match="not an entry name"):
        DatasetVersion.open(version.parent)


def test_manifest_shard_paths_outside_the_version_are_refused(version):
    _edit_manifest(version, lambda m: m["shards"][0].update(path="../../outside.parquet"))
    with pytest.raises(ValueError, match="leads outside"):
        resolve_parquet_files(version)


# --- 6. checkpoints cannot run code ---------------------------------------------------------------------------


class _RunsACommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_trainer_state_is_refused_and_runs_nothing(tmp_path):
    from model.train import train

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join([PROSE] * 40))
    config = {
        "out_dir": str(tmp_path / "run"),
        "model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                  "num_key_value_heads": 1, "max_position_embeddings": 32},
        "tokenizer": {"train_on": [str(corpus)], "vocab_size": 300},
        "data": {"sources": [{"path": str(corpus)}], "seq_len": 16, "batch_size": 2, "eval_fraction": 0.1},
        "optim": {"lr": 0.01},
        "schedule": {"warmup_steps": 0, "stable_steps": 2, "decay_steps": 0},
        "save_every": 1,
    }
    train(config)
    checkpoint = tmp_path / "run" / "checkpoints" / (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "payload": _RunsACommand(marker)}, checkpoint / "trainer_state.pt",
               pickle_protocol=2)
    with pytest.raises(ValueError, match="could run code"):
        train({**config, "schedule": {**config["schedule"], "stable_steps": 4}})
    assert not marker.exists()


# --- 9, 10. reading bounded by the size limit; a binary file is one entry ----------------------------------------


def test_an_oversized_jsonl_line_is_skipped_without_being_held(tmp_path):
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps({"text": "x" * 30_000_000}) + "\n" + json.dumps({"text": PROSE}) + "\n")
    reader = InputReader(path, "jsonl", "big", ReadConfig(max_document_bytes=10_000))
    tracemalloc.start()
    docs = list(reader.run())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [d.text for d in docs] == [PROSE] and peak < 8_000_000  # the 30 MB line never sat in memory
    [entry] = reader.accounting.quarantined
    assert entry.locator == "line 1" and "30000012 bytes exceeds" in entry.error


def test_a_binary_file_is_quarantined_as_one_entry_after_a_run_of_errors(tmp_path):
    path = tmp_path / "binary.jsonl.gz"
    rng = __import__("random").Random(0)
    garbage = bytes(rng.getrandbits(8) for _ in range(200_000))
    path.write_bytes(gzip.compress(json.dumps({"text": PROSE}).encode() + b"\n" + garbage, mtime=0))
    reader = InputReader(path, "jsonl", "bin", ReadConfig(max_consecutive_errors=20))
    docs = list(reader.run())
    entries = reader.accounting.quarantined
    assert len(docs) == 1 and len(entries) == 21  # twenty bad records, then the rest as one
    rest = entries[-1]
    assert "bytes" in rest.locator and "quarantined as one entry" in rest.error and rest.records > 0
    accounting = reader.accounting
    assert accounting.records_in == len(docs) + accounting.dropped_total + accounting.quarantined_records
    assert accounting.records_in == 1 + sum(1 for line in garbage.split(b"\n") if line.strip())
