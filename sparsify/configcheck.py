"""Checks of config sections that the schema cannot state itself: sections validated by a registered
class's Options (the pattern, the methods), and one-line messages for pydantic's validation errors.

Like `config`, this module must not import torch.
"""

from __future__ import annotations

import os
from typing import Any, get_args

from pydantic import BaseModel, ValidationError

from sparsify.errors import ConfigError, shown
from sparsify.registry import METHODS, PATTERNS


def validate_pattern(value: Any) -> Any:
    """The `sparsity.pattern` section, validated by the Options of the registered pattern its `type` names."""
    if isinstance(value, BaseModel):
        return value
    if not isinstance(value, dict):
        raise ValueError("must be a mapping with a type, e.g. {type: block, block: [8, 8]}")
    kind = value.get("type", "block")
    if kind not in PATTERNS:
        raise ValueError(f"unknown type {kind!r}; choose one of: {', '.join(PATTERNS.names())}")
    options = PATTERNS.get(kind).Options
    try:
        return options.model_validate({**value, "type": kind})
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        if first["type"] == "extra_forbidden":
            raise ValueError(f"unknown key {key!r} for pattern {kind}; allowed: {', '.join(options.model_fields)}") from None
        raise ValueError(f"{key}: {first['msg'].removeprefix('Value error, ')}") from None


def validate_method_sections(data: Any, *, known: list[str]) -> Any:
    """`sparsity.<method>` sections, each validated by its method's Options (defaults where absent)."""
    if not isinstance(data, dict):
        return data
    sections = {name: method.Options for name, method in METHODS.items() if method.Options is not None}
    out = dict(data)
    for key, value in data.items():
        if key in known:
            continue
        if key not in sections:
            allowed = ", ".join([*known, *sections])
            raise ConfigError(f"unknown config key 'sparsity.{key}'; allowed here: {allowed}")
        try:
            out[key] = value if isinstance(value, BaseModel) else sections[key].model_validate(value or {})
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            if first["type"] == "model_type" and not where:
                raise ConfigError(not_a_section(f"sparsity.{key}", sections[key], value)) from None
            if first["type"] == "extra_forbidden":
                raise ConfigError(f"unknown config key 'sparsity.{key}.{where}'; allowed here: "
                                  f"{', '.join(sections[key].model_fields)}") from None
            raise ConfigError(f"config key 'sparsity.{key}.{where}': {first['msg'].removeprefix('Value error, ')} "
                              f"(got {shown(first.get('input'))})") from None
    for key, options in sections.items():
        out.setdefault(key, options())
    return out


def default_pattern() -> Any:
    return PATTERNS.get("block").Options()


def describe_validation_error(exc: ValidationError, root: type[BaseModel]) -> str:
    """One line: the first bad key (a path from the `root` model), its value, and what is allowed."""
    errors = exc.errors()
    first = errors[0]
    loc = _key_path(first["loc"])
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    if first["type"] == "extra_forbidden":
        section = _section_at(root, first["loc"][:-1])
        allowed = ", ".join(section.model_fields) if section else "none (it is not a section)"
        return f"unknown config key {shown(loc)}; allowed here: {allowed}{more}"
    if first["type"] == "model_type":  # a value where a section (a mapping of keys) belongs
        return not_a_section(loc, _section_at(root, first["loc"]), first.get("input")) + more
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "string_type":
        message = text_expected(loc, first.get("input"), message)
    return f"config key {shown(loc or 'config')}: {message} (got {shown(first.get('input'))}){more}"


def text_expected(key: str, value: Any, message: str) -> str:
    """For text that YAML read as a number or a boolean (`name: 001`, `name: 1e3`, `name: yes`): quote it."""
    kind = "boolean" if isinstance(value, bool) else "number" if isinstance(value, (int, float)) else None
    if kind is None:
        return message
    leaf, sample = key.rpartition(".")[2], "yes" if kind == "boolean" else "001"
    return (f"must be text, but YAML read the unquoted value as a {kind}; put it in quotes as you wrote it, "
            f"e.g. {leaf}: \"{sample}\" (on the command line --set '{key}=\"{sample}\"')")


def not_a_section(key: str, section: type[BaseModel] | None, value: Any) -> str:
    """The line for `key: value` where `key` is a section: what a section is and its keys."""
    keys = f" with the keys {', '.join(section.model_fields)}" if section else ""
    return f"config key {key!r} is a section: give it a mapping{keys} (got {shown(value)})"


def _key_path(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


def _section_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The config class under `root` that owns the keys at `loc` (None if `loc` is not a section)."""
    section: type[BaseModel] = root
    parts = [str(p) for p in loc]
    while parts:
        part = parts.pop(0)
        annotation = section.model_fields[part].annotation if part in section.model_fields else None
        annotation = next((a for a in get_args(annotation) if a is not type(None)), annotation)  # Optional[X] -> X
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        section = annotation
    return section


def home_path(value: Any) -> Any:
    """A path key's value with a leading `~` (or `~user`) expanded as a shell would; other values as given."""
    return os.path.expanduser(value) if isinstance(value, str) and value.startswith("~") else value


def check_lr_steps(steps: list[int]) -> list[int]:
    """`train.lr_steps`: epochs >= 1, each after the one before (the step schedule counts them in order)."""
    if any(step < 1 for step in steps) or any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError("must be epochs >= 1 in increasing order, each once, e.g. lr_steps: [30, 60]")
    return steps
