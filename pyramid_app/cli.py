"""`python -m pyramid_app generate`: a prompt (plus an image or a clip) in, an mp4 or png out.

Everything a person can get wrong is checked before the model loads; any error ends the run with
one line `error: ...` on stderr. Ctrl-C stops after the current step and still saves the finished units.
"""
import argparse
import itertools
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from model_core.media_files import read_image, read_video
from model_core.step_cache import canonical_cache_name
from model_core.storyboard import Storyboard
from model_core.transformers.attention_backends import canonical_backend_name

from . import ranks
from .job_queue import JobQueue, run_jobs
from .output_file import OutputFile, save
from .queue_runner import Stopped, generate_job, model_options, queued_jobs_from_request, seeded_job
from .settings import (
    ATTENTION_BACKENDS,
    CACHE_MODES,
    DEVICES,
    DTYPES,
    OFFLOAD_MODES,
    QUANTIZE_MODES,
    GenerationOptions,
    ModelOptions,
    model_source,
)

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
USER_ERRORS = (ValueError, FileNotFoundError, ConnectionError)
OUTPUT_SUFFIXES = (".mp4", ".png")
TEXT_MODES = ("text_to_video", "text_to_image")  # the modes where the prompt is the only input
OUT_OF_MEMORY_HINT = ("out of memory; try --offload model or --offload sequential, --quantize int8 or nf4, "
                      "--vae-tiling, or fewer frames / a smaller size")


class UsageError(ValueError):
    """A command line that cannot run as given."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


@dataclass(frozen=True)
class Job:
    prompt: object  # the text, or a Storyboard (--storyboard)
    out: Path


@dataclass(frozen=True)
class Request:
    """A fully checked command: what to load, which pipeline method, what to write where."""

    mode: str
    jobs: tuple
    condition: np.ndarray  # the --image or --extend frames, else None
    model: ModelOptions
    options: GenerationOptions
    source: Path = None  # the --image or --extend file
    parallel: object = "auto"  # under torchrun: how the ranks split each generation


def _program_name() -> str:
    """How the person started us: the `pyramid-flow` command, else `python -m pyramid_app`."""
    return "pyramid-flow" if Path(sys.argv[0]).stem == "pyramid-flow" else "python -m pyramid_app"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=_program_name(), description="Generate video with Pyramidal Flow Matching.")
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="text/image/clip to video or image")

    what = generate.add_argument_group("what to generate")
    what.add_argument("--prompt", metavar="TEXT", help="text prompt (optional with --image or --extend)")
    what.add_argument("--out", type=Path, metavar="FILE", help="output file, .mp4 or .png")
    what.add_argument("--prompts-file", type=Path, metavar="FILE", help="batch mode: one prompt per non-empty line")
    what.add_argument("--storyboard", type=Path, metavar="FILE",
                      help="a prompt per segment: each non-empty line is 'SECONDS | PROMPT'; the seconds set the length")
    what.add_argument("--out-dir", type=Path, metavar="DIR", help="batch mode: folder for 0000.mp4, 0001.mp4, ...")
    what.add_argument("--image", type=Path, metavar="IMG", help="animate this image (image-to-video)")
    what.add_argument("--extend", type=Path, metavar="VIDEO", help="continue this video (new frames only count)")
    what.add_argument("--negative-prompt", metavar="TEXT", help="what to steer away from")
    length = what.add_mutually_exclusive_group()
    length.add_argument("--num-frames", type=int, metavar="N", help="frames to generate (1 + 8k for the published models, 1 + 4k for a VAE with 4x temporal compression; 1 makes an image)")
    length.add_argument("--duration", type=float, metavar="SECONDS", help="seconds of video, rounded to the nearest frame count the model allows")

    sampling = generate.add_argument_group("sampling")
    sampling.add_argument("--height", type=int, metavar="H", help="output height (default: the variant's)")
    sampling.add_argument("--width", type=int, metavar="W", help="output width (default: the variant's)")
    sampling.add_argument("--seed", type=int, metavar="S", help="same seed and settings, same frames (default: random)")
    sampling.add_argument("--first-frame-steps", metavar="A,B,C",
                          help="steps per pyramid stage for the first frame (default: the model's; 20,20,20 for "
                               "the published checkpoints)")
    sampling.add_argument("--video-steps", metavar="A,B,C",
                          help="steps per pyramid stage for later frames (default: the model's; 10,10,10 for the "
                               "published checkpoints)")
    sampling.add_argument("--guidance", dest="guidance_scale", type=float, metavar="G",
                          help="guidance scale of the first frame (default: the model's; 7 for the published checkpoints)")
    sampling.add_argument("--video-guidance", dest="video_guidance_scale", type=float, metavar="G",
                          help="guidance scale of later frames (default: the model's; 5 for the published checkpoints)")

    model = generate.add_argument_group("model and memory")
    model.add_argument("--model", metavar="PATH_OR_REPO", help="checkpoint folder or hub repo id (default: bundled)")
    model.add_argument("--variant", default="auto", help="resolution variant, e.g. 384p or 768p (default: auto)")
    model.add_argument("--dtype", choices=DTYPES, default="float32")
    model.add_argument("--device", choices=DEVICES, default="auto")
    model.add_argument("--offload", choices=OFFLOAD_MODES, default="none", help="move idle parts to the CPU")
    model.add_argument("--quantize", choices=QUANTIZE_MODES, default="none", help="store weights in fewer bits")
    model.add_argument("--vae-tiling", action="store_true", help="decode in tiles to save memory")
    model.add_argument("--lora", metavar="FOLDER[:WEIGHT]", action="append", default=[],
                       help="apply a LoRA (a folder from training/configs/lora.yaml, or diffusers' "
                            "pytorch_lora_weights.safetensors) at WEIGHT (default 1); repeat for several")
    model.add_argument("--parallel", default="auto", metavar="GxC",
                       help="under torchrun: guidance x context ranks, e.g. 2x1 or 2x2 (default: auto, guidance "
                            "parallel on an even number of ranks, context parallel over the rest)")

    speed = generate.add_argument_group("speed")
    speed.add_argument("--cache", type=canonical_cache_name, choices=CACHE_MODES,
                       help="step cache: on steps where the first block barely changed, first-block reuses the later "
                            "blocks' last residual and taylorseer extrapolates it from the last two computed steps; "
                            "mag skips every block while the residual's magnitude, calibrated on the first unit, "
                            "barely changes (default: the model's; none for the published checkpoints)")
    speed.add_argument("--cache-threshold", type=float, metavar="T",
                       help="first-block/taylorseer: relative change of the first block below which a step skips the "
                            "later blocks; mag: accumulated magnitude error below which it skips (default: the "
                            "model's; 0 never skips)")
    speed.add_argument("--attention-backend", type=canonical_backend_name, choices=ATTENTION_BACKENDS,
                       default="native", help="attention kernel (flash-varlen and flash_varlen are one); flash/sage "
                                              "need their package, a CUDA GPU and float16/bfloat16")
    speed.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks (slow first unit)")
    generate.add_argument("--save-queue", type=Path, metavar="QUEUE_FILE",
                          help="add the job(s) to this queue file instead of generating (run it with run-queue)")
    generate.add_argument("--quiet", action="store_true", help="no progress on stderr")

    run_queue = commands.add_parser("run-queue", help="run a saved queue; finished jobs are skipped, so it resumes")
    run_queue.add_argument("queue_file", type=Path, metavar="QUEUE_FILE",
                           help="a queue saved by the studio (Export) or by generate --save-queue")
    run_queue.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return parser


def plan(args) -> Request:
    """Check the command line and read the inputs; everything short of loading the model."""
    if args.image and args.extend:
        raise UsageError("use either --image or --extend, not both")
    mode = _mode(args)
    jobs = _jobs(args, mode)
    options = GenerationOptions(
        negative_prompt=args.negative_prompt, num_frames=args.num_frames, duration=args.duration,
        height=args.height, width=args.width, seed=args.seed,
        first_frame_steps=args.first_frame_steps, video_steps=args.video_steps,
        guidance_scale=args.guidance_scale, video_guidance_scale=args.video_guidance_scale,
        cache=args.cache, cache_threshold=args.cache_threshold,
    )
    model = ModelOptions(model=args.model, variant=args.variant, dtype=args.dtype, device=args.device,
                         offload=args.offload, quantize=args.quantize, vae_tiling=args.vae_tiling,
                         lora=args.lora, attention_backend=args.attention_backend, compile=args.compile)
    model.check_device_available()
    model_source(model.model)
    condition = read_image(args.image) if args.image else read_video(args.extend)[0] if args.extend else None
    parallel = ranks.parse_layout(args.parallel)
    if args.parallel != "auto" and not ranks.launched_with_several_ranks():
        raise UsageError("--parallel splits a run over several processes; start it with "
                         "torchrun --nproc_per_node N -m pyramid_app generate ...")
    return Request(mode, jobs, condition, model, options, args.image or args.extend, parallel)


def _mode(args) -> str:
    if args.image:
        return "image_to_video"
    if args.extend:
        return "extend_video"
    wants_png = args.out is not None and args.out.suffix.lower() == ".png"
    return "text_to_image" if wants_png or args.num_frames == 1 else "text_to_video"


def _jobs(args, mode: str) -> tuple:
    if sum(given is not None for given in (args.prompt, args.prompts_file, args.storyboard)) > 1:
        raise UsageError("use one of --prompt, --prompts-file and --storyboard")
    if args.storyboard is not None:
        return (Job(_read_storyboard(args, mode), args.out),)
    if args.prompts_file is not None:
        if args.out_dir is None:
            raise UsageError("--prompts-file needs --out-dir for the generated files")
        prompts = _read_prompts(args.prompts_file)
        suffix = ".png" if mode == "text_to_image" else ".mp4"
        return tuple(Job(prompt, args.out_dir / f"{index:04d}{suffix}") for index, prompt in enumerate(prompts))
    prompt = (args.prompt or "").strip()
    if not prompt and mode in TEXT_MODES:
        raise UsageError("give a non-empty --prompt TEXT (or --prompts-file FILE with --out-dir DIR)")
    if args.out is None:
        raise UsageError("missing --out FILE.mp4 (or FILE.png for a single image)")
    _check_output(args.out, mode, args)
    return (Job(prompt, args.out),)


def _read_storyboard(args, mode: str) -> Storyboard:
    if mode == "text_to_image" or args.num_frames is not None or args.duration is not None:
        raise UsageError("a storyboard makes a video whose length its seconds set; drop --num-frames / --duration "
                         "and name --out FILE.mp4")
    if args.out is None:
        raise UsageError("missing --out FILE.mp4")
    _check_output(args.out, mode, args)
    if not args.storyboard.is_file():
        raise FileNotFoundError(f"no such storyboard file: {args.storyboard}")
    try:
        return Storyboard.parse(args.storyboard.read_text(encoding="utf-8"))
    except ValueError as error:
        raise UsageError(f"{args.storyboard}: {error}") from None


def _read_prompts(path: Path) -> list:
    if not path.is_file():
        raise FileNotFoundError(f"no such prompts file: {path}")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"{path} holds no prompts; write one prompt per line")
    return prompts


def _check_output(out: Path, mode: str, args) -> None:
    suffix = out.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise UsageError(f"--out must end in {' or '.join(OUTPUT_SUFFIXES)}; got {out.name!r}")
    if suffix == ".png" and (mode != "text_to_image" or args.num_frames not in (None, 1) or args.duration is not None):
        raise UsageError(f"a .png holds a single image, but this command makes a video; name --out {out.stem}.mp4")
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name ending in .mp4 or .png")


def load_pipeline(model: ModelOptions):
    from model_core import PyramidFlowPipeline

    return PyramidFlowPipeline.from_pretrained(model_source(model.model), **model.to_load_kwargs())


def save_queue(request: Request, path: Path) -> int:
    """Append the request's jobs to a queue file (created if missing) for `run-queue`; no model loads."""
    queue = JobQueue(path)
    for job in queued_jobs_from_request(request, path.parent):
        queue.add(job)
    print(f"{path}\t{len(request.jobs)} job(s) added, {queue.counts()['pending']} pending", flush=True)
    return 0


def run_queue(path: Path, quiet: bool = False) -> int:
    """Run a saved queue's pending jobs in order, each model loaded once per run of jobs that share it;
    every job's state is saved as it changes, so a crashed run resumes where it stopped."""
    if not path.is_file():
        raise FileNotFoundError(f"no such queue file: {path}")
    report = (lambda message: None) if quiet else _stderr_line
    if quiet:
        _silence_library_progress_bars()
    queue = JobQueue(path)
    loaded = {}

    def run_one(job):
        job = seeded_job(queue, job)
        model = model_options(job)
        if model not in loaded:
            loaded.clear()
            report("loading model ...")
            loaded[model] = load_pipeline(model)
        report(f"job {job.id}: {job.mode.replace('_', ' ')}, seed {job.options['seed']}")
        with _stop_on_ctrl_c() as stop:
            out = generate_job(loaded[model], job, path.parent, save,
                               callback_on_step_end=step_callback(None if quiet else ProgressPrinter(), stop))
        print(f"{out}\tseed={job.options['seed']}", flush=True)
        return out

    try:
        counts = run_jobs(queue, run_one, USER_ERRORS)
    except Stopped as stopped:
        report(f"interrupted: {stopped}; run-queue again to redo that job")
        return EXIT_INTERRUPTED
    for job in queue.jobs:
        if job.state == "failed":
            report(f"job {job.id} failed: {job.error}")
    report(f"{counts['done']} done, {counts['failed']} failed, {counts['pending']} pending")
    return EXIT_FAILED if counts["failed"] else 0


def run(request: Request, quiet: bool = False) -> int:
    """Load the model once, generate every job in order, each video streamed into its file unit by unit.

    Under torchrun every rank computes each job and rank 0 alone reports and writes."""
    from model_core.memory import resolve_device

    several = ranks.start(resolve_device(None if request.model.device == "auto" else request.model.device))
    quiet = quiet or not ranks.is_main()
    report = (lambda message: None) if quiet else _stderr_line
    if quiet:
        _silence_library_progress_bars()
    report("loading model ...")
    pipe = load_pipeline(request.model)
    if several:
        pipe.enable_parallelism(request.parallel)
    inputs = () if request.condition is None else (request.condition,)
    for job in request.jobs:
        seeded = request.options.seeded()
        seeded = replace(seeded, seed=ranks.agree(seeded.seed))  # the same noise on every rank
        report(f"{job.out.name}: {request.mode.replace('_', ' ')}, seed {seeded.seed}")
        with _stop_on_ctrl_c() as stop, OutputFile(job.out, pipe.spec.fps, keep=ranks.is_main()) as output:
            result = getattr(pipe, request.mode)(*inputs, job.prompt, **seeded.to_pipeline_kwargs(request.mode),
                                                 callback_on_step_end=step_callback(None if quiet else ProgressPrinter(), stop),
                                                 **output.pipeline_options)
            saved = output.save(result)
        if not saved:
            report(f"interrupted before the first frame was finished: nothing saved to {job.out}")
            return EXIT_INTERRUPTED
        if ranks.is_main():
            print(f"{job.out}\tseed={seeded.seed}", flush=True)
        if result.interrupted:
            report(f"interrupted: saved {saved} frames to {job.out}")
            return EXIT_INTERRUPTED
    return 0


def step_callback(on_progress, stop: threading.Event):
    """A `callback_on_step_end` that reports each step's `pipe.progress` and stops the pipeline once `stop` is set."""
    def on_step_end(pipe, step_index, timestep, callback_kwargs):
        if on_progress is not None:
            on_progress(pipe.progress)
        pipe._interrupt = stop.is_set()
        return {}

    return on_step_end


class ProgressPrinter:
    """One stderr line per finished unit; on a terminal, a live step counter in between."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.started = time.monotonic()

    def __call__(self, progress):
        position = f"unit {progress.unit + 1}/{progress.num_units}"
        rewrite = "\r" if self.live else ""
        clear = "\033[K" if self.live else ""
        if progress.kind == "unit":
            self.stream.write(f"{rewrite}{position} done, {time.monotonic() - self.started:.1f} s{clear}\n")
        elif self.live:
            step = f"stage {progress.stage + 1}  step {progress.step + 1}/{progress.num_steps}"
            self.stream.write(f"\r{position}  {step}{clear}")
        self.stream.flush()


@contextmanager
def _stop_on_ctrl_c():
    """The first Ctrl-C asks the pipeline to stop after the current step and save what is finished; a second one
    only says so again (the save is under way); a third aborts without saving."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    presses = itertools.count(1)

    def request_stop(signum, frame):
        press = next(presses)
        if press == 1:
            stop.set()
            _stderr_line("stopping after the current step; the finished units are saved (Ctrl-C twice more to abort)")
        elif press == 2:
            _stderr_line("saving the finished units (Ctrl-C again to abort without saving)")
        else:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, request_stop)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def _silence_library_progress_bars() -> None:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def _stderr_line(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if ranks.launched_with_several_ranks() and (args.command == "run-queue" or args.save_queue is not None):
            raise UsageError("queues run in one process (every rank would write the queue file); "
                             "use torchrun with generate --out or --prompts-file")
        if args.command == "run-queue":
            return run_queue(args.queue_file, quiet=args.quiet)
        if args.save_queue is not None:
            return save_queue(plan(args), args.save_queue)
        return run(plan(args), quiet=args.quiet)
    except USER_ERRORS as error:
        _error_line(_first_line(error), every_rank_sees_it=True)
        return EXIT_USAGE
    except torch.OutOfMemoryError:
        _error_line(OUT_OF_MEMORY_HINT)
        return EXIT_FAILED
    except OSError as error:
        _error_line(_first_line(error))
        return EXIT_FAILED
    except KeyboardInterrupt:
        _error_line("interrupted; nothing was saved for the current output", every_rank_sees_it=True)
        return EXIT_INTERRUPTED
    finally:
        ranks.stop()


def _error_line(message: str, every_rank_sees_it: bool = False) -> None:
    """Rank 0 prints every error; another rank prints, naming itself, only what may have happened to it alone."""
    if ranks.is_main():
        _stderr_line(f"error: {message}")
    elif not every_rank_sees_it:
        _stderr_line(f"error (rank {ranks.rank()}): {message}")
