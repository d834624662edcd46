"""WSD schedule, packed data, trainer: exact resume, learning on TinyShakespeare, two-stage annealing runs."""

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from model.data import DataSource, PackedDataset
from model.minicpm import MiniCPMForCausalLM
from model.schedule import wsd_lr
from model.tokenizer import train_bpe_tokenizer
from model.train import TrainConfig, train

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
SHAKESPEARE = DATA / "text" / "tinyshakespeare.txt"
MODEL = {
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
}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny matrices gain nothing from intra-op threads, and on a shared 2-core machine the spinning threads cost
    several times the compute."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe_tokenizer([SHAKESPEARE], 512, path)
    return path


@pytest.fixture(scope="module")
def shakespeare_parquet(tmp_path_factory):
    """TinyShakespeare as a Parquet dataset shard, one speech per row (in a temp dir, never in the repo)."""
    speeches = [s for s in SHAKESPEARE.read_text().split("\n\n") if s.strip()]
    path = tmp_path_factory.mktemp("ds") / "shard-00000.parquet"
    pq.write_table(pa.table({"content": speeches, "id": [str(i) for i in range(len(speeches))]}), path)
    return path


def run_config(out_dir, tokenizer_path, source, **overrides) -> dict:
    config = {
        "out_dir": str(out_dir),
        "model": MODEL,
        "tokenizer": {"path": str(tokenizer_path)},
        "data": {
            "sources": [{"path": str(source)}],
            "seq_len": 64,
            "batch_size": 8,
            "eval_sequences": 16,
            "eval_fraction": 0.05,
            "cache_dir": str(out_dir.parent / "token_cache"),
        },
        "optim": {"lr": 0.01},
        "schedule": {"warmup_steps": 2, "stable_steps": 6, "decay_steps": 4, "decay_shape": "exp"},
        "eval_every": 5,
        "save_every": 4,
        "log_every": 1,
    }
    for key, value in overrides.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) and key in config else value
    return config


# ---- schedule -------------------------------------------------------------------------------------------------


def test_wsd_schedule_phases_and_decay_shapes():
    kw = {"max_lr": 1.0, "warmup_steps": 4, "stable_steps": 3, "decay_steps": 4, "min_lr_ratio": 0.1}
    assert [wsd_lr(s, decay_shape="linear", **kw) for s in range(12)] == pytest.approx(
        [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 0.775, 0.55, 0.325, 0.1, 0.1]
    )
    assert wsd_lr(8, decay_shape="exp", **kw) == pytest.approx(0.1**0.5)
    assert wsd_lr(8, decay_shape="cosine", **kw) == pytest.approx(0.55)
    assert wsd_lr(7, decay_shape="1-sqrt", **kw) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.25)))
    # Stage 1 (no decay) holds max_lr; stage 2 (decay only) starts decaying at its first step.
    assert wsd_lr(50, max_lr=1.0, warmup_steps=4, stable_steps=10, decay_steps=0) == 1.0
    decay_only = {
        "max_lr": 1.0,
        "warmup_steps": 0,
        "stable_steps": 0,
        "decay_steps": 2,
        "decay_shape": "linear",
        "min_lr_ratio": 0.0,
    }
    assert [wsd_lr(s, **decay_only) for s in range(2)] == pytest.approx([0.5, 0.0])
    with pytest.raises(ValueError, match="decay_shape"):
        wsd_lr(0, max_lr=1.0, warmup_steps=0, stable_steps=0, decay_steps=1, decay_shape="step")


# ---- packed data ----------------------------------------------------------------------------------------------


def test_packing_joins_documents_with_separators_and_shifts_labels(tmp_path, tokenizer_path):
    from model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    docs = ["To be, or not to be", "that is the question", "Whether 'tis nobler in the mind"]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": docs}), path)
    expected = [i for d in docs for i in tokenizer.encode(d, add_special_tokens=False).ids + [2]]
    data = PackedDataset([DataSource(str(path))], tokenizer, seq_len=4, seed=0, cache_dir=tmp_path / "c")
    assert list(data.tokens[0]) == expected
    n = (len(expected) - 1) // 4
    inputs, labels = data.next_batch(n)
    seen = sorted(tuple(row) for row in torch.cat([inputs, labels[:, -1:]], 1).tolist())
    assert seen == sorted(tuple(expected[w * 4 : w * 4 + 5]) for w in range(n))  # each window once per epoch
    assert torch.equal(inputs[:, 1:], labels[:, :-1])


def test_mixing_follows_ratios_and_order_is_fixed_by_seed(tmp_path, tokenizer_path, shakespeare_parquet):
    from model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    wiki = DATA / "text" / "wikitext-2" / "valid.txt"
    sources = [DataSource(str(shakespeare_parquet), ratio=0.7), DataSource(str(wiki), ratio=0.3)]

    def make(seed):
        return PackedDataset(sources, tokenizer, seq_len=32, seed=seed, cache_dir=tmp_path / "c")

    data = make(0)
    for k in range(1, 101):
        data.next_batch(1)
        assert abs(data.counts[1] - 0.3 * k) < 1  # proportions hold at every prefix, not only on average
    a, b, c = make(0), make(0), make(1)
    first_a, first_b, first_c = a.next_batch(16)[0], b.next_batch(16)[0], c.next_batch(16)[0]
    assert torch.equal(first_a, first_b) and not torch.equal(first_a, first_c)
    # Resuming from a saved position continues the same stream.
    resumed = make(0)
    resumed.load_state_dict(a.state_dict())
    assert torch.equal(resumed.next_batch(8)[0], a.next_batch(8)[0])
    with pytest.raises(ValueError, match="seed"):
        c.load_state_dict(a.state_dict())


def test_eval_split_is_held_out_from_training(tmp_path, tokenizer_path, shakespeare_parquet):
    from model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    common = {"seq_len": 32, "seed": 0, "cache_dir": tmp_path / "c", "eval_fraction": 0.1}
    train_data = PackedDataset([DataSource(str(shakespeare_parquet))], tokenizer, **common)
    eval_data = PackedDataset([DataSource(str(shakespeare_parquet))], tokenizer, split="eval", **common)
    n = (len(train_data.tokens[0]) - 1) // 32
    assert train_data.windows[0] == range(n - math.ceil(0.1 * n))
    assert eval_data.windows[0] == range(n - math.ceil(0.1 * n), n)
    batches = list(eval_data.sequences(batch_size=5, max_sequences=12))
    assert [b[0].shape[0] for b in batches] == [5, 5, 2]
    assert np.array_equal(batches[0][0][0].numpy(), eval_data.window(0, n - math.ceil(0.1 * n))[:-1])


# ---- trainer --------------------------------------------------------------------------------------------------


def test_resume_continues_the_exact_loss_trajectory(tmp_path, tokenizer_path, shakespeare_parquet):
    config = run_config(tmp_path / "full", tokenizer_path, shakespeare_parquet, data={"grad_accum": 2})
    full = train(config)
    interrupted = run_config(
        tmp_path / "split", tokenizer_path, shakespeare_parquet, data={"grad_accum": 2}, stop_at_step=6
    )
    assert train(interrupted).steps == 6
    resumed = train({**interrupted, "stop_at_step": None})
    log_full = json.loads(full.loss_log_path.read_text())
    log_resumed = json.loads(resumed.loss_log_path.read_text())
    assert [r["loss"] for r in log_resumed["train"]] == [r["loss"] for r in log_full["train"]]
    assert [r["lr"] for r in log_resumed["train"]] == [r["lr"] for r in log_full["train"]]
    assert resumed.final_eval_loss == full.final_eval_loss
    a, b = (MiniCPMForCausalLM.from_pretrained(r.checkpoint_dir).state_dict() for r in (full, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "full" / "loss_curve.png").stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").glob("step-*")) == [
        "step-000008",
        "step-000012",
    ]


def test_loss_on_tinyshakespeare_falls_well_below_unigram_entropy(tmp_path, tokenizer_path):
    config = run_config(
        tmp_path / "run",
        tokenizer_path,
        SHAKESPEARE,
        data={"batch_size": 16},
        schedule={"warmup_steps": 10, "stable_steps": 70, "decay_steps": 20},
        eval_every=1000,
        save_every=1000,
    )
    result = train(config)
    tokens = np.fromfile(next((tmp_path / "token_cache").glob("*.u32")), dtype=np.uint32)
    p = np.bincount(tokens) / tokens.size
    unigram_entropy = -(p[p > 0] * np.log(p[p > 0])).sum()
    assert unigram_entropy > 5.0
    assert result.final_eval_loss < unigram_entropy - 1.0, (result.final_eval_loss, unigram_entropy)


def test_decay_only_run_starts_from_a_stable_phase_checkpoint(tmp_path, tokenizer_path, shakespeare_parquet):
    stage1 = train(
        run_config(
            tmp_path / "stage1",
            tokenizer_path,
            shakespeare_parquet,
            schedule={"warmup_steps": 2, "stable_steps": 8, "decay_steps": 0},
        )
    )
    stage2_config = run_config(
        tmp_path / "stage2",
        tokenizer_path,
        shakespeare_parquet,
        model=None,
        init_from=str(stage1.checkpoint_dir),
        init_optimizer=True,
        schedule={
            "warmup_steps": 0,
            "stable_steps": 0,
            "decay_steps": 4,
            "decay_shape": "linear",
            "min_lr_ratio": 0.01,
        },
    )
    stage2 = train(stage2_config)
    lrs = [r["lr"] for r in json.loads(stage2.loss_log_path.read_text())["train"]]
    assert lrs == pytest.approx([0.01 * (1 - 0.99 * k / 4) for k in range(1, 5)])
    first_loss = json.loads(stage2.loss_log_path.read_text())["train"][0]["loss"]
    assert first_loss < math.log(512) - 0.5  # it continued from trained weights, not from scratch
    assert (stage2.checkpoint_dir / "tokenizer.json").is_file()


def test_config_errors_are_clear(tmp_path, tokenizer_path):
    good = run_config(tmp_path / "x", tokenizer_path, SHAKESPEARE)
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig.model_validate({**good, "optim": {"lr": 0.01, "learning_rate": 0.1}})
    with pytest.raises(ValueError, match="exactly one"):
        TrainConfig.model_validate({**good, "init_from": str(tmp_path)})
    with pytest.raises(ValueError, match="use_output_gate"):
        TrainConfig.model_validate({**good, "model": {**MODEL, "use_output_gate": True}})


def test_shipped_configs_validate():
    configs = Path(__file__).resolve().parents[1] / "configs"
    tiny = TrainConfig.from_yaml(configs / "proxy-tiny.yaml")
    assert tiny.schedule.total_steps > 0
    big = TrainConfig.from_yaml(configs / "minicpm4-0.5b.yaml")
    assert big.model["num_hidden_layers"] > tiny.model["num_hidden_layers"]
