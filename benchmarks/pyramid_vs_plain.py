"""Spatial pyramid vs plain flow matching on the shapes world, at equal training compute.

    python -m benchmarks.pyramid_vs_plain [--work outputs/tiny_shapes/from-vae-checkpoint-4500] [--tokens 3e5]
        [--checkpoints 4] [--count 28]

Needs the base checkpoint and extracted features of a tiny-shapes run (`python -m training.launch
--config training/configs/tiny_shapes.yaml`, phases up to the latent normalisation). Trains the
transformer of `tiny_shapes_flow.yaml` twice from the same initialisation and data: pyramidal (3 stages)
and plain (1 stage: every step at full resolution, so the history also stays at full resolution).
Compute is counted as transformer tokens (the loop's `tokens_per_s x step_time_s`); each run stops at
`--tokens` and is evaluated (text-to-video, held-out pairs, `training.evaluate_shapes`) at `--checkpoints`
equally spaced token budgets. Writes figures as JSON and a plot to docs/pyramid_vs_plain.svg.
"""
import argparse
import csv
from pathlib import Path

from model_core.pipeline import PyramidFlowPipeline
from model_core.scheduler import PyramidFlowScheduler
from training.atomic import write_text
from training.config import CONFIG_DIR, load_config
from training.evaluate_shapes import TEXT_TO_VIDEO_FIGURES, score, text_to_video_frames, write_json
from training.loop import train
from training.shapes_world import HELDOUT_STREAM, world_pairs

RUNS = {"pyramidal": 3, "plain": 1}
SAMPLING_STEPS = 30  # per video unit, split evenly over the stages
COLORS = {"pyramidal": "#d62728", "plain": "#1f77b4"}
PANEL_WIDTH, PANEL_HEIGHT = 400, 300


def tokens_per_step(run_dir: Path) -> float:
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return sum(float(r["tokens_per_s"]) * float(r["step_time_s"]) for r in rows) / len(rows)


def flow_recipe(work: Path, stages: int, output: Path, steps: int, every: int) -> dict:
    recipe = load_config(CONFIG_DIR / "tiny_shapes_flow.yaml")
    recipe["model"].update(pretrained=str(work / "base"), variant="auto")
    recipe["data"].update(annotations=[str(work / "text" / "annotations.jsonl")],
                          empty_text_fea=str(work / "text" / "empty_text.safetensors"))
    recipe["objective"]["stages"] = stages
    recipe["train"].update(output_dir=str(output), max_steps=steps, checkpoint_every=every, keep_checkpoints=0,
                           log_every=1)
    recipe["validation"]["every_steps"] = None
    return recipe


def evaluate_checkpoint(folder: Path, stages: int, pairs) -> dict:
    pipe = PyramidFlowPipeline.from_pretrained(folder, variant="64p_ema", device="cpu")
    pipe.scheduler = PyramidFlowScheduler(stages=stages)
    steps = (SAMPLING_STEPS // stages,) * stages
    options = {"first_frame_steps": steps, "video_steps": steps, "guidance_scale": 4.0, "video_guidance_scale": 3.0}
    return score(text_to_video_frames(pipe, options), pairs, TEXT_TO_VIDEO_FIGURES)


def run(name: str, args, pairs) -> list:
    stages, output = RUNS[name], Path(args.work) / "compare" / name
    probe = output.with_name(name + "-probe")
    train(flow_recipe(Path(args.work), stages, probe, 3, 3), probe)  # measures tokens per step
    steps = int(args.tokens / tokens_per_step(probe))
    every = max(1, steps // args.checkpoints)
    train(flow_recipe(Path(args.work), stages, output, every * args.checkpoints, every), output, "auto")
    per_step = tokens_per_step(output)
    return [{"run": name, "step": step, "tokens": step * per_step,
             **evaluate_checkpoint(output / f"checkpoint-{step}", stages, pairs)}
            for step in range(every, every * args.checkpoints + 1, every)]


def svg_panel(rows: list, figure: str, left: float) -> list:
    """One panel: accuracy (`figure`) against training tokens, one line per run, drawn from x = `left`."""
    width, height, pad = PANEL_WIDTH, PANEL_HEIGHT, 50
    top = max(r["tokens"] for r in rows)
    x = lambda t: left + pad + (width - 2 * pad) * t / top
    y = lambda a: height - pad - (height - 2 * pad) * a
    parts = [f'<line x1="{x(0)}" y1="{y(0)}" x2="{x(top)}" y2="{y(0)}" stroke="black"/>',
             f'<line x1="{x(0)}" y1="{y(0)}" x2="{x(0)}" y2="{y(1)}" stroke="black"/>',
             f'<text x="{left + width / 2}" y="{height - 10}" text-anchor="middle">training tokens (max {top:.3g})</text>',
             f'<text x="{left + width / 2}" y="{pad - 20}" text-anchor="middle">{figure}</text>',
             f'<text x="{x(0) - 6}" y="{y(0) + 4}" text-anchor="end">0</text>',
             f'<text x="{x(0) - 6}" y="{y(1) + 4}" text-anchor="end">1</text>']
    for name, color in COLORS.items():
        points = " ".join(f"{x(r['tokens']):.1f},{y(r[figure]):.1f}" for r in rows if r["run"] == name)
        parts.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="2"/>')
        parts.append(f'<text x="{left + width - pad}" y="{pad + 15 * list(COLORS).index(name)}" fill="{color}" '
                     f'text-anchor="end">{name}</text>')
    return parts


def svg_plot(rows: list, figures: tuple) -> str:
    """The figures side by side, each against training tokens."""
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{PANEL_WIDTH * len(figures)}" height="{PANEL_HEIGHT}" '
            'font-family="sans-serif" font-size="12">')
    panels = [part for i, figure in enumerate(figures) for part in svg_panel(rows, figure, i * PANEL_WIDTH)]
    return "\n".join([head, *panels, "</svg>"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="outputs/tiny_shapes/from-vae-checkpoint-4500",
                        help="the tiny-shapes recipe's folder of base/ and text/ features")
    parser.add_argument("--tokens", type=float, default=3e5, help="transformer tokens each run trains on")
    parser.add_argument("--checkpoints", type=int, default=4)
    parser.add_argument("--count", type=int, default=28, help="held-out pairs per evaluation")
    parser.add_argument("--out", default="benchmarks/pyramid_vs_plain.json")
    args = parser.parse_args(argv)
    pairs = world_pairs(0, HELDOUT_STREAM, args.count)
    rows = [row for name in RUNS for row in run(name, args, pairs)]
    write_json(args.out, {"tokens": args.tokens, "pairs": args.count, "rows": rows})
    write_text("docs/pyramid_vs_plain.svg", svg_plot(rows, TEXT_TO_VIDEO_FIGURES))
    print("| run | step | tokens | colour | shape | direction |\n| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['run']} | {r['step']} | {r['tokens']:.3g} | {r['color_accuracy']:.2f} | {r['shape_accuracy']:.2f} | "
              f"{r['direction_accuracy']:.2f} |")


if __name__ == "__main__":
    main()
