"""Messages that say what is true, through the real CLI: an unexpected exception is one line (its
traceback under --debug), a damaged image names its file, a read-only run folder is refused before
anything changes, paths that exist but are folders are not called missing, a text file is not
called a truncated checkpoint, a damaged train-state is set aside, and config sections are named
by their YAML keys."""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import invoke

TESTS = Path(__file__).parent
NO_DEBUG = {"SPARSIFY_DEBUG": None}
IMAGEFOLDER = ["--set", "data.dataset=imagefolder", "--set", "data.root=img", "--set", "model.num_classes=null",
               "--set", "model.input_size=16"]


def error_line(err: str) -> str:
    """The one `error:` line of a failed command (progress lines may come before it), no traceback."""
    assert "Traceback" not in err, err
    errors = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    return errors[0]


def refused(*args, env=None) -> str:
    """A command that fails before any progress line: exit 1 and exactly one line on stderr."""
    code, _, err = invoke(*args, env=env)
    assert code == 1, err
    assert len(err.strip().splitlines()) == 1, err
    return error_line(err)


def files_of(root: Path) -> dict[str, bytes]:
    """Every file under `root` but the lock (its holder line changes with each command)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


# ---------------------------------------------------------------- unexpected exceptions


def test_an_unexpected_exception_is_one_line_and_its_traceback_is_one_flag_away(workdir, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    args = ["download", "-c", "tiny.yaml", "--set", "model.arch=factory_model:build_broken"]
    line = refused(*args, env=NO_DEBUG)
    assert re.fullmatch(r"error: ValueError: no layout for 4 classes \(raised in factory_model\.py:\d+ \(build_broken\), "
                        r"code outside sparsify: a model factory, plugin or dataset of yours; rerun with --debug or "
                        r"SPARSIFY_DEBUG=1 for the traceback\)", line), line
    from sparsify.cli import app

    for flags, env in ((["--debug"], NO_DEBUG), ([], {"SPARSIFY_DEBUG": "1"})):
        result = CliRunner().invoke(app, [*flags, *args], env=env)
        assert result.exit_code == 1 and isinstance(result.exception, ValueError)
        assert "bug in sparsify" not in result.stderr
    assert not (workdir / "runs/tiny/checkpoints").exists()


def test_an_exception_is_called_a_bug_in_sparsify_only_when_sparsify_raised_it():
    import torch

    from sparsify.cli_errors import raised_in_user_code, unexpected_line
    from sparsify.errors import path_problem

    def caught(func, *args):
        try:
            func(*args)
        except Exception as exc:
            return exc
        raise AssertionError("no exception")

    inside = caught(path_problem, None)  # TypeError from os.path, called by sparsify: sparsify's bug
    assert raised_in_user_code(inside) is None and "this is a bug in sparsify" in unexpected_line(inside)

    def users_factory():
        return torch.nn.Conv2d(3, 8, kernel_size=-1)  # torch raises; the last frame outside torch is this one

    outside = caught(users_factory)
    assert re.fullmatch(r"test_messages\.py:\d+ \(users_factory\)", raised_in_user_code(outside))
    assert "bug in sparsify" not in unexpected_line(outside)
    assert raised_in_user_code(ValueError("never raised")) is None


def test_debug_prints_the_traceback_from_the_command_line(workdir):
    env = {k: v for k, v in os.environ.items() if k != "SPARSIFY_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-m", "sparsify", "--debug", "download", "-c", "tiny.yaml", "--set",
                           "model.arch=factory_model:build_broken"], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr and "factory_model.py" in done.stderr
    assert done.stderr.strip().splitlines()[-1] == "ValueError: no layout for 4 classes"


def test_running_out_of_memory_is_not_called_a_bug():
    import torch

    from sparsify.cli_errors import unexpected_line

    with pytest.raises(RuntimeError) as info:  # the CPU allocator's refusal, without touching that memory
        torch.empty(2**62, dtype=torch.uint8)
    line = unexpected_line(info.value)
    assert line.startswith("out of memory (RuntimeError: ") and "can't allocate memory" in line
    assert line.endswith("; lower data.batch_size (or model.input_size, data.workers) and run the command again")
    assert unexpected_line(MemoryError()) == ("out of memory (MemoryError); lower data.batch_size (or "
                                              "model.input_size, data.workers) and run the command again")


def test_worker_exceptions_are_unwrapped_to_their_own_message():
    from sparsify.errors import DataError, original_message

    wrapped = ("Caught DataError in DataLoader worker process 3.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 1, in f\nsparsify.errors.DataError: cannot decode image a.png (x); remove it\n')
    assert str(DataError(wrapped)) == "cannot decode image a.png (x); remove it"
    assert original_message("Caught KeyError in pin memory thread for device 0.\nOriginal Traceback (most "
                            "recent call last):\n  File ...\nKeyError: 'w'\n", KeyError) == "'w'"
    assert original_message("plain message", ValueError) == "plain message"


# ---------------------------------------------------------------- damaged images


def write_png_tree(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / split / name / f"{i}.png")


def damaged_png(good: bytes, how: str) -> bytes:
    if how == "garbage":
        return b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 2
    if how == "truncated":
        return good[: len(good) // 2]
    data = bytearray(good)  # one flipped byte inside the image data: torchvision.io's decode_png crashes on it
    data[good.index(b"IDAT") + 20] ^= 0xFF
    return bytes(data)


@pytest.mark.parametrize("how, reason, workers, decoder", [
    ("garbage", "not an image format PIL can read", 0, "auto"),
    ("garbage", "not an image format PIL can read", 1, "pil"),
    ("truncated", "image file is truncated", 1, "auto"),
    ("bit-flip", "broken data stream when reading image file", 0, "torchvision"),
])
def test_a_damaged_image_stops_the_stage_naming_the_file(workdir, how, reason, workers, decoder):
    write_png_tree(workdir / "img")
    args = ["-c", "tiny.yaml", *IMAGEFOLDER, "--set", f"data.workers={workers}", "--set", f"data.decoder={decoder}"]
    assert invoke("download", *args)[0] == 0
    bad = workdir / "img/train/dog/2.png"
    good = bad.read_bytes()
    bad.write_bytes(damaged_png(good, how))
    run = workdir / "runs/tiny"
    before = files_of(run)
    code, _, err = invoke("train", *args)
    assert code == 1
    assert error_line(err) == (f"error: cannot decode image img/train/dog/2.png ({reason}); remove that file or "
                               "replace it with an intact image, then run the command again")
    assert files_of(run) == before
    bad.write_bytes(good)
    assert invoke("train", *args)[0] == 0


# ---------------------------------------------------------------- a read-only run folder


def drop_file_permission_override() -> None:
    """preexec_fn for root: CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH leave the bounding set, so the command
    it executes obeys file modes as any user does."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def as_a_user(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """A command that file modes apply to: this user, or root without its override of them."""
    preexec = drop_file_permission_override if os.geteuid() == 0 else None
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=120, preexec_fn=preexec)


def test_a_read_only_run_folder_is_refused_before_anything_changes(workdir):
    assert invoke("download", "-c", "tiny.yaml")[0] == 0
    run = workdir / "runs/tiny"
    before = files_of(run)
    run.chmod(0o555)
    try:
        probe = as_a_user(sys.executable, "-c", f"import os; print(os.access({str(run)!r}, os.W_OK))", cwd=workdir)
        if probe.stdout.strip() != "False":
            pytest.skip(f"file modes cannot be made to apply here ({probe.stdout.strip()} {probe.stderr.strip()})")
        for command in (["prune"], ["download", "--force"]):
            done = as_a_user(sys.executable, "-m", "sparsify", *command, "-c", "tiny.yaml", cwd=workdir)
            assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
            assert done.stderr.strip() == ("error: run folder runs/tiny is read-only for this user; nothing was "
                                           "changed: make it writable (chmod u+w runs/tiny) and run the command again")
    finally:
        run.chmod(0o755)
    assert files_of(run) == before
    assert invoke("prune", "-c", "tiny.yaml")[0] == 0


# ---------------------------------------------------------------- paths that exist


def test_folders_and_files_are_not_called_missing(workdir):
    (workdir / "configs/sub").mkdir(parents=True)
    (workdir / "notes.txt").write_text("hello world, these are notes\n")
    assert refused("config", "-c", "configs/sub") == (
        "error: config file 'configs/sub' is a folder, not a file; pass -c PATH to a YAML file or a shipped "
        "recipe's name (`sparsify recipes` lists them)")
    assert invoke("download", "-c", "tiny.yaml")[0] == 0
    latest = "runs/tiny/checkpoints/000-r00-pretrained.safetensors"
    assert refused("check", "runs/tiny") == (
        f"error: runs/tiny is a folder, not a file; pass a checkpoint or a state dict file, e.g. {latest}")
    assert refused("export", "-c", "tiny.yaml", "--checkpoint", "configs") == (
        f"error: export --checkpoint configs is a folder, not a file; name a checkpoint file, e.g. --checkpoint {latest}")
    assert refused("download", "-c", "tiny.yaml", "--force", "--set", "data.dataset=imagefolder", "--set",
                   "data.root=notes.txt", "--set", "model.num_classes=null").startswith(
        "error: data.root 'notes.txt' is a file, not a folder; imagefolder expects root/train/<class>/<image>")
    assert refused("download", "-c", "tiny.yaml", "--force", "--set", "data.dataset=fashion-mnist", "--set",
                   "data.root=notes.txt", "--set", "model.num_classes=null").startswith(
        "error: fashion-mnist data.root notes.txt is a file, not a folder; it must be the folder holding")
    assert not (workdir / "runs/tiny/export").exists()


def test_a_text_file_is_not_called_a_truncated_checkpoint(workdir):
    for name in ("notes.safetensors", "notes.pth"):
        (workdir / name).write_text("hello world, these are notes\n")
    not_safetensors = ("error: notes.safetensors is not a safetensors file (it starts with b'hello wo', not a header "
                       "size and a JSON header)")
    assert refused("check", "notes.safetensors") == not_safetensors
    assert refused("report", "notes.safetensors") == not_safetensors
    not_torch_save = ("error: weights file notes.pth was not written by torch.save (it starts with b'hell', not a "
                      "zip archive or a pickle); save model.state_dict() with torch.save, or use a .safetensors file")
    assert refused("check", "notes.pth") == not_torch_save
    assert refused("download", "-c", "tiny.yaml", "--set", "model.weights=notes.pth") == not_torch_save
    assert not (workdir / "runs").exists()


def test_a_damaged_train_state_is_set_aside_and_the_stage_starts_again(workdir):
    for command in ("download", "prune"):
        assert invoke(command, "-c", "tiny.yaml")[0] == 0
    state = workdir / "runs/tiny/train-state.safetensors"
    state.write_text("not a train-state\n")
    code, out, err = invoke("train", "-c", "tiny.yaml")
    assert code == 0, err
    assert ("warning: runs/tiny/train-state.safetensors is not a safetensors file (it starts with b'not a tr', not a "
            "header size and a JSON header); moved it to train-state.safetensors.damaged (remove it when you no "
            "longer need it), so this stage starts from its beginning") in err
    assert "round 1 trained" in out and not state.exists()
    assert (workdir / "runs/tiny/train-state.safetensors.damaged").read_text() == "not a train-state\n"


# ---------------------------------------------------------------- config messages


@pytest.mark.parametrize("override, expected", [
    ("train=5", "error: config key 'train' is a section: give it a mapping with the keys epochs, optimizer, lr,"),
    ("sparsity.permute=5", "error: config key 'sparsity.permute' is a section: give it a mapping with the keys "
                           "enabled,"),
    ("sparsity.dsr=3", "error: config key 'sparsity.dsr' is a section: give it a mapping with the keys prune_count,"),
    ("train.ema=[1]", "error: config key 'train.ema' is a section: give it a mapping with the keys decay, every "
                      "(got [1])"),
])
def test_a_value_where_a_section_belongs_names_the_yaml_key_and_its_keys(workdir, override, expected):
    line = refused("config", "-c", "tiny.yaml", "--set", override)
    assert line.startswith(expected) and "Config" not in line and "Options" not in line


@pytest.mark.parametrize("overrides, expected", [
    (["train.lr_schedule=step", "train.lr_gamma=1e308", "train.lr_steps=[1]"],
     "error: config key 'train.lr_gamma': 1e+308 at each of train.lr_steps [1] takes train.lr 0.01 to 1e306, "
     "above 10; use a decay (lr_gamma below 1)"),
    (["train.weight_decay=1e308"],
     "error: config key 'train.weight_decay': Input should be less than or equal to 1 (got 1e+308)"),
])
def test_numbers_that_would_overflow_the_optimizer_are_config_errors(workdir, overrides, expected):
    sets = [item for override in overrides for item in ("--set", override)]
    assert refused("train", "-c", "tiny.yaml", *sets, env=NO_DEBUG) == expected
    assert not (workdir / "runs").exists()
