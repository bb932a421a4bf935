"""Checkpoints at `<output>/checkpoint-<step>/`, written under `.tmp` and renamed into place.

Besides the task's app-facing weights, `training_state/` holds what resuming needs: the optimizer
and lr-scheduler states (torch files read back with weights_only=True), the EMA weights and
`state.json` (step = data position, skip counters). No RNG state is stored because every random
draw comes from a generator derived from (seed, step, slot).

A sharded run (FSDP) writes no full state anywhere: `training_state/sharded/` holds the model, optimizer and EMA
as torch.distributed.checkpoint files, each rank writing its own shards, beside `state.json`, the lr schedule and
the recipe (`recipe.json`); `python -m training.export` turns it into the app-facing layout for a release, and a
later stage may start from it directly (`model.pretrained: <run>/checkpoint-N`, see `sharded_start`).
"""
import json
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

from .atomic import fresh_staging, publish, staging_path

STATE_FOLDER = "training_state"
SHARDED_FOLDER = "sharded"
RECIPE_FILE = "recipe.json"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_path(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}"


def latest_checkpoint(output_dir: Path):
    """The finished checkpoint with the highest step, or None."""
    found = [(int(m.group(1)), p) for p in Path(output_dir).glob("checkpoint-*")
             if (m := CHECKPOINT.match(p.name)) and (p / STATE_FOLDER / "state.json").is_file()]
    return max(found)[1] if found else None


def resume_path(output_dir: Path, resume):
    """`--resume auto` -> latest checkpoint (None when there is none); a path -> that checkpoint."""
    if resume in (None, "", "none"):
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if not (path / STATE_FOLDER / "state.json").is_file():
        raise FileNotFoundError(f"{path} is not a finished checkpoint (no {STATE_FOLDER}/state.json)")
    return path


def write_checkpoint(output_dir: Path, step: int, write_files, keep: int = 0) -> Path:
    """Call write_files(tmp_folder) then rename tmp -> checkpoint-<step>; keep the newest `keep` (0 = all)."""
    final = checkpoint_path(output_dir, step)
    write_files(fresh_staging(final))
    return _publish(final, keep)


def write_sharded_checkpoint(output_dir: Path, step: int, sharded_state: dict, write_files, is_main: bool, barrier,
                             keep: int = 0) -> Path:
    """Every rank writes its own shards of `sharded_state` (DTensors) with torch.distributed.checkpoint into the
    staging folder, so no rank gathers the full state; rank 0 adds write_files(tmp_folder) and renames it into place."""
    final = checkpoint_path(output_dir, step)
    if is_main:
        fresh_staging(final)
    barrier()
    dcp.save(sharded_state, checkpoint_id=staging_path(final) / STATE_FOLDER / SHARDED_FOLDER)
    barrier()  # every rank's shards are written before the folder is published
    if is_main:
        write_files(staging_path(final))
        _publish(final, keep)
    barrier()
    return final


def is_sharded_checkpoint(folder: Path) -> bool:
    return (Path(folder) / STATE_FOLDER / SHARDED_FOLDER).is_dir()


def load_sharded_state(folder: Path, state: dict) -> dict:
    """Fill `state` (this run's model / optimizer / EMA state dicts, sharded or whole) in place from a sharded
    checkpoint: torch.distributed.checkpoint reshards to this run's layout."""
    with warnings.catch_warnings():  # one process without a process group reading every rank's shards is meant
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=Path(folder) / STATE_FOLDER / SHARDED_FOLDER)
    return state


ARCHITECTURE_KEYS = ("pretrained", "variant", "family", "config", "vae_config")


def sharded_start(model: dict) -> tuple:
    """(the model section to build the model from, the sharded checkpoint to read its weights from or None).

    A sharded checkpoint as `model.pretrained` holds shards, not the app-facing layout: the model is built as the
    run that wrote it built its own (that recipe's pretrained root, variant, family and config changes, followed
    back through earlier sharded stages to an app-facing root), then `load_start_weights` reads the shards into it."""
    folder = Path(str(model["pretrained"]))
    if not is_sharded_checkpoint(folder):
        return model, None
    recipe = folder / STATE_FOLDER / RECIPE_FILE
    if not recipe.is_file():
        raise FileNotFoundError(f"{folder} is a sharded checkpoint without {STATE_FOLDER}/{RECIPE_FILE}; export it with "
                                "python -m training.export and start from the export")
    earlier, _ = sharded_start(json.loads(recipe.read_text())["model"])
    return model | {key: earlier.get(key) for key in ARCHITECTURE_KEYS}, folder


def load_start_weights(model, folder: Path) -> None:
    """The model weights of a sharded checkpoint into `model` (whole tensors, before it is sharded for this run)."""
    state = load_sharded_state(folder, {"model": model.state_dict()})
    model.load_state_dict(state["model"], strict=True)


def _publish(final: Path, keep: int) -> Path:
    """Rename the staging folder onto checkpoint-<step>; keep the newest `keep` checkpoints (0 = all)."""
    publish(final)
    if keep:
        finished = sorted((int(CHECKPOINT.match(p.name).group(1)), p) for p in final.parent.glob("checkpoint-*")
                          if CHECKPOINT.match(p.name))
        for _, old in finished[:-keep]:
            shutil.rmtree(old)
    return final


def save_training_state(folder: Path, optimizer_state, scheduler_state: dict, ema_state, state: dict,
                        recipe: dict = None) -> None:
    """The resume files beside the weights; a sharded checkpoint passes no optimizer or EMA state (they are in its
    shards) and the recipe instead, for `training.export`."""
    target = folder / STATE_FOLDER
    target.mkdir(parents=True, exist_ok=True)
    if optimizer_state is not None:
        torch.save(optimizer_state, target / "optimizer.pt")
    torch.save(scheduler_state, target / "lr_scheduler.pt")
    if ema_state is not None:
        save_file(ema_state, str(target / "ema.safetensors"))
    if recipe is not None:
        (target / RECIPE_FILE).write_text(json.dumps(recipe, indent=2, default=str))
    (target / "state.json").write_text(json.dumps(state, indent=2))


def read_state(folder: Path) -> dict:
    """A checkpoint's state.json: step, skip counters, world size, global batch."""
    return json.loads((folder / STATE_FOLDER / "state.json").read_text())


def load_training_state(folder: Path) -> dict:
    """The resume files; `optimizer` and `ema` are None in a sharded checkpoint (see `load_sharded_state`)."""
    source = folder / STATE_FOLDER
    ema, optimizer = source / "ema.safetensors", source / "optimizer.pt"
    return {
        "optimizer": torch.load(optimizer, map_location="cpu", weights_only=True) if optimizer.is_file() else None,
        "lr_scheduler": torch.load(source / "lr_scheduler.pt", map_location="cpu", weights_only=True),
        "ema": load_file(str(ema)) if ema.is_file() else None,
        "state": read_state(folder),
    }
