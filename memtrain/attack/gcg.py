"""UnlearnDiffAtk's objective optimized with GCG: a hard prompt found by token swaps.

The objective is UnlearnDiffAtk's (Zhang et al., "To Generate or Not? Safety-Driven Unlearned
Diffusion Models Are Still Easy to Generate Unsafe Images ... For Now"): a discrete prompt p'
whose diffusion (training) loss toward the target image is small, the same loss, budget, noise
and timestep streams as Dori (memtrain.attack.dori) and the PEZ-style prompt attack
(memtrain.attack.prompt_space). The optimizer is GCG (Zou et al. 2023, "Universal and
Transferable Adversarial Attacks on Aligned Language Models"), as paper 004 App. G.1 ran it:
every step

1. takes the gradient of the loss with respect to a one-hot matrix of the prompt's n tokens
   (B, n, C), through the text encoder's input embedding table (C: the whole-word candidates);
2. keeps the `top_k` tokens with the most negative gradient at every position;
3. draws `candidates` single-token swaps (a uniform position, a uniform token of its top k) from
   the target's own seed stream, and scores each swapped prompt with the step's noise draws;
4. moves to the best swap if it beats the current prompt's loss on those draws.

Like the PEZ-style attack, the output is the best prompt tried, as a string of whole-word tokens
that re-tokenizes to the tokens optimized; the audit re-encodes it through the deployed pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from memtrain.attack.dori import AttackConfig, UNetForward, slice_layout
from memtrain.attack.prompt_space import PromptAttack
from memtrain.core.diffusion import regression_target
from memtrain.core.errors import MemtrainError

# The prompt-space attacks an audit can run under the `prompt` threat model.
PROMPT_ATTACKS = ("pez", "gcg")


@dataclass
class GCGSettings:
    """GCG's search per step; defaults are the official UnlearnDiffAtk code's GCG settings
    (candidate_size 256, search_size 512)."""

    top_k: int = 256  # candidate tokens kept per position (the most negative one-hot gradients)
    candidates: int = 512  # single-token swaps scored per target and step

    def __post_init__(self) -> None:
        for key in ("top_k", "candidates"):
            if int(getattr(self, key)) < 1:
                raise MemtrainError(f"gcg {key} must be >= 1, got {getattr(self, key)}")


class GCGAttack(PromptAttack):
    """The prompt attack's tokens, templates and result, optimized by GCG token swaps instead of PEZ's
    projected gradient steps; the optimized state `y` is the one-hot matrix (B, n, C) of the prompt."""

    def __init__(self, bundle, target_latents: torch.Tensor, init_prompts: Sequence[str],
                 config: AttackConfig | None = None, mitigation=None,
                 unet_forward: UNetForward | None = None, indices: Sequence[int] | None = None,
                 gcg: GCGSettings | None = None):
        self.gcg = gcg or GCGSettings()
        super().__init__(bundle, target_latents, init_prompts, config, mitigation, unet_forward, indices)

    def initial_state(self, init_prompts: list[str]):
        start, layout = super().initial_state(init_prompts)  # the start prompt's token embeddings
        ids = self._project(start)
        self.word_table = self.table[self.candidates]
        return self._one_hot(ids), layout

    def _one_hot(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, n, C) float one-hot rows of candidate token ids (B, n)."""
        position = torch.searchsorted(self.candidates, ids)  # candidates are sorted
        return torch.nn.functional.one_hot(position, len(self.candidates)).float()

    def hard_ids(self) -> torch.Tensor:
        return self.candidates[self.y.detach().argmax(dim=-1).cpu()]

    def token_embeddings(self) -> torch.Tensor:
        """One-hot x embedding table: the tokens' own embeddings, differentiable in the one-hot."""
        return self.y @ self.word_table.to(self.y.device)

    def _draw(self, live: list[int]):
        self._draws = super()._draw(live)  # the candidates are scored on the step's own draws
        return self._draws

    def _backward(self, owners, noise, times) -> torch.Tensor:
        self._current = super()._backward(owners, noise, times)  # the current prompt's loss on the draws
        return self._current

    @torch.no_grad()
    def _update(self) -> None:
        """GCG's swap instead of Adam: the best of `candidates` single-token swaps, if it beats the
        current prompt on this step's draws."""
        live = self.live.nonzero().flatten().tolist()
        if not live:
            return
        current = self.hard_ids()
        grad = self.y.grad.detach().float().cpu()
        top_k = min(int(self.gcg.top_k), len(self.candidates))
        n_swaps = int(self.gcg.candidates)
        for b in live:
            g = self.generators[b]
            top = (-grad[b]).topk(top_k, dim=-1).indices  # (n, top_k) candidate positions
            where = torch.randint(self.length, (n_swaps,), generator=g)
            which = torch.randint(top_k, (n_swaps,), generator=g)
            trials = current[b].expand(n_swaps, -1).clone()
            trials[torch.arange(n_swaps), where] = self.candidates[top[where, which]]
            losses = self._trial_losses(b, trials)
            best = int(losses.argmin())
            if bool(losses[best] < self._current[b]):
                self.y[b] = self._one_hot(trials[best : best + 1])[0].to(self.y.device)

    def _trial_losses(self, b: int, trials: torch.Tensor) -> torch.Tensor:
        """(S,) the loss of each of target b's S trial prompts on b's noise draws of this step,
        computed as `condition()` computes the current prompt's (the mitigation's text path included)."""
        owners, noise, times = self._draws
        mine = (owners == b).nonzero().flatten()
        k, s = len(mine), len(trials)
        x0 = self.latents[b : b + 1].expand(k, *self.latents.shape[1:])
        x_t = self.scheduler.add_noise(x0, noise[mine], times[mine])
        target = regression_target(self.scheduler, x0, noise[mine], times[mine])
        ids = self.template[b : b + 1].expand(s, -1).clone()
        ids[:, 1 : 1 + self.length] = trials
        encoder, dev = self.bundle.text_encoder, self.device
        total = torch.zeros(s)
        per_chunk = max(1, self.max_batch // k)  # prompts per forward: their k rows each
        for start in range(0, s, per_chunk):
            part = slice(start, start + per_chunk)
            states = encoder(ids[part].to(encoder.device)).last_hidden_state.to(self.dtype)
            if self.mitigation is not None:
                rows = [b] * len(states)
                states = self.mitigation.transform_embeddings(states, slice_layout(self.layout, rows).to(dev))
            m = len(states)
            out = self.forward(x_t.repeat(m, 1, 1, 1).to(dev, self.dtype), times[mine].repeat(m).to(dev),
                               states.repeat_interleave(k, dim=0))
            err = (out.float() - target.repeat(m, 1, 1, 1).to(dev)).pow(2).flatten(1).mean(dim=1)
            total[part] = err.reshape(m, k).mean(dim=1).cpu()
        return total
