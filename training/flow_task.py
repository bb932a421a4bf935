"""Pyramidal flow matching as a training task: samples -> per-sample losses, and the checkpoint files
the app loads (an official-layout root whose VAE and text folders link to the base checkpoint)."""
import json
import os
from dataclasses import asdict

import torch
import torch.nn.functional as F

from model_core.checkpoints import SETTINGS_FILE, VAE_FOLDER, transformer_folder
from model_core.scheduler import PyramidFlowScheduler
from model_core.text import PromptEmbeddings

from .data import check_buckets, first_annotation, load_text_features, vae_spatial_scale
from .models import base_checkpoint, build_prompt_encoder, build_transformer, build_vae
from .objective import build_column, draw_choices, sample_generator
from .weights import load_lora_weights, load_weights, save_lora_weights, save_weights

EMA_SUFFIX = "_ema"


def velocity_losses(model, columns, texts, packed: bool) -> torch.Tensor:
    """Per-column MSE of the predicted velocity of the current unit (Eq. 11); the columns run as one packed sequence
    (`packed`) or one by one."""
    velocities = model(
        sample=[c.clips for c in columns],
        encoder_hidden_states=torch.cat([t.hidden_states for t in texts]),
        encoder_attention_mask=torch.cat([t.attention_mask for t in texts]),
        pooled_projections=torch.cat([t.pooled for t in texts]),
        timestep=torch.tensor([c.timestep for c in columns], device=texts[0].hidden_states.device),
        return_dict=False,
        packed=packed,
    )[0]
    return torch.stack([F.mse_loss(v.float(), c.target) for v, c in zip(velocities, columns)])


class FlowTask:
    """Trains the transformer the app loads on the objective of `training.objective`."""

    def __init__(self, config: dict, annotations: list, device):
        self.model_config, self.objective = config["model"], config["objective"]
        self.seed = config["train"]["seed"]
        self.packed = config["train"].get("pack_samples", True)  # a micro-batch runs as one packed sequence
        self.base = base_checkpoint(self.model_config)
        self.model = build_transformer(self.model_config, self.base, self.seed)
        self.scheduler = PyramidFlowScheduler(stages=self.objective["stages"])
        stages = self.objective["stages"]  # the coarsest of the pyramid's levels still needs whole 2x2 patches
        check_buckets(config["data"]["buckets"], vae_spatial_scale(self.base) * 2 * 2 ** (stages - 1),
                      f"the VAE ({vae_spatial_scale(self.base)}x), 2x2 patches and {stages} pyramid stages")
        self.normalization = self.base.family.normalization
        self.device = device
        first = first_annotation(annotations)  # one line decides; a later line without the files is skipped
        self.use_latents, self.use_text_features = bool(first.latent), bool(first.text_fea)
        self.vae = None if self.use_latents else build_vae(self.model_config, self.base).to(device)
        empty = config["data"].get("empty_text_fea")
        needs_encoder = not self.use_text_features or not empty
        self.prompt_encoder = build_prompt_encoder(self.model_config, self.base, device) if needs_encoder else None
        self.empty_text = load_text_features(empty) if empty else self.prompt_encoder.encode("", device=device)

    @property
    def frames_per_latent(self) -> int:
        return self.base.spec.frames_per_latent

    @property
    def lora(self) -> bool:
        return bool(self.model_config.get("lora"))

    def draw(self, step: int, slot: int):
        o = self.objective
        generator = sample_generator(self.seed, step, slot)
        return draw_choices(generator, o["stages"], o["history_noise_max"], o["text_dropout"]), generator

    @torch.no_grad()
    def clean_latents(self, sample) -> torch.Tensor:
        latent = sample.latent
        if latent is None:
            latent = self.vae.encode(sample.pixels.to(self.device, self.vae.dtype)).latent_dist.mean
        return self.normalization.normalize(latent.float().to(self.device))

    def text_of(self, sample, drop: bool) -> PromptEmbeddings:
        if drop:
            return self.empty_text
        if sample.text_features is not None:
            return sample.text_features
        return self.prompt_encoder.encode(sample.text, device=self.device)

    def column(self, sample, step: int) -> tuple:
        """(the sample's column with its velocity target, its text) at `step`."""
        choices, generator = self.draw(step, sample.request.slot)
        column = build_column(self.clean_latents(sample), choices, generator, self.scheduler)
        return column, self.text_of(sample, choices.drop_text).to(self.device)

    def columns(self, model, samples: list, step: int) -> tuple:
        """(columns, texts) of a micro-batch; the flow target needs no model."""
        return tuple(zip(*(self.column(sample, step) for sample in samples)))

    def losses(self, model, samples: list, step: int) -> dict:
        """Per-sample MSE on the current unit (Eq. 11), with each sample's stage and token count."""
        columns, texts = self.columns(model, samples, step)
        losses = velocity_losses(model, columns, texts, self.packed)
        return {"loss": losses, "stage": [c.stage for c in columns], "tokens": sum(c.tokens for c in columns)}

    # --- checkpoint files ----------------------------------------------------------------------

    @property
    def variant(self) -> str:
        """The variant folder checkpoints are written as (`model.save_variant`, default: the base's)."""
        return self.model_config.get("save_variant") or self.base.variant

    def save(self, folder, state: dict, ema_state) -> None:
        variant = self.variant
        if self.lora:
            save_lora_weights(folder / "lora", self.model, self.model_config["lora"], state)
            if ema_state is not None:
                save_lora_weights(folder / f"lora{EMA_SUFFIX}", self.model, self.model_config["lora"], ema_state)
            return
        save_weights(folder / transformer_folder(variant), self.model, state)
        if ema_state is not None:
            save_weights(folder / transformer_folder(variant + EMA_SUFFIX), self.model, ema_state)
        self.link_base_components(folder, with_ema=ema_state is not None)

    def link_base_components(self, folder, with_ema: bool) -> None:
        """Make `folder` a checkpoint root the app loads: base VAE/text folders linked, settings written."""
        for name in (VAE_FOLDER, *self.base.family.text_folders):
            os.symlink((self.base.root / name).resolve(), folder / name, target_is_directory=True)
        source = self.base.root / SETTINGS_FILE
        settings = json.loads(source.read_text()) if source.is_file() else {}
        if with_ema:
            spec = self.base.family.variants[self.variant]
            settings.setdefault("variants", {})[self.variant + EMA_SUFFIX] = asdict(spec)
        (folder / SETTINGS_FILE).write_text(json.dumps(settings, indent=2))

    def load(self, folder) -> None:
        """Load the trained weights of a checkpoint into the (unwrapped) model."""
        if self.lora:
            load_lora_weights(self.model, folder / "lora")
        else:
            load_weights(self.model, folder / transformer_folder(self.variant))

    def render_validation(self, folder, validation: dict, out_dir) -> None:
        """Render the recipe's validation prompts with the pipeline the app uses, from the saved checkpoint."""
        from model_core.lora import load_lora_adapter
        from model_core.pipeline import PyramidFlowPipeline
        from model_core.media_files import write_video

        if self.lora:
            pipe = PyramidFlowPipeline.from_pretrained(self.base.root, variant=self.base.variant, device=self.device)
            load_lora_adapter(pipe.transformer, folder / "lora")
        else:
            pipe = PyramidFlowPipeline.from_pretrained(folder, variant=self.variant, device=self.device)
        options = {k: validation[k] for k in ("num_frames", "height", "width", "guidance_scale", "video_guidance_scale")
                   if k in validation}
        for key in ("first_frame_steps", "video_steps"):
            if key in validation:
                options[key] = tuple(validation[key])
        for index, prompt in enumerate(validation["prompts"]):
            result = pipe.text_to_video(prompt, seed=validation.get("seed", 0), **options)
            write_video(result.frames[0], out_dir / f"{index:02d}.mp4", result.fps, result.settings)
