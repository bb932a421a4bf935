"""Loading published-layout checkpoints: local folders, hub ids (through a local hub cache), errors."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from model_core import PyramidFlowPipeline
from model_core.checkpoints import VAE_FOLDER, transformer_folder
from model_core.loading import resolve_checkpoint
from tiny_checkpoint import build_tiny_checkpoint


@pytest.fixture(scope="module", params=["miniflux", "sd3"])
def checkpoint(request, tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture
def copy(checkpoint, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(checkpoint, target)
    return target


def test_official_layout_loads_end_to_end(checkpoint):
    pipe = PyramidFlowPipeline.from_pretrained(checkpoint)
    family = "sd3" if (checkpoint / "text_encoder_3").is_dir() else "miniflux"
    assert (pipe.family.name, pipe.variant) == (family, "384p")
    assert type(pipe.transformer).__name__ == ("PyramidMMDiT" if family == "sd3" else "PyramidFluxTransformer")
    out = pipe.text_to_image("a red circle", first_frame_steps=(1, 1, 1), seed=0)
    assert out.frames[0].shape == (1, 64, 64, 3)


def test_family_and_variant_can_be_named(checkpoint):
    family = "sd3" if (checkpoint / "text_encoder_3").is_dir() else "miniflux"
    resolved = resolve_checkpoint(checkpoint, variant="384p", model=family)
    assert resolved.transformer_path == checkpoint / transformer_folder("384p")


def test_unknown_variant_names_the_allowed_ones(checkpoint):
    with pytest.raises(ValueError, match="unknown variant '1080p'.*'384p'"):
        PyramidFlowPipeline.from_pretrained(checkpoint, variant="1080p")


def test_unknown_family_names_the_allowed_ones(checkpoint):
    with pytest.raises(ValueError, match="unknown model family 'sdxl'.*'miniflux'"):
        PyramidFlowPipeline.from_pretrained(checkpoint, model="sdxl")


def test_variant_folder_that_is_absent(checkpoint):
    with pytest.raises(FileNotFoundError, match=r"missing folder diffusion_transformer_768p/.*expected layout"):
        PyramidFlowPipeline.from_pretrained(checkpoint, variant="768p")


def test_missing_vae_folder_names_it_and_the_layout(copy):
    shutil.rmtree(copy / VAE_FOLDER)
    with pytest.raises(FileNotFoundError, match=r"missing folder causal_video_vae/.*expected layout: causal_video_vae/, diffusion_transformer_384p/"):
        PyramidFlowPipeline.from_pretrained(copy)


def test_missing_weights_file_is_named(copy):
    for weights in (copy / transformer_folder("384p")).glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(FileNotFoundError, match=r"no weights \(\*.safetensors or \*.bin\) in .*diffusion_transformer_384p"):
        PyramidFlowPipeline.from_pretrained(copy)


def test_missing_text_encoder_is_named(copy):
    shutil.rmtree(copy / "tokenizer_2")
    with pytest.raises(FileNotFoundError, match="tokenizer_2"):
        PyramidFlowPipeline.from_pretrained(copy)


def test_no_transformer_folder_at_all(copy):
    shutil.rmtree(copy / transformer_folder("384p"))
    with pytest.raises(FileNotFoundError, match=r"no diffusion_transformer_<variant>/ folder"):
        PyramidFlowPipeline.from_pretrained(copy)


def test_weights_that_do_not_fit_the_config_are_explained(copy):
    folder = copy / transformer_folder("384p")
    config = json.loads((folder / "config.json").read_text())
    config["joint_attention_dim"] = 48  # the weights were made for 32-wide text features
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"does not fit its config: .* has shape \[.*\], the config .* builds \["):
        PyramidFlowPipeline.from_pretrained(copy)


def test_bin_weights_load_with_weights_only(copy):
    folder = copy / VAE_FOLDER
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(state, folder / "diffusion_pytorch_model.bin")
    pipe = PyramidFlowPipeline.from_pretrained(copy)
    torch.testing.assert_close(pipe.vae.state_dict()["quant_conv.conv.weight"], state["quant_conv.conv.weight"])


def test_pickled_code_in_a_bin_file_is_refused(copy):
    folder = copy / VAE_FOLDER
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"payload": torch.nn.ReLU()}, folder / "diffusion_pytorch_model.bin")  # a module object, not tensors
    with pytest.raises(ValueError, match="refusing to load .*not a plain tensor checkpoint"):
        PyramidFlowPipeline.from_pretrained(copy)


def test_safetensors_preferred_over_bin(copy):
    folder = copy / VAE_FOLDER
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    torch.save({k: torch.zeros_like(v) for k, v in state.items()}, folder / "diffusion_pytorch_model.bin")
    pipe = PyramidFlowPipeline.from_pretrained(copy)
    torch.testing.assert_close(pipe.vae.state_dict()["quant_conv.conv.weight"], state["quant_conv.conv.weight"])


def test_not_a_folder_nor_a_repo_id():
    with pytest.raises(FileNotFoundError, match="neither a checkpoint folder nor a hub repo id"):
        PyramidFlowPipeline.from_pretrained("/no/such/folder")


def test_hub_id_without_network_says_how_to_pass_a_folder(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ConnectionError, match=r"cannot download 'rain1011/pyramid-flow-miniflux'.*pass that folder"):
        PyramidFlowPipeline.from_pretrained("rain1011/pyramid-flow-miniflux")


def test_hub_id_resolves_through_the_hub_cache(checkpoint, tmp_path, monkeypatch):
    """The hub code path users take, served from a local hub cache (no network here)."""
    repo = "rain1011/pyramid-flow-" + ("sd3" if (checkpoint / "text_encoder_3").is_dir() else "miniflux")
    cache = tmp_path / "hub"
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / "0123456789abcdef"
    shutil.copytree(checkpoint, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    pipe = PyramidFlowPipeline.from_pretrained(repo)
    assert pipe.checkpoint.root == snapshot
    assert pipe.text_to_image("a cube", first_frame_steps=(1, 1, 1), seed=1).frames[0].shape == (1, 64, 64, 3)


def test_loads_in_parallel_threads_leave_module_construction_alone(checkpoint):
    """diffusers and transformers patch torch process-wide while they build a model (accelerate's
    init_empty_weights, the default dtype); two loads at once must not leave those patches behind."""
    import threading

    failures = []

    def load():
        try:
            PyramidFlowPipeline.from_pretrained(checkpoint)
        except Exception as error:  # reported below: a thread's exception would otherwise vanish
            failures.append(error)

    for _ in range(3):
        threads = [threading.Thread(target=load) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert failures == []
    layer = torch.nn.Linear(2, 2)
    assert layer.weight.device.type == "cpu" and layer.weight.dtype == torch.float32


def test_links_leading_out_of_the_checkpoint_are_refused_for_hosting(copy, tmp_path):
    from model_core.loading import check_contained

    check_contained(copy)  # a plain copy
    inside = copy / VAE_FOLDER / "config.json"
    (copy / "config-link.json").symlink_to(inside)
    check_contained(copy)  # a link that stays inside
    elsewhere = tmp_path / "elsewhere.safetensors"
    weights = copy / VAE_FOLDER / "diffusion_pytorch_model.safetensors"
    shutil.move(weights, elsewhere)
    weights.symlink_to(elsewhere)
    with pytest.raises(ValueError, match="causal_video_vae/diffusion_pytorch_model.safetensors in the checkpoint "
                                         "folder copy is a link to a file outside it"):
        check_contained(copy)
