"""Uploaded images and clips: admitted only when Gradio received them, sized up from their headers, then decoded at
the model's size within one memory budget shared by every request.

A client names a file by its path, so the path alone proves nothing: a file is opened only if Gradio's upload route
wrote it (its folder is the hash of its bytes, so only someone holding the same bytes can name it) or it is one of
the calling session's outputs. Every other path gets the same sentence, whether it exists or not.
"""
import contextlib
import math
import threading
from pathlib import Path

from model_core.media_files import cover_size, probe_image, probe_video, read_image, read_video

from ..options import limits

NOT_RECEIVED = ("the {what} must be a file uploaded to this studio (the upload box, or gradio_client's "
                "handle_file) or one of this session's outputs")
LOCAL_DECODE_BYTES = 2 << 30  # decoded pixels held at once by all requests together: a studio of one's own
HOSTED_DECODE_BYTES = 256 << 20  # the same on a hosted studio (a 768p clip: up to 91 frames)
DECODE_WAIT_SECONDS = 30.0  # how long a decode waits for its share of the budget before it is refused


class ReceivedFiles:
    """Which paths a client may name: files Gradio received as uploads (`received`: sets of paths, Gradio's upload
    set and the caches it moves an input's upload into) and the outputs of the caller's session
    (`session_folder(session)`)."""

    def __init__(self, received: list, session_folder):
        self.received = received
        self.session_folder = session_folder

    def admit(self, path: str, session: str, what: str) -> str:
        """`path` if the caller may open it, else the one sentence NOT_RECEIVED."""
        if any(path in paths for paths in self.received):
            return path
        folder = self.session_folder(session).resolve()
        resolved = Path(path).resolve()
        if resolved.is_relative_to(folder) and resolved.is_file() and not Path(path).is_symlink():
            return str(resolved)
        raise ValueError(NOT_RECEIVED.format(what=what))


class DecodeBudget:
    """Bytes of decoded pixels that may be held at once; a decode takes its share or waits for it."""

    def __init__(self, total: int, wait: float = DECODE_WAIT_SECONDS):
        self.total, self.wait = total, wait
        self.free = total
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, size: int, what: str):
        """Hold `size` bytes of the budget for the block's duration; refused at once beyond the whole budget, and
        after `wait` seconds when the others hold too much."""
        if size > self.total:
            raise ValueError(f"the {what} would take {size / 2**20:.0f} MiB once decoded at the model's size; "
                             f"at most {self.total / 2**20:.0f} MiB are allowed: send a shorter or smaller one")
        with self._changed:
            if not self._changed.wait_for(lambda: self.free >= size, timeout=self.wait):
                raise ValueError("the server is decoding other uploads right now; try again in a minute")
            self.free -= size
        try:
            yield
        finally:
            with self._changed:
                self.free += size
                self._changed.notify_all()


def image_frames(path, size, budget: DecodeBudget):
    """The upload as uint8 [H, W, 3], no larger than what covers `size` (height, width; None: its own size); refused beyond the image
    cap before decoding."""
    width, height = probe_image(path)
    limits.image_upload((width, height), path)
    with budget.reserve(width * height * 4, "image"):  # decoded once at its own size (RGBA at most), then reduced
        return read_image(path, max_pixels=limits.IMAGE_MAX_PIXELS, cover=size)


def video_frames(path, size, budget: DecodeBudget):
    """The upload as uint8 [T, H, W, 3] at the size that covers `size` (height, width), each frame scaled as it is
    decoded; refused beyond the clip caps and the decode budget before decoding (and while decoding, should the
    header understate)."""
    info = probe_video(path)
    limits.video_upload(info, path)
    frame_pixels = info.width * info.height if size is None else max(
        math.prod(cover_size(info.height, info.width, *size)), math.prod(cover_size(info.width, info.height, *size)))
    with budget.reserve(limits.VIDEO_MAX_FRAMES * frame_pixels * 3, "clip"):
        return read_video(path, max_frames=limits.VIDEO_MAX_FRAMES, max_pixels=limits.VIDEO_MAX_PIXELS, cover=size)[0]


def header_check(mode: str, path) -> None:
    """The caps of an image (image_to_video) or clip (extend_video) from its header alone (a queued job's input)."""
    if mode == "image_to_video":
        limits.image_upload(probe_image(path), path)
    else:
        limits.video_upload(probe_video(path), path)


def decoded_upload(mode: str, path, spec, budget: DecodeBudget):
    """The image (image_to_video) or clip (extend_video) at `path`, decoded no larger than what covers the size of
    `spec` (a VariantSpec; None: its own size) within `budget`."""
    size = None if spec is None else (spec.height, spec.width)
    return image_frames(path, size, budget) if mode == "image_to_video" else video_frames(path, size, budget)
