"""The bundled VAE's training step on the CPU, two 17-frame world clips: coded in one call vs one call per clip.

    python -m benchmarks.vae_train_step [--repeats 5]

`training.vae_objective.VAETask.losses` codes the samples of one shape together; before, it coded each on its
own (a batch of one). Both ways are timed in one run (loss, backward) on the same clips, step and posterior
noise; their losses must agree.
"""
import argparse
from types import SimpleNamespace

import torch

from benchmarks.timing import timed_side_by_side
from model_core.media import to_video_tensor
from pyramid_app.options.settings import BUNDLED_MODEL
from training.config import load_config
from training.shapes_world import FRAME_SIZE, PROMPTS, render_clip
from training.vae_objective import VAETask

RECIPE = "training/configs/tiny_shapes_vae.yaml"  # its objective, applied to the bundled VAE


def world_samples(count: int) -> list:
    return [SimpleNamespace(pixels=to_video_tensor(torch.from_numpy(render_clip(PROMPTS[slot], slot)), FRAME_SIZE, FRAME_SIZE),
                            request=SimpleNamespace(slot=slot)) for slot in range(count)]


def training_step(task: VAETask, calls: list) -> torch.Tensor:
    """Forward + backward over `calls` (lists of samples coded together); returns the losses."""
    task.model.zero_grad(set_to_none=True)
    losses = torch.cat([task.losses(task.model, samples, step=0)["loss"] for samples in calls])
    losses.sum().backward()
    return losses.detach()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vae_train_step", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    recipe = load_config(RECIPE, [f"model.pretrained={BUNDLED_MODEL}"])
    task = VAETask(recipe, "cpu")
    samples = world_samples(2)
    one_call, per_clip = [samples], [[s] for s in samples]
    apart, together, difference = timed_side_by_side(lambda calls: training_step(task, calls), per_clip, one_call,
                                                     args.repeats)
    print(f"VAE training step, 2 clips of 17 frames: one call per clip {apart:.2f} s, one call {together:.2f} s, "
          f"x{apart / together:.1f}; largest relative loss difference {difference:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
