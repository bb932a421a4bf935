"""LoRA adapters the diffusers way: the transformers are `PeftAdapterMixin`s, the pipeline gets `load_lora_weights`.

Two file layouts are read: diffusers' `pytorch_lora_weights.safetensors` (or any .safetensors file of LoRA
weights), whose keys may carry the pipeline's `transformer.` prefix, and a peft adapter folder (adapter_config.json
+ adapter_model.safetensors). A source is a local folder or file, or a hub repo id whose file (`weight_name`) is
fetched by huggingface_hub. What is written, by `save_lora_weights` and by `training`, is diffusers' pipeline file.
"""
import json
import os
import tempfile
from pathlib import Path
from typing import Optional

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .loading import HUB_ID
from .transformers.fusion import unfuse_for_lora
from .weight_files import MODEL_BUILD_LOCK

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
PREFIX = "transformer."


def lora_specs(lora) -> list:
    """[(source, weight)] from what `from_pretrained(lora=...)` takes: a source, a (source, weight) pair, or a list
    of either (a source is a folder with pytorch_lora_weights.safetensors, that file, a peft adapter folder or a hub
    repo id)."""
    if lora is None:
        return []
    if isinstance(lora, (str, Path)) or _is_pair(lora):
        lora = [lora]
    specs = [(item, 1.0) if isinstance(item, (str, Path)) else tuple(item) for item in lora]
    for spec in specs:
        if not _is_pair(spec):
            raise ValueError(f"lora must be a folder or file, a (folder, weight) pair, or a list of them; got {spec!r}")
    return [(str(source), float(weight)) for source, weight in specs]


def _is_pair(item) -> bool:
    return (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], (str, Path))
            and isinstance(item[1], (int, float)) and not isinstance(item[1], bool))


def lora_name(source) -> str:
    """The default adapter name: the folder's name (the file's stem for a lone file)."""
    path = Path(source)
    return path.stem if path.is_file() else path.name


def resolve_lora(source, weight_name: Optional[str] = None) -> Path:
    """The local path of a LoRA: a folder or file here (with `weight_name`, that file in the folder), else the file
    `weight_name` (default pytorch_lora_weights.safetensors) of the hub repo `source`, fetched by huggingface_hub."""
    path = Path(source).expanduser()
    if path.exists():
        if weight_name is None:
            return path
        if not (path / weight_name).is_file():
            raise FileNotFoundError(f"{path} holds no file {weight_name}; weight_name names a .safetensors file in it")
        return path / weight_name
    if not HUB_ID.match(str(source)):
        raise FileNotFoundError(f"LoRA {source} does not exist; give a folder, a .safetensors file or a hub repo id "
                                f"like 'user/my-lora'")
    return _hub_file(str(source), weight_name or DIFFUSERS_WEIGHTS)


def _hub_file(repo_id: str, filename: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError)

    try:
        return Path(hf_hub_download(repo_id, filename))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as error:
        raise ConnectionError(f"cannot download {filename} of {repo_id!r}: the Hugging Face Hub is not reachable (no "
                              f"network, or HF_HUB_OFFLINE=1); download it where there is network and pass the file") from error
    except RepositoryNotFoundError as error:
        raise FileNotFoundError(f"hub repo {repo_id!r} does not exist or is private; give a LoRA folder, a file or a "
                                f"public repo id") from error
    except EntryNotFoundError as error:
        raise FileNotFoundError(f"hub repo {repo_id!r} has no file {filename}; name its LoRA file with "
                                f"weight_name=") from error


def _jsonable(config: dict) -> dict:
    """A LoraConfig dict as JSON takes it (peft keeps target_modules as a set)."""
    return {key: sorted(value) if isinstance(value, set) else value for key, value in config.items()}


def _peft_config(folder: Path) -> dict:
    from peft import LoraConfig

    return _jsonable(LoraConfig.from_pretrained(str(folder)).to_dict())


def write_lora_file(path, weights: dict, config: dict) -> Path:
    """Diffusers' pipeline LoRA file at `path`: the transformer's LoRA weights (peft keys, no adapter name) under
    `transformer.`, its LoraConfig prefixed the same way in the safetensors metadata. Staged under a hidden temporary
    name in the same folder and renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt",
                DIFFUSERS_METADATA_KEY: json.dumps({PREFIX + k: v for k, v in _jsonable(config).items()}, sort_keys=True)}
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    try:
        save_file({PREFIX + key: value.detach().contiguous() for key, value in weights.items()}, staging, metadata=metadata)
        os.replace(staging, path)
    finally:
        Path(staging).unlink(missing_ok=True)
    return path


def _file_metadata(file: Path):
    with safe_open(str(file), framework="pt") as handle:
        raw = (handle.metadata() or {}).get(DIFFUSERS_METADATA_KEY)
    return json.loads(raw) if raw else None


def _unprefixed(mapping):
    """Drop the pipeline's `transformer.` key prefix (diffusers' pipeline files carry it, model files do not)."""
    if mapping is None or not any(key.startswith(PREFIX) for key in mapping):
        return mapping
    return {key.removeprefix(PREFIX): value for key, value in mapping.items() if key.startswith(PREFIX)}


def read_lora(source, device="cpu") -> tuple:
    """(state dict without prefix, LoraConfig kwargs or None) of a peft folder, a diffusers folder or a file."""
    path = Path(source)
    if path.is_dir() and (path / PEFT_CONFIG).is_file() and (path / PEFT_WEIGHTS).is_file():
        return load_file(str(path / PEFT_WEIGHTS), device=str(device)), _peft_config(path)
    file = path / DIFFUSERS_WEIGHTS if path.is_dir() else path
    if not (file.is_file() and file.suffix == ".safetensors"):
        raise FileNotFoundError(f"{source} is not a LoRA: expected a folder with {PEFT_CONFIG} + {PEFT_WEIGHTS} "
                                f"(what training writes), a folder with {DIFFUSERS_WEIGHTS}, or a .safetensors file")
    weights = load_file(str(file), device=str(device))
    other = sorted({key.split(".")[0] for key in weights if not key.startswith(PREFIX)})
    if any(key.startswith(PREFIX) for key in weights) and other:
        raise ValueError(f"{source} also has LoRA weights for {', '.join(other)}; only transformer LoRAs are supported")
    if not any(".lora_A." in key or ".lora_down." in key for key in weights):
        raise ValueError(f"{file} holds no LoRA weights (no lora_A / lora_down keys)")
    return _unprefixed(weights), _unprefixed(_file_metadata(file))


def load_lora_adapter(transformer, source, adapter_name: str = None) -> str:
    """Add the LoRA at `source` to `transformer` (a PeftAdapterMixin) as `adapter_name`; returns the name used."""
    name = adapter_name or lora_name(source)
    if name in getattr(transformer, "peft_config", {}):
        raise ValueError(f"a LoRA named {name!r} is already loaded; pass another adapter_name")
    weights, config = read_lora(source, device=next(transformer.parameters()).device)
    unfuse_for_lora(transformer)  # before the flags are read: the split layers are the ones peft wraps
    # peft freezes the base weights; restore their flags, since CPU kernels differ with them (unload == base exactly)
    base_flags = [(parameter, parameter.requires_grad) for parameter in transformer.parameters()]
    with MODEL_BUILD_LOCK:  # its new layers must not be built while another thread's load patches torch
        try:
            transformer.load_lora_adapter(weights, prefix=None, adapter_name=name, metadata=config)
        except (RuntimeError, KeyError) as error:
            raise ValueError(f"the LoRA at {source} does not fit this transformer: {error}") from error
    loaded = [m for m in transformer.modules() if hasattr(m, "lora_A") and name in m.lora_A]
    if not loaded:
        raise ValueError(f"the LoRA at {source} names no layer of this transformer")
    for parameter, flag in base_flags:
        parameter.requires_grad_(flag)
    for module in loaded:  # new LoRA layers start in float32; compute in the transformer's dtype
        module.lora_A[name].to(transformer.dtype)
        module.lora_B[name].to(transformer.dtype)
    transformer.eval()
    return name


def find_loras(folder) -> dict:
    """{adapter name: path} of the LoRAs directly in `folder`: adapter folders (peft or diffusers layout) and
    .safetensors files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"LoRA folder {folder} does not exist")
    found = {}
    for entry in sorted(folder.iterdir()):
        peft = (entry / PEFT_CONFIG).is_file() and (entry / PEFT_WEIGHTS).is_file()
        if entry.is_dir() and (peft or (entry / DIFFUSERS_WEIGHTS).is_file()) or entry.suffix == ".safetensors":
            found[lora_name(entry)] = entry
    return found


class PyramidLoraLoaderMixin:
    """Pipeline-level LoRA loading in diffusers' style, for pipelines whose only LoRA target is `transformer`.

    `self._lora_weights` keeps {adapter name: weight} of the loaded adapters, in load order; `lora_settings()`
    is what the outputs record.
    """

    def _loras(self) -> dict:
        if not hasattr(self, "_lora_weights"):
            self._lora_weights = {}
        return self._lora_weights

    def load_lora_weights(self, source, adapter_name: str = None, weight: float = 1.0,
                          weight_name: Optional[str] = None) -> str:
        """Load a LoRA and activate it at `weight`: a diffusers or peft folder, a .safetensors file, or a hub repo id
        (`weight_name`: the file in the folder or repo, by default pytorch_lora_weights.safetensors). The adapter is
        named `adapter_name`, else after the folder, file or repo."""
        weight = float(weight)
        name = load_lora_adapter(self.transformer, resolve_lora(source, weight_name), adapter_name or lora_name(source))
        self._loras()[name] = weight
        self._lora_sources = {**getattr(self, "_lora_sources", {}), name: str(source)}
        self.set_adapters(list(self._loras()), list(self._loras().values()))
        return name

    def load_loras(self, lora) -> None:
        """Load every LoRA of `lora` (see `lora_specs`) and activate them together at their weights."""
        for source, weight in lora_specs(lora):
            self.load_lora_weights(source, weight=weight)

    def use_loras(self, lora) -> None:
        """Make exactly these LoRAs (see `lora_specs`) active: other sources are unloaded and new ones loaded; a change
        of weights alone only sets them."""
        specs = lora_specs(lora)
        if [source for source, _ in specs] != list(getattr(self, "_lora_sources", {}).values()):
            self.unload_lora_weights()
            self.load_loras(specs)
        elif specs:
            self.set_adapters(list(self._lora_sources), [weight for _, weight in specs])

    def set_adapters(self, adapter_names, adapter_weights=None) -> None:
        """Activate these adapters (a name or a list) with these weights (one number or one per name)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [name for name in names if name not in self._loras()]
        if unknown:
            raise ValueError(f"no LoRA named {', '.join(map(repr, unknown))} is loaded; loaded: {list(self._loras())}")
        if adapter_weights is None:
            adapter_weights = [self._loras()[name] for name in names]
        weights = [adapter_weights] * len(names) if isinstance(adapter_weights, (int, float)) else list(adapter_weights)
        if len(weights) != len(names):
            raise ValueError(f"give one weight per adapter: {len(names)} names, {len(weights)} weights")
        self.transformer.set_adapters(names, [float(w) for w in weights])
        self._active_loras = dict(zip(names, map(float, weights)))
        self._loras().update(self._active_loras)

    def get_active_adapters(self) -> list:
        return list(getattr(self, "_active_loras", {}))

    def fuse_lora(self, lora_scale: float = 1.0, adapter_names=None) -> None:
        """Merge the active adapters into the transformer's weights (faster sampling; `unfuse_lora` undoes it)."""
        self.transformer.fuse_lora(lora_scale=lora_scale, adapter_names=adapter_names)

    def unfuse_lora(self) -> None:
        self.transformer.unfuse_lora()

    def delete_adapters(self, adapter_names) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self.transformer.delete_adapters(names)
        for name in names:
            self._loras().pop(name, None)
            getattr(self, "_active_loras", {}).pop(name, None)
            getattr(self, "_lora_sources", {}).pop(name, None)

    def unload_lora_weights(self) -> None:
        """Remove every LoRA (unfusing fused ones first): the transformer is the base model again."""
        if any(getattr(module, "merged", False) for module in self.transformer.modules()):
            self.transformer.unfuse_lora()
        if self._loras():
            self.transformer.unload_lora()
        self._lora_weights, self._active_loras, self._lora_sources = {}, {}, {}

    def save_lora_weights(self, save_directory, adapter_name: str = None, weight_name: str = DIFFUSERS_WEIGHTS) -> Path:
        """Write the loaded LoRA `adapter_name` (may be left out when one is loaded) to `save_directory/weight_name`
        in diffusers' pipeline layout (see `write_lora_file`): `load_lora_weights(save_directory)` reads it back, and
        so do diffusers' pipelines. Returns the file's path."""
        from peft.utils import get_peft_model_state_dict

        loaded = list(self._loras())
        if adapter_name is None and len(loaded) != 1:
            raise ValueError(f"{len(loaded)} LoRAs are loaded; name the one to save with adapter_name= "
                             f"({', '.join(map(repr, loaded)) or 'load one first'})")
        adapter_name = loaded[0] if adapter_name is None else adapter_name
        if adapter_name not in loaded:
            raise ValueError(f"no LoRA named {adapter_name!r} is loaded; loaded: {loaded}")
        weights = get_peft_model_state_dict(self.transformer, adapter_name=adapter_name)
        return write_lora_file(Path(save_directory) / weight_name, weights, self.transformer.peft_config[adapter_name].to_dict())

    def lora_settings(self) -> list:
        """[{"name", "weight"}] of the active adapters, for an output's settings."""
        return [{"name": name, "weight": weight} for name, weight in getattr(self, "_active_loras", {}).items()]
