"""Chat formats: MiniCPM's ChatML, or the Jinja template a checkpoint ships, rendered as Hugging Face does.

A checkpoint's template is ``chat_template.jinja`` in its directory or ``chat_template`` in its
``tokenizer_config.json`` (the newer and the older place transformers writes it). It is rendered in the
environment transformers builds for ``apply_chat_template``: sandboxed Jinja with trim_blocks and lstrip_blocks,
loop controls, a ``tojson`` filter that does not escape HTML, ``raise_exception`` and ``strftime_now``, and the
tokenizer's special tokens (``bos_token``, ``eos_token``, ...) as variables. The rendered text is tokenized without
adding special tokens, as transformers does: a template that wants a BOS token writes ``{{ bos_token }}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ROLES = ("system", "user", "assistant", "tool")
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
TEMPLATE_FILE_NAME = "chat_template.jinja"
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


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


class ChatTemplateError(ValueError):
    """A template called raise_exception, or failed to render."""


def _raise_exception(message: str):
    raise ChatTemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=8)
def compile_template(source: str):
    return jinja_environment().from_string(source)


def jinja_environment():
    """The Jinja environment transformers renders chat templates in (without its assistant-mask extension)."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


@dataclass(frozen=True)
class ChatTemplate:
    """How prompts are written for one checkpoint: its Jinja template, or ChatML (MiniCPM) when it has none."""

    source: str | None = None  # Jinja source; None: ChatML
    special_tokens: Mapping[str, str] = field(default_factory=dict)  # bos_token, eos_token, ... -> text

    @classmethod
    def from_checkpoint(cls, directory: str | Path) -> ChatTemplate:
        directory = Path(directory)
        config_path = directory / TOKENIZER_CONFIG_NAME
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        tokens = {key: _token_text(config.get(key)) for key in SPECIAL_TOKEN_KEYS}
        template_path = directory / TEMPLATE_FILE_NAME
        source = template_path.read_text(encoding="utf-8") if template_path.is_file() else config.get("chat_template")
        if isinstance(source, list):  # named templates: the one named "default" renders chats
            named = {entry["name"]: entry["template"] for entry in source}
            if "default" not in named:
                raise ValueError(f"{config_path}: chat_template lists {sorted(named)} but no 'default' template")
            source = named["default"]
        if source is not None:
            try:
                compile_template(source)
            except Exception as error:
                raise ValueError(f"{directory}: the chat template does not parse: {error}") from error
        return cls(source, {k: v for k, v in tokens.items() if v is not None})

    @property
    def is_chatml(self) -> bool:
        return self.source is None

    @property
    def stop_tokens(self) -> tuple[str, ...]:
        """Token texts that end an assistant turn: the checkpoint's eos token (ChatML: <|im_end|>)."""
        eos = self.special_tokens.get("eos_token")
        return tuple(t for t in (IM_END, eos) if t is not None) if self.is_chatml else ((eos,) if eos else ())

    def render(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True) -> str:
        if self.source is None:
            return apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        try:
            return compile_template(self.source).render(messages=[dict(m) for m in messages], tools=None, documents=None,
                                   add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except ChatTemplateError:
            raise
        except Exception as error:
            raise ChatTemplateError(f"the chat template failed to render: {error}") from error
