"""train.threads / --threads: validation, the `auto` rule, and the count reaching torch and the checkpoints."""

import json
import os

import pytest
import torch

from sparsify.io.checkpoint import load_checkpoint
from conftest import invoke
from sparsify.config import load_config
from sparsify.errors import ConfigError
from sparsify.threads import apply_threads, auto_threads, cgroup_quota, env_threads, resolve_threads, usable_cpus

@pytest.fixture(autouse=True)
def keep_torch_threads():
    """Commands set torch's thread count for the whole process; give the next test the old one."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("1", 1), ("3", 3)])
def test_train_threads_accepts_auto_and_positive_integers(value, expected):
    assert load_config(None).train.threads == "auto"
    assert load_config(None, [f"train.threads={value}"]).train.threads == expected


@pytest.mark.parametrize("value", ["0", "-1", "many", "1.5", "true"])
def test_train_threads_refuses_other_values_in_one_line(value):
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"train.threads={value}"])
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("config key 'train.threads': must be auto or an integer >= 1")


def test_threads_option_refuses_zero_with_one_line(workdir):
    code, out, err = invoke("download", "-c", "tiny.yaml", "--threads", "0")
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and "train.threads" in err
    assert not (workdir / "runs/tiny").exists()


def test_auto_rule_on_given_values():
    assert auto_threads(env={}, cpus=2) == 1
    assert auto_threads(env={}, cpus=16) == 15
    assert auto_threads(env={}, cpus=1) == 1
    assert auto_threads(env={"OMP_NUM_THREADS": "1"}, cpus=16) == 1  # torchrun's setting wins
    assert auto_threads(env={"OMP_NUM_THREADS": "4"}, cpus=2) == 4  # the user's, even above the cores
    assert auto_threads(env={"OMP_NUM_THREADS": "100000"}, cpus=2) == 1024  # but never past MAX_THREADS
    for ignored in ("", "0", "-2", "four", "4,2"):  # not a plain count: the CPU rule applies
        assert env_threads({"OMP_NUM_THREADS": ignored}) is None
        assert auto_threads(env={"OMP_NUM_THREADS": ignored}, cpus=8) == 7
    assert resolve_threads(3, env={"OMP_NUM_THREADS": "1"}, cpus=2) == 3  # a number is taken as given
    assert resolve_threads("auto", env={}, cpus=4) == 3
    with pytest.raises(ValueError):
        resolve_threads(0, env={}, cpus=4)


def test_cgroup_quota_text():
    assert cgroup_quota(cpu_max="max 100000\n") is None
    assert cgroup_quota(cpu_max="200000 100000\n") == 2.0
    assert cgroup_quota(cpu_max="150000 100000") == 1.5
    assert cgroup_quota(cfs=("-1\n", "100000\n")) is None
    assert cgroup_quota(cfs=("50000", "100000")) == 0.5
    assert cgroup_quota(cpu_max="garbage") is None


def test_usable_cpus_within_affinity():
    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))


def test_auto_follows_omp_num_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert apply_threads("auto") == 1 and torch.get_num_threads() == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert apply_threads("auto") == max(1, usable_cpus() - 1) == torch.get_num_threads()


def checkpoint_threads(workdir) -> dict:
    return {path.name: load_checkpoint(path).meta["threads"]
            for path in sorted((workdir / "runs/tiny/checkpoints").iterdir())}


def test_threads_option_reaches_torch_and_the_checkpoints(workdir):
    assert invoke("download", "-c", "tiny.yaml", "--threads", "2")[0] == 0
    assert torch.get_num_threads() == 2
    assert invoke("prune", "-c", "tiny.yaml", "--threads", "1")[0] == 0
    code, _, err = invoke("train", "-c", "tiny.yaml", "--epochs", "1", "--threads", "1")
    assert code == 0 and "1 CPU thread(s)" in err
    assert torch.get_num_threads() == 1
    assert checkpoint_threads(workdir) == {"000-r00-pretrained.safetensors": 2, "001-r01-pruned.safetensors": 1,
                                           "002-r01-trained.safetensors": 1}
    assert "threads: 1" in (workdir / "runs/tiny/config.yaml").read_text()
    # without --threads, train.threads from the file (here the default, auto) decides
    torch.set_num_threads(3)
    assert invoke("eval", "-c", "tiny.yaml")[0] == 0
    assert torch.get_num_threads() == apply_threads("auto")
    history = [json.loads(line) for line in (workdir / "runs/tiny/history.jsonl").read_text().splitlines()]
    assert [h["stage"] for h in history] == ["pretrained", "pruned", "trained", "eval"]
