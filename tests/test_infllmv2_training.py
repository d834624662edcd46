"""The MiniCPM proxy with InfLLM v2 sparse attention trains like the dense one on long sequences.

Byte-level language modelling on tinyshakespeare, 256-token sequences against 16-token blocks and top-4:
late queries attend to at most 96 of their keys (a budget of topk + window_size // block_size = 6 blocks). The
training runs use the PyTorch reference path (what the model runs on CPU); the Triton kernels (interpreted) are
checked against it inside the model on one step.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported, so CPU tensors run the kernels

from pathlib import Path

import pytest
import torch

import kernels.infllmv2
from model.minicpm import MiniCPMConfig, MiniCPMForCausalLM

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "text" / "tinyshakespeare.txt"
SPARSE = {"block_size": 16, "kernel_size": 8, "kernel_stride": 4, "init_blocks": 1, "window_size": 32, "topk": 4,
          "dense_len": 128}
SEQ_LEN, BATCH, STEPS = 256, 4, 25


def tiny_config(sparse_config):
    return MiniCPMConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ_LEN,
                         sparse_config=sparse_config)


def byte_batches(seed, count):
    if not DATA.exists():
        pytest.fail(f"missing test data {DATA} (shared/data/text/tinyshakespeare.txt beside the repository)")
    data = torch.frombuffer(bytearray(DATA.read_bytes()[:200_000]), dtype=torch.uint8).long()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(count):
        starts = torch.randint(0, len(data) - SEQ_LEN - 1, (BATCH,), generator=gen)
        window = torch.stack([data[s : s + SEQ_LEN + 1] for s in starts.tolist()])
        yield window[:, :-1], window[:, 1:]


def new_model(sparse_config):
    torch.manual_seed(0)
    return MiniCPMForCausalLM(tiny_config(sparse_config))


def train_losses(model):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for inputs, labels in byte_batches(seed=1, count=STEPS):
        loss = model(inputs, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def held_out_loss(model):
    with torch.no_grad():
        return sum(model(x, labels=y).loss.item() for x, y in byte_batches(seed=99, count=2)) / 2


def test_sparse_proxy_lowers_the_loss_like_dense(monkeypatch):
    # The model asks for the "auto" backend; take the PyTorch path it uses on a CPU machine (the interpreter
    # would take minutes). Unsetting TRITON_INTERPRET instead would break later interpreted launches once
    # torch has imported triton without it.
    monkeypatch.setattr(kernels.infllmv2, "_uses_triton", lambda backend, device: backend == "triton")
    dense, sparse = new_model(None), new_model(SPARSE)
    inputs, _ = next(byte_batches(seed=1, count=1))
    with torch.no_grad():
        # Same weights, but past dense_len the sparse layer attends to fewer keys: the sparse path is taken.
        assert (dense(inputs).logits - sparse(inputs).logits).abs().max() > 1e-4
    start_dense, start_sparse = held_out_loss(dense), held_out_loss(sparse)
    dense_losses, sparse_losses = train_losses(dense), train_losses(sparse)
    end_dense, end_sparse = held_out_loss(dense), held_out_loss(sparse)
    assert torch.isfinite(torch.tensor(dense_losses + sparse_losses)).all()
    dense_drop, sparse_drop = start_dense - end_dense, start_sparse - end_sparse
    assert dense_drop > 1.0  # from ln(256) = 5.5 towards byte unigram/bigram statistics
    assert sparse_drop > 0.9 * dense_drop
    assert abs(end_sparse - end_dense) < 0.1 * dense_drop


def test_triton_kernels_in_the_model_match_the_reference_path(monkeypatch):
    inputs, labels = next(byte_batches(seed=2, count=1))
    inputs, labels = inputs[:1], labels[:1]
    results = {}
    for backend in ("triton", "torch"):
        if backend == "torch":
            monkeypatch.setattr(kernels.infllmv2, "_uses_triton", lambda backend, device: False)
        model = new_model(SPARSE)
        loss = model(inputs, labels=labels).loss
        loss.backward()
        results[backend] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=1e-6)
    for name, grad in results["torch"][1].items():
        torch.testing.assert_close(results["triton"][1][name], grad, rtol=1e-3, atol=1e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")
