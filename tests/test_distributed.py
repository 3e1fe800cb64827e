"""Real torch.distributed on CPU (gloo): a 2-process train stage against a 1-process one, mask checks."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from sparsify import stages
from sparsify.config import load_config
from sparsify.errors import MaskDivergenceError
from sparsify.training.distributed import check_masks_agree, first_divergence, mask_digests

TESTS = Path(__file__).parent

# No BatchNorm (tests/factory_model.py:build): with it, each process would normalise its own half
# of the batch and the two runs would compute different things. Without it, DDP's mean of two
# half-batch gradients equals the full-batch gradient up to float32 rounding.
CONFIG = textwrap.dedent(
    """\
    name: {name}
    seed: 0
    device: cpu
    model: {{arch: "factory_model:build", num_classes: 4}}
    data: {{dataset: fake, fake_samples: 48, batch_size: {batch}}}
    sparsity: {{pattern: {{type: unstructured}}, criterion: l1, target: 0.5, step: 0.5, include_linear: true}}
    train: {{lr: 0.1, epochs: 2, log_every: 1, save_every_minutes: null}}
    """
)
TOLERANCE = 1e-5  # float32: a mean of two half-batch means vs one full-batch mean, over 6 SGD steps


def write_config(folder: Path, name: str, batch: int) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(CONFIG.format(name=name, batch=batch))
    return path


def trained(folder: Path, name: str) -> dict:
    run = folder / "runs" / name
    latest = sorted((run / "checkpoints").iterdir())[-1]
    assert latest.name.endswith("trained.safetensors")
    return load_file(latest)


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(TESTS))
    one = load_config(write_config(tmp_path, "one", batch=16))
    two_path = write_config(tmp_path, "two", batch=8)
    stages.download(one)
    stages.prune(one)
    shutil.copytree(tmp_path / "runs/one", tmp_path / "runs/two")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "sparsify", "train", "-c", str(two_path)],
        env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stages.train(one)

    a, b = trained(tmp_path, "one"), trained(tmp_path, "two")
    pruned = load_file(tmp_path / "runs/two/checkpoints/001-r01-pruned.safetensors")
    masks = [k for k in pruned if k.startswith("mask.")]
    assert masks and all(torch.equal(b[k], pruned[k]) and torch.equal(a[k], b[k]) for k in masks)
    for key in a:
        if key.startswith("model."):
            assert torch.allclose(a[key], b[key], rtol=0, atol=TOLERANCE), key
            assert not torch.equal(a[key], pruned[key]) or key.endswith("bias") or a[key].abs().sum() == 0
    history = [json.loads(line) for line in (tmp_path / "runs/two/history.jsonl").read_text().splitlines()]
    assert [h["stage"] for h in history] == ["pretrained", "pruned", "trained"]  # written once, by rank 0
    assert proc.stdout.count("round 1 trained") == 1
    assert "x 2 processes" in proc.stderr and "global batch 16" in proc.stderr
    assert not (tmp_path / "runs/two/train-state.safetensors").exists()
    rows = (tmp_path / "runs/two/metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 6  # header + one row per step (48 samples / 16 per step x 2 epochs), rank 0 only


def _rank_main(rank: int, init_file: str, diverge: bool, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    masks = {"a.weight": torch.ones(2, 2, dtype=torch.bool), "b.weight": torch.ones(3, dtype=torch.bool)}
    if diverge and rank == 1:
        masks["b.weight"][1] = False
    try:
        check_masks_agree(masks)
        result = "agree"
    except MaskDivergenceError as exc:
        result = str(exc)
    Path(f"{out}.{rank}").write_text(result)
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("diverge", [False, True])
def test_mask_hashes_are_compared_across_gloo_ranks(tmp_path, diverge):
    out = str(tmp_path / "result")
    mp.start_processes(_rank_main, args=(str(tmp_path / "init"), diverge, out), nprocs=2, start_method="fork")
    results = {Path(f"{out}.{r}").read_text() for r in range(2)}
    if diverge:
        assert results == {"the mask of b.weight differs between rank 0 and rank 1; masks must be identical on "
                           "every rank (prune once, load the same checkpoint everywhere)"}
    else:
        assert results == {"agree"}


def test_first_divergence_names_the_first_layer_in_name_order():
    same = mask_digests({"x": torch.tensor([True, False])})
    assert first_divergence([same, same]) is None
    other = mask_digests({"x": torch.tensor([True, True])})
    assert first_divergence([same, same, other]) == "the mask of x differs between rank 0 and rank 2"
    assert "is missing" in first_divergence([same, []])


METHOD_CONFIG = textwrap.dedent(
    """\
    name: m
    device: cpu
    model: {arch: tiny_resnet, num_classes: 4}
    data: {dataset: fake, fake_samples: 32, batch_size: 8}
    train: {epochs: 1, lr: 0.01}
    """
)
METHODS = {
    "dsr": ["sparsity.method=dsr", "sparsity.pattern={type: unstructured}", "sparsity.criterion=l1",
            "sparsity.target=0.9", "sparsity.dsr.period=1"],
    "gradual": ["sparsity.method=gradual", "sparsity.pattern={type: unstructured}", "sparsity.criterion=l1",
                "sparsity.target=0.8", "sparsity.gradual.end=1"],
    "gumbel": ["sparsity.method=gumbel", "sparsity.pattern={type: nm}"],
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_mask_changing_methods_under_two_processes_through_nproc(tmp_path, method):
    """`sparsify train --nproc 2` (torch.distributed.run) with masks that change while training."""
    (tmp_path / "m.yaml").write_text(METHOD_CONFIG)
    sets = [arg for item in METHODS[method] for arg in ("--set", item)]
    base = [sys.executable, "-m", "sparsify"]
    for command in (["download"], ["train", "--nproc", "2"]):
        done = subprocess.run(base + command + ["-c", "m.yaml", *sets], cwd=tmp_path, capture_output=True,
                              text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-2000:]
    assert "x 2 processes" in done.stderr
    history = (tmp_path / "runs/m/history.jsonl").read_text().splitlines()
    assert [json.loads(line)["stage"] for line in history] == ["pretrained", "trained"]  # written once
    checked = subprocess.run(base + ["check", "runs/m/checkpoints/001-r00-trained.safetensors",
                                     "--pattern", "2:4" if method == "gumbel" else "unstructured"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr
