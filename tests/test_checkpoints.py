"""Real chat checkpoints as synthesis targets: four architectures and the checkpoint's chat template, each checked
against transformers on the same files.

transformers runs in a subprocess (tests/hf_reference.py says why); it builds tiny random Llama, Qwen2 and Qwen3
checkpoints in Hugging Face layout and computes reference logits and apply_chat_template texts. MiniCPM is not in
transformers: a MiniCPM checkpoint is checked against transformers' Llama with the muP scales folded into the
weights (embeddings times scale_emb, o_proj and down_proj times the residual scale, the LM head divided by the
width multiplier), which is what the scales mean.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import save_file

from core.config import ConfigError
from model.minicpm import MiniCPMConfig, MiniCPMForCausalLM
from model.tokenizer import load_tokenizer, train_bpe_tokenizer
from pipelines.ultrachat import check_chat_template, main
from sft_synth.config import parse_config
from sft_synth.generation.chat_template import ChatTemplate, ChatTemplateError

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".." / "shared" / "data"
# Whitespace control matters here (block tags on their own lines), as do raise_exception, loop.first, bos_token and
# a default system message.
TEMPLATE = """{{ bos_token }}
{% for message in messages %}
{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}
{{ raise_exception('Unknown role: ' + message['role']) }}
{% endif %}
{% if loop.first and message['role'] != 'system' %}
<|im_start|>system
You are Qwen, a helpful assistant.<|im_end|>
{% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] | trim }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""
CONVERSATION = [{"role": "system", "content": "You answer in one line."},
                {"role": "user", "content": "  What is 6 x 7?\n"},
                {"role": "assistant", "content": "42."},
                {"role": "user", "content": "And 6 x 8?"}]
# Two rows of 40 tokens, the second left-padded by 5: positions reach far enough for RoPE scaling to matter.
INPUT_IDS = [[(37 * i + 5) % 300 for i in range(40)], [0] * 5 + [(53 * i + 11) % 300 for i in range(35)]]
ATTENTION_MASK = [[1] * 40, [0] * 5 + [1] * 35]


def hf_reference(spec: dict, work: Path) -> None:
    spec_path = work / "hf_spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(REPO / "tests" / "hf_reference.py"), str(spec_path)], cwd=work,
                          env=env, check=False, capture_output=True, text=True, timeout=300)
    if done.returncode:
        pytest.fail(f"tests/hf_reference.py failed:\n{done.stderr[-3000:]}")


def minicpm_as_llama(model: MiniCPMForCausalLM, directory: Path) -> None:
    """The MiniCPM model written as a Llama checkpoint, its muP scales folded into the weights."""
    config = model.config
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    embedding = state["model.embed_tokens.weight"]
    state["model.embed_tokens.weight"] = embedding * config.scale_emb
    state["lm_head.weight"] = embedding / config.width_mult
    for name, weight in state.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            state[name] = weight * config.residual_scale
    directory.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, directory / "model.safetensors",
              metadata={"format": "pt"})
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta")
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "tie_word_embeddings": False,
        "torch_dtype": "float32", **{k: getattr(config, k) for k in keys}}))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny llama / qwen2 / qwen3 checkpoints written by transformers, a MiniCPM one written by us, a BPE tokenizer
    with a chat template, and transformers' logits and chat renderings for them."""
    work = tmp_path_factory.mktemp("checkpoints")
    shakespeare = (DATA / "text" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    tokenizer = train_bpe_tokenizer([shakespeare[:60_000]], 320, work / "tokenizer" / "tokenizer.json")
    (work / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "<|im_end|>",
        "unk_token": "<unk>", "pad_token": "<pad>", "chat_template": TEMPLATE}))
    vocab = tokenizer.get_vocab_size()

    torch.manual_seed(3)
    minicpm = MiniCPMForCausalLM(MiniCPMConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, scale_emb=12.0, scale_depth=1.4, dim_model_base=16))
    with torch.no_grad():  # weights drawn as tests/hf_reference.py draws them
        for name, parameter in minicpm.named_parameters():
            parameter.copy_(1.0 + 0.2 * torch.randn_like(parameter) if name.endswith("norm.weight")
                            else 0.08 * torch.randn_like(parameter))
    minicpm.save_pretrained(work / "minicpm")
    minicpm_as_llama(minicpm, work / "minicpm-as-llama")

    archs = ("llama", "qwen2", "qwen3", "llama3")
    spec = {
        "build": [{"arch": arch, "dir": str(work / arch), "seed": seed, "vocab_size": vocab,
                   "tokenizer_dir": str(work / "tokenizer")} for seed, arch in enumerate(archs)],
        "logits": [{"dir": str(work / name), "input_ids": INPUT_IDS, "attention_mask": ATTENTION_MASK,
                    "out": str(work / f"{name}.logits.pt")} for name in (*archs, "minicpm-as-llama")],
        "chat": [{"dir": str(work / "qwen3"), "messages": messages, "add_generation_prompt": prompt,
                  "out": str(work / f"chat-{number}.json")}
                 for number, (messages, prompt) in enumerate([(CONVERSATION, True), (CONVERSATION[1:], True),
                                                              (CONVERSATION[:3], False),
                                                              ([{"role": "robot", "content": "x"}], True)])],
    }
    hf_reference(spec, work)
    return work


@pytest.mark.parametrize(("ours", "reference"), [("llama", "llama"), ("llama3", "llama3"), ("qwen2", "qwen2"),
                                                 ("qwen3", "qwen3"), ("minicpm", "minicpm-as-llama")])
def test_logits_match_transformers_on_the_same_checkpoint(checkpoints, ours, reference):
    model = MiniCPMForCausalLM.from_pretrained(checkpoints / ours, dtype=torch.float32).eval()
    expected = torch.load(checkpoints / f"{reference}.logits.pt")
    ids, mask = torch.tensor(INPUT_IDS), torch.tensor(ATTENTION_MASK)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    real = mask.bool()
    assert expected.abs().max() > 1.0  # the random weights give logits far from uniform
    torch.testing.assert_close(logits[real], expected[real], atol=2e-4, rtol=1e-4)

    # The KV-cached path (what generation runs) gives the same last-token logits as one full forward.
    with torch.no_grad():
        cache = model.new_cache(2, 48)
        model(ids[:, :-1], attention_mask=mask[:, :-1], cache=cache)
        last = model(ids[:, -1:], attention_mask=mask, cache=cache).logits[:, -1]
    torch.testing.assert_close(last, expected[:, -1], atol=2e-4, rtol=1e-4)


def test_llama3_rope_scaling_changes_the_logits(checkpoints):
    """The parity above could not fail if the scaling were a no-op on these positions: it is not."""
    config = json.loads((checkpoints / "llama3" / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": config["rope_parameters"]["rope_theta"]}
    unscaled = MiniCPMForCausalLM(MiniCPMConfig.from_dict(config)).eval()
    unscaled.load_state_dict(MiniCPMForCausalLM.from_pretrained(checkpoints / "llama3").state_dict())
    with torch.no_grad():
        logits = unscaled(torch.tensor(INPUT_IDS[:1])).logits
    assert (logits - torch.load(checkpoints / "llama3.logits.pt")[:1]).abs().max() > 1e-2


# config.json of released checkpoints, as published (the weights are not needed to read them).
QWEN25_1_5B_INSTRUCT = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu", "hidden_size": 1536, "initializer_range": 0.02, "intermediate_size": 8960,
    "max_position_embeddings": 32768, "max_window_layers": 21, "model_type": "qwen2", "num_attention_heads": 12,
    "num_hidden_layers": 28, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.43.1",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936}
R1_DISTILL_QWEN_1_5B = {**QWEN25_1_5B_INSTRUCT, "eos_token_id": 151643, "max_position_embeddings": 131072,
                        "rope_scaling": None, "rope_theta": 10000, "sliding_window": None,
                        "tie_word_embeddings": False, "use_mrope": False}
QWEN3_0_6B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024, "initializer_range": 0.02,
    "intermediate_size": 3072, "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936}
LLAMA32_1B_ROPE = {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"}


def test_released_checkpoint_configs_load():
    qwen25 = MiniCPMConfig.from_dict(QWEN25_1_5B_INSTRUCT)
    assert (qwen25.qkv_bias, qwen25.qk_norm, qwen25.head_dim, qwen25.tie_word_embeddings) == (True, False, 128, True)
    assert qwen25.rope_theta == 1e6 and qwen25.residual_scale == 1.0 and qwen25.width_mult == 1.0
    distill = MiniCPMConfig.from_dict(R1_DISTILL_QWEN_1_5B)
    assert distill.qkv_bias and not distill.tie_word_embeddings
    with pytest.raises(ValueError, match="use_mrope"):
        MiniCPMConfig.from_dict({**R1_DISTILL_QWEN_1_5B, "use_mrope": True})
    qwen3 = MiniCPMConfig.from_dict(QWEN3_0_6B)
    assert (qwen3.qk_norm, qwen3.qkv_bias, qwen3.head_dim, qwen3.num_key_value_heads) == (True, False, 128, 8)
    llama = MiniCPMConfig.from_dict({**QWEN3_0_6B, "model_type": "llama", "head_dim": 64,
                                     "rope_scaling": LLAMA32_1B_ROPE, "mlp_bias": False})
    assert llama.rope_scaling == LLAMA32_1B_ROPE and not llama.qk_norm


def test_architecture_switches_are_read_from_the_config(checkpoints):
    configs = {name: MiniCPMForCausalLM.from_pretrained(checkpoints / name).config for name in ("qwen2", "qwen3")}
    assert configs["qwen2"].qkv_bias and not configs["qwen2"].qk_norm
    assert configs["qwen3"].qk_norm and not configs["qwen3"].qkv_bias
    windowed = json.loads((checkpoints / "qwen2" / "config.json").read_text()) | {"use_sliding_window": True}
    with pytest.raises(ValueError, match="use_sliding_window"):
        MiniCPMConfig.from_dict(windowed)


def test_chat_template_renders_as_transformers_does(checkpoints):
    template = ChatTemplate.from_checkpoint(checkpoints / "qwen3")
    assert not template.is_chatml and template.stop_tokens == ("<|im_end|>",)
    cases = [(CONVERSATION, True), (CONVERSATION[1:], True), (CONVERSATION[:3], False)]
    for number, (messages, prompt) in enumerate(cases):
        expected = json.loads((checkpoints / f"chat-{number}.json").read_text())["text"]
        assert template.render(messages, add_generation_prompt=prompt) == expected
    assert expected == ("<s>\n<|im_start|>system\nYou answer in one line.<|im_end|>\n<|im_start|>user\nWhat is 6 x 7?"
                        "<|im_end|>\n<|im_start|>assistant\n42.<|im_end|>\n")
    refused = json.loads((checkpoints / "chat-3.json").read_text())["error"]
    with pytest.raises(ChatTemplateError, match="Unknown role: robot") as error:
        template.render([{"role": "robot", "content": "x"}])
    assert str(error.value) in refused
    # A checkpoint without a template gets ChatML.
    assert ChatTemplate.from_checkpoint(checkpoints / "minicpm").is_chatml


def test_ultrachat_job_generates_from_transformers_checkpoints(checkpoints, ray_local, tmp_path):
    """Qwen3 target, Llama draft (speculative decoding across architectures), the target's own chat template."""
    config = {
        "name": "checkpoint-job", "seed": 0, "chunk_size": 2,
        "models": {"target": str(checkpoints / "qwen3"), "draft": str(checkpoints / "llama"), "max_batch_size": 2,
                   "speculative": {"num_draft_tokens": 2}},
        "families": {"instruction": {
            "count": 2, "turns": 1, "system_prompt": "Be brief.", "user_prompt": "Ask about {material}",
            "assistant": {"max_new_tokens": 6, "temperature": 0.8}, "user": {"max_new_tokens": 6},
            "tasks": ["Explain {topic}."], "topics": ["tides"], "constraint_kinds": ["max_words"],
            "constraints_per_seed": 1, "keywords": ["a", "b"]}},
        "filters": {"length": {"min_chars": 0, "max_repeated_ngram_fraction": 1.0, "drop_truncated": False},
                    "language": {"enabled": False}, "decontamination": {"enabled": False},
                    "dedup": {"exact": False, "minhash": {"enabled": False}}},
        "output": {"root": "out"},
        "ray": {"num_actors": 1, "cpus_per_actor": 1},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    assert main(["--config", str(tmp_path / "job.yaml"), "--output", str(tmp_path / "out")]) == 0
    version = tmp_path / "out" / (tmp_path / "out" / "latest").read_text().strip()
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["chat_template"] == TEMPLATE
    assert manifest["models"]["target"].startswith("qwen3@") and manifest["models"]["draft"].startswith("llama@")
    rows = pq.read_table(version / "data" / "shard-00000.parquet").to_pylist()
    assert len(rows) == 2
    tokenizer = load_tokenizer(checkpoints / "qwen3")
    template = ChatTemplate.from_checkpoint(checkpoints / "qwen3")
    for row in rows:
        answer = row["messages"][-1]["content"]
        assert row["generated_tokens"] >= 1 and answer
        # The assistant's text is what the target wrote after the template's generation prompt.
        prompt = template.render([{"role": m["role"], "content": m["content"]} for m in row["messages"][:-1]])
        assert prompt.startswith("<s>\n<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nExplain tides.")
        assert tokenizer.decode(tokenizer.encode(answer, add_special_tokens=False).ids) == answer


def test_a_template_that_refuses_a_family_s_roles_fails_before_generation():
    no_tools = ChatTemplate("{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tool role') }}"
                            "{% endif %}{{ m['content'] }}{% endfor %}")
    common = {"count": 1, "system_prompt": "s", "user_prompt": "{material}"}
    families = {"instruction": {**common, "tasks": ["Explain {topic}."], "topics": ["tides"], "keywords": ["a", "b"]}}
    config = parse_config({"models": {"target": "t"}, "families": families})
    check_chat_template(no_tools, config, "here")  # no family sends a tool message
    tool_use = {**common, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}],
                "tool_prompt": "{tool} {call}"}
    config = parse_config({"models": {"target": "t"}, "families": {**families, "tool_use": tool_use}})
    with pytest.raises(ConfigError, match="chat template of here cannot render a system / user / assistant / tool "
                                          "conversation: no tool role"):
        check_chat_template(no_tools, config, "here")
