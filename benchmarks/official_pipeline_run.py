"""One side of the whole-pipeline side by side, run in its own process by benchmarks.official_side_by_side.

    python -m benchmarks.official_pipeline_run ours|official|difference CHECKPOINT OFFICIAL SETTINGS_JSON REPORT

`ours` and `official` each load the checkpoint folder (official layout) the way their users do and make a
text-to-video clip to uint8 frames: text encoding through the checkpoint's text encoders and tokenizers, sampling,
VAE decode. Only the standard library and torch are imported before the side's own code, so a process's start-up,
imports and loading are that side's own. `difference` loads both sides in one process and runs them on the same
starting and block noise, for the distance of their final latents and frames (not timed). The report (JSON) holds
the seconds of the phases inside the process.

The official code (github jy0205/Pyramid-Flow, a local checkout) runs as published, with only these stand-ins:
imports it does not use here are stubbed through sys.modules when missing (tensorboardX, IPython, timm, torchvision:
training logs, a debugger hook, weight initialisers replaced by the loaded weights, image transforms), and its
block-noise covariance [[1, -1/3, ...]], which is singular and whose Cholesky factor recent torch refuses, gets
+1e-6 I (the only numerical change).
"""
import contextlib
import importlib
import importlib.util
import json
import os
import sys
import time
import types
from pathlib import Path

STARTED = time.perf_counter()
import torch  # noqa: E402

STUBBED = {
    "tensorboardX": {"SummaryWriter": object},
    "IPython": {"embed": lambda *a, **k: None},
    "timm": {}, "timm.models": {}, "timm.models.hub": {},
    "timm.models.layers": {"drop_path": lambda x, *a, **k: x, "to_2tuple": lambda x: (x, x),
                           "trunc_normal_": lambda tensor, *a, **k: tensor},  # initialisers: weights are loaded
    "torchvision": {}, "torchvision.transforms": {}, "torchvision.models": {},
}
VARIANT = "384p"


def import_official(root: Path) -> types.SimpleNamespace:
    """The official pipeline, transformer and VAE classes, with missing unused imports stubbed."""
    root = Path(root)
    if not (root / "pyramid_dit").is_dir():
        raise FileNotFoundError(f"no official checkout at {root} (expected {root}/pyramid_dit); pass --official")
    importlib.import_module("diffusers.utils")  # they ask whether torchvision is installed: before the stub exists
    importlib.import_module("transformers.utils")

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


def import_ours():
    from model_core.pipeline import PyramidFlowPipeline

    return PyramidFlowPipeline


def load_ours(checkpoint: Path):
    return import_ours().from_pretrained(checkpoint, variant=VARIANT, torch_dtype="float32", device="cpu")


def generate_ours(pipe, settings: dict, seed: int, output_type: str = "np"):
    """Our text-to-video: the output (uint8 frames [1, T, H, W, 3] and the normalised latents)."""
    return pipe(settings["prompt"], num_frames=1 + (settings["units"] - 1) * pipe.spec.frames_per_latent,
                height=settings["height"], width=settings["width"], first_frame_steps=settings["first_frame_steps"],
                video_steps=settings["video_steps"], guidance_scale=settings["guidance_scale"],
                video_guidance_scale=settings["video_guidance_scale"], seed=seed, output_type=output_type)


def load_official(checkpoint: Path, official_root: Path):
    official = import_official(official_root)
    with contextlib.redirect_stdout(sys.stderr):  # it prints its scheduler's sigmas
        return official.pipeline.PyramidDiTForVideoGeneration(
            str(checkpoint), model_dtype="fp32", model_name="pyramid_flux",
            model_variant=f"diffusion_transformer_{VARIANT}")


def generate_official(model, settings: dict, generator=None) -> list:
    """The official `generate` as its README calls it (under no_grad): a list of PIL images (uint8 frames)."""
    with regularised_block_noise(), torch.no_grad():
        return model.generate(prompt=settings["prompt"], height=settings["height"], width=settings["width"],
                              temp=settings["units"], num_inference_steps=list(settings["first_frame_steps"]),
                              video_num_inference_steps=list(settings["video_steps"]),
                              guidance_scale=settings["guidance_scale"],
                              video_guidance_scale=settings["video_guidance_scale"], generator=generator,
                              output_type="pil")


def frames_of(images):
    """PIL images -> uint8 frames [T, H, W, 3] (numpy)."""
    import numpy as np

    return np.stack([np.asarray(image) for image in images])


def run_side(side: str, checkpoint: Path, official_root: Path, settings: dict) -> dict:
    """Import, load and generate as that side's users do; the seconds of each phase and what came out."""
    started = time.perf_counter()
    import_ours() if side == "ours" else import_official(official_root)
    imported = time.perf_counter()
    if side == "ours":
        model = load_ours(checkpoint)
        loaded = time.perf_counter()
        frames = generate_ours(model, settings, settings["seed"]).frames[0]
    else:
        model = load_official(checkpoint, official_root)
        loaded = time.perf_counter()
        frames = frames_of(generate_official(model, settings, torch.Generator().manual_seed(settings["seed"])))
    generated = time.perf_counter()
    return {"torch_import_s": started - STARTED, "import_s": imported - started, "load_s": loaded - imported,
            "generate_s": generated - loaded, "threads": torch.get_num_threads(), "frames_shape": list(frames.shape),
            "frames_dtype": str(frames.dtype)}


@contextlib.contextmanager
def recorded_block_noise(record: list):
    """Record every block noise model_core's sampler draws, in order."""
    import model_core.pyramid as pyramid

    original = pyramid.block_noise

    def recording(*args, **kwargs):
        record.append(original(*args, **kwargs))
        return record[-1]

    pyramid.block_noise = recording
    try:
        yield
    finally:
        pyramid.block_noise = original


def difference(checkpoint: Path, official_root: Path, settings: dict, seed: int = 7) -> dict:
    """Both sides on the same noise: the official `prepare_latents` returns our full-resolution starting noise
    (drawn first from the seeded generator) and its `sample_block_noise` the block noise our sampler drew."""
    from model_core.pyramid import standard_normal

    pipe, model = load_ours(checkpoint), load_official(checkpoint, official_root)
    noises = []
    with recorded_block_noise(noises):
        ours = generate_ours(pipe, settings, seed)
    latents = ours.latents
    shape = (1, latents.shape[1], settings["units"], *latents.shape[-2:])
    start = standard_normal(shape, torch.Generator().manual_seed(seed))
    model.prepare_latents = lambda *args, **kwargs: start.to(model.dtype)
    model.sample_block_noise = lambda *args, **kwargs: noises.pop(0)
    decoded = []
    decode_latent = model.decode_latent
    model.decode_latent = lambda z, *args, **kwargs: decode_latent(decoded.append(z.clone()) or z, *args, **kwargs)
    theirs = frames_of(generate_official(model, settings))
    ours_frames = torch.from_numpy(ours.frames[0]).int()
    return {"max_latent_difference": float((latents - decoded[0].float()).abs().max()),
            "max_frame_difference": int((ours_frames - torch.from_numpy(theirs).int()).abs().max()),
            "frames_shape": list(ours.frames[0].shape), "official_frames_shape": list(theirs.shape)}


def main(argv=None):
    side, checkpoint, official_root, settings, report = (argv or sys.argv[1:])
    checkpoint, official_root, settings = Path(checkpoint), Path(official_root), json.loads(settings)
    figures = difference(checkpoint, official_root, settings) if side == "difference" else \
        run_side(side, checkpoint, official_root, settings)
    temporary = Path(f"{report}.tmp")
    temporary.write_text(json.dumps(figures))
    os.replace(temporary, report)


if __name__ == "__main__":
    main()
