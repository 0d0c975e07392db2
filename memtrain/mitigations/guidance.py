"""Sampler-side mitigations: guidance schedules (paper 003) and the overestimation switch (paper 002).

All of them act through the sampler's per-step hook (memtrain.core.sampling.GuidanceHook), which
sees (step, t, x_t, eps_cond, eps_uncond) and returns the guidance scale per image for that step;
the sampling loop itself is never copied. Scale 0 means the unconditional prediction alone.

- `guidance_static`: no guidance while t > transition_t (t = 500 of 1000 in paper 003 Sec. 5),
  normal guidance from there on.
- `guidance_dynamic`: paper 003 Alg. 1 with v_OG = 0: no guidance until the first local minimum of
  d_t = ||eps(x_t, e_p) - eps(x_t, e_null)||^2 along the trajectory, normal guidance after.
  `pre_switch_scale` is the scale before the switch: 0 as Alg. 1 writes it (the default), 1.0 as
  the authors' dynamic-transition script runs it (guidance 1: the conditional prediction alone).
- `guidance_opposite`: Alg. 1 with v_OG = 1: guidance -lambda before that point. The authors'
  opposite-guidance script does not run as published (it exits at the transition point), so
  this follows Alg. 1. docs/fidelity.md, "Paper 003", has the comparison.
- `overestimation_switch`: paper 002 App. H: per step, the least-squares fit
  x_t = w0 x0_hat + wT x_T; where delta_t = (w0 - sqrt(abar_t)) - (wT - sqrt(1 - abar_t)) > -gamma,
  that step uses the unconditional prediction. x0_hat is the clean latent predicted at that step
  from the guided noise prediction (the sampler's own estimate; the final x0 is not known yet).

The signals (d_t, delta_t) are memtrain.metrics.signals, shared with the detectors.
"""

from __future__ import annotations

import dataclasses

import torch

from memtrain.core.errors import MemtrainError
from memtrain.metrics.signals import guidance_magnitude, step_delta
from memtrain.mitigations.base import Mitigation, register_mitigation


class _Sampler(Mitigation):
    """Shared pieces of the sampler-side mitigations."""

    inference_time = True


@register_mitigation
@dataclasses.dataclass(eq=False)
class GuidanceStatic(_Sampler):
    """No classifier-free guidance before a fixed transition timestep (paper 003, static point)."""

    name = "guidance_static"
    changes = "sampler: guidance scale 0 (unconditional prediction) while t > transition_t, normal after"

    transition_t: int | None = 500  # in training timesteps (of 1000 on SD)
    transition_fraction: float | None = None  # or a fraction of the training timesteps (wins if set)

    def __post_init__(self) -> None:
        if self.transition_fraction is not None and not 0 < float(self.transition_fraction) <= 1:
            raise MemtrainError(f"guidance_static: transition_fraction must be in (0, 1], got {self.transition_fraction}")
        if self.transition_fraction is None and (self.transition_t is None or int(self.transition_t) < 0):
            raise MemtrainError("guidance_static: set transition_t >= 0 or transition_fraction")

    def transition(self, num_train_timesteps: int) -> int:
        if self.transition_fraction is not None:
            return int(round(float(self.transition_fraction) * num_train_timesteps))
        return int(self.transition_t)

    def guidance_hook(self, bundle, settings):
        point = self.transition(bundle.scheduler.config.num_train_timesteps)

        def hook(step, t, x_t, eps_cond, eps_uncond):
            return 0.0 if t > point else None

        return hook

    def text_timesteps(self, num_train_timesteps: int) -> tuple[int, int]:
        return 0, min(self.transition(num_train_timesteps) + 1, num_train_timesteps)


@register_mitigation
@dataclasses.dataclass(eq=False)
class GuidanceDynamic(_Sampler):
    """Paper 003 Alg. 1: guidance `before_scale` until the first local minimum of d_t, per image."""

    name = "guidance_dynamic"
    changes = ("sampler: guidance scale 0 (pre_switch_scale) until the first local minimum of "
               "||eps_cond - eps_uncond||^2 along each trajectory, normal guidance after")

    opposite: bool = False  # v_OG: guidance -lambda (not 0) before the switch
    # the scale before the switch: 0 (Alg. 1) or 1.0 (the authors' script: the conditional prediction)
    pre_switch_scale: float = 0.0

    def __post_init__(self) -> None:
        if self.opposite and float(self.pre_switch_scale) != 0.0:
            raise MemtrainError(f"{self.name}: opposite guidance sets the scale before the switch (-lambda); "
                                f"leave pre_switch_scale at 0, got {self.pre_switch_scale}")

    @property
    def variant(self) -> str:  # type: ignore[override]
        """Which pre-switch guidance runs: Alg. 1's, the authors' script's, or another scale."""
        if self.opposite:
            return "Alg. 1, opposite guidance"
        scale = float(self.pre_switch_scale)
        if scale == 0.0:
            return "Alg. 1 (guidance 0 before the switch)"
        if scale == 1.0:
            return "official code (guidance 1 before the switch)"
        return f"guidance {scale:g} before the switch"

    def before_scale(self, guidance_scale: float) -> float:
        """The guidance scale used before the switch."""
        return -float(guidance_scale) if self.opposite else float(self.pre_switch_scale)

    def guidance_hook(self, bundle, settings):
        scale = float(settings.guidance_scale)
        state: dict = {}

        def hook(step, t, x_t, eps_cond, eps_uncond):
            d = guidance_magnitude(eps_cond, eps_uncond)
            if step == 0:  # a new batch of trajectories: Alg. 1 line 1
                state.update(d2=torch.full_like(d, -float("inf")), d1=torch.full_like(d, -float("inf")),
                             switched=torch.zeros_like(d, dtype=torch.bool))
            state["switched"] |= (state["d2"] > state["d1"]) & (state["d1"] < d)  # lines 5-6
            state["d2"], state["d1"] = state["d1"], d
            return torch.where(state["switched"], torch.full_like(d, scale),
                               torch.full_like(d, self.before_scale(scale)))

        return hook

    def details(self) -> dict:
        before = "-guidance_scale (opposite guidance)" if self.opposite else f"{float(self.pre_switch_scale):g}"
        return {"guidance_before_switch": before}


@register_mitigation
@dataclasses.dataclass(eq=False)
class GuidanceOpposite(GuidanceDynamic):
    """Paper 003 Alg. 1 with opposite guidance (v_OG = 1): -lambda before the dynamic switch."""

    name = "guidance_opposite"
    changes = ("sampler: guidance scale -lambda until the first local minimum of ||eps_cond - eps_uncond||^2 "
               "along each trajectory, +lambda after (lambda: the sampler's guidance scale)")

    opposite: bool = True


@register_mitigation
@dataclasses.dataclass(eq=False)
class OverestimationSwitch(_Sampler):
    """Paper 002 App. H: the unconditional prediction at every step where delta_t > -gamma."""

    name = "overestimation_switch"
    changes = ("sampler: at each step where the decomposition x_t = w0 x0_hat + wT x_T deviates by "
               "delta_t > -gamma, guidance scale 0 (the unconditional prediction)")

    gamma: float = 0.2

    def __post_init__(self) -> None:
        if not float(self.gamma) >= 0:
            raise MemtrainError(f"overestimation_switch: gamma must be >= 0, got {self.gamma}")

    def guidance_hook(self, bundle, settings):
        scale = float(settings.guidance_scale)
        abar_all = bundle.make_scheduler(settings.scheduler).alphas_cumprod
        state: dict = {}

        def hook(step, t, x_t, eps_cond, eps_uncond):
            if step == 0:
                state["x_T"] = x_t.detach().clone()
            delta = step_delta(x_t, state["x_T"], eps_cond, eps_uncond, scale, float(abar_all[int(t)])).to(x_t.device)
            return torch.where(delta > -float(self.gamma), torch.zeros_like(delta), torch.full_like(delta, scale))

        return hook

    def details(self) -> dict:
        return {"x0_hat": "predicted at each step from the guided noise prediction",
                "x_T": "the sampler's initial latent"}
