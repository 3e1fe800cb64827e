"""Config input that used to pass silently or fail badly: repeated YAML keys, alias bombs and huge
values, a config that contradicts the run's checkpoint, a thread count no machine can start, layer
globs in a dotted --set, `~` in paths, an empty -c, text YAML reads as a number, unordered lr_steps,
and where `export --checkpoint` writes without a config. Each bad input is one line and exit 1."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import invoke
from sparsify.cli_config import with_threads
from sparsify.config import load_config
from sparsify.errors import ConfigError, SparsifyError, shown
from sparsify.threads import MAX_THREADS, thread_setting


def refused(*args) -> str:
    """A command that fails before any progress line: exit 1, one line on stderr, no traceback."""
    code, out, err = invoke(*args, env={"SPARSIFY_DEBUG": None})
    assert code == 1 and out == "", (code, out, err)
    lines = [line for line in err.strip().splitlines() if not line.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def ok(*args) -> str:
    code, out, err = invoke(*args)
    assert code == 0, err
    return out


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def config_error(path=None, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------- repeated keys


def test_a_repeated_top_level_key_is_refused_with_both_lines(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("dup.yaml").write_text("name: a\nseed: 1\nname: b\n")
    assert refused("config", "-c", "dup.yaml") == (
        "error: dup.yaml: key 'name' is given twice, on lines 1 and 3; YAML would keep only the last one, "
        "so delete the one you do not mean")


@pytest.mark.parametrize("text, key, lines", [
    ("train:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n", "train.lr", (2, 4)),
    ("sparsity:\n  layers:\n    'layer1.*': 0.5\n    'layer2.*': 0.6\n    'layer1.*': 0.7\n",
     "sparsity.layers.layer1.*", (3, 5)),
    ("sparsity:\n  pattern: {type: nm, n: 2, m: 4, n: 1}\n", "sparsity.pattern.n", (2, 2)),
    ("x:\n  - {a: 1}\n  - {a: 1, b: 2,\n     a: 3}\n", "x[1].a", (3, 4)),
])
def test_a_repeated_key_at_any_depth_names_its_path_and_lines(tmp_path, text, key, lines):
    (tmp_path / "dup.yaml").write_text(text)
    message = config_error(tmp_path / "dup.yaml")
    assert f"key {key!r} is given twice, on lines {lines[0]} and {lines[1]}" in message, message


def test_a_repeated_key_inside_a_set_value_is_refused():
    assert "key 'type' is given twice" in config_error(None, ["sparsity.pattern={type: nm, type: block}"])


def test_merge_keys_may_still_override_what_they_merge(tmp_path):
    (tmp_path / "merge.yaml").write_text("train:\n  <<: {lr: 0.1, epochs: 2}\n  lr: 0.2\n")
    train = load_config(tmp_path / "merge.yaml").train
    assert (train.lr, train.epochs) == (0.2, 2)


# ---------------------------------------------------------------- alias bombs and huge values


def alias_bomb(levels: int, *, width: int = 100, key: str = "name") -> str:
    """`levels` anchors, each a list of 9 aliases of the one before: 9**levels copies of a `width`-character text."""
    lines = [f'a0: &a0 "{"x" * width}"']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join([*lines, f"{key}: *a{levels}"]) + "\n"


def test_aliases_that_expand_to_megabytes_are_refused_in_one_short_line(tmp_path):
    (tmp_path / "bomb.yaml").write_text(alias_bomb(5))  # 59,049 copies: 6 MB once written out
    message = config_error(tmp_path / "bomb.yaml")
    assert len(message) < 400, message[:400]
    assert "expands to more than 1,000,000 characters once its aliases (*name) are written out" in message


def test_a_billion_laughs_is_refused_quickly_and_in_little_memory(tmp_path):
    (tmp_path / "bomb.yaml").write_text(alias_bomb(9))  # 387 million copies of 100 characters

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # torch maps about 3 GiB

    done = subprocess.run([sys.executable, "-m", "sparsify", "config", "-c", "bomb.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, preexec_fn=limit_memory,
                          env={**os.environ, "SPARSIFY_DEBUG": "0"})
    assert done.returncode == 1 and done.stdout == "", done.stderr[-500:]
    assert done.stderr.startswith("error: bomb.yaml: key 'a5' (line 6) expands to more than 1,000,000 characters")
    assert len(done.stderr.splitlines()) == 1


def test_an_alias_inside_its_own_value_is_refused(tmp_path):
    (tmp_path / "loop.yaml").write_text("sparsity:\n  exclude: &e [a, *e]\n")
    message = config_error(tmp_path / "loop.yaml")
    assert "key 'sparsity.exclude[1]' (line 2) is an alias of a value that holds it" in message, message


def test_aliases_of_modest_size_still_work(tmp_path):
    (tmp_path / "ok.yaml").write_text("sparsity:\n  exclude: &g ['fc.*', 'layer4.*']\nactivations:\n  sites: *g\n")
    config = load_config(tmp_path / "ok.yaml")
    assert config.sparsity.exclude == config.activations.sites == ["fc.*", "layer4.*"]


def test_error_lines_show_only_the_start_of_a_long_value(tmp_path):
    (tmp_path / "long.yaml").write_text(f"seed: \"{'7' * 100_000}\"\nsparsity:\n  method: {'m' * 100_000}\n")
    message = config_error(tmp_path / "long.yaml")
    assert len(message) < 300 and "…" in message, message[:300]
    assert len(config_error(None, [f"plugins={'p' * 100_000}"])) < 300
    assert len(config_error(None, [f"sparsity.method={'m' * 100_000}"])) < 400


def test_shown_cuts_a_repr_after_80_characters_without_building_it_whole():
    assert shown("abc") == "'abc'" and shown({"a": [1, 2]}) == "{'a': [1, 2]}" and shown(1000.0) == "1000.0"
    assert shown("x" * 1000) == "'" + "x" * 79 + "…"
    nested: list = ["y" * 100]
    for _ in range(30):  # 9**30 items if it were written out
        nested = [nested] * 9
    assert len(shown(nested)) == 81


def test_a_number_too_long_for_python_is_one_line(tmp_path):
    (tmp_path / "big.yaml").write_text(f"seed: {'1' * 5000}\n")
    assert "holds a value YAML cannot convert (Exceeds the limit (4300 digits)" in config_error(tmp_path / "big.yaml")


# ---------------------------------------------------------------- the config against the run's checkpoint


def test_stages_refuse_a_model_that_contradicts_the_checkpoint(workdir):
    ok("download", "-c", "tiny.yaml")
    before = files_of(workdir / "runs")
    assert refused("train", "-c", "tiny.yaml", "--set", "model.num_classes=1") == (
        "error: run 'tiny' holds a model with 4 classes but the config says model.num_classes 1; drop the --set or "
        "set model.num_classes: 4 (or null), or use another run (another name:)")
    assert refused("eval", "-c", "tiny.yaml", "--set", "model.arch=small_resnet") == (
        "error: run 'tiny' holds model 'tiny_resnet' but the config says 'small_resnet'; drop the --set or set "
        "model.arch: tiny_resnet, or use another run (another name:)")
    for command in ("eval", "prune", "sensitivity"):
        assert "holds a model with 4 classes" in refused(command, "-c", "tiny.yaml", "--set", "model.num_classes=3")
    assert files_of(workdir / "runs") == before
    assert "top-1" in ok("eval", "-c", "tiny.yaml", "--set", "model.num_classes=null")


# ---------------------------------------------------------------- threads


def test_a_thread_count_no_machine_can_start_is_refused(workdir):
    # through `config` and load_config only: a stage that let 100000 through would start that many threads here
    assert refused("config", "-c", "tiny.yaml", "--set", "train.threads=100000") == (
        f"error: config key 'train.threads': must be auto or an integer >= 1 and at most {MAX_THREADS} (torch CPU "
        "threads; those beyond the CPUs only wait for each other), e.g. threads: 1 (got 100000)")
    assert "at most 1024" in config_error("tiny.yaml", with_threads(None, "100000"))  # what --threads 100000 gives
    assert load_config(None, [f"train.threads={MAX_THREADS}"]).train.threads == MAX_THREADS
    assert "at most 1024" in config_error(None, [f"train.threads={MAX_THREADS + 1}"])
    with pytest.raises(SparsifyError, match="not auto or an integer from 1 to 1024"):
        thread_setting("100000")  # bench without a config


# ---------------------------------------------------------------- smaller stumbles


def test_a_dotted_layer_glob_in_set_points_to_the_mapping_form():
    message = config_error(None, ["sparsity.layers.layer3.*=0.7"])
    assert message == ("--set sparsity.layers.layer3.*: the dots of a layer glob would be read as sections; give "
                       "the mapping instead: --set 'sparsity.layers={\"layer3.*\": 0.7}' (it replaces the config's "
                       "sparsity.layers, so list every glob you want, in order)")
    assert load_config(None, ['sparsity.layers={"layer3.*": 0.7}']).sparsity.layers == {"layer3.*": 0.7}
    assert load_config(None, ["sparsity.layers.fc=0.5"]).sparsity.layers == {"fc": 0.5}  # no dots: as before


def test_a_leading_tilde_is_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "mine.yaml").write_text("name: mine\nruns_dir: ~/runs\ndata: {root: ~/data}\n"
                                        "model: {weights: ~/w.safetensors}\n"
                                        "train: {distill: {teacher: ~/t.safetensors}}\n")
    config = load_config("~/mine.yaml")
    assert config.run_dir == tmp_path / "runs" / "mine"
    assert config.data.root == str(tmp_path / "data")
    assert config.model.weights == str(tmp_path / "w.safetensors")
    assert config.train.distill.teacher == str(tmp_path / "t.safetensors")
    assert load_config(None, ["model.weights=DEFAULT"]).model.weights == "DEFAULT"


def test_an_empty_config_path_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    expected = ("error: the config path is empty (-c ''); give -c PATH to a YAML file or a shipped recipe's name, "
                "or leave -c out for the built-in defaults")
    assert refused("config", "-c", "") == expected
    assert refused("config", "--config=") == expected
    assert refused("train", "-c", "", "--nproc", "2") == expected


@pytest.mark.parametrize("text, got", [("001", "1"), ("1e3", "1000.0"), ("0x1f", "31")])
def test_a_run_name_yaml_reads_as_a_number_says_to_quote_it(tmp_path, text, got):
    (tmp_path / "n.yaml").write_text(f"name: {text}\n")
    assert config_error(tmp_path / "n.yaml") == (
        "config key 'name': must be text, but YAML read the unquoted value as a number; put it in quotes as you "
        f"wrote it, e.g. name: \"001\" (on the command line --set 'name=\"001\"') (got {got})")
    (tmp_path / "n.yaml").write_text(f"name: '{text}'\n")
    assert load_config(tmp_path / "n.yaml").name == text


def test_a_boolean_where_text_belongs_says_to_quote_it():
    assert "read the unquoted value as a boolean; put it in quotes" in config_error(None, ["name=yes"])


@pytest.mark.parametrize("steps", ["[-1]", "[0]", "[5, 3]", "[3, 3]", "[2, 8, 6]"])
def test_lr_steps_must_be_increasing_epochs(steps):
    message = config_error(None, [f"train.lr_steps={steps}"])
    assert message.startswith("config key 'train.lr_steps': must be epochs >= 1 in increasing order, each once, "
                              "e.g. lr_steps: [30, 60] (got "), message


def test_lr_steps_in_order_are_kept():
    assert load_config(None, ["train.lr_steps=[3, 6]"]).train.lr_steps == [3, 6]


def test_export_of_a_checkpoint_without_a_config_writes_into_its_run(workdir):
    ok("download", "-c", "tiny.yaml")
    checkpoint = next((workdir / "runs/tiny/checkpoints").iterdir())
    elsewhere = workdir / "elsewhere"
    elsewhere.mkdir()
    loose = elsewhere / "loose.safetensors"
    loose.write_bytes(checkpoint.read_bytes())
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(elsewhere)
        written = ok("export", "--checkpoint", checkpoint).strip()
        assert Path(written).resolve() == (workdir / "runs/tiny/export" / f"{checkpoint.stem}.safetensors").resolve()
        assert refused("export", "--checkpoint", "loose.safetensors") == (
            "error: export --checkpoint loose.safetensors is not in a run folder (RUN/checkpoints/FILE), so there is "
            "no run export/ folder to write to; name the file with -o, e.g. -o export/loose.safetensors, or give "
            "the run's config with -c")
        assert sorted(p.name for p in elsewhere.iterdir()) == ["loose.safetensors"]  # no runs/run/export here
        written = ok("export", "--checkpoint", "loose.safetensors", "-o", "model.safetensors").strip()
        assert written == "model.safetensors" and (elsewhere / "model.safetensors").is_file()
