"""Exponential moving average of the trained weights, kept in float32."""

from __future__ import annotations

from collections.abc import Iterable

import torch


class EMA:
    """Float32 shadow copies of the trainable parameters, averaged after each optimizer step.

    Pass the parameters in the same order to every call (a list built once, not a set).
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter], decay: float = 0.999, warmup: bool = True):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay {decay} must be in (0, 1)")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.shadow = [p.detach().float().clone() for p in parameters]

    def effective_decay(self) -> float:
        """The decay the next update uses."""
        if not self.warmup:
            return self.decay
        # Warm-up: early averages follow the weights closely instead of remembering the initialization.
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """shadow = decay * shadow + (1 - decay) * param; call after each optimizer step."""
        decay = self.effective_decay()
        for shadow, param in zip(self.shadow, parameters, strict=True):
            shadow.mul_(decay).add_(param.detach().float(), alpha=1 - decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Write the averaged weights into `parameters`, in each parameter's dtype."""
        for shadow, param in zip(self.shadow, parameters, strict=True):
            param.copy_(shadow.to(param.dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": list(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        shapes = [tuple(t.shape) for t in state["shadow"]]
        if shapes != [tuple(t.shape) for t in self.shadow]:
            raise ValueError(
                f"EMA state has {len(shapes)} tensors that do not match the {len(self.shadow)} trained parameters "
                "(different count or shapes)"
            )
        decay = state["decay"]
        if not 0 < decay < 1:
            raise ValueError(f"EMA state decay {decay} must be in (0, 1)")
        self.decay, self.num_updates = decay, int(state["num_updates"])
        # On the current shadow's device: the checkpoint may have been loaded to another one.
        self.shadow = [
            saved.to(device=current.device, dtype=torch.float32).clone()
            for saved, current in zip(state["shadow"], self.shadow)
        ]
