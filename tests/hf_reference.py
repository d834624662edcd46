"""transformers as the reference for tests/test_checkpoints.py, run as a script in its own process.

A process of its own keeps transformers away from the repository's ``kernels`` package: transformers looks for the
Hugging Face package of that name (a requirement from 5.25 on, optional before) and, with the repository root on
sys.path, would find this one. Run as a script from a temporary directory, it sees only installed packages.

    python hf_reference.py SPEC.json

SPEC: {"build": [{"arch", "dir", "seed", "vocab_size", "tokenizer_dir"}],   tiny random checkpoints, every weight
       drawn (norms and biases too, so that a missing bias or norm shows),
       "logits": [{"dir", "input_ids", "attention_mask", "out"}],          float32 logits saved with torch.save,
       "chat": [{"dir", "messages", "add_generation_prompt", "out"}]}       apply_chat_template text, or the error
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
import transformers
from jinja2.exceptions import TemplateError

ARCHITECTURES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 16}),
    # Llama 3.1's RoPE extension; with head_dim 16 and a short original context, some wavelengths fall in each of
    # its three bands (kept, blended, stretched).
    "llama3": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}),
}


def build(arch: str, dir: str, seed: int, vocab_size: int, tokenizer_dir: str | None = None) -> None:
    config_class, model_class, extra = ARCHITECTURES[arch]
    config = config_class(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          tie_word_embeddings=False, **extra)
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(1.0 + 0.2 * torch.randn_like(parameter))
            else:
                parameter.copy_(0.08 * torch.randn_like(parameter))
    model.save_pretrained(dir)
    if tokenizer_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(Path(tokenizer_dir) / name, Path(dir) / name)


@torch.no_grad()
def logits(dir: str, input_ids: list[list[int]], attention_mask: list[list[int]] | None, out: str) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(dir, dtype=torch.float32).eval()
    ids = torch.tensor(input_ids)
    mask = torch.tensor(attention_mask) if attention_mask is not None else torch.ones_like(ids)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    result = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()
    torch.save(result, out)


def chat(dir: str, messages: list[dict], add_generation_prompt: bool, out: str) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(dir)
    try:
        text = {"text": tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)}
    except TemplateError as error:  # the test compares the message of a template's raise_exception
        text = {"error": str(error)}
    Path(out).write_text(json.dumps(text))


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    for item in spec.get("build", []):
        build(**item)
    for item in spec.get("logits", []):
        logits(**item)
    for item in spec.get("chat", []):
        chat(**item)


if __name__ == "__main__":
    main(sys.argv[1])
