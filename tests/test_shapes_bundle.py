"""The tiny-shapes recipe end to end with tiny overrides: world, VAE, latent statistics, transformer,
and a bundled model in the official layout that the pipeline loads; a rerun redoes nothing."""
import hashlib
import json
from pathlib import Path

import pytest
from test_repository_files import absolute_paths, text_files

from training.config import CONFIG_DIR, load_config
from training.launch import main

TINY = ["world.count=4", "world.heldout=2", "latent_statistics.clips=4",
        "architecture.text={t5_dim: 16, clip_dim: 8}",
        "architecture.vae.encoder_block_out_channels=[8, 8, 8, 8]",
        "architecture.vae.decoder_block_out_channels=[8, 8, 8, 8]",
        "architecture.vae.encoder_norm_num_groups=4", "architecture.vae.decoder_norm_num_groups=4",
        "architecture.transformer.num_layers=1", "architecture.transformer.num_single_layers=1",
        "architecture.transformer.num_attention_heads=2", "architecture.transformer.attention_head_dim=16",
        "architecture.transformer.axes_dims_rope=[4, 6, 6]",
        "phases.vae.overrides={train: {global_batch_size: 2, checkpoint_every: 1}}",
        "phases.flow.overrides={train: {global_batch_size: 2, checkpoint_every: 1, ema_decay: 0.5}, validation: {every_steps: null}}"]


ASSETS = Path(__file__).resolve().parents[1] / "assets"


def digests(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    """A short run with --output-dir and no bundle.out, as a newcomer tries the recipe: the shipped model is left
    byte-identical and the bundle lands in <output dir>/model."""
    root = tmp_path_factory.mktemp("bundle")
    shipped = digests(ASSETS)
    args = ["--config", str(CONFIG_DIR / "tiny_shapes.yaml"), "--max-steps", "1", f"world.out={root / 'data'}",
            "--output-dir", str(root / "work"), *TINY]
    assert main(args) == 0
    assert digests(ASSETS) == shipped
    return root, args


def test_bundle_is_an_official_layout_checkpoint_of_copies(bundled):
    root, _ = bundled
    model = root / "work" / "model"
    names = {p.name for p in model.iterdir()}
    assert {"causal_video_vae", "diffusion_transformer_64p", "text_encoder", "tokenizer", "text_encoder_2",
            "tokenizer_2", "pyramid_flow.json", "README.md"} <= names
    assert not any(p.is_symlink() for p in model.rglob("*"))
    settings = json.loads((model / "pyramid_flow.json").read_text())
    assert settings["variants"]["64p"] == {"height": 64, "width": 64, "max_latent_frames": 3, "fps": 8}
    assert set(settings["latent_normalization"]) == {"first_shift", "first_scale", "later_shift", "later_scale"}
    assert settings["sampling"] == load_config(CONFIG_DIR / "tiny_shapes.yaml")["bundle"]["sampling"]
    vae = json.loads((model / "causal_video_vae" / "config.json").read_text())
    assert vae["encoder_spatial_down_sample"] == [True, True, False, False]


def test_bundle_names_no_absolute_path(bundled):
    model = bundled[0] / "work" / "model"
    assert {str(path.relative_to(model)): absolute_paths(path) for path in text_files(model)
            if absolute_paths(path)} == {}


def test_pipeline_loads_the_bundle_and_generates(bundled):
    from model_core.pipeline import PyramidFlowPipeline

    pipe = PyramidFlowPipeline.from_pretrained(bundled[0] / "work" / "model", device="cpu")
    result = pipe.text_to_video("a red circle moving right", num_frames=9, first_frame_steps=(1, 1, 1),
                                video_steps=(1, 1, 1), seed=0)
    assert result.frames[0].shape == (9, 64, 64, 3) and result.fps == 8


def test_rerun_skips_finished_phases(bundled):
    root, args = bundled
    vae_weights = root / "work" / "vae" / "checkpoint-1" / "causal_video_vae" / "diffusion_pytorch_model.safetensors"
    before = vae_weights.stat().st_mtime_ns
    assert main(args) == 0
    assert vae_weights.stat().st_mtime_ns == before
