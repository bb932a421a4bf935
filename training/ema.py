"""Exponential moving average of the trainable weights: diffusers' `EMAModel` at a constant decay, read and
written by parameter name. Built from the prepared model, so under FSDP each rank averages its own shards."""
import torch
from diffusers.training_utils import EMAModel


class EMA:
    """ema <- decay * ema + (1 - decay) * weight after every optimizer step (from the first one on: EMAModel's
    warm-up is switched off by `min_decay = decay` and `update_after_step = -1`)."""

    def __init__(self, named_parameters, decay: float):
        named = [(name, p) for name, p in named_parameters if p.requires_grad]
        self.names = [name for name, _ in named]
        self.average = EMAModel([p for _, p in named], decay=decay, min_decay=decay, update_after_step=-1)

    def update(self, named_parameters) -> None:
        parameters = dict(named_parameters)
        self.average.step([parameters[name] for name in self.names])

    def tensors(self) -> dict:
        """{name: average}, as kept (sharded DTensors under FSDP)."""
        return dict(zip(self.names, self.average.shadow_params))

    def state_dict(self) -> dict:
        """{name: full CPU tensor} (gathers FSDP shards)."""
        return {name: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().contiguous()
                for name, t in self.tensors().items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        missing = set(self.names) - set(state)
        if missing:
            raise ValueError(f"the EMA checkpoint lacks {len(missing)} weights, e.g. {sorted(missing)[:3]}")
        for name, shadow in self.tensors().items():
            full = state[name].to(shadow.device)
            if hasattr(shadow, "device_mesh"):  # an FSDP shard: keep this rank's part of the full average
                from torch.distributed.tensor import distribute_tensor

                full = distribute_tensor(full, shadow.device_mesh, shadow.placements)
            shadow.copy_(full)
