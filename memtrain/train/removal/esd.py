"""ESD, Erasing Concepts from Diffusion Models (Gandikota et al. 2023), erasing every memorized
prompt of the manifest from one U-Net (paper 004 App. G.2).

Per micro-step and row, as the authors' CompVis training script does: a memorized prompt c is
drawn, a DDIM step index k among `ddim_steps`, and x_t is reached by sampling from noise with the
*trained* U-Net (guidance `start_guidance`, eta 0), stopping where their sampler stops for k; the
timestep fed to the U-Nets is drawn from the DDPM range of that step. A frozen copy of the original
U-Net gives the negatively guided target eps(x_t, "") - eta * (eps(x_t, c) - eps(x_t, "")) that
the trained U-Net's eps(x_t, c) regresses (MSE). ESD-x (`xattn`) trains the cross-attention
(attn2) weights, ESD-u (`noxattn`) every weight but those, the time embedding and the output
layers. docs/fidelity.md lists where memtrain's reading differs.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from memtrain.core.sampling import unconditional_embedding
from memtrain.core.text import encode_prompts
from memtrain.train.removal.trainer import REMOVAL_METHODS, Job, RemovalMethod

# weights ESD-u leaves alone besides attn2: the CompVis U-Net's `time_embed` and `out.` (diffusers:
# time_embedding, conv_norm_out, conv_out)
NOXATTN_FROZEN = ("time_embedding.", "conv_norm_out.", "conv_out.")


def esd_weights(unet, method: str) -> list[str]:
    """The U-Net parameter names ESD-x (xattn) or ESD-u (noxattn) trains."""
    names = [n for n, _ in unet.named_parameters()]
    if method == "xattn":
        return [n for n in names if "attn2" in n]
    return [n for n in names if "attn2" not in n and not n.startswith(NOXATTN_FROZEN)]


@REMOVAL_METHODS.register
class Esd(RemovalMethod):
    """ESD-x / ESD-u with the official sampling of x_t and t."""

    name = "esd"

    def prepare(self):
        t = self.t
        # the frozen original, in the frozen parts' precision
        self.frozen = copy.deepcopy(t.bundle.unet).to(dtype=t.frozen_dtype).eval().requires_grad_(False)
        with torch.no_grad():
            self.cond = encode_prompts(t.bundle, [m.prompt for m in t.items]).embeddings
            self.null = unconditional_embedding(t.bundle)
        job = Job("all", list(range(len(t.items))), t.out, t.out / "checkpoints")
        return [job], {}, {"prompts": len(t.items), "train_method": self.spec.method}

    def trainable(self, unet) -> list[str]:
        return esd_weights(unet, self.spec.method)

    def settings(self) -> dict:
        return {**super().settings(), "train_method": self.spec.method}

    @torch.no_grad()
    def partial_sample(self, noise: torch.Tensor, cond: torch.Tensor, k: int) -> torch.Tensor:
        """x_t where the official sampler stops for step index k: it runs DDIM steps from index
        ddim_steps - 1 down to k - 1 (all of them for k <= 1), with the trained U-Net."""
        t, steps = self.t, self.spec.ddim_steps
        sched = t.bundle.make_scheduler("ddim")
        sched.set_timesteps(steps, device=t.acc.device)
        model, dtype = t.unwrapped, t.unet_dtype
        x = noise.to(t.acc.device, dtype) * sched.init_noise_sigma
        y = torch.cat([self.null, cond]).to(t.acc.device, dtype)
        with t.acc.autocast():
            for step in sched.timesteps[: min(steps, steps - k + 1)]:
                out = model(torch.cat([x, x]), step, encoder_hidden_states=y).sample
                uncond, c = out.float().chunk(2)
                guided = uncond + self.spec.start_guidance * (c - uncond)
                x = sched.step(guided, step, x.float()).prev_sample.to(dtype)
        return x

    def loss(self, job: Job, g: torch.Generator):
        t, spec = self.t, self.spec
        dev, n, steps = t.acc.device, t.train.batch, spec.ddim_steps
        T = t.scheduler.config.num_train_timesteps
        shape = (t.bundle.latent_channels, t.bundle.sample_size, t.bundle.sample_size)
        picks = torch.randint(0, len(job.items), (n,), generator=g).tolist()
        ks = torch.randint(0, steps, (n,), generator=g).tolist()
        timesteps = [int(torch.randint(round(k * T / steps), round((k + 1) * T / steps), (1,), generator=g))
                     for k in ks]
        noise = torch.randn((n, *shape), generator=g)
        cond = self.cond[[job.items[p] for p in picks]]
        x_t = torch.cat([self.partial_sample(noise[i : i + 1], cond[i : i + 1], ks[i]) for i in range(n)])
        tt = torch.tensor(timesteps, device=dev)
        with torch.no_grad():
            frozen_x = x_t.to(t.frozen_dtype)
            e0 = self.frozen(frozen_x, tt, encoder_hidden_states=self.null.expand(n, -1, -1)).sample.float()
            ep = self.frozen(frozen_x, tt, encoder_hidden_states=cond.to(t.frozen_dtype)).sample.float()
        target = e0 - spec.negative_guidance * (ep - e0)
        en = t.model(x_t.to(t.unet_dtype), tt, encoder_hidden_states=cond.to(dev, t.unet_dtype)).sample.float()
        return F.mse_loss(en, target), {"timestep": timesteps[0], "ddim_index": ks[0]}
