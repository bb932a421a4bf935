"""Causal video VAE training (Appendix B): L1 (or squared) reconstruction of the clip plus a KL term on
the posterior; `task: vae` in a recipe. Checkpoints hold `causal_video_vae/`, loadable by the app.
An adversarial or perceptual term is not part of this objective.

`objective.foreground_weight` w > 0 weighs the pixels that stand out from their frame's background (its
per-channel median) by 1 + w: on sparse scenes, such as a small shape on a plain ground, the plain mean
is dominated by the background and the colour of the subject is learned last.

`model.trainable: decoder` freezes the encoder (and `quant_conv`), so every latent stays what it was:
the decoder of a VAE whose latents a transformer already learns from can be trained further."""
import torch
from torch import nn

from model_core.checkpoints import VAE_FOLDER

from .data import check_buckets
from .models import base_checkpoint, build_vae
from .objective import sample_generator
from .weights import load_weights, save_weights


class Autoencoding(nn.Module):
    """encode -> posterior sample -> decode in one forward, so data-parallel wrappers see the whole pass."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, video: torch.Tensor, generators: list):
        """generators: one per batch element, so a sample's posterior noise does not depend on its batch."""
        posterior = self.vae.encode(video).latent_dist
        return self.vae.decode(posterior.sample(generators)).sample, posterior.kl()


FOREGROUND_MARGIN = 0.1  # how far (in [-1, 1] pixel units) a pixel must be from the background to count
TRAINABLE_PARTS = ("all", "decoder")
RECONSTRUCTION_ERRORS = {"l1": lambda d: d.abs(), "l2": lambda d: d.square()}


def foreground_weights(video: torch.Tensor, weight: float) -> torch.Tensor:
    """[B, 1, T, H, W]: 1 + weight where a pixel differs from its frame's per-channel median by more than the margin."""
    background = video.flatten(-2).median(dim=-1).values[..., None, None]
    standing_out = (video - background).abs().amax(dim=1, keepdim=True) > FOREGROUND_MARGIN
    return 1 + weight * standing_out.to(video.dtype)


def same_shape_groups(samples: list) -> dict:
    """{pixel shape: indices of the samples with it}, in order: the batches one forward can take."""
    groups = {}
    for i, sample in enumerate(samples):
        groups.setdefault(tuple(sample.pixels.shape), []).append(i)
    return groups


class VAETask:
    """Per-sample loss = weighted mean err(decode(z) - x) + kl_weight * KL(q(z|x) || N(0, I)) / elements of x,
    err = |.| (`objective.reconstruction: l1`, the default) or its square (`l2`)."""

    def __init__(self, config: dict, device):
        self.model_config, self.seed = config["model"], config["train"]["seed"]
        objective = config["objective"]
        self.kl_weight = objective["kl_weight"]
        self.foreground_weight = float(objective.get("foreground_weight") or 0.0)
        reconstruction = objective.get("reconstruction", "l1")
        if reconstruction not in RECONSTRUCTION_ERRORS:
            raise ValueError(f"objective.reconstruction is {reconstruction!r}; use one of {sorted(RECONSTRUCTION_ERRORS)}")
        if self.foreground_weight < 0:
            raise ValueError(f"objective.foreground_weight must be >= 0; got {self.foreground_weight}")
        self.error = RECONSTRUCTION_ERRORS[reconstruction]
        parts = self.model_config.get("trainable", "all")
        if parts not in TRAINABLE_PARTS:
            raise ValueError(f"model.trainable is {parts!r}; use one of {list(TRAINABLE_PARTS)}")
        self.base = base_checkpoint(self.model_config)
        self.model = Autoencoding(build_vae(self.model_config, self.base, self.seed, trainable=True))
        scale = self.model.vae.spatial_scale
        check_buckets((config.get("data") or {}).get("buckets", []), scale, f"the VAE ({scale}x)")
        if parts == "decoder":
            self.model.vae.encoder.requires_grad_(False)
            self.model.vae.quant_conv.requires_grad_(False)
        self.device = device

    @property
    def frames_per_latent(self) -> int:
        return self.model.vae.temporal_scale

    def losses(self, model, samples: list, step: int) -> dict:
        """Samples of one shape are coded together (one call per shape); each keeps its own posterior noise."""
        losses, tokens = [None] * len(samples), 0
        for indices in same_shape_groups(samples).values():
            video = torch.cat([samples[i].pixels for i in indices]).to(self.device)
            generators = [sample_generator(self.seed, step, samples[i].request.slot) for i in indices]
            reconstruction, kl = model(video, generators)
            error = self.error(reconstruction.float() - video)
            if self.foreground_weight:
                error = error * foreground_weights(video, self.foreground_weight)
            per_sample = error.flatten(1).mean(dim=1) + self.kl_weight * kl.float() / video[0].numel()
            for i, loss in zip(indices, per_sample):
                losses[i] = loss
            tokens += len(indices) * video[0, 0].numel()
        return {"loss": torch.stack(losses), "stage": [], "tokens": tokens}

    def save(self, folder, state: dict, ema_state) -> None:
        for name, weights in ((VAE_FOLDER, state), (f"{VAE_FOLDER}_ema", ema_state)):
            if weights is not None:
                save_weights(folder / name, self.model.vae, {k.removeprefix("vae."): v for k, v in weights.items()})

    def load(self, folder) -> None:
        load_weights(self.model.vae, folder / VAE_FOLDER)
