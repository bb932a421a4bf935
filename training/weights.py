"""Model weights as safetensors in the folder layouts that diffusers `from_pretrained` and peft read."""
import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from .atomic import write_text

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def save_weights(folder: Path, model, state: dict) -> None:
    """config.json + diffusion_pytorch_model.safetensors, loadable with `type(model).from_pretrained(folder)`."""
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / model.config_name, portable_config(model))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / WEIGHTS_NAME))


def portable_config(model) -> str:
    """The model's config.json text without `_name_or_path`, the folder this process loaded the model from: a path
    on this machine, which means nothing on another."""
    config = json.loads(model.to_json_string())
    config.pop("_name_or_path", None)
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def load_weights(model, folder: Path) -> None:
    model.load_state_dict(load_file(str(Path(folder) / WEIGHTS_NAME)), strict=True)


def save_lora_weights(folder: Path, model, lora: dict, state: dict) -> None:
    """`folder`/pytorch_lora_weights.safetensors from a full state dict, in diffusers' pipeline layout with the
    LoraConfig in its metadata (model_core.lora.write_lora_file): what `PyramidFlowPipeline.load_lora_weights(folder)`
    and diffusers' own loaders read."""
    from peft import get_peft_model_state_dict

    from model_core.lora import DIFFUSERS_WEIGHTS, write_lora_file

    from .models import lora_config

    write_lora_file(Path(folder) / DIFFUSERS_WEIGHTS, get_peft_model_state_dict(model, state_dict=state),
                    lora_config(lora).to_dict())


def load_lora_weights(model, folder: Path) -> None:
    """The LoRA weights of `folder` (training's file, or an older run's peft adapter folder) into `model`."""
    from peft import set_peft_model_state_dict

    from model_core.lora import read_lora

    result = set_peft_model_state_dict(model, read_lora(folder)[0])
    if result.unexpected_keys:
        raise ValueError(f"the adapter in {folder} has weights this model lacks, e.g. {result.unexpected_keys[:3]}")
