"""Stages: download, prune, train, eval and run as short recipes over the layers below.

Every stage reads the latest checkpoint of the run folder and writes a new one plus one line of
history.jsonl, under the run's lock (`run.opened_run`, `run.write_stage`). Rerunning `run`
after a crash continues from the last finished stage.
"""

from sparsify.io.rundir import RunDir
from sparsify.io.restore import load_run
from sparsify.stages.download import download
from sparsify.stages.evaluate import eval_latest
from sparsify.stages.prune import prune
from sparsify.stages.run import StageResult, image_preset_for
from sparsify.stages.schedule import run_schedule
from sparsify.stages.train import train

__all__ = ["RunDir", "StageResult", "download", "eval_latest", "image_preset_for", "load_run", "prune",
           "run_schedule", "train"]
