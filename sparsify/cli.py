"""The `sparsify` command line: thin commands that parse, call one function, and print.

Results go to stdout, progress and logs to stderr. Torch is imported only inside commands,
so `sparsify --help` stays fast.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from sparsify.cli_config import config_path, export_run_dir, load, load_stage, relaunch, with_threads
from sparsify.cli_errors import DEBUG_ENV, fail, note, reports_errors, say

app = typer.Typer(
    name="sparsify",
    help="Make trained CNNs sparse, round by round: download -> (prune -> train)* -> report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: flags show no value placeholder, and help needs no rich import
)

ConfigOption = Annotated[
    Optional[Path], typer.Option("--config", "-c", help="YAML config of the run, or a shipped recipe's name "
                                 "(`sparsify recipes`).", show_default=False, parser=config_path)
]
SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", metavar="KEY=VALUE", help="Override a config key, e.g. --set train.lr=0.01 (repeatable).",
                 show_default=False),
]


class ReportFormat(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"
    markdown = "markdown"
    html = "html"


class CheckFormat(str, Enum):
    text = "text"
    json = "json"


TableFormat = Enum("TableFormat", {"table": "table", "csv": "csv", "json": "json"}, type=str)  # sensitivity

NprocOption = Annotated[
    Optional[int],
    typer.Option("--nproc", min=1, help="Launch N local processes through torch.distributed.run (like torchrun).",
                 show_default=False),
]


ThreadsOption = Annotated[
    Optional[str],
    typer.Option("--threads", metavar="auto|N",
                 help="CPU threads for torch: auto or N >= 1 (default: train.threads).", show_default=False),
]


def print_version(value: bool) -> None:
    """`--version`: this package's version and those of torch and torchvision (read without importing them)."""
    if not value:
        return
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from sparsify import __version__

    found = []
    for package in ("torch", "torchvision"):
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            found.append(f"{package} not installed")
    say(f"sparsify {__version__} ({', '.join(found)}, python {platform.python_version()})")
    raise typer.Exit()


@app.callback()
def options(
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=print_version,
                                          help="Print the version (and torch's) and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of an unexpected error (a bug) "
                                                        "instead of one line; also SPARSIFY_DEBUG=1.")] = False,
) -> None:
    """Make trained CNNs sparse, round by round: download -> (prune -> train)* -> report."""
    if debug:  # through the environment, so that the processes of --nproc inherit it
        import os

        os.environ[DEBUG_ENV] = "1"


@app.command(short_help="Build the model with its starting weights (round 0).")
@reports_errors
def download(
    config: ConfigOption = None,
    set_: SetOption = None,
    force: Annotated[bool, typer.Option("--force", help="Delete the run's checkpoints and start again.")] = False,
    threads: ThreadsOption = None,
) -> None:
    """Build the model with its starting weights (downloaded if needed) as the round-0 checkpoint."""
    from sparsify import stages

    say(stages.download(load_stage(config, set_, threads), force=force).message)


@app.command()
@reports_errors
def prune(
    config: ConfigOption = None,
    set_: SetOption = None,
    threads: ThreadsOption = None,
    eval_: Annotated[bool, typer.Option("--eval", help="Print the validation top-1 before and after the "
                                        "BatchNorm re-estimation.")] = False,
) -> None:
    """Run one prune round on the latest checkpoint. Exits 3 once every layer is at its target."""
    from sparsify import stages

    say(stages.prune(load_stage(config, set_, threads), show_eval=eval_).message)


@app.command(short_help="Finetune the latest checkpoint with its masks enforced.")
@reports_errors
def train(
    config: ConfigOption = None,
    set_: SetOption = None,
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Epochs (default: train.epochs).")] = None,
    nproc: NprocOption = None,
    threads: ThreadsOption = None,
) -> None:
    """Finetune the latest checkpoint with its masks enforced, evaluate, save a new checkpoint."""
    from sparsify import stages

    if nproc is not None:
        return relaunch("train", config, with_threads(set_, threads), nproc,
                        ["--epochs", str(epochs)] if epochs else [])
    say(stages.train(load_stage(config, set_, threads), epochs=epochs).message)


@app.command("eval", short_help="Evaluate the latest checkpoint on the validation set.")
@reports_errors
def eval_(config: ConfigOption = None, set_: SetOption = None, threads: ThreadsOption = None) -> None:
    """Evaluate the latest checkpoint (top-1, top-5, loss) on the validation set."""
    from sparsify import stages

    say(stages.eval_latest(load_stage(config, set_, threads)).message)


@app.command(short_help="Time the dense, masked and sparse model; count the savings.")
@reports_errors
def bench(
    target: Annotated[Optional[Path], typer.Argument(
        help="A run folder or a checkpoint file (default: the config's run).", show_default=False)] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, float16 or bfloat16 (2:4 on CUDA needs one of the last two).")
                     ] = "float32",
    cuda_graph: Annotated[bool, typer.Option(help="Run every model as CUDA graph replays (CUDA only).")] = False,
    batch: Annotated[str, typer.Option(metavar="N,N", help="Batch sizes, comma-separated.")] = "1,32",
    runs: Annotated[int, typer.Option(min=1, max=1000, help="Interleaved timed runs per model.")] = 7,
    input_size: Annotated[Optional[int], typer.Option(
        min=1, max=4096, help="Image size (default: the checkpoint's).", show_default=False)] = None,
    threads: ThreadsOption = None,
    format_: Annotated[CheckFormat, typer.Option("--format", "-f", help="text (tables) or json.")] = CheckFormat.text,
) -> None:
    """Time the dense, masked and calibrated sparse model; count multiply-adds and bytes; write bench.json."""
    from sparsify.report.bench import render_bench
    from sparsify.stages.bench import BenchSettings, bench as run_bench, check_batches
    from sparsify.threads import apply_threads, thread_setting

    batches = check_batches(batch)
    resolved = load(config, with_threads(set_, threads)) if target is None or config is not None else None
    apply_threads(resolved.train.threads if resolved else thread_setting(threads or "auto"))
    settings = BenchSettings(device=device, dtype=dtype, cuda_graph=cuda_graph, batches=batches, runs=runs,
                             input_size=input_size)
    result = run_bench(target or resolved.run_dir, settings)
    say(render_bench(result, "json" if format_ is CheckFormat.json else "table"))


@app.command(short_help="Prune each layer alone, measure the loss; allocate targets.")
@reports_errors
def sensitivity(
    config: ConfigOption = None,
    set_: SetOption = None,
    levels: Annotated[str, typer.Option(metavar="L,L", help="Levels to prune each layer to.")] = "0.25,0.5,0.75,0.9",
    batches: Annotated[int, typer.Option(min=1, metavar="N", help="Validation batches per measurement.")] = 8,
    nproc: NprocOption = None,
    threads: ThreadsOption = None,
    format_: Annotated[TableFormat, typer.Option("--format", "-f", help="Output format.")] = TableFormat("table"),
) -> None:
    """Prune each eligible layer alone to each level and measure the loss; write sensitivity.json; resumable."""
    from sparsify.report.sensitivity import render_sensitivity
    from sparsify.stages.sensitivity import ScanSettings, check_levels, sensitivity as scan

    settings = ScanSettings(levels=check_levels(levels), batches=batches)
    if nproc is not None:
        return relaunch("sensitivity", config, with_threads(set_, threads), nproc,
                        ["--levels", levels, "--batches", str(batches), "--format", format_.value])
    say(render_sensitivity(scan(load_stage(config, set_, threads), settings), format_.value))


@app.command(short_help="Run the whole schedule: dense, prune + train rounds, final.")
@reports_errors
def run(config: ConfigOption = None, set_: SetOption = None, nproc: NprocOption = None,
        threads: ThreadsOption = None) -> None:
    """Run the whole schedule (dense epochs, prune+train rounds, final epochs); resumable."""
    from sparsify import stages

    if nproc is not None:
        return relaunch("run", config, with_threads(set_, threads), nproc, [])
    results = stages.run_schedule(load_stage(config, set_, threads))
    say(f"run finished: {len(results)} stage(s) this time; see `sparsify report`")


@app.command(short_help="Per-layer table, summary and round history of a run.")
@reports_errors
def report(
    target: Annotated[
        Optional[Path], typer.Argument(help="A run folder or a checkpoint file (default: the config's run).")
    ] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    format_: Annotated[ReportFormat, typer.Option("--format", "-f", help="Output format (html: one self-contained "
                                                  "file with the figures).")] = ReportFormat.table,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", metavar="FILE",
                                                   help="Write the report to FILE instead of stdout.",
                                                   show_default=False)] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", metavar="DIR", help="Also write the figures to DIR as "
                                                 "PNG and SVG (needs the [plot] extra).", show_default=False)] = None,
    layers: Annotated[Optional[str], typer.Option("--layers", metavar="GLOB", help="Layers whose masks are drawn, "
                                                  "e.g. 'layer1.*' (default: the largest few).",
                                                  show_default=False)] = None,
) -> None:
    """Per-layer sparsity table, model summary and round history; figures with --plot or --format html."""
    from sparsify.report.publish import publish_report

    if target is None:
        target = load(config, set_).run_dir
    published = publish_report(target, format_.value, output=output, plot_dir=plot, layers=layers)
    for message in published.messages:
        note(message)
    if published.text is not None:
        say(published.text)


@app.command()
@reports_errors
def check(
    path: Annotated[Path, typer.Argument(help="A sparsify checkpoint, or a state dict (.safetensors, .pth, .pt).")],
    pattern: Annotated[Optional[str], typer.Option(
        "--pattern", "-p", help="Pattern to verify: 2:4, 8x8, unstructured (default: the checkpoint's).")] = None,
    format_: Annotated[CheckFormat, typer.Option("--format", "-f", help="Output format.")] = CheckFormat.text,
) -> None:
    """Verify that every pruned weight follows the pattern. Exits 0 if it does, 1 if not."""
    from sparsify.report import check as check_mod

    result = check_mod.check_file(path, pattern=pattern)
    say(check_mod.render(result, format_.value))
    if not result["follows"]:
        fail(result["reason"], 1)


@app.command(short_help="Write a checkpoint as a plain model file, ONNX or pt2.")
@reports_errors
def export(
    config: ConfigOption = None,
    set_: SetOption = None,
    format_: Annotated[str, typer.Option(
        "--format", "-f", metavar="FORMAT",
        help="A registered exporter: safetensors, pth, onnx, pt2, or one a plugin adds.")] = "safetensors",
    checkpoint: Annotated[
        Optional[Path], typer.Option(help="Checkpoint to export (default: the run's latest).", show_default=False)
    ] = None,
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", help="Output file (default: <run>/export/<checkpoint>.<format>; "
                                     "with --checkpoint and no -c, the run folder holding that checkpoint).",
                                     show_default=False)
    ] = None,
    no_verify: Annotated[bool, typer.Option(
        "--no-verify", help="ONNX: write the file without comparing onnxruntime's outputs to PyTorch's "
                            "and without checking its pruned zeros.")] = False,
    compact: Annotated[bool, typer.Option(
        "--compact", help="Remove the channels whose output is unused (folding what they add into the next "
                          "layer's bias) and write the smaller dense model: safetensors, onnx or pt2.")] = False,
) -> None:
    """Write a checkpoint as a plain model file: safetensors or pth state_dict, ONNX or a torch.export program
    (checked first); --compact writes the smaller dense model without unused channels."""
    from sparsify.io.rundir import RunDir
    from sparsify.io.export import export_checkpoint

    run = RunDir(export_run_dir(config, set_, checkpoint=checkpoint, output=output, fmt=format_))
    say(str(export_checkpoint(run, fmt=format_, checkpoint=checkpoint, output=output, verify=not no_verify,
                                        compact=compact)))


recipes_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
app.add_typer(recipes_app, name="recipes")


@recipes_app.callback(invoke_without_command=True)
@reports_errors
def recipes(ctx: typer.Context) -> None:
    """List the shipped recipes, one line each. `-c NAME` runs one as it is; `recipes copy NAME` writes one to edit."""
    if ctx.invoked_subcommand is None:
        from sparsify.recipes import list_recipes

        found = list_recipes()
        width = max(len(name) for name, _ in found)
        say("\n".join(f"{name:<{width}}  {text}".rstrip() for name, text in found))


@recipes_app.command("copy")
@reports_errors
def recipes_copy(
    name: Annotated[str, typer.Argument(help="A shipped recipe (`sparsify recipes` lists them).")],
    path: Annotated[Optional[Path], typer.Argument(help="File or folder to write (default: ./NAME.yaml).",
                                                   show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a recipe to ./NAME.yaml or PATH to edit.

    An existing file is kept unless --force.
    """
    from sparsify.recipes import copy_recipe

    written = copy_recipe(name, path, force=force)
    say(f"wrote {written}; edit it, then: sparsify run -c {written}")


@app.command("config", short_help="Validate a config and print it resolved.")
@reports_errors
def show_config(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Validate a config and print it resolved (defaults filled in, overrides applied)."""
    from sparsify.config import config_to_yaml

    say(config_to_yaml(load(config, set_)).rstrip("\n"))


def main() -> None:
    app()
