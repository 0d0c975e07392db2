"""Wen et al. 2024's inference-time mitigation: before sampling, the prompt embedding is optimized
until the text-conditional noise magnitude ||eps(x_T, e) - eps(x_T, e_null)|| (mean over the
batch's images) is below a target loss (3; 1 is stronger), Adam on the whole (77, D) embedding.

It acts inside the sampler's U-Net call: the first call of each sampling batch (a new trajectory
starts when the timestep does not decrease) optimizes that batch's condition against the batch's
own initial noise, and every later step of the trajectory uses the optimized condition. On a
zero-terminal-SNR model (abar_T = 0) eps(x_T) is x_T whatever the prompt, so the magnitude is
probed at the largest training timestep with abar > 0. The attack differentiates through the
plain U-Net call (`attack_forward`): the embedding it finds is then optimized by the deployed
pipeline like any prompt's.
"""

from __future__ import annotations

import dataclasses

import torch

from memtrain.core.errors import MemtrainError
from memtrain.mitigations.base import Mitigation, register_mitigation


@register_mitigation
@dataclasses.dataclass(eq=False)
class Wen(Mitigation):
    """Prompt embedding optimized at generation time until its first-step magnitude < target_loss."""

    name = "wen"
    changes = ("text-embedding path, at generation time: the condition is optimized (Adam) until "
               "||eps(x_T, e) - eps(x_T, null)|| < target_loss")
    inference_time = True

    target_loss: float = 3.0
    lr: float = 0.05
    max_steps: int = 50

    _log: list = dataclasses.field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if not float(self.target_loss) > 0 or not float(self.lr) > 0 or int(self.max_steps) < 1:
            raise MemtrainError("wen: target_loss and lr must be > 0 and max_steps >= 1")

    def attack_forward(self, bundle):
        return None

    def probe_timestep(self, bundle) -> torch.Tensor:
        abar = bundle.scheduler.alphas_cumprod
        return torch.tensor(int((abar > 0).nonzero().max()))

    def optimize(self, bundle, x_T: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        """`cond` (B, L, D) optimized against the initial noise x_T (B, C, h, w)."""
        t = self.probe_timestep(bundle).to(x_T.device)
        unet = bundle.unet
        with torch.no_grad():
            eps_null = unet(x_T, t, encoder_hidden_states=uncond).sample.float()
        e = cond.detach().clone().float().requires_grad_(True)
        optimizer = torch.optim.Adam([e], lr=float(self.lr))
        steps, loss = 0, float("nan")
        with torch.enable_grad():
            for steps in range(int(self.max_steps) + 1):
                eps = unet(x_T, t, encoder_hidden_states=e.to(cond.dtype)).sample.float()
                magnitude = (eps - eps_null).flatten(1).norm(dim=1).mean()
                loss = float(magnitude)
                if loss < float(self.target_loss) or steps == int(self.max_steps):
                    break
                optimizer.zero_grad()
                magnitude.backward()
                optimizer.step()
        self._log.append({"steps": steps, "final_magnitude": loss})
        return e.detach().to(cond.dtype)

    def unet_forward(self, bundle):
        unet = bundle.unet
        state: dict = {"t": None, "cond": None}

        def forward(x, t, y):
            uncond, cond = y.chunk(2)
            if state["t"] is None or int(t) >= state["t"] or state["cond"] is None or len(state["cond"]) != len(cond):
                state["cond"] = self.optimize(bundle, x.chunk(2)[1], cond, uncond)  # x is cat([x, x])
            state["t"] = int(t)
            return unet(x, t, encoder_hidden_states=torch.cat([uncond, state["cond"]])).sample

        return forward

    def details(self) -> dict:
        steps = [r["steps"] for r in self._log]
        return {"optimized_batches": len(steps), "mean_steps": (sum(steps) / len(steps)) if steps else None,
                "probe": "the sampler's initial noise at the largest training timestep with abar > 0"}
