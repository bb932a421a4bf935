"""Our text-to-video against the authors' implementation on the same random weights, in two modes.

--pipeline (the headline): the whole pipeline as users run it, each run in a fresh process. A checkpoint folder in
the official layout is written once with random weights (reduced widths, see PIPELINE_TRANSFORMER and
random_models.TINY_VAE; tiny CLIP and T5 encoders with their tokenizers from training.tiny_text); each run is a
child process (benchmarks.official_pipeline_run) that imports its side, loads the folder, encodes the prompt and
the default negative prompt, samples and decodes to uint8 frames. Rounds rotate the order (ours, official /
official, ours / ...), threads are torch's defaults, and each child's wall time, CPU time (user + system) and
peak resident set (from wait4) are recorded, with the phases the child timed itself. A last child runs both sides
on the same noise for the distance of the final latents and frames.

Default (sampler only, the secondary row; --published runs it on CUDA at the published sizes): in one process,
model_core's pieces (benchmarks.random_models.text_to_video: scheduler, sampler, transformer, VAE decode with
temporal chunks) against the official `generate(..., output_type="pil")` on identical prompt embeddings. The
official code is the same import (see benchmarks.official_pipeline_run for its stand-ins), except that
`build_pyramid_dit` returns the official transformer we built (no checkpoint folder), the VAE is attached after
construction (load_vae=False), and the text encoder is a stand-in returning the fixed random embeddings. Timing
runs alternate ours / official, each side drawing noise its own way (the official block noise is its own per-block
loop over the global RNG). The equality run then feeds both the same noise: the official `prepare_latents`
returns our full-resolution starting noise and its `sample_block_noise` the block noise our sampler drew (recorded
by wrapping model_core.pyramid.block_noise), and the final latents are compared. Our transformer has its projections
fused as pipelines load it (model_core.speed.fuse_projections). benchmarks.gpu_suite runs --published as a row.

Both modes give both sides identical weights (our state-dict keys are the official layout), guidance 7 on the
first frame and 5 on the video, and the same steps. The official code (github jy0205/Pyramid-Flow) is imported
from a local checkout (--official, default `.official/` at the repository root; never part of the project).

    python -m benchmarks.official_side_by_side --pipeline      # CPU, whole pipeline, 384x640, fresh processes
    python -m benchmarks.official_side_by_side                  # CPU, sampler only, tiny models, float32
    python -m benchmarks.official_side_by_side --published --out $OUT   # CUDA, published sizes, bfloat16
"""
import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.official_pipeline_run import import_official, recorded_block_noise, regularised_block_noise  # noqa: E402
from benchmarks.random_models import (  # noqa: E402
    Clip, build_transformer, build_vae, model_configs, random_prompt, synchronize, text_to_video,
)
from model_core.pyramid import standard_normal  # noqa: E402
from model_core.speed import fuse_projections  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
NEGATIVE = "negative"
class FixedTextEncoder:
    """Stands in for the official text encoder: the fixed embeddings, negative for the negative prompt."""

    def __init__(self, text, negative, dtype):
        self.embeddings, self.dtype = {True: negative, False: text}, dtype

    def __call__(self, prompt, device):
        e = self.embeddings[prompt == NEGATIVE]  # in the model's dtype, as its T5 / CLIP encoders return them
        return e.hidden_states.to(device, self.dtype), e.attention_mask.to(device), e.pooled.to(device, self.dtype)


def build_official(official, transformer, vae, dtype, text, negative, num_stages: int = 3):
    """The official generation wrapper around copies of our weights."""
    device = next(transformer.parameters()).device
    with torch.device("meta"):
        dit = official.transformer(**transformer.config)
        official_vae = official.vae(**vae.config)
    dit = torch.nn.Module.to(dit, dtype).to_empty(device=device)
    dit.load_state_dict(transformer.state_dict())
    official_vae = torch.nn.Module.to(official_vae, dtype).to_empty(device=device)
    official_vae.load_state_dict(vae.state_dict())
    build = official.pipeline.build_pyramid_dit
    official.pipeline.build_pyramid_dit = lambda *args, **kwargs: dit
    try:
        with contextlib.redirect_stdout(None):
            model = official.pipeline.PyramidDiTForVideoGeneration(
                "", model_dtype={torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype], model_name="pyramid_flux",
                load_text_encoder=False, load_vae=False, stages=[1, 2, 4][:num_stages])
    finally:
        official.pipeline.build_pyramid_dit = build
    model.vae = official_vae.eval().requires_grad_(False)
    model.dit.eval().requires_grad_(False)
    model.text_encoder = FixedTextEncoder(text, negative, dtype)
    return model


def official_generate(model, clip: Clip, generator=None, decode: bool = True):
    """The official `generate`: uint8 PIL frames when `decode`, else its final normalised latents."""
    with regularised_block_noise(), torch.no_grad():
        return model.generate(prompt="prompt", negative_prompt=NEGATIVE, height=clip.height, width=clip.width,
                              temp=clip.num_units, num_inference_steps=list(clip.first_frame_steps),
                              video_num_inference_steps=list(clip.video_steps), guidance_scale=clip.guidance_scale,
                              video_guidance_scale=clip.video_guidance_scale, generator=generator,
                              output_type="pil" if decode else "latent")


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak on a GPU; on the CPU, the highest resident set size seen by a
    sampling thread (every 2 ms) minus the resident size at entry."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._running = device, 0, False

    @staticmethod
    def _resident() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while self._running:
            self.peak = max(self.peak, self._resident() - self._start)
            time.sleep(0.002)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        gc.collect()
        self._start, self._running = self._resident(), True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._running = False
            self._thread.join()


def timed(work, device):
    """(seconds, peak memory bytes) of work()."""
    gc.collect()
    synchronize(device)
    with PeakMemory(device) as memory:
        started = time.perf_counter()
        work()
        synchronize(device)
        seconds = time.perf_counter() - started
    return seconds, memory.peak


def max_latent_difference(ours_model, vae, official_model, clip: Clip, text, negative, device, seed: int) -> float:
    """Largest |difference| of the final normalised latents when both sides start from the same noise."""
    noises = []
    with recorded_block_noise(noises):
        ours = text_to_video(ours_model, vae, clip, text, negative, device, seed=seed, decode=False)["latents"]
    shape = (1, ours_model.latent_channels, clip.num_units, clip.height // vae.spatial_scale, clip.width // vae.spatial_scale)
    start = standard_normal(shape, torch.Generator().manual_seed(seed), device)
    dtype = official_model.dtype
    official_model.prepare_latents = lambda *args, **kwargs: start.to(dtype)
    official_model.sample_block_noise = lambda *args, **kwargs: noises.pop(0)
    try:
        theirs = official_generate(official_model, clip, decode=False)
    finally:
        del official_model.prepare_latents, official_model.sample_block_noise
    return float((ours - theirs.float()).abs().max())


@contextlib.contextmanager
def resident(modules, device: torch.device):
    """On a GPU, only the side being run keeps its weights there, so each peak is its own."""
    if device.type == "cuda":
        for module in modules:
            module.to(device)
    try:
        yield
    finally:
        if device.type == "cuda":
            for module in modules:
                module.to("cpu")
            torch.cuda.empty_cache()


def compare(args, write=lambda result: None) -> dict:
    device = torch.device("cuda" if args.published else "cpu")
    dtype = torch.bfloat16 if args.published else torch.float32
    official = import_official(args.official)
    transformer_config, vae_config = model_configs(tiny=not args.published)
    transformer = build_transformer(transformer_config, device, dtype)
    vae = build_vae(vae_config, device, dtype)
    text = random_prompt(transformer_config, valid_tokens=24, seed=1, device=device)
    negative = random_prompt(transformer_config, valid_tokens=40, seed=2, device=device)
    official_model = build_official(official, transformer, vae, dtype, text, negative)
    fuse_projections(transformer)  # ours as pipelines load it, after the official side copied the official layout
    ours_side, official_side = [transformer, vae], [official_model.dit, official_model.vae]
    if device.type == "cuda":  # each side comes to the GPU only for its own runs
        for module in ours_side + official_side:
            module.to("cpu")
    clip = Clip(args.height, args.width, args.units, tuple(args.first_frame_steps), tuple(args.video_steps))
    warm_up = Clip(args.height, args.width, 2, (1, 1, 1), (1, 1, 1))
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""), "published_sizes": args.published,
        "height": clip.height, "width": clip.width, "units": clip.num_units,
        "first_frame_steps": list(clip.first_frame_steps), "video_steps": list(clip.video_steps), "repeats": args.repeats,
        "peak_memory": "CUDA allocator peak, only the running side's weights on the GPU" if device.type == "cuda"
        else "peak resident set growth during the run (CPU)",
    }
    ours, theirs = [], []
    for repeat in range(args.repeats):  # alternate, so both see the same machine load
        with resident(ours_side, device):
            if repeat == 0:
                text_to_video(transformer, vae, warm_up, text, negative, device)
            ours.append(timed(lambda: text_to_video(transformer, vae, clip, text, negative, device, seed=repeat), device))
        with resident(official_side, device):
            if repeat == 0:
                official_generate(official_model, warm_up, torch.Generator().manual_seed(0))
            theirs.append(timed(lambda: official_generate(official_model, clip, torch.Generator().manual_seed(repeat)), device))
    ours_s, theirs_s = statistics.median(t for t, _ in ours), statistics.median(t for t, _ in theirs)
    ours_peak, theirs_peak = max(m for _, m in ours), max(m for _, m in theirs)
    result.update({
        "ours_s": round(ours_s, 3), "official_s": round(theirs_s, 3), "time_ratio": round(ours_s / theirs_s, 3),
        "ours_peak_gib": round(ours_peak / GIB, 3), "official_peak_gib": round(theirs_peak / GIB, 3),
        "peak_ratio": round(ours_peak / theirs_peak, 3) if theirs_peak else None,
    })
    write(result)
    difference_clip = Clip(args.height, args.width, min(args.units, 3), tuple(args.first_frame_steps), tuple(args.video_steps))
    with resident(ours_side + official_side, device):
        difference = max_latent_difference(transformer, vae, official_model, difference_clip, text, negative, device, seed=7)
    result.update({"max_latent_difference": difference, "difference_units": difference_clip.num_units})
    write(result)
    return result


PIPELINE_TRANSFORMER = dict(  # the published head size and RoPE axes (the official loader forces [16, 24, 24])
    num_layers=2, num_single_layers=2, num_attention_heads=2, attention_head_dim=64, joint_attention_dim=64,
    pooled_projection_dim=32, axes_dims_rope=[16, 24, 24])
PIPELINE_TEXT = dict(t5_dim=64, clip_dim=32)
PROMPT = "a sailboat gliding across a calm blue lake in summer"


def write_pipeline_checkpoint(root: Path, seed: int = 0) -> Path:
    """A checkpoint folder in the official layout: reduced-width transformer and VAE with random weights, tiny
    CLIP and T5 encoders with their tokenizers (no pyramid_flow.json: both sides read it as a published 384p one)."""
    from model_core.checkpoints import VAE_FOLDER, transformer_folder
    from model_core.pipeline import OFFICIAL_NEGATIVE_PROMPT, OFFICIAL_PROMPT_SUFFIX
    from training.initial_checkpoint import name_as_published
    from training.tiny_text import DEFAULT_CORPUS, write_tiny_text_stack

    # tokenizers that know the prompts' words, as a real vocabulary does: 71 and 25 T5 tokens for the default negative
    # prompt and the prompt (learned without them, mostly single letters: 109 and 42)
    corpus = [*DEFAULT_CORPUS, OFFICIAL_NEGATIVE_PROMPT, PROMPT + OFFICIAL_PROMPT_SUFFIX]
    write_tiny_text_stack(root, "miniflux", seed=seed, corpus=corpus, **PIPELINE_TEXT)
    transformer_config, vae_config = model_configs(tiny=True)
    transformer_config.update(PIPELINE_TRANSFORMER)
    transformer = build_transformer(transformer_config, "cpu", torch.float32, seed)
    vae = build_vae(vae_config, "cpu", torch.float32, seed + 1)
    for model, folder, class_name in ((transformer, transformer_folder("384p"), "PyramidFluxTransformer"),
                                      (vae, VAE_FOLDER, "CausalVideoVAE")):
        model.save_pretrained(root / folder)
        name_as_published(root / folder / "config.json", class_name)
    return root


def fresh_process(side: str, checkpoint: Path, official: Path, settings: dict, report: Path) -> dict:
    """Run one side in a new Python process: its wall seconds, CPU seconds (user + system) and peak resident set
    (wait4's rusage of that child alone), with the phases it timed itself."""
    command = [sys.executable, "-m", "benchmarks.official_pipeline_run", side, str(checkpoint), str(official),
               json.dumps(settings), str(report)]
    started = time.perf_counter()
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise RuntimeError(f"the {side} run failed (exit status {child.returncode}); its stderr is above")
    return {"side": side, "wall_s": round(wall, 3), "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), **json.loads(report.read_text())}


def rotated_order(rounds: int) -> list:
    """ours, official, official, ours, ours, official, ...: each side goes first in every other round."""
    return [side for r in range(rounds) for side in (("ours", "official") if r % 2 == 0 else ("official", "ours"))]


def summarise(runs: list) -> dict:
    """Per side the median of wall, CPU and peak RSS; ours over official for each."""
    summary = {}
    for key in ("wall_s", "cpu_s", "peak_rss_mib", "generate_s"):
        ours = statistics.median(run[key] for run in runs if run["side"] == "ours")
        theirs = statistics.median(run[key] for run in runs if run["side"] == "official")
        summary[key] = {"ours": round(ours, 3), "official": round(theirs, 3), "ratio": round(ours / theirs, 3)}
    return summary


def compare_pipelines(args, write=lambda result: None) -> dict:
    """Write the checkpoint, measure the same-noise distance, then time each side's fresh processes in rotated
    rounds; `write` gets the report after every run."""
    import platform
    import tempfile

    settings = {"prompt": PROMPT, "height": args.height, "width": args.width, "units": args.units,
                "first_frame_steps": args.first_frame_steps, "video_steps": args.video_steps,
                "guidance_scale": 7.0, "video_guidance_scale": 5.0, "seed": 0}
    result = {"mode": "whole pipeline, fresh process per run", "date": time.strftime("%Y-%m-%d"),
              "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}",
              "torch": torch.__version__, "dtype": "float32", "transformer": PIPELINE_TRANSFORMER, "text": PIPELINE_TEXT,
              "vae": "random_models.TINY_VAE",
              **{key: value for key, value in settings.items() if key != "seed"}, "rounds": args.repeats,
              "load_average_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="side-by-side-") as work:
        work = Path(work)
        checkpoint = write_pipeline_checkpoint(work / "checkpoint")
        difference = fresh_process("difference", checkpoint, args.official, settings, work / "difference.json")
        result.update({key: difference[key] for key in ("max_latent_difference", "max_frame_difference")})
        runs = []
        for index, side in enumerate(rotated_order(args.repeats)):
            load = os.getloadavg()[0]
            runs.append({**fresh_process(side, checkpoint, args.official, settings, work / f"run{index}.json"),
                         "load_average_before": load})
            result.update(runs=runs, **summarise(runs) if len(runs) > 1 else {})
            write(result)
    result["load_average_end"] = os.getloadavg()
    write(result)
    return result


MODE_DEFAULTS = {  # height, width, units, first-frame steps, video steps, repeats
    "pipeline": (384, 640, 4, [4, 4, 4], [2, 2, 2], 2),
    "published": (384, 640, 16, [20] * 3, [10] * 3, 1),
    "tiny": (64, 128, 5, [20] * 3, [10] * 3, 3),
}


def parse_arguments(argv=None) -> argparse.Namespace:
    """The command line with each unset size, step and repeat count filled from its mode's defaults."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--official", type=Path, default=ROOT / ".official", help="checkout of the official code")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--pipeline", action="store_true", help="the whole pipeline, a fresh process per run (CPU)")
    mode.add_argument("--published", action="store_true", help="sampler only, published sizes, bfloat16, on CUDA")
    parser.add_argument("--height", type=int, default=None, help="default: 384 (--pipeline, --published), 64 tiny")
    parser.add_argument("--width", type=int, default=None, help="default: 640 (--pipeline, --published), 128 tiny")
    parser.add_argument("--units", type=int, default=None,
                        help="latent frames; default 4 --pipeline, 16 (5 s) --published, 5 tiny")
    parser.add_argument("--first-frame-steps", type=int, nargs=3, default=None,
                        help="default 4 4 4 --pipeline, else 20 20 20")
    parser.add_argument("--video-steps", type=int, nargs=3, default=None, help="default 2 2 2 --pipeline, else 10 10 10")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per side (--pipeline: rounds of one run each); "
                             "default 2 --pipeline, 1 published, 3 tiny")
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    args = parser.parse_args(argv)
    if args.published and not torch.cuda.is_available():
        parser.error("--published runs on a CUDA GPU; none is visible here")
    args.mode = "pipeline" if args.pipeline else "published" if args.published else "tiny"
    names = ("height", "width", "units", "first_frame_steps", "video_steps", "repeats")
    for name, value in zip(names, MODE_DEFAULTS[args.mode]):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.repeats < 1 or args.units < 1:
        parser.error(f"--repeats and --units must be at least 1; got {args.repeats} and {args.units}")
    return args


def main(argv=None):
    args = parse_arguments(argv)
    name = "official_pipeline_side_by_side.json" if args.pipeline else "official_side_by_side.json"

    def write(result):  # after every timing and again at the end, so a cut-off run keeps what it measured
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            temporary = args.out / f".{name}.tmp"
            temporary.write_text(json.dumps(result, indent=1))
            os.replace(temporary, args.out / name)

    result = (compare_pipelines if args.pipeline else compare)(args, write)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
