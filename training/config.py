"""Recipes: a YAML file plus `key.path=value` overrides, read into a nested dict."""
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def load_config(path, overrides=()) -> dict:
    """Read a recipe; every override is `dotted.key=value` with the value parsed as YAML."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no recipe at {path}; recipes live in {CONFIG_DIR}")
    config = yaml.safe_load(path.read_text()) or {}
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key:
            raise ValueError(f"override {override!r} must look like section.key=value")
        set_path(config, key, yaml.safe_load(value))
    return config


def set_path(config: dict, dotted: str, value) -> None:
    node = config
    *parents, leaf = dotted.split(".")
    for name in parents:
        node = node.setdefault(name, {})
        if not isinstance(node, dict):
            raise ValueError(f"cannot set {dotted}: {name} is not a section")
    node[leaf] = value

