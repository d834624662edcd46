"""The MiniCPM / ChatML chat format: `<|im_start|>role\\ncontent<|im_end|>\\n` per message."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ROLES = ("system", "user", "assistant", "tool")


def apply_chat_template(messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True) -> str:
    """Render messages as MiniCPM4 does; with add_generation_prompt the text ends where the assistant answers."""
    parts = []
    for index, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"message {index}: role must be one of {ROLES}, got {role!r}")
        if not isinstance(content, str):
            raise TypeError(f"message {index}: content must be a string, got {type(content).__name__}")
        parts.append(f"{IM_START}{role}\n{content}{IM_END}\n")
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts)
