"""LoRA through diffusers' PeftAdapterMixin: the two file layouts, fuse / unfuse / unload, several adapters."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model_core.lora import DIFFUSERS_METADATA_KEY, PyramidLoraLoaderMixin, load_lora_adapter, lora_specs, read_lora
from model_core.pipeline import PyramidFlowPipeline
from model_core.transformers import PyramidFluxTransformer
from training.models import add_lora
from training.weights import save_lora_weights

from test_transformer_behaviour import TINY, pyramid_column, text_inputs, velocity
from tiny_checkpoint import build_tiny_checkpoint

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def tiny_transformer():
    cls, config = TINY["flux"]
    return cls.from_config(config).eval()


def trained_adapter(folder, seed, rank=4, alpha=8, model=None):
    """What training writes (training.weights.save_lora_weights) for a LoRA with non-zero B matrices."""
    model = model or tiny_transformer()
    lora = {"rank": rank, "alpha": alpha, "target_modules": TARGETS}
    add_lora(model, lora, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    save_lora_weights(folder, model, lora, model.state_dict())
    return folder, model


def base_weights(model) -> dict:
    """The state dict of `model` without its LoRA layers."""
    return {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".lora_" not in k}


@pytest.fixture
def inputs():
    model = tiny_transformer()
    return model, pyramid_column(), text_inputs(model, 2)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {name: trained_adapter(root / name, seed) for name, seed in (("a", 1), ("b", 2))}


def run(model, clips, text):
    with torch.no_grad():
        return velocity(model, clips, text)


def test_training_folder_gives_the_trained_model(adapters, inputs):
    folder, trained = adapters["a"]
    model, clips, text = inputs
    model.load_state_dict(base_weights(trained))
    base = run(model, clips, text)
    assert load_lora_adapter(model, folder) == "a"
    assert model.peft_config["a"].lora_alpha == 8 and model.peft_config["a"].r == 4
    adapted = run(model, clips, text)
    assert not torch.allclose(base, adapted, atol=1e-3)
    torch.testing.assert_close(adapted, run(trained, clips, text), rtol=0, atol=1e-6)


def test_fuse_unfuse_and_unload(adapters, inputs):
    model, clips, text = inputs
    base = run(model, clips, text)
    weights_before = {k: v.clone() for k, v in model.state_dict().items()}
    holder = PipelineLike(model)
    holder.load_lora_weights(adapters["a"][0], weight=0.7)
    unfused = run(model, clips, text)
    holder.unload_lora_weights()
    assert torch.equal(run(model, clips, text), base)
    assert all(torch.equal(v, weights_before[k]) for k, v in model.state_dict().items())
    assert holder.lora_settings() == [] and not any("lora" in name for name, _ in model.named_modules())

    holder.load_lora_weights(adapters["a"][0], weight=0.7)
    torch.testing.assert_close(run(model, clips, text), unfused, rtol=0, atol=0)
    holder.fuse_lora()
    fused = run(model, clips, text)
    torch.testing.assert_close(fused, unfused, rtol=0, atol=1e-5)
    assert not torch.allclose(fused, base, atol=1e-3)
    holder.unfuse_lora()
    torch.testing.assert_close(run(model, clips, text), unfused, rtol=0, atol=1e-5)
    holder.fuse_lora()
    holder.unload_lora_weights()  # unfuses first: the base weights come back up to rounding
    torch.testing.assert_close(run(model, clips, text), base, rtol=0, atol=1e-5)


def test_two_adapters_with_weights(adapters, inputs):
    model, clips, text = inputs
    holder = PipelineLike(model)
    holder.load_lora_weights(adapters["a"][0], weight=0.5)
    only_a = run(model, clips, text)
    holder.load_lora_weights(adapters["b"][0], adapter_name="second", weight=1.5)
    assert holder.lora_settings() == [{"name": "a", "weight": 0.5}, {"name": "second", "weight": 1.5}]
    both = run(model, clips, text)
    assert not torch.allclose(both, only_a, atol=1e-3)
    # one projection by hand: base + sum of weight * (alpha / r) * B A x over the adapters
    layer = model.transformer_blocks[0].attn.to_q
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(5))
    expected = layer.base_layer(x)
    for name, weight in (("a", 0.5), ("second", 1.5)):
        expected = expected + weight * (8 / 4) * layer.lora_B[name](layer.lora_A[name](x))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)
    holder.set_adapters(["a", "second"], [0.5, 0.0])
    torch.testing.assert_close(run(model, clips, text), only_a, rtol=0, atol=1e-6)
    holder.set_adapters("second", 1.5)
    assert holder.get_active_adapters() == ["second"] and holder.lora_settings() == [{"name": "second", "weight": 1.5}]
    with pytest.raises(ValueError, match="no LoRA named 'c'"):
        holder.set_adapters(["a", "c"])
    with pytest.raises(ValueError, match="one weight per adapter"):
        holder.set_adapters(["a", "second"], [1.0])


def test_peft_adapter_folder_loads_like_training_folder(adapters, inputs, tmp_path):
    """A peft adapter folder (adapter_config.json + adapter_model.safetensors: what training wrote before)."""
    from peft import get_peft_model_state_dict

    from training.models import lora_config

    model, clips, text = inputs
    folder, trained = adapters["a"]
    model.load_state_dict(base_weights(trained))
    peft_folder = tmp_path / "peft-a"
    lora_config({"rank": 4, "alpha": 8, "target_modules": TARGETS}).save_pretrained(str(peft_folder))
    save_file(get_peft_model_state_dict(trained), str(peft_folder / "adapter_model.safetensors"))
    assert load_lora_adapter(model, peft_folder) == "peft-a"
    torch.testing.assert_close(run(model, clips, text), run(trained, clips, text), rtol=0, atol=1e-6)


def test_diffusers_files_load_like_the_training_folder(adapters, inputs, tmp_path):
    model, clips, text = inputs
    folder, trained = adapters["a"]
    model.load_state_dict(base_weights(trained))
    reference = run(trained, clips, text)
    weights, config = read_lora(folder)
    # a pipeline-level file: keys under `transformer.`, config in the safetensors metadata, as diffusers writes it
    prefixed = tmp_path / "pipeline-file"
    prefixed.mkdir()
    metadata = {DIFFUSERS_METADATA_KEY: json.dumps({f"transformer.{k}": v for k, v in config.items()})}
    save_file({f"transformer.{k}": v for k, v in weights.items()}, str(prefixed / "pytorch_lora_weights.safetensors"),
              metadata=metadata)
    load_lora_adapter(model, prefixed)
    torch.testing.assert_close(run(model, clips, text), reference, rtol=0, atol=1e-6)
    # a model-level file written by diffusers itself (save_lora_adapter), read as a lone .safetensors file
    model.save_lora_adapter(tmp_path / "model-file", adapter_name="pipeline-file")
    fresh = tiny_transformer()
    fresh.load_state_dict(base_weights(model))
    assert load_lora_adapter(fresh, tmp_path / "model-file" / "pytorch_lora_weights.safetensors") == "pytorch_lora_weights"
    torch.testing.assert_close(run(fresh, clips, text), reference, rtol=0, atol=1e-6)
    with safe_open(str(tmp_path / "model-file" / "pytorch_lora_weights.safetensors"), "pt") as handle:
        assert not any(key.startswith("transformer.") for key in handle.keys())


def test_bad_loras_are_refused_with_a_sentence(adapters, inputs, tmp_path):
    model = inputs[0]
    with pytest.raises(FileNotFoundError, match="is not a LoRA: expected a folder with adapter_config.json"):
        load_lora_adapter(model, tmp_path / "nothing-here")
    load_lora_adapter(model, adapters["a"][0])
    with pytest.raises(ValueError, match="a LoRA named 'a' is already loaded"):
        load_lora_adapter(model, adapters["a"][0])
    save_file({"transformer.x.weight": torch.zeros(2), "text_encoder.y.lora_A.weight": torch.zeros(2, 2)},
              str(tmp_path / "mixed.safetensors"))
    with pytest.raises(ValueError, match="only transformer LoRAs are supported"):
        read_lora(tmp_path / "mixed.safetensors")
    wide = PyramidFluxTransformer.from_config({**TINY["flux"][1], "num_attention_heads": 4})
    with pytest.raises(ValueError, match="does not fit this transformer"):
        load_lora_adapter(wide, adapters["b"][0])


class PipelineLike(PyramidLoraLoaderMixin):
    def __init__(self, transformer):
        self.transformer = transformer


def test_pipeline_loads_loras_and_records_them(tmp_path):
    checkpoint = build_tiny_checkpoint(tmp_path / "checkpoint", "miniflux")
    pipe = PyramidFlowPipeline.from_pretrained(checkpoint)
    shape = dict(first_frame_steps=(1, 1, 1), video_steps=(1, 1, 1), num_frames=9, seed=0, output_type="latent")
    base = pipe("a red square", **shape)
    assert base.settings["lora"] == []
    folders = {}
    for name, seed in (("sharp", 1), ("soft", 2)):
        model = type(pipe.transformer).from_config(pipe.transformer.config)
        model.load_state_dict(pipe.transformer.state_dict())
        folders[name] = trained_adapter(tmp_path / name, seed, model=model)[0]

    loaded = PyramidFlowPipeline.from_pretrained(checkpoint, lora=[folders["sharp"], (folders["soft"], 0.5)])
    out = loaded("a red square", **shape)
    assert out.settings["lora"] == [{"name": "sharp", "weight": 1.0}, {"name": "soft", "weight": 0.5}]
    assert not torch.allclose(out.latents, base.latents, atol=1e-4)
    pipe.load_lora_weights(folders["sharp"])
    pipe.load_lora_weights(folders["soft"], weight=0.5)
    assert torch.equal(pipe("a red square", **shape).latents, out.latents)
    pipe.unload_lora_weights()
    after = pipe("a red square", **shape)
    assert torch.equal(after.latents, base.latents) and after.settings["lora"] == []


def test_lora_specs_take_folders_pairs_and_lists(tmp_path):
    assert lora_specs(None) == []
    assert lora_specs(tmp_path) == [(str(tmp_path), 1.0)]
    assert lora_specs((tmp_path, 0.25)) == [(str(tmp_path), 0.25)]
    assert lora_specs(["a", ("b", 2)]) == [("a", 1.0), ("b", 2.0)]
    with pytest.raises(ValueError, match="a \\(folder, weight\\) pair"):
        lora_specs([("a", "heavy")])


def test_cli_applies_repeated_loras_and_records_them(tmp_path):
    from model_core.media_files import read_metadata
    from pyramid_app import cli

    checkpoint = build_tiny_checkpoint(tmp_path / "checkpoint", "miniflux")
    transformer = PyramidFlowPipeline.from_pretrained(checkpoint).transformer
    folders = []
    for name, seed in (("style", 1), ("motion", 2)):
        model = type(transformer).from_config(transformer.config)
        model.load_state_dict(transformer.state_dict())
        folders.append(trained_adapter(tmp_path / name, seed, model=model)[0])
    out = tmp_path / "clip.mp4"
    code = cli.main(["generate", "--prompt", "a red square", "--out", str(out), "--model", str(checkpoint),
                     "--num-frames", "9", "--seed", "0", "--first-frame-steps", "1,1,1", "--video-steps", "1,1,1",
                     "--lora", f"{folders[0]}:0.6", "--lora", str(folders[1]), "--quiet"])
    assert code == 0
    assert read_metadata(out)["lora"] == [{"name": "style", "weight": 0.6}, {"name": "motion", "weight": 1.0}]


def test_lora_option_is_checked_before_loading(tmp_path):
    from pyramid_app.options.settings import ModelOptions, parse_lora

    assert parse_lora(f"{tmp_path}:0.5") == (str(tmp_path), 0.5)
    assert parse_lora(str(tmp_path)) == (str(tmp_path), 1.0)
    assert ModelOptions(lora=[str(tmp_path), (tmp_path, 2)]).lora == ((str(tmp_path), 1.0), (str(tmp_path), 2.0))
    with pytest.raises(FileNotFoundError, match="missing does not exist; give a LoRA folder"):
        parse_lora(f"{tmp_path}/missing:0.5")
    with pytest.raises(ValueError, match="a LoRA weight must be a number"):
        parse_lora((tmp_path, "nan"))


def test_studio_offers_only_the_lora_folder_and_switches_without_reloading(tmp_path):
    from pyramid_app.studio import gallery, layout as studio
    from pyramid_app.studio.endpoints import Endpoints
    from pyramid_app.studio.sessions import PipelineCache
    from pyramid_app.options.settings import ModelOptions

    checkpoint = build_tiny_checkpoint(tmp_path / "checkpoint", "miniflux")
    cache = PipelineCache()
    pipe = cache.get(ModelOptions(model=str(checkpoint)))
    model = type(pipe.transformer).from_config(pipe.transformer.config)
    model.load_state_dict(pipe.transformer.state_dict())
    trained_adapter(tmp_path / "loras" / "style", 1, model=model)
    (tmp_path / "loras" / "notes").mkdir()  # not a LoRA: not offered

    endpoints = Endpoints(str(checkpoint), tmp_path / "out", cache, lora_dir=tmp_path / "loras")
    assert list(endpoints.loras) == ["style"]
    assert endpoints._lora("style", 0.4) == ((str(tmp_path / "loras" / "style"), 0.4),)
    assert endpoints._lora(gallery.NO_LORA, 1.0) == ()
    with pytest.raises(ValueError, match="not in the studio's LoRA folder; pick one of: style"):
        endpoints._lora("../checkpoint", 1.0)
    with pytest.raises(ValueError, match="the LoRA weight must be a number from 0 to 2"):
        endpoints._lora("style", "heavy")

    shape = dict(first_frame_steps=(1, 1, 1), video_steps=(1, 1, 1), num_frames=9, seed=0, output_type="latent")
    base = pipe("a red square", **shape).latents
    styled = cache.get(ModelOptions(model=str(checkpoint), lora=endpoints._lora("style", 0.4)))
    assert styled is pipe and pipe.lora_settings() == [{"name": "style", "weight": 0.4}]
    out = pipe("a red square", **shape)
    assert not torch.allclose(out.latents, base, atol=1e-4)
    assert gallery.control_values(out.settings)["lora"] == "style"
    assert gallery.control_values(out.settings)["lora_weight"] == 0.4
    assert cache.get(ModelOptions(model=str(checkpoint))) is pipe and pipe.lora_settings() == []
    assert torch.equal(pipe("a red square", **shape).latents, base)

    demo = studio.build_studio(str(checkpoint), tmp_path / "out", cache, lora_dir=tmp_path / "loras")
    picker = next(block for block in demo.blocks.values() if getattr(block, "elem_id", None) == "lora")
    assert [choice[1] for choice in picker.choices] == [gallery.NO_LORA, "style"]
