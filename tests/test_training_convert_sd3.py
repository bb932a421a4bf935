"""SD3-Medium's transformer (diffusers layout) into the pyramid MMDiT: every weight mapped, none left over, and
the same single-frame prediction where the architectures agree."""
import pytest
import torch

from tests.tiny_checkpoint import build_tiny_checkpoint
from training.convert_sd3 import main

TINY = dict(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=6, out_channels=4,
            pos_embed_max_size=16)


def tiny_sd3(folder, qk_norm, std=0.05):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)  # the test's own random SD3 model (library code never seeds the global RNG)
    model = SD3Transformer2DModel(**TINY, qk_norm=qk_norm).eval()
    with torch.no_grad():
        for p in model.parameters():  # diffusers zero-initialises some layers; random everywhere tests the mapping
            p.add_(torch.randn_like(p) * std)
    model.save_pretrained(folder / "transformer")
    return model


@pytest.fixture(scope="module")
def vae_root(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", family="sd3")


def test_single_frame_prediction_matches_sd3(tmp_path, vae_root):
    """One frame, no history, all text tokens valid: the temporal RoPE (angle 0 at the one frame and the text), the
    causal mask between frames and the T5 mask have nothing to act on, so the two networks compute the same thing."""
    from model_core.transformers import PyramidMMDiT

    sd3 = tiny_sd3(tmp_path / "sd3", qk_norm="rms_norm")
    assert main(["--from", str(tmp_path / "sd3"), "--vae", str(vae_root), "--out", str(tmp_path / "out")]) == 0
    ours = PyramidMMDiT.from_pretrained(tmp_path / "out" / "diffusion_transformer_384p").eval()
    theirs = {k.replace("norm_added_", "norm_add_"): v for k, v in sd3.state_dict().items()}
    assert set(ours.state_dict()) == set(theirs)  # every weight mapped, none left over
    assert all(torch.equal(v, theirs[k]) for k, v in ours.state_dict().items())
    torch.testing.assert_close(*forwards(sd3, ours), rtol=1e-4, atol=1e-5)


def forwards(sd3, ours) -> tuple:
    """(ours, SD3's) single-frame predictions of two random latents with all text tokens valid."""
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    text = torch.randn(2, 5, 12, generator=generator)
    pooled = torch.randn(2, 6, generator=generator)
    timestep = torch.tensor([900.0, 250.0])
    with torch.no_grad():
        expected = sd3(hidden_states=latents, encoder_hidden_states=text, pooled_projections=pooled,
                       timestep=timestep, return_dict=False)[0]
        velocities = ours(sample=[[latents[i : i + 1, :, None]] for i in range(2)], encoder_hidden_states=text,
                          encoder_attention_mask=torch.ones(2, 5, dtype=torch.long), pooled_projections=pooled,
                          timestep=timestep, return_dict=False)[0]
    return torch.cat([v[:, :, 0] for v in velocities]), expected


@pytest.mark.parametrize("qk_norm, bounds", [("identity", (0, 1e-3)), ("unit", (0.1, 10))])
def test_identity_qk_norms_keep_sd3_mediums_outputs_and_unit_ones_do_not(tmp_path, vae_root, qk_norm, bounds, capsys):
    """SD3-Medium (no q/k norms) at realistic weight scales (std 0.3): with `--qk-norm identity` the converted
    model's prediction is diffusers' SD3Transformer2DModel's within 1e-3 (relative); the published unit norms
    change it (and the tool says so)."""
    from model_core.transformers import PyramidMMDiT

    sd3 = tiny_sd3(tmp_path / "sd3", qk_norm=None, std=0.3)
    out = tmp_path / "out"
    assert main(["--from", str(tmp_path / "sd3"), "--vae", str(vae_root), "--out", str(out), "--qk-norm", qk_norm]) == 0
    said = capsys.readouterr().out
    assert ("computes SD3's function" in said) if qk_norm == "identity" else ("outputs differ from SD3's" in said)
    ours, theirs = forwards(sd3, PyramidMMDiT.from_pretrained(out / "diffusion_transformer_384p").eval())
    change = float((ours - theirs).norm() / theirs.norm())
    print(f"relative output change with --qk-norm {qk_norm}: {change:.3g}")
    assert bounds[0] <= change <= bounds[1]


def test_sd3_medium_without_qk_norms_gets_unit_norms_and_a_loadable_checkpoint(tmp_path, vae_root, capsys):
    from model_core.loading import resolve_checkpoint
    from model_core.transformers import PyramidMMDiT

    tiny_sd3(tmp_path / "sd3", qk_norm=None)
    for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"):
        (tmp_path / "sd3" / name).symlink_to(vae_root / name, target_is_directory=True)
    assert main(["--from", str(tmp_path / "sd3"), "--vae", str(vae_root), "--out", str(tmp_path / "out")]) == 0
    assert "8 new q/k norm weights at 1" in capsys.readouterr().out  # 2 blocks x (q, k, add_q, add_k)
    ours = PyramidMMDiT.from_pretrained(tmp_path / "out" / "diffusion_transformer_384p")
    norms = {k: v for k, v in ours.state_dict().items() if ".norm_q." in k or ".norm_add_k." in k}
    assert norms and all(torch.equal(v, torch.ones_like(v)) for v in norms.values())
    resolved = resolve_checkpoint(tmp_path / "out")
    assert resolved.family.name == "sd3" and resolved.variant == "384p"


def test_sd35_dual_attention_is_refused(tmp_path, vae_root, capsys):
    from diffusers import SD3Transformer2DModel

    SD3Transformer2DModel(**TINY, qk_norm="rms_norm", dual_attention_layers=(0,)).save_pretrained(tmp_path / "sd3" / "transformer")
    assert main(["--from", str(tmp_path / "sd3"), "--vae", str(vae_root), "--out", str(tmp_path / "out")]) == 2
    assert "dual-attention" in capsys.readouterr().err and not (tmp_path / "out").exists()
