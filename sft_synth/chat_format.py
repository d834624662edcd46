"""The chat format of the synthesized data, in two independent spellings that must agree.

``render_prompt`` is what the generation engine is fed (MiniCPM / ChatML, tool schemas in the system message,
tool calls as ``<tool_call>`` blocks). ``CHAT_TEMPLATE`` is the same format as a Hugging Face Jinja chat template
over the stored OpenAI-shaped messages, shipped in the dataset card, so that TRL / axolotl / LLaMA-Factory (or
``tokenizer.apply_chat_template``) render exactly the text the model saw during synthesis.
"""

from __future__ import annotations

import json

from sft_synth.generation.chat_template import ChatTemplate, compile_template
from sft_synth.tools import render_tool_calls

CHATML = ChatTemplate()

TOOLS_HEADER = "# Tools\nYou may call these functions; write each call as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>:\n"


def tools_block(tools: list[dict]) -> str:
    return TOOLS_HEADER + "\n".join(json.dumps(tool, ensure_ascii=False, sort_keys=True) for tool in tools)


def prompt_messages(messages: list[dict], tools: list[dict] | None = None) -> list[dict]:
    """Stored messages -> plain {role, content} strings: tool calls written out, tools in the system message."""
    plain = []
    for message in messages:
        content = message.get("content") or ""
        if message.get("tool_calls"):
            calls = render_tool_calls(message["tool_calls"])
            content = f"{content}\n{calls}" if content else calls
        plain.append({"role": message["role"], "content": content})
    if tools:
        if plain and plain[0]["role"] == "system":
            plain[0] = {"role": "system", "content": plain[0]["content"] + "\n\n" + tools_block(tools)}
        else:
            plain.insert(0, {"role": "system", "content": tools_block(tools)})
    return plain


def render_prompt(messages: list[dict], tools: list[dict] | None = None, *, add_generation_prompt: bool = True,
                  template: ChatTemplate = CHATML) -> str:
    """The text the engine is fed: ChatML, or a checkpoint's own template over the same plain messages."""
    return template.render(prompt_messages(messages, tools), add_generation_prompt=add_generation_prompt)


# Hugging Face's chat-template environment (sandboxed Jinja, trim_blocks, lstrip_blocks, a `tojson` filter) is all it
# needs. Every output newline is inside an expression, so the template means the same under any whitespace options.
CHAT_TEMPLATE = """
{%- set ns = namespace(tools_text='') -%}
{%- if tools -%}
  {%- set ns.tools_text = '# Tools\\nYou may call these functions; write each call as '
      + '<tool_call>{"name": ..., "arguments": ...}</tool_call>:\\n' -%}
  {%- for tool in tools -%}
    {%- set ns.tools_text = ns.tools_text + ('\\n' if not loop.first else '') + (tool | tojson(sort_keys=True)) -%}
  {%- endfor -%}
  {%- if messages[0]['role'] != 'system' -%}
    {{- '<|im_start|>system\\n' + ns.tools_text + '<|im_end|>\\n' -}}
  {%- endif -%}
{%- endif -%}
{%- for message in messages -%}
  {%- set content = message['content'] or '' -%}
  {{- '<|im_start|>' + message['role'] + '\\n' + content -}}
  {%- if loop.first and message['role'] == 'system' and tools -%}
    {{- '\\n\\n' + ns.tools_text -}}
  {%- endif -%}
  {%- if message['tool_calls'] -%}
    {%- for call in message['tool_calls'] -%}
      {%- if content or not loop.first -%}{{- '\\n' -}}{%- endif -%}
      {{- '<tool_call>\\n{"name": ' + (call['function']['name'] | tojson) + ', "arguments": '
          + call['function']['arguments'] + '}\\n</tool_call>' -}}
    {%- endfor -%}
  {%- endif -%}
  {{- '<|im_end|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}
"""


def render_with_template(messages: list[dict], tools: list[dict] | None = None, *,
                         add_generation_prompt: bool = False) -> str:
    """Render CHAT_TEMPLATE the way transformers' apply_chat_template does."""
    return compile_template(CHAT_TEMPLATE).render(messages=messages, tools=tools or None,
                                                  add_generation_prompt=add_generation_prompt)
