"""Long videos: time and peak memory per unit up to 20 s at 384p (640x384, 24 fps: 481 frames, 61 units).

A tiny random checkpoint in the published layout, reshaped to the 384p variant (reduced width: 2 transformer layers
of width 32, a VAE with 8-16 channels), generates one 20-s video with `stream_to=` (each unit decoded as it finishes,
frames streamed into an H.264 mp4 by model_core.media_files.VideoWriter), then the same video decoded at the end
(all frames held). Per unit: wall time and the process's peak resident memory while it ran (sampled every 5 ms);
on CUDA, torch's peak allocated memory instead.

    python benchmarks/long_video.py [--seconds 20] [--device cpu] [--out benchmarks/long_video.json]
"""
import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from model_core import PyramidFlowPipeline  # noqa: E402
from model_core.checkpoints import SETTINGS_FILE  # noqa: E402
from model_core.media_files import VideoWriter  # noqa: E402
from tiny_checkpoint import build_tiny_checkpoint  # noqa: E402

VARIANT_384P = {"height": 384, "width": 640, "max_latent_frames": 16, "fps": 24}
STEPS = dict(first_frame_steps=(2, 2, 2), video_steps=(2, 2, 2), guidance_scale=1.0, video_guidance_scale=1.0)


class PeakMemory:
    """The highest resident set size (CPU) or allocated memory (CUDA) since the last `take()`, in MiB."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.process = psutil.Process()
        self.peak = 0
        self.running = not self.cuda
        if self.running:
            threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def take(self) -> float:
        if self.cuda:
            peak = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            peak, self.peak = max(self.peak, self.process.memory_info().rss), 0
        return round(peak / 2**20, 1)


def per_unit_recorder(memory: PeakMemory, rows: list):
    started = [time.perf_counter()]

    def on_step_end(pipe, step_index, timestep, callback_kwargs):
        if pipe.progress.kind == "unit":
            now = time.perf_counter()
            rows.append({"unit": pipe.progress.unit, "seconds": round(now - started[0], 3), "peak_mib": memory.take()})
            started[0] = now
        return {}

    return on_step_end


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        root = build_tiny_checkpoint(Path(work) / "model", variant="384p")
        (root / SETTINGS_FILE).write_text(json.dumps({"variants": {"384p": VARIANT_384P}}))
        pipe = PyramidFlowPipeline.from_pretrained(root, device=args.device)
        device = pipe._execution_device
        memory = PeakMemory(device)
        streamed, held = [], []
        with VideoWriter(Path(work) / "long.mp4", pipe.spec.fps, pipe.spec.width, pipe.spec.height) as writer:
            memory.take()
            result = pipe("a long video", duration=args.seconds, seed=0, stream_to=writer,
                          callback_on_step_end=per_unit_recorder(memory, streamed), **STEPS)
            writer.close(result.settings)
        memory.take()
        decoded_at_end = pipe("a long video", duration=args.seconds, seed=0,
                              callback_on_step_end=per_unit_recorder(memory, held), **STEPS)
        end_peak = memory.take()
        memory.running = False
    figures = {
        "setup": {"seconds": args.seconds, "frames": int(decoded_at_end.frames[0].shape[0]), "units": len(streamed),
                  "variant": VARIANT_384P, "device": str(device), "torch": torch.__version__, "steps": "2,2,2, no guidance",
                  "memory": "peak allocated (CUDA)" if device.type == "cuda" else "peak resident set size (CPU)"},
        "streamed_per_unit": streamed,
        "held_per_unit": held,
        "held_final_decode_peak_mib": end_peak,
    }
    for name, rows in (("streamed", streamed), ("held", held)):
        first, last = rows[1:6], rows[-5:]  # unit 0 is the first frame, with other steps
        print(f"{name}: units 1-5 median {sorted(r['seconds'] for r in first)[2]:.3f} s, peak {max(r['peak_mib'] for r in first)} MiB; "
              f"last 5 median {sorted(r['seconds'] for r in last)[2]:.3f} s, peak {max(r['peak_mib'] for r in last)} MiB")
    print(f"held: the decode after the last unit peaks at {end_peak} MiB ({figures['setup']['frames']} frames)")
    if args.out:
        args.out.write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
