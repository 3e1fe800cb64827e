"""Training options on tiny tensors: LR schedules, soft targets, AMP/clipping with exact masks, callbacks, train-state."""

import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sparsify.data.samplers import ResumableDistributedSampler
from sparsify.core.masks import MaskEnforcer, find_unmasked_nonzeros
from conftest import resume_from, saver_at
from sparsify.core.block import BlockPattern
from sparsify.training.loop import train_epochs
from sparsify.training.trainer import LoopOptions, OptimConfig, Position, classification_loss, count_correct, lr_at
from sparsify.training.log import append_row, drop_rows_after, read_rows
from sparsify.training.state import TrainState, capture_rng, load_train_state, restore_rng, save_train_state


def test_warmup_then_cosine_constant_and_step_schedules():
    cfg = OptimConfig(lr=1.0, lr_schedule="cosine", warmup_steps=4)
    assert [lr_at(s, 20, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, 20, cfg) == 1.0 and lr_at(12, 20, cfg) == pytest.approx(0.5)
    step = OptimConfig(lr=1.0, lr_schedule="step", lr_steps=(1, 3), lr_gamma=0.1, warmup_epochs=0.5)
    assert [lr_at(s, 40, step, steps_per_epoch=10) for s in (0, 4, 5, 9, 10, 29, 30)] == pytest.approx(
        [0.2, 1.0, 1.0, 1.0, 0.1, 0.1, 0.01])
    assert lr_at(7, 10, OptimConfig(lr=0.3)) == 0.3


def test_soft_targets_from_mixup_count_against_their_argmax():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.6, 0.4, 0.0]])
    assert int(count_correct(logits, soft)) == 1 and int(count_correct(logits, torch.tensor([0, 1]))) == 2
    loss, _ = classification_loss(logits, soft, nn.CrossEntropyLoss(label_smoothing=0.1))
    expected = -(((0.9 * soft + 0.1 / 3) * logits.log_softmax(1)).sum(1)).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)


class Recorder:
    """A callback that prunes one more block at step 2 and remembers what it saw."""

    def __init__(self):
        self.calls = []

    def on_train_start(self, model, enforcer):
        self.calls.append("start")

    def after_step(self, step, epoch, model, enforcer):
        self.calls.append((step, epoch))
        if step == 2:
            mask = enforcer.masks["0.weight"].clone()
            mask[0, 0] = False
            enforcer.set_mask("0.weight", mask)
            enforcer.apply_()

    def state_dict(self):
        return {"calls": len(self.calls)}

    def load_state_dict(self, state):
        self.calls.append(("loaded", state["calls"]))


def tiny_run(amp: str, *, callbacks=(), channels_last=False, save_state=None, resume=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1), nn.Flatten(),
                          nn.Linear(16 * 4 * 4, 3))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    masks = {"0.weight": torch.tensor([[True, False], [True, True]]), "2.weight": torch.tensor([[True, True], [False, True]])}
    enforcer = MaskEnforcer(model, masks, BlockPattern(8, 8))
    data = TensorDataset(torch.randn(24, 16, 4, 4) * 50, torch.randint(0, 3, (24,)))
    loader = DataLoader(data, batch_size=8, sampler=ResumableDistributedSampler(data, num_replicas=1, rank=0, seed=0),
                        generator=torch.Generator().manual_seed(0))
    options = LoopOptions(amp=amp, clip_grad_norm=0.5, label_smoothing=0.1, channels_last=channels_last,
                          save_every_steps=2)
    metrics = train_epochs(model, loader, enforcer=enforcer, cfg=OptimConfig(lr=0.5, momentum=0.9), epochs=2,
                           device=torch.device("cpu"), options=options, callbacks=list(callbacks),
                           save_state=save_state, resume=resume)
    return model, enforcer, metrics


@pytest.mark.parametrize("amp,channels_last", [("none", True), ("bf16", False), ("fp16", False)])
def test_masked_weights_stay_exactly_zero_under_amp_clipping_and_channels_last(amp, channels_last):
    model, enforcer, metrics = tiny_run(amp, channels_last=channels_last)
    state = dict(model.named_parameters())
    assert find_unmasked_nonzeros(state, enforcer.masks, enforcer.pattern) == []
    assert metrics["loss"] > 0 and 0 <= metrics["data_wait"] <= 1


def test_callbacks_see_every_step_and_their_mask_changes_are_the_final_masks():
    recorder = Recorder()
    saved = []
    _, enforcer, _ = tiny_run("none", callbacks=[recorder], save_state=lambda tr, pos: saved.append((pos, tr.parts(tr.counters_over_ranks()))))
    assert recorder.calls == ["start", (1, 0), (2, 0), (3, 0), (4, 1), (5, 1), (6, 1)]
    assert not bool(enforcer.masks["0.weight"][0, 0])
    assert [p.step for p, _ in saved] == [2, 4, 6] and saved[0][1]["callbacks"] == [{"calls": 3}]
    assert saved[1][0] == Position(epoch=1, batch=1, step=4)


def test_resume_from_the_middle_replays_the_rest_exactly(tmp_path):
    path = tmp_path / "train-state.safetensors"
    full, _, _ = tiny_run("none", save_state=saver_at(path, 4, epochs=2))
    resumed, _, _ = tiny_run("none", resume=resume_from(path))
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_rng_of_torch_python_and_numpy_round_trip_through_the_file(tmp_path):
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    rng = capture_rng()
    path = tmp_path / "s.safetensors"
    save_train_state(path, TrainState("c", "s", "h", 1, 1, rng=[rng]))
    expected = (torch.rand(3), random.random(), np.random.rand())
    restore_rng(load_train_state(path).rng[0])
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1] and np.random.rand() == expected[2]


def test_metrics_rows_written_after_the_last_save_are_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.csv"
    for start, step in [("a", 5), ("b", 3), ("b", 6), ("b", 9)]:
        append_row(path, {"time": 0, "round": 1, "start": start, "epoch": 0, "step": step, "loss": 1.0, "lr": 0.1,
                          "images_per_s": 1.0, "data_wait": 0.0})
    drop_rows_after(path, start="b", step=6)
    assert [(r["start"], r["step"]) for r in read_rows(path)] == [("a", "5"), ("b", "3"), ("b", "6")]
