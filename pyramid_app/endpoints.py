"""The studio's generation endpoints: options from the controls, a pipeline run with live frames, the saved file.

`/text_to_video`, `/image_to_video`, `/extend_video` and `/text_to_image` take the prompt first (after the
image or clip where there is one); every other argument defaults to the control's value in the UI.
"""
import secrets
import threading
import time
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from model_core.media_files import read_image, read_video

from . import gallery
from .catalog import BUNDLED, MISSING_BUNDLED, is_local, source_for
from .cli import USER_ERRORS, save
from model_core.sampling import Progress

from .jobs import Job, PipelineCache, StopSwitches, UnitPreview, progress_text, run_job
from .settings import STAGE_COUNT, GenerationOptions, ModelOptions
from .studio_queue import StudioQueues, job_id_at, queue_rows

THUMBNAIL_SIDE = 160
OUT_OF_MEMORY = ("Out of memory. Open Memory and try offload 'model' or 'sequential', quantization int8/nf4, "
                 "VAE tiling, or fewer frames.")
PROGRESS_INTERVAL = 0.25  # seconds between progress-bar updates; each one is a message the browser renders
NOTHING_FINISHED = "Stopped before the first frame was finished; nothing was saved."
MISSING_UPLOAD = {"image_to_video": "Upload an image to animate first.", "extend_video": "Upload a video clip to extend first."}


class Endpoints:
    """Generation handlers and their state: loaded pipelines, stop switches, where outputs go."""

    def __init__(self, default_model=None, output_dir="outputs", pipelines=None):
        self.default_model = str(default_model) if default_model else BUNDLED
        self.output_dir = Path(output_dir).resolve()
        self.pipelines = pipelines or PipelineCache()
        self.stops = StopSwitches()
        self.device_lock = threading.Lock()  # one generation at a time: Generate or a queued job
        self.queues = StudioQueues(self.output_dir, self.pipelines, self.device_lock, save)

    # --- the four API endpoints ---------------------------------------------------------------

    def text_to_video(self, prompt: str, num_frames: int, history: list, request: gr.Request = None,
                      progress=gr.Progress(track_tqdm=True), **controls):
        yield from self._generate("text_to_video", prompt, None, num_frames, history, controls, request, progress)

    def image_to_video(self, image: str, prompt: str, num_frames: int, history: list, request: gr.Request = None,
                       progress=gr.Progress(track_tqdm=True), **controls):
        yield from self._generate("image_to_video", prompt, image, num_frames, history, controls, request, progress)

    def extend_video(self, video: str, prompt: str, num_frames: int, history: list, request: gr.Request = None,
                     progress=gr.Progress(track_tqdm=True), **controls):
        yield from self._generate("extend_video", prompt, video, num_frames, history, controls, request, progress)

    def text_to_image(self, prompt: str, history: list, request: gr.Request = None,
                      progress=gr.Progress(track_tqdm=True), **controls):
        yield from self._generate("text_to_image", prompt, None, None, history, controls, request, progress)

    def _generate(self, mode, prompt, upload, num_frames, history, controls, request, progress):
        """Yield (result, frames, status, seed used, history): frames as units finish, the saved file last."""
        started = time.monotonic()
        session = _session(request)
        stop = self.stops.start(session)  # Stop works from the moment the request runs, loading included
        try:
            condition = _read_upload(mode, upload)
            model = self._model_options(controls)
            options = _generation_options(controls, num_frames)
            progress(0, desc="loading model (a hub model is downloaded on first use)")
            pipe = self.pipelines.get(model, tqdm_class=tqdm)
            frames, shown = [], float("-inf")
            with self.device_lock:
                for event in run_job(pipe, Job(mode, prompt or "", condition, options), stop):
                    if isinstance(event, UnitPreview):
                        frames = frames + _thumbnails(event.frames)
                        yield gr.skip(), frames, f"Generating… {progress_text(event.progress)}", str(options.seed), gr.skip()
                    elif isinstance(event, Progress):
                        if time.monotonic() - shown >= PROGRESS_INTERVAL:
                            progress(event.fraction, desc=progress_text(event))
                            shown = time.monotonic()
                    else:
                        result = event
            if len(result.frames) == 0:
                yield gr.skip(), [], NOTHING_FINISHED, str(options.seed), gr.skip()
                return
            out = save(result, self.output_dir / _output_name(mode, result))
        except USER_ERRORS as error:
            raise gr.Error(_message(error, upload), print_exception=False) from None
        except torch.OutOfMemoryError:
            raise gr.Error(OUT_OF_MEMORY, print_exception=False) from None
        except OSError as error:
            raise gr.Error(_message(error, upload), print_exception=False) from None
        finally:
            self.stops.finish(session)
        history = gallery.add(history or [], out, result.settings)
        yield str(out), frames or _thumbnails(result.frames), _finished_text(result, out, started), str(options.seed), history

    def _model_options(self, controls) -> ModelOptions:
        if not is_local(BUNDLED) and source_for(controls["model"]) is None:
            raise FileNotFoundError(MISSING_BUNDLED)
        return ModelOptions(model=source_for(controls["model"]), variant=controls["variant"] or "auto",
                            dtype=controls["dtype"], offload=controls["offload"], quantize=controls["quantize"],
                            vae_tiling=bool(controls["vae_tiling"]))

    # --- the queue ----------------------------------------------------------------------------

    def queue_text_to_video(self, prompt: str, num_frames: int, request: gr.Request = None, **controls):
        return self.add_to_queue("text_to_video", prompt, None, num_frames, request, **controls)

    def queue_image_to_video(self, image: str, prompt: str, num_frames: int, request: gr.Request = None, **controls):
        return self.add_to_queue("image_to_video", prompt, image, num_frames, request, **controls)

    def queue_extend_video(self, video: str, prompt: str, num_frames: int, request: gr.Request = None, **controls):
        return self.add_to_queue("extend_video", prompt, video, num_frames, request, **controls)

    def queue_text_to_image(self, prompt: str, request: gr.Request = None, **controls):
        return self.add_to_queue("text_to_image", prompt, None, None, request, **controls)

    def add_to_queue(self, mode: str, prompt: str, upload, num_frames, request: gr.Request = None, **controls):
        """Queue the job the tab's controls describe; returns the queue's rows and a status line."""
        session = _session(request)
        try:
            if mode in MISSING_UPLOAD:
                _read_upload(mode, upload)
            job = self.queues.add(session, mode, prompt, None, upload, _generation_options(controls, num_frames, seeded=False),
                                  self._model_options(controls))
        except (*USER_ERRORS, OSError) as error:
            raise gr.Error(_message(error, upload), print_exception=False) from None
        queue = self.queues.queue(session)
        return queue_rows(queue), f"Queued as #{[j.id for j in queue.jobs].index(job.id) + 1}: {job.text or mode}"

    def queue_view(self, request: gr.Request = None):
        """The rows of the caller's queue and whether it is paused."""
        queue = self.queues.queue(_session(request))
        return queue_rows(queue), queue.paused

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
            raise gr.Error(_message(error), print_exception=False) from None
        return queue_rows(queue)

    def export_queue(self, request: gr.Request = None) -> str:
        queue = self.queues.queue(_session(request))
        return str(queue.export(queue.path.parent / "queue-export.json"))

    def import_queue(self, path, request: gr.Request = None):
        session = _session(request)
        queue = self.queues.queue(session)
        try:
            queue.merge(path)
        except (*USER_ERRORS, OSError) as error:
            raise gr.Error(_message(error, path), print_exception=False) from None
        self.queues.start(session)
        return queue_rows(queue)

    # --- helpers behind the other controls ----------------------------------------------------

    def stop(self, request: gr.Request = None) -> str:
        """`/stop`: the caller's running generation ends after its current step and keeps its finished units."""
        if self.stops.stop(getattr(request, "session_hash", None) or "local"):
            return "Stopping after the current step; the finished frames will be saved."
        return "Nothing is generating."


def _read_upload(mode, upload):
    if mode not in MISSING_UPLOAD:
        return None
    if not upload:
        raise ValueError(MISSING_UPLOAD[mode])
    return read_image(upload) if mode == "image_to_video" else read_video(upload)[0]


def _session(request) -> str:
    return getattr(request, "session_hash", None) or "local"


def _generation_options(controls, num_frames, seeded: bool = True) -> GenerationOptions:
    steps = {name: tuple(int(controls[gallery.step_control(name, stage)]) for stage in range(STAGE_COUNT))
             for name in ("first_frame_steps", "video_steps")}
    options = GenerationOptions(
        negative_prompt=controls["negative_prompt"] or None, num_frames=None if num_frames is None else int(num_frames),
        seed=_seed(controls["seed"]), guidance_scale=float(controls["guidance_scale"]),
        video_guidance_scale=float(controls["video_guidance_scale"]), **steps,
    )
    return options.seeded() if seeded else options


def _seed(text):
    text = str(text if text is not None else "").strip()
    if not text:
        return None
    if not text.isdigit():
        raise ValueError(f"the seed must be a whole number (or empty for a random one); got {text!r}")
    return int(text)


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
    frames = len(result.frames)
    length = f"{frames} frames ({frames / result.fps:.1f} s at {result.fps} fps)" if frames > 1 else "1 image"
    seconds = time.monotonic() - started
    if result.interrupted:
        return f"Stopped: kept {length} in `{out.name}` ({seconds:.1f} s)."
    return f"Saved `{out.name}`: {length}, seed {result.settings['seed']}, in {seconds:.1f} s."


def _message(error: BaseException, upload=None) -> str:
    """The first line of a user error, with the upload folder dropped from the uploaded file's path."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    if upload:
        text = text.replace(str(Path(upload).parent) + "/", "")
    return text[0].upper() + text[1:]
