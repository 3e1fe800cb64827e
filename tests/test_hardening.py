"""Inputs a user can get wrong: one line on stderr, exit 1, no traceback, nothing written."""

from __future__ import annotations

import pytest

from conftest import invoke


def refused(*args) -> str:
    code, _, err = invoke(*args)
    assert code == 1 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_a_config_that_is_not_utf8_text(workdir):
    (workdir / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert "is not UTF-8 text (byte 0xe9 at offset 9)" in refused("download", "-c", "latin1.yaml")
    (workdir / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    assert "is not UTF-8 text" in refused("download", "-c", "binary.yaml")
    assert not (workdir / "runs").exists()


@pytest.mark.parametrize("override, expected", [
    ("seed=100000000000000000000000000", "config key 'seed': Input should be less than 9223372036854775808"),
    ("seed=-1", "config key 'seed': Input should be greater than or equal to 0"),
    ("name=" + "a" * 300, "name is 300 characters; at most 128"),
])
def test_numbers_and_names_out_of_range(workdir, override, expected):
    assert expected in refused("download", "-c", "tiny.yaml", "--set", override)
    assert not (workdir / "runs").exists()


def test_runs_dir_that_is_a_file(workdir):
    (workdir / "taken").write_text("not a folder")
    err = refused("download", "-c", "tiny.yaml", "--set", "runs_dir=taken/deeper")
    assert "cannot make run folder taken/deeper/tiny: taken is a file" in err
    assert (workdir / "taken").read_text() == "not a folder"


def test_export_to_a_directory(workdir):
    assert invoke("download", "-c", "tiny.yaml")[0] == 0
    (workdir / "out").mkdir()
    assert "export -o out is a directory; name the file to write" in refused("export", "-c", "tiny.yaml", "-o", "out")
    assert list((workdir / "out").iterdir()) == []


@pytest.mark.parametrize("fraction", ["0.0001", "0.9999"])
def test_digits_validation_share_the_data_cannot_satisfy(workdir, fraction):
    err = refused("download", "-c", "tiny.yaml", "--set", "data.dataset=digits", "--set", "model.num_classes=10",
                  "--set", f"data.val_fraction={fraction}")
    assert f"data.val_fraction {fraction} leaves a split without every class" in err
    assert not (workdir / "runs").exists()


@pytest.mark.parametrize("device, expected", [
    ("mps", "device 'mps' was asked for but Apple's Metal backend is not available here"),
    ("cuda:3", "device 'cuda:3' was asked for but"),
])
def test_a_device_that_is_not_there(workdir, device, expected):
    import torch

    if device.startswith("cuda") and torch.cuda.device_count() > 3:
        pytest.skip("this machine has that GPU")
    assert expected in refused("download", "-c", "tiny.yaml", "--set", f"device={device}")
    assert not (workdir / "runs").exists()


@pytest.mark.parametrize("factory, expected", [
    ("build_without_classes", "the factory takes no num_classes argument"),
    ("build_empty", "has no trainable parameters"),
])
def test_a_model_factory_that_cannot_serve(workdir, monkeypatch, factory, expected):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    err = refused("download", "-c", "tiny.yaml", "--set", f"model.arch=factory_model:{factory}")
    assert expected in err and not (workdir / "runs/tiny/checkpoints").exists()


def test_report_reads_what_it_can_of_damaged_side_files(workdir):
    for command in ("download", "prune", "train"):
        assert invoke(command, "-c", "tiny.yaml")[0] == 0
    run = workdir / "runs/tiny"
    with open(run / "history.jsonl", "a") as f:
        f.write("{not json\n")
    with open(run / "metrics.csv", "ab") as f:
        f.write(b"\x00\xff garbage,,\n")
    code, out, err = invoke("report", "-c", "tiny.yaml")
    assert code == 0, err
    assert "history.jsonl line 4 is not a JSON object" in out and "metrics.csv line" in out
    assert "final:" in out.strip().splitlines()[-1]
    code, _, err = invoke("prune", "-c", "tiny.yaml")  # a stage still refuses to append to a damaged history
    assert code == 1 and "history.jsonl line 4 is not a JSON object; fix or remove that line" in err


@pytest.mark.parametrize("arch, size, expected", [
    ("lenet5", 8, "model 'lenet5' cannot take 8 px images (Calculated padded input size"),
    ("squeezenet1_0", 8, "model 'squeezenet1_0' cannot take 8 px images"),
])
def test_an_input_size_the_architecture_cannot_take(workdir, arch, size, expected):
    err = refused("download", "-c", "tiny.yaml", "--set", f"model.arch={arch}", "--set", f"model.input_size={size}",
                  "--set", "data.dataset=digits", "--set", "model.num_classes=10")
    assert expected in err and "the smallest size that works is" in err
    assert not (workdir / "runs").exists()


@pytest.mark.parametrize("override, expected", [
    ("model.input_size=100000", "config key 'model.input_size': Input should be less than or equal to 4096"),
    ("data.fake_samples=1000000000000", "config key 'data.fake_samples': Input should be less than or equal to"),
])
def test_sizes_no_machine_can_afford(workdir, override, expected):
    assert expected in refused("download", "-c", "tiny.yaml", "--set", override)
