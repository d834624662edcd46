"""Dialogues: a user simulator and an assistant, both driven by one generation engine, for N turns.

Each dialogue is written as a sequence (`_dialogue`, a generator): it yields the prompts it needs next and resumes
with their generations. The engine serves the whole chunk as one stream: when a dialogue's request finishes, its
next one joins the queue at once, so the decoding slots stay full from the first turn to the last, with no barrier
where every dialogue waits for the slowest reply of the turn. The user simulator sees the dialogue from the other
side (its own messages as "assistant", the assistant's as "user") under its own system prompt, which holds the seed
material. In the tool-use family the first assistant turn is a function call (written freely by the model, or
guided by the schema), answered by a tool simulator, after which the assistant replies to the user.

The stream's sampling seed is derived from (run seed, family, chunk), and the engine's schedule depends only on the
chunk's seeds, so a chunk regenerates identically whichever actor runs it. For the same reason a chunk starts with
an empty prefix cache: its later turns reuse its own earlier turns, never what another chunk left in the engine (a
reused key differs from a recomputed one in the last bits, which could change a sampled token).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Generator
from dataclasses import dataclass, field

from sft_synth.chat_format import CHATML, render_prompt
from sft_synth.config import FamilyConfig, ToolUseConfig
from sft_synth.generation import Generation, GenerationEngine, GenerationSettings, Request
from sft_synth.generation.chat_template import ChatTemplate
from sft_synth.seeds import Seed
from sft_synth.tools import (
    TOOL_CALL_OPEN,
    json_prefix_for,
    openai_tool_call,
    parse_guided_value,
    parse_tool_calls,
)

GUIDED_VALUE_TOKENS = 32

# What a dialogue yields (the prompts it needs next, each with its settings) and is resumed with (their generations).
Wants = list[tuple[str, GenerationSettings]]
Dialogue = Generator[Wants, list[Generation], None]


@dataclass
class _State:
    seed: Seed
    messages: list[dict]  # stored shape, system prompt first
    simulator_history: list[dict] = field(default_factory=list)  # the user simulator's own view
    generated_tokens: int = 0
    truncated: bool = False
    tool_call_error: str | None = None

    def record(self, generation: Generation) -> str:
        self.generated_tokens += len(generation.token_ids)
        self.truncated |= generation.finish_reason == "length"
        return generation.text.strip()


def chunk_seed(run_seed: int, family: str, chunk: int) -> int:
    digest = hashlib.sha256(f"{run_seed}:{family}:{chunk}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def dialogue_id(seed: Seed) -> str:
    return f"{seed.family}-{hashlib.sha256(seed.id.encode()).hexdigest()[:16]}"


class DialogueSynthesizer:
    """Turns seeds of one family into dialogues with one engine, prompting in the target's chat template."""

    def __init__(self, engine: GenerationEngine, family: str, config: FamilyConfig, run_seed: int,
                 template: ChatTemplate = CHATML):
        self.engine, self.family, self.config, self.run_seed = engine, family, config, run_seed
        self.template = template
        # The template's end-of-turn token and the target config's eos ids end a reply, also where the engine's own
        # stop tokens (</s>, <|im_end|>) do not name them (Llama 3's <|eot_id|>).
        named = [i for i in map(engine.tokenizer.token_to_id, template.stop_tokens) if i is not None]
        eos = engine.target.config.eos_token_id
        self.stop_token_ids = sorted({*named, *([eos] if isinstance(eos, int) else eos or [])})

    def _settings(self, settings: GenerationSettings, **update) -> GenerationSettings:
        stop_ids = sorted(set(settings.stop_token_ids) | set(self.stop_token_ids))
        return settings.model_copy(update={"stop_token_ids": stop_ids, **update})

    def _prompt(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        return render_prompt(messages, tools, template=self.template)

    def synthesize(self, seeds: list[Seed], chunk: int) -> list[dict]:
        """Every seed's dialogue, in seed order, decoded as one stream of requests (see the module docstring)."""
        if self.engine.prefix_cache is not None:
            self.engine.prefix_cache.clear()
        states = [_State(seed, [{"role": "system", "content": self.config.system_prompt}]) for seed in seeds]
        dialogues = [self._dialogue(state) for state in states]
        waves: list[list[Generation | None]] = [[] for _ in states]  # per dialogue: the generations it waits for

        def advance(index: int, generations: list[Generation] | None) -> list[Request]:
            wants: Wants = []
            while not wants:  # a step that needs no generation resumes at once
                try:
                    wants = dialogues[index].send(generations)
                except StopIteration:
                    return []
                generations = []
            waves[index] = [None] * len(wants)
            return [Request(self.engine.encode_prompt(prompt), settings, (index, slot))
                    for slot, (prompt, settings) in enumerate(wants)]

        def on_finish(request: Request, generation: Generation) -> list[Request]:
            index, slot = request.tag
            waves[index][slot] = generation
            return advance(index, waves[index]) if all(g is not None for g in waves[index]) else []

        roles = [self.config.user, self.config.assistant]
        if isinstance(self.config, ToolUseConfig):
            roles.append(self.config.tool)
        self.engine.serve([request for index in range(len(states)) for request in advance(index, None)], on_finish,
                          seed=chunk_seed(self.run_seed, self.family, chunk),
                          speculative=any(role.speculative for role in roles))
        return [self._record(state) for state in states]

    # ------------------------------------------------------------------ one dialogue

    def _dialogue(self, state: _State) -> Dialogue:
        config = self.config
        for turn in range(config.turns):
            if turn == 0 and state.seed.opening is not None:
                text = state.seed.opening
            else:
                system = config.user_prompt.format(material=state.seed.material)
                prompt = self._prompt([{"role": "system", "content": system}, *state.simulator_history])
                [generation] = yield [(prompt, self._settings(config.user))]
                text = state.record(generation)
            state.simulator_history.append({"role": "assistant", "content": text})
            if turn == 0 and state.seed.attachment:
                text = f"{state.seed.attachment}\n\n{text}"
            state.messages.append({"role": "user", "content": text})
            if turn == 0 and isinstance(config, ToolUseConfig):
                called = yield from self._tool_call(state)
                if not called:  # the response without a usable call is this turn's answer
                    continue
            [generation] = yield [(self._prompt(state.messages, state.seed.tools), self._settings(config.assistant))]
            text = state.record(generation)
            state.messages.append({"role": "assistant", "content": text})
            state.simulator_history.append({"role": "user", "content": text})

    def _tool_call(self, state: _State) -> Generator[Wants, list[Generation], bool]:
        """The assistant calls a tool and the tool simulator answers every call; False when the response held no
        usable call (it is then kept as a plain answer)."""
        config: ToolUseConfig = self.config
        call = yield from (self._guided_call(state) if config.call_mode == "guided" else self._free_call(state))
        if call is None:
            return False
        content, calls = call
        state.messages.append({"role": "assistant", "content": content, "tool_calls": calls})
        tools = {tool["function"]["name"]: tool for tool in state.seed.tools}
        wants = []
        for tool_call in calls:
            name, arguments = tool_call["function"]["name"], tool_call["function"]["arguments"]
            # A call of a tool the seed does not offer is simulated from its name alone; the tool-call filter
            # rejects the dialogue later, with the reason.
            tool = tools.get(name, {"type": "function", "function": {"name": name}})
            system = config.tool_prompt.format(tool=json.dumps(tool, ensure_ascii=False, sort_keys=True), call=arguments)
            prompt = self._prompt([{"role": "system", "content": system}, {"role": "user", "content": arguments}])
            wants.append((prompt, self._settings(config.tool)))
        generations = yield wants
        for tool_call, generation in zip(calls, generations):
            state.messages.append({"role": "tool", "tool_call_id": tool_call["id"], "content": state.record(generation)})
        return True

    def _free_call(self, state: _State) -> Generator[Wants, list[Generation], tuple[str, list[dict]] | None]:
        """The model writes the call; a response without a parsable call is kept as a plain answer and flagged."""
        [generation] = yield [(self._prompt(state.messages, state.seed.tools), self._settings(self.config.assistant))]
        text = state.record(generation)
        parsed = parse_tool_calls(text)
        if not parsed:
            state.tool_call_error = "no tool call" if parsed == [] else "tool call is not JSON"
            state.messages.append({"role": "assistant", "content": text})
            state.simulator_history.append({"role": "user", "content": text})
            return None
        content = text[: text.find(TOOL_CALL_OPEN)].strip()
        return content, [openai_tool_call(f"call_{i}", call["name"], call["arguments"]) for i, call in enumerate(parsed)]

    def _guided_call(self, state: _State) -> Generator[Wants, list[Generation], tuple[str, list[dict]]]:
        """The schema fixes the call's structure (the seed's tool, its required properties in schema order); the
        model writes each value, continuing the call text written so far (jsonformer style)."""
        tool = next(t for t in state.seed.tools if t["function"]["name"] == state.seed.tool)
        name = tool["function"]["name"]
        parameters = tool["function"].get("parameters", {})
        properties = parameters.get("properties", {})
        required = [p for p in properties if p in parameters.get("required", [])]
        filled: list[tuple[str, object]] = []
        for property_name in required:
            property_type = properties[property_name].get("type", "string")
            settings = self._settings(
                self.config.assistant, stop=['"'] if property_type == "string" else [",", "}", "\n"],
                max_new_tokens=min(GUIDED_VALUE_TOKENS, self.config.assistant.max_new_tokens),
            )
            prompt = (self._prompt(state.messages, state.seed.tools)
                      + json_prefix_for(name, filled, property_name, property_type))
            [generation] = yield [(prompt, settings)]
            filled.append((property_name, parse_guided_value(state.record(generation), property_type)))
        return "", [openai_tool_call("call_0", name, dict(filled))]

    # ------------------------------------------------------------------ result

    def _record(self, state: _State) -> dict:
        seed = state.seed
        return {
            "id": dialogue_id(seed),
            "family": self.family,
            "messages": state.messages,
            "tools": json.dumps(seed.tools, ensure_ascii=False, sort_keys=True) if seed.tools else "",
            "constraints": json.dumps(seed.constraints, sort_keys=True) if seed.constraints else "",
            "source_seed": {"id": seed.id, "source": seed.source, "text": seed.material, "answer": seed.answer},
            "generated_tokens": state.generated_tokens,
            "truncated": state.truncated,
            "tool_call_error": state.tool_call_error,
        }
