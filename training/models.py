"""The models a recipe trains or uses: the base checkpoint, the transformer (full or LoRA), the frozen VAE
and prompt encoder. Freshly initialised weights (a from-scratch `model.config`, new LoRA matrices) are drawn
from a torch.Generator seeded by the recipe (model_core.init.reinitialize); the global RNG is never seeded."""
import json

import torch

from model_core.init import reinitialize
from model_core.loading import load_model, resolve_checkpoint
from model_core.text import load_prompt_encoder

LORA_DEFAULT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def base_checkpoint(model: dict):
    """The official-layout checkpoint (folder or hub id) a recipe starts from."""
    return resolve_checkpoint(model["pretrained"], model.get("variant", "auto"), model.get("family", "auto"))


def transformer_class(family_name: str):
    from model_core.transformers import PyramidFluxTransformer, PyramidMMDiT

    return PyramidMMDiT if family_name == "sd3" else PyramidFluxTransformer


def build_transformer(model: dict, base, seed: int):
    """The published transformer, or one built from the base config updated with `model.config`."""
    cls = transformer_class(base.family.name)
    if model.get("config"):
        config = json.loads((base.transformer_path / "config.json").read_text())
        config = {k: v for k, v in config.items() if not k.startswith("_")} | dict(model["config"])
        transformer = reinitialize(cls.from_config(config), torch.Generator().manual_seed(seed))
    else:
        transformer = load_model(cls, base.transformer_path, torch.float32)
    if model.get("gradient_checkpointing"):
        transformer.enable_gradient_checkpointing()
    if model.get("lora"):
        add_lora(transformer, model["lora"], seed)
    return transformer


def lora_config(lora: dict):
    from peft import LoraConfig

    return LoraConfig(r=lora["rank"], lora_alpha=lora.get("alpha", lora["rank"]), lora_dropout=0.0,
                      target_modules=lora.get("target_modules", LORA_DEFAULT_TARGETS))


def add_lora(transformer, lora: dict, seed: int) -> None:
    """Freeze the transformer and inject trainable LoRA matrices (peft) into its attention projections."""
    from peft import inject_adapter_in_model

    transformer.requires_grad_(False)
    inject_adapter_in_model(lora_config(lora), transformer)
    lora_layers = torch.nn.ModuleList(m for name, m in transformer.named_modules() if name.endswith("lora_A"))
    reinitialize(lora_layers, torch.Generator().manual_seed(seed))


def build_vae(model: dict, base, seed: int = 0, trainable: bool = False):
    """The base checkpoint's causal VAE; frozen in `model.frozen_dtype` unless it is what is trained."""
    from model_core.vae import CausalVideoVAE

    if trainable and model.get("vae_config"):
        config = json.loads((base.vae_path / "config.json").read_text())
        config = {k: v for k, v in config.items() if not k.startswith("_")} | dict(model["vae_config"])
        return reinitialize(CausalVideoVAE.from_config(config), torch.Generator().manual_seed(seed))
    dtype = torch.float32 if trainable else DTYPES[model.get("frozen_dtype", "float32")]
    vae = load_model(CausalVideoVAE, base.vae_path, dtype)
    return vae if trainable else vae.eval().requires_grad_(False)


def build_prompt_encoder(model: dict, base, device):
    return load_prompt_encoder(base.root, base.family.name, DTYPES[model.get("frozen_dtype", "float32")], device)
