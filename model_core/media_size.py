"""The size a frame is scaled to before a centre crop: shared by the pipeline's pixels (model_core.media) and the
media files' readers (model_core.media_files), and light enough for either to import."""


def cover_size(frame_height: int, frame_width: int, height: int, width: int, shrink_only: bool = True) -> tuple:
    """(height, width) of a frame scaled, aspect kept, to the smallest size covering `height` x `width`: the size
    `to_video_tensor` resizes to before its centre crop. `shrink_only`: a frame already smaller keeps its size."""
    scale = max(height / frame_height, width / frame_width)
    if shrink_only and scale >= 1:
        return frame_height, frame_width
    return max(height, round(frame_height * scale)), max(width, round(frame_width * scale))
