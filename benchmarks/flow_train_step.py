"""The bundled transformer's training step on the CPU, batch 8: float32 vs bfloat16 autocast.

    python -m benchmarks.flow_train_step [--repeats 5]

The bundled model's flow recipe (`training/configs/tiny_shapes_flow.yaml`, its objective and batch) on eight
world clips coded by the bundled VAE and their prompts: the per-sample losses (Eq. 11) and their backward,
timed in one run in float32 and under `torch.autocast("cpu", torch.bfloat16)` (what `train.mixed_precision:
bf16` turns on) on the same columns. The optimizer step is left out: it runs in float32 either way.
"""
import argparse
import contextlib
from types import SimpleNamespace

import torch

from benchmarks.timing import timed_side_by_side
from benchmarks.vae_train_step import world_samples
from pyramid_app.options.settings import BUNDLED_MODEL
from training.config import load_config
from training.flow_task import FlowTask
from training.models import build_vae
from training.shapes_world import PROMPTS

RECIPE = "training/configs/tiny_shapes_flow.yaml"


@torch.no_grad()
def flow_samples(task: FlowTask, count: int) -> list:
    """World clips as the flow phase reads them: raw latents [1, C, t, h, w] and the prompts' text features."""
    vae = build_vae(task.model_config, task.base)
    return [SimpleNamespace(latent=vae.encode(s.pixels).latent_dist.mean, request=s.request,
                            text_features=task.prompt_encoder.encode(PROMPTS[s.request.slot]))
            for s in world_samples(count)]


def training_step(task: FlowTask, samples: list, precision) -> torch.Tensor:
    """Losses of one step (forward under `precision`) and their backward; returns the losses."""
    task.model.zero_grad(set_to_none=True)
    with precision():
        losses = task.losses(task.model, samples, step=0)["loss"]
    losses.mean().backward()
    return losses.detach()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.flow_train_step", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    recipe = load_config(RECIPE, [f"model.pretrained={BUNDLED_MODEL}"])
    task = FlowTask(recipe, [], "cpu")
    samples = flow_samples(task, recipe["train"]["global_batch_size"])
    float32 = contextlib.nullcontext
    bfloat16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    full, mixed, difference = timed_side_by_side(lambda precision: training_step(task, samples, precision), float32,
                                                 bfloat16, args.repeats)
    print(f"flow training step, batch {len(samples)}: float32 {full:.2f} s, bfloat16 autocast {mixed:.2f} s, "
          f"x{full / mixed:.2f}; largest relative loss difference {difference:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
