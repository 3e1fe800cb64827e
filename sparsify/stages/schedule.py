"""`sparsify run`: the whole schedule in one process (or one torchrun job), resumable from the last
finished stage."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from sparsify.config import RunConfig
from sparsify.console import log
from sparsify.errors import SparsifyError, TargetReached
from sparsify.io.rundir import RunDir
from sparsify.registry import METHODS
from sparsify.stages.download import download
from sparsify.stages.prune import prune
from sparsify.stages.run import StageResult
from sparsify.stages.train import train
from sparsify.training.distributed import distributed_session, main_holds, run_on_main


def next_step(run: RunDir, config: RunConfig) -> str:
    """What `run` does next, from the latest finished stage: download, dense, prune, round, final, done."""
    latest = run.latest()
    if latest is None:
        return "download"
    stage = _stage_of(latest)
    sched = config.schedule
    if not METHODS.get(config.sparsity.method).prune_rounds:  # training sets the masks: one stage
        return "done" if stage == "final" else "train"
    if stage == "pretrained":
        return "dense" if sched.dense_epochs > 0 else "prune"
    if stage == "pruned":
        return "round" if sched.epochs_per_round > 0 else "prune"
    if stage == "final":
        return "done"
    return "prune"


def _stage_of(path: Path) -> str:
    return path.name.split("-", 2)[2].removesuffix(".safetensors")


def run_schedule(config: RunConfig, *, echo=log) -> list[StageResult]:
    """The whole schedule in one process (or one torchrun job); resumable from the last finished stage."""
    with distributed_session(config.device):
        return schedule_stages(config, echo=echo)


def schedule_stages(config: RunConfig, *, echo=log) -> list[StageResult]:
    """The loop of `run_schedule`: download and prune on rank 0 only, train on every rank."""
    with ExitStack() as held:
        return scheduled_stages(config, held, echo=echo)


def scheduled_stages(config: RunConfig, held: ExitStack, *, echo=log) -> list[StageResult]:
    """The stages, under the run's lock from the moment the run folder exists (download makes it, and
    validates the data before writing anything), so no other command gets in between two of them."""
    results: list[StageResult] = []
    run = RunDir(config.run_dir)
    sched = config.schedule
    locked = False
    for _ in range(2 * sched.max_rounds + 4):
        if not locked and run_on_main(run.root.is_dir):
            held.enter_context(main_holds(run.lock("run", for_stages=True)))
            locked = True
        step = run_on_main(next_step, run, config)  # every rank follows rank 0's reading of the run folder
        if step == "done":
            return results
        if step == "download":
            result = run_on_main(download, config)
        elif step == "train":
            result = train(config, stage="final", command="run")
        elif step == "dense":
            result = train(config, epochs=sched.dense_epochs, command="run")
        elif step == "round":
            result = train(config, epochs=sched.epochs_per_round, command="run")
        else:
            try:
                result = run_on_main(prune, config)
            except TargetReached as reached:
                echo(f"target reached: {reached}")
                if sched.final_epochs == 0:
                    return results
                result = train(config, epochs=sched.final_epochs, stage="final", command="run")
        echo(result.message or f"{result.command}: {result.checkpoint}")
        results.append(result)
    raise SparsifyError(f"schedule.max_rounds ({sched.max_rounds}) reached before the target; raise it or the step")
