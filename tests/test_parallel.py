"""Several processes, one generation: context parallel (Ulysses) and guidance parallel equal one process."""
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distributed import run_ranks
from tiny_checkpoint import build_tiny_checkpoint


def _transformer(root, family):
    from model_core.checkpoints import transformer_folder
    from model_core.transformers import PyramidFluxTransformer, PyramidMMDiT

    model_class = PyramidMMDiT if family == "sd3" else PyramidFluxTransformer
    return model_class.from_pretrained(root / transformer_folder("384p")).eval()


def _transformer_inputs(transformer):
    """A pyramid column whose text (7 tokens, 2 padded) and image (1 + 4 + 16 tokens) do not split evenly over 2 ranks."""
    generator = torch.Generator().manual_seed(1)
    channels = transformer.latent_channels
    history = [torch.randn(2, channels, 1, 2, 2, generator=generator), torch.randn(2, channels, 1, 4, 4, generator=generator)]
    current = torch.randn(2, channels, 1, 8, 8, generator=generator)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[:, 5:] = 0
    return dict(
        sample=[*history, current],
        encoder_hidden_states=torch.randn(2, 7, transformer.config.joint_attention_dim, generator=generator),
        encoder_attention_mask=mask,
        pooled_projections=torch.randn(2, transformer.config.pooled_projection_dim, generator=generator),
        timestep=torch.tensor([900.0, 300.0]),
        return_dict=False,
    )


GATE_STEPS = (0.0, 1e-4, 2e-4, 0.3, 0.3001, 1.0)  # input perturbations: small changes skip, large ones compute


def _cache_decisions(transformer, inputs, ranks) -> list:
    """The first-block cache's skip decisions over forwards of ever more perturbed inputs (`ranks`: the parallel
    engine, or None in one process)."""
    from model_core.step_cache import apply_step_cache, remove_step_cache, step_cache_state

    apply_step_cache(transformer, "first-block", threshold=0.01, ranks=ranks)
    generator = torch.Generator().manual_seed(2)
    noise = [torch.randn(clip.shape, generator=generator) for clip in inputs["sample"]]
    for eps in GATE_STEPS:
        transformer(**{**inputs, "sample": [clip + eps * n for clip, n in zip(inputs["sample"], noise)]})
    decisions = list(step_cache_state(transformer).decisions)
    remove_step_cache(transformer)
    return decisions


def _context_parallel_forward(rank, roots, out):
    from model_core.parallel import apply_parallel
    from model_core.step_cache import apply_step_cache, step_cache_state

    results = {}
    for family, root in roots.items():
        transformer = _transformer(root, family)
        inputs = _transformer_inputs(transformer)
        with torch.no_grad():
            single = transformer(**inputs)[0][0]
            one_process = _cache_decisions(transformer, inputs, None)
            engine = apply_parallel(transformer, {"guidance": 1, "context": 2})
            parallel = transformer(**inputs)[0][0]
            two_ranks = _cache_decisions(transformer, inputs, engine)
        assert engine.settings() == {"world_size": 2, "guidance": 1, "context": 2}
        assert (engine.context.text_slice, engine.context.image_slice) == (4, 11)  # 7 -> 8 and 21 -> 22 tokens
        assert (engine.all_agree(True), engine.all_agree(rank == 0), engine.all_agree(False)) == (True, False, False)
        apply_step_cache(transformer, "first-block", threshold=0.0, ranks=engine)  # skips on all ranks or none
        assert step_cache_state(transformer).ranks is engine
        with torch.no_grad():
            cached = transformer(**inputs)[0][0]
        results[family] = {"single": single, "parallel": parallel, "cached": cached,
                           "decisions": torch.tensor([one_process, two_ranks])}
    if rank == 0:
        torch.save(results, out)


def test_context_parallel_forward_equals_one_process(tmp_path):
    roots = {family: build_tiny_checkpoint(tmp_path / family, family) for family in ("miniflux", "sd3")}
    out = tmp_path / "velocity.pt"
    run_ranks(_context_parallel_forward, 2, tmp_path, roots, out, timeout=600)
    for family, result in torch.load(out, weights_only=True).items():
        assert result["single"].shape == (2, 4, 1, 8, 8), family
        assert result["single"].abs().max() > 0.1, family
        assert (result["parallel"] - result["single"]).abs().max() <= 1e-5, family
        assert (result["cached"] - result["single"]).abs().max() <= 1e-5, family
        one_process, two_ranks = result["decisions"].tolist()  # the gate reads the whole sequence on every rank
        assert one_process == two_ranks and set(one_process) == {True, False}, (family, one_process, two_ranks)


@pytest.mark.parametrize("parallel, world_size, expected", [
    ("auto", 4, (2, 2)), ("auto", 3, (1, 3)), ({"guidance": 2}, 2, (2, 1)), ({"context": 2}, 2, (1, 2)),
])
def test_layouts_resolve_to_guidance_times_context(parallel, world_size, expected):
    from model_core.parallel import as_config

    config = as_config(parallel, world_size)
    assert (config.guidance, config.context) == expected


@pytest.mark.parametrize("parallel, message", [
    ({"guidance": 3}, "1 or 2 ranks"), ({"guidance": 2, "context": 3}, "must equal the world size 4"),
    ({"ring": 2}, "'guidance' and 'context'"), ("fast", "'auto', a dict"),
])
def test_bad_layouts_are_explained(parallel, message):
    from model_core.parallel import as_config

    with pytest.raises(ValueError, match=message):
        as_config(parallel, 4)


def test_parallelism_needs_a_process_group():
    from model_core.parallel import Parallelism

    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="torchrun"):
        Parallelism("auto", torch.device("cpu"))


GENERATION = dict(num_frames=9, first_frame_steps=(2, 1, 1), video_steps=(1, 1, 1), guidance_scale=4.0,
                  video_guidance_scale=3.0, seed=3, output_type="latent")
IMAGE = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def _generations(pipe) -> dict:
    """Latents and decoded frames of a text-to-video and an image-to-video."""
    results = {}
    for mode, args in (("text_to_video", ("a red square",)), ("image_to_video", (IMAGE, "it moves"))):
        result = getattr(pipe, mode)(*args, **GENERATION)
        results[mode] = {"latents": result.latents, "frames": torch.from_numpy(pipe.decode_latents(result.latents)),
                         "parallel": result.settings["parallel"]}
    return results


def _parallel_generations(rank, root, layouts, out):
    from model_core import PyramidFlowPipeline

    pipe = PyramidFlowPipeline.from_pretrained(root)
    results = {"single": _generations(pipe)}
    for layout in layouts:
        pipe.enable_parallelism(layout)
        results[f"{layout['guidance']}x{layout['context']}"] = _generations(pipe)
    if rank == 0:
        torch.save(results, out)


def _check_same_generations(out, layouts):
    results = torch.load(out, weights_only=True)
    for mode, single in results["single"].items():
        assert single["parallel"] == {"world_size": 1, "guidance": 1, "context": 1}
        assert single["latents"].shape == (1, 4, 2, 8, 8)
        for layout in layouts:
            name = f"{layout['guidance']}x{layout['context']}"
            parallel = results[name][mode]
            assert parallel["parallel"] == {"world_size": layout["guidance"] * layout["context"], **layout}
            assert (parallel["latents"] - single["latents"]).abs().max() <= 1e-4, (name, mode)
            assert (parallel["frames"].int() - single["frames"].int()).abs().max() <= 1, (name, mode)


def test_guidance_and_context_parallel_generate_the_same_video_on_two_ranks(tmp_path):
    root = build_tiny_checkpoint(tmp_path / "ckpt")
    layouts = [{"guidance": 2, "context": 1}, {"guidance": 1, "context": 2}]
    run_ranks(_parallel_generations, 2, tmp_path, root, layouts, tmp_path / "out.pt", timeout=600)
    _check_same_generations(tmp_path / "out.pt", layouts)


def _compiled_context_parallel(rank, root, out):
    from model_core import PyramidFlowPipeline

    single = PyramidFlowPipeline.from_pretrained(root).text_to_video("a red square", **GENERATION)
    pipe = PyramidFlowPipeline.from_pretrained(root, compile=True)
    pipe.enable_parallelism({"guidance": 1, "context": 2})
    compiled = pipe.text_to_video("a red square", **GENERATION)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    if rank == 0:
        torch.save({"single": single.latents, "compiled": compiled.latents, "settings": compiled.settings,
                    "graphs": graphs}, out)


@pytest.mark.slow  # compiles each input shape on both ranks: about 2 min on the 2-core machine
def test_the_compiled_forward_under_context_parallel_equals_one_eager_process(tmp_path):
    root = build_tiny_checkpoint(tmp_path / "ckpt")
    run_ranks(_compiled_context_parallel, 2, tmp_path, root, tmp_path / "out.pt", timeout=900)
    results = torch.load(tmp_path / "out.pt", weights_only=True)
    assert results["settings"]["parallel"] == {"world_size": 2, "guidance": 1, "context": 2}
    assert results["settings"]["compile"] is True and results["graphs"] >= 1  # the forward really ran compiled
    # context parallel's rounding (1e-4 above) and the compiled pipeline's (5e-5, test_compile_levels) add up:
    # 0.93e-4 and 1.19e-4 measured
    assert (results["compiled"] - results["single"]).abs().max() <= 2e-4


@pytest.mark.slow  # four processes: about 3 min on a busy 2-core machine
def test_guidance_times_context_parallel_on_four_ranks(tmp_path):
    root = build_tiny_checkpoint(tmp_path / "ckpt")
    layouts = [{"guidance": 2, "context": 2}]
    run_ranks(_parallel_generations, 4, tmp_path, root, layouts, tmp_path / "out.pt", timeout=600)
    _check_same_generations(tmp_path / "out.pt", layouts)


def _one_rank_fails(rank, root):
    from model_core import PyramidFlowPipeline

    def fail_on_rank_one(pipe, step_index, timestep, callback_kwargs):
        if rank == 1 and step_index == 1:
            raise RuntimeError("rank 1 ran out of luck")
        return {}

    pipe = PyramidFlowPipeline.from_pretrained(root, parallel={"guidance": 1, "context": 2})
    pipe.text_to_video("a red square", **GENERATION, callback_on_step_end=fail_on_rank_one)


def test_a_failing_rank_ends_every_rank_with_its_error(tmp_path):
    root = build_tiny_checkpoint(tmp_path / "ckpt")
    # whichever rank the harness hears from first: rank 1's own error, or rank 0 losing its peer mid-collective
    with pytest.raises(mp.ProcessRaisedException, match="rank 1 ran out of luck|Connection closed by peer"):
        run_ranks(_one_rank_fails, 2, tmp_path, root, timeout=600)


def _studio_ranks(rank, root, out):
    from pyramid_app.studio.sessions import PipelineCache
    from pyramid_app.options.settings import ModelOptions
    from pyramid_app.studio.every_rank import MirroredPipelineCache, RankChannel, follow

    channel = RankChannel()
    layout = {"guidance": 2, "context": 1}
    if rank != 0:
        follow(channel, PipelineCache(parallel=layout))
        return
    pipe = MirroredPipelineCache(channel, parallel=layout).get(ModelOptions(model=str(root)))
    try:
        pipe.text_to_video("a red square", num_frames=4)
    except ValueError as error:
        refused = str(error)
    def stop_after_first_unit(pipe, step_index, timestep, callback_kwargs):  # Stop pressed on rank 0 only
        pipe._interrupt = pipe.progress.kind == "unit"
        return {}

    stopped = pipe.text_to_video("a red square", **GENERATION, callback_on_step_end=stop_after_first_unit)
    channel.send(("quit",))
    torch.save({"refused": refused, "interrupted": stopped.interrupted, "units": stopped.latents.shape[2],
                "parallel": stopped.settings["parallel"]}, out)


def test_studio_ranks_follow_rank_zero_through_errors_and_stop(tmp_path):
    root = build_tiny_checkpoint(tmp_path / "ckpt")
    run_ranks(_studio_ranks, 2, tmp_path, root, tmp_path / "out.pt", timeout=600)
    result = torch.load(tmp_path / "out.pt", weights_only=True)
    assert "num_frames must be 1 + 8k" in result["refused"]
    assert (result["interrupted"], result["units"]) == (True, 1)
    assert result["parallel"] == {"world_size": 2, "guidance": 2, "context": 1}
