"""The transformer gets the same prompt tensors at every step of a generation (issue 32), so it builds its text
conditioning (transformers/text_conditioning.py) once per prompt, in bfloat16 too, where the prompt embeddings are
converted to the compute dtype."""
import pytest
import torch

from model_core import PyramidFlowPipeline

STEPS = dict(first_frame_steps=(2, 1, 1), video_steps=(1, 2, 1))


def context_embedder_calls(pipe, monkeypatch, **generation) -> int:
    """Counted in nn.Linear.forward: a hook on the layer would make the transformer build it at every step."""
    calls, forward = [], torch.nn.Linear.forward

    def counted(layer, x):
        calls.extend([1] if layer is pipe.transformer.context_embedder else [])
        return forward(layer, x)

    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.Linear, "forward", counted)
        pipe.text_to_video("a red circle moving left", num_frames=17, seed=0, output_type="latent", **STEPS, **generation)
    return len(calls)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_generation_builds_its_text_conditioning_once_per_prompt(checkpoint, dtype, monkeypatch):
    pipe = PyramidFlowPipeline.from_pretrained(checkpoint, torch_dtype=dtype)
    assert pipe.compute_dtype == getattr(torch, dtype)
    # 3 units of 4 steps, each guided with the one [negative ; prompt] batch: one build, not one per step or unit
    assert context_embedder_calls(pipe, monkeypatch) == 1
    assert context_embedder_calls(pipe, monkeypatch, guidance_scale=0.0, video_guidance_scale=0.0) == 1  # the prompt alone
