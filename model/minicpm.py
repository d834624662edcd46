"""A MiniCPM4-architecture decoder in one file, loadable from Hugging Face-layout checkpoints.

Llama-style decoder (RMSNorm, SwiGLU, RoPE, grouped-query attention) with MiniCPM's muP-style scaling:
embeddings times ``scale_emb``, every residual branch times ``scale_depth / sqrt(num_hidden_layers)``, and the
final hidden state divided by ``hidden_size / dim_model_base`` before the LM head. With scale_emb = 1,
scale_depth = sqrt(L) and dim_model_base = hidden_size the model is exactly Llama, which is how Llama checkpoints
load. Two switches cover the Qwen families: ``qkv_bias`` (Qwen2 / Qwen2.5: biases on the q, k and v projections,
none on o) and ``qk_norm`` (Qwen3: an RMSNorm over each head's queries and keys before RoPE). Parameter names
match the Hugging Face weight names, so a state dict maps one to one onto safetensors.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.io import atomic_write_bytes
from model.attention import attention

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

# config.json keys that describe the file or the generation defaults, not the network: accepted and not kept.
_METADATA_KEYS = {
    "architectures",
    "auto_map",
    "model_type",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "use_cache",
    "pad_token_id",
    "_name_or_path",
    "attention_dropout",
    "pretraining_tp",
    "hidden_act",
    "attention_bias",
    "mlp_bias",
    # Read only by MiniCPM's Eagle draft heads; the MiniCPM4 decoder forward never uses it.
    "mup_denominator",
    # Qwen's sliding-window and M-RoPE settings: inert while switched off, which _REQUIRED_VALUES demands.
    "use_sliding_window",
    "use_mrope",
    "sliding_window",
    "max_window_layers",
    "layer_types",
    # transformers >= 5 spells rope_theta / rope_scaling as one dict; from_dict unfolds it.
    "rope_parameters",
}
# Architecture switches we know, with the only value this implementation computes correctly.
_REQUIRED_VALUES = {
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "pretraining_tp": 1,
    "attention_dropout": 0.0,
    "use_sliding_window": False,
    "use_mrope": False,  # Qwen2-VL's multimodal RoPE; text Qwen2 configs (R1 distills) carry it switched off
}
_SUPPORTED_MODEL_TYPES = {"minicpm", "llama", "qwen2", "qwen3", None}
_ROPE_TYPES = {"default", "longrope", "llama3"}


@dataclass
class MiniCPMConfig:
    vocab_size: int = 73448
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 32768
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False  # Qwen2 / Qwen2.5
    qk_norm: bool = False  # Qwen3
    # Defaults are the Llama identity; MiniCPM configs set all three.
    scale_emb: float = 1.0
    scale_depth: float | None = None  # None: sqrt(num_hidden_layers)
    dim_model_base: int | None = None  # None: hidden_size
    tie_word_embeddings: bool = True
    sparse_config: dict | None = None
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.scale_depth is None:
            self.scale_depth = math.sqrt(self.num_hidden_layers)
        if self.dim_model_base is None:
            self.dim_model_base = self.hidden_size
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.sparse_config is not None:
            from kernels.infllmv2 import SparseConfig

            SparseConfig.from_dict(
                self.sparse_config
            )  # unknown or inconsistent keys fail here, not mid-forward
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if rope_type not in _ROPE_TYPES:
                raise ValueError(
                    f"rope_scaling type {rope_type!r} is not supported (supported: {sorted(_ROPE_TYPES)})"
                )

    @property
    def residual_scale(self) -> float:
        return self.scale_depth / math.sqrt(self.num_hidden_layers)

    @property
    def width_mult(self) -> float:
        """hidden_size / dim_model_base: the muP width multiplier (1 for Llama)."""
        return self.hidden_size / self.dim_model_base

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MiniCPMConfig:
        """Build from a Hugging Face config.json dict (MiniCPM or Llama); unknown keys are errors, not ignored."""
        model_type = d.get("model_type")
        if model_type not in _SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {model_type!r} is not supported (supported: minicpm, llama, qwen2, qwen3)"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in d if k not in known and k not in _METADATA_KEYS)
        if unknown:
            raise ValueError(
                f"unknown architecture field(s) {unknown} in model config: this implementation does not compute "
                "them, and ignoring them would silently change the network"
            )
        for key, required in _REQUIRED_VALUES.items():
            if key in d and d[key] != required:
                raise ValueError(f"{key}={d[key]!r} is not supported (only {required!r})")
        windowed = sorted({t for t in d.get("layer_types") or () if t != "full_attention"})
        if windowed:
            raise ValueError(f"layer_types {windowed} are not supported (only full_attention)")
        kwargs = {k: v for k, v in d.items() if k in known}
        rope = d.get("rope_parameters")
        if rope is not None:
            kwargs["rope_theta"] = rope.get("rope_theta", cls.rope_theta)
            if rope.get("rope_type", "default") != "default":
                kwargs["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        if model_type == "minicpm":
            # Hugging Face MiniCPM's own defaults differ from the Llama identity used by this dataclass.
            kwargs.setdefault("scale_emb", 1.0)
            kwargs.setdefault("scale_depth", 1.0)
            kwargs.setdefault("dim_model_base", 1)
            kwargs.setdefault("tie_word_embeddings", False)
        if model_type in ("llama", "qwen2", "qwen3"):
            kwargs.setdefault("tie_word_embeddings", False)
            if kwargs.get("head_dim") is None:
                kwargs.pop("head_dim", None)
        # Hugging Face's Qwen classes fix these in code, not in config.json.
        if model_type == "qwen2":
            kwargs["qkv_bias"] = True
        if model_type == "qwen3":
            kwargs["qk_norm"] = True
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "architectures": ["MiniCPMForCausalLM"],
            "model_type": "minicpm",
            "hidden_act": "silu",
            **asdict(self),
        }


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # float32 [B, T, V]
    loss: torch.Tensor | None = None
    hidden: torch.Tensor | None = None  # [B, T, hidden], already divided by width_mult


@dataclass
class KVCache:
    """Preallocated keys/values per layer, [B, Hkv, max_len, D]; ``length`` positions are valid."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0
    # Padding mask of the cached positions ([B, max_len], 1 = real token) when the caller passed one.
    attention_mask: torch.Tensor | None = field(default=None)

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def crop(self, n: int) -> None:
        """Roll back to the first n positions; later writes overwrite what was beyond them."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot crop a cache of length {self.length} to {n}")
        self.length = n

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions needed, {self.max_len} allocated")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in float32 as in the reference implementations; bf16 variance loses the small components.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE (rotate-half convention of Hugging Face checkpoints), with MiniCPM's LongRoPE and Llama 3.1's variants."""

    def __init__(self, config: MiniCPMConfig):
        super().__init__()
        dim = config.head_dim
        # Built on the CPU even under a meta-device context, and kept out of the module's buffers so that
        # model.to(torch.bfloat16) cannot round the frequencies: positions must stay exact at long context.
        inv_freq = 1.0 / (
            config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
        )
        self.attention_factor = 1.0
        scaling = config.rope_scaling
        if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "longrope":
            original = scaling["original_max_position_embeddings"]
            # The released MiniCPM code builds its table once at max_position_embeddings, so the factor set is
            # fixed by that length rather than by the current sequence (check).
            use_long = config.max_position_embeddings > original
            ext = torch.tensor(
                scaling["long_factor" if use_long else "short_factor"], dtype=torch.float32, device="cpu"
            )
            inv_freq = inv_freq / ext
            scale = config.max_position_embeddings / original
            self.attention_factor = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0
        if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "llama3":
            inv_freq = llama3_frequencies(inv_freq, scaling)
        self.inv_freq = inv_freq

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != position_ids.device:
            self.inv_freq = self.inv_freq.to(position_ids.device)
        freqs = position_ids.float()[..., None] * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos() * self.attention_factor, emb.sin() * self.attention_factor


def llama3_frequencies(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1's context extension: wavelengths beyond original / low_freq_factor are stretched by `factor`,
    those below original / high_freq_factor kept, and the band between blends the two linearly in
    original / wavelength."""
    factor, original = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelength = 2 * math.pi / inv_freq
    blend = ((original / wavelength - low) / (high - low)).clamp(0.0, 1.0)
    return (1 - blend) * inv_freq / factor + blend * inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos/sin [B, T, D]. Rotation in float32 so bf16 models keep exact positions."""
    xf = x.float()
    return (xf * cos[:, None] + rotate_half(xf) * sin[:, None]).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: MiniCPMConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.sparse_config = config.sparse_config
        bias = config.qkv_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, layer_idx, cache, attention_mask):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(layer_idx, k, v)
        y = attention(q, k, v, sparse_config=self.sparse_config, attention_mask=attention_mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: MiniCPMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: MiniCPMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)
        self.residual_scale = config.residual_scale

    def forward(self, x, cos, sin, layer_idx, cache, attention_mask):
        x = (
            x
            + self.self_attn(self.input_layernorm(x), cos, sin, layer_idx, cache, attention_mask)
            * self.residual_scale
        )
        return x + self.mlp(self.post_attention_layernorm(x)) * self.residual_scale


class MiniCPMModel(nn.Module):
    def __init__(self, config: MiniCPMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MiniCPMForCausalLM(nn.Module):
    def __init__(self, config: MiniCPMConfig):
        super().__init__()
        self.config = config
        self.model = MiniCPMModel(config)
        self.rotary = RotaryEmbedding(config)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # muP: hidden matrices shrink with width so activations keep their scale as the proxy widens.
        if isinstance(module, nn.Linear):
            nn.init.normal_(
                module.weight, std=self.config.initializer_range / math.sqrt(self.config.width_mult)
            )
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=self.config.initializer_range)

    def lm_head_weight(self) -> torch.Tensor:
        """The [V, hidden] output matrix: the tied embedding or lm_head."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.model.embed_tokens.weight.numel() if exclude_embeddings else n

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> KVCache:
        ref = self.model.embed_tokens.weight
        shape = (batch_size, self.config.num_key_value_heads, max_len, self.config.head_dim)
        device, dtype = device or ref.device, dtype or ref.dtype
        n = self.config.num_hidden_layers
        return KVCache(
            keys=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)],
            values=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)],
        )

    def final_hidden(
        self, input_ids, *, attention_mask=None, position_ids=None, cache: KVCache | None = None
    ):
        """Last hidden states divided by hidden_size / dim_model_base: ``hidden @ lm_head_weight().T`` = logits."""
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if cache is not None and attention_mask is not None:
            # The caller's mask covers past + new positions; keep it so later decode steps still see the padding.
            if cache.attention_mask is None:
                cache.attention_mask = torch.ones(B, cache.max_len, dtype=torch.long, device=input_ids.device)
            cache.attention_mask[:, : past + T] = attention_mask[:, -(past + T) :]
        if cache is not None and cache.attention_mask is not None:
            attention_mask = cache.attention_mask[:, : past + T]
        if position_ids is None:
            if attention_mask is not None:
                # Left padding: positions count real tokens only, so a padded row matches its unpadded run.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        cos, sin = self.rotary(position_ids)
        x = self.model.embed_tokens(input_ids) * self.config.scale_emb
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, i, cache, attention_mask)
        if cache is not None:
            cache.length += T
        return self.model.norm(x) / self.config.width_mult

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        labels: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> ModelOutput:
        hidden = self.final_hidden(
            input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache
        )
        logits = F.linear(hidden, self.lm_head_weight()).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        return ModelOutput(logits=logits, loss=loss, hidden=hidden if return_hidden else None)

    # ---- Hugging Face-layout checkpoints -------------------------------------------------------------------

    def save_pretrained(
        self, path: str | Path, *, dtype: torch.dtype | None = None, max_shard_bytes: int | None = None
    ):
        """config.json + model.safetensors, or shards with model.safetensors.index.json past max_shard_bytes."""
        from safetensors.torch import save

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in self.state_dict().items()}
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, tensor in state.items():
            nbytes = tensor.numel() * tensor.element_size()
            if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = tensor
            size += nbytes
        config = self.config.to_dict()
        config["torch_dtype"] = str(dtype or self.model.embed_tokens.weight.dtype).removeprefix("torch.")
        stale = {WEIGHTS_NAME, WEIGHTS_INDEX_NAME} | {p.name for p in path.glob("model-*-of-*.safetensors")}
        if len(shards) == 1:
            names = [WEIGHTS_NAME]
        else:
            names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for name, shard in zip(names, shards):
            atomic_write_bytes(path / name, save(shard, metadata={"format": "pt"}))
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                "weight_map": {k: name for name, shard in zip(names, shards) for k in shard},
            }
            atomic_write_bytes(path / WEIGHTS_INDEX_NAME, json.dumps(index, indent=2).encode())
        for old in stale - set(names) - ({WEIGHTS_INDEX_NAME} if len(shards) > 1 else set()):
            (path / old).unlink(missing_ok=True)
        atomic_write_bytes(path / CONFIG_NAME, json.dumps(config, indent=2).encode())

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> MiniCPMForCausalLM:
        """Load a MiniCPM, Llama, Qwen2 / Qwen2.5 or Qwen3 checkpoint directory; dtype defaults to the stored one."""
        path = Path(path)
        config_path = path / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in checkpoint directory {path}")
        config = MiniCPMConfig.from_dict(json.loads(config_path.read_text()))
        state = read_safetensors_dir(path)
        with torch.device("meta"):
            model = cls(config)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        if config.tie_word_embeddings and "lm_head.weight" in state:
            if not torch.equal(state["lm_head.weight"], state.get("model.embed_tokens.weight")):
                raise ValueError(
                    f"{path}: tie_word_embeddings is true but lm_head.weight differs from the embedding"
                )
            del state["lm_head.weight"]
        # Older Hugging Face exports store the RoPE table; it is recomputed from the config here.
        state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
        missing = sorted(set(expected) - set(state))
        extra = sorted(set(state) - set(expected))
        if missing or extra:
            raise ValueError(
                f"checkpoint {path} does not match the config: missing tensors {missing}, unexpected {extra}"
            )
        for name, shape in expected.items():
            if state[name].shape != shape:
                raise ValueError(
                    f"checkpoint {path}: tensor {name} has shape {tuple(state[name].shape)}, expected {tuple(shape)}"
                )
        dtype = dtype or state["model.embed_tokens.weight"].dtype
        model = model.to(dtype=dtype).to_empty(device=device)
        model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()})
        return model


def read_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index_path = path / WEIGHTS_INDEX_NAME
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = path / shard
            if not shard_path.is_file():
                raise FileNotFoundError(f"{index_path} names shard {shard}, which is missing")
            state.update(load_file(shard_path))
        unlisted = sorted(set(state) - set(weight_map))
        if unlisted:
            raise ValueError(f"{index_path}: shards hold tensors the index does not list: {unlisted}")
        return state
    if (path / WEIGHTS_NAME).is_file():
        return load_file(path / WEIGHTS_NAME)
    raise FileNotFoundError(f"no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} in checkpoint directory {path}")
