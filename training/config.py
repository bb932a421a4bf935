"""Recipes: a YAML file plus `key.path=value` overrides, read into a nested dict."""
import re
from importlib import resources
from pathlib import Path

import yaml

CONFIG_DIR = Path(str(resources.files("training") / "configs"))  # package data in an installed copy
CHECKOUT_PREFIX = Path("training") / "configs"
# YAML 1.1 (PyYAML) reads `1e-3` as a string; a recipe means the number, as YAML 1.2 does
SCIENTIFIC = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


class RecipeLoader(yaml.SafeLoader):
    """safe_load with `1e-3`, `5E4` read as floats."""


RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", SCIENTIFIC, list("-+0123456789."))


def parse_yaml(text: str):
    return yaml.load(text, Loader=RecipeLoader)


def recipe_path(path) -> Path:
    """A recipe file: `path` as given, else, for `training/configs/NAME` or a bare NAME, the shipped one."""
    path = Path(path)
    if path.is_file():
        return path
    name = path.relative_to(CHECKOUT_PREFIX) if path.is_relative_to(CHECKOUT_PREFIX) else path
    shipped = CONFIG_DIR / name
    if not path.is_absolute() and shipped.is_file():
        return shipped
    raise FileNotFoundError(f"no recipe at {path}; recipes live in {CONFIG_DIR}")


def load_config(path, overrides=()) -> dict:
    """Read a recipe; every override is `dotted.key=value` with the value parsed as YAML."""
    path = recipe_path(path)
    config = parse_yaml(path.read_text()) or {}
    for key, value in parse_overrides(overrides):
        set_path(config, key, value)
    return config


def parse_overrides(overrides) -> list:
    """[(dotted key, YAML value)] of `dotted.key=value` strings."""
    parsed = []
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key:
            raise ValueError(f"override {override!r} must look like section.key=value")
        parsed.append((key, parse_yaml(value)))
    return parsed


def set_path(config: dict, dotted: str, value) -> None:
    node = config
    *parents, leaf = dotted.split(".")
    for name in parents:
        node = node.setdefault(name, {})
        if not isinstance(node, dict):
            raise ValueError(f"cannot set {dotted}: {name} is not a section")
    node[leaf] = value
