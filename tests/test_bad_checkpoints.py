"""Bad inputs and bad output paths for `report`, `export` and `check`: one line, exit 1, nothing written.

One tiny run (download, prune) serves the module; the bad checkpoints are real safetensors files made
from its pruned checkpoint with one thing changed, and the refusals are checked to leave the run
folder byte for byte as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import invoke, tiny_yaml


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(config, run folder, pruned checkpoint) of a tiny run: download, then one prune round."""
    root = tmp_path_factory.mktemp("bad")
    config = root / "tiny.yaml"
    config.write_text(tiny_yaml(runs_dir=str(root / "runs")))
    for command in ("download", "prune"):
        code, out, err = invoke(command, "-c", config)
        assert code == 0, out + err
    folder = root / "runs" / "tiny"
    return config, folder, folder / "checkpoints" / "001-r01-pruned.safetensors"


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and p.name != ".lock"}


def the_error(err: str) -> str:
    """The one line a refused command prints: no traceback, exactly one `error:` line, last."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    return errors[0]


def refused(*args) -> str:
    code, _, err = invoke(*args)
    assert code == 1, err
    return the_error(err)


def tensors_of(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def variant(source: Path, out: Path, *, change=None, meta=None) -> Path:
    """A copy of checkpoint `source` with `change(tensors)` applied and metadata keys replaced (None drops one)."""
    tensors, metadata = tensors_of(source)
    if change:
        change(tensors)
    for key, value in (meta or {}).items():
        if value is None:
            metadata.pop(key)
        else:
            metadata[key] = json.dumps(value)
    save_file(tensors, str(out), metadata=metadata)
    return out


# ---------------------------------------------------------------- output paths that are the run's own files


@pytest.mark.parametrize("where", ["history.jsonl", "metrics.csv", "train-state.safetensors", ".lock",
                                   "checkpoints/report.txt", "checkpoints/001-r01-pruned.safetensors",
                                   "link-to-history", "link-to-checkpoints/x.safetensors"])
@pytest.mark.parametrize("command", ["report", "export"])
def test_an_output_path_among_the_run_files_is_refused(run, tmp_path, command, where):
    config, folder, _ = run
    (tmp_path / "link-to-history").symlink_to(folder / "history.jsonl")
    (tmp_path / "link-to-checkpoints").symlink_to(folder / "checkpoints", target_is_directory=True)
    output = tmp_path / where if where.startswith("link") else folder / where
    before = snapshot(folder)
    args = ("report", folder, "-o", output) if command == "report" else ("export", "-c", config, "-o", output)

    line = refused(*args)

    assert line.startswith(f"error: {'export ' if command == 'export' else ''}-o {output} is ")
    assert line.endswith("(nothing was written)")
    assert snapshot(folder) == before
    assert not (folder / "export").exists()


def test_exporting_over_the_checkpoint_read_is_refused(run, tmp_path):
    config, _, pruned = run
    copy = tmp_path / "copy.safetensors"
    shutil.copyfile(pruned, copy)
    line = refused("export", "-c", config, "--checkpoint", copy, "-o", copy)
    assert line == (f"error: export -o {copy} is the checkpoint being read ({copy}); name another file "
                    "(nothing was written)")
    assert copy.read_bytes() == pruned.read_bytes()


def test_a_plot_folder_inside_checkpoints_is_refused(run):
    _, folder, _ = run
    before = snapshot(folder)
    line = refused("report", folder, "--plot", folder / "checkpoints" / "figures")
    assert "is inside the run's checkpoints/ folder" in line and snapshot(folder) == before


# ---------------------------------------------------------------- output paths that cannot be written


@pytest.mark.parametrize("args", [
    ("export", "-o", "afile/out.safetensors"),
    ("export", "--format", "onnx", "-o", "afile/out.onnx"),
    ("report", "-o", "afile/report.txt"),
    ("report", "--plot", "afile/figures"),
])
def test_an_output_under_a_regular_file_is_one_line(run, tmp_path, monkeypatch, args):
    config, folder, _ = run
    monkeypatch.chdir(tmp_path)
    Path("afile").write_text("a file, not a folder\n")
    target = ("-c", config) if args[0] == "export" else (folder,)
    line = refused(args[0], *target, *args[1:])
    assert line.endswith("cannot be written: afile is a file, not a folder; nothing was written: give a path in "
                         "a folder you can write to")
    assert Path("afile").read_text() == "a file, not a folder\n"


def test_recipes_copy_under_a_regular_file_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("afile").write_text("x\n")
    assert refused("recipes", "copy", "quickstart", "afile/x.yaml") == (
        "error: cannot write afile/x.yaml: afile is a file, not a folder; give a PATH in a folder")
    assert sorted(os.listdir(tmp_path)) == ["afile"]


def without_root_powers() -> list[str]:
    """A command prefix under which this user cannot write into read-only folders (root: its DAC override
    dropped with setpriv); skips the test where that is not possible."""
    if os.geteuid() != 0:
        return []
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
              "--inh-caps=-dac_override,-dac_read_search"]
    if shutil.which("setpriv") is None or subprocess.run([*prefix, "true"], capture_output=True).returncode:
        pytest.skip("root writes into read-only folders and setpriv cannot drop that")
    return prefix


def sparsify(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLCONFIGDIR": str(cwd / ".mpl")}
    return subprocess.run([*without_root_powers(), sys.executable, "-m", "sparsify", *map(str, args)], cwd=cwd,
                          env=env, text=True, capture_output=True, timeout=300)


def test_writing_into_read_only_folders_is_one_line(run, tmp_path):
    config, folder, _ = run
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    before = snapshot(folder)
    folder.chmod(0o555)  # export/ cannot be made in the run folder
    try:
        default = sparsify("export", "-c", config, cwd=tmp_path)
    finally:
        folder.chmod(0o755)
    onnx = sparsify("export", "-c", config, "--format", "onnx", "-o", locked / "sub" / "m.onnx", cwd=tmp_path)
    plots = sparsify("report", folder, "--plot", locked / "figures", cwd=tmp_path)
    locked.chmod(0o755)

    read_only = f"is read-only for this user (make it writable: chmod u+w {{0}}); nothing was written: "
    assert default.returncode == 1 and the_error(default.stderr) == (
        f"error: export to {folder / 'export' / '001-r01-pruned.safetensors'} cannot be written: {folder} "
        + read_only.format(folder) + "give -o PATH in a folder you can write to")
    assert onnx.returncode == 1 and the_error(onnx.stderr) == (
        f"error: export -o {locked / 'sub' / 'm.onnx'} cannot be written: {locked} "
        + read_only.format(locked) + "give a path in a folder you can write to")
    assert plots.returncode == 1 and the_error(plots.stderr).startswith(f"error: --plot {locked / 'figures'} cannot")
    assert os.listdir(locked) == [] and snapshot(folder) == before and not (folder / "export").exists()


def test_export_removes_what_a_killed_export_left(run, tmp_path):
    config, _, _ = run
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(ended.stdout)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    folder = tmp_path / "out"
    folder.mkdir()
    left = folder / f".model.safetensors.{dead}.tmp"
    busy = folder / f".model.safetensors.{alive.pid}.tmp"
    other = [folder / ".notes.tmp", folder / f"notes.{dead}.tmp", folder / "keep.txt"]
    for path in (left, busy, *other):
        path.write_text("partial")
    try:
        code, out, err = invoke("export", "-c", config, "-o", folder / "model.safetensors")
    finally:
        alive.kill()
        alive.wait()
    assert code == 0, err
    assert not left.exists()  # its writer is gone
    assert busy.exists() and all(path.exists() for path in other)  # a live writer's, and files not named so


# ---------------------------------------------------------------- inputs that are not sparsify checkpoints


def test_a_plain_state_dict_is_not_a_sparsify_checkpoint(run, tmp_path):
    config, _, pruned = run
    tensors, _ = tensors_of(pruned)
    state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    plain = tmp_path / "plain.safetensors"
    save_file(state, str(plain))
    pth = tmp_path / "plain.pth"
    torch.save(state, pth)
    for path, why in ((plain, "a plain state dict: its metadata has no sparsify format"),
                      (pth, "a torch.save file, e.g. a plain .pth state dict")):
        expected = (f"error: {path} is not a sparsify checkpoint ({why}); give one that sparsify wrote "
                    "(runs/<name>/checkpoints/*.safetensors: weights, masks and metadata), or check a plain state "
                    "dict with `sparsify check FILE --pattern 2:4|8x8|unstructured`")
        assert refused("report", path) == expected
        assert refused("export", "-c", config, "--checkpoint", path, "-o", tmp_path / "x.safetensors") == expected
        assert refused("check", path) == (f"error: {path}: it is a plain state dict, not a sparsify checkpoint, so "
                                          "there is no pattern to check against; pass --pattern (e.g. 2:4, 8x8, "
                                          "unstructured)")
    assert not (tmp_path / "x.safetensors").exists()


# ---------------------------------------------------------------- checkpoints that do not fit their model


def set_fc(value):
    def change(tensors):
        tensors["model.fc.weight"] = value

    return change


def drop_fc(tensors):
    del tensors["model.fc.weight"]


def add_extra(tensors):
    tensors["model.extra.weight"] = torch.zeros(3)


FIT = [
    ("shape", set_fc(torch.zeros(5, 64)), "fc.weight has shape (5, 64), the model's is (4, 64)"),
    ("missing", drop_fc, "fc.weight is missing (the model has it, shape (4, 64))"),
    ("extra", add_extra, "extra.weight is not a tensor of the model"),
]


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
@pytest.mark.parametrize("case, change, problem", FIT, ids=[case[0] for case in FIT])
def test_export_refuses_a_checkpoint_that_does_not_fit_its_model(run, tmp_path, fmt, case, change, problem):
    config, _, pruned = run
    bad = variant(pruned, tmp_path / f"{case}.safetensors", change=change)
    output = tmp_path / f"model.{fmt}"
    assert refused("export", "-c", config, "--checkpoint", bad, "--format", fmt, "-o", output) == (
        f"error: {bad} does not fit model 'tiny_resnet': {problem}; it was altered or written for another model: "
        "use a checkpoint from the run's checkpoints/ folder")
    assert not output.exists()


# ---------------------------------------------------------------- hand-made bad checkpoints: report and check


def mask_without_weight(tensors):
    tensors["mask.nothere.weight"] = torch.ones(2, 2, dtype=torch.bool)


def mask_on_1d(tensors):
    tensors["mask.bn1.weight"] = torch.ones(16, dtype=torch.bool)


MASK_1D = ("mask 'bn1.weight' is for a 1-D tensor of shape (16,); masks belong to conv and Linear weights "
           "(2 or more dimensions)")
NOT_SPARSIFY = "it was not written by sparsify or was altered: use a checkpoint from the run's checkpoints/ folder"
BAD = [  # (name, change, meta, report's line after the path, check's reason after the path)
    ("mask-without-weight", mask_without_weight, None,
     ": mask 'nothere.weight' has no weight of that name in the checkpoint; it was altered: use a checkpoint "
     "from the run's checkpoints/",
     None),
    ("mask-on-1d", mask_on_1d, None,
     f": {MASK_1D}; it was altered: use a checkpoint from the run's checkpoints/", None),
    ("no-arch", None, {"arch": None},
     f" has no model arch in its metadata (found None; a checkpoint sparsify writes names one); {NOT_SPARSIFY}",
     ": the checkpoint has no model arch in its metadata (found None; a checkpoint sparsify writes names one)"),
    ("no-fc", drop_fc, None,
     " does not fit model 'tiny_resnet': fc.weight is missing (the model has it, shape (4, 64)); it was altered "
     "or written for another model: use a checkpoint from the run's checkpoints/ folder",
     ": the checkpoint does not fit model 'tiny_resnet': fc.weight is missing (the model has it, shape (4, 64))"),
    ("num-classes", None, {"num_classes": -1},
     f" has num_classes -1 in its metadata; a model needs a whole number of at least 1; {NOT_SPARSIFY}",
     ": the checkpoint has num_classes -1 in its metadata; a model needs a whole number of at least 1"),
]
CHECK_LAYER = {"mask-without-weight": "nothere.weight does not follow block 8x8: mask 'nothere.weight' has no "
                                      "weight of that name in the checkpoint",
               "mask-on-1d": f"bn1.weight does not follow block 8x8: {MASK_1D}"}


@pytest.mark.parametrize("name, change, meta, report_line, check_line", BAD, ids=[case[0] for case in BAD])
def test_a_hand_made_bad_checkpoint_is_one_line_for_report_and_a_failed_check(run, tmp_path, name, change, meta,
                                                                             report_line, check_line):
    _, _, pruned = run
    bad = variant(pruned, tmp_path / f"{name}.safetensors", change=change, meta=meta)

    assert refused("report", bad) == f"error: {bad}{report_line}"
    assert refused("report", bad, "-o", tmp_path / "r.txt") == f"error: {bad}{report_line}"
    assert not (tmp_path / "r.txt").exists()

    code, out, err = invoke("check", bad)
    assert code == 1
    assert the_error(err) == (f"error: {CHECK_LAYER[name]}" if check_line is None else f"error: {bad}{check_line}")
    assert "does NOT follow block 8x8" in out.splitlines()[-1]


def test_check_fails_on_nan_or_inf_in_a_kept_weight(run, tmp_path):
    _, _, pruned = run

    def poison(tensors):
        fc = tensors["model.fc.weight"].clone()
        fc[0, 0] = float("nan")
        tensors["model.fc.weight"] = fc
        conv = tensors["model.layer1.0.conv1.weight"].clone()
        kept = tensors["mask.layer1.0.conv1.weight"].nonzero()[0].tolist()  # a kept 8x8 block
        conv[kept[0] * 8, kept[1] * 8, 0, 0] = float("inf")
        tensors["model.layer1.0.conv1.weight"] = conv

    bad = variant(pruned, tmp_path / "nan.safetensors", change=poison)
    code, out, err = invoke("check", bad)
    assert code == 1
    assert the_error(err) == f"error: {bad}: fc.weight holds NaN or inf"
    assert "  layer1.0.conv1.weight [16x16x3x3] sparsity 50.00% (target 50.00%) VIOLATES: holds NaN or inf" in out
    assert "  VIOLATES: fc.weight holds NaN or inf" in out
    result = json.loads(invoke("check", bad, "--format", "json")[1])
    assert not result["follows"] and result["problems"] == ["fc.weight holds NaN or inf"]


def test_check_of_a_good_checkpoint_says_its_tensors_fit_the_model(run):
    _, _, pruned = run
    code, out, err = invoke("check", pruned)
    assert code == 0, err
    assert "model: every tensor fits tiny_resnet" in out and "follows block 8x8" in out.splitlines()[-1]


def test_a_checkpoint_whose_header_length_starts_with_a_pickle_byte_is_read_as_one(tmp_path):
    import struct

    import torch

    from sparsify.io.checkpoint import parse_checkpoint, save_checkpoint

    path = tmp_path / "c.safetensors"
    for pad in range(256):  # the header length's low byte 0x80, the first byte of a pickle
        save_checkpoint(path, {"w": torch.ones(2)}, {}, {"round": 0, "pad": "x" * pad})
        if struct.unpack("<Q", path.read_bytes()[:8])[0] & 0xFF == 0x80:
            break
    assert path.read_bytes()[:1] == b"\x80"
    assert parse_checkpoint(path).meta["round"] == 0
