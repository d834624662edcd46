"""Tool use: JSON tool schemas, tool calls in the text the model writes, and their validation.

Tools are OpenAI function schemas (``{"type": "function", "function": {"name", "description", "parameters"}}``,
parameters a JSON Schema). In prompts the model writes a call as ``<tool_call>{"name": ..., "arguments": {...}}
</tool_call>`` (the Hermes / MiniCPM convention); in the dataset the call is stored in the OpenAI shape, an
assistant message with ``tool_calls: [{"id", "type": "function", "function": {"name", "arguments": "<json>"}}]``.
"""

from __future__ import annotations

import json
import re

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
_TOOL_CALL = re.compile(re.escape(TOOL_CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)


def check_tools(tools: list[dict]) -> dict[str, dict]:
    """Validate tool schemas; returns {name: tool}. Raises ValueError naming the first bad tool."""
    by_name: dict[str, dict] = {}
    for index, tool in enumerate(tools):
        function = tool.get("function") if tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError(f"tools[{index}]: expected {{'type': 'function', 'function': {{'name': ...}}}}")  # noqa: TRY004 - pydantic reports ValueError
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        try:
            Draft202012Validator.check_schema(parameters)
        except SchemaError as error:
            raise ValueError(f"tools[{index}] ({function['name']}): parameters is not a JSON Schema: {error.message}")
        if parameters.get("type") != "object":
            raise ValueError(f"tools[{index}] ({function['name']}): parameters must be an object schema")
        if function["name"] in by_name:
            raise ValueError(f"tools[{index}]: duplicate tool name {function['name']!r}")
        by_name[function["name"]] = tool
    return by_name


def parse_tool_calls(text: str) -> list[dict] | None:
    """The calls written in a model response as [{"name", "arguments"}]; None when a call block is not JSON."""
    calls = []
    for block in _TOOL_CALL.findall(text):
        try:
            call = json.loads(block)
        except json.JSONDecodeError:
            return None
        if not isinstance(call, dict):
            return None
        calls.append({"name": call.get("name"), "arguments": call.get("arguments", {})})
    return calls


def call_errors(name: object, arguments: object, tools: dict[str, dict]) -> list[str]:
    """Why a call does not fit the tool schemas (empty: it fits). arguments may be a dict or a JSON string."""
    if name not in tools:
        return [f"unknown tool {name!r}"]
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as error:
            return [f"{name}: arguments are not JSON: {error.msg}"]
    if not isinstance(arguments, dict):
        return [f"{name}: arguments must be a JSON object"]
    schema = tools[name]["function"].get("parameters", {"type": "object"})
    return [f"{name}: {error.message}" for error in Draft202012Validator(schema).iter_errors(arguments)]


def openai_tool_call(call_id: str, name: str, arguments: dict | str) -> dict:
    """The stored shape: arguments as a JSON string, as the OpenAI API returns them."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False, sort_keys=True)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": text}}


def render_tool_calls(tool_calls: list[dict]) -> str:
    """Tool calls as the model writes them (stored arguments verbatim), for prompts that continue a dialogue."""
    return "\n".join(
        f'{TOOL_CALL_OPEN}\n{{"name": {json.dumps(call["function"]["name"], ensure_ascii=False)}, '
        f'"arguments": {call["function"]["arguments"]}}}\n{TOOL_CALL_CLOSE}'
        for call in tool_calls
    )


def json_prefix_for(name: str, filled: list[tuple[str, object]], next_property: str, property_type: str) -> str:
    """The partial call text up to where the value of next_property starts (inside the quote for strings)."""
    arguments = ", ".join(f"{json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}" for key, value in filled)
    separator = ", " if filled else ""
    quote = '"' if property_type == "string" else ""
    return (f'{TOOL_CALL_OPEN}\n{{"name": {json.dumps(name)}, "arguments": {{{arguments}{separator}'
            f'{json.dumps(next_property)}: {quote}')


def parse_guided_value(text: str, property_type: str) -> object:
    """A generated value: strings as written (one line), other types as JSON; unparsable text stays a string,
    which the schema check then rejects."""
    value = text.strip().splitlines()[0].strip() if text.strip() else ""
    if property_type == "string":
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value
