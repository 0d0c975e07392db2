"""The Dori attack (paper 004, Sec. 3.1, Alg. 1, App. F): adversarial text embeddings.

For each target latent x_mem an embedding y_adv (77, D) is optimized with Adam so that the
frozen (possibly mitigated) U-Net's own training loss on x_mem is small: every step draws
fresh noise eps ~ N(0, I) and timesteps t ~ U{lo..hi-1}, noises x_mem with the training
(DDPM) schedule and regresses the model's prediction type (epsilon, v or sample). If y_adv
brings x_mem back within the calibrated budget (50 steps) the image is still memorized.

All targets are optimized together: their noise samples go through one U-Net forward/backward
per step, each row conditioned on its own target's embedding. The per-target losses are
summed, never averaged over targets, so row b of the gradient is exactly d loss_b / d y_b;
Adam is element-wise, so one optimizer on the stacked (B, 77, D) parameter takes the same
steps as B separate optimizers. Each target draws its noise from its own generator seeded by
(config.seed, target index), so `attack` and the one-target-at-a-time `attack_loop` see the
same noise and agree to float tolerance (tests/test_attack.py checks it).

Longer than 400 lines because the batched step, its fp16 loss scaling and its out-of-memory retry
share one state (the draws of a step are redone, not redrawn); the scaling is the next to move out.

Half precision: y_adv and Adam's state stay float32 and only the forward runs in the
model's dtype. In fp16 each step's loss is multiplied by a dynamic loss scale before backward so
small gradients do not flush to zero in fp16; a step whose gradients overflow is redone with the
same noise draws at half the scale, and the gradients are divided by the scale before Adam. bf16
(fp32's exponent range) and fp32 run unscaled. A step that runs out of memory is redone once with
half as many U-Net rows per chunk.
"""

from __future__ import annotations

import logging
import math
import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch

from memtrain.core import progress
from memtrain.core.diffusion import frozen, generator, regression_target, training_scheduler
from memtrain.core.errors import MemtrainError
from memtrain.core.runtime import is_out_of_memory, release_cached_memory
from memtrain.core.text import TokenLayout, encode_prompts

log = logging.getLogger(__name__)

INITS = ("prompt", "random", "other_prompt", "alternate")
# forward(x_t, t, y) -> raw U-Net output, the same contract as memtrain.core.sampling.sample
UNetForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# fp16 loss scaling: the first step's scale, and the floor that bounds the halvings (at scale 1 a
# gradient that is still non-finite is the target's own, not an artefact of the scale)
FP16_LOSS_SCALE = 2.0**16
MIN_LOSS_SCALE = 1.0


def initial_loss_scale(dtype: torch.dtype) -> float:
    """The loss scale an attack starts with: FP16_LOSS_SCALE for fp16 models, else 1 (no scaling:
    bf16 has fp32's exponent range, so its gradients do not underflow)."""
    return FP16_LOSS_SCALE if dtype == torch.float16 else 1.0


@dataclass
class AttackConfig:
    """Dori's settings: the one attack vocabulary of the audit, the trainer and the benchmarks
    (a recipe's `attack:` section maps onto it). Invalid values are one-line errors on build."""

    steps: int = 50  # the paper's calibrated budget (App. F.2)
    lr: float = 0.1
    noise_samples: int = 8  # (eps, t) draws per target and step
    # "prompt" | "random" (N(0, I)) | "other_prompt" | "alternate": the fine-tuner's schedule
    # (paper 004 Alg. 2), prompt in odd epochs and random in even ones, resolved by for_epoch()
    init: Literal["prompt", "random", "other_prompt", "alternate"] = "prompt"
    other_prompt: str | None = None
    l2_radius: float | None = None  # project each y_adv onto ||y|| <= radius (App. F.3)
    seed: int = 0
    timestep_range: tuple[int, int] | None = None  # [lo, hi) of training timesteps; None = all
    max_batch: int = 64  # U-Net rows per forward; a larger step's chunks add their gradients into one Adam step

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        if int(self.steps) < 1:
            raise MemtrainError(f"attack steps must be >= 1, got {self.steps}")
        if int(self.noise_samples) < 1:
            raise MemtrainError(f"attack noise_samples must be >= 1, got {self.noise_samples}")
        if int(self.max_batch) < 1:
            raise MemtrainError(f"attack max_batch must be >= 1, got {self.max_batch}")
        if not float(self.lr) > 0:
            raise MemtrainError(f"attack lr must be > 0, got {self.lr}")
        if self.init not in INITS:
            raise MemtrainError(f"attack init '{self.init}' is not one of {', '.join(INITS)}")
        if self.init == "other_prompt" and not self.other_prompt:
            raise MemtrainError("attack init 'other_prompt' needs other_prompt (a non-memorized prompt)")
        if self.l2_radius is not None and not float(self.l2_radius) > 0:
            raise MemtrainError(f"attack l2_radius must be > 0 or None, got {self.l2_radius}")

    def for_epoch(self, epoch: int, seed: int) -> "AttackConfig":
        """The settings for one fine-tuning epoch (counted from 0): `alternate` resolved (Alg. 2
        counts epochs from 1: odd -> the prompt embedding, even -> N(0, I)) and the epoch's seed."""
        init = self.init
        if init == "alternate":
            init = "prompt" if (epoch + 1) % 2 == 1 else "random"
        return dataclasses.replace(self, init=init, seed=int(seed))

    def timesteps(self, num_train_timesteps: int) -> tuple[int, int]:
        lo, hi = self.timestep_range or (0, num_train_timesteps)
        if not 0 <= int(lo) < int(hi) <= num_train_timesteps:
            raise MemtrainError(
                f"attack timestep_range {self.timestep_range} must satisfy 0 <= lo < hi <= "
                f"{num_train_timesteps} (the model's training timesteps)"
            )
        return int(lo), int(hi)


@dataclass
class AttackResult:
    """The attack's output for B targets: y_adv, per-step losses, the init layout, stopped targets."""

    embeddings: torch.Tensor  # (B, 77, D) y_adv, detached, untransformed, float32 on CPU
    loss_trace: torch.Tensor  # (steps, B): each target's loss at each step; NaN after it stopped
    layout: TokenLayout  # token layout of the init prompts (what mitigation transforms use)
    failed: list[int] = field(default_factory=list)  # targets stopped on a non-finite loss/grad
    reasons: dict[int, str] = field(default_factory=dict)  # target index -> why and when
    prompts: list[str] | None = None  # the prompt-space attack's token strings (None: embedding attack)
    snapshots: dict[int, "AttackResult"] = field(default_factory=dict)  # budget (steps) -> the result then

    @property
    def final_loss(self) -> torch.Tensor:
        """(B,) each target's last finite loss (NaN if it never had one)."""
        last = torch.full((self.loss_trace.shape[1],), float("nan"))
        for b, column in enumerate(self.loss_trace.T):
            finite = column[torch.isfinite(column)]
            if len(finite):
                last[b] = finite[-1]
        return last


# --- small pieces -------------------------------------------------------------------------------

def _masks(layout: TokenLayout) -> tuple[torch.Tensor, ...]:
    return layout.sot, layout.prompt, layout.eot, layout.pad


def slice_layout(layout: TokenLayout, index: Sequence[int] | slice) -> TokenLayout:
    """The token layout of a subset of rows."""
    return TokenLayout(*(m[index] for m in _masks(layout)))


def cat_layouts(layouts: Sequence[TokenLayout]) -> TokenLayout:
    """Token layouts of several batches, concatenated by row."""
    return TokenLayout(*(torch.cat(ms) for ms in zip(*map(_masks, layouts))))


def project_l2(embeddings: torch.Tensor, radius: float) -> torch.Tensor:
    """Rows (B, L, D) with ||y_b|| > radius scaled back onto the ball (App. F.3)."""
    norms = embeddings.flatten(1).norm(dim=1).clamp_min(1e-12)
    scale = (radius / norms).clamp(max=1.0)
    return embeddings * scale.view(-1, *([1] * (embeddings.dim() - 1)))


def default_forward(bundle) -> UNetForward:
    """The plain U-Net call as a UNetForward (raw output for x_t, t, y)."""
    return lambda x, t, y: bundle.unet(x, t, encoder_hidden_states=y).sample


def resolve_forward(bundle, mitigation=None, unet_forward: UNetForward | None = None) -> UNetForward:
    """An explicit unet_forward wins, then the mitigation's (its `attack_forward`: the U-Net call the
    attack differentiates through), then the plain U-Net call."""
    if unet_forward is not None:
        return unet_forward
    custom = mitigation.attack_forward(bundle) if mitigation is not None else None
    return custom or default_forward(bundle)


def attacked_condition(result: AttackResult, mitigation=None) -> torch.Tensor:
    """The embeddings to sample from: y_adv as the mitigated model sees it. Pair with
    `uncond=mitigation.unconditional(bundle)` in memtrain.core.sampling.sample."""
    if mitigation is None:
        return result.embeddings
    with torch.no_grad():
        return mitigation.transform_embeddings(result.embeddings, result.layout)


def initial_embeddings(bundle, init_prompts: Sequence[str], config: AttackConfig,
                       generators: Sequence[torch.Generator], mitigation=None
                       ) -> tuple[torch.Tensor, TokenLayout]:
    """y_adv^(0) (B, 77, D) in float32 and the init prompts' layout (mitigation's tokenizer,
    so pad/eot transforms act on the adversarial embedding as on the prompt's). The layout is
    the init (memorized) prompts' for every init mode: the adversarial embedding stands in for
    that prompt, so the defender's transform treats its positions as that prompt's tokens."""
    tokenizer = mitigation.tokenizer(bundle) if mitigation is not None else None
    encoded = encode_prompts(bundle, list(init_prompts), tokenizer=tokenizer)
    layout = encoded.layout
    if config.init == "prompt":
        start = encoded.embeddings
    elif config.init == "other_prompt":
        other = encode_prompts(bundle, [config.other_prompt], tokenizer=tokenizer).embeddings
        start = other.expand(len(init_prompts), -1, -1)
    else:  # random: drawn first from each target's own stream
        shape = tuple(encoded.embeddings.shape[1:])
        start = torch.stack([torch.randn(shape, generator=g) for g in generators])
    return start.detach().float().cpu().clone(), layout.to("cpu")


# --- the attack ---------------------------------------------------------------------------------

class DoriAttack:
    """State of one attack over B targets; `step()` is one Adam step for all live targets.

    `indices` name the targets' RNG streams (default 0..B-1), so a subset run on its own
    reproduces the same targets inside a larger batch.
    """

    def __init__(self, bundle, target_latents: torch.Tensor, init_prompts: Sequence[str],
                 config: AttackConfig | None = None, mitigation=None,
                 unet_forward: UNetForward | None = None, indices: Sequence[int] | None = None):
        self.config = config or AttackConfig()
        self.config.check()
        if self.config.init == "alternate":
            raise MemtrainError("attack init 'alternate' is a per-epoch schedule: resolve it with "
                                "AttackConfig.for_epoch(epoch, seed) before attacking")
        if target_latents.dim() != 4:
            raise MemtrainError(f"target_latents must be (B, C, h, w), got {tuple(target_latents.shape)}")
        n = target_latents.shape[0]
        if len(init_prompts) != n:
            raise MemtrainError(f"{len(init_prompts)} init prompts for {n} target latents")
        self.indices = list(range(n)) if indices is None else [int(i) for i in indices]
        if len(self.indices) != n:
            raise MemtrainError(f"{len(self.indices)} RNG indices for {n} target latents")
        self.bundle, self.mitigation = bundle, mitigation
        self.device, self.dtype = bundle.device, bundle.dtype
        self.scheduler = training_scheduler(bundle)
        self.t_range = self.config.timesteps(self.scheduler.config.num_train_timesteps)
        self.forward = resolve_forward(bundle, mitigation, unet_forward)
        self.generators = [generator(self.config.seed, i) for i in self.indices]
        start, self.layout = self.initial_state(list(init_prompts))
        self.latents = target_latents.detach().float().cpu()
        # Adam state stays in float32 even for half-precision models
        self.y = torch.nn.Parameter(start.to(self.device))
        self.optimizer = torch.optim.Adam([self.y], lr=float(self.config.lr))
        self.live = torch.ones(n, dtype=torch.bool)
        # the step's current scale (fp16 only; 1 otherwise) and U-Net rows per chunk (halved
        # once on out of memory); the config is left alone since callers share it
        self.loss_scale = initial_loss_scale(self.dtype)
        self.max_batch = int(self.config.max_batch)
        self._batch_halved = False
        self.failed: list[int] = []
        self.reasons: dict[int, str] = {}
        self.trace: list[torch.Tensor] = []

    def initial_state(self, init_prompts: list[str]) -> tuple[torch.Tensor, TokenLayout]:
        """The optimized parameter's start (B, ...) and the token layout the mitigation sees."""
        return initial_embeddings(self.bundle, init_prompts, self.config, self.generators, self.mitigation)

    def condition(self) -> torch.Tensor:
        """What the U-Net sees: the mitigation's transform of y_adv (differentiable)."""
        y = self.y.to(self.dtype)
        if self.mitigation is None:
            return y
        return self.mitigation.transform_embeddings(y, self.layout.to(self.device))

    def _draw(self, live: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows for this step: owner target (R,), noise (R, C, h, w), timesteps (R,)."""
        k, lo, hi = self.config.noise_samples, *self.t_range
        owners, noise, times = [], [], []
        for b in live:
            g = self.generators[b]
            times.append(torch.randint(lo, hi, (k,), generator=g))
            noise.append(torch.randn((k, *self.latents.shape[1:]), generator=g))
            owners.append(torch.full((k,), b))
        return torch.cat(owners), torch.cat(noise), torch.cat(times)

    def _chunk_loss(self, owners: torch.Tensor, noise: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        """Per-row training loss (R,) of one chunk, with a graph back to y_adv."""
        x0 = self.latents[owners]
        x_t = self.scheduler.add_noise(x0, noise, times)
        target = regression_target(self.scheduler, x0, noise, times)
        dev = self.device
        cond = self.condition()[owners.to(dev)]
        out = self.forward(x_t.to(dev, self.dtype), times.to(dev), cond)
        if not out.requires_grad:
            raise MemtrainError("the U-Net output does not depend on the text embedding "
                                "(no cross-attention?): there is nothing to attack")
        return (out.float() - target.to(dev)).pow(2).flatten(1).mean(dim=1)

    def step(self) -> torch.Tensor:
        """One attack step; returns (B,) losses (NaN for targets already stopped).

        In fp16 the gradients come from the loss times `loss_scale`; if a target with a finite
        loss gets a non-finite gradient, the scale is halved and the step redone with the same
        noise draws, down to MIN_LOSS_SCALE. Targets whose loss is non-finite are stopped (the
        scale cannot help them), as are targets whose gradient is non-finite even at the floor.
        """
        n = len(self.indices)
        losses = torch.full((n,), float("nan"))
        live = self.live.nonzero().flatten().tolist()
        if not live:
            self.trace.append(losses)
            return losses
        owners, noise, times = self._draw(live)  # drawn once: every redo sees the same noise
        tries: list[tuple[float, set[int]]] = []
        while True:
            step_loss = self._backward(owners, noise, times)
            grad_ok = torch.isfinite(self.y.grad).flatten(1).all(dim=1).cpu()
            overflow = {b for b in live if math.isfinite(float(step_loss[b])) and not bool(grad_ok[b])}
            tries.append((self.loss_scale, overflow))
            if not overflow or self.loss_scale <= MIN_LOSS_SCALE:
                break
            self.loss_scale = max(MIN_LOSS_SCALE, self.loss_scale / 2)
            log.debug("attack step %d: gradient overflow in fp16, loss scale halved to %g",
                      len(self.trace), self.loss_scale)
        if self.loss_scale != 1.0:  # a power of two: unscaling is exact
            self.y.grad.div_(self.loss_scale)
        if overflow:
            # stopped below; the next steps go on at the largest scale tried at which only these
            # targets overflowed, so the floor does not cost the others their small gradients
            self.loss_scale = max(s for s, bad in tries if bad <= overflow)
        losses[live] = step_loss[live]
        self._stop_non_finite(live, losses)
        self._update()
        self.trace.append(losses)
        return losses

    def _backward(self, owners: torch.Tensor, noise: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        """Fresh gradients of the step's rows (loss x loss_scale) in chunks of `max_batch` rows;
        returns each target's unscaled loss (n,). Out of memory halves the chunk once and redoes
        the whole step (memtrain.core.runtime.run_in_chunks' rule); a second time is an error."""
        while True:
            self.optimizer.zero_grad(set_to_none=False)
            try:
                return self._accumulate(owners, noise, times)
            except Exception as err:
                if not is_out_of_memory(err):
                    raise
                release_cached_memory()
                if self._batch_halved or self.max_batch == 1:
                    raise MemtrainError(
                        f"out of memory in stage 'attack' at batch {self.max_batch} even after halving: "
                        "lower attack max_batch or --max_memory (or use --dtype fp16/bf16)") from None
                self.max_batch, self._batch_halved = max(1, self.max_batch // 2), True
                log.warning("out of memory in stage 'attack': redoing the step with batch %d", self.max_batch)

    def _accumulate(self, owners: torch.Tensor, noise: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        n, k = len(self.indices), self.config.noise_samples
        step_loss = torch.zeros(n)
        for s in range(0, len(owners), self.max_batch):
            part = slice(s, s + self.max_batch)
            rows = self._chunk_loss(owners[part], noise[part], times[part])
            # sum over targets (not mean): each target's gradient is its own loss's gradient
            loss = rows.sum() / k
            (loss * self.loss_scale if self.loss_scale != 1.0 else loss).backward()
            step_loss.index_add_(0, owners[part], rows.detach().cpu() / k)
        return step_loss

    def _stop_non_finite(self, live: list[int], losses: torch.Tensor) -> None:
        grad_ok = torch.isfinite(self.y.grad).flatten(1).all(dim=1).cpu()
        for b in live:
            if not math.isfinite(float(losses[b])):
                self._stop(b, f"non-finite loss ({float(losses[b])}) at step {len(self.trace)}")
            elif not bool(grad_ok[b]):
                self._stop(b, f"non-finite gradient at step {len(self.trace)}")

    def _stop(self, b: int, reason: str) -> None:
        self.live[b] = False
        self.failed.append(b)
        self.reasons[b] = reason

    @torch.no_grad()
    def _update(self) -> None:
        dead = (~self.live).to(self.device)
        keep = self.y.detach().clone()
        self.y.grad[dead] = 0
        self.optimizer.step()
        if self.config.l2_radius is not None:
            self.y.copy_(project_l2(self.y, float(self.config.l2_radius)))
        # Adam's momentum would keep moving a zero-gradient row: stopped rows are pinned
        self.y[dead] = keep[dead]

    def result(self) -> AttackResult:
        trace = torch.stack(self.trace) if self.trace else torch.empty(0, len(self.indices))
        return AttackResult(
            embeddings=self.y.detach().float().cpu().clone(), loss_trace=trace,
            layout=self.layout, failed=sorted(self.failed), reasons=dict(self.reasons),
        )

    def run(self, budgets: Sequence[int] = ()) -> AttackResult:
        """All `config.steps` steps; `budgets` (< steps) also keep the result after that many steps
        (a robustness curve from one run: the first b steps of a longer attack are the b-step attack)."""
        keep = sorted({int(b) for b in budgets if 0 < int(b) < self.config.steps})
        snapshots = {}
        with frozen(self.bundle.unet):
            for step in range(1, self.config.steps + 1):
                self.step()
                progress.note(f"attack step {step}/{self.config.steps}")
                if step in keep:
                    snapshots[step] = self.result()
        final = self.result()
        final.snapshots = snapshots
        return final


def attack(bundle, target_latents: torch.Tensor, init_prompts: Sequence[str],
           config: AttackConfig | None = None, mitigation=None,
           unet_forward: UNetForward | None = None) -> AttackResult:
    """Optimize one adversarial embedding per target latent, all targets batched.

    Pruning mitigations must already be applied to the weights by the caller; text-path
    mitigations act through `mitigation.transform_embeddings` inside the forward.
    """
    return DoriAttack(bundle, target_latents, init_prompts, config, mitigation, unet_forward).run()


def attack_loop(bundle, target_latents: torch.Tensor, init_prompts: Sequence[str],
                config: AttackConfig | None = None, mitigation=None,
                unet_forward: UNetForward | None = None) -> AttackResult:
    """The same attack, one target at a time (the reference for `attack` and the benchmark)."""
    parts = [
        DoriAttack(bundle, target_latents[i : i + 1], [init_prompts[i]], config, mitigation,
                   unet_forward, indices=[i]).run()
        for i in range(target_latents.shape[0])
    ]
    failed = [i for i, p in enumerate(parts) if p.failed]
    return AttackResult(
        embeddings=torch.cat([p.embeddings for p in parts]),
        loss_trace=torch.cat([p.loss_trace for p in parts], dim=1),
        layout=cat_layouts([p.layout for p in parts]),
        failed=failed, reasons={i: parts[i].reasons[0] for i in failed},
    )


def diffusion_loss(bundle, target_latents: torch.Tensor, embeddings: torch.Tensor,
                   noise: torch.Tensor, timesteps: torch.Tensor, mitigation=None,
                   layout: TokenLayout | None = None) -> torch.Tensor:
    """(B,) training loss of each target under fixed noise (B, K, C, h, w) and timesteps (B, K):
    a deterministic yardstick for comparing embeddings (e.g. before vs after the attack)."""
    scheduler = training_scheduler(bundle)
    b, k = timesteps.shape
    x0 = target_latents.float().cpu().repeat_interleave(k, dim=0)
    eps, t = noise.reshape(b * k, *noise.shape[2:]).float(), timesteps.reshape(-1)
    cond = embeddings.to(bundle.device, bundle.dtype)
    if mitigation is not None:
        cond = mitigation.transform_embeddings(cond, layout.to(bundle.device))
    forward = resolve_forward(bundle, mitigation)
    with torch.no_grad():
        out = forward(scheduler.add_noise(x0, eps, t).to(bundle.device, bundle.dtype),
                      t.to(bundle.device), cond.repeat_interleave(k, dim=0))
    target = regression_target(scheduler, x0, eps, t).to(out.device)
    return (out.float() - target).pow(2).flatten(1).mean(dim=1).reshape(b, k).mean(dim=1).cpu()
