"""Reading a YAML config file and `--set key=value` overrides into plain data (no validation).

Before a document becomes Python data its node tree is checked: a key given twice in one mapping
is refused (YAML would keep the last one silently), and so are aliases that refer to themselves or
expand past MAX_VALUES values or MAX_CHARACTERS characters (a few lines of nested anchors can stand
for billions of values).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from sparsify.errors import ConfigError, clipped, shown

MAX_VALUES = 100_000  # values of a document once its aliases are expanded; a full config has a few hundred
MAX_CHARACTERS = 1_000_000  # characters of its scalars, likewise; a full config file is a few KB


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float (YAML 1.1 wants `1.0e-3`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str, *, source: str) -> Any:
    """The data of one YAML document; a repeated key, an alias bomb or a value YAML cannot convert is one line."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        Expansion(source).size(node)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise ConfigError(f"{source} nests its values too deeply to read (more levels than Python's recursion "
                          "limit); a config needs a few levels") from None
    except ValueError as exc:  # a timestamp like 2024-13-01, an integer of more than 4300 digits
        reason = str(exc).split(";")[0]
        raise ConfigError(f"{source} holds a value YAML cannot convert ({reason}); put it in quotes if it is "
                          "text, or correct it") from None
    finally:
        loader.dispose()


class Expansion:
    """The size of each node of one document with its aliases expanded, (values, characters of its scalars);
    each distinct node is measured once and its size reused, so an alias bomb costs what its text does."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sizes: dict[int, tuple[int, int] | None] = {}  # None: being measured (met again, it holds itself)

    def size(self, node: yaml.Node, path: str = "") -> tuple[int, int]:
        """(values, characters) of `node` written out; `path` (its key path) names it in a refusal."""
        if id(node) in self.sizes:
            return self.sizes[id(node)] or self.refuse_cycle(node, path)
        self.sizes[id(node)] = None
        if isinstance(node, yaml.ScalarNode):
            size = (1, len(node.value))
        else:
            children = self.children(node, path)
            size = (1 + sum(s[0] for s, _ in children), sum(s[1] for s, _ in children))
            if size[0] > MAX_VALUES or size[1] > MAX_CHARACTERS:
                self.refuse_size(node, path, size, children)
        self.sizes[id(node)] = size
        return size

    def children(self, node: yaml.Node, path: str) -> list[tuple[tuple[int, int], str]]:
        """(size, where) of each entry of a mapping or sequence; a repeated key is refused first."""
        if isinstance(node, yaml.MappingNode):
            refuse_repeated_keys(node, source=self.source, path=path)
            entries = [(value, key_path(path, key)) for key, value in node.value]
        else:
            entries = [(item, f"{path}[{index}]") for index, item in enumerate(node.value)]
        return [(self.size(child, where_), where(child, where_)) for child, where_ in entries]

    def refuse_cycle(self, node: yaml.Node, path: str):
        raise ConfigError(f"{self.source}: {where(node, path)} is an alias of a value that holds it (a value "
                          "without end); write the value out instead")

    def refuse_size(self, node: yaml.Node, path: str, size: tuple[int, int], children: list) -> None:
        measure = 0 if size[0] > MAX_VALUES else 1  # the one past its limit: values, else characters
        amount = f"more than {MAX_VALUES:,} values" if measure == 0 else f"more than {MAX_CHARACTERS:,} characters"
        largest = max(children, key=lambda child: child[0][measure])[1] if len(children) > 1 else ""
        raise ConfigError(f"{self.source}: {where(node, path)} expands to {amount} once its aliases (*name) are "
                          f"written out{f', most of them in {largest}' if largest else ''}; a config needs a few "
                          "hundred values, so write the values out or nest fewer aliases")


def refuse_repeated_keys(node: yaml.MappingNode, *, source: str, path: str) -> None:
    """A key given twice in one mapping, with both line numbers (YAML itself keeps the last one silently)."""
    first_line: dict[tuple[str, str], int] = {}
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode):
            continue
        line = key.start_mark.line + 1
        if (key.tag, key.value) in first_line:
            raise ConfigError(f"{source}: key {shown(key_path(path, key))} is given twice, on lines "
                              f"{first_line[key.tag, key.value]} and {line}; YAML would keep only the last one, "
                              "so delete the one you do not mean")
        first_line[key.tag, key.value] = line


def key_path(path: str, key: yaml.Node) -> str:
    """`path.key` (the dotted key path of a mapping's entry, as --set writes it)."""
    name = key.value if isinstance(key, yaml.ScalarNode) else "{...}"
    return f"{path}.{name}" if path else str(name)


def where(node: yaml.Node, path: str) -> str:
    """'key 'a.b' (line N)' or 'the document (line N)' for a message."""
    return f"{f'key {shown(path)}' if path else 'the document'} (line {node.start_mark.line + 1})"


def apply_override(data: dict, assignment: str) -> None:
    """Set `a.b.c=value` in the nested dict `data`; the value is read as a YAML scalar."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {shown(assignment)} must look like key.sub=value, e.g. train.lr=0.01")
    parts = key.strip().split(".")
    refuse_dotted_layer_glob(parts, raw)
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            path = ".".join(parts[: i + 1])
            raise ConfigError(f"--set {key}: {path!r} is a value, not a section")
        node = child
    node[parts[-1]] = parse_yaml(raw, source=f"--set {key}")


def refuse_dotted_layer_glob(parts: list[str], raw: str) -> None:
    """`--set sparsity.layers.layer3.*=0.7`: the dots of a layer glob would split it into sections; the
    mapping form keeps it whole."""
    if parts[:2] != ["sparsity", "layers"] or len(parts) <= 3:
        return
    glob, value = clipped(".".join(parts[2:])), clipped(raw.strip())
    raise ConfigError(f"--set sparsity.layers.{glob}: the dots of a layer glob would be read as sections; give "
                      f"the mapping instead: --set 'sparsity.layers={{\"{glob}\": {value}}}' (it replaces the "
                      "config's sparsity.layers, so list every glob you want, in order)")


def read_text(path: Path) -> str:
    """A config file's text: UTF-8 (a BOM is accepted), else one line saying where it is not."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                          f"{exc.start}); save it as UTF-8 YAML") from None
