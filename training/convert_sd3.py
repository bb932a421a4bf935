"""`python -m training.convert_sd3 --from SD3_FOLDER --vae ROOT --out OUT [--variant 384p] [--qk-norm unit|identity]`:
SD3-Medium's MM-DiT (a diffusers folder with `transformer/`, as `stabilityai/stable-diffusion-3-medium-diffusers`
is laid out) as the pyramid MMDiT of an official-layout checkpoint, where stage 1 of the paper starts (Sec. 4.1).

Every transformer weight is mapped (diffusers names the text stream's q/k norms `norm_added_q/k`, the official
layout `norm_add_q/k`) and none may be left over. SD3-Medium has no q/k norms (`qk_norm: null`) where the pyramid
MMDiT always has per-head RMS norms of q and k; those norms are new, and the tool says so and how they start:

- `--qk-norm unit` (default, the pyramid MMDiT as published): weights 1, eps 1e-5. Every q and k head is scaled to
  unit RMS, so the converted model no longer computes SD3-Medium's function (relative output change 0.51 on a tiny
  SD3 with weight std 0.3: benchmarks/RESULTS.md); stage 1 then learns the norms from there.
- `--qk-norm identity`: eps 1e8 and weights 1e4 (`qk_norm_eps` in the config), so each norm multiplies its head
  by (1 + mean(q²) / 1e8)^(-1/2), 1 to within ~1e-6 at the scales SD3's q and k have: the converted model starts
  from SD3-Medium's function (change 7e-7 on the same tiny SD3), and q/k stay effectively unnormalised in training,
  as SD3-Medium was trained.

What the pyramid MMDiT adds has no weights: temporal RoPE over the frames and the causal mask between them. The
text encoders and tokenizers are copied from the SD3 folder as the paper reuses them; SD3's VAE is an image VAE,
so the causal video VAE (and latent statistics) come from `--vae`, a checkpoint root with `causal_video_vae/` (the
published sd3 model's, or one trained with vae.yaml)."""
import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from model_core.checkpoints import SETTINGS_FILE, VAE_FOLDER, transformer_folder

from .atomic import fresh_staging, publish
from .tool import run_tool
from .weights import save_weights

TEXT_FOLDERS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
QK_NORMS = ("norm_q", "norm_k", "norm_add_q", "norm_add_k")
IDENTITY_EPS = 1e8  # >> mean(q²) of any head, yet sqrt(eps) = 1e4 is a weight float16 holds
QK_INITS = {"unit": (1e-5, 1.0), "identity": (IDENTITY_EPS, IDENTITY_EPS**0.5)}  # (eps, weight) of the new norms
RENAMED = {".attn.norm_added_q.": ".attn.norm_add_q.", ".attn.norm_added_k.": ".attn.norm_add_k."}
SHARED_CONFIG = ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
                 "caption_projection_dim", "pooled_projection_dim", "pos_embed_max_size", "joint_attention_dim")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m training.convert_sd3", description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", required=True, help="diffusers SD3 folder (with transformer/)")
    parser.add_argument("--vae", required=True, help="checkpoint root whose causal_video_vae/ the model will use")
    parser.add_argument("--out", required=True, help="official-layout folder to write")
    parser.add_argument("--variant", default="384p", help="the diffusion_transformer_<variant> folder name")
    parser.add_argument("--qk-norm", default="unit", choices=sorted(QK_INITS),
                        help="how the q/k RMS norms SD3-Medium lacks start: unit (the published pyramid MMDiT; outputs "
                             "change) or identity (outputs stay SD3's)")
    return parser.parse_args(argv)


def read_transformer(folder: Path) -> tuple:
    """(config, state dict) of a diffusers transformer folder, single or sharded safetensors."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; --from must be a diffusers SD3 folder with transformer/")
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else \
        ["diffusion_pytorch_model.safetensors"]
    state = {}
    for name in files:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} is missing (safetensors weights are needed)")
        state.update(load_file(str(folder / name)))
    return json.loads(config_path.read_text()), state


def pyramid_config(sd3: dict, qk_norm: str = "unit") -> dict:
    """The pyramid MMDiT config of an SD3 transformer config; refuses what has no counterpart."""
    if sd3.get("dual_attention_layers"):
        raise ValueError("this SD3 transformer has dual-attention layers (SD3.5); only SD3-Medium's MM-DiT maps onto "
                         "the pyramid MMDiT")
    if sd3.get("out_channels") not in (None, sd3.get("in_channels", 16)):
        raise ValueError(f"out_channels={sd3['out_channels']} differs from in_channels; the pyramid MMDiT predicts a "
                         "velocity of the latent's own channels")
    if sd3.get("qk_norm") not in (None, "rms_norm"):
        raise ValueError(f"qk_norm={sd3['qk_norm']!r}: only none or rms_norm map onto the pyramid MMDiT's RMS norms")
    config = {key: sd3[key] for key in SHARED_CONFIG if key in sd3}
    return config | ({"qk_norm_eps": QK_INITS[qk_norm][0]} if sd3.get("qk_norm") is None else {})


def mapped_state(sd3_state: dict, model) -> tuple:
    """(our state dict, names of our weights SD3 lacks and that start at their initial value)."""
    renamed = {}
    for key, tensor in sd3_state.items():
        for old, new in RENAMED.items():
            key = key.replace(old, new)
        renamed[key] = tensor
    ours = model.state_dict()
    left_over = sorted(set(renamed) - set(ours))
    if left_over:
        raise ValueError(f"{len(left_over)} SD3 weights have no place in the pyramid MMDiT, e.g. {left_over[:3]}")
    wrong = [k for k in renamed if renamed[k].shape != ours[k].shape]
    if wrong:
        raise ValueError(f"shapes differ for {wrong[:3]}: {[tuple(renamed[k].shape) for k in wrong[:3]]} vs "
                         f"{[tuple(ours[k].shape) for k in wrong[:3]]}")
    new = sorted(set(ours) - set(renamed))
    not_norms = [k for k in new if ".norm_q." not in k and ".norm_k." not in k and ".norm_add_" not in k]
    if not_norms:
        raise ValueError(f"the SD3 weights lack {len(not_norms)} pyramid MMDiT weights, e.g. {not_norms[:3]}")
    return {k: renamed.get(k, ours[k]).float().contiguous() for k in ours}, new


def convert(args) -> str:
    from model_core.transformers import PyramidMMDiT

    source, vae_root, out = Path(args.source), Path(args.vae), Path(args.out)
    if not (vae_root / VAE_FOLDER / "config.json").is_file():
        raise FileNotFoundError(f"{vae_root} has no {VAE_FOLDER}/; --vae must be a checkpoint root with the causal "
                                "video VAE the model will train on")
    sd3_config, sd3_state = read_transformer(source / "transformer")
    with torch.device("meta"):
        model = PyramidMMDiT.from_config(pyramid_config(sd3_config, args.qk_norm))
    model = model.to_empty(device="cpu")
    weight = QK_INITS[args.qk_norm][1]
    for name, module in model.named_modules():  # what the new q/k norms start as (only those SD3 lacks are kept)
        if name.endswith(QK_NORMS) and getattr(module, "weight", None) is not None:
            torch.nn.init.constant_(module.weight, weight)
    state, new = mapped_state(sd3_state, model)
    staging = fresh_staging(out)
    save_weights(staging / transformer_folder(args.variant), model, state)
    for name in TEXT_FOLDERS:
        if (source / name).is_dir():
            shutil.copytree(source / name, staging / name)
    shutil.copytree(vae_root / VAE_FOLDER, staging / VAE_FOLDER)
    if (vae_root / SETTINGS_FILE).is_file():
        shutil.copy2(vae_root / SETTINGS_FILE, staging / SETTINGS_FILE)
    publish(out)
    return f"wrote {out} ({len(state) - len(new)} SD3 weights mapped{new_norms(new, args.qk_norm)})"


def new_norms(new: list, qk_norm: str) -> str:
    """What the summary says of the q/k norms the pyramid MMDiT has and the SD3 transformer lacked."""
    if not new:
        return ""
    if qk_norm == "unit":
        return (f"; {len(new)} new q/k norm weights at 1: SD3-Medium has no q/k norms, so the converted model's "
                "outputs differ from SD3's; --qk-norm identity keeps them")
    return (f"; {len(new)} new q/k norm weights at {QK_INITS[qk_norm][1]:g} with eps {QK_INITS[qk_norm][0]:g}: "
            "near-identity norms, the converted model computes SD3's function")


def main(argv=None) -> int:
    return run_tool(lambda: convert(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
