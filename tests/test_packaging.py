"""The package's declarations agree with the code: every package folder installs, requirements.txt and
pyproject.toml pin the same, the console scripts exist, and recipes are found from any folder."""
import importlib
import re
import tomllib
from pathlib import Path

import pytest

from pyramid_app import serve
from training.config import CONFIG_DIR, load_config, recipe_path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement_name(line: str) -> str:
    return re.split(r"[<>=!~\[ ;]", line, maxsplit=1)[0].lower().replace("_", "-")


def test_every_package_folder_is_installed():
    found = {str(init.parent.relative_to(ROOT)).replace("/", ".")
             for top in ("model_core", "pyramid_app", "training") for init in (ROOT / top).rglob("__init__.py")}
    listed = set(PROJECT["tool"]["setuptools"]["packages"])
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"
    assert PROJECT["tool"]["setuptools"]["package-dir"]["pyramid_flow_assets"] == "assets"


def test_requirements_txt_and_pyproject_declare_the_same_pins():
    project = PROJECT["project"]
    declared = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    lines = [line.partition("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    required = [line for line in lines if line]
    by_name = {requirement_name(d): d for d in declared}
    for line in required:
        assert by_name.get(requirement_name(line)) == line, f"pyproject.toml should declare {line!r}"
    runtime = {requirement_name(d) for d in project["dependencies"]}
    assert {"tqdm", "tokenizers", "av", "huggingface-hub", "peft", "gradio"} <= runtime


def test_console_scripts_name_functions_that_exist():
    scripts = PROJECT["project"]["scripts"]
    assert set(scripts) == {"pyramid-flow", "pyramid-flow-studio"}
    for target in scripts.values():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function))


def test_studio_command_prints_usage(capsys):
    with pytest.raises(SystemExit) as stop:
        serve.main(["--help"])
    assert stop.value.code == 0
    usage = capsys.readouterr().out
    assert usage.startswith("usage: ") and "--output-dir" in usage and "127.0.0.1" in usage


def test_recipes_are_found_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert recipe_path("training/configs/tiny_shapes.yaml") == CONFIG_DIR / "tiny_shapes.yaml"
    assert recipe_path("tiny_shapes_model_card.md") == CONFIG_DIR / "tiny_shapes_model_card.md"
    assert load_config("training/configs/tiny_shapes.yaml")["task"] == "bundle"
    with pytest.raises(FileNotFoundError, match="recipes live in"):
        recipe_path("training/configs/no_such_recipe.yaml")
    with pytest.raises(FileNotFoundError, match="recipes live in"):
        recipe_path(tmp_path / "tiny_shapes.yaml")
