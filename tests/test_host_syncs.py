"""No host sync inside a sampling step (issue 32): after a stage's first step (which makes the stage's timesteps
and attention plan), a step reads nothing back from the device and copies nothing to it, on every attention
backend the CPU runs, with one call per causal group and with the calls a CUDA device plans. Counted with
benchmarks.counters, the counter benchmarks.host_overhead uses."""
import numpy as np
import pytest
import torch

from benchmarks.counters import StepCounter, StepCounters
from benchmarks.random_models import guided_velocity, random_prompt
from model_core.sampling import sample_video
from model_core.scheduler import PyramidFlowScheduler
from model_core.transformers import attention_plan
from model_core.transformers.attention_backends import usable_attention_backends
from tests.test_transformer_behaviour import TINY, tiny_model

SET_UP = {"tensor from host data"}  # what a stage's first step may do: its timesteps and masks reach the device


def syncs_of(call) -> list:
    with StepCounter() as counted:
        call()
    return counted.syncs


values = torch.arange(4.0)


@pytest.mark.parametrize("call", [
    lambda: values[1].item(), lambda: bool(values[1]), lambda: float(values[1]), lambda: int(values[1]),
    lambda: values.tolist(), lambda: values.nonzero(), lambda: values[values > 1], lambda: torch.tensor([1.0, 2.0]),
    lambda: torch.tensor(0.5), lambda: torch.as_tensor([1, 2]), lambda: torch.from_numpy(np.ones(2)),
], ids=["item", "bool", "float", "int", "tolist", "nonzero", "bool-index", "tensor-list", "tensor-float",
        "as_tensor", "from_numpy"])
def test_the_counter_sees_each_kind_of_sync(call):
    assert len(syncs_of(call)) == 1


@pytest.mark.parametrize("call", [lambda: values * 2.0, lambda: torch.full((2,), 3.0), lambda: torch.as_tensor(values),
                                  lambda: values[1:3]], ids=["scalar-arithmetic", "full", "as_tensor-of-a-tensor", "slice"])
def test_the_counter_passes_device_work(call):
    assert syncs_of(call) == []


@pytest.mark.parametrize("plan", ["per group", "CUDA plan"])
@pytest.mark.parametrize("backend", usable_attention_backends("cpu", torch.float32))
@pytest.mark.parametrize("kind", sorted(TINY))
def test_sampling_steps_make_no_host_sync(kind, backend, plan, monkeypatch):
    """Three guided units (two with history at every stage), two steps a stage: no step but a stage's first makes a
    sync; a stage's first after the unit's first only sends its timesteps and masks to the device (a unit's first
    step also sizes its text, once per unit)."""
    overhead = attention_plan.ACCELERATOR_CALL_OVERHEAD_MACS if plan == "CUDA plan" else 0.0
    monkeypatch.setitem(attention_plan.CALL_OVERHEAD_MACS, "cpu", overhead)
    model = tiny_model(kind)
    if backend != "native":
        model.set_attention_backend(backend)
    text, negative = (random_prompt(model.config, valid, seed, "cpu", text_tokens=6) for valid, seed in ((3, 1), (5, 2)))
    scheduler, where = PyramidFlowScheduler(), []
    with torch.no_grad(), StepCounters() as steps:
        sample_video(lambda unit: guided_velocity(model, text, negative, 5.0), scheduler, (1, model.latent_channels, 3, 16, 24),
                     first_frame_steps=(2, 2, 2), video_steps=(2, 2, 2), generator=torch.Generator().manual_seed(0),
                     on_step=lambda progress, t, x: where.append((progress.stage, progress.step)) or steps.advance() or x)
    assert_steps_make_no_sync(steps.counted, where)


def assert_steps_make_no_sync(counted: list, where: list):
    """`counted`: a StepCounter per step, `where`: (stage, step) of each, three units of two steps a stage."""
    assert len(where) == 18 and all(c.op_count > 0 for c in counted[:18])
    assert [c.syncs for c, (_, step) in zip(counted, where) if step > 0] == [[]] * 9
    later_stages = [c for c, (stage, step) in zip(counted, where) if stage > 0 and step == 0]
    assert {kind for c in later_stages for kind, _ in c.syncs} == SET_UP


def test_a_pipeline_generation_makes_no_host_sync_after_each_stage_first_step(pipe):
    """The pipeline's own path (text embeddings, guidance, the timestep cast) on the tiny checkpoint."""
    where = []

    def advance(pipeline, index, t, tensors):
        where.append((pipeline.progress.stage, pipeline.progress.step))
        steps.advance()
        return {}

    with torch.no_grad(), StepCounters() as steps:
        pipe.text_to_video("a circle", num_frames=17, height=64, width=64, first_frame_steps=[2, 2, 2],
                           video_steps=[2, 2, 2], seed=0, output_type="latent", callback_on_step_end=advance)
    assert_steps_make_no_sync(steps.counted, where)
