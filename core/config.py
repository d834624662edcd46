"""YAML configs: read safely, validated by strict pydantic models, every error named by file and key path."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class ConfigError(ValueError):
    """A config that cannot run; the message names the file, the key and what is wrong."""


class Strict(BaseModel):
    """Base of every config section: an unknown key is an error, never silently ignored."""

    model_config = ConfigDict(extra="forbid")


Model = TypeVar("Model", bound=BaseModel)


def describe_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for problem in error.errors():
        where = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        shown = problem["type"] != "missing" and not isinstance(problem.get("input"), dict)
        got = f" (got {problem['input']!r})" if shown else ""
        lines.append(f"  - {where}: {problem['msg']}{got}")
    return "\n".join(lines)


def parse_config(model: type[Model], data: object, source: str = "<config>") -> Model:
    """``data`` validated as ``model``, or a ConfigError listing every problem by key path."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error, source)) from None


def read_yaml(path: str | Path) -> object:
    """A config file's YAML (safe loader), or a ConfigError that names the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"invalid config {path}: not valid YAML: {error}") from None


def load_config(model: type[Model], path: str | Path) -> tuple[Model, Path]:
    """Read and validate a YAML config; returns it with the directory its relative paths are relative to."""
    path = Path(path)
    return parse_config(model, read_yaml(path), str(path)), path.resolve().parent
