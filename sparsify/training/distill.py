"""Knowledge distillation while finetuning: a frozen teacher and the loss that blends it with cross-entropy.

loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, target)

The KL term is the batch mean, computed in float32 with autocast off; T^2 keeps its gradients on
the scale of the cross-entropy's as T changes. Only the main logits are distilled: auxiliary heads
(inception, googlenet) keep their own cross-entropy. The teacher runs in eval mode under no_grad,
so it is deterministic (exact resume needs nothing new) and needs no collective under torchrun.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sparsify.errors import CheckpointError, SparsifyError
from sparsify.io.checkpoint import Checkpoint, load_checkpoint
from sparsify.io.restore import load_run, rebuild
from sparsify.io.rundir import RunDir

DENSE = "dense"
_ROUND0 = re.compile(r"^\d+-r0+-([a-z]+)\.safetensors$")


def main_logits(output) -> torch.Tensor:
    """The main logits of a model's output (a tensor, or inception/googlenet's named tuple)."""
    return output if isinstance(output, torch.Tensor) else output.logits


def kd_term(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), batch mean, in float32."""
    with torch.autocast(device_type=student.device.type, enabled=False):
        log_student = F.log_softmax(student.float() / temperature, dim=1)
        log_teacher = F.log_softmax(teacher.float() / temperature, dim=1)
        kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")
    return temperature * temperature * kl


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, ce: torch.Tensor, *, alpha: float,
                 temperature: float) -> torch.Tensor:
    """alpha * kd_term + (1 - alpha) * ce, where `ce` is the student's cross-entropy on the targets."""
    return alpha * kd_term(student, teacher, temperature) + (1.0 - alpha) * ce


@dataclass(frozen=True)
class Distiller:
    """A teacher (frozen when the Distiller is made: eval mode, no gradients) and the loss weights."""

    teacher: nn.Module
    alpha: float = 0.5
    temperature: float = 4.0
    name: str = ""  # the teacher's checkpoint file, for logs

    def __post_init__(self) -> None:
        freeze_(self.teacher)

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        return main_logits(self.teacher(images))

    def blend(self, teacher: torch.Tensor, student: torch.Tensor, ce: torch.Tensor) -> torch.Tensor:
        """The distillation loss from the teacher's and student's logits and the student's cross-entropy."""
        return distill_loss(student, teacher, ce, alpha=self.alpha, temperature=self.temperature)


def freeze_(model: nn.Module) -> nn.Module:
    """Eval mode, no parameter requires grad."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def dense_teacher_path(run: RunDir) -> Path | None:
    """The run's last round-0 checkpoint (the dense model after its dense epochs), or None."""
    found = [path for path in run.checkpoints() if _ROUND0.match(path.name)]
    return found[-1] if found else None


def check_same_model(teacher: dict, student: dict, *, source: str) -> None:
    """The teacher must be the student's architecture with its classes and input channels."""
    keys = ("arch", "num_classes", "in_channels")
    if any(teacher.get(key) != student.get(key) for key in keys):
        def describe(meta):
            return f"{meta.get('arch')} with {meta.get('num_classes')} classes, {meta.get('in_channels')} input channels"
        raise SparsifyError(f"train.distill.teacher {source} is a {describe(teacher)}, but this run trains a "
                            f"{describe(student)}; give a checkpoint of the same model, or teacher: dense")


def load_teacher_file(path: Path, student_meta: dict) -> nn.Module:
    """A teacher model from a checkpoint file outside the run (same model as the student, else refused)."""
    if not path.is_file():
        raise SparsifyError(f"train.distill.teacher {path} is not a file; give a sparsify checkpoint "
                            "(.safetensors) of the same model, or teacher: dense")
    try:
        ckpt: Checkpoint = load_checkpoint(path)
    except CheckpointError as exc:
        reason = str(exc).split(";")[0].removeprefix(str(path)).strip()
        raise SparsifyError(f"train.distill.teacher {path} is not a readable sparsify checkpoint ({reason}); give a "
                            ".safetensors checkpoint of the same model, or teacher: dense") from None
    check_same_model(ckpt.meta, student_meta, source=str(path))
    return rebuild(ckpt).model


def build_distiller(run: RunDir, student: Checkpoint, *, teacher: str, alpha: float, temperature: float,
                    device: torch.device, channels_last: bool = False,
                    log: Callable[[str], None] = lambda message: None) -> Distiller | None:
    """The stage's Distiller, its teacher loaded once, frozen, on `device`; None where nothing teaches.

    `teacher: dense` teaches nothing in round 0 (round 0 trains the dense model itself); in later
    rounds it is the last round-0 checkpoint, the downloaded weights when round 0 was never trained.
    `alpha` 0 needs no teacher.
    """
    if alpha == 0.0:
        log("train.distill: alpha 0 leaves only the cross-entropy; no teacher is loaded")
        return None
    if teacher == DENSE:
        if student.meta["round"] == 0:
            log("train.distill: teacher dense is the model round 0 trains; this round-0 stage trains without "
                "distillation")
            return None
        path = dense_teacher_path(run)
        if path is None:
            raise SparsifyError(f"train.distill.teacher dense: run folder {run.root} has no round-0 checkpoint; "
                                "start the run with `sparsify download`, or give a checkpoint PATH")
        loaded = load_run(run, path=path)
        check_same_model(loaded.checkpoint.meta, student.meta, source=path.name)
        model = loaded.model
        untrained = _ROUND0.match(path.name).group(1) == "pretrained"
        what = ("the downloaded weights: round 0 has no trained checkpoint" if untrained
                else "the dense model after round 0")
    else:
        path = Path(teacher)
        model = load_teacher_file(path, student.meta)
        what = "a checkpoint file"
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    log(f"train.distill: teacher {path.name} ({what}), alpha {alpha:g}, temperature {temperature:g}")
    return Distiller(model, alpha=alpha, temperature=temperature, name=path.name)
