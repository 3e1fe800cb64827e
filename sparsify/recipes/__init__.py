"""Shipped recipes: the YAML configs in this folder, found by name (`-c quickstart`), listed and copied.

A recipe's description is the first line of its file, a `#` comment. The top-level `configs/`
folder of the repository links to these files; they are package data, so an installed package
has them too.
"""

from __future__ import annotations

import difflib
import os
from contextlib import suppress
from importlib.resources import files
from pathlib import Path

from sparsify.errors import ConfigError, WriteFailed

SUFFIX = ".yaml"


def recipe_folder() -> Path:
    """The folder holding the shipped recipe files."""
    return Path(str(files(__name__)))


def recipe_names() -> list[str]:
    """Names of the shipped recipes (their file names without `.yaml`), sorted."""
    return sorted(p.name.removesuffix(SUFFIX) for p in recipe_folder().iterdir() if p.name.endswith(SUFFIX))


def recipe_path(name: str) -> Path:
    """The file of the shipped recipe `name`; an unknown name lists the recipes."""
    if name not in recipe_names():
        raise ConfigError(f"unknown recipe {name!r}{close_matches(name)}; {recipes_hint()}")
    return recipe_folder() / f"{name}{SUFFIX}"


def description(text: str) -> str:
    """A recipe's one-line description: its first line when that is a comment, else ''."""
    first = text.splitlines()[0] if text else ""
    return first.lstrip("#").strip() if first.startswith("#") else ""


def list_recipes() -> list[tuple[str, str]]:
    """(name, description) of every shipped recipe; none found means an install without its package data."""
    names = recipe_names()
    if not names:
        raise ConfigError(f"no recipe files in {recipe_folder()}: sparsify was installed without its package data; "
                          "reinstall it (pip install --force-reinstall sparsify-cnn)")
    return [(name, description(recipe_path(name).read_text(encoding="utf-8"))) for name in names]


def is_recipe_name(value: str) -> bool:
    """True when `value` is written as a recipe name: no `.yaml`/`.yml` suffix and no folder separator."""
    return bool(value) and not value.endswith((".yaml", ".yml")) and "/" not in value and os.sep not in value \
        and "\\" not in value


def resolve_config_path(value: str | Path) -> Path:
    """The file `-c VALUE` means: a file that exists wins; else a recipe name gives the shipped recipe
    (an unknown one lists the recipes); anything else is returned as given (the caller reports it missing)."""
    path = Path(value)
    if path.is_file() or not is_recipe_name(str(value)):
        return path
    if str(value) in recipe_names():
        return recipe_path(str(value))
    raise ConfigError(f"-c {str(value)!r} is neither a file nor a shipped recipe{close_matches(str(value))}; "
                      f"{recipes_hint()}, or give the path of a YAML file")


def close_matches(name: str) -> str:
    """' (did you mean a, b?)' for recipe names close to `name`, or ''."""
    found = difflib.get_close_matches(name, recipe_names(), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(found)}?)" if found else ""


def recipes_hint() -> str:
    return f"shipped recipes: {', '.join(recipe_names())} (`sparsify recipes` describes them)"


def copy_recipe(name: str, dest: Path | None = None, *, force: bool = False) -> Path:
    """Write the recipe `name` to `dest` (default ./NAME.yaml; a folder gets NAME.yaml inside) to edit.

    An existing file is kept unless `force`; the file appears whole or not at all."""
    text = recipe_path(name).read_bytes()
    target = Path(f"{name}{SUFFIX}") if dest is None else Path(dest)
    if target.is_dir():
        target = target / f"{name}{SUFFIX}"
    if target.exists() and not force:
        raise ConfigError(f"{target} already exists; pass --force to overwrite it, or give another PATH")
    blocking = file_on_the_way(target.parent)
    if blocking is not None:
        raise WriteFailed(f"cannot write {target}: {blocking} is a file, not a folder; give a PATH in a folder")
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        temporary.write_bytes(text)
        os.replace(temporary, target)
    except OSError as exc:
        with suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise WriteFailed(f"cannot write {target} ({exc.strerror or exc}); give a PATH in a folder you can write to") \
            from None
    return target


def file_on_the_way(folder: Path) -> Path | None:
    """The first of `folder` and its parents that exists as something other than a folder, or None."""
    for path in [folder, *folder.parents]:
        if path.exists():
            return None if path.is_dir() else path
    return None
