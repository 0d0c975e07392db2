"""SISS, Subtracted Importance Sampled Scores (Alberti et al., ICLR 2025), as paper 004 App. E.2
applies it: per memorized image, from the original U-Net.

X and A as the paper built them: the memorized prompt with random tokens inserted (memtrain's RTA,
the authors' draw; token counts tried in turn until a split exists) generates `generations` images
of the original model; those with SSCD against the memorized image above `threshold` are the
replicas A, the rest the non-replicas X. An item for which no token count gives both is skipped,
with the counts.

Per micro-step (Eq. 4): x from X and a from A, one noise and one t for both; m_t is x's or a's
noised latent (a's with probability lambda); the U-Net's eps(m_t, t, c') for the prompt c' that
made the split is regressed toward (m_t - gamma_t x) / sigma_t weighted by
q(m_t|x) / q_lambda(m_t|x, a) and, subtracted, toward (m_t - gamma_t a) / sigma_t weighted by
q(m_t|a) / q_lambda (summed squared errors, as the official loss). A model of another prediction
type (the testbed's v-prediction) regresses its own target for the same (image, noise) pairs. The two gradients are kept
apart over the accumulation; at each update the NegGrad one is rescaled to L2 norm `scaling_norm`
(the official SD setting; with scaling_norm null, Eq. 4's weights n/(n-k) and (1+s) k/(n-k)),
subtracted, and the sum clipped to max_grad_norm.
"""

from __future__ import annotations

import math

import torch

from memtrain.core.diffusion import derived_seed, images_to_latents, regression_target
from memtrain.core.run import gather_in_order, shard
from memtrain.core.text import encode_prompts
from memtrain.mitigations.random_insertion import RandomTokenAddition
from memtrain.train.removal.data import generate_scored, load_image_file, safe_name
from memtrain.train.removal.trainer import REMOVAL_METHODS, Job, RemovalMethod
from memtrain.train.surrogates import descriptor_for
from memtrain.core.manifest import ManifestItem


def variant_prompt(prompt: str, tokenizer, seed: int, index: int, count: int) -> str:
    """The memorized prompt (item `index` of the manifest) with `count` random tokens inserted
    (RTA's official draw), seeded by the run's seed, the item and the count."""
    rta = RandomTokenAddition(count=count, seed=derived_seed(seed, index, count) % 2**31)
    return rta.insert(prompt, tokenizer)


@REMOVAL_METHODS.register
class Siss(RemovalMethod):
    """SISS per memorized image (full U-Net, as the official SD script)."""

    name = "siss"
    per_item = True
    deepspeed = False

    def trainable(self, unet) -> list[str]:
        return [n for n, _ in unet.named_parameters()]

    # X and A -------------------------------------------------------------------------------------
    def prepare(self):
        t, spec = self.t, self.spec
        descriptor = descriptor_for(t.recipe.descriptor, t.acc.device)
        settings = t.bundle.sampler_settings.with_overrides(spec.sampler)
        seeds = [t.recipe.seed + 1000 + k for k in range(spec.generations)]

        def split(i: int, item: ManifestItem) -> dict:
            tried = []
            for count in spec.random_tokens:
                prompt = variant_prompt(item.prompt, t.bundle.tokenizer, t.recipe.seed, i, count)
                made = generate_scored(t.bundle, descriptor, item, prompt, seeds, settings,
                                       t.out / "siss_data" / safe_name(item.id) / f"tokens{count}")
                a = [g.path for g in made if g.sscd > spec.threshold]
                x = [g.path for g in made if g.sscd <= spec.threshold]
                tried.append({"tokens": count, "replicas": len(a), "non_replicas": len(x)})
                if a and x:
                    return {"prompt": prompt, "tokens": count, "A": a, "X": x, "tried": tried}
            return {"tried": tried}

        results = gather_in_order([(i, split(i, item)) for i, item in shard(t.items, t.acc)], t.acc)
        jobs, skipped, found = [], {}, {}
        for i, (item, res) in enumerate(zip(t.items, results)):
            found[item.id] = {k: v for k, v in res.items() if k not in ("A", "X")}
            if "prompt" not in res:
                counts = ", ".join(f"{v['tokens']} tokens: {v['replicas']} replicas / {v['non_replicas']} non-replicas"
                                   for v in res["tried"])
                skipped[item.id] = f"no split into replicas and non-replicas at SSCD {spec.threshold} ({counts})"
                continue
            folder = t.out / safe_name(item.id)
            jobs.append(Job(item.id, [i], folder, t.out / "checkpoints" / safe_name(item.id), data=res))
        return jobs, skipped, found

    def start_job(self, job: Job) -> None:
        t, d = self.t, job.data
        self.X = images_to_latents(t.bundle, [load_image_file(p) for p in d["X"]])
        self.A = images_to_latents(t.bundle, [load_image_file(p) for p in d["A"]])
        with torch.no_grad():
            self.cond = encode_prompts(t.bundle, [d["prompt"]]).embeddings
        abar = t.scheduler.alphas_cumprod.float()
        self.gamma, self.sigma = abar.sqrt(), (1 - abar).sqrt()

    # the loss ------------------------------------------------------------------------------------
    def losses(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(importance-weighted loss on X, on A): summed squared errors / batch, as the official loss."""
        t, lam, n = self.t, self.spec.lambd, self.t.train.batch
        dev, T = t.acc.device, t.scheduler.config.num_train_timesteps
        x0 = self.X[torch.randint(0, len(self.X), (n,), generator=g)]
        a0 = self.A[torch.randint(0, len(self.A), (n,), generator=g)]
        noise = torch.randn(x0.shape, generator=g)
        tt = torch.randint(min(self.spec.min_timestep, T - 1), T, (n,), generator=g)
        from_a = torch.rand(n, generator=g) < lam
        gamma, sigma = self.gamma[tt].view(-1, 1, 1, 1), self.sigma[tt].view(-1, 1, 1, 1)
        m = torch.where(from_a.view(-1, 1, 1, 1), gamma * a0, gamma * x0) + sigma * noise
        eps_x, eps_a = (m - gamma * x0) / sigma, (m - gamma * a0) / sigma
        # log q(m|a) - log q(m|x) = dist_x - dist_a; the weights 1 / ((1 - l) + l q(m|a)/q(m|x)) and
        # 1 / ((1 - l) q(m|x)/q(m|a) + l), written with logaddexp so that far-apart images do not overflow
        log_ratio = ((eps_x**2).flatten(1).sum(1) - (eps_a**2).flatten(1).sum(1)) / 2
        w_x = torch.exp(-torch.logaddexp(torch.full_like(log_ratio, math.log(1 - lam)), math.log(lam) + log_ratio))
        w_a = torch.exp(-torch.logaddexp(math.log(1 - lam) - log_ratio, torch.full_like(log_ratio, math.log(lam))))
        with t.acc.autocast():
            pred = t.unwrapped(m.to(dev, t.unet_dtype), tt.to(dev),
                               encoder_hidden_states=self.cond.expand(n, -1, -1).to(t.unet_dtype)).sample.float()
        # the model's own regression target for (x, eps_x) and (a, eps_a) at m_t: the noises of Eq. 4
        # for an epsilon model (SD v1.4), the velocities for a v-prediction one (the testbed)
        target_x = regression_target(t.scheduler, x0, eps_x, tt).to(dev)
        target_a = regression_target(t.scheduler, a0, eps_a, tt).to(dev)
        w = lambda v: v.to(dev).view(-1, 1, 1, 1)  # noqa: E731
        loss_x = (w(w_x) * (pred - target_x) ** 2).sum() / n
        loss_a = (w(w_a) * (pred - target_a) ** 2).sum() / n
        return loss_x, loss_a, {"weight_x": float(w_x.mean()), "weight_a": float(w_a.mean()), "timestep": int(tt[0])}

    def optimizer_step(self, job: Job, step: int) -> dict:
        """The two gradients accumulated apart (bypassing DDP's hooks), averaged over the processes,
        combined with the rescaled NegGrad term, clipped; one update of the raw optimizer."""
        t, spec = self.t, self.spec
        accum = t.train.gradient_accumulation_steps
        gx = [torch.zeros_like(p, dtype=torch.float32) for p in t.params]
        ga = [torch.zeros_like(p, dtype=torch.float32) for p in t.params]
        for micro in range(accum):
            loss_x, loss_a, logs = self.losses(t.micro_generator(job, step, micro))
            t.check_finite(loss_x + loss_a, step, job)
            for bufs, grads in ((gx, torch.autograd.grad(loss_x, t.params, retain_graph=True, allow_unused=True)),
                                (ga, torch.autograd.grad(loss_a, t.params, allow_unused=True))):
                for buf, grad in zip(bufs, grads):
                    if grad is not None:
                        buf.add_(grad.float(), alpha=1 / accum)
        if t.world > 1:
            flat = t.acc.reduce(torch.cat([v.flatten() for v in gx + ga]), reduction="mean")
            parts = flat.split([v.numel() for v in gx + ga])
            gx, ga = [p.view_as(v) for p, v in zip(parts[: len(gx)], gx)], [p.view_as(v) for p, v in zip(parts[len(gx):], ga)]
        norm_a = float(torch.sqrt(sum((v**2).sum() for v in ga)))
        norm_x = float(torch.sqrt(sum((v**2).sum() for v in gx)))
        if spec.scaling_norm is not None:
            factor, scale_x = (spec.scaling_norm / norm_a if norm_a > 0 else 0.0), 1.0
        else:  # Eq. 4's weights: n = |X| + |A| generations, k = |A|
            k, n = len(self.A), len(self.A) + len(self.X)
            factor, scale_x = (1 + spec.superfactor) * k / (n - k), n / (n - k)
        for p, x, a in zip(t.params, gx, ga):
            p.grad = (scale_x * x - factor * a).to(p.dtype)
        if t.train.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(t.params, t.train.max_grad_norm)
        t.optimizer.optimizer.step()  # the raw optimizer: the gradients were never loss-scaled
        t.optimizer.optimizer.zero_grad(set_to_none=True)
        return {"loss": float(loss_x.detach() - loss_a.detach()), "loss/x": float(loss_x.detach()),
                "loss/a": float(loss_a.detach()), "grad_norm/x": norm_x, "grad_norm/a": norm_a,
                "neggrad_factor": factor, **logs}

