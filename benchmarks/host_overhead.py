"""What a sampling step asks of the host (issue 32): aten ops, host syncs, input shapes per clip, graph breaks.

    python -m benchmarks.host_overhead --json OUT [--baseline DIR]

A GPU runs the published 384p step host-bound (~6 us of host time per dispatched op, and every host sync drains
its queue), so these CPU counts are what decides its speed once the arithmetic is cheap. Measured on the CPU with
the attention calls a CUDA device plans for the published width (benchmarks.attention_calls.use_cuda_plan):

- `ops_per_step`, `syncs_per_step`: aten ops dispatched and host syncs (benchmarks.counters) in one guided step
  (the transformer on the [negative ; text] batch of 2, the guidance sum and the scheduler's Euler step) of the
  last unit of a 5-s 384p clip (unit 15, stage 2: 15 history frames, latent grid 48x80) at the published miniFLUX
  depth (8 dual- + 16 single-stream blocks) and reduced width (4 heads of 32: the counts do not depend on the
  width). The stage's second step is counted; its first, where what depends on shapes only is made, is given as
  `first_step` (the native backend here; tests/test_host_syncs.py checks every backend the CPU runs);
- `shapes_per_clip`: distinct transformer inputs (shapes of every clip and of the text) over a whole 16-unit
  384p clip (steps [1, 1, 1]; a tiny-width model, recorded by a forward pre-hook: the shapes do not depend on it),
  the history padded to shape buckets as `compile=True` pads it (model_core.sampling, where the checkout has them);
  `shapes_per_clip_unpadded` without the buckets;
- `graph_breaks`: torch._dynamo.explain of the transformer's forward on the counted step's inputs (published depth);
- `recompiles_per_clip`: graphs dynamo hands its backend after the first forward over the 16-unit clip, the whole
  forward compiled as `compile=True` compiles it (model_core.speed.compile_forward where the checkout has it, else
  torch.compile of the forward) with a backend that counts the graphs and runs them eagerly (tracing only, no
  code generated), tiny width, buckets on (with no graph break, one graph per compile);
- `bucket_token_overhead`, `bucket_attention_overhead`: what the buckets' padding costs over the published 5-s 384p
  clip at the published steps ([20, 20, 20] for the first unit, [10, 10, 10] after), in tokens through the
  transformer (text included) and in query-key pairs of its attention (L² per forward), relative to no padding.

Each checkout runs in its own process with its own model_core (`--baseline DIR`: a `git worktree` of an earlier
release), this file's measuring code in both.
"""
import argparse
import sys
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
HEIGHT, WIDTH, UNITS = 384, 640, 16
LATENT_GRID = (HEIGHT // 8, WIDTH // 8)
LAST_UNIT, STAGE, VIDEO_STEPS = UNITS - 1, 2, 10
TEXT_TOKENS, NEGATIVE_TOKENS, GUIDANCE = 24, 40, 5.0  # valid tokens of the prompt and the negative prompt
REDUCED_WIDTH = dict(attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32,
                     axes_dims_rope=[8, 12, 12])
FIGURES = ("ops_per_step", "syncs_per_step", "shapes_per_clip", "graph_breaks", "recompiles_per_clip",
           "shapes_per_clip_unpadded", "bucket_token_overhead", "bucket_attention_overhead")


def reduced_width_transformer(tiny: bool = False):
    """The published miniFLUX config (the official layout's) at reduced width, or the tiny one, random weights."""
    from benchmarks.random_models import TINY_TRANSFORMER, build_transformer, model_configs

    config = {**model_configs(tiny=False)[0], **(TINY_TRANSFORMER if tiny else REDUCED_WIDTH)}
    return as_pipelines_load_it(build_transformer(config, "cpu", torch.float32)), config


def as_pipelines_load_it(transformer):
    """The transformer with the q/k/v projections (and, since dfa7e74, the adaLN modulations) fused, as pipelines
    load it (model_core.speed.fuse_projections), where the checkout measured has them (earlier releases do not)."""
    try:
        from model_core.speed import fuse_projections
    except ImportError:
        return transformer
    fuse_projections(transformer)
    return transformer


def guided_velocity_of(transformer, config):
    from benchmarks.random_models import guided_velocity, random_prompt

    text = random_prompt(config, TEXT_TOKENS, seed=1, device="cpu")
    negative = random_prompt(config, NEGATIVE_TOKENS, seed=2, device="cpu")
    return guided_velocity(transformer, text, negative, GUIDANCE)


def late_unit_state(channels: int) -> tuple:
    """(clean latent pyramid of LAST_UNIT history frames, coarsest first; the unit's latent at stage STAGE), batch 1."""
    from model_core.pyramid import latent_pyramid

    generator, (height, width) = torch.Generator().manual_seed(0), LATENT_GRID
    frames = torch.randn(1, channels, LAST_UNIT, height, width, generator=generator)
    return latent_pyramid(frames, 3), torch.randn(1, channels, 1, height, width, generator=generator)


def late_unit_clips(channels: int) -> list:
    """What the transformer gets at unit LAST_UNIT, stage STAGE: the history clips, then the unit's latent."""
    from model_core.temporal import history_clips

    pyramid, latent = late_unit_state(channels)
    return history_clips(pyramid, LAST_UNIT, STAGE) + [latent]


def step_counts() -> dict:
    """Ops and syncs of the stage's first and second guided step as the sampler runs them (the first counted from
    the sampler's entry into the stage: its set-up included)."""
    from benchmarks.counters import StepCounters
    from model_core.sampling import sample_unit
    from model_core.scheduler import PyramidFlowScheduler

    transformer, config = reduced_width_transformer()
    velocity = guided_velocity_of(transformer, config)
    pyramid, start = late_unit_state(transformer.latent_channels)
    scheduler = PyramidFlowScheduler()
    with torch.no_grad(), StepCounters() as steps:
        sample_unit(velocity, scheduler, start, pyramid, LAST_UNIT, (1, 1, 2), first_stage=STAGE,
                    on_step=lambda stage, index, t, x: steps.advance() or x)
    return {name: {"ops": c.op_count, "syncs": len(c.syncs),
                   "sync_calls": dict(Counter(f"{kind}: {op}" for kind, op in c.syncs)),
                   "top_ops": dict(c.ops.most_common(12))} for name, c in zip(("first_step", "step"), steps.counted)}


def step_inputs(transformer, config) -> dict:
    """The keyword arguments the guided velocity gives the transformer at the counted step."""
    captured = {}

    def capture(module, args, kwargs):
        captured.update(kwargs)

    hook = transformer.register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        guided_velocity_of(transformer, config)(late_unit_clips(transformer.latent_channels), torch.tensor(500.0))
    hook.remove()
    return captured


def graph_breaks() -> dict:
    transformer, config = reduced_width_transformer()
    inputs = step_inputs(transformer, config)
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(transformer)(**inputs)
    reasons = Counter(str(getattr(b, "reason", b)).splitlines()[0][:120] for b in explained.break_reasons)
    return {"graph_breaks": explained.graph_break_count, "graphs": explained.graph_count,
            "break_reasons": dict(reasons.most_common(5))}


def has_shape_buckets() -> bool:
    """Whether this process's model_core pads the history to shape buckets (earlier releases do not)."""
    import inspect

    from model_core.sampling import sample_video

    return "shape_buckets" in inspect.signature(sample_video).parameters


def compile_whole_forward(transformer, backend) -> None:
    """The whole forward compiled as `compile=True` compiles it; earlier releases: torch.compile of it."""
    try:
        from model_core.speed import compile_forward
    except ImportError:
        transformer.forward = torch.compile(transformer.forward, backend=backend)
        return
    compile_forward(transformer, backend=backend)


def clip_shapes(shape_buckets: bool, compiled: bool = False) -> dict:
    """Distinct transformer inputs of the 16-unit clip and, `compiled`, dynamo's compiles of the whole forward over it."""
    from benchmarks.random_models import TINY_VAE, Clip, build_vae, model_configs, random_prompt, text_to_video

    transformer, config = reduced_width_transformer(tiny=True)
    vae = build_vae({**model_configs(tiny=False)[1], **TINY_VAE}, "cpu", torch.float32)
    shapes = []

    def record(module, args, kwargs):
        shapes.append((tuple(tuple(clip.shape) for clip in kwargs["sample"][0]), tuple(kwargs["encoder_hidden_states"].shape)))

    transformer.register_forward_pre_hook(record, with_kwargs=True)
    text, negative = (random_prompt(config, tokens, seed, "cpu") for tokens, seed in ((TEXT_TOKENS, 1), (NEGATIVE_TOKENS, 2)))
    clip = Clip(HEIGHT, WIDTH, UNITS, (1, 1, 1), (1, 1, 1))
    graphs, graphs_after_first = [], []

    def count_graphs(graph, example_inputs):  # a backend: counts the graphs, runs them as traced
        graphs.append(graph)
        return graph.forward

    if compiled:
        torch._dynamo.reset()
        compile_whole_forward(transformer, count_graphs)  # the hooks stay outside, in Python
        torch._dynamo.config.recompile_limit = torch._dynamo.config.accumulated_recompile_limit = 10_000  # count all
        transformer.register_forward_hook(lambda *_: graphs_after_first.append(len(graphs)))
    text_to_video(transformer, vae, clip, text, negative, "cpu", decode=False,
                  **({"shape_buckets": True} if shape_buckets else {}))
    figures = {"shapes": len(set(shapes)), "forwards": len(shapes)}
    if compiled:
        figures["recompiles"] = len(graphs) - graphs_after_first[0]
    return figures


def clip_shapes_and_recompiles() -> dict:
    """Shapes of the 16-unit clip with and without buckets (where the checkout has them) and the whole forward's
    compiles over it."""
    buckets = has_shape_buckets()
    compiled = clip_shapes(buckets, compiled=True)
    figures = {"shapes_per_clip": compiled["shapes"], "forwards_per_clip": compiled["forwards"],
               "recompiles_per_clip": compiled["recompiles"], "shape_buckets": buckets}
    if buckets:
        figures["shapes_per_clip_unpadded"] = clip_shapes(False)["shapes"]
        figures.update(bucket_overhead())
    return figures


def bucket_overhead(first_frame_steps=(20, 20, 20), video_steps=(10, 10, 10)) -> dict:
    """Relative tokens and attention query-key pairs the buckets add over the published 16-unit 384p clip."""
    from model_core.temporal import (bucket_length, coarsest_history_frames, history_buckets, history_layout,
                                     tokens_per_frame)

    latent_h, latent_w = LATENT_GRID
    totals = {"tokens": [0, 0], "pairs": [0, 0]}  # [unpadded, padded]
    for unit in range(UNITS):
        steps = first_frame_steps if unit == 0 else video_steps
        for stage in range(3):
            layout = history_layout(unit, stage)
            real = NEGATIVE_TOKENS + tokens_per_frame(latent_h, latent_w, stage) + sum(
                clip.length * tokens_per_frame(latent_h, latent_w, clip.level) for clip in layout)
            frames = coarsest_history_frames(unit, stage)
            padding = (bucket_length(frames, history_buckets(UNITS, stage)) - frames) * tokens_per_frame(latent_h, latent_w, 0)
            for index, length in enumerate((real, real + padding)):
                totals["tokens"][index] += steps[stage] * length
                totals["pairs"][index] += steps[stage] * length**2
    return {"bucket_token_overhead": round(totals["tokens"][1] / totals["tokens"][0] - 1, 4),
            "bucket_attention_overhead": round(totals["pairs"][1] / totals["pairs"][0] - 1, 4)}


def measure() -> dict:
    """Every figure of this process's model_core."""
    from benchmarks.attention_calls import use_cuda_plan

    use_cuda_plan()
    steps = step_counts()
    return {"ops_per_step": steps["step"]["ops"], "syncs_per_step": steps["step"]["syncs"],
            **clip_shapes_and_recompiles(), **graph_breaks(), **steps}


def run_checkout(checkout: Path) -> dict:
    """`measure()` in a child process whose model_core is `checkout`'s (this file's benchmarks modules beside)."""
    from benchmarks.report import child_figures  # not at the top: children load this file over other checkouts

    code = "; ".join([
        f"import sys, json; sys.path[:0] = [{str(checkout)!r}]",
        f"import benchmarks; benchmarks.__path__.append({str(ROOT / 'benchmarks')!r})",
        "import importlib.util",
        f"spec = importlib.util.spec_from_file_location('host_overhead', {__file__!r})",
        "h = importlib.util.module_from_spec(spec); spec.loader.exec_module(h)",
        "print(json.dumps(h.measure()))",
    ])
    return child_figures([sys.executable, "-c", code], cwd=checkout)


def side_by_side(figures: dict) -> str:
    names = list(figures)
    lines = [f"{'':22}" + "".join(f"{name:>16}" for name in names)]
    for figure in FIGURES:
        lines.append(f"{figure:22}" + "".join(f"{str(figures[name].get(figure, '-')):>16}" for name in names))
    return "\n".join(lines)


def main(argv=None):
    from benchmarks.report import report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", dest="out", help="write the figures as JSON here")
    parser.add_argument("--baseline", type=Path, help="a checkout (e.g. the previous release) to measure side by side")
    args = parser.parse_args(argv)
    figures = {"this checkout": run_checkout(ROOT)}
    if args.baseline:
        figures["baseline"] = {"checkout": str(args.baseline), **run_checkout(args.baseline.resolve())}
    report(figures, args.out)
    print(side_by_side(figures))
    return figures


if __name__ == "__main__":
    main()
