"""The studio's generation endpoints: options from the controls, a pipeline run with live frames, the saved file.

`/text_to_video`, `/image_to_video`, `/extend_video` and `/text_to_image` take the prompt first (after the
image or clip where there is one); every other argument defaults to the control's value in the UI. The
handlers receive the values as the client sent them and check every one (`limits`) before loading a model or
decoding an upload; any failure reaches the client as one `gr.Error` sentence.
"""
import asyncio
import functools
import json
import logging
import os
import secrets
import threading
import time
from dataclasses import asdict
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from model_core.loading import check_contained
from model_core.lora import find_loras
from model_core.media_files import read_image, read_video
from model_core.sampling import Progress

from . import gallery
from ..options import limits
from ..options.catalog import BUNDLED, MISSING_BUNDLED, ModelMenu, is_local, length_limits
from ..options.errors import USER_ERRORS
from .sessions import Job, PipelineCache, StopSwitches, UnitPreview, progress_text, run_job
from ..jobs.output_file import save
from .replies import reply
from .outputs import SessionOutputs
from model_core.storyboard import Storyboard

from ..options.settings import STAGE_COUNT, GenerationOptions, ModelOptions
from .blocks import FILE_INPUTS
from .queue_panel import INPUTS_FOLDER, QUEUE_EXPORT, Admission, StudioQueues, job_id_at, queue_badge, queue_rows
from .uploads import HOSTED_DECODE_BYTES, LOCAL_DECODE_BYTES, DecodeBudget, ReceivedFiles, decoded_upload, header_check

THUMBNAIL_SIDE = 160
LORA_WEIGHT_MAX = 2.0  # the weight slider's range is 0 to this
OUT_OF_MEMORY = ("Out of memory. Open Memory and try offload 'model' or 'sequential', quantization int8/nf4, "
                 "VAE tiling, or fewer frames.")
PROGRESS_INTERVAL = 0.25  # seconds between progress-bar updates; each one is a message the browser renders
LOADING = "Loading the model… (a hub model is downloaded on first use)"
STOPPING = "Stopping after the current step; the finished frames will be saved…"
NOTHING_FINISHED = "Stopped before the first frame was finished; nothing was saved."
UPLOAD_KIND = {"image_to_video": "image", "extend_video": "video"}  # the parameter's name
MISSING_UPLOAD = {"image_to_video": "Upload an image to animate first.", "extend_video": "Upload a video clip to extend first."}
STEP_NAMES = ("first_frame_steps", "video_steps")
GUIDANCE_NAMES = ("guidance_scale", "video_guidance_scale")
IMAGE_GUIDANCE = "image_video_guidance_scale"  # the studio's field behind image_to_video's video_guidance_scale
LOG = logging.getLogger(__name__)


class Endpoints:
    """Generation handlers and their state: the model menu, loaded pipelines, stop switches, where outputs go."""

    def __init__(self, default_model=None, output_dir="outputs", pipelines=None, menu: ModelMenu = None,
                 lora_dir=None):
        self.menu = menu or ModelMenu([default_model] if default_model else [])
        self.default_model = self.menu.default
        self.outputs = SessionOutputs(output_dir, hosted=self.menu.hosted)
        self.output_dir = self.outputs.root
        self.received = ReceivedFiles([], self.outputs.folder)  # `admit_uploads_of` gives it the server's uploads
        self.decode_budget = DecodeBudget(HOSTED_DECODE_BYTES if self.menu.hosted else LOCAL_DECODE_BYTES)
        self.loras = find_loras(lora_dir) if lora_dir else {}  # the only LoRAs a person can pick: the operator's
        self.pipelines = pipelines or PipelineCache()
        self.stops = StopSwitches()
        self.device_lock = threading.Lock()  # one generation at a time: Generate or a queued job
        self._exported = {}  # export file -> a hash of the queue state it holds
        self.queues = StudioQueues(self.output_dir, self.pipelines, self.device_lock, save,
                                   read_input=functools.partial(decoded_upload, budget=self.decode_budget),
                                   session_folder=self.outputs.folder if self.menu.hosted else None,
                                   admission=Admission() if self.menu.hosted else None)

    def admit_uploads_of(self, demo: gr.Blocks) -> None:
        """Accept as uploads the files Gradio's upload route of `demo` received and the copies Gradio makes of them
        in the caches of `demo`'s file inputs (not of its outputs, which hold every session's results)."""
        inputs = [block for block in demo.blocks.values()
                  if type(block).__name__ in FILE_INPUTS and getattr(block, "interactive", None) is not False]
        self.received.received = [demo.upload_file_set, *(block.temp_files for block in inputs)]

    def client_file(self, payload, request, what: str):
        """The local path of a file a client sent, admitted only if it was uploaded (see `uploads`); a call made in
        this process (no request) names any file."""
        path = _upload_path(payload)
        if path is None or request is None:
            return path
        return self.received.admit(path, _session(request), what)

    # --- the four API endpoints ---------------------------------------------------------------

    async def text_to_video(self, prompt: str, num_frames: int, history: list, request: gr.Request = None,
                            progress=gr.Progress(track_tqdm=True), **controls):
        async for update in self._generate("text_to_video", prompt, None, num_frames, history, controls, request, progress):
            yield update

    async def image_to_video(self, image: str, prompt: str, num_frames: int, history: list, request: gr.Request = None,
                             progress=gr.Progress(track_tqdm=True), **controls):
        async for update in self._generate("image_to_video", prompt, image, num_frames, history, controls, request, progress):
            yield update

    async def extend_video(self, video: str, prompt: str, num_frames: int, history: list, request: gr.Request = None,
                           progress=gr.Progress(track_tqdm=True), **controls):
        async for update in self._generate("extend_video", prompt, video, num_frames, history, controls, request, progress):
            yield update

    async def text_to_image(self, prompt: str, history: list, request: gr.Request = None,
                            progress=gr.Progress(track_tqdm=True), **controls):
        async for update in self._generate("text_to_image", prompt, None, None, history, controls, request, progress):
            yield update

    async def _generate(self, mode, prompt, upload, num_frames, history, controls, request, progress):
        """Yield (result, frames, status, seed used, history): frames as units finish, the saved file last."""
        started = time.monotonic()
        session = _session(request)
        stop = self.stops.start(session)  # Stop works from the moment the request runs, loading included
        sent, upload = upload, None
        try:
            upload = self.client_file(sent, request, UPLOAD_KIND.get(mode, "upload"))
            model, prompt, options, spec = self._checked(mode, prompt, num_frames, controls)
            condition = await asyncio.to_thread(_read_upload, mode, upload, spec, self.decode_budget)
            yield gr.skip(), [], LOADING, str(options.seed), gr.skip()
            progress(0, desc="loading model (a hub model is downloaded on first use)")
            await asyncio.to_thread(self.pipelines.get, model, tqdm)
            frames, shown = [], float("-inf")
            yield gr.skip(), gr.skip(), _running_text(stop, None), gr.skip(), gr.skip()
            async for event in run_job(self.pipelines, model, Job(mode, prompt, condition, options), stop,
                                       self.device_lock):
                if isinstance(event, UnitPreview):
                    frames = frames + _thumbnails(event.frames)
                    yield gr.skip(), frames, _running_text(stop, event.progress), str(options.seed), gr.skip()
                elif isinstance(event, Progress):
                    if time.monotonic() - shown >= PROGRESS_INTERVAL:
                        progress(event.fraction, desc=progress_text(event))
                        yield gr.skip(), gr.skip(), _running_text(stop, event), gr.skip(), gr.skip()
                        shown = time.monotonic()
                else:
                    result = event
            if len(result.frames[0]) == 0:
                yield gr.skip(), [], NOTHING_FINISHED, str(options.seed), gr.skip()
                return
            if self.menu.hosted:  # the menu value, not the server's folder
                result.settings["model"] = controls["model"]
            self.outputs.sweep()
            out = await asyncio.to_thread(save, result, self.outputs.folder(session) / _output_name(mode, result))
        except Exception as error:
            sentence = _failure_sentence(error, mode)
            yield gr.skip(), gr.skip(), f"Not done: {sentence}", gr.skip(), gr.skip()  # the status line says it too
            raise gr.Error(sentence, print_exception=False) from None
        finally:
            self.stops.finish(session)
        history = gallery.add(history or [], out, result.settings)
        # the strip ends with every saved frame (an extension's clip included), not only the previews streamed
        yield str(out), _thumbnails(result.frames[0]), _finished_text(result, out, started), str(options.seed), history

    def _checked(self, mode, prompt, num_frames, controls) -> tuple:
        """(ModelOptions, prompt, GenerationOptions with a seed), every value checked."""
        model, spec = self._model_options(controls)
        storyboard = storyboard_of(controls.get("storyboard"))
        if storyboard is not None:  # its seconds set the length
            return model, storyboard, _generation_options(mode, controls, None, spec, storyboard=storyboard,
                                                          long_video=not self.menu.hosted), spec
        prompt = limits.prompt(prompt)
        if mode in ("text_to_video", "text_to_image") and not prompt.strip():
            raise ValueError("the prompt is empty; describe what you want to see")
        return model, prompt, _generation_options(mode, controls, num_frames, spec), spec

    def _model_options(self, controls) -> tuple:
        """The checked ModelOptions and the spec of the variant they name (its size and length limits)."""
        source = self.menu.source_for(controls["model"])
        if source is None and not is_local(BUNDLED):
            raise FileNotFoundError(MISSING_BUNDLED)
        if self.menu.hosted and source is not None and Path(source).is_dir():
            check_contained(Path(source))
        facts = self.menu.facts(controls["model"])
        variant = controls["variant"] or "auto"
        if not facts.variants and facts.note:
            raise ValueError(facts.note)
        spec = facts.spec(variant) if isinstance(variant, str) else None
        if spec is None and facts.variants:
            raise ValueError(f"this model has no variant {limits.shown(variant)}; pick one of: auto, {', '.join(facts.variants)}")
        lora = self._lora(controls.get("lora"), controls.get("lora_weight"))
        speed = limits.speed_controls(controls)
        if self.menu.hosted and speed != limits.SERVER_SPEED:  # each would rebuild or recompile the shared model
            raise ValueError("on this hosted studio the attention backend and compiling are the server's "
                             "(native, off); the step cache and its threshold are yours to pick")
        return ModelOptions(model=source, variant=variant, lora=lora, **limits.memory_controls(controls), **speed), spec

    def _lora(self, name, weight) -> tuple:
        """The picked LoRA as ((path, weight),), or () for none; only names from the LoRA folder are accepted."""
        weight = lora_weight(weight)
        if name in (None, "", gallery.NO_LORA):
            return ()
        if not isinstance(name, str) or name not in self.loras:
            offered = ", ".join(self.loras) or "none (start the studio with --lora-dir)"
            raise ValueError(f"LoRA {limits.shown(name)} is not in the studio's LoRA folder; pick one of: {offered}")
        return ((str(self.loras[name]), float(weight)),)

    # --- the queue ----------------------------------------------------------------------------

    def queue_text_to_video(self, prompt: str, num_frames: int, request: gr.Request = None, **controls):
        return self.add_to_queue("text_to_video", prompt, None, num_frames, request, **controls)

    def queue_image_to_video(self, image: str, prompt: str, num_frames: int, request: gr.Request = None, **controls):
        return self.add_to_queue("image_to_video", prompt, image, num_frames, request, **controls)

    def queue_extend_video(self, video: str, prompt: str, num_frames: int, request: gr.Request = None, **controls):
        return self.add_to_queue("extend_video", prompt, video, num_frames, request, **controls)

    def queue_text_to_image(self, prompt: str, request: gr.Request = None, **controls):
        return self.add_to_queue("text_to_image", prompt, None, None, request, **controls)

    def add_to_queue(self, mode: str, prompt: str, sent, num_frames, request: gr.Request = None, **controls):
        """Queue the job the tab's controls describe; returns the queue's rows and a status line."""
        session, upload = _session(request), None
        try:
            model, spec = self._model_options(controls)
            storyboard = storyboard_of(controls.get("storyboard"))
            prompt = "" if storyboard else limits.prompt(prompt)
            options = _generation_options(mode, controls, num_frames, spec, seeded=False, storyboard=storyboard,
                                          long_video=not self.menu.hosted)
            upload = self.client_file(sent, request, UPLOAD_KIND.get(mode, "upload"))
            if mode in MISSING_UPLOAD:
                if not upload:
                    raise ValueError(MISSING_UPLOAD[mode])
                header_check(mode, upload)
            self.outputs.sweep()
            job = self.queues.add(session, mode, prompt, storyboard and storyboard.to_settings(), upload, options, model,
                                  address=client_address(request))
        except (*USER_ERRORS, OSError) as error:
            raise gr.Error(reply(error), print_exception=False) from None
        queue = self.queues.queue(session)
        queued = f"Queued as #{[j.id for j in queue.jobs].index(job.id) + 1}: {job.text or gallery.MODE_LABELS[mode]}"
        gr.Info(f"{queued}. It runs after the jobs before it; its result joins this session's outputs.")
        return self.rows(queue), queued

    def rows(self, queue) -> list:
        """The queue's table rows, a finished job's output described as in the gallery."""
        return queue_rows(queue, _output_summary)

    def queue_view(self, history: list, request: gr.Request = None, announce: bool = True) -> tuple:
        """The caller's queue: (rows, paused, panel title, export file, history, gallery items). The outputs of finished
        jobs not yet in `history` join it (else history and gallery are gr.skip()), each told in a toast if
        `announce`."""
        queue = self.queues.queue(_session(request))
        known = {entry["path"] for entry in history or []}
        added = history or []
        for position, job in enumerate(queue.jobs, start=1):
            settings = _saved_settings(job.output) if job.state == "done" and job.output not in known else None
            if settings is not None:
                added = gallery.add(added, job.output, settings)
                if announce:
                    gr.Info(f"Queued job #{position} is done: {gallery.caption(settings)}. "
                            "It is in this session's outputs.")
        changed = len(added) != len(history or [])
        return (self.rows(queue), queue.paused, gr.update(label=queue_badge(queue)), self._queue_export(queue),
                added if changed else gr.skip(), gallery.gallery_items(added) if changed else gr.skip())

    def queue_badge(self, request: gr.Request = None):
        """The queue panel's title, saying what the caller's queue holds."""
        return gr.update(label=queue_badge(self.queues.queue(_session(request))))

    def queue_action(self, action: str, position=None, request: gr.Request = None):
        """up / down / remove the job at `position`, pause / resume, clear (finished jobs); returns the rows."""
        session = _session(request)
        queue = self.queues.queue(session)
        try:
            if action in ("up", "down", "remove"):
                job_id = job_id_at(queue, position)
                if action == "remove":
                    queue.remove(job_id)
                else:
                    queue.move(job_id, -1 if action == "up" else 1)
            elif action in ("pause", "resume"):
                queue.set_paused(action == "pause")
                if action == "resume":
                    self.queues.start(session)
            elif action == "clear":
                queue.clear()
        except ValueError as error:
            raise gr.Error(reply(error), print_exception=False) from None
        return self.rows(queue)

    def _queue_export(self, queue) -> str:
        """The queue as a file for the Export button, written again only when the queue changed."""
        path = queue.path.parent / QUEUE_EXPORT
        state = hash(json.dumps([[asdict(job) for job in queue.jobs], queue.paused]))
        if self._exported.get(path) != state or not path.is_file():
            queue.export(path)
            self._exported[path] = state
        return str(path)

    def import_queue(self, sent, request: gr.Request = None):
        """Append the jobs of an exported queue file (local mode: a hosted queue ends with its server)."""
        session = _session(request)
        queue = self.queues.queue(session)
        try:
            if self.menu.hosted:
                raise ValueError("importing a queue is for a studio of your own; on this hosted studio add jobs one by one")
            queue.merge(self.client_file(sent, request, "queue file"), inputs_within=queue.path.parent / INPUTS_FOLDER)
        except (*USER_ERRORS, OSError) as error:
            raise gr.Error(reply(error), print_exception=False) from None
        self.queues.start(session)
        return self.rows(queue)

    # --- helpers behind the other controls ----------------------------------------------------

    def stop(self, request: gr.Request = None) -> str:
        """`/stop`: the caller's running generation ends after its current step and keeps its finished units."""
        if self.stops.stop(_session(request)):
            return STOPPING
        return "Nothing is generating."



def _upload_path(payload):
    """The local path of an uploaded file as the handler receives it: a path, a FileData dict, or a video
    payload {"video": FileData}; None when there is none."""
    if isinstance(payload, dict):
        payload = payload.get("video", payload)
        payload = payload.get("path") if isinstance(payload, dict) else payload
    if payload is not None and not isinstance(payload, str):
        raise ValueError(f"the upload must be a file; got {type(payload).__name__}")
    return payload


def storyboard_of(table) -> Storyboard:
    """The segment table's filled rows [seconds, prompt] as a Storyboard; None when no row is filled."""
    rows = table.get("data", []) if isinstance(table, dict) else table
    if rows is not None and not (isinstance(rows, list) and all(isinstance(row, list) for row in rows)):
        raise ValueError("the storyboard must be a table of rows [seconds, prompt]")
    filled = [row for row in (rows or []) if any(str(cell if cell is not None else "").strip() for cell in row)]
    if not filled:
        return None
    pairs = []
    for number, row in enumerate(filled, start=1):
        try:
            seconds, text = float(row[0]), row[1]
        except (TypeError, ValueError, IndexError):
            raise ValueError(f"storyboard row {number} needs its seconds as a number and a prompt") from None
        pairs.append((seconds, limits.prompt(text if text is not None else "", f"the prompt of storyboard row {number}")))
    return Storyboard.coerce(pairs)


@functools.lru_cache(maxsize=1024)
def _saved_settings(path: str):
    """The settings a finished queued job's output carries (None: unreadable or gone); read once per file."""
    try:
        return gallery.saved_settings(path)
    except (ValueError, OSError):
        return None


def _output_summary(path: str) -> str:
    """What a finished queued job made, as its gallery caption says it, and where it is."""
    settings = _saved_settings(path)
    return f"{gallery.details(settings)} · in this session's outputs" if settings else Path(path).name


def output_thumbnails(path: str) -> list:
    """The frame strip of an output file: its frames (or image) scaled down to thumbnails as they are decoded."""
    cover = (THUMBNAIL_SIDE, THUMBNAIL_SIDE)
    frames = read_image(path, cover=cover)[None] if path.endswith(".png") else read_video(path, cover=cover)[0]
    return _thumbnails(frames)


def _failure_sentence(error: Exception, mode: str) -> str:
    """What the person is told when a generation fails: the sentence of an error they caused, else (a fault of the
    app, logged in full) its kind and first words."""
    if isinstance(error, torch.OutOfMemoryError):
        return OUT_OF_MEMORY
    if isinstance(error, (*USER_ERRORS, OSError)):
        return reply(error)
    LOG.exception("%s failed", mode)
    return f"The generation failed ({type(error).__name__}: {reply(error)}); the server log has the details."


def _session(request) -> str:
    return getattr(request, "session_hash", None) or "local"


def client_address(request) -> str:
    """The caller's network address: on a Space the hop its proxy appended to X-Forwarded-For (the last one; a
    client can forge the earlier ones), else the connection's own."""
    forwarded = getattr(request, "headers", {}).get("x-forwarded-for", "") if os.environ.get("SPACE_ID") else ""
    if forwarded.strip():
        return forwarded.split(",")[-1].strip()
    client = getattr(request, "client", None)
    return getattr(client, "host", None) or "local"


def _read_upload(mode, upload, spec, budget):
    """The image or clip of `mode`, decoded no larger than what covers the variant's size (None: text modes)."""
    if mode not in MISSING_UPLOAD:
        return None
    if not upload:
        raise ValueError(MISSING_UPLOAD[mode])
    return decoded_upload(mode, upload, spec, budget)


def _generation_options(mode, controls, num_frames, spec, seeded: bool = True, storyboard=None,
                        long_video: bool = False) -> GenerationOptions:
    """Sampling options from the controls, each checked, and the length (a storyboard's, when given: its seconds set
    it and no num_frames is passed on) checked against the model's limits. A storyboard may run to the long-video
    length where `long_video` (local mode); the slider, and every length in hosted mode, stops at the published one."""
    extension = mode == "extend_video"
    if storyboard is not None:
        num_frames = storyboard_frames(storyboard, spec, extension, long_video)
    steps = {name: tuple(NUMBER_CHECKS[gallery.step_control(name, stage)](controls[gallery.step_control(name, stage)])
                         for stage in range(STAGE_COUNT)) for name in STEP_NAMES}
    guidance = {name: NUMBER_CHECKS[name](controls[name]) for name in GUIDANCE_NAMES}
    if mode != "text_to_image" and storyboard is None:
        num_frames = checked_frames(num_frames, spec, extension)
    negative = limits.prompt(controls["negative_prompt"], "the negative prompt")
    options = GenerationOptions(negative_prompt=negative or None,
                                num_frames=None if mode == "text_to_image" or storyboard is not None else num_frames,
                                seed=limits.seed(controls["seed"]), **guidance, **steps, **limits.cache_controls(controls))
    return options.seeded() if seeded else options


def checked_frames(value, spec, extension: bool) -> int:
    """A slider-free length check: `value` frames (new frames for an extension) must be one the model makes."""
    low, high, step = length_limits(spec, extension)
    return limits.frame_count(value, low, high, step, what="new frames" if extension else "num_frames")


def storyboard_frames(storyboard: Storyboard, spec, extension: bool, long_video: bool) -> int:
    """The frames a storyboard's seconds make, within the long-video length where `long_video` (local mode), else
    within the published one."""
    low, high, step = length_limits(spec, extension, long_video=long_video)
    num_frames = storyboard.num_frames(spec.fps, spec.frames_per_latent, continues=extension)
    if num_frames > high:
        where = "in the studio" if long_video else "on this hosted studio"
        raise ValueError(f"the storyboard lasts {storyboard.seconds:g} s ({num_frames} frames); this model makes at "
                         f"most {high} frames ({high / spec.fps:.1f} s) {where}: shorten its segments")
    return limits.frame_count(num_frames, low, high, step, what="new frames" if extension else "num_frames")


def lora_weight(weight) -> float:
    """The LoRA weight from 0 to LORA_WEIGHT_MAX (None: 1)."""
    weight = 1.0 if weight is None else weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= LORA_WEIGHT_MAX:
        raise ValueError(f"the LoRA weight must be a number from 0 to {LORA_WEIGHT_MAX:g}; got {limits.shown(weight)}")
    return float(weight)


NUMBER_CHECKS = {  # number control -> the check the endpoints apply to it (a ValueError with the API's sentence)
    "seed": limits.seed,
    **{name: functools.partial(limits.guidance, name=name) for name in GUIDANCE_NAMES},
    **{gallery.step_control(name, stage): functools.partial(limits.whole, name=f"{name} (stage {stage + 1})",
                                                            low=limits.STEPS_RANGE[0], high=limits.STEPS_RANGE[1])
       for name in STEP_NAMES for stage in range(STAGE_COUNT)},
    IMAGE_GUIDANCE: functools.partial(limits.guidance, name="video_guidance_scale"),
    "cache_threshold": lambda value: limits.cache_controls({"cache_threshold": value})["cache_threshold"],
    "lora_weight": lora_weight,
}


def refusal(check, *arguments) -> str:
    """The sentence `check(*arguments)` refuses with, as a client is told it; empty when it passes."""
    try:
        check(*arguments)
    except ValueError as error:
        return reply(error)
    return ""


def _running_text(stop, progress) -> str:
    """The status line while a generation runs: where it is, and that it is stopping once Stop was pressed."""
    where = "" if progress is None else f" ({progress_text(progress)})"
    return f"{STOPPING}{where}" if stop.is_set() else f"Generating…{where}"


def _thumbnails(frames: np.ndarray) -> list:
    height, width = frames.shape[1:3]
    scale = THUMBNAIL_SIDE / max(height, width)
    if scale >= 1:
        return list(frames)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return [np.asarray(Image.fromarray(frame).resize(size, Image.BILINEAR)) for frame in frames]


def _output_name(mode: str, result) -> str:
    suffix = ".png" if mode == "text_to_image" else ".mp4"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{mode.replace('_', '-')}-{secrets.token_hex(3)}{suffix}"


def _finished_text(result, out: Path, started: float) -> str:
    frames = len(result.frames[0])
    length = ("1 image" if out.suffix == ".png" else
              f"{frames} frame{'s' if frames > 1 else ''} ({frames / result.fps:.1f} s at {result.fps} fps)")
    seconds = time.monotonic() - started
    if result.interrupted:
        return f"Stopped: kept {length} in `{out.name}` ({seconds:.1f} s)."
    return f"Saved `{out.name}`: {length}, seed {result.settings['seed']}, in {seconds:.1f} s."
