"""The audit's units of work: one chunk of targets in one stage (plain prompts, mitigated
prompts, attack, control), sampled with the (mitigated) sampler and scored, the figures of a
stage and a mitigation's report row built from them. Every function takes the run's Context; results carry global indices so processes gather
them in order."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

import dataclasses

from memtrain.attack import AttackConfig, DoriAttack, GCGAttack, PromptAttack, attacked_condition
from memtrain.core import report
from memtrain.core import progress
from memtrain.core import run as dist
from memtrain.core.diffusion import images_to_latents
from memtrain.core.journal import NoJournal
from memtrain.core.manifest import load_image
from memtrain.core.sampling import SamplerSettings
from memtrain.core.text import encode_prompts
from memtrain.eval.audit.recipe import CONTROL_STREAM, AuditRecipe
from memtrain.eval.audit.verdict import verdict, verdict_reason
from memtrain.eval.measure import Measurement, measure
from memtrain.eval.utility import ReferenceFeatures
from memtrain.metrics import not_computed



@dataclass
class ItemScores:
    """One input's scores in one stage; picklable, processes exchange it."""

    index: int
    id: str
    sscd_orig: np.ndarray | None = None  # (S,)
    gen_embeddings: np.ndarray | None = None  # (S, D)
    sscd_gen: np.ndarray | None = None  # (S,) vs the unmitigated generation of the same seed
    a_clip: np.ndarray | None = None  # (S,) cosine of each generation with the input's prompt
    thumb: np.ndarray | None = None  # uint8 HWC: the best-SSCD_Orig generation (grid rows only)
    failed: str | None = None  # the attack stopped on this input (non-finite loss); not scored
    found_prompt: str | None = None  # the prompt-space attack's string (attack rows)
    adv_embedding: np.ndarray | None = None  # the attack's (L, D) output, exported with the report


@dataclass
class Context:
    """What every unit of audit work needs: model, descriptor, scorer, sampler, seeds, recipe, attack."""

    bundle: Any
    descriptor: Any
    scorer: Any
    clip_reason: dict | None
    settings: SamplerSettings
    seeds: list[int]
    recipe: AuditRecipe
    attack: AttackConfig
    accelerator: Any = None
    progress: bool = False
    latents: dict = field(default_factory=dict)  # (stream, index) -> target latent (1, C, h, w)
    journal: Any = field(default_factory=NoJournal)  # finished units (core.journal), reused on --resume
    reference_features: ReferenceFeatures = field(default_factory=ReferenceFeatures)  # FID/KID's, once a run

    def stage(self, name: str, total: int | None, unit: str = "targets"):
        """A progress stage on the main process (memtrain.core.progress); quiet under --no_progress."""
        return progress.stage(f"audit: {name}", total, unit, self.progress and dist.is_main(self.accelerator))


def _latents(ctx: Context, stream: str, chunk, images) -> torch.Tensor:
    """The targets' latents, encoded once (no mitigation touches the autoencoder)."""
    missing = [(i, im) for (i, _), im in zip(chunk, images) if (stream, i) not in ctx.latents]
    if missing:
        encoded = images_to_latents(ctx.bundle, [im for _, im in missing])
        for (i, _), latent in zip(missing, encoded):
            ctx.latents[(stream, i)] = latent[None]
    return torch.cat([ctx.latents[(stream, i)] for i, _ in chunk])


def score(ctx: Context, chunk, cond: torch.Tensor, images, reference: np.ndarray | None = None,
          mitigation=None, failed: dict[int, str] | None = None, thumbs: bool = True) -> list[tuple[int, ItemScores]]:
    """Sample every live row of `cond` (N, L, D) x seeds with the (mitigated) sampler, score it
    against the training images (and the reference generations), and A_CLIP with the prompts."""
    failed = failed or {}
    live = [k for k in range(len(chunk)) if k not in failed]
    out = {k: ItemScores(index=chunk[k][0], id=chunk[k][1].id, failed=failed[k]) for k in failed}
    if live:
        m = measure(
            ctx.bundle, cond[live], ctx.seeds, ctx.descriptor, ctx.settings,
            train_images=[images[k] for k in live],
            reference_embeddings=None if reference is None else reference[live],
            **({} if mitigation is None else mitigation.sampling_kwargs(ctx.bundle, ctx.settings)),
        )
        cos = None
        if ctx.scorer is not None:
            texts = [chunk[k][1].prompt for k in live for _ in ctx.seeds]
            cos = ctx.scorer.score(m.images.flatten(0, 1), texts).reshape(len(live), len(ctx.seeds))
        for row, k in enumerate(live):
            index = chunk[k][0]
            best = int(np.argmax(m.sscd_orig[row]))
            thumb = (np.asarray(report.thumbnail(m.images[row, best], ctx.recipe.grid_cell))
                     if thumbs and index < ctx.recipe.grid_items else None)
            out[k] = ItemScores(
                index=index, id=chunk[k][1].id, sscd_orig=m.sscd_orig[row], gen_embeddings=m.gen_embeddings[row],
                sscd_gen=None if m.sscd_gen is None else m.sscd_gen[row],
                a_clip=None if cos is None else cos[row], thumb=thumb,
            )
    return [(chunk[k][0], out[k]) for k in range(len(chunk))]


def attack_config(ctx: Context, mitigation) -> tuple[AttackConfig, str]:
    """The attack's settings against `mitigation` and which variant they are: the adaptive variant
    spends its budget only on the timesteps where the mitigated sampler still uses the text."""
    config = ctx.attack
    window = None if mitigation is None else mitigation.text_timesteps(
        ctx.bundle.scheduler.config.num_train_timesteps)
    if window is None or not ctx.recipe.adaptive_attack:
        return config, "standard: all timesteps"
    lo, hi = config.timesteps(ctx.bundle.scheduler.config.num_train_timesteps)
    lo, hi = max(lo, window[0]), min(hi, window[1])
    if lo >= hi:
        return config, "standard: all timesteps (the text window misses the attack's range)"
    return dataclasses.replace(config, timestep_range=(lo, hi)), f"adaptive: timesteps [{lo}, {hi})"


def attack_name(ctx: Context, space: str) -> str:
    """The attack that runs in an attack space: dori (embedding), pez or gcg (prompt: recipe key prompt_attack)."""
    return ctx.recipe.prompt_attack if space == "prompt" else "dori"


def _attack(ctx: Context, chunk, latents: torch.Tensor, mitigation, stream_offset: int = 0, space: str = "embedding"):
    indices = [stream_offset + i for i, _ in chunk]  # global: results do not depend on world size
    name = attack_name(ctx, space)
    extra = {"gcg": ctx.recipe.gcg} if name == "gcg" else {}
    cls = {"dori": DoriAttack, "pez": PromptAttack, "gcg": GCGAttack}[name]
    return cls(ctx.bundle, latents, [it.prompt for _, it in chunk], attack_config(ctx, mitigation)[0],
               mitigation=mitigation, indices=indices, **extra).run(ctx.recipe.robustness_budgets)


def _scored_attack(ctx: Context, chunk, result, images, ref, mitigation, stage: str) -> dict:
    """{stage: rows} for the attack's result, plus {"curve.<stage>.<b>": rows} for each budget
    snapshot (the robustness curve; no grid thumbnails)."""
    rows = {stage: _with_attack(score(ctx, chunk, _attacked(ctx, result, mitigation), images, ref, mitigation,
                                      failed=result.reasons), result)}
    for budget, snap in result.snapshots.items():
        scored = score(ctx, chunk, _attacked(ctx, snap, mitigation), images, ref, mitigation, failed=snap.reasons,
                       thumbs=False)
        rows[f"curve.{stage}.{budget}"] = scored
    return rows


def _attacked(ctx: Context, result, mitigation) -> torch.Tensor:
    """What the deployed pipeline samples from: an embedding through the mitigation's text path,
    or a found prompt string through the whole of it (prompt rewrites included)."""
    if result.prompts is not None:
        m = mitigation
        return (m.encode(ctx.bundle, result.prompts) if m is not None else encode_prompts(ctx.bundle, result.prompts)).embeddings
    return attacked_condition(result, mitigation)


def _with_attack(rows, result) -> list:
    """Attack rows with the found prompt and the adversarial embedding attached (for export)."""
    out = []
    for k, (index, row) in enumerate(rows):
        row.adv_embedding = result.embeddings[k].numpy()
        row.found_prompt = None if result.prompts is None else result.prompts[k]
        out.append((index, row))
    return out


def _images(chunk) -> list:
    return [load_image(item) for _, item in chunk]


def unmitigated_chunk(ctx: Context, chunk) -> list[tuple[int, ItemScores]]:
    """(a): the plain model on the memorized prompts."""
    cond = encode_prompts(ctx.bundle, [it.prompt for _, it in chunk]).embeddings
    return score(ctx, chunk, cond, _images(chunk))


def target_chunk(ctx: Context, mitigation, chunk, reference: dict[int, np.ndarray], spaces=("embedding",)):
    """(b) and (c) for one chunk with `mitigation` in place: {"prompt": rows, "attack.<space>": rows}
    for each attack space (embedding, prompt)."""
    images = _images(chunk)
    ref = np.stack([reference[i] for i, _ in chunk])
    cond = mitigation.encode(ctx.bundle, [it.prompt for _, it in chunk]).embeddings
    rows = {"prompt": score(ctx, chunk, cond, images, ref, mitigation)}
    for space in spaces:
        result = _attack(ctx, chunk, _latents(ctx, "target", chunk, images), mitigation, space=space)
        rows.update(_scored_attack(ctx, chunk, result, images, ref, mitigation, f"attack.{space}"))
    return rows


def control_chunk(ctx: Context, mitigation, chunk, space: str = "embedding") -> dict:
    """(d): the same attack on held-out images, scored against them: {"control.<space>": rows, curves}."""
    images = _images(chunk)
    result = _attack(ctx, chunk, _latents(ctx, "control", chunk, images), mitigation, CONTROL_STREAM, space)
    return _scored_attack(ctx, chunk, result, images, None, mitigation, f"control.{space}")


def stage_figures(items: Sequence[ItemScores], ctx: Context) -> dict:
    """The overall figures of one row of the table (failed inputs left out, and counted)."""
    ok = [r for r in items if r.failed is None]
    if not ok:
        reason = not_computed("no input left to score" + (" (the attack failed on all)" if items else ""))
        return {"n": 0, "n_failed": len(items), "mr": reason, "sscd_orig_median": reason,
                "sscd_orig_mean": reason, "sscd_orig_std": reason, "d_sscd": reason, "a_clip": reason}
    m = Measurement(sscd_orig=np.stack([r.sscd_orig for r in ok]), gen_embeddings=np.stack([r.gen_embeddings for r in ok]),
                    images=torch.empty(0),
                    sscd_gen=np.stack([r.sscd_gen for r in ok]) if ok[0].sscd_gen is not None else None)
    figures = {**m.figures(threshold=ctx.recipe.threshold), "n_failed": len(items) - len(ok)}
    if len(ctx.seeds) < 2:
        figures["d_sscd"] = not_computed("D_SSCD needs at least 2 seeds per input")
    if ctx.scorer is None:
        figures["a_clip"] = ctx.clip_reason
    else:
        per_item = np.array([float(np.mean(r.a_clip)) for r in ok])
        figures["a_clip"] = {"value": float(per_item.mean()), "std": float(per_item.std()),
                             "backend": ctx.scorer.name}
    return figures


def _max(r: ItemScores) -> float | None:
    return None if r.sscd_orig is None else float(np.max(r.sscd_orig))


def assemble_result(ctx: Context, mitigation, rows: dict, baseline, fid, kid, notes,
                    checksum: str, per_prompt: bool) -> dict:
    """One mitigation's report.json entry from its stage rows, with verdict and reason."""
    figures = {stage: stage_figures(items, ctx) for stage, items in rows.items()}
    result = {
        "mitigation": mitigation.name,
        "variant": mitigation.variant,
        "mr_unmitigated": baseline.figures["mr"],
        "mr_prompt": figures["prompt"]["mr"],
        "mr_attack": figures["attack"]["mr"],
        "mr_control": figures["control"]["mr"],
    }
    rates = [result[k] for k in ("mr_unmitigated", "mr_prompt", "mr_attack", "mr_control")]
    v = verdict(mitigation.name, *rates, rule=ctx.recipe.verdict)
    failed = [{"id": r.id, "stage": stage, "reason": r.failed}
              for stage in ("attack", "control") for r in rows[stage] if r.failed]
    result.update(
        verdict=v,
        verdict_reason=verdict_reason(mitigation.name, v, result, ctx.recipe.verdict),
        unmitigated=baseline.figures, prompt=figures["prompt"], attack=figures["attack"],
        control=figures["control"],
        utility={"fid": fid, "kid": kid, "fid_unmitigated": baseline.fid, "kid_unmitigated": baseline.kid,
                 "notes": list(notes)},
        pruning="per prompt" if per_prompt else "for all prompts at once",
        description=mitigation.describe(),
        weights_restored=True, weights_checksum=checksum,
        per_item=[{"id": u.id, "sscd_orig_unmitigated": _max(u), "sscd_orig_prompt": _max(p),
                   "sscd_orig_attack": _max(a), "attack_failed": a.failed is not None,
                   **({"found_prompt": a.found_prompt} if a.found_prompt is not None else {})}
                  for u, p, a in zip(baseline.items, rows["prompt"], rows["attack"])],
        control_items=[{"id": c.id, "sscd_orig_attack": _max(c), "attack_failed": c.failed is not None,
                        **({"found_prompt": c.found_prompt} if c.found_prompt is not None else {})}
                       for c in rows["control"]],
        failed_targets=failed,
    )
    return result
