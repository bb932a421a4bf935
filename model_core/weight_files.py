"""The weight files of one component folder: plain files only, tensors that fit the model its config builds, finite
values. Only safetensors and (weights_only) .bin files are read; no pickled code is ever executed.
"""
import re
import threading
from pathlib import Path

import torch
from safetensors import safe_open

from .checkpoints import check_regular_file, read_json

# diffusers (accelerate's init_empty_weights) and transformers (the default dtype, init patches) change torch for
# the whole process while they build a model; two builds in two threads can leave those changes behind for good.
MODEL_BUILD_LOCK = threading.RLock()

WEIGHT_SUFFIXES = (".safetensors", ".bin")
CONFIG_MAX_NUMBER = 65536  # sane bounds on a model config, checked before anything is built from it
CONFIG_MAX_LAYERS = 256
LAYER_KEYS = re.compile(r"layers|blocks|depth")
LISTED_KEYS = 5  # tensor names an error sentence lists before "and N more"
CHECKED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # searched for NaN / infinity


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


def weight_shapes(file: Path) -> dict:
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
        found.update(weight_shapes(file))
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
                                                       use_kernels=False,  # transformers 5.25 kernelizes by default
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
