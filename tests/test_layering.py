"""The import graph of the package: no cycles, and no module imports from a higher layer.

Every `import` and `from ... import` counts, at module level and inside functions alike
(`if TYPE_CHECKING:` blocks too). The layer order is written once, here.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sparsify"

LAYERS = [
    ["__init__", "errors", "registry", "console", "threads", "recipes"],  # version; exceptions; registries; progress;
    # CPU threads; the shipped recipe files
    ["yamlfile", "configcheck", "config"],  # YAML text and --set overrides as data; the schema, checked against the registries
    ["core", "graph"],  # patterns, criteria, masks, prune: tensors in, masks out; no I/O; the fx channel graph, compaction
    ["data"],  # datasets, transforms presets, samplers
    ["models"],  # build by name, weights, the built-in zoo
    ["io"],  # checkpoints, the run folder, exporters
    ["training"],  # the loop, its log, resume state, EMA, torch.distributed plumbing, the train stage
    ["methods", "rounds", "runtime"],  # how masks behave while training; prune-round hooks; sparse execution
    ["stages"],  # download, prune, train, eval, run: short recipes over everything below
    ["report"],  # tables, checks and figures of a run
    ["cli", "cli_config", "cli_errors", "__main__"],  # the command line
]
RANK = {name: index for index, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    """`sparsify.core.prune` -> core; `sparsify` (the package itself) -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imported(path: Path) -> set[str]:
    """The sparsify modules `path` imports (a `from pkg import name` counts `pkg.name` when that is a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "sparsify"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "sparsify":
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in MODULES else base)
    return found - {module_name(path)}


FILES = sorted(PACKAGE.rglob("*.py"))
MODULES = {module_name(p) for p in FILES}


def test_every_module_has_a_layer():
    assert {layer_of(m) for m in MODULES} <= set(RANK), "add the new package to LAYERS with a comment"


def test_no_module_imports_from_a_higher_layer():
    upward = []
    for path in FILES:
        here = module_name(path)
        for target in imported(path):
            if RANK[layer_of(target)] > RANK[layer_of(here)]:
                upward.append(f"{here} -> {target}")
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_the_import_graph_has_no_cycle():
    graph = {module_name(p): {t for t in imported(p) if t in MODULES} for p in FILES}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
