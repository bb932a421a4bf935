"""Our text-to-video against the authors' implementation on the same random weights, prompt embeddings and noise.

The official code (github jy0205/Pyramid-Flow) is imported from a local checkout (--official, default
`.official/` at the repository root; never part of the project). Its `PyramidDiTForVideoGeneration.generate`
runs as published, with only these stand-ins:
* imports it does not use here are stubbed through sys.modules when missing: tensorboardX (training logs),
  IPython (a debugger hook), timm (VAE weight initialisers, replaced by our loaded weights, and a hub download
  helper), torchvision (image transforms and the LPIPS training loss's backbone);
* `build_pyramid_dit` returns the official transformer we built (no checkpoint folder), the VAE is attached after
  construction (load_vae=False), and the text encoder is a stand-in returning the fixed random embeddings;
* its block-noise covariance [[1, -1/3, ...]] is singular and recent torch refuses its Cholesky factor, so the
  MultivariateNormal it builds gets +1e-6 I on the covariance (the only numerical change).

Both sides get identical weights (our state-dict keys are the official layout), the same prompt embeddings
(negative first in the guidance batch, guidance 7 first frame / 5 video) and the same steps. Timing runs
alternate ours / official, each side drawing noise its own way (the official block noise is its own per-block
loop over the global RNG). The equality run then feeds both the same noise: the official `prepare_latents`
returns our full-resolution starting noise and its `sample_block_noise` the block noise our sampler drew (recorded
by wrapping model_core.pyramid.block_noise), and the final latents are compared.

Ours is model_core's pieces (benchmarks.random_models.text_to_video: scheduler, sampler, transformer, VAE decode
with temporal chunks); the official is `generate(..., output_type="pil")`, i.e. its decode (tiles of 256 px,
one latent frame per chunk) and uint8 conversion included.

    python -m benchmarks.official_side_by_side                  # CPU, tiny models, float32 (a few minutes)
    python -m benchmarks.official_side_by_side --published --out $OUT   # CUDA, published sizes, bfloat16
"""
import argparse
import contextlib
import gc
import importlib.util
import json
import os
import statistics
import sys
import threading
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model_core.pyramid as pyramid  # noqa: E402
from benchmarks.random_models import (  # noqa: E402
    Clip, build_transformer, build_vae, model_configs, random_prompt, synchronize, text_to_video,
)
from model_core.pyramid import standard_normal  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
NEGATIVE = "negative"
STUBBED = {
    "tensorboardX": {"SummaryWriter": object},
    "IPython": {"embed": lambda *a, **k: None},
    "timm": {}, "timm.models": {}, "timm.models.hub": {},
    "timm.models.layers": {"drop_path": lambda x, *a, **k: x, "to_2tuple": lambda x: (x, x),
                           "trunc_normal_": lambda tensor, *a, **k: tensor},  # initialisers: our weights are loaded
    "torchvision": {}, "torchvision.transforms": {}, "torchvision.models": {},
}


def import_official(root: Path) -> types.SimpleNamespace:
    """The official pipeline, transformer and VAE classes, with missing unused imports stubbed."""
    if not (root / "pyramid_dit").is_dir():
        raise FileNotFoundError(f"no official checkout at {root} (expected {root}/pyramid_dit); pass --official")
    missing = {name.split(".")[0] for name in STUBBED if name.split(".")[0] not in sys.modules
               and importlib.util.find_spec(name.split(".")[0]) is None}
    for name, attributes in STUBBED.items():
        if name.split(".")[0] in missing:
            module = sys.modules.setdefault(name, types.ModuleType(name))
            module.__dict__.update(attributes)
            parent, _, child = name.rpartition(".")
            if parent:
                setattr(sys.modules[parent], child, module)
    sys.path.insert(0, str(root))
    from pyramid_dit import pyramid_dit_for_video_gen_pipeline as pipeline
    from pyramid_dit.flux_modules import PyramidFluxTransformer
    from video_vae.modeling_causal_vae import CausalVideoVAE

    return types.SimpleNamespace(pipeline=pipeline, transformer=PyramidFluxTransformer, vae=CausalVideoVAE)


class RegularisedMultivariateNormal(torch.distributions.MultivariateNormal):
    """MultivariateNormal with +1e-6 I on a given covariance (the official block noise's is singular)."""

    def __init__(self, loc, covariance_matrix=None, **kwargs):
        covariance_matrix = covariance_matrix + 1e-6 * torch.eye(covariance_matrix.shape[-1])
        super().__init__(loc, covariance_matrix=covariance_matrix, **kwargs)


@contextlib.contextmanager
def regularised_block_noise():
    original = torch.distributions.multivariate_normal.MultivariateNormal
    torch.distributions.multivariate_normal.MultivariateNormal = RegularisedMultivariateNormal
    try:
        yield
    finally:
        torch.distributions.multivariate_normal.MultivariateNormal = original


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


@contextlib.contextmanager
def recorded_block_noise(record: list):
    """Record every block noise model_core's sampler draws, in order."""
    original = pyramid.block_noise

    def recording(*args, **kwargs):
        record.append(original(*args, **kwargs))
        return record[-1]

    pyramid.block_noise = recording
    try:
        yield
    finally:
        pyramid.block_noise = original


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--official", type=Path, default=ROOT / ".official", help="checkout of the official code")
    parser.add_argument("--published", action="store_true", help="published sizes, bfloat16, on CUDA")
    parser.add_argument("--height", type=int, default=None, help="default: 384 published, 64 tiny")
    parser.add_argument("--width", type=int, default=None, help="default: 640 published, 128 tiny")
    parser.add_argument("--units", type=int, default=None, help="latent frames; default 16 (5 s) published, 5 tiny")
    parser.add_argument("--first-frame-steps", type=int, nargs=3, default=[20, 20, 20])
    parser.add_argument("--video-steps", type=int, nargs=3, default=[10, 10, 10])
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per side; default 1 published, 3 tiny")
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    args = parser.parse_args(argv)
    if args.published and not torch.cuda.is_available():
        parser.error("--published runs on a CUDA GPU; none is visible here")
    defaults = (384, 640, 16, 1) if args.published else (64, 128, 5, 3)
    for name, value in zip(("height", "width", "units", "repeats"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    def write(result):  # after the timings and again after the difference, so a cut-off run keeps its timings
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            temporary = args.out / ".official_side_by_side.json.tmp"
            temporary.write_text(json.dumps(result, indent=1))
            os.replace(temporary, args.out / "official_side_by_side.json")

    result = compare(args, write)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
