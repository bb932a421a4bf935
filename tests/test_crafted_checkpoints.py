"""Crafted checkpoints: a pyramid_flow.json that asks for too much, weights that do not fit their config, NaN weights,
a named pipe or a device where a file belongs. Each is refused in one sentence before anything is built."""
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file, save_file

from model_core.checkpoints import (
    FAMILIES,
    MAX_JSON_BYTES,
    MAX_LATENT_FRAMES,
    MAX_SIDE,
    MAX_STEPS,
    MAX_VARIANTS,
    SAMPLING_RANGES,
    SETTINGS_FILE,
    VAE_FOLDER,
    VARIANT_RANGES,
    from_description,
    latent_normalization,
    read_json,
    sampling_defaults,
    variant_spec,
    vae_temporal_scale,
    with_overrides,
)
from model_core.loading import load_model, resolve_checkpoint
from model_core.weight_files import check_finite
from model_core.text import load_prompt_encoder
from training.tiny_text import write_tiny_text_stack
from model_core.vae import CausalVideoVAE
from pyramid_app.options import settings

TRANSFORMER = "diffusion_transformer_64p"  # the bundled model's only variant
CLI_TIMEOUT_S = 120  # generous: on two busy shared cores a refusal takes 6-12 s, nearly all of it Python's start-up


def edit_settings(root, change) -> None:
    path = root / SETTINGS_FILE
    values = json.loads(path.read_text())
    change(values)
    path.write_text(json.dumps(values))


def edit_weights(file, change) -> None:
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def replace_with_fifo(path) -> None:
    path.unlink()
    os.mkfifo(path)


def poison_first_tensor(tensors: dict, value: float) -> None:
    tensors[sorted(tensors)[0]].view(-1)[0] = value


@pytest.fixture
def crafted(tmp_path):
    """A copy of the bundled model (miniFLUX layout: CLIP text_encoder, T5 text_encoder_2) to damage."""
    return shutil.copytree(settings.BUNDLED_MODEL, tmp_path / "model")


# --- the crafted checkpoints of the issue, through the real command line ---------------------------------------------

CLI_CASES = {
    "max_latent_frames_1e6": (
        lambda root: edit_settings(root, lambda s: s["variants"]["64p"].update(max_latent_frames=1_000_000)),
        f"pyramid_flow.json: variants.64p.max_latent_frames is 1000000; allowed: a whole number from 1 to {MAX_LATENT_FRAMES}"),
    "sampling_steps_1e6": (
        lambda root: edit_settings(root, lambda s: s["sampling"].update(video_steps=[1_000_000, 10, 10])),
        f"pyramid_flow.json: sampling.video_steps[0] is 1000000; allowed: a whole number from 1 to {MAX_STEPS}"),
    "text_encoder_tensor_missing": (
        lambda root: edit_weights(root / "text_encoder" / "model.safetensors",
                                  lambda t: t.pop("embeddings.position_embedding.weight")),
        "text_encoder lack 1 of the 36 tensors its config.json builds: embeddings.position_embedding.weight"),
    "text_encoder_2_wrong_shape": (
        lambda root: edit_weights(root / "text_encoder_2" / "model.safetensors",
                                  lambda t: t.update({"shared.weight": torch.zeros(3, 5)})),
        "text_encoder_2 does not fit its config: shared.weight has shape [3, 5]"),
    "variant_entry_with_unknown_field": (
        lambda root: edit_settings(root, lambda s: s["variants"].update({"64p": {"height": 64, "wide": 64}})),
        "pyramid_flow.json: variants.64p has unknown field(s) wide; allowed: an object with height, width, max_latent_frames"),
    "variant_of_65536_pixels": (
        lambda root: edit_settings(root, lambda s: s["variants"]["64p"].update(height=65536, width=65536)),
        f"pyramid_flow.json: variants.64p.height is 65536; allowed: a whole number from 1 to {MAX_SIDE}"),
    "nan_transformer_weights": (
        lambda root: edit_weights(root / TRANSFORMER / "diffusion_pytorch_model.safetensors",
                                  lambda t: poison_first_tensor(t, float("nan"))),
        f"{TRANSFORMER} hold NaN or infinite values in 1 tensor(s)"),
    "fifo_as_transformer_weights": (
        lambda root: replace_with_fifo(root / TRANSFORMER / "diffusion_pytorch_model.safetensors"),
        "diffusion_pytorch_model.safetensors is a named pipe (FIFO), not a regular file"),
    "fifo_as_pyramid_flow_json": (
        lambda root: replace_with_fifo(root / SETTINGS_FILE),
        "pyramid_flow.json is a named pipe (FIFO), not a regular file"),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_the_command_line_refuses_a_crafted_checkpoint_in_one_line(case, crafted, tmp_path):
    craft, expected = CLI_CASES[case]
    craft(crafted)
    out = tmp_path / "x.mp4"
    completed = subprocess.run(
        [sys.executable, "-m", "pyramid_app", "generate", "--model", str(crafted), "--prompt", "a red circle",
         "--out", str(out), "--quiet"],
        capture_output=True, text=True, cwd=settings.BUNDLED_MODEL.parents[2], timeout=CLI_TIMEOUT_S)
    lines = completed.stderr.strip().splitlines()
    assert completed.returncode != 0
    assert len(lines) == 1 and lines[0].startswith("error: "), completed.stderr
    assert expected in lines[0]
    assert not out.exists()


# --- tensors that do not fit their config, found before anything is built -------------------------------------------

def test_an_extra_transformer_tensor_is_refused(crafted):
    edit_weights(crafted / TRANSFORMER / "diffusion_pytorch_model.safetensors",
                 lambda t: t.update({"leftover.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=f"{TRANSFORMER} hold 1 tensors that its config.json does not build: leftover.weight"):
        resolve_checkpoint(crafted)


def test_a_missing_vae_tensor_is_refused(crafted):
    edit_weights(crafted / VAE_FOLDER / "diffusion_pytorch_model.safetensors", lambda t: t.pop("quant_conv.conv.weight"))
    with pytest.raises(ValueError, match=f"{VAE_FOLDER} lack 1 of the .* tensors its config.json builds: quant_conv.conv.weight;"):
        resolve_checkpoint(crafted)


def test_many_missing_tensors_are_counted_and_the_first_five_named(crafted):
    edit_weights(crafted / "text_encoder_2" / "model.safetensors",
                 lambda t: [t.pop(key) for key in sorted(t) if key.startswith("encoder.block.")])
    with pytest.raises(ValueError, match=r"text_encoder_2 lack 19 of the 22 tensors .*: (encoder\.block\.[^,]+, ){4}"
                                         r"encoder\.block\.[^,]+ and 14 more;"):
        resolve_checkpoint(crafted)


def test_an_extra_text_encoder_tensor_is_refused(crafted):
    edit_weights(crafted / "text_encoder" / "model.safetensors", lambda t: t.update({"pooler.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match="text_encoder hold 1 tensors that its config.json does not build: pooler.weight"):
        resolve_checkpoint(crafted)


def test_text_encoders_saved_the_older_way_still_load(crafted):
    """The published CLIP files carry a 'text_model.' prefix and the position_ids buffer, and T5 files only one of
    its two tied embeddings: transformers reads them all, so the check must accept them too."""
    edit_weights(crafted / "text_encoder" / "model.safetensors", lambda t: t.update(
        {"text_model." + key: t.pop(key) for key in list(t)} | {"text_model.embeddings.position_ids": torch.arange(77)[None]}))
    assert "encoder.embed_tokens.weight" not in load_file(crafted / "text_encoder_2" / "model.safetensors")
    resolve_checkpoint(crafted)
    expected = load_file(settings.BUNDLED_MODEL / "text_encoder" / "model.safetensors")["embeddings.token_embedding.weight"]
    encoder = load_prompt_encoder(crafted).encoders["text_encoder"]
    assert torch.equal(encoder.embeddings.token_embedding.weight, expected)


@pytest.fixture(scope="module")
def sd3_text(tmp_path_factory):
    """A tiny SD3 text stack: CLIP-L, CLIP-G with projection (text_encoder_2) and T5 (text_encoder_3)."""
    root = tmp_path_factory.mktemp("sd3") / "text"
    write_tiny_text_stack(root, "sd3")
    return root


def test_sd3_text_encoders_are_checked_too(sd3_text, tmp_path):
    missing, wrong_shape = shutil.copytree(sd3_text, tmp_path / "missing"), shutil.copytree(sd3_text, tmp_path / "shape")
    edit_weights(missing / "text_encoder_2" / "model.safetensors", lambda t: t.pop("text_projection.weight"))
    with pytest.raises(ValueError, match="text_encoder_2 lack 1 of the .* tensors .*: text_projection.weight;"):
        load_prompt_encoder(missing, "sd3")
    edit_weights(wrong_shape / "text_encoder_3" / "model.safetensors",
                 lambda t: t.update({"encoder.final_layer_norm.weight": torch.ones(7)}))
    with pytest.raises(ValueError, match=r"text_encoder_3 does not fit its config: encoder.final_layer_norm.weight has "
                                         r"shape \[7\], the config .* builds \[32\]"):
        load_prompt_encoder(wrong_shape, "sd3")


# --- NaN and infinity -----------------------------------------------------------------------------------------------

def test_nan_or_infinite_weights_are_refused_naming_the_folder_and_the_tensor(crafted):
    edit_weights(crafted / "text_encoder_2" / "model.safetensors", lambda t: t["shared.weight"].view(-1).__setitem__(3, float("inf")))
    with pytest.raises(ValueError, match="text_encoder_2 hold NaN or infinite values in 1 tensor.*, first shared.weight;"):
        load_prompt_encoder(crafted)
    edit_weights(crafted / VAE_FOLDER / "diffusion_pytorch_model.safetensors",
                 lambda t: t["quant_conv.conv.bias"].__setitem__(0, float("-inf")))
    with pytest.raises(ValueError, match=f"{VAE_FOLDER} hold NaN or infinite values .* first quant_conv.conv.bias;"):
        load_model(CausalVideoVAE, crafted / VAE_FOLDER)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_finite_check_finds_one_bad_value_in_any_float_dtype(dtype, tmp_path):
    model = torch.nn.Linear(64, 64).to(dtype)
    check_finite(model, tmp_path)  # finite weights pass
    with torch.no_grad():
        model.weight[17, 3] = float("nan")
    with pytest.raises(ValueError, match="first weight;"):
        check_finite(model, tmp_path)


# --- what is not a regular file --------------------------------------------------------------------------------------

def test_a_device_linked_as_weights_is_refused_without_reading_it(crafted):
    weights = crafted / VAE_FOLDER / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    weights.symlink_to("/dev/zero")
    with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors is a character device, not a regular file"):
        resolve_checkpoint(crafted)


def test_a_folder_where_a_config_belongs_is_refused(crafted):
    config = crafted / "text_encoder_2" / "config.json"
    config.unlink()
    config.mkdir()
    with pytest.raises(ValueError, match="text_encoder_2/config.json is a folder, not a regular file"):
        resolve_checkpoint(crafted)


def test_a_shard_index_naming_a_file_outside_its_folder_is_refused(crafted):
    folder = crafted / "text_encoder_2"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"shared.weight": "../../x.safetensors"}}))
    with pytest.raises(ValueError, match=r"names the weights file '../../x.safetensors', which is not a file in"):
        resolve_checkpoint(crafted)


def test_json_beyond_the_size_bound_is_refused_before_reading(tmp_path):
    path = tmp_path / SETTINGS_FILE
    with open(path, "wb") as file:
        file.truncate(MAX_JSON_BYTES + 1)  # sparse: nothing to read
    with pytest.raises(ValueError, match=f"is 64 MB; allowed: a JSON file of at most {MAX_JSON_BYTES // 2**20} MB"):
        read_json(path)


# --- the bounds ------------------------------------------------------------------------------------------------------

def test_the_published_settings_are_within_the_bounds():
    for family in FAMILIES.values():
        for name, spec in family.variants.items():
            assert variant_spec(name, asdict(spec), "x") == spec
        assert sampling_defaults(asdict(family.sampling), "x") == family.sampling
        assert latent_normalization(asdict(family.normalization), "x") == family.normalization
    assert with_overrides(settings.BUNDLED_MODEL, FAMILIES["miniflux"]).variants["64p"].max_latent_frames == 3


@pytest.mark.parametrize("field", sorted(VARIANT_RANGES))
def test_each_variant_number_is_bounded_on_both_sides(field):
    low, high = VARIANT_RANGES[field]
    entry = {"height": 64, "width": 64, "max_latent_frames": 3}
    assert getattr(variant_spec("64p", {**entry, field: high}, "m.json"), field) == high
    for value, shown in ((high + 1, high + 1), (low - 1, low - 1), (8.0, 8.0), (True, "true"), ("8", '"8"')):
        with pytest.raises(ValueError, match=rf"m.json: variants.64p.{field} is {shown}; allowed: a whole number from "
                                             rf"{low} to {high}$"):
            variant_spec("64p", {**entry, field: value}, "m.json")


@pytest.mark.parametrize("entry, fragment", [
    ("big", 'variants.64p is "big"; allowed: an object with height'),
    ({"height": 64, "width": 64}, "variants.64p has no max_latent_frames; allowed"),
    ({"height": 64, "width": 64, "max_latent_frames": 3, "frames": 9}, "variants.64p has unknown field(s) frames"),
])
def test_a_malformed_variant_entry_is_named(entry, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        variant_spec("64p", entry, "m.json")


@pytest.mark.parametrize("name", ["", "../../etc", "a/b", "x" * 65, "é"])
def test_variant_names_must_fit_a_folder_name(name):
    with pytest.raises(ValueError, match="m.json: variant name .* is not allowed; allowed: 1 to 64 letters"):
        variant_spec(name, {"height": 64, "width": 64, "max_latent_frames": 3}, "m.json")


@pytest.mark.parametrize("sampling, fragment", [
    ({"first_frame_steps": [20, 0, 20]}, f"sampling.first_frame_steps[1] is 0; allowed: a whole number from 1 to {MAX_STEPS}"),
    ({"video_steps": [10, 10, MAX_STEPS + 1]}, f"sampling.video_steps[2] is {MAX_STEPS + 1}; allowed"),
    ({"video_steps": "10,10,10"}, 'sampling.video_steps is "10,10,10"; allowed: a list of step counts'),
    ({"guidance_scale": float("nan")}, "sampling.guidance_scale is NaN; allowed: a number from 0 to 100"),
    ({"video_guidance_scale": float("inf")}, "sampling.video_guidance_scale is Infinity; allowed"),
    ({"cache_threshold": -0.1}, "sampling.cache_threshold is -0.1; allowed: a number from 0 to 10"),
    ({"cache": 3}, "sampling.cache is 3; allowed: the name of a step cache"),
])
def test_sampling_numbers_are_bounded(sampling, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        sampling_defaults(sampling, "m.json")


def test_the_largest_allowed_sampling_settings_are_accepted():
    high = {name: SAMPLING_RANGES[name][1] for name in ("guidance_scale", "video_guidance_scale", "cache_threshold")}
    sampling = sampling_defaults({"video_steps": [MAX_STEPS] * 3, **high}, "m.json")
    assert sampling.video_steps == (MAX_STEPS,) * 3 and sampling.guidance_scale == high["guidance_scale"]


def test_a_null_sampling_setting_means_the_default():
    assert sampling_defaults({"video_steps": None, "guidance_scale": None}, "m.json") == sampling_defaults({}, "m.json")


def test_latent_normalization_is_bounded():
    with pytest.raises(ValueError, match=r"latent_normalization.first_scale is 0; allowed: a number from 0.001 to 1000"):
        latent_normalization({"first_shift": 0.0, "first_scale": 0}, "m.json")
    with pytest.raises(ValueError, match="latent_normalization has no first_scale; allowed"):
        latent_normalization({"first_shift": 0.0}, "m.json")


def test_the_number_of_variants_is_bounded(tmp_path):
    variants = {f"v{i}": {"height": 64, "width": 64, "max_latent_frames": 1} for i in range(MAX_VARIANTS + 1)}
    (tmp_path / SETTINGS_FILE).write_text(json.dumps({"variants": variants}))
    with pytest.raises(ValueError, match=f"names {MAX_VARIANTS + 1} variants; allowed: at most {MAX_VARIANTS}"):
        with_overrides(tmp_path, FAMILIES["miniflux"])


def test_the_vae_temporal_compression_is_bounded(tmp_path):
    (tmp_path / VAE_FOLDER).mkdir()
    (tmp_path / VAE_FOLDER / "config.json").write_text(json.dumps({"encoder_temporal_down_sample": [True] * 7}))
    with pytest.raises(ValueError, match=r"encoder_temporal_down_sample is a JSON list; allowed: a list of true/false, "
                                         r"one per block, halving time at most 6 times"):
        vae_temporal_scale(tmp_path)


def test_a_saved_pipelines_description_is_bounded_as_well():
    description = {"family": "miniflux", "variant": "384p", "latent_normalization": asdict(FAMILIES["miniflux"].normalization),
                   "spec": {"height": 384, "width": 640, "max_latent_frames": 10**6}}
    with pytest.raises(ValueError, match="model_index.json: variants.384p.max_latent_frames is 1000000; allowed"):
        from_description(description, "model_index.json")
