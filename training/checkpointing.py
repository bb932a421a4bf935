"""Checkpoints at `<output>/checkpoint-<step>/`, written under `.tmp` and renamed into place.

Besides the task's app-facing weights, `training_state/` holds what resuming needs: the optimizer
and lr-scheduler states (torch files read back with weights_only=True), the EMA weights and
`state.json` (step = data position, skip counters). No RNG state is stored because every random
draw comes from a generator derived from (seed, step, slot).
"""
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE_FOLDER = "training_state"
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
    staging = final.with_name(final.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    write_files(staging)
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    if keep:
        finished = sorted((int(CHECKPOINT.match(p.name).group(1)), p) for p in Path(output_dir).glob("checkpoint-*")
                          if CHECKPOINT.match(p.name))
        for _, old in finished[:-keep]:
            shutil.rmtree(old)
    return final


def save_training_state(folder: Path, optimizer_state: dict, scheduler_state: dict, ema_state, state: dict) -> None:
    target = folder / STATE_FOLDER
    target.mkdir(parents=True, exist_ok=True)
    torch.save(optimizer_state, target / "optimizer.pt")
    torch.save(scheduler_state, target / "lr_scheduler.pt")
    if ema_state is not None:
        save_file(ema_state, str(target / "ema.safetensors"))
    (target / "state.json").write_text(json.dumps(state, indent=2))


def read_state(folder: Path) -> dict:
    """A checkpoint's state.json: step, skip counters, world size, global batch."""
    return json.loads((folder / STATE_FOLDER / "state.json").read_text())


def load_training_state(folder: Path) -> dict:
    source = folder / STATE_FOLDER
    ema = source / "ema.safetensors"
    return {
        "optimizer": torch.load(source / "optimizer.pt", map_location="cpu", weights_only=True),
        "lr_scheduler": torch.load(source / "lr_scheduler.pt", map_location="cpu", weights_only=True),
        "ema": load_file(str(ema)) if ema.is_file() else None,
        "state": read_state(folder),
    }
