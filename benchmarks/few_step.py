"""A few-step (distilled) model against its teacher on the shapes world (issue 33).

    python -m benchmarks.few_step --teacher assets/models/pyramid-flow-shapes --student DIR [--count 28]
        [--schedules 2-2-2,1-1-1] [--cache first-block] [--json OUT]

For each held-out (prompt, seed) pair every setting generates the same 17-frame text-to-video one after the other:
the teacher at its sampling defaults, the student at its own (its pyramid_flow.json "sampling" section), the student
with the step cache, then teacher and student at each of `--schedules` (steps per stage for the first frame and the
video; each model keeps its own guidance). Per setting: transformer passes per clip (rows of each transformer
forward, counted by a hook on it: a guided step is two), the median seconds of a clip and the median over pairs of
(teacher seconds / these seconds), the steps the cache skipped, and adherence with the cache sweep's judge
(training.evaluate_shapes: colour / shape / direction). `goals` checks issue 33's: passes <= 1/10 of the
teacher's, clip time <= 1/6 of it, each adherence figure at most 0.05 below the teacher's.
"""
import argparse
import json
import statistics
import time
from contextlib import contextmanager

import numpy as np

from model_core.pipeline import PyramidFlowPipeline
from model_core.step_cache import CACHE_MODES, step_cache_state
from training.atomic import write_text
from training.evaluate_shapes import TEXT_TO_VIDEO_FIGURES, score
from training.shapes_world import HELDOUT_STREAM, NUM_FRAMES, world_pairs

GOALS = {"passes_ratio": 1 / 10, "seconds_ratio": 1 / 6, "adherence_drop": 0.05}


def schedule(text: str) -> tuple:
    """'2-2-2' -> (2, 2, 2): steps per pyramid stage, the same for the first frame and the video."""
    try:
        steps = tuple(int(part) for part in text.split("-"))
    except ValueError:
        steps = ()
    if not steps or min(steps) < 1:
        raise argparse.ArgumentTypeError(f"a schedule is positive steps per stage joined by '-', e.g. 2-2-2; got {text!r}")
    return steps


def settings_to_compare(schedules, cache: str, defaults: dict) -> list:
    """(model, call options) per setting; the first is the teacher at its defaults, the reference of every ratio.
    `defaults` maps each model to its (first_frame_steps, video_steps): a schedule equal to them is not run twice."""
    settings = [("teacher", {}), ("student", {})]
    if cache != "none":
        settings.append(("student", {"cache": cache}))
    for steps in schedules:
        settings += [(model, {"first_frame_steps": steps, "video_steps": steps}) for model in ("teacher", "student")
                     if defaults[model] != (steps, steps)]
    return settings


@contextmanager
def counted_passes(transformer):
    """Yields a one-item list that counts the transformer's passes: the rows of each forward (guided steps are two)."""
    passes = [0]

    def count(module, args, kwargs):
        passes[0] += kwargs["sample"][0][-1].shape[0]

    handle = transformer.register_forward_pre_hook(count, with_kwargs=True)
    try:
        yield passes
    finally:
        handle.remove()


def run_setting(pipe, prompt: str, seed: int, options: dict) -> dict:
    """One clip: its frames, seconds, passes, share of steps the cache skipped and the settings record."""
    with counted_passes(pipe.transformer) as passes:
        started = time.perf_counter()
        result = pipe.text_to_video(prompt, seed=seed, num_frames=NUM_FRAMES, **options)
        seconds = time.perf_counter() - started
    state = step_cache_state(pipe.transformer)
    skipped = state.skipped_steps / max(state.skipped_steps + state.computed_steps, 1) if state is not None else 0.0
    return {"frames": result.frames[0], "seconds": seconds, "passes": passes[0], "skipped": skipped,
            "settings": result.settings}


def compare(pipes: dict, pairs, schedules=(), cache: str = "none") -> dict:
    """Every setting on every pair, interleaved per pair so each time ratio is taken minutes apart at most."""
    defaults = {model: (pipe.family.sampling.first_frame_steps, pipe.family.sampling.video_steps)
                for model, pipe in pipes.items()}
    settings = settings_to_compare(schedules, cache, defaults)
    clips = [[] for _ in settings]
    hits = [np.zeros(3) for _ in settings]
    for prompt, seed in pairs:
        for index, (model, options) in enumerate(settings):
            clip = run_setting(pipes[model], prompt, seed, options)
            hits[index] += list(score(lambda *_: clip["frames"], [(prompt, seed)], TEXT_TO_VIDEO_FIGURES).values())
            clips[index].append(clip)
    teacher_seconds = [clip["seconds"] for clip in clips[0]]
    rows = [row(model, options, runs, hit / len(pairs), teacher_seconds)
            for (model, options), runs, hit in zip(settings, clips, hits)]
    return {"pairs": len(pairs), "rows": rows, "goals": goals(rows[0], rows[1])}


def row(model: str, options: dict, runs: list, adherence: np.ndarray, teacher_seconds: list) -> dict:
    settings = runs[0]["settings"]
    seconds = [run["seconds"] for run in runs]
    return {
        "model": model, "cache": settings["cache"],
        **{name: settings[name] for name in ("first_frame_steps", "video_steps", "guidance_scale", "video_guidance_scale")},
        "passes_per_clip": statistics.mean(run["passes"] for run in runs),
        "median_seconds": statistics.median(seconds),
        "speedup_vs_teacher": statistics.median(t / s for t, s in zip(teacher_seconds, seconds)),
        "skipped_step_share": statistics.mean(run["skipped"] for run in runs),
        **dict(zip(TEXT_TO_VIDEO_FIGURES, adherence.tolist())),
    }


def goals(teacher: dict, student: dict) -> dict:
    """Issue 33's goals for the student at its defaults against the teacher at its defaults, each with its figure."""
    passes = student["passes_per_clip"] / teacher["passes_per_clip"]
    seconds = 1 / student["speedup_vs_teacher"]
    drops = {name: teacher[name] - student[name] for name in TEXT_TO_VIDEO_FIGURES}
    checks = {"passes_ratio": (passes, passes <= GOALS["passes_ratio"]),
              "seconds_ratio": (seconds, seconds <= GOALS["seconds_ratio"]),
              **{f"{name}_drop": (drop, drop <= GOALS["adherence_drop"] + 1e-9) for name, drop in drops.items()}}
    return {name: {"value": value, "met": met} for name, (value, met) in checks.items()} | {
        "all_met": all(met for _, met in checks.values())}


def table(figures: dict) -> str:
    """The rows as a markdown table."""
    lines = ["| model | steps (first frame / video) | guidance | cache | passes per clip | median s | speed-up | "
             "colour | shape | direction |", "|" + " --- |" * 10]
    for r in figures["rows"]:
        steps = f"{'-'.join(map(str, r['first_frame_steps']))} / {'-'.join(map(str, r['video_steps']))}"
        lines.append(f"| {r['model']} | {steps} | {r['guidance_scale']:g} / {r['video_guidance_scale']:g} | {r['cache']} | "
                     f"{r['passes_per_clip']:g} | {r['median_seconds']:.2f} | {r['speedup_vs_teacher']:.1f}x | "
                     f"{r['color_accuracy']:.2f} | {r['shape_accuracy']:.2f} | {r['direction_accuracy']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="assets/models/pyramid-flow-shapes")
    parser.add_argument("--student", required=True, help="the few-step checkpoint folder")
    parser.add_argument("--count", type=int, default=28, help="held-out pairs (the first N of the 84)")
    parser.add_argument("--schedules", default="2-2-2,1-1-1", help="more schedules for both models, comma-separated")
    parser.add_argument("--cache", choices=CACHE_MODES, default="first-block", help="the student's step cache row")
    parser.add_argument("--json", help="write the figures here as JSON")
    args = parser.parse_args(argv)
    schedules = [schedule(text) for text in args.schedules.split(",") if text]
    pipes = {"teacher": PyramidFlowPipeline.from_pretrained(args.teacher),
             "student": PyramidFlowPipeline.from_pretrained(args.student)}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    figures = {"teacher": args.teacher, "student": args.student,
               **compare(pipes, world_pairs(0, HELDOUT_STREAM, args.count), schedules, args.cache)}
    print(table(figures))
    print(json.dumps(figures["goals"], indent=2))
    if args.json:
        write_text(args.json, json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
