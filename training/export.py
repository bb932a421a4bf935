"""Export a sharded (FSDP) training checkpoint as the app-facing weights of a release.

`python -m training.export CHECKPOINT --out DIR` writes the layout the studio, the CLI and `from_pretrained` load
(with the EMA variant when the run kept one). The folder is self-contained: the VAE and text folders a training
checkpoint links from its base checkpoint are copied in, so the release loads wherever it is copied to.

One process, no process group: torch.distributed.checkpoint reads every rank's shards into whole tensors. The model
is rebuilt from the recipe the checkpoint holds (`training_state/recipe.json`).
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from .annotation_index import AnnotationIndex
from .atomic import fresh_staging, publish
from .checkpointing import (
    RECIPE_FILE,
    SHARDED_FOLDER,
    STATE_FOLDER,
    is_sharded_checkpoint,
    load_sharded_state,
    sharded_start,
)
from .loop import build_task, trainable
from .tool import run_tool


def export(checkpoint, out) -> Path:
    """Write the weights of the sharded `checkpoint` to `out` (built in a staging folder, then renamed into place)."""
    checkpoint, out = Path(checkpoint), Path(out)
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"no checkpoint folder at {checkpoint}; give a checkpoint-<step> folder of a run")
    if not is_sharded_checkpoint(checkpoint):
        raise ValueError(f"{checkpoint} is not a sharded checkpoint (no {STATE_FOLDER}/{SHARDED_FOLDER}/); a checkpoint "
                         "of one process already holds the app-facing weights")
    if out.exists():
        raise ValueError(f"{out} exists; export into a new folder")
    config = json.loads((checkpoint / STATE_FOLDER / RECIPE_FILE).read_text())
    config["model"] = sharded_start(config["model"])[0]  # a run that itself started from shards
    task = build_task(config, AnnotationIndex(config["data"]["annotations"]), torch.device("cpu"))
    state = {"model": task.model.state_dict()}
    if config["train"].get("ema_decay"):
        state["ema"] = {name: parameter.detach().clone() for name, parameter in trainable(task.model)}
    load_sharded_state(checkpoint, state)
    staging = fresh_staging(out)
    task.save(staging, state["model"], state.get("ema"))
    copy_linked_folders(staging)
    return publish(out)


def copy_linked_folders(folder: Path) -> None:
    """Replace every link in `folder` (the base checkpoint's VAE and text folders) with a copy of what it points at."""
    for link in [path for path in folder.iterdir() if path.is_symlink()]:
        target = link.resolve()
        link.unlink()
        if target.is_dir():
            shutil.copytree(target, link, symlinks=False)
        else:
            shutil.copy2(target, link)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoint-<step> folder of a sharded (FSDP) run")
    parser.add_argument("--out", type=Path, required=True, help="new folder for the app-facing weights")
    args = parser.parse_args(argv)
    return run_tool(lambda: f"exported {args.checkpoint} to {export(args.checkpoint, args.out)}")


if __name__ == "__main__":
    sys.exit(main())
