"""Dialogues: a user simulator and an assistant, both driven by one generation engine, for N turns.

A chunk of seeds of one family advances turn by turn in lockstep, so every engine call is one batch: all user
turns of the chunk, then all assistant turns. The user simulator sees the dialogue from the other side (its own
messages as "assistant", the assistant's as "user") under its own system prompt, which holds the seed material.
In the tool-use family the first assistant turn is a function call (written freely by the model, or guided by the
schema), answered by a tool simulator, after which the assistant replies to the user.

Sampling seeds are derived from (run seed, family, chunk, turn, role), so a chunk regenerates identically
whichever actor runs it. For the same reason a chunk starts with an empty prefix cache: its later turns reuse its
own earlier turns, never what another chunk left in the engine (a reused key differs from a recomputed one in the
last bits, which could change a sampled token).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from sft_synth.chat_format import CHATML, render_prompt
from sft_synth.config import FamilyConfig, ToolUseConfig
from sft_synth.generation import Generation, GenerationEngine, GenerationSettings
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


def call_seed(run_seed: int, family: str, chunk: int, turn: int, role: str) -> int:
    digest = hashlib.sha256(f"{run_seed}:{family}:{chunk}:{turn}:{role}".encode()).digest()
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

    def _settings(self, settings: GenerationSettings, chunk: int, turn: int, role: str, **update) -> GenerationSettings:
        stop_ids = sorted(set(settings.stop_token_ids) | set(self.stop_token_ids))
        return settings.model_copy(update={"seed": call_seed(self.run_seed, self.family, chunk, turn, role),
                                           "stop_token_ids": stop_ids, **update})

    def _prompt(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        return render_prompt(messages, tools, template=self.template)

    def synthesize(self, seeds: list[Seed], chunk: int) -> list[dict]:
        if self.engine.prefix_cache is not None:
            self.engine.prefix_cache.clear()
        states = [_State(seed, [{"role": "system", "content": self.config.system_prompt}]) for seed in seeds]
        for turn in range(self.config.turns):
            self._user_turn(states, chunk, turn)
            answering = states
            if turn == 0 and isinstance(self.config, ToolUseConfig):
                answering = self._tool_call_turn(states, chunk)
            self._assistant_turn(answering, chunk, turn)
        return [self._record(state) for state in states]

    # ------------------------------------------------------------------ turns

    def _user_turn(self, states: list[_State], chunk: int, turn: int) -> None:
        simulated = [s for s in states if not (turn == 0 and s.seed.opening is not None)]
        prompts = [
            self._prompt([{"role": "system", "content": self.config.user_prompt.format(material=s.seed.material)},
                           *s.simulator_history])
            for s in simulated
        ]
        settings = self._settings(self.config.user, chunk, turn, "user")
        texts = iter([s.record(g) for s, g in zip(simulated, self.engine.generate(prompts, settings))])
        for state in states:
            text = state.seed.opening if turn == 0 and state.seed.opening is not None else next(texts)
            state.simulator_history.append({"role": "assistant", "content": text})
            if turn == 0 and state.seed.attachment:
                text = f"{state.seed.attachment}\n\n{text}"
            state.messages.append({"role": "user", "content": text})

    def _assistant_turn(self, states: list[_State], chunk: int, turn: int) -> None:
        prompts = [self._prompt(s.messages, s.seed.tools) for s in states]
        settings = self._settings(self.config.assistant, chunk, turn, "assistant")
        for state, generation in zip(states, self.engine.generate(prompts, settings)):
            text = state.record(generation)
            state.messages.append({"role": "assistant", "content": text})
            state.simulator_history.append({"role": "user", "content": text})

    def _tool_call_turn(self, states: list[_State], chunk: int) -> list[_State]:
        """The assistant calls a tool and the tool simulator answers every call; returns the states that called
        (the others already hold this turn's answer, a response without a usable call)."""
        config: ToolUseConfig = self.config
        calls = self._guided_calls(states, chunk) if config.call_mode == "guided" else self._free_calls(states, chunk)
        called = [(s, c) for s, c in zip(states, calls) if c]
        for state, state_calls in called:
            state.messages.append({"role": "assistant", "content": state_calls[0], "tool_calls": state_calls[1]})
        jobs = [(state, call) for state, (_, state_calls) in called for call in state_calls]
        prompts = []
        for state, call in jobs:
            tool = next(t for t in state.seed.tools if t["function"]["name"] == call["function"]["name"])
            system = config.tool_prompt.format(tool=json.dumps(tool, ensure_ascii=False, sort_keys=True),
                                               call=call["function"]["arguments"])
            prompts.append(self._prompt([{"role": "system", "content": system},
                                          {"role": "user", "content": call["function"]["arguments"]}]))
        settings = self._settings(config.tool, chunk, 0, "tool")
        for (state, call), generation in zip(jobs, self.engine.generate(prompts, settings)):
            state.messages.append({"role": "tool", "tool_call_id": call["id"], "content": state.record(generation)})
        return [state for state, _ in called]

    def _free_calls(self, states: list[_State], chunk: int) -> list[tuple[str, list[dict]] | None]:
        """The model writes the call; a response without a parsable call is kept as a plain answer and flagged."""
        prompts = [self._prompt(s.messages, s.seed.tools) for s in states]
        settings = self._settings(self.config.assistant, chunk, 0, "tool_call")
        results = []
        for state, generation in zip(states, self.engine.generate(prompts, settings)):
            text = state.record(generation)
            parsed = parse_tool_calls(text)
            if not parsed:
                state.tool_call_error = "no tool call" if parsed == [] else "tool call is not JSON"
                state.messages.append({"role": "assistant", "content": text})
                state.simulator_history.append({"role": "user", "content": text})
                results.append(None)
                continue
            content = text[: text.find(TOOL_CALL_OPEN)].strip()
            results.append((content, [openai_tool_call(f"call_{i}", call["name"], call["arguments"])
                                      for i, call in enumerate(parsed)]))
        return results

    def _guided_calls(self, states: list[_State], chunk: int) -> list[tuple[str, list[dict]]]:
        """The schema fixes the call's structure (the seed's tool, its required properties in schema order); the
        model writes each value, continuing the call text written so far (jsonformer style)."""
        plans = []
        for state in states:
            tool = next(t for t in state.seed.tools if t["function"]["name"] == state.seed.tool)
            parameters = tool["function"].get("parameters", {})
            properties = parameters.get("properties", {})
            required = [name for name in properties if name in parameters.get("required", [])]
            plans.append((state, tool["function"]["name"], [(n, properties[n].get("type", "string")) for n in required]))
        filled: list[list[tuple[str, object]]] = [[] for _ in states]
        position = 0
        while True:
            pending = [(i, plan) for i, plan in enumerate(plans) if position < len(plan[2])]
            if not pending:
                break
            for kind in ("string", "other"):  # one engine call per stop rule
                batch = [(i, plan) for i, plan in pending if (plan[2][position][1] == "string") == (kind == "string")]
                if not batch:
                    continue
                prompts = [
                    self._prompt(plan[0].messages, plan[0].seed.tools)
                    + json_prefix_for(plan[1], filled[i], *plan[2][position])
                    for i, plan in batch
                ]
                settings = self._settings(
                    self.config.assistant, chunk, position, f"guided_{kind}",
                    stop=['"'] if kind == "string" else [",", "}", "\n"],
                    max_new_tokens=min(GUIDED_VALUE_TOKENS, self.config.assistant.max_new_tokens),
                )
                for (i, plan), generation in zip(batch, self.engine.generate(prompts, settings)):
                    name, property_type = plan[2][position]
                    filled[i].append((name, parse_guided_value(plan[0].record(generation), property_type)))
            position += 1
        return [("", [openai_tool_call("call_0", plan[1], dict(filled[i]))]) for i, plan in enumerate(plans)]

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
