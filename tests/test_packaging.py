"""The package's declarations agree with the code: every package folder installs, pyproject.toml declares ranges
that hold requirements.txt's pins, the library imports without gradio, fcntl or torchao's import notices, the
console scripts exist, and recipes are found from any folder."""
import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from pyramid_app.studio import serve
from training.config import CONFIG_DIR, load_config, recipe_path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS = PROJECT["project"]["optional-dependencies"]


def by_name(requirements) -> dict:
    """{canonical name: Requirement}, this project's own extras (`pyramid-flow-studio[...]`) left out."""
    parsed = [Requirement(line) for line in requirements]
    return {canonicalize_name(r.name): r for r in parsed if canonicalize_name(r.name) != PROJECT["project"]["name"]}


def requirements_file(name: str) -> dict:
    lines = [line.partition("#")[0].strip() for line in (ROOT / name).read_text().splitlines()]
    return by_name(line for line in lines if line and not line.startswith("-r"))


def pinned_version(requirement: Requirement):
    """The version of an exact pin (`name==1.2.3`), None for a range."""
    (pin,) = [spec for spec in requirement.specifier if spec.operator == "=="] or [None]
    return pin.version if pin is not None else None


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_every_package_folder_is_installed():
    found = {str(init.parent.relative_to(ROOT)).replace("/", ".")
             for top in ("model_core", "pyramid_app", "training") for init in (ROOT / top).rglob("__init__.py")}
    listed = set(PROJECT["tool"]["setuptools"]["packages"])
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"
    assert PROJECT["tool"]["setuptools"]["package-dir"]["pyramid_flow_assets"] == "assets"


def test_pyproject_declares_ranges_and_requirements_txt_pins_inside_them():
    declared = by_name(PROJECT["project"]["dependencies"] + [line for extra in EXTRAS.values() for line in extra])
    assert [str(r) for r in declared.values() if pinned_version(r)] == [], "exact pins belong in requirements.txt"
    app = by_name(PROJECT["project"]["dependencies"] + EXTRAS["studio"] + EXTRAS["train"])
    required = requirements_file("requirements.txt")
    assert set(required) == set(app), "requirements.txt installs the library, the studio and training, no more"
    developer = {name: r for name, r in requirements_file("requirements-dev.txt").items() if name in declared}
    assert set(developer) == set(by_name(EXTRAS["dev"]))
    for name, requirement in {**required, **developer}.items():
        pin = pinned_version(requirement)
        if pin is None:
            assert requirement.specifier == declared[name].specifier, f"{requirement} vs pyproject's {declared[name]}"
        else:
            assert declared[name].specifier.contains(pin), f"{requirement} lies outside pyproject's {declared[name]}"
    assert pinned_version(required["torch"]) == "2.13.0" and declared["torch"].specifier.contains("2.13.5")


def test_gradio_is_the_studio_extra_and_all_takes_every_extra():
    assert "gradio" not in by_name(PROJECT["project"]["dependencies"]) and "gradio" in by_name(EXTRAS["studio"])
    (everything,) = EXTRAS["all"]
    assert Requirement(everything).name == PROJECT["project"]["name"]
    assert Requirement(everything).extras == set(EXTRAS) - {"all", "dev"}


def test_library_and_command_line_import_without_gradio():
    imported = run_python("import sys; sys.modules['gradio'] = None\n"
                          "import model_core; model_core.PyramidFlowPipeline; model_core.CausalVideoVAE\n"
                          "import pyramid_app.cli, pyramid_app.jobs.output_file, training.loop\n"
                          "print(sorted(name for name in sys.modules if name.startswith('gradio')))")
    assert imported.returncode == 0, imported.stderr[-2000:]
    assert imported.stdout == "['gradio']\n"  # only the blocked entry: nothing tried to import it


def test_the_studio_command_without_gradio_says_which_extra_to_install():
    from pyramid_app.studio.serve import NO_GRADIO

    served = run_python("import sys; sys.modules['gradio'] = None\n"
                        "from pyramid_app.studio import serve\n"
                        "sys.exit(serve.main(['--no-browser']))")
    assert served.returncode == 2 and served.stderr.strip() == NO_GRADIO


def test_importing_torchao_through_the_library_logs_nothing_and_other_warnings_still_pass():
    imported = run_python(
        "import logging, model_core\n"
        "from diffusers.models.modeling_utils import ModelMixin\n"
        "from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_\n"
        "for name in ('torchao', 'torch.utils._pytree', 'diffusers.quantizers.torchao.torchao_quantizer'):\n"
        "    logging.getLogger(name).warning('still said by %s', name)\n")
    assert imported.returncode == 0, imported.stderr[-2000:]
    said = [line for line in imported.stderr.splitlines() if line]
    assert len(said) == 3 and [line.endswith(f"still said by {name}") for line, name in zip(said, (
        "torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"))] == [True] * 3, said


def test_media_files_write_and_sweep_where_there_is_no_fcntl(tmp_path):
    """As on Windows: the studio, the command line and the writers import, and a sweep still removes litter."""
    imported = run_python(
        "import sys; sys.modules['fcntl'] = None\n"
        "from pathlib import Path\n"
        "import numpy as np\n"
        "import pyramid_app.cli, pyramid_app.studio.serve\n"
        "from model_core import file_lock\n"
        "from model_core.media_files import read_image, write_image\n"
        "assert file_lock.fcntl is None\n"
        f"folder = Path({str(tmp_path)!r})\n"
        "(folder / '.old.png.k2j_x9ab.partial.png').write_bytes(b'litter')\n"
        "write_image(np.full((8, 8, 3), 200, np.uint8), folder / 'a.png', {'seed': 1})\n"
        "assert read_image(folder / 'a.png')[0, 0].tolist() == [200, 200, 200]\n"
        "print(sorted(path.name for path in folder.iterdir()))")
    assert imported.returncode == 0, imported.stderr[-2000:]
    assert imported.stdout == "['a.json', 'a.png']\n"


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
