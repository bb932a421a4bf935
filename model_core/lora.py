"""Load a peft LoRA adapter (adapter_config.json + adapter_model.safetensors) into a transformer for inference."""
from pathlib import Path

from safetensors.torch import load_file

from .loading import MODEL_BUILD_LOCK

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def load_lora_adapter(transformer, folder, adapter_name: str = "default"):
    """Inject the adapter's LoRA layers into `transformer` and load their weights; returns the transformer."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    folder = Path(folder)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not a LoRA adapter: it lacks {name}")
    config = LoraConfig.from_pretrained(str(folder))
    with MODEL_BUILD_LOCK:  # its new layers must not be built while another thread's load patches torch
        inject_adapter_in_model(config, transformer, adapter_name=adapter_name)
    weights = load_file(str(folder / ADAPTER_WEIGHTS), device=str(next(transformer.parameters()).device))
    result = set_peft_model_state_dict(transformer, weights, adapter_name=adapter_name)
    if result.unexpected_keys:
        raise ValueError(f"the adapter in {folder} does not fit this transformer, e.g. {result.unexpected_keys[:3]}")
    for module in transformer.modules():  # new LoRA layers start in float32; match the transformer
        if hasattr(module, "lora_A"):
            module.to(transformer.dtype)
    return transformer.eval()
