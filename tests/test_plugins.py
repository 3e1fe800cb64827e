"""A pattern written outside the package: one class, one decorator, named under `plugins:`."""

from __future__ import annotations

import json
import textwrap

ROW_PATTERN = textwrap.dedent(
    '''\
    """A 1xN row pattern: N consecutive input channels of one output channel, all kernel taps."""
    from typing import Literal

    from pydantic import Field

    from sparsify.core.block import BlockPattern
    from sparsify.core.patterns import PatternOptions
    from sparsify.registry import PATTERNS


    class RowOptions(PatternOptions):
        type: Literal["row"] = "row"
        width: int = Field(default=4, ge=2)  # input channels per group


    @PATTERNS.register("row")
    class RowPattern(BlockPattern):
        """Blocks one output channel high: the block machinery does the rest."""

        name = "row"
        Options = RowOptions

        def __init__(self, width: int = 4) -> None:
            super().__init__(1, width)

        @classmethod
        def from_options(cls, options: RowOptions) -> "RowPattern":
            return cls(options.width)

        @classmethod
        def parse(cls, text: str):
            return {"type": "row", "width": int(text[3:])} if text.startswith("row") and text[3:].isdigit() else None

        def spec(self) -> dict:
            return {"type": "row", "width": self.bi}

        def describe(self) -> str:
            return f"row 1x{self.bi}"
    '''
)


def test_a_pattern_from_a_plugin_module_runs_end_to_end(tmp_path, monkeypatch, tiny_config, cli):
    (tmp_path / "rowpattern.py").write_text(ROW_PATTERN)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tiny_config(plugins=["rowpattern"], sparsity={"pattern": {"type": "row", "width": 4}, "criterion": "l1"},
                         data={"limit_train_batches": 1, "limit_val_batches": 1})
    for command in (["download"], ["prune"], ["train"], ["prune"]):
        code, out, err = cli(*command, "-c", config)
        assert code in (0, 3), (command, err)
    code, out, err = cli("report", "-c", config, "--format", "json")
    assert code == 0, err
    assert "row 1x4" in out
    latest = sorted((tmp_path / "runs/tiny/checkpoints").iterdir())[-1]
    code, out, err = cli("check", latest, "--format", "json")
    assert code == 0, out + err
    result = json.loads(out)
    assert result["follows"] and all(layer["sparsity"] >= 0.25 for layer in result["layers"])
    code, out, err = cli("check", latest, "--pattern", "row4")  # the plugin's short form
    assert code == 0, out + err


def test_a_plugin_that_cannot_be_imported_is_one_line(tiny_config, cli):
    code, _, err = cli("download", "-c", tiny_config(plugins=["no_such_module_here"]))
    assert code == 1 and "plugin module 'no_such_module_here' cannot be imported" in err
    assert len(err.strip().splitlines()) == 1


def test_unknown_names_list_what_is_registered(tiny_config, cli):
    code, _, err = cli("download", "-c", tiny_config(sparsity={"criterion": "bogus"}))
    assert code == 1 and "unknown criterion 'bogus'; choose one of: bn_scale, l1, l2, random, taylor, variance" in err
    code, _, err = cli("download", "-c", tiny_config(sparsity={"method": "bogus"}))
    assert code == 1 and "unknown method 'bogus'; choose one of: dsr, gradual, gumbel, static" in err
