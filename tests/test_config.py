"""Config: strict keys and types, --set overrides, one-line errors."""

from pathlib import Path

import pytest

from sparsify.config import config_hash, load_config
from sparsify.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_and_overrides_parse_yaml_scalars(tmp_path):
    path = write(tmp_path, "name: a\ntrain: {lr: 1e-3}\n")
    config = load_config(path, ["sparsity.target=0.75", "sparsity.exclude=['fc.*']", "data.dataset=fake"])
    assert config.train.lr == 0.001
    assert config.sparsity.target == 0.75 and config.sparsity.exclude == ["fc.*"]
    assert config.sparsity.pattern.block == [8, 8]
    assert str(config.run_dir) == "runs/a"


def test_pattern_is_chosen_by_type(tmp_path):
    config = load_config(None, ["sparsity.pattern={type: unstructured}", "sparsity.criterion=l1"])
    assert config.sparsity.pattern.type == "unstructured"


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.lrr=1", "unknown config key 'train.lrr'; allowed here: epochs, optimizer, lr"),
        ("train.lr=abc", "config key 'train.lr': Input should be a valid number (got 'abc')"),
        ("sparsity.target=1.5", "config key 'sparsity.target'"),
        ("sparsity.pattern.block=[8]", "block must be two positive integers"),
        ("sparsity.pattern={type: diagonal}", "sparsity.pattern"),
        ("name=../x", "name must be letters"),
        ("device=tpu", "device must be auto, cpu, cuda, cuda:N or mps"),
        ("train=3", "config key 'train'"),
        ("lr", "must look like key.sub=value"),
        ("train.lr.x=1", "'train.lr' is a value, not a section"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(tmp_path, override, words):
    path = write(tmp_path, "train: {lr: 0.1}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, [override])
    assert words in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file_and_bad_yaml_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(write(tmp_path, "train: [1,\n"))
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(write(tmp_path, "- 1\n"))


def test_hash_follows_the_resolved_values(tmp_path):
    assert config_hash(load_config(None)) == config_hash(load_config(None, ["seed=0"]))
    assert config_hash(load_config(None)) != config_hash(load_config(None, ["seed=1"]))


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    config = load_config(path)
    assert config.name and config.run_dir.name == config.name


def config_keys(model, prefix=""):
    """Every key path of the config models, e.g. `train.lr`, `sparsity.permute.enabled`."""
    from pydantic import BaseModel

    import typing

    from sparsify.registry import PATTERNS

    for name, field in model.model_fields.items():
        yield prefix + name
        sections = [a for a in (field.annotation, *typing.get_args(field.annotation))  # Optional[X] too
                    if isinstance(a, type) and issubclass(a, BaseModel)]
        if prefix + name == "sparsity.pattern":  # validated by the registered pattern's Options
            sections = [PATTERNS.get(kind).Options for kind in ("block", "nm", "unstructured")]
        for section in sections:
            yield from config_keys(section, prefix + name + ".")
    if prefix == "sparsity.":  # one section per built-in method with options
        from sparsify.registry import METHODS

        for method in ("dsr", "gumbel", "gradual"):
            yield prefix + method
            yield from config_keys(METHODS.get(method).Options, f"{prefix}{method}.")


def test_every_config_key_is_documented_in_the_readme():
    from sparsify.config import RunConfig

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme[readme.index("## Config"):readme.index("```", readme.index("```yaml", readme.index("## Config")) + 7)]
    missing = [key for key in config_keys(RunConfig) if f"{key.rsplit('.', 1)[-1]}:" not in block]
    assert missing == []
