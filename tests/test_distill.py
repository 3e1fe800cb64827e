"""Knowledge distillation (train.distill): the loss against its formula, the frozen teacher, resume, the CLI."""

import copy
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import resume_from, saver_at
from sparsify import stages
from sparsify.config import load_config
from sparsify.core.block import BlockPattern
from sparsify.core.masks import MaskEnforcer
from sparsify.data.samplers import ResumableDistributedSampler
from sparsify.training.distill import Distiller, distill_loss, kd_term
from sparsify.training.loop import train_epochs
from sparsify.training.trainer import AUX_LOSS_WEIGHT, LoopOptions, OptimConfig, Trainer, classification_loss

@pytest.fixture(autouse=True)
def one_thread():
    """Tiny batches: one torch thread is fastest, and robust on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TESTS = Path(__file__).parent
LN3 = math.log(3.0)
# At T = 2 the student's rows are softmax [1/4, 3/4] twice; the teacher's [1/2, 1/2] and [1/4, 3/4].
STUDENT = torch.tensor([[0.0, 2 * LN3], [0.0, 2 * LN3]])
TEACHER = torch.tensor([[0.0, 0.0], [0.0, 2 * LN3]])
# KL(teacher || student): row 1 = 1/2 ln(0.5/0.25) + 1/2 ln(0.5/0.75) = 1/2 ln(4/3); row 2 = 0.
# Batch mean 1/4 ln(4/3), times T^2 = 4: ln(4/3).
KD_BY_HAND = math.log(4.0 / 3.0)


def test_the_distillation_term_equals_its_formula_on_hand_made_logits():
    assert float(kd_term(STUDENT, TEACHER, 2.0)) == pytest.approx(KD_BY_HAND, rel=1e-6)
    ce = torch.tensor(0.0)
    assert float(distill_loss(STUDENT, TEACHER, ce, alpha=1.0, temperature=2.0)) == pytest.approx(KD_BY_HAND, rel=1e-6)


def test_alpha_blends_the_distillation_term_with_the_cross_entropy():
    target = torch.tensor([1, 0])  # softmax of a student row at T = 1: [1/10, 9/10]
    ce_by_hand = (math.log(10 / 9) + math.log(10)) / 2
    ce = nn.CrossEntropyLoss()(STUDENT, target)
    assert float(ce) == pytest.approx(ce_by_hand, rel=1e-6)
    loss = distill_loss(STUDENT, TEACHER, ce, alpha=0.25, temperature=2.0)
    assert float(loss) == pytest.approx(0.25 * KD_BY_HAND + 0.75 * ce_by_hand, rel=1e-6)


def test_alpha_zero_is_exactly_the_cross_entropy_and_soft_targets_keep_their_cross_entropy():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 7), torch.randn(5, 7)
    soft = torch.softmax(torch.randn(5, 7), 1)  # mixup/cutmix targets
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    plain, _ = classification_loss(student, soft, criterion)
    none = Distiller(nn.Identity(), alpha=0.0, temperature=3.0)
    blended, _ = classification_loss(student, soft, criterion, blend=lambda logits, ce: none.blend(teacher, logits, ce))
    assert torch.equal(blended, plain)
    half = Distiller(nn.Identity(), alpha=0.5, temperature=3.0)
    mixed, _ = classification_loss(student, soft, criterion, blend=lambda logits, ce: half.blend(teacher, logits, ce))
    assert float(mixed) == pytest.approx(0.5 * float(kd_term(student, teacher, 3.0)) + 0.5 * float(plain), rel=1e-6)


def test_under_bf16_autocast_the_term_is_float32_of_the_bf16_logits():
    student, teacher = STUDENT.bfloat16(), TEACHER.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = kd_term(student, teacher, 2.0)
    assert value.dtype == torch.float32
    assert torch.equal(value, kd_term(student.float(), teacher.float(), 2.0))


def test_googlenet_distills_its_main_logits_and_keeps_the_aux_heads_cross_entropy():
    torch.manual_seed(0)
    student = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False, num_classes=4)
    distiller = Distiller(copy.deepcopy(student), alpha=1.0, temperature=2.0)
    assert not distiller.teacher.training  # eval mode: main logits only, no dropout
    images, target = torch.randn(2, 3, 32, 32), torch.tensor([1, 3])
    reference = copy.deepcopy(student)
    torch.manual_seed(1)  # dropout draws the same numbers in the reference forward and in the step
    with torch.no_grad():
        out = reference(images)
        expected = (kd_term(out.logits, distiller.teacher(images), 2.0)
                    + AUX_LOSS_WEIGHT * nn.functional.cross_entropy(out.aux_logits1, target)
                    + AUX_LOSS_WEIGHT * nn.functional.cross_entropy(out.aux_logits2, target))
    trainer = Trainer(student, MaskEnforcer(student, {}, BlockPattern(8, 8)), OptimConfig(lr=0.1), LoopOptions(),
                      torch.device("cpu"), distiller=distiller)
    torch.manual_seed(1)
    loss, logits, counted = trainer.step(images, target, lr=0.1)
    assert counted and logits.shape == (2, 4)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 1),
                         nn.Flatten(), nn.Linear(16 * 4 * 4, 3))


def distilled_run(teacher: nn.Module | None, *, amp="none", save_state=None, resume=None):
    """Two epochs of 3 steps with soft targets (mixup's), masks and BatchNorm; without a teacher: plain training."""
    torch.manual_seed(0)
    model = tiny_model()
    masks = {"0.weight": torch.tensor([[True, False], [True, True]]),
             "3.weight": torch.tensor([[True, True], [False, True]])}
    enforcer = MaskEnforcer(model, masks, BlockPattern(8, 8))
    data = TensorDataset(torch.randn(24, 16, 4, 4), torch.softmax(torch.randn(24, 3), 1))
    loader = DataLoader(data, batch_size=8, sampler=ResumableDistributedSampler(data, num_replicas=1, rank=0, seed=0),
                        generator=torch.Generator().manual_seed(0))
    distiller = None if teacher is None else Distiller(teacher, alpha=0.7, temperature=3.0)
    train_epochs(model, loader, enforcer=enforcer, cfg=OptimConfig(lr=0.1), epochs=2, device=torch.device("cpu"),
                 options=LoopOptions(amp=amp, save_every_steps=2), save_state=save_state, resume=resume,
                 distiller=distiller)
    return model


def trained_teacher() -> nn.Module:
    torch.manual_seed(5)
    teacher = tiny_model()  # in train mode, as built: the Distiller must freeze it
    with torch.no_grad():  # BatchNorm statistics that are not the defaults
        teacher(torch.randn(32, 16, 4, 4) * 3)
    return teacher


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_the_teacher_is_unchanged_by_training_and_the_student_learns_from_it(amp):
    teacher = trained_teacher()
    before = copy.deepcopy(teacher.state_dict())
    model = distilled_run(teacher, amp=amp)
    after = teacher.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)  # BatchNorm statistics too: eval mode
    assert not teacher.training and all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    plain = distilled_run(None, amp=amp)
    assert not torch.equal(model[0].weight, plain[0].weight)


def test_resume_from_the_middle_with_a_teacher_replays_the_rest_exactly(tmp_path):
    path = tmp_path / "train-state.safetensors"
    full = distilled_run(trained_teacher(), save_state=saver_at(path, 4, epochs=2))
    resumed = distilled_run(trained_teacher(), resume=resume_from(path))
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_cli_dense_teacher_trains_after_a_prune_and_a_teacher_file_gives_the_same_weights(workdir, cli):
    for command in ("download", "train", "prune"):
        code, _, err = cli(command, "-c", "tiny.yaml")
        assert code == 0, err
    shutil.copytree(workdir / "runs/tiny", workdir / "runs/copy")
    teacher_file = workdir / "teacher.safetensors"
    shutil.copy(workdir / "runs/tiny/checkpoints/001-r00-trained.safetensors", teacher_file)

    code, out, err = cli("train", "-c", "tiny.yaml", "--set", "train.distill={teacher: dense, alpha: 0.8}")
    assert code == 0, err
    assert "train.distill: teacher 001-r00-trained.safetensors (the dense model after round 0), alpha 0.8" in err
    assert "round 1 trained" in out
    code, _, err = cli("train", "-c", "tiny.yaml", "--set", "name=copy",
                       "--set", f"train.distill={{teacher: {teacher_file}, alpha: 0.8}}")
    assert code == 0, err
    assert "train.distill: teacher teacher.safetensors (a checkpoint file)" in err
    a = load_file(workdir / "runs/tiny/checkpoints/003-r01-trained.safetensors")
    b = load_file(workdir / "runs/copy/checkpoints/003-r01-trained.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    pruned = load_file(workdir / "runs/tiny/checkpoints/002-r01-pruned.safetensors")
    assert not torch.equal(a["model.fc.weight"], pruned["model.fc.weight"])


def test_cli_round_zero_trains_without_a_dense_teacher_and_later_rounds_fall_back_to_the_download(workdir, cli):
    code, _, err = cli("download", "-c", "tiny.yaml")
    assert code == 0, err
    code, _, err = cli("train", "-c", "tiny.yaml", "--set", "train.distill={}")
    assert code == 0, err
    assert "this round-0 stage trains without distillation" in err
    shutil.rmtree(workdir / "runs/tiny")  # again without the dense training: round 0 holds only the download
    for command in ("download", "prune"):
        code, _, err = cli(command, "-c", "tiny.yaml")
        assert code == 0, err
    code, _, err = cli("train", "-c", "tiny.yaml", "--set", "train.distill={}")
    assert code == 0, err
    assert ("train.distill: teacher 000-r00-pretrained.safetensors (the downloaded weights: round 0 has no trained "
            "checkpoint), alpha 0.5, temperature 4") in err


def test_cli_refuses_a_teacher_of_another_architecture_in_one_line(workdir, cli):
    for command in ("download", "prune"):
        code, _, err = cli(command, "-c", "tiny.yaml")
        assert code == 0, err
    code, _, err = cli("download", "-c", "tiny.yaml", "--set", "name=other", "--set", "model.arch=small_resnet")
    assert code == 0, err
    other = workdir / "runs/other/checkpoints/000-r00-pretrained.safetensors"
    before = sorted((workdir / "runs/tiny/checkpoints").iterdir())
    code, out, err = cli("train", "-c", "tiny.yaml", "--set", f"train.distill.teacher={other}")
    assert code == 1 and out == ""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines == [f"error: train.distill.teacher {other} is a small_resnet with 4 classes, 3 input channels, but "
                     "this run trains a tiny_resnet with 4 classes, 3 input channels; give a checkpoint of the same "
                     "model, or teacher: dense"]
    assert "Traceback" not in err
    assert sorted((workdir / "runs/tiny/checkpoints").iterdir()) == before
    code, _, err = cli("train", "-c", "tiny.yaml", "--set", "train.distill.teacher=tiny.yaml")
    assert code == 1 and "error: train.distill.teacher tiny.yaml is not a readable sparsify checkpoint" in err


TORCHRUN_CONFIG = """\
name: {name}
seed: 0
device: cpu
model: {{arch: "factory_model:build", num_classes: 4}}
data: {{dataset: fake, fake_samples: 48, batch_size: {batch}}}
sparsity: {{pattern: {{type: unstructured}}, criterion: l1, target: 0.5, step: 0.5, include_linear: true}}
train: {{lr: 0.1, epochs: 2, save_every_minutes: null, distill: {{teacher: dense, alpha: 0.6, temperature: 2.0}}}}
"""


@pytest.mark.slow  # a torchrun job: 20 s to a minute on 2 cores
def test_two_gloo_processes_with_a_teacher_each_match_one_process(tmp_path, monkeypatch):
    """No BatchNorm (factory_model): the mean of two half-batch losses' gradients is the full batch's."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(TESTS))
    for name, batch in (("one", 16), ("two", 8)):
        (tmp_path / f"{name}.yaml").write_text(TORCHRUN_CONFIG.format(name=name, batch=batch))
    one = load_config(tmp_path / "one.yaml")
    stages.download(one)
    stages.train(one, epochs=1)
    stages.prune(one)
    shutil.copytree(tmp_path / "runs/one", tmp_path / "runs/two")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "sparsify", "train", "-c", "two.yaml"], env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x 2 processes" in proc.stderr and proc.stderr.count("train.distill: teacher 001-r00-trained") == 1
    stages.train(one)
    a = load_file(tmp_path / "runs/one/checkpoints/003-r01-trained.safetensors")
    b = load_file(tmp_path / "runs/two/checkpoints/003-r01-trained.safetensors")
    pruned = load_file(tmp_path / "runs/one/checkpoints/002-r01-pruned.safetensors")
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=1e-5), key
    assert not torch.equal(a["model.4.weight"], pruned["model.4.weight"])
