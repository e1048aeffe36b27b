"""An exponential moving average of the trainable weights, the phase's output when ``PhaseConfig.ema_decay > 0``.

Tiny diffusion models swing from step to step at the learning rates that train them fast; the average of the last
few hundred steps samples far better than any single step (as in DDPM / Stable Diffusion training). The decay warms
up as ``min(decay, (1 + n) / (10 + n))`` after n updates, so early weights are forgotten quickly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class EMA:
    def __init__(self, params: dict[str, nn.Parameter], decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.names = sorted(params)
        self.params = [params[n] for n in self.names]
        self.shadow = [p.detach().float().clone() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """Call after each applied optimizer step."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1 - decay)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        """Overwrite the live weights with the average (at the end of the phase)."""
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)

    def state_dict(self) -> dict[str, Tensor]:
        return {n: s.cpu().contiguous() for n, s in zip(self.names, self.shadow)} | {
            "__updates__": torch.tensor(self.updates)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise ValueError(f"the EMA state lacks {missing[:3]}: was the phase's trainability changed?")
        with torch.no_grad():
            for n, s in zip(self.names, self.shadow):
                s.copy_(state[n])
        self.updates = int(state["__updates__"])
