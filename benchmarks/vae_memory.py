"""Peak memory and wall time of CausalVideoVAE decode/encode: full pass vs chunked vs chunked + tiled.

CPU, float32, a reduced VAE so that it runs in minutes on 2 cores: block channels 32/32/64/64 and one
resnet per block in encoder and decoder (published: 128/256/512/512 with 2 / 3 resnets), 8 norm groups,
otherwise the published config (8x8x8 compression, latent 16, mid-block attention), random weights.
Clip: 384p (640 x 384), 2 seconds = 49 frames at 24 fps (1 + 8 * 6); latent 16 x 7 x 48 x 80.
(Below 32 channels PyTorch's CPU conv3d may fall back to an im2col kernel whose column buffer would
dominate the chunked measurements, hence the 32-channel floor.)

Peak memory: every mode runs in a fresh subprocess; after building the model and the input it reads
resource.getrusage(RUSAGE_SELF).ru_maxrss (the process's peak RSS so far), runs the mode once under
torch.no_grad(), reads ru_maxrss again and reports the difference: the extra peak memory of the call,
output included.

    .venv/bin/python benchmarks/vae_memory.py            # decode (about 5 minutes on 2 cores)
    .venv/bin/python benchmarks/vae_memory.py --encode   # decode, then encode (about twice as long)
"""
import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.report import child_figures  # noqa: E402
from model_core.vae import CausalVideoVAE  # noqa: E402

FRAMES, HEIGHT, WIDTH = 49, 384, 640
WIDTHS = (32, 32, 64, 64)
LAYERS_PER_BLOCK = (1, 1, 1, 1)
TILE_LATENT_SIZE, TILE_LATENT_OVERLAP = 32, 8
MODES = {
    "full": {},
    "chunked": {"temporal_chunk": True},
    "chunked+tiled": {"temporal_chunk": True, "tiled": True},
}
WINDOWS = {"decode": 1, "encode": 8}  # latent frames per decode chunk, pixel frames per encode chunk


def reduced_vae() -> CausalVideoVAE:
    return CausalVideoVAE(encoder_block_out_channels=WIDTHS, decoder_block_out_channels=WIDTHS,
                          encoder_layers_per_block=LAYERS_PER_BLOCK, decoder_layers_per_block=LAYERS_PER_BLOCK,
                          encoder_norm_num_groups=8, decoder_norm_num_groups=8).eval()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(direction: str, mode: str) -> dict:
    """Runs in the child process: one call, its extra peak RSS and wall time."""
    vae = reduced_vae()
    generator = torch.Generator().manual_seed(0)
    settings = dict(MODES[mode])
    if settings.pop("tiled", False):
        vae.enable_tiling(TILE_LATENT_SIZE, TILE_LATENT_OVERLAP)
    if settings:
        settings["window_size"] = WINDOWS[direction]
    if direction == "decode":
        latent_frames = 1 + (FRAMES - 1) // 8
        x = torch.randn(1, vae.config.decoder_in_channels, latent_frames, HEIGHT // 8, WIDTH // 8, generator=generator)
    else:
        x = torch.rand(1, 3, FRAMES, HEIGHT, WIDTH, generator=generator) * 2 - 1
    baseline = peak_rss_mib()
    start = time.perf_counter()
    with torch.no_grad():
        out = vae.decode(x, **settings).sample if direction == "decode" else vae.encode(x, **settings).latent_dist.mean
    seconds = time.perf_counter() - start
    return {"peak_extra_mib": peak_rss_mib() - baseline, "seconds": seconds, "output": list(out.shape)}


def run_in_child(direction: str, mode: str) -> dict:
    command = [sys.executable, __file__, "--child", direction, mode]
    return child_figures(command)


def report(direction: str):
    print(f"\n{direction}: window {WINDOWS[direction]}, tiles {TILE_LATENT_SIZE} latent cells, "
          f"overlap {TILE_LATENT_OVERLAP}")
    print(f"{'mode':<15}{'peak extra MiB':>16}{'vs full':>9}{'seconds':>10}{'vs full':>9}  output", flush=True)
    full = None
    for mode in MODES:
        result = run_in_child(direction, mode)
        full = full or result
        print(f"{mode:<15}{result['peak_extra_mib']:>16.0f}{result['peak_extra_mib'] / full['peak_extra_mib']:>9.3f}"
              f"{result['seconds']:>10.1f}{result['seconds'] / full['seconds']:>9.2f}  {result['output']}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encode", action="store_true", help="also measure encode")
    parser.add_argument("--child", nargs=2, metavar=("DIRECTION", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return
    print(f"CausalVideoVAE memory modes, CPU float32, {torch.get_num_threads()} threads, "
          f"{FRAMES} x {HEIGHT} x {WIDTH} clip, block channels {'/'.join(map(str, WIDTHS))}")
    for direction in ("decode", "encode") if args.encode else ("decode",):
        report(direction)


if __name__ == "__main__":
    main()
