"""Latent normalisation of a trained VAE (`pyramid_flow.json` latent_normalization): the mean and 1/std
of the posterior means, separately for the first latent frame and the later ones, as the published
checkpoints carry them."""
import torch
from .data import LATENT_KEY, read_annotations
from .shards import load_tensors


def latent_normalization(annotations, limit: int) -> dict:
    """Shift and scale from the latents of the first `limit` lines of a latent annotations jsonl."""
    entries, _ = read_annotations(annotations)
    latents = [load_tensors(entry.latent)[LATENT_KEY].float() for entry in entries[:limit]]
    first = [z[:, :1] for z in latents]
    later = [z[:, 1:] for z in latents if z.shape[1] > 1]
    first_shift, first_std = moments(first)
    later_shift, later_std = moments(later) if later else (first_shift, first_std)
    return {"first_shift": first_shift, "first_scale": 1 / first_std, "later_shift": later_shift,
            "later_scale": 1 / later_std}


def moments(tensors: list) -> tuple:
    values = torch.cat([t.flatten() for t in tensors])
    return float(values.mean()), float(values.std())
