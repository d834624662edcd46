"""UltraClean ingest: each stage on real crawl samples, the whole run, resume, determinism and bad input."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml
from datatrove.data import Document

from core.accounting import Accounting
from core.config import ConfigError
from core.manifest import verify_version
from core.runtime import TasksFailed, gather
from core.versions import DatasetVersion, resolve_parquet_files
from pipelines.config import load_config, parse_config
from pipelines.ingest import run_ingest
from pipelines.ultraclean import main as ultraclean_main
from stages.dedup import MinHashConfig, MinHasher, content_hash
from stages.extract import ExtractConfig, HtmlExtractor
from stages.heuristics import FilterConfig, HeuristicFilter
from stages.langid import LangIdConfig, LanguageIdentifier
from stages.readers import InputReader, ReadConfig

REPO = Path(__file__).resolve().parents[1]
PROSE = (
    "The lighthouse keeper climbed the stairs every evening to light the lamp. He trimmed the wick and polished "
    "the lens until it shone. Ships passing the rocky coast relied on that steady beam to find their way home. "
    "In winter the storms were fierce, and the keeper often stayed awake through the night. He wrote in his log "
    "about the weather, the ships he saw, and the birds that rested on the gallery rail. Years later those logs "
    "became a valuable record of the coast and of the people who lived and worked along it."
)


def _read(path: Path, fmt: str, **read) -> tuple[list[Document], Accounting]:
    reader = InputReader(path, fmt, path.name, ReadConfig(**read))
    return list(reader.run()), reader.accounting


def _balanced(docs: list[Document], accounting: Accounting) -> bool:
    return accounting.records_in == len(docs) + accounting.dropped_total + accounting.quarantined_records


# --- readers ---------------------------------------------------------------------------------------------------


def test_warc_reader_accounts_for_all_16_responses(shared_data):
    docs, accounting = _read(shared_data / "crawl/CC-MAIN-2020-34-excerpt.warc.gz", "warc")
    assert accounting.records_in == 16  # the excerpt's 16 response records; request/metadata are not documents
    assert _balanced(docs, accounting)
    assert all(doc.metadata["kind"] == "html" and doc.metadata["url"].startswith("http") for doc in docs)
    # the gb2312 and windows-1251 pages decode with their declared charsets: no replacement characters
    assert not [doc.id for doc in docs if "\ufffd" in doc.text[:5000]]


def test_wet_and_jsonl_readers(shared_data):
    wet_docs, wet_acc = _read(shared_data / "crawl/CC-MAIN-2024-22-sample.warc.wet.gz", "wet")
    assert wet_acc.records_in == 1 and len(wet_docs) == 1 and wet_docs[0].metadata["kind"] == "text"
    jsonl_docs, jsonl_acc = _read(shared_data / "crawl/CC-MAIN-2019-30-extracted.jsonl.gz", "jsonl")
    assert jsonl_acc.records_in == 697 and _balanced(jsonl_docs, jsonl_acc)
    assert jsonl_docs[0].metadata["url"].startswith("http")  # from metadata.warc_url


def test_extractor_gets_main_text_from_real_html(shared_data):
    docs, _ = _read(shared_data / "crawl/CC-MAIN-2020-34-excerpt.warc.gz", "warc")
    extractor = HtmlExtractor(ExtractConfig())
    page = next(d for d in docs if "0900-hovenier.nl" in d.metadata["url"])
    html_length = len(page.text)
    extracted = extractor.process(page)
    assert extracted is not None and "Hovenier" in extracted.text
    assert "<" not in extracted.text and len(extracted.text) < html_length / 3


def test_language_identification_on_real_pages(shared_data):
    docs, _ = _read(shared_data / "crawl/CC-MAIN-2020-34-excerpt.warc.gz", "warc")
    docs += _read(shared_data / "crawl/CC-MAIN-2019-30-extracted.jsonl.gz", "jsonl")[0][:200]
    extractor, identifier = HtmlExtractor(ExtractConfig()), LanguageIdentifier(LangIdConfig(min_score=0.0))
    languages = {d.metadata["language"] for d in identifier.run(extractor.run(docs))}
    assert {"zh", "en", "de"} <= languages
    assert identifier.identify("Der schnelle braune Fuchs springt über den faulen Hund und läuft weg.")[0] == "de"


def test_language_filter_reasons():
    identifier = LanguageIdentifier(LangIdConfig(keep_languages=["en"], min_score=0.5))
    french = Document(text="Bonjour à tous, nous sommes très heureux de vous accueillir ici aujourd'hui.", id="1",
                      metadata={"source": "t"})
    assert identifier.process(french) is None
    assert identifier.accounting.dropped["language"] == {"language_fr": 1}


# --- filters and dedup -----------------------------------------------------------------------------------------


def test_heuristic_filters_known_answers():
    quality = HeuristicFilter(FilterConfig(kind="gopher_quality", params={"min_doc_words": 50}))
    short = Document(text="Buy cheap pills now. Click here.", id="s", metadata={"language": "en"})
    good = Document(text=PROSE, id="g", metadata={"language": "en"})
    german = Document(text="Kurz.", id="d", metadata={"language": "de"})
    assert quality.process(short) is None and quality.accounting.dropped["filter_gopher_quality"] == {"gopher_short_doc": 1}
    assert quality.process(good) is good
    assert quality.process(german) is german  # the English rule set does not judge German
    repetition = HeuristicFilter(FilterConfig(kind="gopher_repetition"))
    spam = Document(text="\n".join(["best price cheap watches"] * 40), id="r", metadata={"language": "en"})
    assert repetition.process(spam) is None
    assert repetition.accounting.dropped["filter_gopher_repetition"] == {"dup_line_frac": 1}


def test_filter_config_rejects_unknown_threshold():
    with pytest.raises(ValueError, match="gopher_quality has no threshold"):
        FilterConfig(kind="gopher_quality", params={"min_words": 3})


def test_minhash_collides_near_duplicates_only():
    hasher = MinHasher(MinHashConfig())
    near = PROSE.replace("every evening", "each evening").replace("fierce", "wild")
    other = "Composting turns kitchen scraps into rich soil. " * 3 + "Worms and microbes do most of the work over months."
    keys, near_keys, other_keys = (hasher.band_keys(t, "en") for t in (PROSE, near, other))
    assert keys == hasher.band_keys(PROSE.upper() + " !!", "en")  # formatting is not novelty
    assert any(a == b for a, b in zip(keys, near_keys))
    assert not any(a == b for a, b in zip(keys, other_keys))
    assert content_hash("Hello,   World!") == content_hash("hello world")


# --- whole runs ------------------------------------------------------------------------------------------------


def _config(inputs: list[dict], **overrides) -> dict:
    config = {"name": "test", "inputs": inputs, "langid": {"keep_languages": None, "min_score": 0.3}}
    config.update(overrides)
    return config


def _shard_hashes(version_path: Path) -> list[str]:
    return [s["sha256"] for s in DatasetVersion.open(version_path).manifest["shards"]]


@pytest.fixture(scope="module")
def real_inputs(shared_data):
    return [
        {"path": str(shared_data / "crawl/CC-MAIN-2020-34-excerpt.warc.gz")},
        {"path": str(shared_data / "crawl/CC-MAIN-2024-22-sample.warc.wet.gz")},
        {"path": str(shared_data / "crawl/CC-MAIN-2019-30-extracted.jsonl.gz"), "source": "dolma-cc"},
    ]


@pytest.fixture(scope="module")
def real_run(ray_local, real_inputs, tmp_path_factory):
    config = parse_config(_config(real_inputs, output={"rows_per_shard": 150}))
    return run_ingest(config, REPO, tmp_path_factory.mktemp("real") / "out")


def _count_warc_records(path: str, record_type: str) -> int:
    from warcio.archiveiterator import ArchiveIterator

    with open(path, "rb") as stream:
        return sum(1 for record in ArchiveIterator(stream) if record.rec_type == record_type)


def test_end_to_end_accounting_and_formats(real_run, real_inputs):
    manifest = real_run.manifest
    accounting = manifest["accounting"]
    # records counted here, from the files themselves: WARC responses, WET conversions, non-blank JSONL lines
    responses = _count_warc_records(real_inputs[0]["path"], "response")
    conversions = _count_warc_records(real_inputs[1]["path"], "conversion")
    with gzip.open(real_inputs[2]["path"], "rt", encoding="utf-8") as lines:
        documents = sum(1 for line in lines if line.strip())
    assert (responses, conversions, documents) == (16, 1, 697)
    assert accounting["records_in"] == responses + conversions + documents
    rows = ds.dataset([str(p) for p in resolve_parquet_files(real_run.version_path)]).count_rows()
    dropped = sum(sum(stage["dropped"].values()) for stage in manifest["stages"])
    assert accounting["records_in"] - rows == dropped + accounting["quarantined"] > 0
    assert manifest["stages"][0]["in"] == 714 and manifest["stages"][-1]["out"] == accounting["kept"]
    assert len(manifest["shards"]) == -(-accounting["kept"] // 150) and accounting["kept"] > 300
    files = [str(p) for p in resolve_parquet_files(real_run.version_path)]
    import datasets

    loaded = datasets.load_dataset("parquet", data_files=files, split="train")
    assert loaded.num_rows == accounting["kept"]
    assert set(loaded.column_names) == {"content", "id", "url", "date", "language", "language_score", "source"}
    frame = pl.read_parquet(files)
    assert frame["id"].n_unique() == frame.height and "dolma-cc" in frame["source"].to_list()
    assert ds.dataset(files).count_rows() == frame.height
    assert verify_version(real_run.version_path) == []
    assert (real_run.version_path.parent / "latest").read_text().strip() == real_run.version_path.name
    assert "Where every input record went" in (real_run.version_path / "README.md").read_text()


def test_verify_detects_a_corrupt_shard(real_run, tmp_path):
    copy = tmp_path / real_run.version_path.name
    shutil.copytree(real_run.version_path, copy)
    shard = next((copy / "data").iterdir())
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert ultraclean_main(["verify", str(copy)]) == 1
    assert ultraclean_main(["verify", str(real_run.version_path)]) == 0


def test_rerun_is_identical_and_reuses_the_version(ray_local, real_inputs, real_run, tmp_path):
    config = parse_config(_config(real_inputs, output={"rows_per_shard": 150}))
    again = run_ingest(config, REPO, real_run.version_path.parent)
    assert again.reused and again.version_path == real_run.version_path
    elsewhere = run_ingest(config, REPO, tmp_path / "second")
    assert not elsewhere.reused and elsewhere.version_path.name == real_run.version_path.name
    assert _shard_hashes(elsewhere.version_path) == _shard_hashes(real_run.version_path)


def test_dedup_across_inputs(ray_local, tmp_path):
    near = PROSE.replace("every evening", "each evening")
    other = " ".join(reversed(PROSE.split()))
    third = " ".join(sorted(PROSE.split()))
    for name, texts in {"a.jsonl": [PROSE, other], "b.jsonl": [PROSE + "  ", near, third]}.items():
        (tmp_path / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    config = parse_config(_config([{"path": str(tmp_path / "*.jsonl")}], filters=[]))
    result = run_ingest(config, REPO, tmp_path / "out")
    dedup = result.manifest["stages"][-1]
    assert dedup["dropped"] == {"exact_duplicate": 1, "minhash_duplicate": 1}
    kept = pl.read_parquet(resolve_parquet_files(result.version_path))
    assert kept["id"].to_list() == ["a.jsonl:line 1", "a.jsonl:line 2", "b.jsonl:line 3"]


def test_resume_skips_finished_parts(ray_local, real_inputs, real_run, tmp_path):
    config = parse_config(_config(real_inputs, output={"rows_per_shard": 150, "keep_work": True}))
    root = tmp_path / "out"
    first = run_ingest(config, REPO, root)
    work = root / ".work" / first.version_path.name
    # an interrupted run: one input's part never finished, one shard was written, the manifest (written last) never
    (first.version_path / "manifest.json").unlink()
    (root / "latest").unlink()
    (work / "parts" / "part-00002.parquet").unlink()
    shards = sorted((first.version_path / "data").glob("*.parquet"))
    for shard in shards[1:]:
        shard.unlink()
    kept_stats = (work / "parts" / "part-00000.parquet.json").stat().st_mtime_ns
    kept_shard = shards[0].stat().st_mtime_ns
    with pytest.raises(FileNotFoundError, match="no manifest.json"):  # readers never trust a version without one
        DatasetVersion.open(first.version_path)
    resumed = run_ingest(config, REPO, root)
    assert (work / "parts" / "part-00000.parquet.json").stat().st_mtime_ns == kept_stats  # not recomputed
    assert shards[0].stat().st_mtime_ns == kept_shard
    assert (work / "parts" / "part-00002.parquet").is_file()
    assert _shard_hashes(resumed.version_path) == _shard_hashes(real_run.version_path)


# --- bad input -------------------------------------------------------------------------------------------------


def _broken_warc(source: Path, out: Path) -> None:
    """The real excerpt with record 20's WARC header made unparseable (the file is one gzip member per record)."""
    data, members = source.read_bytes(), []
    while data:
        decompressor = zlib.decompressobj(31)
        members.append(decompressor.decompress(data))
        data = decompressor.unused_data
    members[20] = b"WARC/1.0\r\nthis line is not a header\r\n\r\n" + members[20][200:]
    out.write_bytes(b"".join(gzip.compress(m, mtime=0) for m in members))


def test_bad_inputs_are_quarantined_and_the_run_goes_on(ray_local, shared_data, tmp_path):
    warc = (shared_data / "crawl/CC-MAIN-2020-34-excerpt.warc.gz").read_bytes()
    (tmp_path / "truncated.warc.gz").write_bytes(warc[: len(warc) // 2])
    _broken_warc(shared_data / "crawl/CC-MAIN-2020-34-excerpt.warc.gz", tmp_path / "broken.warc.gz")
    lines = [json.dumps({"text": PROSE}).encode(), b'{"text": "caf\xe9 au lait \xff\xfe"}', b"{not json",
             json.dumps({"text": "   "}).encode(), json.dumps({"text": "big " * (50 * 1024 * 1024 // 4)}).encode()]
    (tmp_path / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    pq.write_table(pa.table({"body": ["some text"], "n": [1]}), tmp_path / "wrong_schema.parquet")
    (tmp_path / "metadata.warc.wat.gz").write_bytes(b"")
    config = parse_config(_config([{"path": str(tmp_path / "*")}], filters=[]))
    result = run_ingest(config, REPO, tmp_path / "out")

    records_in = {entry["name"]: entry["records_in"] for entry in result.manifest["input_accounting"]}
    assert (records_in["mixed.jsonl"], records_in["wrong_schema.parquet"], records_in["metadata.warc.wat.gz"]) == (5, 1, 0)
    errors = [json.loads(line) for line in (result.version_path / "quarantine.jsonl").read_text().splitlines()]
    by_source = {}
    for entry in errors:
        by_source.setdefault(entry["source"], []).append(entry["error"])
    assert any("the file ends inside this gzip member" in e for e in by_source["truncated.warc.gz"])
    assert any("malformed WARC record" in e for e in by_source["broken.warc.gz"])
    assert any("not valid UTF-8" in e for e in by_source["mixed.jsonl"])
    assert any("invalid JSON" in e for e in by_source["mixed.jsonl"])
    assert any("exceeds max_document_bytes" in e for e in by_source["mixed.jsonl"])
    assert any("wrong schema" in e and "'text'" in e for e in by_source["wrong_schema.parquet"])
    assert any("WAT files hold crawl metadata" in e for e in by_source["metadata.warc.wat.gz"])
    assert result.manifest["stages"][0]["dropped"]["empty"] == 1
    kept = pl.read_parquet(resolve_parquet_files(result.version_path))
    assert kept.filter(pl.col("source") == "mixed.jsonl")["content"].to_list() == [PROSE]  # its one good line
    assert kept.filter(pl.col("source") == "broken.warc.gz").height >= 3  # records before the break are kept


def test_bad_config_values_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"inputs": [{"path": "x.warc.gz"}], "read": {"max_document_bytes": "lots"},
                                   "langid": {"min_score": 2}, "surprise": 1}))
    with pytest.raises(ConfigError) as error:
        load_config(bad)
    message = str(error.value)
    assert "read.max_document_bytes" in message and "langid.min_score" in message and "surprise" in message
    (tmp_path / "broken.yaml").write_text("inputs: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")
    assert ultraclean_main(["--config", str(bad)]) == 2


def test_missing_input_is_a_clear_config_error(ray_local, tmp_path):
    config = parse_config(_config([{"path": str(tmp_path / "nothing-*.warc.gz")}]))
    with pytest.raises(ConfigError, match=r"inputs\[0\]\.path: no file matches"):
        run_ingest(config, REPO, tmp_path / "out")


def test_ray_retries_a_killed_worker(ray_local, tmp_path):
    @ray_local.remote
    def dies_once(marker: str) -> int:
        if not os.path.exists(marker):
            Path(marker).touch()
            os._exit(1)  # the worker process dies as if killed
        return 42

    assert gather([dies_once.options(max_retries=2).remote(str(tmp_path / "a"))], "test") == [42]
    [outcome] = gather([dies_once.options(max_retries=0).remote(str(tmp_path / "b"))], "test", raise_on_error=False)
    assert isinstance(outcome, Exception)  # raise_on_error=False: a task that fails for good comes back as a value
    with pytest.raises(TasksFailed, match=r"test: 1 of 1 task\(s\) failed:\n  the dying task: WorkerCrashedError"):
        gather([dies_once.options(max_retries=0).remote(str(tmp_path / "c"))], "test", labels=["the dying task"])


# --- the real command lines ------------------------------------------------------------------------------------


def test_embedded_default_runs_the_whole_loop_without_shared_data(tmp_path):
    """`python -m pipelines.ultraclean` alone: ingest -> verify seeds -> classifier per language -> score -> select
    -> verify output, on data inside the package (nothing from ../shared), into the working directory."""
    assert "shared/" not in (REPO / "configs" / "default.yaml").read_text()
    run = subprocess.run([sys.executable, "-m", "pipelines.ultraclean", "--output", str(tmp_path / "out")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "records in:" in run.stdout and "prose-en                 keep" in run.stdout, run.stdout[-3000:]
    assert list((tmp_path / "ultraclean-verification" / "reports").glob("*/deltas.png"))
    [classifier] = [p for p in (tmp_path / "ultraclean-classifiers").glob("c-*") if p.is_dir()]
    assert {p.name for p in classifier.glob("*/model.bin")} == {"model.bin"} and (classifier / "zh").is_dir()
    assert (classifier / "en" / "model.bin").is_file() and (classifier / "zh" / "model.bin").is_file()
    selected = DatasetVersion.open(tmp_path / "out")  # the last version written: the selection
    assert selected.manifest["splits"] == ["en", "zh"] and verify_version(selected.path) == []
    assert {"content", "score", "source"} <= set(selected.manifest["schema"])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_dashboard(url: str, head: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start --head exited with {head.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"no Ray dashboard at {url} after {seconds} s")


def test_ray_job_submit(tmp_path, real_inputs):
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(_config(real_inputs[:2])))
    # a private loopback-only head: token auth off so the CLI needs no credentials
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"RAY_AUTH_MODE": "disabled"}
    ray_bin = str(Path(sys.executable).parent / "ray")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    ray_tmp = tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths must fit in 107 bytes
    # its own session, so the whole head (GCS, raylet, dashboard, workers) is stopped by one signal and no other
    # Ray on the machine is touched (`ray stop` would stop them all)
    # every port the head's agents bind is chosen free: the in-process Ray of the other tests holds the defaults,
    # and a head whose dashboard agent cannot bind never accepts a job
    ports = [f"--{name}={_free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        "ray-client-server-port", "node-manager-port", "object-manager-port")]
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--num-cpus=2", f"--port={_free_port()}", f"--dashboard-port={port}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--temp-dir={ray_tmp}", *ports],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        _wait_for_dashboard(url, head)
        submit_command = [ray_bin, "job", "submit", "--address", url, "--", sys.executable, "-m", "pipelines.ultraclean",
                          "--config", str(config), "--output", str(tmp_path / "out")]
        deadline = time.monotonic() + 120
        while True:  # the dashboard answers before the head's job agent has registered; wait for the agent
            submit = subprocess.run(submit_command, env=env, capture_output=True, text=True, timeout=300, check=False)
            if "No available agent" not in submit.stderr or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "succeeded" in submit.stdout
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    version = DatasetVersion.open(tmp_path / "out")
    assert version.manifest["accounting"]["records_in"] == 17
