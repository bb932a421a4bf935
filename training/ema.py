"""Exponential moving average of the trainable weights, kept in float32."""
import torch


class EMA:
    """ema <- decay * ema + (1 - decay) * weight after every optimizer step."""

    def __init__(self, named_parameters, decay: float):
        self.decay = decay
        self.shadow = {name: p.detach().float().clone() for name, p in named_parameters if p.requires_grad}

    @torch.no_grad()
    def update(self, named_parameters) -> None:
        for name, p in named_parameters:
            if name in self.shadow:
                shadow = self.shadow[name]
                if shadow.device != p.device:  # the model moved to its device after the EMA was made
                    shadow = self.shadow[name] = shadow.to(p.device)
                shadow.lerp_(p.detach().float(), 1 - self.decay)

    def state_dict(self) -> dict:
        return {name: tensor.detach().cpu().contiguous() for name, tensor in self.shadow.items()}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise ValueError(f"the EMA checkpoint lacks {len(missing)} weights, e.g. {sorted(missing)[:3]}")
        for name in self.shadow:
            self.shadow[name].copy_(state[name])
