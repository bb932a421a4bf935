"""Media files: read and write H.264 mp4 and images, with the generation settings embedded.

Frames are `uint8 [T, H, W, 3]` RGB. Videos go through PyAV (FFmpeg's libraries, no subprocess),
images through Pillow. Readers look at the headers first, so a size or length cap refuses a file
before any frame is decoded. The settings travel three ways that all read back identically: the
mp4 `comment` tag, the PNG `Comment` text chunk, and a JSON sidecar next to the media file.

Every file is written to a hidden staging sibling `.<name>.<8 characters>.partial<suffix>` that the
writer holds (`model_core.file_lock`: an exclusive `flock` where there is one), then renamed into place.
A writer killed mid-write leaves the staged file unheld; `sweep_partials` (run by the first write into each
folder of a process, and by the app on start) removes such files and leaves those a live writer still holds.
"""
import errno
import json
import math
import os
import re
import secrets
import warnings
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import av
import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from .file_lock import hold, remove_unless_held, replace_held
from .media_size import cover_size

METADATA_KEY = "comment"
PNG_METADATA_KEY = "Comment"
VIDEO_KINDS = "a video ffmpeg can decode (mp4, webm, mov, mkv, gif)"
IMAGE_KINDS = "an image file (png, jpeg, webp, bmp)"
STAGED_NAME = re.compile(r"^\..+\.\w{8}\.partial(\.\w+)?$")
SCALING = "BICUBIC"  # swscale's filter for RGB <-> yuv420p, as the ffmpeg command line uses
# x264 held to its AVX2 kernels: with its AVX-512 ones (PyAV 18.1's build) the same frames encode to different
# pictures from run to run, up to 45/255 apart beside a generation, so one seed did not give one video; see
# `_encoder_options`.
X264_WITHOUT_AVX512 = {"x264-params": "asm=SSE2Fast,AVX2"}
_swept_folders = set()


class VideoInfo(NamedTuple):
    """What a video's headers say. `num_frames` is the stream's frame count when the container
    stores one (mp4, mov), else estimated as round(duration x fps) (webm, mkv, some gifs).
    `width` and `height` are the coded size: `read_video` turns a video with a display rotation
    of a quarter turn (phone videos) upright, so its frames are `height` wide and `width` high."""

    width: int
    height: int
    num_frames: int
    fps: float
    duration: float


def sidecar_path(path) -> Path:
    return Path(path).with_suffix(".json")


def probe_video(path) -> VideoInfo:
    """Size, length, frame rate and duration from the container and stream headers; decodes no frame."""
    with _opened_video(path) as (container, stream):
        return _video_info(path, container, stream)


def read_video(path, max_frames=None, max_pixels=None, cover=None) -> tuple:
    """Decode frame by frame into one `uint8 [T, H, W, 3]` RGB array sized from the header; returns (frames, fps).

    A video with more than `max_frames` frames or more than `max_pixels` pixels per frame is refused with a
    ValueError before any frame is decoded (and again while decoding, should the header understate). Frames
    come out upright: a display rotation (phone videos) is applied as ffmpeg's autorotate does. With
    `cover=(height, width)` each frame is scaled down as it is decoded to the smallest size covering that
    (`model_core.media_size.cover_size`), so a large clip is never held at its own size.
    """
    with _opened_video(path) as (container, stream):
        info = _video_info(path, container, stream)
        _refuse_oversized(f"video {path}", info.width, info.height, max_pixels)
        if max_frames is not None and info.num_frames > max_frames:
            raise ValueError(f"video {path} has {info.num_frames} frames; at most {max_frames} are allowed")
        stream.thread_type = "AUTO"
        frames, extra = None, []  # extra: frames beyond an estimated count
        count = 0
        try:
            for frame in container.decode(stream):
                if max_frames is not None and count == max_frames:
                    raise ValueError(f"video {path} has more than {max_frames} frames; at most {max_frames} are allowed")
                height, width = _decoded_size(info, frame.rotation, cover)
                pixels = _upright(frame.to_ndarray(format="rgb24", width=width, height=height,
                                                   interpolation=SCALING), frame.rotation)
                if frames is None:
                    frames = np.empty((info.num_frames, *pixels.shape), np.uint8)  # filled in place
                if count < len(frames):
                    frames[count] = pixels
                else:
                    extra.append(pixels)
                count += 1
        except av.FFmpegError as error:
            raise ValueError(f"cannot read video {path}: it is damaged or not {VIDEO_KINDS}") from error
        if not count:
            raise ValueError(f"cannot read video {path}: it holds no decodable frame; expected {VIDEO_KINDS}")
        if count < stream.frames:
            raise ValueError(f"cannot read video {path}: only {count} of the {stream.frames} frames its header "
                             "lists could be decoded; it is truncated or damaged")
        return (np.concatenate([frames, np.stack(extra)]) if extra else frames[:count]), info.fps


def probe_image(path) -> tuple:
    """(width, height) from the image header; decodes no pixel. Refuses decompression bombs."""
    with _opened_image(path) as image:
        return image.size


def read_image(path, max_pixels=None, cover=None) -> np.ndarray:
    """Load an image as `uint8 [H, W, 3]` RGB: alpha dropped, greyscale and palettes expanded.

    An image with more than `max_pixels` pixels is refused with a ValueError before it is decoded. With
    `cover=(height, width)` it is scaled down to the smallest size covering that (JPEGs already while decoding).
    """
    with _opened_image(path) as image:
        _refuse_oversized(f"image {path}", *image.size, max_pixels)
        try:
            if cover is None:
                return np.asarray(image.convert("RGB")).copy()
            image.draft("RGB", cover[::-1])  # JPEG: decode at a power-of-two reduction still covering `cover`
            height, width = cover_size(image.height, image.width, *cover)
            return np.array(image.convert("RGB").resize((width, height), Image.BICUBIC, reducing_gap=2.0))
        except (OSError, SyntaxError, ValueError) as error:
            raise ValueError(f"cannot read image {path}: it is damaged or not {IMAGE_KINDS}") from error


def write_video(frames: np.ndarray, path, fps, metadata: dict) -> Path:
    """Encode browser-playable H.264 (yuv420p, faststart) with `metadata` as JSON in the mp4 and a sidecar."""
    frames = _checked_frames(frames)
    _metadata_text(metadata)
    with VideoWriter(path, fps, width=frames.shape[2], height=frames.shape[1]) as writer:
        writer.write(frames)
        return writer.close(metadata)


def write_image(frame: np.ndarray, path, metadata: dict) -> Path:
    """Save one `uint8 [H, W, 3]` frame as PNG with `metadata` in a text chunk and a sidecar."""
    frame = _checked_frames(frame[None] if isinstance(frame, np.ndarray) else frame)[0]
    path = Path(path)
    text = _metadata_text(metadata)
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_METADATA_KEY, text)
    with _disk_full_said(path), _staged(path) as image, _staged(sidecar_path(path)) as sidecar:
        Image.fromarray(frame).save(image, format="PNG", pnginfo=info)
        sidecar.write_text(text)
    return path


def read_metadata(path) -> dict:
    """The settings embedded in an mp4 or PNG written here, else those in its JSON sidecar."""
    path = _existing(path)
    text = _embedded_metadata_text(path)
    if text is None and sidecar_path(path).is_file():
        text = sidecar_path(path).read_text()
    if text is None:
        raise ValueError(f"{path} carries no generation settings and has no sidecar {sidecar_path(path).name}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"the generation settings stored with {path} are not valid JSON") from error


def sweep_partials(folder) -> list:
    """Remove the staged files (`.<name>.<8 characters>.partial<suffix>`) in `folder` that no live
    writer holds: litter of a process killed mid-write. Returns the removed paths."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [Path(entry.path) for entry in os.scandir(folder)
            if STAGED_NAME.match(entry.name) and entry.is_file(follow_symlinks=False)
            and remove_unless_held(Path(entry.path))]


class VideoWriter:
    """Stream frames into a browser-playable H.264 mp4 at `path`, finished atomically by `close(metadata)`.

    Frames are encoded as they arrive (`write` takes `[T, H, W, 3]` or one `[H, W, 3]` frame), so a
    long video never sits in memory. Nothing appears at `path` until `close`; leaving a `with` block
    by an exception (or calling `abort`) removes everything written. Leaving it normally without
    `close` finishes with empty settings.
    """

    def __init__(self, path, fps, width: int, height: int):
        self.path = Path(path)
        self.fps = _checked_fps(fps)
        if not all(isinstance(n, (int, np.integer)) and n > 0 for n in (width, height)):
            raise ValueError(f"width and height must be positive whole numbers of pixels; got {width}x{height}")
        self.width, self.height = int(width), int(height)
        self.frames_written = 0
        self._encoded = _Staged(self.path)
        try:
            with _disk_full_said(self.path):
                self._container = av.open(str(self._encoded.path), "w", format="mp4")
            self._stream = self._container.add_stream("libx264", rate=self.fps, options=_encoder_options())
            self._stream.width, self._stream.height = self.width + self.width % 2, self.height + self.height % 2
            self._stream.pix_fmt = "yuv420p"
            self._stream.codec_context.thread_type = "AUTO"  # x264's frame threads, as the ffmpeg command line uses
        except BaseException:
            self._encoded.discard()
            raise

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        if kind is not None:
            self.abort()
        elif self._encoded is not None:
            self.close({})

    def write(self, frames: np.ndarray) -> None:
        """Encode `uint8 [T, H, W, 3]` frames (or one `[H, W, 3]` frame) of the writer's size."""
        if self._encoded is None:
            raise ValueError(f"the writer of {self.path} is closed; open a new VideoWriter to write more frames")
        if isinstance(frames, np.ndarray) and frames.ndim == 3:
            frames = frames[None]
        frames = _checked_frames(frames)
        if frames.shape[1:3] != (self.height, self.width):
            raise ValueError(f"frames are {frames.shape[2]}x{frames.shape[1]} but this writer of {self.path.name} "
                             f"takes {self.width}x{self.height} (width x height)")
        with _disk_full_said(self.path):
            for frame in _even_sized(frames):
                picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
                picture = picture.reformat(format="yuv420p", interpolation=SCALING)
                picture.pts = self.frames_written
                self._container.mux(self._stream.encode(picture))
                self.frames_written += 1

    def close(self, metadata: dict) -> Path:
        """Finish the mp4 with `metadata` in its `comment` tag and a JSON sidecar; returns the path.

        Invalid settings raise a ValueError and leave the writer open, so `close` can be called again."""
        text = _metadata_text(metadata)
        if self._encoded is None:
            raise ValueError(f"the writer of {self.path} is already closed")
        if not self.frames_written:
            raise ValueError(f"no frames were written to {self.path}; write at least one frame before close")
        try:
            with _disk_full_said(self.path):
                self._container.mux(self._stream.encode())
                self._container.close()
                with _staged(self.path) as media, _staged(sidecar_path(self.path)) as sidecar:
                    _remux_with_comment(self._encoded.path, media, text)
                    if _embedded_metadata_text(media) != text:
                        raise OSError(f"could not write {self.path}: the settings did not read back from the mp4")
                    sidecar.write_text(text)
        finally:
            self.abort()
        return self.path

    def abort(self) -> None:
        """Stop writing and remove everything written so far; nothing is left at the path."""
        if self._encoded is None:
            return
        try:
            self._container.close()
        except av.FFmpegError:
            pass  # a failed trailer is moot: the staged file is removed next
        finally:
            self._encoded.discard()
            self._encoded = None


@contextmanager
def _opened_video(path):
    path = _existing(path)
    try:
        container = av.open(str(path), metadata_errors="replace")
    except av.FFmpegError as error:
        raise ValueError(f"cannot read video {path}: expected {VIDEO_KINDS}") from error
    with container:
        if not container.streams.video:
            raise ValueError(f"cannot read video {path}: it has no video stream; expected {VIDEO_KINDS}")
        yield container, container.streams.video[0]


def _video_info(path, container, stream) -> VideoInfo:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not (stream.width and stream.height and rate):
        raise ValueError(f"cannot read video {path}: its headers give no frame size or frame rate; "
                         f"expected {VIDEO_KINDS}")
    if stream.duration and stream.time_base:
        duration = float(stream.duration * stream.time_base)
    else:
        duration = (container.duration or 0) / av.time_base
    num_frames = stream.frames or round(duration * rate)
    return VideoInfo(stream.width, stream.height, int(num_frames), float(rate), duration)


@contextmanager
def _opened_image(path):
    path = _existing(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ValueError(f"image {path} is too large to open safely ({error}); "
                         f"at most {Image.MAX_IMAGE_PIXELS} pixels are allowed") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"cannot read image {path}: expected {IMAGE_KINDS}") from error
    with image:
        yield image


def _decoded_size(info: VideoInfo, rotation, cover) -> tuple:
    """(height, width) to decode a frame at (before it is turned upright): its own, or scaled to cover `cover`."""
    if cover is None:
        return info.height, info.width
    quarter_turn = round(rotation / 90) % 2 if rotation else 0
    if quarter_turn:
        width, height = cover_size(info.width, info.height, *cover)
        return height, width
    return cover_size(info.height, info.width, *cover)


def _upright(pixels: np.ndarray, rotation) -> np.ndarray:
    """Turn a decoded frame by its display rotation (degrees counter-clockwise) in quarter turns."""
    return np.rot90(pixels, k=round(rotation / 90)) if rotation else pixels


def _refuse_oversized(what: str, width: int, height: int, max_pixels) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise ValueError(f"{what} is {width}x{height} ({width * height} pixels per frame); "
                         f"at most {max_pixels} pixels are allowed")


def _checked_frames(frames) -> np.ndarray:
    if not (isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and frames.ndim == 4
            and frames.shape[0] > 0 and frames.shape[-1] == 3):
        raise ValueError("frames must be a uint8 array shaped [T, H, W, 3] with at least one frame")
    return frames


def _checked_fps(fps) -> Fraction:
    if isinstance(fps, bool) or not isinstance(fps, (int, float, Fraction, np.number)) \
            or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive finite number of frames per second; got {fps!r}")
    return Fraction(float(fps)).limit_denominator(1001)


def _encoder_options() -> dict:
    """x264's options: on a CPU with AVX-512 its AVX2 kernels, which encode the same frames to the same bytes run
    after run; elsewhere x264's own choice of kernels."""
    return dict(X264_WITHOUT_AVX512) if _cpu_has_avx512() else {}


def _cpu_has_avx512() -> bool:
    """Whether the CPU and OS offer AVX-512 F, CD, BW, DQ and VL (what x264 asks before it uses AVX-512; every such
    CPU also has the AVX2 and BMI2 its AVX2 kernels need), as numpy's runtime detection (`numpy.show_runtime()`)
    found them."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # numpy 1.x
        from numpy.core._multiarray_umath import __cpu_features__
    return bool(__cpu_features__.get("AVX512_SKX"))


def _even_sized(frames: np.ndarray) -> np.ndarray:
    """yuv420p stores colour at half resolution, so odd sizes gain one repeated edge row/column."""
    _, height, width, _ = frames.shape
    return np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")


def _remux_with_comment(source: Path, target: Path, comment: str) -> None:
    """Copy the encoded stream into a faststart mp4 (index first: playable while downloading) tagged with `comment`."""
    with av.open(str(source)) as encoded, \
            av.open(str(target), "w", format="mp4", options={"movflags": "+faststart"}) as finished:
        finished.metadata[METADATA_KEY] = comment
        stream = encoded.streams.video[0]
        copy = finished.add_stream_from_template(stream)
        for packet in encoded.demux(stream):
            if packet.dts is not None:  # the demuxer ends with an empty flush packet
                packet.stream = copy
                finished.mux(packet)


def _metadata_text(metadata: dict) -> str:
    """The settings as JSON; NaN and infinity are refused, since they would not be valid JSON."""
    try:
        return json.dumps(metadata, sort_keys=True, allow_nan=False)
    except ValueError as error:
        raise ValueError(f"the settings to store hold a number that is not finite ({_non_finite(metadata)}); "
                         "settings must be valid JSON, so every number must be finite") from error
    except TypeError as error:
        raise ValueError(f"the settings to store must be JSON values (text, numbers, lists, dicts): {error}") from error


def _non_finite(value, where="settings") -> str:
    """Where in `value` the first NaN or infinity sits, e.g. `settings['guidance_scale'] = nan`."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where} = {value}"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        found = _non_finite(item, f"{where}[{key!r}]")
        if found:
            return found
    return ""


def _embedded_metadata_text(path: Path):
    if path.suffix.lower() == ".png":
        with _opened_image(path) as image:
            return image.info.get(PNG_METADATA_KEY)
    try:
        with av.open(str(path), metadata_errors="replace") as container:
            return container.metadata.get(METADATA_KEY)
    except av.FFmpegError:
        return None


def _existing(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    return path


@contextmanager
def _disk_full_said(path):
    """Report a full disk (or quota) as one sentence naming the file being written."""
    try:
        yield
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        said = OSError(f"disk full while writing {path}")
        said.errno = errno.ENOSPC
        raise said from error


class _Staged:
    """A hidden sibling of `target` that this writer holds: renamed onto it by `commit`, removed by `discard`."""

    def __init__(self, target: Path):
        self.target = Path(target)
        folder = self.target.parent
        with _disk_full_said(self.target):
            folder.mkdir(parents=True, exist_ok=True)
            if folder.resolve() not in _swept_folders:
                sweep_partials(folder)
                _swept_folders.add(folder.resolve())
            while True:
                self.path = folder / f".{self.target.name}.{secrets.token_hex(4)}.partial{self.target.suffix}"
                self._handle = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                hold(self._handle)
                if _same_file(self.path, self._handle):
                    break  # else a sweep removed it between creation and locking: take another name
                os.close(self._handle)

    def commit(self) -> None:
        replace_held(self._handle, self.path, self.target)
        self._handle = None

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        self._release()

    def _release(self) -> None:
        if self._handle is not None:
            os.close(self._handle)
            self._handle = None


@contextmanager
def _staged(path: Path):
    """Yield a staging path for `path`; rename it into place only if the block succeeds."""
    staged = _Staged(path)
    try:
        yield staged.path
    except BaseException:
        staged.discard()
        raise
    staged.commit()


def _same_file(path: Path, handle: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(handle).st_ino
    except FileNotFoundError:
        return False
