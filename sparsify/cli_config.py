"""How a command gets its config: -c PATH and --set overrides (and --threads), the note when the built-in
defaults stand in for a config, the run folder `export --checkpoint` works in, and --nproc's relaunch in N
processes."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from sparsify.cli_errors import debugging, note
from sparsify.errors import SparsifyError


def config_path(text: str) -> Union[Path, str]:
    """-c's value: a Path, but an empty one stays '' (Path('') would be '.', the working folder), so that
    load_config can say the path is empty."""
    return Path(text) if text else text


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
    from sparsify.stages.relaunch import check_before_launch, launch_command

    try:
        check_before_launch(command, config, overrides)
    except SparsifyError:
        load(config, overrides)  # says when the built-in defaults are why the run folder is not the one meant
        raise
    launch_command(command, config, overrides, nproc, extra, quiet=not debugging())


def export_run_dir(config: Optional[Path], overrides: Optional[list[str]], *, checkpoint: Optional[Path],
                   output: Optional[Path], fmt: str) -> Path:
    """The run folder `export` writes into: the config's; with --checkpoint and neither -c nor --set, the run
    folder holding that checkpoint (<run>/checkpoints/FILE), not the built-in defaults' runs/run."""
    if checkpoint is None or config is not None or overrides:
        return load(config, overrides).run_dir
    folder = Path(checkpoint).parent
    if folder.name == "checkpoints":
        return folder.parent
    if output is None and Path(checkpoint).is_file():
        raise SparsifyError(f"export --checkpoint {checkpoint} is not in a run folder (RUN/checkpoints/FILE), so "
                            f"there is no run export/ folder to write to; name the file with -o, e.g. "
                            f"-o {Path('export') / Path(checkpoint).stem}.{fmt}, or give the run's config with -c")
    return folder
