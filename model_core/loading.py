"""Turn a checkpoint folder or hub repo id into components, with errors a user can act on.

Only safetensors and (weights_only) .bin files are read; no pickled code is ever executed.
"""
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoints import (
    SETTINGS_FILE,
    VAE_FOLDER,
    Family,
    VariantSpec,
    available_variants,
    detect_family,
    read_json,
    family_named,
    transformer_folder,
    with_overrides,
)
from .text import PROMPT_ENCODERS
from .transformers import PyramidFluxTransformer, PyramidMMDiT
from .vae import CausalVideoVAE
from .weight_files import (
    MODEL_BUILD_LOCK,
    WEIGHT_SUFFIXES,
    check_config_bounds,
    check_finite,
    check_plain_files,
    check_weights_fit,
    weight_files,
    weight_shapes,
)

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """A local checkpoint root with its family and chosen resolution variant."""

    root: Path
    family: Family
    variant: str

    @property
    def spec(self) -> VariantSpec:
        return self.family.variants[self.variant]

    @property
    def transformer_path(self) -> Path:
        return self.root / transformer_folder(self.variant)

    @property
    def vae_path(self) -> Path:
        return self.root / VAE_FOLDER


def layout_description(family: Family, variant: str) -> str:
    folders = [VAE_FOLDER, transformer_folder(variant), *family.text_folders]
    return "expected layout: " + ", ".join(f"{f}/" for f in folders) + " (each with config.json and weights)"


def resolve_checkpoint(source, variant: str = "auto", model: str = "auto", tqdm_class=None) -> ResolvedCheckpoint:
    """Find the checkpoint locally, or fetch only the subfolders it needs from the hub."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _resolve_local(path, variant, model)
    if path.exists() or not HUB_ID.match(str(source)):
        raise FileNotFoundError(f"model {source!r} is neither a checkpoint folder nor a hub repo id like 'rain1011/pyramid-flow-miniflux'")
    configs = _download(source, ["*.json"], tqdm_class)
    resolved = _resolve_local(configs, variant, model, check_files=False)
    folders = [VAE_FOLDER, transformer_folder(resolved.variant), *resolved.family.text_folders]
    root = _download(source, [f"{f}/*" for f in folders if f != transformer_folder(resolved.variant)]
                     + [f"{transformer_folder(resolved.variant)}/*.json", f"{transformer_folder(resolved.variant)}/*.safetensors"], tqdm_class)
    if not list(resolved.transformer_path.glob("*.safetensors")):
        root = _download(source, [f"{transformer_folder(resolved.variant)}/*.bin"], tqdm_class)
    return _resolve_local(Path(root), resolved.variant, resolved.family.name)


def _download(repo_id: str, patterns: list, tqdm_class) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns + [SETTINGS_FILE], tqdm_class=tqdm_class))
    except RepositoryNotFoundError as error:
        raise ValueError(f"hub repo {repo_id!r} does not exist or is private; try 'rain1011/pyramid-flow-miniflux' or 'rain1011/pyramid-flow-sd3'") from error
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, OSError) as error:
        raise ConnectionError(
            f"cannot download {repo_id!r}: the Hugging Face Hub is not reachable (no network, or HF_HUB_OFFLINE=1). "
            f"Download it where there is network (`hf download {repo_id} --local-dir DIR`) and pass that folder instead."
        ) from error


def _resolve_local(root: Path, variant: str, model: str, check_files: bool = True) -> ResolvedCheckpoint:
    family = with_overrides(root, detect_family(root) if model == "auto" else family_named(model))
    found = available_variants(root, family)
    if variant == "auto":
        if not found:
            raise FileNotFoundError(f"no diffusion_transformer_<variant>/ folder in {root}; {layout_description(family, '384p')}")
        variant = found[0]
    elif variant not in family.variants:
        raise ValueError(f"unknown variant {variant!r} for {family.name}; allowed: 'auto', {', '.join(map(repr, family.variants))}")
    if check_files:
        if variant not in found:
            raise FileNotFoundError(
                f"missing folder {transformer_folder(variant)}/ in {root}: this checkpoint has variant(s) "
                f"{', '.join(map(repr, found)) or 'none'}; {layout_description(family, variant)}"
            )
        _check_layout(root, family, variant)
    return ResolvedCheckpoint(root, family, variant)


def _check_layout(root: Path, family: Family, variant: str) -> None:
    for folder in (VAE_FOLDER, transformer_folder(variant), *family.text_folders):
        if (root / folder).is_dir():
            check_plain_files(root / folder)
    for folder in (VAE_FOLDER, transformer_folder(variant)):
        where = root / folder
        if not where.is_dir():
            raise FileNotFoundError(f"missing folder {folder}/ in {root}; {layout_description(family, variant)}")
        if not (where / "config.json").is_file():
            raise FileNotFoundError(f"missing {folder}/config.json in {root}; {layout_description(family, variant)}")
        if not any(p.name.endswith(WEIGHT_SUFFIXES) for p in where.iterdir()):
            raise FileNotFoundError(f"no weights (*.safetensors or *.bin) in {root / folder}; {layout_description(family, variant)}")
    for folder in family.text_folders:
        if not (root / folder).is_dir():
            raise FileNotFoundError(f"missing folder {folder}/ in {root}; {layout_description(family, variant)}")
    for folder in (VAE_FOLDER, transformer_folder(variant), *family.text_folders):
        for file in sorted((root / folder).glob("*.safetensors")):
            weight_shapes(file)  # a damaged file is named now, before anything loads
    for folder in family.text_folders:  # the text encoders' and tokenizers' JSON, before transformers reads it
        for file in sorted((root / folder).glob("*.json")):
            settings = read_json(file)
            if file.name == "config.json":
                check_config_bounds(settings, file)
    _check_tensors(root, family, variant)


def _check_tensors(root: Path, family: Family, variant: str) -> None:
    """Every weighted component's tensors against its config, before any component is built."""
    check_weights_fit(PyramidMMDiT if family.name == "sd3" else PyramidFluxTransformer, root / transformer_folder(variant))
    check_weights_fit(CausalVideoVAE, root / VAE_FOLDER)
    PROMPT_ENCODERS[family.name].check_files(root)


def check_contained(root: Path) -> None:
    """Refuse a checkpoint folder with links that lead outside it (a hosted studio loads only what the operator put
    there, not files elsewhere on the server)."""
    root = Path(root).resolve()
    for path in sorted(root.rglob("*")):
        if path.is_symlink() and not path.resolve().is_relative_to(root):
            raise ValueError(f"{path.relative_to(root)} in the checkpoint folder {root.name} is a link to a file "
                             "outside it; copy the file into the folder instead")


def load_model(model_class, folder: Path, torch_dtype=torch.float32, **kwargs):
    """diffusers from_pretrained with safetensors preferred, after a tensor check that names the culprit, and a
    NaN / infinity check of what it loaded."""
    check_weights_fit(model_class, folder)
    use_safetensors = weight_files(folder)[0].suffix == ".safetensors"
    try:
        with MODEL_BUILD_LOCK:
            model = model_class.from_pretrained(folder, torch_dtype=torch_dtype, use_safetensors=use_safetensors, **kwargs)
    except (ValueError, RuntimeError) as error:
        if "size mismatch" in str(error) or "shape" in str(error):
            raise ValueError(f"checkpoint in {folder} does not fit its config.json: {error}") from error
        raise
    check_finite(model, folder)
    return model
