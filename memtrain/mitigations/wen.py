"""Wen et al. 2024's inference-time mitigation: before sampling, the prompt embedding is optimized
until the text-conditional noise magnitude ||eps(x_T, e) - eps(x_T, e_null)|| (mean over the
batch's images) is below a target loss (3; 1 is stronger), Adam on the whole (77, D) embedding.

It acts inside the sampler's U-Net call: the first call of each sampling batch (a new trajectory
starts when the timestep does not decrease) optimizes that batch's condition against the batch's
own latents, measured on the noise prediction (whatever the model predicts), and every later step
of the trajectory uses the optimized condition. On a zero-terminal-SNR model (abar_T = 0) eps(x_T)
is x_T whatever the prompt, so the optimization happens at the trajectory's first step with
abar_t > 0 (the t = T step, where only the x0 prediction depends on the text, runs unoptimized). The attack differentiates through the
plain U-Net call (`attack_forward`): the embedding it finds is then optimized by the deployed
pipeline like any prompt's.
"""

from __future__ import annotations

import dataclasses

import torch

from memtrain.core.errors import MemtrainError
from memtrain.core.sampling import eps_from_output
from memtrain.mitigations.base import Mitigation, register_mitigation


@register_mitigation
@dataclasses.dataclass(eq=False)
class Wen(Mitigation):
    """Prompt embedding optimized at generation time until its first-step magnitude < target_loss."""

    name = "wen"
    changes = ("text-embedding path, at generation time: the condition is optimized (Adam) until "
               "||eps(x_T, e) - eps(x_T, null)|| < target_loss")
    inference_time = True
    optimizes_at_generation = True

    target_loss: float = 3.0
    lr: float = 0.05
    max_steps: int = 50

    _log: list = dataclasses.field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if not float(self.target_loss) > 0 or not float(self.lr) > 0 or int(self.max_steps) < 1:
            raise MemtrainError("wen: target_loss and lr must be > 0 and max_steps >= 1")

    def attack_forward(self, bundle):
        return None

    def optimize(self, bundle, x_t: torch.Tensor, t, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        """`cond` (B, L, D) optimized against the batch's latents x_t (B, C, h, w) at step t."""
        unet, scheduler = bundle.unet, bundle.scheduler
        with torch.no_grad():
            eps_null = eps_from_output(scheduler, unet(x_t, t, encoder_hidden_states=uncond).sample, x_t, t).float()
        e = cond.detach().clone().float().requires_grad_(True)
        optimizer = torch.optim.Adam([e], lr=float(self.lr))
        steps, loss = 0, float("nan")
        with torch.enable_grad():
            for steps in range(int(self.max_steps) + 1):
                out = unet(x_t, t, encoder_hidden_states=e.to(cond.dtype)).sample
                magnitude = (eps_from_output(scheduler, out, x_t, t).float() - eps_null).flatten(1).norm(dim=1).mean()
                loss = float(magnitude.detach())
                if loss < float(self.target_loss) or steps == int(self.max_steps):
                    break
                optimizer.zero_grad()
                magnitude.backward()
                optimizer.step()
        self._log.append({"steps": steps, "final_magnitude": loss, "timestep": int(t)})
        return e.detach().to(cond.dtype)

    def unet_forward(self, bundle):
        unet, abar = bundle.unet, bundle.scheduler.alphas_cumprod
        state: dict = {"t": None, "cond": None}

        def forward(x, t, y):
            uncond, cond = y.chunk(2)
            if state["t"] is None or int(t) >= state["t"]:  # a new trajectory (the sampler's next batch)
                state["cond"] = None
            state["t"] = int(t)
            if state["cond"] is None and float(abar[int(t)]) > 0:  # first step where eps can depend on the text
                state["cond"] = self.optimize(bundle, x.chunk(2)[1], t, cond, uncond)  # x is cat([x, x])
            used = cond if state["cond"] is None else state["cond"]
            return unet(x, t, encoder_hidden_states=torch.cat([uncond, used])).sample

        return forward

    def details(self) -> dict:
        steps = [r["steps"] for r in self._log]
        return {"optimized_batches": len(steps), "mean_steps": (sum(steps) / len(steps)) if steps else None,
                "mean_final_magnitude": (sum(r["final_magnitude"] for r in self._log) / len(steps)) if steps else None,
                "probe": "each trajectory's latents at its first step with abar_t > 0, noise prediction"}
