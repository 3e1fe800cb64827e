"""Registries: one name -> implementation table per extension point, filled by decorators.

Every extension point (patterns, criteria, methods, models, exporters, datasets, executors) has its
registry here, at the bottom of the package, so any layer can look names up. Entries are registered
by the modules that define them: the built-in modules listed in BUILTINS, the modules named in a
config's `plugins:`, and the entry points of installed distributions (groups
`sparsify.patterns`, `sparsify.criteria`, `sparsify.methods`, `sparsify.models`,
`sparsify.exporters`, `sparsify.datasets`, `sparsify.executors`). A registry imports its built-in
modules and entry points the first time it is asked for a name, so looking up a method does not
import the models.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Callable, Generic, Iterator, TypeVar

from sparsify.errors import SparsifyError, shown

T = TypeVar("T")

BUILTINS: dict[str, tuple[str, ...]] = {  # modules that register the built-in entries of each kind
    "pattern": ("sparsify.core.block", "sparsify.core.elements", "sparsify.core.channel"),
    "criterion": ("sparsify.core.criteria",),
    "method": ("sparsify.methods.static", "sparsify.methods.dsr", "sparsify.methods.gumbel",
               "sparsify.methods.gradual"),
    "model": ("sparsify.models",),
    "exporter": ("sparsify.io.export",),
    "dataset": ("sparsify.data.sources",),
    "executor": ("sparsify.runtime.dense", "sparsify.runtime.bsr", "sparsify.runtime.blockgemm",
                 "sparsify.runtime.semistructured"),
}


class Registry(Generic[T]):
    """Maps names to implementations; `get` fails with the list of valid names."""

    def __init__(self, kind: str, *, group: str | None = None) -> None:
        self.kind = kind
        self.group = group or f"sparsify.{kind}s"  # entry point group of installed plugins
        self._items: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that records `obj` under `name` (a name registered twice is an error)."""

        def add(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise SparsifyError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return add

    def load(self) -> None:
        """Import the built-in modules and installed entry points of this kind (once)."""
        if self._loaded:
            return
        self._loaded = True
        for module in BUILTINS.get(self.kind, ()):
            importlib.import_module(module)
        for point in entry_points(group=self.group):
            try:
                point.load()
            except Exception as exc:  # a broken third-party distribution must not hide the others
                raise SparsifyError(f"the installed plugin {point.value!r} (entry point {point.name!r} of "
                                    f"{self.group}) failed to load: {exc}; fix or uninstall it") from None

    def get(self, name: str) -> T:
        self.load()
        try:
            return self._items[name]
        except KeyError:
            raise SparsifyError(
                f"unknown {self.kind} {shown(name)}; choose one of: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        self.load()
        return sorted(self._items)

    def items(self) -> Iterator[tuple[str, T]]:
        self.load()
        return iter(sorted(self._items.items()))

    def __contains__(self, name: object) -> bool:
        self.load()
        return name in self._items


PATTERNS: Registry[type] = Registry("pattern")
CRITERIA: Registry[type] = Registry("criterion", group="sparsify.criteria")
METHODS: Registry[type] = Registry("method")
MODELS: Registry[Callable] = Registry("model")
EXPORTERS: Registry[type] = Registry("exporter")
DATASETS: Registry[type] = Registry("dataset")
EXECUTORS: Registry[type] = Registry("executor")


def load_plugins(modules: list[str]) -> None:
    """Import the modules a config names under `plugins:`; their decorators register new entries."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise SparsifyError(f"plugin module {module!r} cannot be imported ({exc}); check the name in "
                                "plugins: and that its folder is on PYTHONPATH or the package is installed") from None
