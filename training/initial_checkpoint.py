"""A from-scratch starting point in the official layout: offline-built text encoders and tokenizers, a
freshly initialised causal VAE and transformer (drawn from a torch.Generator), and `pyramid_flow.json`
with the variant's size. The recipes train from it like from a published checkpoint."""
import json
import shutil
from pathlib import Path

import torch

from model_core.checkpoints import FAMILIES, SETTINGS_FILE, VAE_FOLDER, transformer_folder
from model_core.init import reinitialize

from .models import transformer_class
from .tiny_text import write_tiny_text_stack
from .weights import save_weights

INITIAL_POSTERIOR_LOGVAR = -8.0  # std 0.018: early reconstructions see the encoder's mean, not the prior's noise


@torch.no_grad()
def narrow_posterior(vae, logvar: float = INITIAL_POSTERIOR_LOGVAR):
    """Start the VAE's posterior N(mean, exp(logvar)) at a fixed small variance: the log-variance rows of
    `quant_conv` (which turns the encoder's features into the moments) get a zero kernel and a constant
    bias; training then learns the variance like any weight."""
    if not vae.config.encoder_double_z:  # a deterministic encoder has no variance to set
        return vae
    conv = vae.quant_conv.conv
    half = conv.out_channels // 2
    conv.weight[half:] = 0
    conv.bias[half:] = logvar
    return vae


def write_initial_checkpoint(root, architecture: dict, corpus, seed: int) -> Path:
    """Write the checkpoint `architecture` describes (family, variant, spec, text, vae, transformer) to `root`."""
    from model_core.vae import CausalVideoVAE

    root = Path(root)
    family = FAMILIES[architecture["family"]]
    staging = root.with_name(root.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    text = architecture["text"]
    dims = write_tiny_text_stack(staging, family.name, t5_dim=text["t5_dim"], clip_dim=text["clip_dim"], seed=seed,
                                 corpus=list(corpus))
    generator = torch.Generator().manual_seed(seed)
    vae = narrow_posterior(reinitialize(CausalVideoVAE.from_config(dict(architecture["vae"])), generator))
    transformer_config = dict(architecture["transformer"], joint_attention_dim=dims["joint_attention_dim"],
                              pooled_projection_dim=dims["pooled_projection_dim"])
    transformer = reinitialize(transformer_class(family.name).from_config(transformer_config), generator)
    save_weights(staging / VAE_FOLDER, vae, vae.state_dict())
    transformer_path = staging / transformer_folder(architecture["variant"])
    save_weights(transformer_path, transformer, transformer.state_dict())
    name_as_published(transformer_path / "config.json", family.transformer_class)
    settings = {"variants": {architecture["variant"]: dict(architecture["spec"])}}
    (staging / SETTINGS_FILE).write_text(json.dumps(settings, indent=2))
    staging.rename(root)
    return root


def name_as_published(config_path: Path, class_name: str) -> None:
    """Set `_class_name` to the name the published configs use, which family detection reads."""
    config = json.loads(config_path.read_text())
    config["_class_name"] = class_name
    config_path.write_text(json.dumps(config, indent=2))
