"""Shape buckets (issue 32): the coarsest history clip padded to a few lengths per stage, the padding masked out of
attention, positions and the step cache's statistics, gives the unpadded video within 1e-5 in float32, with a few
input shapes per video; the whole forward compiled over a bucketed generation has no graph break and compiles once
per input shape."""
import functools

import pytest
import torch
import torch.utils._python_dispatch
import torch.utils._pytree
from torch._dynamo.utils import counters

from model_core import sampling, temporal
from model_core.scheduler import PyramidFlowScheduler
from model_core.speed import compile_forward
from model_core.step_cache import apply_step_cache, reset_step_cache, step_cache_state
from model_core.temporal import bucket_length, coarsest_history_frames, history_buckets
from model_core.transformers.packing import ClipGrid, PaddedColumn
from tests.test_transformer_behaviour import LATENT_CHANNELS, text_inputs, tiny_model

GUIDANCE = 3.0


def test_buckets_spread_evenly_up_to_the_longest_coarse_clip():
    assert [history_buckets(16, stage) for stage in range(3)] == [(5, 10, 15), (5, 10, 14), (5, 9, 13)]
    assert history_buckets(3, 2) == () and history_buckets(3, 0) == (1, 2)
    assert history_buckets(100, 0) == (10, 20, 30)  # the window caps the history
    assert [bucket_length(n, (5, 10, 15)) for n in (0, 1, 5, 6, 15, 16)] == [0, 5, 5, 10, 15, 16]


def test_the_coarse_clip_is_all_but_the_stage_most_recent_frames():
    assert [coarsest_history_frames(7, stage) for stage in range(3)] == [7, 6, 5]
    assert [coarsest_history_frames(1, stage) for stage in range(3)] == [1, 0, 0]
    assert coarsest_history_frames(0, 0) == 0


def guided_velocities(model, shapes: list):
    """velocity_for_unit of sample_video: guidance over a [negative ; text] batch (the negative's text padded), the
    step cache reset at every stage, each forward's input shapes recorded in `shapes`."""
    inputs = text_inputs(model, 2)
    del inputs["timestep"]

    def for_unit(unit):
        stage_shape = None

        def velocity(clips, t, valid_frames=None):
            nonlocal stage_shape
            if clips[-1].shape != stage_shape:
                reset_step_cache(model)
                stage_shape = clips[-1].shape
            shapes.append(tuple(clip.shape for clip in clips))
            out = model([[torch.cat([c, c]) for c in clips]], **inputs, timestep=t.expand(2),
                        valid_frames=valid_frames).sample[0]
            unconditional, conditional = out.chunk(2)
            return unconditional + GUIDANCE * (conditional - unconditional)

        return velocity

    return for_unit


def generate(model, units: int, shape_buckets: bool, steps=(2, 2, 2)) -> tuple:
    """(latents, input shapes of every forward) of a text-to-video generation of `units` units."""
    shapes = []
    with torch.no_grad():
        latents, _ = sampling.sample_video(guided_velocities(model, shapes), PyramidFlowScheduler(),
                                           (1, LATENT_CHANNELS, units, 16, 24), first_frame_steps=steps,
                                           video_steps=steps, generator=torch.Generator().manual_seed(0),
                                           shape_buckets=shape_buckets)
    return latents, shapes


@pytest.fixture
def one_bucket(monkeypatch):
    """One bucket per stage: every coarse clip padded to the longest (the most padding a short video can have)."""
    monkeypatch.setattr(sampling, "history_buckets", functools.partial(history_buckets, per_stage=1))


@pytest.mark.parametrize("cache", [None, ("first-block", 0.6), ("mag", 0.5)])
@pytest.mark.parametrize("kind", ["flux", "mmdit"])
def test_a_bucketed_generation_equals_the_unpadded_one(kind, cache, one_bucket):
    model = tiny_model(kind)
    if cache:
        apply_step_cache(model, *cache)
    plain, plain_shapes = generate(model, 5, shape_buckets=False, steps=(3, 3, 3))
    plain_decisions = list(step_cache_state(model).decisions) if cache else None
    if cache:
        apply_step_cache(model, *cache)  # a fresh state
    padded, padded_shapes = generate(model, 5, shape_buckets=True, steps=(3, 3, 3))
    assert len(set(padded_shapes)) < len(set(plain_shapes))  # the padding happened: fewer shapes
    torch.testing.assert_close(padded, plain, atol=1e-5, rtol=0)
    if cache:
        decisions = step_cache_state(model).decisions
        assert decisions == plain_decisions and 0 < sum(decisions) < len(decisions)  # the same steps skipped


def test_a_16_unit_384p_video_has_at_most_16_input_shapes():
    shapes = set()
    for unit in range(16):
        for stage in range(3):
            frames = coarsest_history_frames(unit, stage)
            padded = bucket_length(frames, history_buckets(16, stage))
            shapes.add((stage, padded, len(temporal.history_layout(unit, stage))))
    assert len(shapes) == 15


def explain_forward(model, units: int) -> tuple:
    """dynamo's explanation of the last forward of a bucketed generation whose history was padded."""
    captured = {}

    def capture(module, args, kwargs):
        if kwargs["valid_frames"] is not None and not kwargs["valid_frames"].all():
            captured.update(kwargs, sample=args[0])

    hook = model.register_forward_pre_hook(capture, with_kwargs=True)
    generate(model, units, shape_buckets=True, steps=(1, 1, 1))
    hook.remove()
    torch._dynamo.reset()
    with torch.no_grad():
        return torch._dynamo.explain(model)(**captured)


@pytest.mark.parametrize("kind", ["flux", "mmdit"])
def test_the_padded_forward_has_no_graph_break(kind, one_bucket):
    explained = explain_forward(tiny_model(kind), 5)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


@pytest.mark.slow  # dynamo traces the whole forward once per input shape (half a minute on 2 busy cores)
def test_the_compiled_forward_compiles_once_per_input_shape(one_bucket):
    """Over a 3-unit bucketed generation the whole forward (dynamo's eager backend: tracing only) compiles once per
    distinct input shape, and its velocities equal the eager ones."""
    eager, _ = generate(tiny_model("flux"), 3, shape_buckets=True, steps=(2, 1, 1))
    model = tiny_model("flux")
    torch._dynamo.reset()
    counters.clear()
    compile_forward(model, backend="eager")
    compiled, shapes = generate(model, 3, shape_buckets=True, steps=(2, 1, 1))
    torch._dynamo.reset()
    assert counters["stats"]["unique_graphs"] == len(set(shapes)) < len(shapes)
    assert not counters["graph_break"]
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=0)


@pytest.mark.slow  # dynamo traces the forward in pieces around the cache's gate (half a minute on 2 busy cores)
def test_a_compiled_forward_with_a_step_cache_skips_the_same_steps(one_bucket):
    """With a step cache the compiled forward breaks its graph at the gate (fullgraph off) and skips what eager skips."""
    eager_model, compiled_model = tiny_model("flux"), tiny_model("flux")
    for model in (eager_model, compiled_model):
        apply_step_cache(model, "first-block", 0.6)
    eager, _ = generate(eager_model, 3, shape_buckets=True, steps=(3, 2, 2))
    torch._dynamo.reset()
    compile_forward(compiled_model, backend="eager")
    compiled, _ = generate(compiled_model, 3, shape_buckets=True, steps=(3, 2, 2))
    torch._dynamo.reset()
    decisions = step_cache_state(compiled_model).decisions
    assert decisions == step_cache_state(eager_model).decisions and any(decisions)
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=0)


def test_valid_frames_must_fit_the_column():
    model = tiny_model("flux")
    clips = [torch.zeros(2, LATENT_CHANNELS, 2, 4, 6), torch.zeros(2, LATENT_CHANNELS, 1, 16, 24)]
    with pytest.raises(ValueError, match="valid_frames must be a bool tensor of the column's 3 frames"):
        model([clips], **text_inputs(model, 2), valid_frames=torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="one entry per column"):
        model([clips, clips], **text_inputs(model, 4), valid_frames=torch.ones(3, dtype=torch.bool))


class MadeOn(torch.utils._python_dispatch.TorchDispatchMode):
    """The devices of every tensor the ops under it make."""

    def __init__(self):
        super().__init__()
        self.devices = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.devices |= {t.device.type for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)}
        return out


@pytest.mark.parametrize("kind", ["flux", "mmdit"])
@pytest.mark.parametrize("padded", [False, True])
def test_rope_tables_are_made_on_the_models_device(kind, padded):
    """Compiled, the tables are made inside the graph: made on the model's device (meta here), a CUDA graph holds
    no CPU tensor and no copy to the device."""
    model = tiny_model(kind)
    device = torch.device("meta")
    grids = [ClipGrid(3, 2, 3), ClipGrid(1, 4, 6)]
    if padded:
        grids = PaddedColumn(grids, torch.tensor([True, True, False, True], device=device))
    with MadeOn() as made:
        tables = model.rope_tables(4, grids, device)
    assert made.devices == {"meta"}
    assert tables[0].shape == (4 + 3 * 2 * 3 + 4 * 6, model.config.attention_head_dim // 2)
