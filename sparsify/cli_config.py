"""How a command gets its config: -c PATH and --set overrides (and --threads), the note when the built-in
defaults stand in for a config, and --nproc's relaunch in N processes."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from sparsify.cli_errors import debugging, note


def load(config: Optional[Path], overrides: Optional[list[str]]):
    """The resolved config; a note on stderr when the built-in defaults stand in for it."""
    from sparsify.config import load_config

    resolved = load_config(config, overrides or [])
    source = defaults_source(config)
    if source:
        note(f"note: {source}; using the built-in defaults{' with the overrides given' if overrides else ''}: "
             f"run {resolved.name!r} in {resolved.run_dir}")
    return resolved


def defaults_source(config: Optional[Path]) -> str:
    """Why the run gets the built-in defaults ('no config given ...', '<path> is empty'), or ''."""
    if config is None:
        return "no config given (-c PATH)"
    import yaml

    try:
        empty = yaml.safe_load(Path(config).read_text()) is None
    except (OSError, yaml.YAMLError):  # load_config has read it already; nothing to add
        return ""
    return f"{config} is empty" if empty else ""


def with_threads(overrides: Optional[list[str]], threads: Optional[str]) -> list[str]:
    """`--threads N` as the override train.threads=N: validated with the config, recorded in config.yaml."""
    return [*(overrides or []), *([f"train.threads={threads}"] if threads is not None else [])]


def load_stage(config: Optional[Path], overrides: Optional[list[str]], threads: Optional[str]):
    """The config (with --threads), and torch's CPU threads set from train.threads for this command."""
    from sparsify.threads import apply_threads

    resolved = load(config, with_threads(overrides, threads))
    apply_threads(resolved.train.threads)
    return resolved


def relaunch(command: str, config: Optional[Path], overrides: Optional[list[str]], nproc: int, extra: list[str]) -> None:
    """`--nproc N`: the command again in N processes, once what every process would refuse is checked here."""
    from sparsify.errors import SparsifyError
    from sparsify.stages.relaunch import check_before_launch, launch_command

    try:
        check_before_launch(command, config, overrides)
    except SparsifyError:
        load(config, overrides)  # says when the built-in defaults are why the run folder is not the one meant
        raise
    launch_command(command, config, overrides, nproc, extra, quiet=not debugging())
