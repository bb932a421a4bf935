"""The bundled VAE decoding one 17-frame clip on the CPU: oneDNN for every conv vs PyTorch's own choice.

    python -m benchmarks.vae_batch_one [--repeats 5]

PyTorch sends a float32 CPU conv3d with a batch of one and few channels to its native kernel; the VAE's causal
convs (model_core.vae.causal_conv.conv3d) send it to oneDNN instead. Both routes are timed in one run on the
same latents; the frames must agree.
"""
import argparse

import numpy as np

from benchmarks.timing import median_seconds
from model_core.pipeline import PyramidFlowPipeline
from model_core.vae import causal_conv
from pyramid_app.options.settings import BUNDLED_MODEL


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vae_batch_one", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    pipe = PyramidFlowPipeline.from_pretrained(BUNDLED_MODEL, device="cpu")
    latents = pipe.text_to_video("a red circle moving right", seed=0, num_frames=17, output_type="latent").latents
    routed = median_seconds(lambda: pipe.decode_latents(latents), args.repeats)
    frames = pipe.decode_latents(latents)
    onednn_route = causal_conv.conv3d
    causal_conv.conv3d = lambda conv, x: conv(x)
    try:
        native = median_seconds(lambda: pipe.decode_latents(latents), args.repeats)
        native_frames = pipe.decode_latents(latents)
    finally:
        causal_conv.conv3d = onednn_route
    largest = int(np.abs(frames.astype(int) - native_frames.astype(int)).max())
    print(f"decode 17 frames: PyTorch's choice {native:.3f} s, oneDNN {routed:.3f} s, x{native / routed:.1f}; "
          f"largest pixel difference {largest} / 255")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
