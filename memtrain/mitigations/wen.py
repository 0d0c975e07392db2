"""Wen et al. 2024 ("Detecting, Explaining, and Mitigating Memorization in Diffusion Models",
code: YuxinWenRick/diffusion_memorization): before sampling, the prompt embedding is optimized
until the text-conditional noise magnitude ||eps(x_T, e) - eps(x_T, e_null)|| is at most a target
loss (3; 1 is stronger).

`wen` is the official procedure (`aug_prompt`): one embedding per prompt, shared by that prompt's
images in the batch, the loss one L2 norm over all of their differences together; AdamW (its
default weight decay 0.01); the beginning token's gradient zeroed (position 0 still shrinks
through the decoupled decay); at most `max_steps` = 10 updates, the loss checked before each and
the optimization stopped once it is <= target_loss. `wen_per_image` is what memtrain ran before:
Adam on every position, one embedding per image, the loss the mean of per-image norms, < target,
up to 50 updates.

Both act inside the sampler's U-Net call: the first call of each sampling batch (a new trajectory
starts when the timestep does not decrease) optimizes that batch's condition against the batch's
own latents, measured on the noise prediction (whatever the model predicts), and every later step
of the trajectory uses the optimized condition. On a zero-terminal-SNR model (abar_T = 0) eps(x_T)
is x_T whatever the prompt, so the optimization happens at the trajectory's first step with
abar_t > 0 (the t = T step, where only the x0 prediction depends on the text, runs unoptimized).
The attack differentiates through the plain U-Net call (`attack_forward`): the embedding it finds
is then optimized by the deployed pipeline like any prompt's.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from memtrain.core.errors import MemtrainError
from memtrain.core.sampling import eps_from_output
from memtrain.mitigations.base import Mitigation, register_mitigation


@dataclasses.dataclass(eq=False)
class _GenerationTimeOptimization(Mitigation):
    """What both readings of Wen et al. share: when the condition is optimized within a
    trajectory and how it is used afterwards. Subclasses implement `optimize`."""

    inference_time = True
    optimizes_at_generation = True

    target_loss: float = 3.0
    lr: float = 0.05
    max_steps: int = 10

    _log: list = dataclasses.field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if not float(self.target_loss) > 0 or not float(self.lr) > 0 or int(self.max_steps) < 1:
            raise MemtrainError(f"{self.name}: target_loss and lr must be > 0 and max_steps >= 1")

    def attack_forward(self, bundle):
        return None

    def optimize(self, bundle, x_t: torch.Tensor, t, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        """`cond` (B, L, D) optimized against the batch's latents x_t (B, C, h, w) at step t."""
        raise NotImplementedError

    @staticmethod
    def _eps_null(bundle, x_t: torch.Tensor, t, uncond: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = bundle.unet(x_t, t, encoder_hidden_states=uncond).sample
            return eps_from_output(bundle.scheduler, out, x_t, t).float()

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


@register_mitigation
@dataclasses.dataclass(eq=False)
class Wen(_GenerationTimeOptimization):
    """Wen et al.'s `aug_prompt`: per prompt one embedding (AdamW, position 0 frozen in the
    gradient) until the batch-wide magnitude of its images is <= target_loss, <= 10 updates."""

    name = "wen"
    variant: ClassVar[str] = "official (aug_prompt: AdamW, start token's gradient zeroed, one embedding per prompt)"
    changes = ("text-embedding path, at generation time: each prompt's condition is optimized (AdamW, not the "
               "start token) until ||eps(x_T, e) - eps(x_T, null)|| over its images <= target_loss")

    weight_decay: float = 0.01  # torch.optim.AdamW's default, which the official code leaves on

    def optimize(self, bundle, x_t: torch.Tensor, t, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        """`cond` (B, L, D) optimized against the batch's latents x_t (B, C, h, w) at step t: rows
        with the same conditioning (one prompt's images) share one embedding and one loss, the
        L2 norm of all their noise differences together."""
        unet, scheduler = bundle.unet, bundle.scheduler
        eps_null = self._eps_null(bundle, x_t, t, uncond)
        _, owner = torch.unique(cond.flatten(1), dim=0, return_inverse=True)
        owner = owner.cpu()
        groups = int(owner.max()) + 1
        embeds = [cond[int((owner == g).nonzero()[0])][None].detach().clone().float().requires_grad_(True)
                  for g in range(groups)]
        optimizers = [torch.optim.AdamW([e], lr=float(self.lr), weight_decay=float(self.weight_decay)) for e in embeds]
        active, steps, losses = set(range(groups)), [0] * groups, [float("nan")] * groups
        with torch.enable_grad():
            for _ in range(int(self.max_steps)):
                rows = torch.tensor([b for b in range(len(owner)) if int(owner[b]) in active])
                y = torch.cat([embeds[int(owner[b])] for b in rows]).to(cond.dtype)
                idx = rows.to(x_t.device)
                out = unet(x_t[idx], t, encoder_hidden_states=y).sample
                diff = eps_from_output(scheduler, out, x_t[idx], t).float() - eps_null[idx]
                loss = {g: diff[owner[rows] == g].norm() for g in sorted(active)}
                for g, value in loss.items():
                    losses[g] = float(value.detach())
                    if losses[g] <= float(self.target_loss):  # the official test: <=, before the update
                        active.discard(g)
                if not active:
                    break
                order = sorted(active)
                grads = torch.autograd.grad(sum(loss[g] for g in order), [embeds[g] for g in order])
                for g, grad in zip(order, grads):
                    grad[:, 0] = 0  # the start token gets no gradient (AdamW's decay still applies)
                    embeds[g].grad = grad
                    optimizers[g].step()
                    optimizers[g].zero_grad()
                    steps[g] += 1
        for g in range(groups):
            self._log.append({"steps": steps[g], "final_magnitude": losses[g], "timestep": int(t)})
        return torch.cat([embeds[int(g)] for g in owner]).detach().to(cond.dtype)


@register_mitigation
@dataclasses.dataclass(eq=False)
class WenPerImage(_GenerationTimeOptimization):
    """memtrain's earlier reading: Adam on the whole (77, D) embedding of each image, the loss the
    mean of per-image magnitudes, until it is < target_loss (at most 50 updates)."""

    name = "wen_per_image"
    variant: ClassVar[str] = "memtrain before 2026-12: Adam on all positions, per image, mean of norms"
    changes = ("text-embedding path, at generation time: the condition is optimized (Adam) until "
               "||eps(x_T, e) - eps(x_T, null)|| < target_loss")

    max_steps: int = 50

    def optimize(self, bundle, x_t: torch.Tensor, t, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        """`cond` (B, L, D) optimized against the batch's latents x_t (B, C, h, w) at step t."""
        unet, scheduler = bundle.unet, bundle.scheduler
        eps_null = self._eps_null(bundle, x_t, t, uncond)
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
