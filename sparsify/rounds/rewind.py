"""Lottery-ticket rewinding: after each prune, the kept weights go back to a saved point.

The rewind point is `runs/<name>/rewind.safetensors`, a checkpoint-format file without masks:
- `{to: init}`: the weights at download (checkpoint 000), copied at the first prune;
- `{to: round0}`: the last checkpoint of round 0 (after the dense training), copied at the first prune;
- `{epoch: E}`: the weights after epoch E of round 0's training, written by a train callback.
Every entry of the state_dict is rewound, BatchNorm running statistics included (as Lottery
Ticket rewinding does: the whole network state at that point); pruned weights are then zeroed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from sparsify.io.checkpoint import load_checkpoint, save_checkpoint
from sparsify.io.rundir import RunDir
from sparsify.errors import CheckpointError, SparsifyError
from sparsify.core.masks import MaskEnforcer
from sparsify.training.callbacks import TrainCallback

REWIND_FILE = "rewind.safetensors"


def rewind_label(cfg) -> str:
    """`init`, `round0` or `epoch E`: what the rewind point is."""
    return cfg.to if cfg.to is not None else f"epoch {cfg.epoch}"


def save_rewind_point(path: Path, state: dict[str, torch.Tensor], *, label: str, source: str,
                      source_sha256: str) -> None:
    """Write the rewind point atomically; `source` is the checkpoint it comes from (or starts from)."""
    meta = {"rewind": label, "source": source, "source_sha256": source_sha256, "stage": "rewind"}
    save_checkpoint(Path(path), state, {}, meta)


def round0_checkpoint(run: RunDir, label: str) -> Path:
    """Checkpoint 000 (init) or the last checkpoint of round 0 (round0)."""
    found = [p for p in run.checkpoints() if re.match(r"^\d+-r0+-", p.name)]
    if not found:
        raise CheckpointError(f"run folder {run.root} has no round-0 checkpoint to rewind to; start it with "
                              "`sparsify download`")
    return found[0] if label == "init" else found[-1]


def rewind_state(run: RunDir, cfg) -> dict[str, torch.Tensor]:
    """The weights to rewind to: read from the run folder, or copied there from a round-0 checkpoint."""
    label, path = rewind_label(cfg), run.root / REWIND_FILE
    if path.is_file():
        saved = load_checkpoint(path)
        source_ok = run.recorded_sha256(run.checkpoints_dir / saved.meta.get("source", "")) == saved.meta.get(
            "source_sha256")
        if saved.meta.get("rewind") == label and source_ok:
            return saved.state
    if cfg.epoch is not None:
        raise SparsifyError(f"rewind point 'epoch {cfg.epoch}' of run {run.root} was not saved by this run's round-0 "
                            f"training; train round 0 for at least {cfg.epoch} epochs with this rewind config "
                            "(schedule.dense_epochs) before the first prune, or use rewind: {to: round0}")
    source = round0_checkpoint(run, label)
    ckpt = load_checkpoint(source, expected_sha256=run.recorded_sha256(source))
    save_rewind_point(path, ckpt.state, label=label, source=source.name, source_sha256=ckpt.sha256)
    return ckpt.state


@torch.no_grad()
def rewind_model_(model: nn.Module, state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], pattern) -> None:
    """Load the rewind point into `model` (every state_dict entry), then zero the pruned weights."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{REWIND_FILE} does not fit this model ({str(exc).splitlines()[0]}); delete it "
                              "so the next prune takes it again from round 0") from None
    MaskEnforcer(model, masks, pattern).apply_()


class EpochRewindSaver(TrainCallback):
    """Train callback for `rewind: {epoch: E}` in round 0: saves the weights once epoch E ends.

    `epochs_before` counts the epochs earlier round-0 train stages already ran.
    """

    def __init__(self, path: Path, *, epoch: int, epochs_before: int, source: str, source_sha256: str) -> None:
        self.path, self.epoch, self.epoch_in_stage = Path(path), epoch, epoch - epochs_before
        self.source, self.source_sha256 = source, source_sha256
        self.at_step: int | None = None

    def prepare(self, model: nn.Module, enforcer, *, steps_per_epoch: int) -> None:
        """The optimizer step that ends epoch E of round 0 (None when E is not in this stage)."""
        self.at_step = self.epoch_in_stage * steps_per_epoch if self.epoch_in_stage >= 1 else None

    def after_step(self, step: int, epoch: int, model: nn.Module, enforcer) -> None:
        if step != self.at_step or os.environ.get("RANK", "0") != "0":
            return
        state = getattr(model, "module", model).state_dict()  # unwrap DistributedDataParallel
        save_rewind_point(self.path, state, label=f"epoch {self.epoch}", source=self.source,
                          source_sha256=self.source_sha256)


def rewind_callbacks(config, run: RunDir, parent) -> list:
    """Train callbacks for the rewind config: the epoch saver in round 0, nothing otherwise."""
    cfg = config.sparsity.rewind
    if cfg is None or cfg.epoch is None or parent.meta.get("round") != 0:
        return []
    before = sum(int((entry.get("metrics") or {}).get("epochs", 0)) for entry in run.history()
                 if entry.get("round") == 0 and entry.get("command") in ("train", "run"))
    first = round0_checkpoint(run, "init")
    return [EpochRewindSaver(run.root / REWIND_FILE, epoch=cfg.epoch, epochs_before=before,
                             source=first.name, source_sha256=run.recorded_sha256(first) or "")]
