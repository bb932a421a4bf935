"""Per-step work that depends only on shapes, recomputed vs reused, side by side on this CPU.

    python -m benchmarks.cpu_step_overhead [--repeats 5]

One transformer step of (a) the bundled shapes model at a 17-frame text-to-video's last unit (stage 3, two
history frames, guidance batch of 2) and (b) a random-weight miniFLUX of reduced width with the 384p latent grid
48x80 (2 dual + 2 single blocks, 4 heads of 32), also with guidance and a two-frame history. "recomputed" clears
what the transformer keeps per shape (RoPE angles, attention layouts) before every step (what every step did
before they were kept); "reused" is the pipeline's path. Both outputs are compared bit for bit.
"""
import argparse
import json

import torch

from benchmarks.timing import median_seconds
from model_core.transformers import PyramidFluxTransformer

TEXT_TOKENS = 128


def step_inputs(model, grid_h: int, grid_w: int, seed: int = 0):
    """A guided step: batch 2, history at quarter and half resolution, the current unit at full resolution."""
    generator = torch.Generator().manual_seed(seed)
    channels = model.latent_channels
    clips = [torch.randn(2, channels, 1, grid_h // 4 * 2, grid_w // 4 * 2, generator=generator),
             torch.randn(2, channels, 1, grid_h // 2 * 2, grid_w // 2 * 2, generator=generator),
             torch.randn(2, channels, 1, grid_h * 2, grid_w * 2, generator=generator)]
    mask = torch.ones(2, TEXT_TOKENS, dtype=torch.long)
    mask[0, 10:] = 0
    return dict(sample=[clips], encoder_hidden_states=torch.randn(2, TEXT_TOKENS, model.config.joint_attention_dim,
                                                                  generator=generator),
                encoder_attention_mask=mask, pooled_projections=torch.randn(2, model.config.pooled_projection_dim,
                                                                            generator=generator),
                timestep=torch.full((2,), 500.0))


def compare(model, inputs, repeats: int) -> dict:
    @torch.no_grad()
    def step(reuse: bool):
        if not reuse:
            for kept in ("_rope_cache", "_layout_cache"):
                model.__dict__.get(kept, {}).clear()
        return model(**inputs).sample[0]

    recomputed = median_seconds(lambda: step(False), repeats)
    reused = median_seconds(lambda: step(True), repeats)
    return {"recomputed_s": recomputed, "reused_s": reused, "speedup": recomputed / reused,
            "identical": bool(torch.equal(step(False), step(True)))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="assets/models/pyramid-flow-shapes/diffusion_transformer_64p")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    bundled = PyramidFluxTransformer.from_pretrained(args.model).eval()
    reduced_384p = PyramidFluxTransformer(in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=32,
                                          num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32,
                                          axes_dims_rope=(8, 12, 12)).eval()
    figures = {
        "bundled_64px_step": compare(bundled, step_inputs(bundled, 8, 8), args.repeats),
        "reduced_width_384p_step": compare(reduced_384p, step_inputs(reduced_384p, 24, 40), args.repeats),
    }
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
