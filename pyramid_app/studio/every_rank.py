"""The studio started by torchrun: rank 0 serves the browser and every rank computes each generation.

Rank 0 sends every model load and generation request to the other ranks over a gloo control group (whose
timeout is long: they may wait a long time for the next request), then runs it itself; the others run the
same call, whose collectives split the work. Stop is rank 0's, and the pipeline hands it to every rank after
each unit. An input error is met by every rank alike: rank 0 shows it and the others wait for the next
request. Any other failure ends the failing rank's process, and torchrun then ends the others, so no rank
is left waiting in a collective.
"""
import os
import sys
import threading
from contextlib import suppress
from datetime import timedelta

import torch.distributed as dist

from ..jobs import ranks
from ..options.errors import USER_ERRORS
from .sessions import PipelineCache

CONTROL_TIMEOUT = timedelta(days=365)
MODES = ("text_to_video", "image_to_video", "extend_video", "text_to_image")
RANK_ZERO_ONLY = ("callback", "interrupt", "previews", "callback_on_step_end", "callback_on_step_end_tensor_inputs")
EXIT_FAILED = 1


class RankChannel:
    """Rank 0's requests to the other ranks, in order."""

    def __init__(self):
        self.group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)

    def send(self, message) -> None:
        dist.broadcast_object_list([message], src=0, group=self.group)

    def receive(self):
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


class MirroredPipelineCache(PipelineCache):
    """Rank 0's pipelines: each load and generation is first sent to the other ranks, one at a time."""

    def __init__(self, channel: RankChannel, parallel="auto"):
        super().__init__(parallel=parallel)
        self.channel = channel
        self.in_step = threading.Lock()  # the ranks' collectives must come in the same order on every rank

    def get(self, model, tqdm_class=None):
        with self.in_step:
            self.channel.send(("load", model))
            return MirroredPipeline(super().get(model, tqdm_class), model, self)


class MirroredPipeline:
    """A loaded pipeline whose generation methods also run on the other ranks."""

    def __init__(self, pipe, model, cache: MirroredPipelineCache):
        self.pipe, self.model, self.cache = pipe, model, cache

    def __getattr__(self, name):
        if name in MODES:
            return lambda *args, **kwargs: self.generate(name, args, kwargs)
        return getattr(self.pipe, name)

    def generate(self, mode, args, kwargs):
        shared = {key: value for key, value in kwargs.items() if key not in RANK_ZERO_ONLY}
        with self.cache.in_step:
            self.cache.channel.send(("generate", self.model, mode, args, shared))
            try:
                return getattr(self.pipe, mode)(*args, **kwargs)
            except USER_ERRORS:
                raise
            except BaseException as error:  # the other ranks may be waiting in a collective: end them all
                print(f"error: rank 0 failed during a generation ({error}); ending every rank", file=sys.stderr,
                      flush=True)
                os._exit(EXIT_FAILED)


def follow(channel: RankChannel, cache: PipelineCache) -> None:
    """Ranks other than 0: run rank 0's requests until it says quit."""
    while True:
        kind, *payload = channel.receive()
        if kind == "quit":
            return
        if kind == "load":
            with suppress(*USER_ERRORS):  # rank 0 meets the same error and reports it
                cache.get(payload[0])
        else:
            model, mode, args, kwargs = payload
            with suppress(*USER_ERRORS):
                getattr(cache.get(model), mode)(*args, **kwargs)


def serve_on_every_rank(flags, build_studio, launch) -> None:
    """`python app.py` under torchrun: rank 0 launches the studio, the others follow it until it closes."""
    from model_core.memory import resolve_device

    ranks.start(resolve_device(None))
    channel = RankChannel()
    try:
        if ranks.is_main():
            cache = MirroredPipelineCache(channel)
            try:
                launch(build_studio(output_dir=flags.output_dir, models=flags.model, hosted=flags.hosted, pipelines=cache),
                       flags)
            finally:
                channel.send(("quit",))
        else:
            follow(channel, PipelineCache(parallel="auto"))
    finally:
        ranks.stop()
