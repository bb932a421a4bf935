"""The VAE objective's options and the from-scratch VAE's narrow posterior."""
from types import SimpleNamespace

import pytest
import torch

from model_core.vae import CausalVideoVAE
from training.initial_checkpoint import INITIAL_POSTERIOR_LOGVAR, narrow_posterior
from training.vae_objective import VAETask, foreground_weights

from tiny_checkpoint import TINY_VAE, build_tiny_checkpoint


def test_foreground_weights_mark_pixels_that_stand_out_from_the_frame():
    video = torch.full((1, 3, 2, 8, 8), -1.0)
    video[0, 0, 0, 2:4, 2:4] = 0.8    # a red patch in frame 0
    video[0, :, 1, 5, 5] = -0.95      # within the margin of the background in frame 1
    weights = foreground_weights(video, 20.0)
    assert weights.shape == (1, 1, 2, 8, 8)
    expected = torch.ones(1, 1, 2, 8, 8)
    expected[0, 0, 0, 2:4, 2:4] = 21.0
    assert torch.equal(weights, expected)


def test_foreground_weights_follow_each_frames_own_background():
    video = torch.full((1, 3, 1, 8, 8), 0.5)  # a grey ground
    video[0, 2, 0, 0, 0] = -0.5
    assert foreground_weights(video, 3.0).sum().item() == 64 + 3


def vae_config(**objective):
    return {"model": {"pretrained": None}, "train": {"seed": 0}, "objective": {"kl_weight": 1e-6, **objective}}


@pytest.mark.parametrize("objective, message", [({"reconstruction": "huber"}, "use one of"),
                                                ({"foreground_weight": -1}, "must be >= 0")])
def test_vae_objective_rejects_bad_options(objective, message):
    with pytest.raises(ValueError, match=message):
        VAETask(vae_config(**objective), "cpu")


def test_narrow_posterior_fixes_the_initial_variance_and_keeps_the_mean():
    torch.manual_seed(0)
    vae = CausalVideoVAE.from_config(TINY_VAE).eval()
    video = torch.rand(2, 3, 9, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        before = vae.encode(video).latent_dist
        after = narrow_posterior(vae).encode(video).latent_dist
    assert torch.equal(after.mean, before.mean)
    assert torch.allclose(after.logvar, torch.full_like(after.logvar, INITIAL_POSTERIOR_LOGVAR))
    assert not torch.allclose(before.logvar, after.logvar)


def test_decoder_only_training_keeps_every_latent(tmp_path):
    model = build_tiny_checkpoint(tmp_path / "tiny")
    config = vae_config(reconstruction="l2", foreground_weight=5.0)
    config["model"] = {"pretrained": str(model), "trainable": "decoder"}
    task = VAETask(config, "cpu")
    vae = task.model.vae
    video = torch.rand(1, 3, 9, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(video).latent_dist.mean
    sample = SimpleNamespace(pixels=video, request=SimpleNamespace(slot=0))
    task.losses(task.model, [sample], step=0)["loss"].sum().backward()
    assert all(p.grad is None for p in vae.encoder.parameters()) and vae.quant_conv.conv.weight.grad is None
    assert all(p.grad is not None for p in vae.decoder.parameters())
    with torch.no_grad():
        assert torch.equal(vae.encode(video).latent_dist.mean, latents)


def test_unknown_trainable_part_is_rejected():
    config = vae_config()
    config["model"] = {"pretrained": None, "trainable": "encoder"}  # refused before any checkpoint is read
    with pytest.raises(ValueError, match="model.trainable is 'encoder'"):
        VAETask(config, "cpu")


def test_samples_coded_together_keep_the_losses_they_have_alone(tmp_path):
    config = vae_config(reconstruction="l2", foreground_weight=5.0, kl_weight=1.0)
    config["model"] = {"pretrained": str(build_tiny_checkpoint(tmp_path / "tiny"))}
    task = VAETask(config, "cpu")
    draw = torch.Generator().manual_seed(0)
    shapes = [(1, 3, 9, 32, 32), (1, 3, 1, 32, 32), (1, 3, 9, 32, 32)]  # two shapes: two forwards
    samples = [SimpleNamespace(pixels=torch.rand(s, generator=draw) * 2 - 1, request=SimpleNamespace(slot=slot))
               for slot, s in enumerate(shapes)]
    with torch.no_grad():
        together = task.losses(task.model, samples, step=3)
        alone = [task.losses(task.model, [s], step=3) for s in samples]
    assert torch.allclose(together["loss"], torch.cat([a["loss"] for a in alone]), rtol=1e-5, atol=0)
    assert together["tokens"] == sum(a["tokens"] for a in alone) == 2 * 9 * 32 * 32 + 32 * 32
    other_step = task.losses(task.model, samples[:1], step=4)["loss"]
    assert not torch.allclose(other_step, alone[0]["loss"])  # the posterior noise follows (seed, step, slot)
