"""`python -m pyramid_app generate`: a prompt (plus an image or a clip) in, an mp4 or png out.

Everything a person can get wrong is checked before the model loads, against the model's limits as its folder
states them and the studio's caps (`limits`); any error ends the run with one line `error: ...` on stderr. Ctrl-C
stops after the current step and still saves the finished units.

Only light modules are imported at the top (argparse, the option names, `settings`): torch, diffusers, PyAV and
the model's modules are imported inside the command functions (`plan`, `run`, `run_queue`, `save_queue`), so
`--help` and a mistyped option answer at once instead of after seconds of imports.
"""
import argparse
import itertools
import os
import re
import signal
import stat
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from model_core.option_names import canonical_backend_name, canonical_cache_name

from .options import limits
from .options.errors import USER_ERRORS
from .options.settings import (
    ATTENTION_BACKENDS,
    CACHE_MODES,
    DEVICES,
    DTYPES,
    OFFLOAD_MODES,
    QUANTIZE_MODES,
    GenerationOptions,
    ModelOptions,
    model_name,
    model_source,
    parse_steps,
)

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
OUTPUT_SUFFIXES = (".mp4", ".png")
TEXT_MODES = ("text_to_video", "text_to_image")  # the modes where the prompt is the only input
OUT_OF_MEMORY_HINT = ("out of memory; try --offload model or --offload sequential, --quantize int8 or nf4, "
                      "--vae-tiling, or fewer frames / a smaller size")
STEP_LIST_OPTIONS = ("--first-frame-steps", "--video-steps")
NEGATIVE_FIRST = re.compile(r"-\d")  # a value like -5,10,10, which argparse would take for an option
SIZE_HEADROOM = 4  # a frame may have up to this many times the pixels of the variant the model was made for


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
    condition: object  # the --image or --extend frames (uint8 numpy array), else None
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
    for add_options in (_what_options, _sampling_options, _model_options, _speed_options):
        add_options(generate)
    generate.add_argument("--save-queue", type=Path, metavar="QUEUE_FILE",
                          help="add the job(s) to this queue file instead of generating (run it with run-queue)")
    generate.add_argument("--quiet", action="store_true", help="no progress on stderr")

    run_queue = commands.add_parser("run-queue", help="run a saved queue; finished jobs are skipped, so it resumes")
    run_queue.add_argument("queue_file", type=Path, metavar="QUEUE_FILE",
                           help="a queue saved by the studio (Export) or by generate --save-queue")
    run_queue.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return parser


def _what_options(generate) -> None:
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


def _sampling_options(generate) -> None:
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
                          help="guidance scale of later frames (default: the model's; 5 for the published checkpoints, "
                               "4 when animating an image)")


def _model_options(generate) -> None:
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


def _speed_options(generate) -> None:
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
    speed.add_argument("--compile", nargs="?", const="on", default="off", metavar="LEVEL",
                       help="torch.compile the whole transformer forward: --compile (or on) compiles it once per input "
                            "shape, the history padded to a few shapes (slow first units; on a CPU tens of seconds per "
                            "shape, and at small model sizes a step slower than off); --compile max also captures "
                            "CUDA graphs (a CUDA GPU only); off: eager (default)")


def plan(args) -> Request:
    """Check the command line and read the inputs; everything short of loading the model. The missing output
    folders that may be made are made last, once everything else has passed."""
    from .jobs import ranks

    if args.image and args.extend:
        raise UsageError("use either --image or --extend, not both")
    mode = _mode(args)
    jobs = _jobs(args, mode)
    folders = _folders_to_make(args, jobs)
    limits.prompt(args.negative_prompt, "the negative prompt")
    for name in ("guidance_scale", "video_guidance_scale"):
        if getattr(args, name) is not None:
            limits.guidance(getattr(args, name), name)
    most_steps = limits.STEPS_RANGE[1]
    options = GenerationOptions(
        negative_prompt=args.negative_prompt,
        num_frames=args.num_frames, duration=args.duration, height=args.height, width=args.width, seed=args.seed,
        first_frame_steps=_steps(args.first_frame_steps, "first_frame_steps", most_steps),
        video_steps=_steps(args.video_steps, "video_steps", most_steps),
        guidance_scale=args.guidance_scale, video_guidance_scale=args.video_guidance_scale,
        cache=args.cache, cache_threshold=args.cache_threshold,
    )
    model = ModelOptions(model=args.model, variant=args.variant, dtype=args.dtype, device=args.device,
                         offload=args.offload, quantize=args.quantize, vae_tiling=args.vae_tiling,
                         lora=args.lora, attention_backend=args.attention_backend, compile=args.compile)
    model.check_device_available()
    model_source(model.model)
    parallel = ranks.parse_layout(args.parallel)
    if args.parallel != "auto" and not ranks.launched_with_several_ranks():
        raise UsageError("--parallel splits a run over several processes; start it with "
                         "torchrun --nproc_per_node N -m pyramid_app generate ...")
    _check_against_model(args, mode, jobs)
    condition = _read_condition(args)
    for folder in folders:
        _make_folder(folder, report=not args.quiet and ranks.is_main())
    return Request(mode, jobs, condition, model, options, args.image or args.extend, parallel)


def _steps(value, name: str, most: int):
    return None if value is None else parse_steps(value, name, most)


def _check_against_model(args, mode: str, jobs) -> None:
    """Length, duration, storyboard and frame size against the model's limits, read from its folder the way the
    studio reads them (`catalog.model_facts`: pyramid_flow.json and the variant folders) without loading it. A model
    whose limits are unknown until it loads (a hub repo other than the published ones, a damaged folder, a variant
    it lacks) is checked as it loads."""
    from model_core.temporal import frames_for_duration

    from .options import catalog

    named = args.model or catalog.BUNDLED
    if not (named in catalog.BUNDLED_MODELS or named in catalog.HUB_MODELS or Path(named).expanduser().is_dir()):
        return
    facts = catalog.model_facts(named)
    spec = facts.spec(args.variant)
    if spec is None:
        return
    extension = mode == "extend_video"
    low, high, step = catalog.length_limits(spec, extension, long_video=True)
    if args.num_frames is not None and mode != "text_to_image":
        limits.frame_count(args.num_frames, low, high, step, what="new frames" if extension else "num_frames")
    if args.duration is not None and frames_for_duration(args.duration, spec.fps, spec.frames_per_latent,
                                                         new_frames_only=extension) > high:
        raise ValueError(f"duration must be at most {high / spec.fps:.1f} s for this model ({high} frames at "
                         f"{spec.fps} fps); got {args.duration:g}")
    storyboard = jobs[0].prompt if args.storyboard is not None else None
    if storyboard is not None and storyboard.num_frames(spec.fps, spec.frames_per_latent, continues=extension) > high:
        raise ValueError(f"the storyboard lasts {storyboard.seconds:g} s; this model makes at most {high} frames "
                         f"({high / spec.fps:.1f} s): shorten its segments")
    height, width = args.height or spec.height, args.width or spec.width
    if height * width > SIZE_HEADROOM * spec.height * spec.width:
        variant = facts.variants[0] if args.variant == "auto" else args.variant
        raise ValueError(f"--height {height} --width {width} is {height * width} pixels per frame; the {variant} variant "
                         f"makes at most {SIZE_HEADROOM * spec.height * spec.width} ({SIZE_HEADROOM} times its "
                         f"{spec.height}x{spec.width}): ask for a smaller size")


def _read_condition(args):
    """The --image or --extend frames, refused beyond the studio's caps from the file's header before decoding."""
    if not (args.image or args.extend):
        return None
    from model_core.media_files import probe_image, probe_video, read_image, read_video


    if args.image:
        path = _input_file(args.image, "--image", "image file")
        limits.image_upload(probe_image(path), path)
        return read_image(path, max_pixels=limits.IMAGE_MAX_PIXELS)
    path = _input_file(args.extend, "--extend", "video file")
    limits.video_upload(probe_video(path), path)
    return read_video(path, max_frames=limits.VIDEO_MAX_FRAMES, max_pixels=limits.VIDEO_MAX_PIXELS)[0]


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
    prompt = limits.prompt(args.prompt, "the prompt").strip()
    if not prompt and mode in TEXT_MODES:
        raise UsageError("give a non-empty --prompt TEXT (or --prompts-file FILE with --out-dir DIR)")
    if args.out is None:
        raise UsageError("missing --out FILE.mp4 (or FILE.png for a single image)")
    _check_output(args.out, mode, args)
    return (Job(prompt, args.out),)


def _read_storyboard(args, mode: str):
    from model_core.storyboard import Storyboard

    if mode == "text_to_image" or args.num_frames is not None or args.duration is not None:
        raise UsageError("a storyboard makes a video whose length its seconds set; drop --num-frames / --duration "
                         "and name --out FILE.mp4")
    if args.out is None:
        raise UsageError("missing --out FILE.mp4")
    _check_output(args.out, mode, args)
    text = _read_text(args.storyboard, "--storyboard", "storyboard file")
    try:
        return Storyboard.parse(text)
    except ValueError as error:
        raise UsageError(f"{args.storyboard}: {error}") from None


def _read_prompts(path: Path) -> list:

    lines = _read_text(path, "--prompts-file", "prompts file").splitlines()
    prompts = [limits.prompt(line, f"the prompt on line {number} of {path}").strip()
               for number, line in enumerate(lines, 1) if line.strip()]
    if not prompts:
        raise UsageError(f"{path} holds no prompts; write one prompt per line")
    return prompts


def _input_file(path: Path, option: str, what: str) -> Path:
    """`path` when it is a regular file; else a sentence naming the option, the file and what it is instead of
    `what` ("image file", ...)."""
    wanted = f"{'an' if what[0] in 'aeiou' else 'a'} {what}"
    try:
        file_type = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"no such {what}: {path}") from None
    if stat.S_ISDIR(file_type):
        raise UsageError(f"{option} {path} is a folder, not {wanted}")
    if not stat.S_ISREG(file_type):
        raise UsageError(f"{option} {path} is {_special_kind(file_type)}, not {wanted}")
    return path


def _special_kind(file_type: int) -> str:
    if stat.S_ISCHR(file_type) or stat.S_ISBLK(file_type):
        return "a device"
    if stat.S_ISFIFO(file_type):
        return "a named pipe"
    return "a socket" if stat.S_ISSOCK(file_type) else "a special file"


def _read_text(path: Path, option: str, what: str) -> str:
    """The text of a UTF-8 file; anything else is refused naming the option and the file."""
    data = _input_file(path, option, what).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UsageError(f"{option} {path} is not UTF-8 text (byte {error.start} cannot be decoded); "
                         "save it as UTF-8") from None
    if "\0" in text:
        raise UsageError(f"{option} {path} is a binary file, not UTF-8 text")
    return text


def _check_output(out: Path, mode: str, args) -> None:
    suffix = out.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise UsageError(f"--out must end in {' or '.join(OUTPUT_SUFFIXES)}; got {out.name!r}")
    if suffix == ".png" and (mode != "text_to_image" or args.num_frames not in (None, 1) or args.duration is not None):
        raise UsageError(f"a .png holds a single image, but this command makes a video; name --out {out.stem}.mp4")
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name ending in .mp4 or .png")


def _folders_to_make(args, jobs) -> list:
    """The missing folders this command writes into, each checked by `_may_make`; with --save-queue only the queue
    file's is made now, since run-queue makes the outputs' folders as it writes them."""
    options = {job.out.parent: "--out-dir" if args.prompts_file is not None else "--out" for job in jobs}
    if args.save_queue is not None:
        options[args.save_queue.parent] = "--save-queue"
    missing = [folder for folder, option in options.items() if _may_make(folder, option)]
    if args.save_queue is not None:
        return [folder for folder in missing if folder == args.save_queue.parent]
    return missing


def _may_make(folder: Path, option: str) -> bool:
    """False when `folder` exists, True when it is missing and may be made: inside the working folder, or inside an
    existing folder other than the filesystem root, so a mistyped absolute path is refused rather than made at the
    root."""
    absolute = Path(os.path.abspath(folder))
    existing = next(path for path in (absolute, *absolute.parents) if path.exists())
    if not existing.is_dir():
        raise UsageError(f"{option}: {existing} is a file, not a folder")
    if existing == absolute:
        return False
    if existing == Path(existing.anchor) and not absolute.is_relative_to(Path.cwd()):
        raise UsageError(f"{option}: the folder {absolute} does not exist and is not made at the filesystem root; "
                         "create it first, or write inside the working folder or an existing folder")
    return True


def _make_folder(folder: Path, report: bool) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"cannot create the folder {folder}: {error.strerror or error}") from None
    if report:
        _stderr_line(f"created the folder {folder}")


def load_pipeline(model: ModelOptions):
    from model_core import PyramidFlowPipeline

    pipe = PyramidFlowPipeline.from_pretrained(model_source(model.model), **model.to_load_kwargs())
    pipe.source = model_name(model.model)  # outputs record the model as named, not the bundled model's folder
    pipe.set_progress_bar_config(disable=True)  # the CLI reports progress from its step callback
    return pipe


def save_queue(request: Request, path: Path) -> int:
    """Append the request's jobs to a queue file (created if missing) for `run-queue`; no model loads."""
    from .jobs.queue import JobQueue
    from .jobs.runner import queued_jobs_from_request

    queue = JobQueue(path)
    for job in queued_jobs_from_request(request, path.parent):
        queue.add(job)
    print(f"{path}\t{len(request.jobs)} job(s) added, {queue.counts()['pending']} pending", flush=True)
    return 0


def run_queue(path: Path, quiet: bool = False) -> int:
    """Run a saved queue's pending jobs in order, each model loaded once per run of jobs that share it;
    every job's state is saved as it changes, so a crashed run resumes where it stopped."""
    from .jobs.queue import JobQueue, run_jobs
    from .jobs.output_file import save, sweep_leftovers
    from .jobs.runner import Stopped, generate_job, job_output, model_options, seeded_job

    _input_file(path, "QUEUE_FILE", "queue file")
    report = (lambda message: None) if quiet else _stderr_line
    if quiet:
        _silence_library_progress_bars()
    queue = JobQueue(path)
    sweep_leftovers(job_output(job, path.parent).parent for job in queue.jobs)
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

    from .jobs import ranks
    from .jobs.output_file import OutputFile, sweep_leftovers

    several = ranks.start(resolve_device(None if request.model.device == "auto" else request.model.device))
    try:
        quiet = quiet or not ranks.is_main()
        report = (lambda message: None) if quiet else _stderr_line
        if quiet:
            _silence_library_progress_bars()
        if ranks.is_main():
            sweep_leftovers(job.out.parent for job in request.jobs)
        report("loading model ...")
        pipe = load_pipeline(request.model)
        if several:
            pipe.enable_parallelism(request.parallel)
        inputs = () if request.condition is None else (request.condition,)
        for job in request.jobs:
            seeded = request.options.seeded()  # under torchrun the pipeline takes rank 0's seed on every rank
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
    finally:
        ranks.stop()


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
        args = build_parser().parse_args(_negative_lists_attached(sys.argv[1:] if argv is None else argv))
        return _command(args)
    except USER_ERRORS as error:
        _error_line(_first_line(error), every_rank_sees_it=True)
        return EXIT_USAGE
    except OSError as error:
        _error_line(_first_line(error))
        return EXIT_FAILED
    except KeyboardInterrupt:
        _error_line("interrupted; nothing was saved for the current output", every_rank_sees_it=True)
        return EXIT_INTERRUPTED
    except RuntimeError as error:
        if not _is_out_of_memory(error):
            raise
        _error_line(OUT_OF_MEMORY_HINT)
        return EXIT_FAILED


def _command(args) -> int:
    from .jobs import ranks

    if ranks.launched_with_several_ranks() and (args.command == "run-queue" or args.save_queue is not None):
        raise UsageError("queues run in one process (every rank would write the queue file); "
                         "use torchrun with generate --out or --prompts-file")
    if args.command == "run-queue":
        return run_queue(args.queue_file, quiet=args.quiet)
    if args.save_queue is not None:
        return save_queue(plan(args), args.save_queue)
    return run(plan(args), quiet=args.quiet)


def _negative_lists_attached(argv) -> list:
    """`--video-steps -5,10,10` as `--video-steps=-5,10,10`: argparse takes a value that starts with '-' and is not
    one number for an option, so such a list would never reach the steps check that says what is allowed."""
    argv = list(argv)
    for index in range(len(argv) - 1, 0, -1):
        if argv[index - 1] in STEP_LIST_OPTIONS and NEGATIVE_FIRST.match(argv[index]):
            argv[index - 1:index + 1] = [f"{argv[index - 1]}={argv[index]}"]
    return argv


def _is_out_of_memory(error: RuntimeError) -> bool:
    torch = sys.modules.get("torch")  # not imported: the error cannot be torch's
    return torch is not None and isinstance(error, torch.OutOfMemoryError)


def _error_line(message: str, every_rank_sees_it: bool = False) -> None:
    """Rank 0 prints every error; another rank prints, naming itself, only what may have happened to it alone."""
    from .jobs import ranks

    if ranks.is_main():
        _stderr_line(f"error: {message}")
    elif not every_rank_sees_it:
        _stderr_line(f"error (rank {ranks.rank()}): {message}")
