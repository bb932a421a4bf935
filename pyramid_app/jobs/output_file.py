"""One generation's output file, written while the model works: a video's finished units go into the mp4 as they
are decoded, so a stop keeps what was made without a final decode of the whole clip."""
from pathlib import Path

from model_core.media_files import VideoWriter, sweep_partials, write_image, write_video


def sweep_leftovers(folders) -> list:
    """Remove what writers killed mid-write (kill -9, power loss) left in `folders`: only the hidden staged files
    `.<name>.<8 characters>.partial<suffix>` that no live writer holds (`media_files.sweep_partials`), never other
    files. Called when the CLI or the studio starts, so litter goes before the next write there. Returns the paths."""
    return [path for folder in dict.fromkeys(map(Path, folders)) for path in sweep_partials(folder)]


def save(result, out: Path) -> Path:
    """Write a whole result with its settings: a .png holds its first frame, an .mp4 every frame."""
    if out.suffix.lower() == ".png":
        return write_image(result.frames[0][0], out, result.settings)
    return write_video(result.frames[0], out, result.fps, result.settings)


class OutputFile:
    """The output at `path`: an .mp4 is streamed (give the pipeline `**pipeline_options`, i.e. `stream_to=self`),
    a .png is written whole by `save`. Nothing appears at `path` before `save`; leaving the `with` block without
    saving removes whatever was encoded. With `keep=False` (ranks other than 0) nothing is written, frames are only
    counted."""

    def __init__(self, path, fps: int, keep: bool = True):
        self.path, self.fps, self.keep = Path(path), fps, keep
        self.streamed = self.path.suffix.lower() == ".mp4"
        self.frames_written = 0
        self._writer = None

    @property
    def pipeline_options(self) -> dict:
        return {"stream_to": self} if self.streamed else {}

    def write(self, frames) -> None:
        """The pipeline's `stream_to`: encode `uint8 [T, H, W, 3]` frames; the first ones set the video's size."""
        if self.keep:
            if self._writer is None:
                self._writer = VideoWriter(self.path, self.fps, frames.shape[-2], frames.shape[-3])
            self._writer.write(frames)
        self.frames_written += len(frames)

    def save(self, result) -> int:
        """Finish the file with the result's settings; returns how many frames it holds (0: nothing was saved)."""
        if not self.streamed:
            if self.keep and len(result.frames[0]):
                save(result, self.path)
            return len(result.frames[0])
        if self._writer is not None and self.frames_written:
            self._writer.close(result.settings)
        return self.frames_written

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        if self._writer is not None:
            self._writer.abort()  # after `save` there is nothing left to remove
