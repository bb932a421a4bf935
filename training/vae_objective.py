"""Causal video VAE training (Appendix B): L1 reconstruction of the clip plus a KL term on the
posterior; `task: vae` in a recipe. Checkpoints hold `causal_video_vae/`, loadable by the app.
An adversarial or perceptual term is not part of this objective."""
import torch
from torch import nn

from model_core.checkpoints import VAE_FOLDER

from .models import base_checkpoint, build_vae
from .objective import sample_generator
from .weights import load_weights, save_weights


class Autoencoding(nn.Module):
    """encode -> posterior sample -> decode in one forward, so data-parallel wrappers see the whole pass."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, video: torch.Tensor, generator: torch.Generator):
        posterior = self.vae.encode(video).latent_dist
        return self.vae.decode(posterior.sample(generator)).sample, posterior.kl()


class VAETask:
    """Per-sample loss = mean |decode(z) - x| + kl_weight * KL(q(z|x) || N(0, I)) / elements of x."""

    def __init__(self, config: dict, device):
        self.model_config, self.seed = config["model"], config["train"]["seed"]
        self.kl_weight = config["objective"]["kl_weight"]
        self.base = base_checkpoint(self.model_config)
        self.model = Autoencoding(build_vae(self.model_config, self.base, self.seed, trainable=True))
        self.device = device

    def losses(self, model, samples: list, step: int) -> dict:
        losses, tokens = [], 0
        for sample in samples:
            video = sample.pixels.to(self.device)
            reconstruction, kl = model(video, sample_generator(self.seed, step, sample.request.slot))
            losses.append((reconstruction.float() - video).abs().mean() + self.kl_weight * kl.float().sum() / video.numel())
            tokens += video[0, 0].numel()
        return {"loss": torch.stack(losses), "stage": [], "tokens": tokens}

    def save(self, folder, state: dict, ema_state) -> None:
        for name, weights in ((VAE_FOLDER, state), (f"{VAE_FOLDER}_ema", ema_state)):
            if weights is not None:
                save_weights(folder / name, self.model.vae, {k.removeprefix("vae."): v for k, v in weights.items()})

    def load(self, folder) -> None:
        load_weights(self.model.vae, folder / VAE_FOLDER)
