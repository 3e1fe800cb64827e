"""Reading a YAML config file and `--set key=value` overrides into plain data (no validation)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from sparsify.errors import ConfigError


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float (YAML 1.1 wants `1.0e-3`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str, *, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {' '.join(str(exc).split())}") from None


def apply_override(data: dict, assignment: str) -> None:
    """Set `a.b.c=value` in the nested dict `data`; the value is read as a YAML scalar."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r} must look like key.sub=value, e.g. train.lr=0.01")
    parts = key.strip().split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            path = ".".join(parts[: i + 1])
            raise ConfigError(f"--set {key}: {path!r} is a value, not a section")
        node = child
    node[parts[-1]] = parse_yaml(raw, source=f"--set {key}")


def read_text(path: Path) -> str:
    """A config file's text: UTF-8 (a BOM is accepted), else one line saying where it is not."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                          f"{exc.start}); save it as UTF-8 YAML") from None
