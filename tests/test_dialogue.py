"""Dialogue synthesis as one stream of requests: a chunk's dialogues, decoded together through a few slots with
speculation, are the same dialogues as each seed synthesized alone (greedy decoding, so the reference is exact)."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from model.minicpm import MiniCPMConfig, MiniCPMForCausalLM
from model.tokenizer import train_bpe_tokenizer
from sft_synth.config import InstructionConfig, KnowledgeConfig, ToolUseConfig
from sft_synth.dialogue import DialogueSynthesizer
from sft_synth.generation import (
    Generation,
    GenerationEngine,
    GenerationSettings,
    GenerationStats,
    SpeculativeConfig,
)
from sft_synth.seeds import Seed

SHAKESPEARE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "text" / "tinyshakespeare.txt"
TEXT = SHAKESPEARE.read_text(encoding="utf-8")[:100_000]
ASSISTANT = GenerationSettings(max_new_tokens=9, temperature=0.0)
USER = GenerationSettings(max_new_tokens=5, temperature=0.0, repetition_penalty=1.2)
COMMON = {"count": 3, "turns": 2, "system_prompt": "You are a helpful assistant.", "assistant": ASSISTANT,
          "user": USER}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city", "days"]}}}


def tiny_model(vocab_size: int, hidden: int, seed: int) -> MiniCPMForCausalLM:
    torch.manual_seed(seed)
    config = MiniCPMConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.5)
    return MiniCPMForCausalLM(config).eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tokenizer = train_bpe_tokenizer([TEXT], 400, tmp_path_factory.mktemp("tok"))
    target = tiny_model(tokenizer.get_vocab_size(), 64, seed=0)
    draft = tiny_model(tokenizer.get_vocab_size(), 64, seed=0)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return target, draft, tokenizer


def family_cases():
    paragraphs = [p for p in TEXT.split("\n\n") if len(p) > 80][:4]
    knowledge = KnowledgeConfig(**COMMON, user_prompt="Ask about this passage: {material}",
                                source={"path": "unused.parquet"})
    instruction = InstructionConfig(**COMMON, user_prompt="Follow up on: {material}", tasks=["Write about {topic}."],
                                    topics=["bread"], keywords=["simple", "history"])
    tool_use = ToolUseConfig(**COMMON, user_prompt="Use {material}.", tools=[WEATHER], call_mode="guided",
                             tool_prompt="You are the tool {tool}; answer the call {call}.",
                             tool=GenerationSettings(max_new_tokens=4, temperature=0.0))
    return {
        "knowledge": (knowledge, [Seed("knowledge", f"k:{i}", "test", p) for i, p in enumerate(paragraphs)]),
        # The first user message is given: the opening turn goes straight to the assistant.
        "instruction": (instruction, [Seed("instruction", f"i:{i}", "test", p[:60], opening=p[:60])
                                      for i, p in enumerate(paragraphs)]),
        "tool_use": (tool_use, [Seed("tool_use", f"t:{i}", "test", "get_weather", tools=[WEATHER], tool="get_weather")
                                for i in range(3)]),
    }


@pytest.mark.parametrize("family", ["knowledge", "instruction", "tool_use"])
def test_a_chunk_streamed_through_few_slots_equals_each_dialogue_alone(pair, family):
    target, draft, tokenizer = pair
    config, seeds = family_cases()[family]
    stream = GenerationEngine(target, tokenizer, draft, max_batch_size=2, prefix_cache_tokens=4096,
                              speculative=SpeculativeConfig(num_draft_tokens=3, adaptive=False))
    served: list[int] = []
    serve = stream.serve

    def counting_serve(requests, on_finish, **kwargs):
        served.append(len(requests))
        return serve(requests, on_finish, **kwargs)

    stream.serve = counting_serve
    together = DialogueSynthesizer(stream, family, config, run_seed=0).synthesize(seeds, chunk=0)
    assert served == [len(seeds)]  # one stream per chunk: every dialogue's first request, the rest follow
    alone_engine = GenerationEngine(target, tokenizer, max_batch_size=1)
    for seed, dialogue in zip(seeds, together):
        [alone] = DialogueSynthesizer(alone_engine, family, config, run_seed=0).synthesize([seed], chunk=0)
        assert dialogue["messages"] == alone["messages"]
        assert dialogue["generated_tokens"] == alone["generated_tokens"] > 0
    roles = [m["role"] for m in together[0]["messages"]]
    if family == "tool_use":  # guided: the schema's call, answered by the tool simulator, then the reply
        assert roles == ["system", "user", "assistant", "tool", "assistant", "user", "assistant"]
        call = together[0]["messages"][2]["tool_calls"][0]["function"]
        assert call["name"] == "get_weather" and sorted(json.loads(call["arguments"])) == ["city", "days"]
    else:
        assert roles == ["system", "user", "assistant", "user", "assistant"]


class ScriptedEngine:
    """Answers every request from a script on its prompt text, in the order the stream queues them."""

    prefix_cache = None

    def __init__(self, reply):
        self.reply, self.prompts = reply, []
        self.tokenizer = SimpleNamespace(token_to_id=lambda token: None)
        self.target = SimpleNamespace(config=SimpleNamespace(eos_token_id=2))

    def encode_prompt(self, prompt: str) -> list[int]:
        self.prompts.append(prompt)
        return [len(self.prompts) - 1]

    def serve(self, requests, on_finish, **kwargs):
        queue = list(requests)
        while queue:
            request = queue.pop(0)
            text = self.reply(self.prompts[request.prompt_token_ids[0]])
            queue += on_finish(request, Generation(text, [7] * len(text.split()), "stop", [], GenerationStats()))


def test_a_call_of_a_tool_the_seed_does_not_offer_is_answered_and_the_dialogue_goes_on():
    config = ToolUseConfig(**COMMON, user_prompt="Use {material}.", tools=[WEATHER], call_mode="free",
                           tool_prompt="You are the tool {tool}; answer the call {call}.")

    def reply(prompt: str) -> str:
        if "You are the tool" in prompt:
            return '{"time": "12:00"}'
        if "Use get_weather." in prompt:  # the user simulator
            return "What is the time in Oslo?"
        if "12:00" in prompt:  # the assistant, after the tool's answer
            return "It is noon in Oslo."
        return 'Checking. <tool_call>{"name": "get_time", "arguments": {"city": "Oslo"}}</tool_call>'

    seed = Seed("tool_use", "t:0", "test", "get_weather", tools=[WEATHER], tool="get_weather")
    [dialogue] = DialogueSynthesizer(ScriptedEngine(reply), "tool_use", config, run_seed=0).synthesize([seed], 0)
    messages = dialogue["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant", "user", "assistant"]
    assert messages[2]["tool_calls"][0]["function"]["name"] == "get_time"
    assert messages[3]["content"] == '{"time": "12:00"}' and messages[4]["content"] == "It is noon in Oslo."
    assert dialogue["tool_call_error"] is None
