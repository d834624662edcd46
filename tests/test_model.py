"""MiniCPM model: shapes, causality, Llama/MiniCPM forward against an independent reference, checkpoints, KV cache."""

import json
import math
import re

import pytest
import torch
from safetensors.torch import save_file

from model.attention import attention
from model.minicpm import MiniCPMConfig, MiniCPMForCausalLM

TINY = {
    "vocab_size": 300,
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny matrices gain nothing from intra-op threads, and on a shared 2-core machine the spinning threads cost
    several times the compute."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(**overrides) -> MiniCPMForCausalLM:
    torch.manual_seed(0)
    return MiniCPMForCausalLM(MiniCPMConfig(**{**TINY, **overrides})).eval()


def reference_forward(state: dict, cfg: dict, input_ids: torch.Tensor) -> torch.Tensor:
    """Plain Llama/MiniCPM forward from a raw state dict: explicit softmax attention, no code from model/."""
    hidden, n_heads, n_kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or hidden // n_heads
    n_layers, eps = cfg["num_hidden_layers"], cfg["rms_norm_eps"]
    scale_emb = cfg.get("scale_emb", 1.0)
    residual = cfg.get("scale_depth", math.sqrt(n_layers)) / math.sqrt(n_layers)
    width = hidden / cfg.get("dim_model_base", hidden)
    T = input_ids.shape[1]

    def rms(x, w):
        return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))

    inv_freq = torch.tensor(
        [cfg["rope_theta"] ** (-2 * i / head_dim) for i in range(head_dim // 2)], dtype=torch.float64
    )
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None]
    cos, sin = torch.cos(angles).float(), torch.sin(angles).float()

    def rope(x):  # x [B, H, T, D]; Hugging Face pairs dimension i with i + D/2
        a, b = x[..., : head_dim // 2], x[..., head_dim // 2 :]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    x = state["model.embed_tokens.weight"][input_ids] * scale_emb
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for i in range(n_layers):
        p = f"model.layers.{i}."
        h = rms(x, state[p + "input_layernorm.weight"])
        q = (h @ state[p + "self_attn.q_proj.weight"].T).unflatten(-1, (n_heads, head_dim)).transpose(1, 2)
        k = (h @ state[p + "self_attn.k_proj.weight"].T).unflatten(-1, (n_kv, head_dim)).transpose(1, 2)
        v = (h @ state[p + "self_attn.v_proj.weight"].T).unflatten(-1, (n_kv, head_dim)).transpose(1, 2)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(n_heads // n_kv, 1), v.repeat_interleave(n_heads // n_kv, 1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        attn = (probs @ v).transpose(1, 2).flatten(2)
        x = x + (attn @ state[p + "self_attn.o_proj.weight"].T) * residual
        h = rms(x, state[p + "post_attention_layernorm.weight"])
        gate, up = h @ state[p + "mlp.gate_proj.weight"].T, h @ state[p + "mlp.up_proj.weight"].T
        x = x + ((torch.nn.functional.silu(gate) * up) @ state[p + "mlp.down_proj.weight"].T) * residual
    x = rms(x, state["model.norm.weight"]) / width
    head = state.get("lm_head.weight", state["model.embed_tokens.weight"])
    return x @ head.T


def random_state(cfg: dict, tied: bool) -> dict:
    g = torch.Generator().manual_seed(1)
    hidden, inter, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    q_out, kv_out = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim

    def w(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    state = {"model.embed_tokens.weight": w(V, hidden, scale=1.0), "model.norm.weight": 1 + w(hidden)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state.update(
            {
                p + "self_attn.q_proj.weight": w(q_out, hidden),
                p + "self_attn.k_proj.weight": w(kv_out, hidden),
                p + "self_attn.v_proj.weight": w(kv_out, hidden),
                p + "self_attn.o_proj.weight": w(hidden, q_out),
                p + "mlp.gate_proj.weight": w(inter, hidden),
                p + "mlp.up_proj.weight": w(inter, hidden),
                p + "mlp.down_proj.weight": w(hidden, inter),
                p + "input_layernorm.weight": 1 + w(hidden),
                p + "post_attention_layernorm.weight": 1 + w(hidden),
            }
        )
    if not tied:
        state["lm_head.weight"] = w(V, hidden)
    return state


LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 64,
    "head_dim": 8,
    "initializer_range": 0.02,
    "intermediate_size": 160,
    "max_position_embeddings": 256,
    "mlp_bias": False,
    "num_attention_heads": 6,
    "num_hidden_layers": 3,
    "num_key_value_heads": 2,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-5,
    "rope_scaling": None,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "transformers_version": "4.44.0",
    "use_cache": True,
    "vocab_size": 300,
}


def write_sharded_checkpoint(path, config: dict, state: dict) -> None:
    """Hugging Face layout as transformers writes it: two shards plus an index."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    names = sorted(state)
    shards = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    for file, keys in shards.items():
        save_file({k: state[k].contiguous() for k in keys}, path / file, metadata={"format": "pt"})
    index = {"metadata": {"total_size": 0}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def test_logit_shapes_and_causality():
    model = tiny_model()
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[:, 7] = (ids[:, 7] + 1) % 300
    with torch.no_grad():
        out, out_changed = model(ids), model(changed)
    assert out.logits.shape == (2, 12, 300) and out.logits.dtype == torch.float32
    assert torch.equal(out.logits[:, :7], out_changed.logits[:, :7])
    assert (out.logits[:, 7:] - out_changed.logits[:, 7:]).abs().amax() > 1e-3


def test_loss_is_mean_cross_entropy_with_ignore_index():
    model = tiny_model()
    ids = torch.randint(0, 300, (2, 6), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 300, (2, 6), generator=torch.Generator().manual_seed(2))
    labels[0, :3] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
    logp = out.logits.log_softmax(-1)
    keep = labels != -100
    expected = -logp[keep].gather(-1, labels[keep][:, None]).mean()
    torch.testing.assert_close(out.loss, expected)


def test_llama_checkpoint_matches_plain_llama_forward(tmp_path):
    state = random_state(LLAMA_CONFIG, tied=False)
    write_sharded_checkpoint(tmp_path / "llama", LLAMA_CONFIG, state)
    model = MiniCPMForCausalLM.from_pretrained(tmp_path / "llama")
    assert model.config.scale_emb == 1 and model.config.dim_model_base == 64
    assert model.config.scale_depth == pytest.approx(math.sqrt(3))
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(ids).logits
    torch.testing.assert_close(logits, reference_forward(state, LLAMA_CONFIG, ids), rtol=1e-4, atol=1e-4)


def test_minicpm_scaling_matches_reference(tmp_path):
    config = {
        "model_type": "minicpm",
        **TINY,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "scale_emb": 12,
        "scale_depth": 1.4,
        "dim_model_base": 16,
        "tie_word_embeddings": True,
    }
    state = random_state(config, tied=True)
    state["model.embed_tokens.weight"] *= 0.05  # keep 12x-scaled embeddings in a sane range
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    save_file(state, tmp_path / "m" / "model.safetensors")
    model = MiniCPMForCausalLM.from_pretrained(tmp_path / "m")
    ids = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = model(ids).logits
    torch.testing.assert_close(logits, reference_forward(state, config, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype,shard_bytes", [(torch.float32, None), (torch.bfloat16, 40_000)])
def test_save_load_round_trip_is_bit_exact(tmp_path, dtype, shard_bytes):
    model = tiny_model(scale_emb=12, scale_depth=1.4, dim_model_base=16, tie_word_embeddings=False).to(dtype)
    model.save_pretrained(tmp_path, max_shard_bytes=shard_bytes)
    assert (tmp_path / "model.safetensors.index.json").is_file() == (shard_bytes is not None)
    loaded = MiniCPMForCausalLM.from_pretrained(tmp_path)
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert a.dtype == b.dtype == dtype and torch.equal(a, b), name
    ids = torch.randint(0, 300, (1, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded.eval()(ids).logits)


@pytest.mark.parametrize(
    "damage,message",
    [
        ("drop", "model.layers.1.mlp.up_proj.weight"),
        ("extra", "model.layers.9.mlp.up_proj.weight"),
        ("reshape", "model.layers.1.mlp.up_proj.weight has shape (160, 32)"),
    ],
)
def test_damaged_checkpoint_names_the_tensor(tmp_path, damage, message):
    config = {**LLAMA_CONFIG, "num_hidden_layers": 2}
    state = random_state(config, tied=False)
    name = "model.layers.1.mlp.up_proj.weight"
    if damage == "drop":
        del state[name]
    elif damage == "extra":
        state["model.layers.9.mlp.up_proj.weight"] = state.pop(name).clone()
        state[name] = state["model.layers.9.mlp.up_proj.weight"].clone()
    else:
        state[name] = state[name][:, :32].contiguous()
    write_sharded_checkpoint(tmp_path / "bad", config, state)
    with pytest.raises(ValueError, match=re.escape(message)):
        MiniCPMForCausalLM.from_pretrained(tmp_path / "bad")


@pytest.mark.parametrize(
    "flag,value", [("use_output_gate", True), ("use_output_norm", True), ("attention_bias", True)]
)
def test_unknown_or_unsupported_architecture_flags_are_rejected(flag, value):
    with pytest.raises(ValueError, match=flag):
        MiniCPMConfig.from_dict({"model_type": "minicpm", **TINY, flag: value})


def test_longrope_at_native_length_uses_short_factors():
    half = TINY["hidden_size"] // TINY["num_attention_heads"] // 2
    plain = tiny_model()
    scaled = MiniCPMForCausalLM(
        MiniCPMConfig(
            **TINY,
            rope_scaling={
                "rope_type": "longrope",
                "short_factor": [2.0] * half,
                "long_factor": [8.0] * half,
                "original_max_position_embeddings": TINY["max_position_embeddings"],
            },
        )
    )
    torch.testing.assert_close(scaled.rotary.inv_freq, plain.rotary.inv_freq / 2)
    assert scaled.rotary.attention_factor == 1.0


def test_kv_cache_incremental_decoding_equals_full_forward():
    model = tiny_model(scale_emb=12, scale_depth=1.4, dim_model_base=16)
    ids = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, 16)
        steps = [model(ids[:, :5], cache=cache).logits]
        steps += [model(ids[:, t : t + 1], cache=cache).logits for t in range(5, 11)]
        assert cache.length == 11
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
        # Speculative decoding rolls back rejected drafts: crop, then continue with other tokens.
        cache.crop(7)
        other = ids.clone()
        other[:, 7:] = (ids[:, 7:] + 5) % 300
        resumed = model(other[:, 7:], cache=cache).logits
        torch.testing.assert_close(resumed, model(other).logits[:, 7:], rtol=1e-5, atol=1e-5)


def test_left_padded_batch_matches_unpadded_rows():
    model = tiny_model()
    g = torch.Generator().manual_seed(7)
    short, long = torch.randint(6, 300, (1, 5), generator=g), torch.randint(6, 300, (1, 8), generator=g)
    batch = torch.cat([torch.cat([torch.full((1, 3), 3), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    with torch.no_grad():
        cache = model.new_cache(2, 10)
        padded = model(batch, attention_mask=mask, cache=cache).logits
        next_tokens = torch.tensor([[11], [12]])
        decoded = model(next_tokens, cache=cache).logits
        torch.testing.assert_close(padded[0, 3:], model(short).logits[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(padded[1], model(long).logits[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            decoded[0, 0], model(torch.cat([short, next_tokens[:1]], 1)).logits[0, -1], rtol=1e-5, atol=1e-5
        )


def test_final_hidden_over_a_vocabulary_subset_gives_those_logits():
    model = tiny_model(scale_emb=12, dim_model_base=16)
    ids = torch.randint(0, 300, (1, 6), generator=torch.Generator().manual_seed(8))
    subset = torch.tensor([0, 5, 17, 299])
    with torch.no_grad():
        out = model(ids, return_hidden=True)
        hidden = model.final_hidden(ids)
    torch.testing.assert_close(hidden, out.hidden)
    torch.testing.assert_close(hidden @ model.lm_head_weight()[subset].T, out.logits[..., subset])


def test_dense_attention_with_offset_queries_matches_explicit_softmax():
    g = torch.Generator().manual_seed(9)
    q, k, v = (
        torch.randn(1, 4, 3, 8, generator=g),
        torch.randn(1, 2, 7, 8, generator=g),
        torch.randn(1, 2, 7, 8, generator=g),
    )
    out = attention(q, k, v, sparse_config=None)
    k_full, v_full = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = q @ k_full.transpose(-1, -2) / math.sqrt(8)
    allowed = torch.arange(7)[None, :] <= torch.arange(4, 7)[:, None]
    expected = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v_full
    torch.testing.assert_close(out, expected)


def test_sparse_config_routes_long_inputs_to_infllmv2():
    infllmv2 = pytest.importorskip("kernels.infllmv2")
    g = torch.Generator().manual_seed(10)
    q, k, v = (
        torch.randn(1, 4, 128, 16, generator=g),
        torch.randn(1, 2, 128, 16, generator=g),
        torch.randn(1, 2, 128, 16, generator=g),
    )
    sparse = {
        "block_size": 16,
        "dense_len": 64,
        "init_blocks": 1,
        "kernel_size": 8,
        "kernel_stride": 4,
        "topk": 4,
        "use_nope": False,
        "window_size": 16,
    }
    expected = infllmv2.infllmv2_attention(q, k, v, infllmv2.SparseConfig.from_dict(sparse), backend="torch")
    torch.testing.assert_close(attention(q, k, v, sparse_config=sparse), expected, rtol=1e-4, atol=1e-4)
    # Every block selected: sparse attention is exact dense attention.
    everything = {**sparse, "topk": 8}
    torch.testing.assert_close(
        attention(q, k, v, sparse_config=everything),
        attention(q, k, v, sparse_config=None),
        rtol=1e-4,
        atol=1e-4,
    )
    # Below dense_len the same layer stays dense.
    short = attention(q[:, :, :32], k[:, :, :32], v[:, :, :32], sparse_config=sparse)
    torch.testing.assert_close(short, attention(q[:, :, :32], k[:, :, :32], v[:, :, :32], sparse_config=None))


def test_model_with_sparse_config_runs_sparse_layers_past_dense_len():
    pytest.importorskip("kernels.infllmv2")
    sparse = {
        "block_size": 16,
        "dense_len": 32,
        "init_blocks": 1,
        "kernel_size": 8,
        "kernel_stride": 4,
        "topk": 2,  # budget topk + window_size // block_size = 3 of the 4 blocks
        "use_nope": False,
        "window_size": 16,
    }
    dense, every_block, few_blocks = (
        tiny_model(),
        tiny_model(sparse_config={**sparse, "topk": 4}),
        tiny_model(sparse_config=sparse),
    )
    ids = torch.randint(0, 300, (1, 64), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        reference = dense(ids).logits
        torch.testing.assert_close(every_block(ids).logits, reference, rtol=1e-4, atol=1e-4)
        assert (few_blocks(ids).logits - reference).abs().amax() > 1e-4


def test_rope_frequencies_stay_float32_in_a_bf16_model(tmp_path):
    model = tiny_model().to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    for m in (model, MiniCPMForCausalLM.from_pretrained(tmp_path)):
        assert m.rotary.inv_freq.dtype == torch.float32
        d, theta = m.config.head_dim, m.config.rope_theta
        expected = [1.0 / theta ** (2 * i / d) for i in range(d // 2)]  # 1 / theta^(2i/D), in float64
        torch.testing.assert_close(m.rotary.inv_freq.double(), torch.tensor(expected, dtype=torch.float64),
                                   rtol=1e-7, atol=0)
