"""Shipped recipes: listed with a line each, copied to edit, loaded by name, installed as package data."""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from importlib.resources import files
from pathlib import Path

import pytest

from conftest import invoke, tiny_yaml
from sparsify.config import load_config
from sparsify.recipes import description, recipe_folder, recipe_names

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = ["inception_v3", "lenet5_imp_regroup", "quickstart", "resnet18_gumbel24", "resnet50", "resnet50_2to4",
            "timm_resnet50d", "wrn28_2_dsr"]


def test_the_recipes_are_the_yaml_files_of_the_package_folder():
    assert recipe_names() == EXPECTED
    assert sorted(p.stem for p in (ROOT / "sparsify" / "recipes").glob("*.yaml")) == EXPECTED


def test_configs_folder_links_to_the_recipes():
    """One source of truth: configs/NAME.yaml is a link to sparsify/recipes/NAME.yaml."""
    links = sorted((ROOT / "configs").glob("*.yaml"))
    assert [p.stem for p in links] == EXPECTED
    for link in links:
        assert link.is_symlink() and link.resolve() == (recipe_folder() / link.name).resolve()


def test_recipes_lists_each_with_the_first_line_of_its_file():
    code, out, err = invoke("recipes")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == EXPECTED
    for name, line in zip(EXPECTED, lines):
        first = (recipe_folder() / f"{name}.yaml").read_text().splitlines()[0]
        assert first.startswith("# ") and len(first) > 20
        assert line == f"{name:<18}  {first[2:]}" and len(line) <= 88


def test_description_is_the_first_comment_line_only():
    assert description("# one line\n# more\nname: x\n") == "one line"
    assert description("name: x\n# later\n") == ""
    assert description("") == ""


def test_every_recipe_loads_by_name_as_from_its_file():
    for name in EXPECTED:
        by_name = load_config(name)
        assert by_name == load_config(recipe_folder() / f"{name}.yaml") == load_config(ROOT / "configs" / f"{name}.yaml")


def test_dash_c_name_runs_the_shipped_recipe(workdir):
    code, out, err = invoke("config", "-c", "quickstart", "--set", "train.lr=0.02")
    assert code == 0 and err == ""
    assert "name: quickstart" in out and "arch: tiny_resnet" in out and "lr: 0.02" in out


def test_a_file_that_exists_wins_over_a_recipe_name(workdir):
    (workdir / "quickstart").write_text(tiny_yaml(name="mine"))
    code, out, _ = invoke("config", "-c", "quickstart")
    assert code == 0 and "name: mine" in out


def test_an_unknown_recipe_name_lists_the_recipes(workdir):
    code, out, err = invoke("config", "-c", "quickstrat")
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("error: -c 'quickstrat' is neither a file nor a shipped recipe (did you mean quickstart?)")
    assert "shipped recipes: " + ", ".join(EXPECTED) in err and "Traceback" not in err
    assert list(workdir.iterdir()) == [workdir / "tiny.yaml"]  # nothing written


def test_a_missing_path_is_still_a_missing_file(workdir):
    for value in ("missing.yaml", "sub/quickstart"):
        code, _, err = invoke("config", "-c", value)
        assert code == 1 and f"config file {value!r} does not exist" in err and len(err.strip().splitlines()) == 1


def test_copy_writes_the_recipe_to_edit(workdir):
    code, out, err = invoke("recipes", "copy", "quickstart")
    assert code == 0 and err == ""
    assert out == "wrote quickstart.yaml; edit it, then: sparsify run -c quickstart.yaml\n"
    assert (workdir / "quickstart.yaml").read_bytes() == (recipe_folder() / "quickstart.yaml").read_bytes()
    (workdir / "runs").mkdir()
    code, out, _ = invoke("recipes", "copy", "resnet50", "runs")
    assert code == 0 and out.startswith(f"wrote {Path('runs') / 'resnet50.yaml'};")
    code, out, _ = invoke("recipes", "copy", "wrn28_2_dsr", "my-dsr.yaml")
    assert code == 0 and load_config("my-dsr.yaml") == load_config("wrn28_2_dsr")


def test_copy_keeps_an_existing_file_unless_force(workdir):
    (workdir / "quickstart.yaml").write_text("mine\n")
    code, out, err = invoke("recipes", "copy", "quickstart")
    assert code == 1 and out == ""
    assert err == "error: quickstart.yaml already exists; pass --force to overwrite it, or give another PATH\n"
    assert (workdir / "quickstart.yaml").read_text() == "mine\n"
    code, _, _ = invoke("recipes", "copy", "quickstart", "--force")
    assert code == 0 and (workdir / "quickstart.yaml").read_bytes() == (recipe_folder() / "quickstart.yaml").read_bytes()
    assert sorted(p.name for p in workdir.iterdir()) == ["quickstart.yaml", "tiny.yaml"]  # no temporary left


def test_copy_refuses_an_unknown_name_or_an_unwritable_place(workdir):
    code, _, err = invoke("recipes", "copy", "resnet5")
    assert code == 1 and err.startswith("error: unknown recipe 'resnet5' (did you mean ") and "resnet50" in err
    code, _, err = invoke("recipes", "copy", "quickstart", "no/such/folder/q.yaml")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: cannot write no/such/folder/q.yaml (No such file or directory)")
    assert sorted(p.name for p in workdir.iterdir()) == ["tiny.yaml"]


def test_recipes_command_does_not_import_torch(tmp_path):
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "sparsify", "recipes"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.split()[0] == EXPECTED[0]
    assert not [line for line in done.stderr.splitlines() if re.search(r"\|\s+torch(\.|$)", line)]


def test_pyproject_ships_every_recipe_as_package_data():
    """The wheel takes the recipes: pyproject's package-data for sparsify.recipes matches every file,
    and the package is one that packages.find includes."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools_cfg = project["tool"]["setuptools"]
    patterns = setuptools_cfg["package-data"]["sparsify.recipes"]
    listed = sorted(p.name for p in files("sparsify.recipes").iterdir() if p.name.endswith(".yaml"))
    assert listed == [f"{name}.yaml" for name in EXPECTED]
    assert all(any(fnmatch.fnmatch(name, pattern) for pattern in patterns) for name in listed)
    assert any(fnmatch.fnmatch("sparsify.recipes", pattern) for pattern in setuptools_cfg["packages"]["find"]["include"])
    assert (ROOT / "sparsify" / "recipes" / "__init__.py").is_file()  # a regular package: find_packages sees it


def copy_sources(dest: Path) -> Path:
    """pyproject.toml, README.md and the package, without caches: what `pip install .` reads."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dest / name)
    shutil.copytree(ROOT / "sparsify", dest / "sparsify", ignore=shutil.ignore_patterns("__pycache__"))
    return dest


@pytest.mark.slow
def test_a_non_editable_install_in_a_fresh_venv_has_the_recipes(tmp_path):
    """`pip install --no-deps .` into a new venv (its dependencies, setuptools included, are read from
    this interpreter's site-packages through a .pth line, so nothing is downloaded): the installed
    package lists, loads and copies every recipe."""
    source = copy_sources(tmp_path / "src")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-build-isolation", str(source)], check=True, timeout=600, env=env, cwd=tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    where = subprocess.run([str(python), "-c", "import sparsify.recipes as r; print(r.recipe_folder())"],
                           capture_output=True, text=True, check=True, env=env, cwd=work).stdout.strip()
    assert Path(where).is_relative_to(purelib) and not Path(where).is_relative_to(ROOT)
    listed = subprocess.run([str(venv / "bin" / "sparsify"), "recipes"], capture_output=True, text=True, env=env,
                            cwd=work, timeout=120)
    assert listed.returncode == 0 and [line.split()[0] for line in listed.stdout.splitlines()] == EXPECTED
    copied = subprocess.run([str(venv / "bin" / "sparsify"), "recipes", "copy", "quickstart"], capture_output=True,
                            text=True, env=env, cwd=work, timeout=120)
    assert copied.returncode == 0 and (work / "quickstart.yaml").read_bytes() == (ROOT / "configs" / "quickstart.yaml").read_bytes()
    shown = subprocess.run([str(venv / "bin" / "sparsify"), "config", "-c", "lenet5_imp_regroup"], capture_output=True,
                           text=True, env=env, cwd=work, timeout=300)
    assert shown.returncode == 0 and "name: lenet5-imp-regroup" in shown.stdout


def test_an_install_without_the_recipe_files_says_so(tmp_path, monkeypatch):
    import sparsify.recipes

    monkeypatch.setattr(sparsify.recipes, "recipe_folder", lambda: tmp_path)  # an install that lost its data
    code, out, err = invoke("recipes")
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: no recipe files in {tmp_path}: sparsify was installed without its package data")
