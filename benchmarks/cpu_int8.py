"""quantize=int8 on the CPU (torchao dynamic int8 activations + int8 weights, transformer and T5) vs float32 and vs
the deprecated torch.ao.quantization.quantize_dynamic it replaced, on the bundled model: time of a 17-frame
text-to-video and how close its output stays to float32.

    python -m benchmarks.cpu_int8 [--repeats 3]

Both pipelines are loaded once; each repeat generates the same prompt and seed with each, alternating, and the
median seconds are compared. Closeness: the mean |difference| of the final latents relative to the float32
latents' mean magnitude, and the mean |difference| of the uint8 frames.
"""
import argparse
import statistics
import time

import numpy as np
import torch

from model_core import PyramidFlowPipeline
from pyramid_app.options.settings import BUNDLED_MODEL

PROMPT = "a red square moving right"


def generate(pipe, seed: int):
    started = time.perf_counter()
    out = pipe.text_to_video(PROMPT, num_frames=17, seed=seed)
    return time.perf_counter() - started, out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    pipes = {"float32": PyramidFlowPipeline.from_pretrained(BUNDLED_MODEL),
             "int8 (torchao)": PyramidFlowPipeline.from_pretrained(BUNDLED_MODEL, quantize="int8"),
             "int8 (torch.ao quantize_dynamic)": legacy_int8(PyramidFlowPipeline.from_pretrained(BUNDLED_MODEL))}
    for pipe in pipes.values():
        generate(pipe, 0)  # warm-up
    times, outputs = {name: [] for name in pipes}, {}
    for repeat in range(args.repeats):
        for name, pipe in pipes.items():
            seconds, outputs[name] = generate(pipe, seed=repeat)
            times[name].append(seconds)
    reference, float32_s = outputs["float32"], statistics.median(times["float32"])
    for name, out in outputs.items():
        latent_difference = float((out.latents - reference.latents).abs().mean() / reference.latents.abs().mean())
        pixel_difference = float(np.abs(out.frames.astype(np.int16) - reference.frames.astype(np.int16)).mean())
        seconds = statistics.median(times[name])
        print(f"{name}: {seconds:.2f} s ({seconds / float32_s:.2f}x float32); latents mean |diff| "
              f"{latent_difference:.3f} of their mean magnitude, frames mean |diff| {pixel_difference:.2f}/255")


def legacy_int8(pipe):
    """What quantize='int8' did before torchao: torch.ao's dynamic int8 Linear modules (deprecated)."""
    from torch.ao.quantization import quantize_dynamic

    for module in (pipe.transformer, pipe.prompt_encoder.encoders[pipe.prompt_encoder.t5_folder]):
        quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    return pipe


if __name__ == "__main__":
    main()
