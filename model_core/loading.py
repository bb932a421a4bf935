"""Turn a checkpoint folder or hub repo id into components, with errors a user can act on.

Only safetensors and (weights_only) .bin files are read; no pickled code is ever executed.
"""
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .checkpoints import (
    SETTINGS_FILE,
    VAE_FOLDER,
    Family,
    VariantSpec,
    available_variants,
    check_regular_file,
    detect_family,
    read_json,
    family_named,
    transformer_folder,
    with_overrides,
)

# diffusers (accelerate's init_empty_weights) and transformers (the default dtype, init patches) change torch for
# the whole process while they build a model; two builds in two threads can leave those changes behind for good.
MODEL_BUILD_LOCK = threading.RLock()

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
CONFIG_MAX_NUMBER = 65536  # sane bounds on a model config, checked before anything is built from it
CONFIG_MAX_LAYERS = 256
LAYER_KEYS = re.compile(r"layers|blocks|depth")
LISTED_KEYS = 5  # tensor names an error sentence lists before "and N more"
CHECKED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # searched for NaN / infinity


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
            _weight_shapes(file)  # a damaged file is named now, before anything loads
    for folder in family.text_folders:  # the text encoders' and tokenizers' JSON, before transformers reads it
        for file in sorted((root / folder).glob("*.json")):
            settings = read_json(file)
            if file.name == "config.json":
                check_config_bounds(settings, file)
    _check_tensors(root, family, variant)


def _check_tensors(root: Path, family: Family, variant: str) -> None:
    """Every weighted component's tensors against its config, before any component is built."""
    from .text import PROMPT_ENCODERS  # these import this module
    from .transformers import PyramidFluxTransformer, PyramidMMDiT
    from .vae import CausalVideoVAE

    check_weights_fit(PyramidMMDiT if family.name == "sd3" else PyramidFluxTransformer, root / transformer_folder(variant))
    check_weights_fit(CausalVideoVAE, root / VAE_FOLDER)
    PROMPT_ENCODERS[family.name].check_files(root)


def check_plain_files(folder: Path) -> None:
    """Refuse, before anything in `folder` is opened, an entry that is not a regular file (a named pipe, a device, a
    socket, a link to nothing) or a folder named like a file (config.json/, model.safetensors/); and an index of
    sharded weights that names files outside the folder or absent from it."""
    for entry in sorted(folder.iterdir()):
        if entry.suffix or not entry.is_dir():
            check_regular_file(entry)
    for index in sorted(folder.glob("*.index.json")):
        shards = read_json(index).get("weight_map", {})
        for shard in sorted(set(shards.values()) if isinstance(shards, dict) else [shards]):
            if not isinstance(shard, str) or Path(shard).name != shard or not (folder / shard).is_file():
                raise ValueError(f"{index} names the weights file {shard!r}, which is not a file in {folder}; "
                                 "an index may name only files beside it")


def check_contained(root: Path) -> None:
    """Refuse a checkpoint folder with links that lead outside it (a hosted studio loads only what the operator put
    there, not files elsewhere on the server)."""
    root = Path(root).resolve()
    for path in sorted(root.rglob("*")):
        if path.is_symlink() and not path.resolve().is_relative_to(root):
            raise ValueError(f"{path.relative_to(root)} in the checkpoint folder {root.name} is a link to a file "
                             "outside it; copy the file into the folder instead")


def check_config_bounds(config: dict, path: Path) -> None:
    """Refuse absurd sizes before a model is built from `config`: numbers above CONFIG_MAX_NUMBER, layer or block
    counts above CONFIG_MAX_LAYERS (the published models stay far below both)."""
    for key, value in config.items():
        for number in value if isinstance(value, list) else [value]:
            if isinstance(number, bool) or not isinstance(number, (int, float)):
                continue
            limit = CONFIG_MAX_LAYERS if LAYER_KEYS.search(key) and isinstance(number, int) else CONFIG_MAX_NUMBER
            if not -limit <= number <= limit:
                raise ValueError(f"{path}: {key} = {number} is beyond the sane bound of {limit}; "
                                 "is this config damaged or hand-edited?")


def _weight_shapes(file: Path) -> dict:
    """Tensor shapes of a weights file, without reading the data; .bin files only as plain tensors."""
    check_regular_file(file)
    if file.suffix == ".safetensors":
        try:
            with safe_open(file, framework="pt") as weights:
                return {key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()}
        except Exception as error:  # safetensors raises its own error type for damaged headers
            raise ValueError(f"{file} is not a readable safetensors file (truncated or damaged: "
                             f"{str(error).splitlines()[0] if str(error) else type(error).__name__})") from None
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # pickle errors come in many types
        raise ValueError(
            f"refusing to load {file}: it is not a plain tensor checkpoint (weights_only loading failed: "
            f"{type(error).__name__}). Use the .safetensors weights of this model."
        ) from error
    return {key: tuple(value.shape) for key, value in state.items() if torch.is_tensor(value)}


def weight_files(folder: Path) -> list:
    """The weights diffusers and transformers will read: safetensors when present, else .bin."""
    return sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))


def check_weights_fit(model_class, folder: Path) -> None:
    """Refuse a component whose weights do not fit the model its config.json builds (checked against sane bounds
    first), before any weight is read: a missing tensor (which the libraries would initialise at random), one the
    model has no place for, or one of another shape. `model_class` is a diffusers model (compared here with a
    meta-device build) or a transformers model (the text encoders: transformers' own key matching, onto the meta
    device, so its renamed, tied and ignored keys count as it counts them)."""
    config = read_json(folder / "config.json")
    check_config_bounds(config, folder / "config.json")
    if hasattr(model_class, "config_class"):
        _refuse_misfit(folder, *_transformers_misfit(model_class, folder))
        return
    with MODEL_BUILD_LOCK, torch.device("meta"):
        model = model_class.from_config(config)
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    found = {}
    for file in weight_files(folder):
        found.update(_weight_shapes(file))
    ignored = [re.compile(pattern) for pattern in getattr(model_class, "_keys_to_ignore_on_load_unexpected", None) or []]
    buffers = {name for name, _ in model.named_buffers()}  # older files may hold non-persistent buffers
    _refuse_misfit(
        folder, len(expected),
        missing=[key for key in expected if key not in found],
        extra=[key for key in found if key not in expected and key not in buffers
               and not any(pattern.search(key) for pattern in ignored)],
        mismatched=[(key, shape, expected[key]) for key, shape in found.items() if key in expected and shape != expected[key]],
    )


def _transformers_misfit(model_class, folder: Path) -> tuple:
    """(tensors built, missing, unexpected, mismatched) as transformers' from_pretrained finds them, loading onto the
    meta device (it reads no weights); its own report and progress bar are held back, our sentence replaces them."""
    from transformers.utils import logging as transformers_logging

    report = transformers_logging.get_logger("transformers.modeling_utils")
    with MODEL_BUILD_LOCK:  # every load of ours takes it, so no other load's report or bar is hidden
        bars = transformers_logging.is_progress_bar_enabled()
        report.disabled = True  # not a higher level: that turns on transformers' tensor-parallel plan warnings
        transformers_logging.disable_progress_bar()
        try:
            model, found = model_class.from_pretrained(folder, device_map="meta", use_safetensors=True,
                                                       output_loading_info=True, ignore_mismatched_sizes=True)
        except (RuntimeError, OSError) as error:
            raise ValueError(f"the weights in {folder} cannot be read as a {model_class.__name__}: "
                             f"{_first_line(error)}") from None
        finally:
            report.disabled = False
            if bars:
                transformers_logging.enable_progress_bar()
    return (len(model.state_dict()), sorted(found["missing_keys"]), sorted(found["unexpected_keys"]),
            [(key, tuple(found_shape), tuple(built)) for key, found_shape, built in sorted(found["mismatched_keys"])])


def _refuse_misfit(folder: Path, built: int, missing: list, extra: list, mismatched: list) -> None:
    """One sentence for the first kind of misfit found, naming the folder and the first few tensors."""
    if missing:
        raise ValueError(f"the weights in {folder} lack {len(missing)} of the {built} tensors its config.json builds: "
                         f"{_listed(missing)}; is the weights file incomplete or from another model?")
    if extra:
        raise ValueError(f"the weights in {folder} hold {len(extra)} tensors that its config.json does not build: "
                         f"{_listed(extra)}; is the config from another model?")
    if mismatched:
        key, found, expected = mismatched[0]
        more = f" ({len(mismatched) - 1} more tensors differ)" if len(mismatched) > 1 else ""
        raise ValueError(f"checkpoint {folder} does not fit its config: {key} has shape {list(found)}, the config "
                         f"{folder / 'config.json'} builds {list(expected)}{more}; is the config from another model size?")


def _listed(keys: list) -> str:
    return ", ".join(keys[:LISTED_KEYS]) + (f" and {len(keys) - LISTED_KEYS} more" if len(keys) > LISTED_KEYS else "")


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def check_finite(model: torch.nn.Module, folder: Path) -> None:
    """Refuse loaded weights holding NaN or infinity (a damaged or badly converted file, which would make black
    frames without a word): one min/max pass over each floating tensor, far faster than reading the file."""
    tensors = [*model.named_parameters(), *model.named_buffers()]  # a tied tensor once
    damaged = [name for name, tensor in tensors
               if tensor.dtype in CHECKED_DTYPES and tensor.numel() and not tensor.is_meta and not _finite(tensor)]
    if damaged:
        raise ValueError(f"the weights in {folder} hold NaN or infinite values in {len(damaged)} tensor(s), first "
                         f"{damaged[0]}; the file is damaged or was converted badly: download or export it again")


def _finite(tensor: torch.Tensor) -> bool:
    low, high = torch.aminmax(tensor.detach())  # NaN propagates to both
    return bool(torch.isfinite(low) & torch.isfinite(high))


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
