"""`task: bundle`: a model from nothing, in phases that each skip when their output exists (so a rerun
resumes where the last one stopped):

world (shapes_world clips) -> init (initial_checkpoint) -> vae (the `task: vae` recipe) -> base (init with
the trained VAE) -> latents and text features (the extraction tools) -> latent normalisation (written
into the base's pyramid_flow.json) -> flow (the `task: flow` recipe) -> vae_decoder (the VAE's decoder
trained further with its encoder frozen, so the latents the transformer learned stay valid) -> the
bundled model: the base with the trained transformer, the refined VAE and `bundle.model_card` as
README.md, copied (no links) into `bundle.out` (default `<output_dir>/model`; the shipped model is rebuilt
with `bundle.out=assets/models/pyramid-flow-shapes`) in the official layout.

Everything after the VAE lives under `<output_dir>/from-vae-checkpoint-<steps>/`, so training the VAE
longer rebuilds the base, features and transformer. The phase recipes are ordinary recipe files;
`phases.<name>.overrides` (a nested dict) is merged into them, and `train.max_steps`, when set on the
bundle, caps both training phases.
"""
import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model_core.checkpoints import SETTINGS_FILE, VAE_FOLDER, transformer_folder
from model_core.loading import resolve_checkpoint

from .atomic import write_text
from .checkpointing import STATE_FOLDER, checkpoint_path
from .config import load_config, recipe_path
from .flow_task import EMA_SUFFIX
from .initial_checkpoint import write_initial_checkpoint
from .shapes_world import PROMPTS, write_world

logger = logging.getLogger(__name__)
MODEL_CARD = "README.md"


def merged(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in (changes or {}).items():
        out[key] = merged(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def phase_recipe(config: dict, name: str, changes: dict) -> dict:
    """A phase's recipe file with the bundle's overrides for it and the paths it gets from earlier phases."""
    phase = config["phases"][name]
    recipe = merged(load_config(phase["recipe"]), phase.get("overrides") or {})
    recipe = merged(recipe, changes)
    if config["train"].get("max_steps") is not None:
        recipe["train"]["max_steps"] = config["train"]["max_steps"]
    return recipe


def run_training(recipe: dict) -> Path:
    """Train a phase recipe to its last step (resuming an interrupted run); returns its last checkpoint."""
    from .loop import train

    output = Path(recipe["train"]["output_dir"])
    final = checkpoint_path(output, recipe["train"]["max_steps"])
    if not final.is_dir():
        train(recipe, output, "auto")
    return final


def copy_folder(source: Path, target: Path) -> None:
    shutil.copytree(source, target, symlinks=False)


def build_base(init: Path, vae_checkpoint: Path, base: Path) -> None:
    """The initial checkpoint with the trained VAE in place of the random one."""
    staging = base.with_name(base.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    copy_folder(init, staging)
    shutil.rmtree(staging / VAE_FOLDER)
    copy_folder(vae_checkpoint / VAE_FOLDER, staging / VAE_FOLDER)
    staging.rename(base)


def update_settings(root: Path, changes: dict) -> None:
    path = root / SETTINGS_FILE
    write_text(path, json.dumps(json.loads(path.read_text()) | changes, indent=2))


def run_tool(module, argv: list) -> None:
    if module.main(argv) != 0:
        raise ValueError(f"{module.__name__} failed on {argv}; its message is above")


def extract_features(base: Path, world: Path, work: Path) -> tuple:
    """(annotations with latent + text features, empty-prompt features), each tool run once; clips as long as the
    base's variant allows."""
    from . import extract_latents, extract_text_features

    latents, text = work / "latents", work / "text"
    spec = resolve_checkpoint(base).spec
    if not (latents / "annotations.jsonl").is_file():
        run_tool(extract_latents, ["--model", str(base), "--annotations", str(world), "--output-dir", str(latents),
                                   "--fps", str(spec.fps), "--seconds", str(spec.max_frames / spec.fps),
                                   "--buckets", f"{spec.height}x{spec.width}"])
    if not (text / "annotations.jsonl").is_file():
        run_tool(extract_text_features, ["--model", str(base), "--annotations", str(latents / "annotations.jsonl"),
                                         "--output-dir", str(text)])
    return text / "annotations.jsonl", text / extract_text_features.EMPTY_TEXT_FILE


def assemble(base: Path, flow_checkpoint: Path, vae_checkpoint: Path, variant: str, use_ema: bool, model_card: Path,
             out: Path, sampling: dict = None) -> Path:
    """The base's text stack and settings with the trained transformer and VAE and the model card, copied into `out`;
    `sampling` (steps and guidance the model is generated with by default) goes into its settings."""
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    copy_folder(base, staging)
    for folder in (transformer_folder(variant), VAE_FOLDER):
        shutil.rmtree(staging / folder)
    trained = flow_checkpoint / transformer_folder(variant + (EMA_SUFFIX if use_ema else ""))
    copy_folder(trained, staging / transformer_folder(variant))
    copy_folder(vae_checkpoint / VAE_FOLDER, staging / VAE_FOLDER)
    shutil.copy2(model_card, staging / MODEL_CARD)
    if sampling:
        update_settings(staging, {"sampling": sampling})
    return move_into_place(staging, out)


def move_into_place(staging: Path, out: Path) -> Path:
    """Rename the finished `staging` folder to `out`, replacing what was there only once the new one is in place."""
    old = out.with_name(out.name + ".old")
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def run_bundle(config: dict) -> Path:
    work = Path(config["train"]["output_dir"])
    work.mkdir(parents=True, exist_ok=True)
    seed = config["train"]["seed"]
    architecture = config["architecture"]
    world_config = config["world"]
    world = Path(world_config["out"]) / "train.jsonl"
    if not world.is_file():
        logger.info("writing the shapes world to %s", world.parent)
        write_world(world.parent, world_config["count"], world_config["seed"], world_config["heldout"])
    init = work / "init"
    if not init.is_dir():
        write_initial_checkpoint(init, architecture, PROMPTS, seed)
    vae = run_training(phase_recipe(config, "vae", {
        "model": {"pretrained": str(init), "variant": architecture["variant"]},
        "data": {"annotations": [str(world)]}, "train": {"output_dir": str(work / "vae"), "seed": seed}}))
    after_vae = work / f"from-vae-{vae.name}"  # what depends on the VAE is redone when the VAE changes
    base = after_vae / "base"
    if not base.is_dir():
        after_vae.mkdir(parents=True, exist_ok=True)
        build_base(init, vae, base)
    features, empty_text = extract_features(base, world, after_vae)
    settings = json.loads((base / SETTINGS_FILE).read_text())
    if "latent_normalization" not in settings:
        from .latent_statistics import latent_normalization

        normalization = latent_normalization(features, config["latent_statistics"]["clips"])
        update_settings(base, {"latent_normalization": normalization})
    flow = run_training(phase_recipe(config, "flow", {
        "model": {"pretrained": str(base), "variant": architecture["variant"]},
        "data": {"annotations": [str(features)], "empty_text_fea": str(empty_text)},
        "train": {"output_dir": str(after_vae / "flow"), "seed": seed}}))
    decoder = run_training(phase_recipe(config, "vae_decoder", {
        "model": {"pretrained": str(base), "variant": architecture["variant"]},
        "data": {"annotations": [str(world)]}, "train": {"output_dir": str(after_vae / "vae_decoder"), "seed": seed}}))
    bundle = config["bundle"]
    out = assemble(base, flow, decoder, architecture["variant"], bundle["use_ema"], recipe_path(bundle["model_card"]),
                   Path(bundle.get("out") or work / "model"), bundle.get("sampling"))
    logger.info("bundled model written to %s", out)
    return out


def bundle_student(config: dict) -> Path:
    """The recipe's last checkpoint (trained first when missing) as a model folder at `bundle.out`: no training state,
    the EMA weights as the transformer when `bundle.use_ema` and the run kept them, its floating-point weights stored
    in `bundle.weights_dtype`, and `bundle.model_card` as README.md."""
    bundle = config["bundle"]
    final = run_training(config)
    variant = resolve_checkpoint(final).variant
    out = Path(bundle["out"])
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    ema = transformer_folder(variant + EMA_SUFFIX)
    shutil.copytree(final, staging, ignore=shutil.ignore_patterns(STATE_FOLDER, ema))
    if bundle.get("use_ema", True) and (final / ema).is_dir():
        shutil.rmtree(staging / transformer_folder(variant))
        shutil.copytree(final / ema, staging / transformer_folder(variant))
    dtype = getattr(torch, bundle.get("weights_dtype") or "bfloat16")
    for weights in (staging / transformer_folder(variant)).glob("*.safetensors"):
        tensors = load_file(weights)
        save_file({name: t.to(dtype) if t.is_floating_point() else t for name, t in tensors.items()}, weights)
    if bundle.get("model_card"):
        shutil.copy2(recipe_path(bundle["model_card"]), staging / MODEL_CARD)
    drop_build_paths(staging)
    return move_into_place(staging, out)


def drop_build_paths(folder: Path) -> None:
    """Leave `_name_or_path` (where a model was once loaded from: a path on the machine that built it) out of the
    components' config.json files, which the teacher's copied folders may still carry."""
    for config in folder.glob("*/config.json"):
        values = json.loads(config.read_text())
        if values.pop("_name_or_path", None) is not None:
            write_text(config, json.dumps(values, indent=2, sort_keys=True) + "\n")
