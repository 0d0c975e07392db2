"""Audit mitigations: does a mitigated model still hold its memorized images? (paper 004 Table 1)

For every mitigation named, on the memorized targets (prompt + training image):

(a) the unmitigated model on the memorized prompts (computed once; its generation embeddings
    are the SSCD_Gen reference of every later row);
(b) the mitigated model on the same prompts (`mitigation.encode`, `.unconditional`,
    `.unet_forward`; pruning mitigations prepared on memorized vs reference prompts, applied);
(c) the Dori attack through the mitigation (`memtrain.attack`), then sampling from the attacked
    condition with the mitigated sampler;
(d) the false-positive control: the same attack aimed at held-out images, scored against them.

Each row: MR, SSCD_Orig (median, mean +- std), SSCD_Gen, D_SSCD, A_CLIP (testbed or user CLIP);
utility: FID/KID on a small utility prompt set, or "not computed" with the reason. Every
mitigation is undone afterwards and the weights' checksum must equal the one taken before.
The verdict per mitigation follows `verdict()`.

Work is cut into fixed global chunks of targets before it is spread over accelerate processes,
and the attack's per-target RNG streams are named by global target index (`DoriAttack(indices=)`),
so 1 and N processes compute the same batches and write the same figures. Only the main process
writes OUT/report.json, OUT/report.md and OUT/grids/, through a staged folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
import yaml

from memtrain import distributed as dist
from memtrain import report
from memtrain.data import ManifestItem, load_image, read_manifest
from memtrain.errors import MemtrainError
from memtrain.measure import Measurement, SamplerSettings, check_seeds, measure
from memtrain.metrics import MR_THRESHOLD, not_computed

logger = logging.getLogger(__name__)

REPO_RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TESTBED_RECIPE = "audit_testbed.yaml"
MODEL_RECIPE = "audit_sd14.yaml"
# The control's attack streams are named CONTROL_STREAM + held-out index, so they never share
# noise with a target's stream whatever the number of targets.
CONTROL_STREAM = 1_000_000
VERDICTS = ("baseline", "removes", "conceals", "ineffective", "inconclusive")


# ----------------------------------------------------------------------------- verdict


SEARCH_SPACE_CHECKS = ("ineffective", "always", "never")


@dataclass(frozen=True)
class VerdictRule:
    """The documented constants of the verdict (all memorization rates, 0..1)."""

    # `removes`: the attack does no better on the targets than on held-out images, up to this
    # margin (paper 004: memorized images come back within 50 steps, held-out ones do not).
    control_margin: float = 0.1
    # `conceals`: prompts no longer replicate: prompt MR at most this ...
    concealed_mr: float = 0.3
    # ... or clearly below the unmitigated MR: at most this fraction of it.
    clearly_below: float = 0.5


def verdict(mitigation: str, mr_unmitigated: float | None, mr_prompt: float | None,
            mr_attack: float | None, mr_control: float | None,
            rule: VerdictRule = VerdictRule()) -> str:
    """One of VERDICTS, first match wins:

    - `baseline`: the `none` mitigation (the unmitigated model itself);
    - `inconclusive`: a rate is missing, or the unmitigated model does not replicate more than
      the control does (nothing memorized to remove: "removes" would be vacuous);
    - `removes`: mr_attack <= mr_control + control_margin;
    - `conceals`: the prompts no longer replicate (mr_prompt <= concealed_mr, or <= clearly_below
      x mr_unmitigated) while the attack does (mr_attack high: above the control by more than the
      margin, which failing `removes` already says);
    - `ineffective`: the attack replicates and so do the prompts.
    """
    if mitigation == "none":
        return "baseline"
    rates = (mr_unmitigated, mr_prompt, mr_attack, mr_control)
    if any(not isinstance(r, (int, float)) for r in rates):
        return "inconclusive"
    if mr_unmitigated <= mr_control + rule.control_margin:
        return "inconclusive"
    if mr_attack <= mr_control + rule.control_margin:
        return "removes"
    hidden = mr_prompt <= rule.concealed_mr or mr_prompt <= rule.clearly_below * mr_unmitigated
    return "conceals" if hidden else "ineffective"


def verdict_reason(name: str, v: str, r: dict, rule: VerdictRule) -> str:
    """The verdict in one sentence with the figures that decided it."""
    f = {k: report.format_value(r[k]) for k in ("mr_unmitigated", "mr_prompt", "mr_attack", "mr_control")}
    if v == "baseline":
        return (f"the unmitigated model: MR {f['mr_prompt']} on the prompts, {f['mr_attack']} under the attack "
                f"(control {f['mr_control']})")
    if v == "inconclusive":
        return (f"the unmitigated model replicates at MR {f['mr_unmitigated']}, not above the false-positive "
                f"control ({f['mr_control']}) by more than {rule.control_margin}: nothing to judge a removal by")
    if v == "removes":
        return (f"under the attack MR is {f['mr_attack']}, within {rule.control_margin} of the false-positive "
                f"control ({f['mr_control']}): the attack finds no more than on held-out images")
    if v == "conceals":
        return (f"the prompts replicate at MR {f['mr_prompt']} (unmitigated {f['mr_unmitigated']}), but the "
                f"attack brings MR back to {f['mr_attack']} (control {f['mr_control']})")
    return (f"the prompts still replicate (MR {f['mr_prompt']}, unmitigated {f['mr_unmitigated']}) and the "
            f"attack reaches {f['mr_attack']} (control {f['mr_control']})")


# ----------------------------------------------------------------------------- recipe


@dataclass
class AttackSettings:
    """Dori settings (memtrain.attack.AttackConfig), as a recipe section."""

    steps: int = 50
    lr: float = 0.1
    noise_samples: int = 8
    init: Literal["prompt", "random", "other_prompt"] = "prompt"
    other_prompt: str | None = None
    l2_radius: float | None = None
    seed: int = 0
    timestep_range: list[int] | None = None  # [lo, hi) of training timesteps
    max_batch: int = 64

    def to_config(self):
        from memtrain.attack import AttackConfig

        values = dataclasses.asdict(self)
        if values["timestep_range"] is not None:
            if len(values["timestep_range"]) != 2:
                raise MemtrainError("recipe key 'attack.timestep_range' must be [lo, hi]")
            values["timestep_range"] = tuple(values["timestep_range"])
        return AttackConfig(**values)  # checks steps >= 1, lr > 0, ... (one-line errors)


@dataclass
class SamplerOverrides:
    """None keeps the model's own default (memtrain.json beside model_index.json, else DDIM 50/7.5)."""

    scheduler: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    batch_size: int | None = None


@dataclass
class AuditRecipe:
    seeds: int = 10  # generations per input (seeds 0..N-1)
    threshold: float = MR_THRESHOLD  # SSCD_Orig above this in any seed = replicated
    max_targets: int | None = None  # the first N memorized targets (None: all)
    control_targets: int | None = None  # held-out images in the control (None: as many as targets)
    reference_prompts: int | None = 64  # non-memorized prompts for NeMo's statistics etc.
    utility_prompts: int | None = 16  # FID/KID prompts (None: the whole utility manifest)
    chunk_targets: int = 16  # targets per work unit (one batched attack each); fixed => same figures for any world size
    prune_per_prompt: bool = False  # prune per memorized prompt (NeMo's protocol) instead of their union
    # Re-measure the prompts with a pruning mitigation's whole search space zeroed: is memorization
    # outside the layers it prunes, or did its selection miss it? "ineffective" (only for that
    # verdict), "always" or "never".
    search_space_check: str = "ineffective"
    attack: AttackSettings = field(default_factory=AttackSettings)
    sampler: SamplerOverrides = field(default_factory=SamplerOverrides)
    mitigations: dict = field(default_factory=dict)  # name -> settings for get_mitigation
    verdict: VerdictRule = field(default_factory=VerdictRule)
    grid_items: int = 8  # targets shown in the grids
    grid_cell: int = 96


def _check_recipe(recipe: AuditRecipe) -> None:
    from memtrain.mitigations import available_mitigations

    positive = {"seeds": recipe.seeds, "chunk_targets": recipe.chunk_targets, "grid_cell": recipe.grid_cell}
    optional = {"max_targets": recipe.max_targets, "control_targets": recipe.control_targets,
                "reference_prompts": recipe.reference_prompts, "utility_prompts": recipe.utility_prompts}
    for key, value in {**positive, **{k: v for k, v in optional.items() if v is not None}}.items():
        if value < 1:
            raise MemtrainError(f"recipe key '{key}' must be >= 1, got {value}")
    if not 0 < recipe.threshold <= 1:
        raise MemtrainError(f"recipe key 'threshold' must be in (0, 1], got {recipe.threshold}")
    if recipe.search_space_check not in SEARCH_SPACE_CHECKS:
        raise MemtrainError(f"recipe key 'search_space_check' must be one of {', '.join(SEARCH_SPACE_CHECKS)}, "
                            f"got {recipe.search_space_check!r}")
    if recipe.grid_items < 0:
        raise MemtrainError(f"recipe key 'grid_items' must be >= 0, got {recipe.grid_items}")
    for name, settings in recipe.mitigations.items():
        if name not in available_mitigations():
            raise MemtrainError(f"recipe key 'mitigations.{name}': unknown mitigation; choose one of "
                                f"{', '.join(available_mitigations())}")
        if not isinstance(settings, dict):
            raise MemtrainError(f"recipe key 'mitigations.{name}' must be a mapping of settings")
    recipe.attack.to_config()


def load_audit_recipe(path: str | Path, attack_steps: int | None = None) -> AuditRecipe:
    """YAML -> AuditRecipe; unknown keys and wrong types are one-line errors naming the key.
    `attack_steps` (the CLI's --attack_steps) replaces attack.steps before the checks."""
    from memtrain.train.recipe import _build  # the trainer's typed YAML mapping, shared

    path = Path(path).expanduser()
    if not path.is_file():
        raise MemtrainError(f"recipe file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        raise MemtrainError(f"recipe '{path}' is not valid YAML") from None
    if not isinstance(data, dict):
        raise MemtrainError(f"recipe '{path}' must be a YAML mapping at the top level")
    recipe = _build(AuditRecipe, data)
    if attack_steps is not None:
        recipe.attack.steps = attack_steps
    _check_recipe(recipe)
    return recipe


def default_recipe_path(on_testbed: bool) -> Path:
    return REPO_RECIPES / (TESTBED_RECIPE if on_testbed else MODEL_RECIPE)


# ----------------------------------------------------------------------------- configuration


@dataclass
class AuditConfig:
    """What the command line sets; the per-model settings are in the recipe."""

    mitigations: list[str]
    model: str | None = None  # default: the cached testbed
    lora: str | None = None  # U-Net LoRA weights fused into the model before auditing
    manifest: str | None = None  # memorized targets (default: testbed memorized)
    control_manifest: str | None = None  # held-out images (default: testbed held_out)
    reference_manifest: str | None = None  # non-memorized prompts (default: testbed unique)
    utility_manifest: str | None = None  # prompts + images for FID/KID (default: testbed utility)
    output_dir: str | None = None  # default: audits/<model>-<time>
    overwrite: bool = False
    report_to: str | None = None  # wandb | tensorboard | none
    seeds: int | None = None  # None: the recipe's
    recipe: str | None = None  # default: by model (testbed recipe without --model)
    metric: str | None = None
    allow_standin: bool = False
    max_targets: int | None = None  # None: the recipe's
    attack_steps: int | None = None  # None: the recipe's
    clip_model: str | None = None  # A_CLIP weights (testbed: its clip/)
    project: str = "memtrain-audit"
    progress: bool = True


@dataclass
class Inputs:
    model_dir: str
    testbed_root: Path | None
    recipe_path: Path
    targets: list[ManifestItem]
    control: list[ManifestItem]
    reference_prompts: list[str]
    utility_manifest: str | None
    manifests: dict
    output_dir: Path


def _check_config(cfg: AuditConfig) -> None:
    if not cfg.mitigations:
        raise MemtrainError("name at least one mitigation (--mitigation none nemo ...)")
    if cfg.report_to not in (None, "none", "wandb", "tensorboard"):
        raise MemtrainError(f"--report_to must be wandb, tensorboard or none, got '{cfg.report_to}'")
    for key in ("seeds", "max_targets"):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise MemtrainError(f"--{key} must be >= 1, got {value}")


def build_mitigations(names: Sequence[str], recipe: AuditRecipe) -> list:
    """Fresh mitigations with the recipe's settings; an unknown name lists the known ones."""
    from memtrain.mitigations import get_mitigation

    seen, out = set(), []
    for name in names:
        m = get_mitigation(name, **recipe.mitigations.get(str(name).strip().lower().replace("-", "_"), {}))
        if m.name in seen:
            raise MemtrainError(f"mitigation '{m.name}' is named twice")
        seen.add(m.name)
        out.append(m)
    return out


def _testbed_default(root: Path | None, cli_value: str | None, name: str, flag: str,
                     required: bool) -> str | None:
    if cli_value is not None:
        return cli_value
    if root is not None:
        return str(root / "manifests" / f"{name}.jsonl")
    if required:
        raise MemtrainError(f"no {flag} given and the model is not a testbed: pass {flag}")
    return None


def resolve_recipe(cfg: AuditConfig) -> tuple[AuditRecipe, Path]:
    """The recipe (--recipe, else by model: the testbed's without --model) with the CLI's overrides."""
    if cfg.recipe:
        path = Path(cfg.recipe)
    else:
        model = Path(cfg.model).expanduser() if cfg.model else None
        on_testbed = model is None or any((d / "testbed_card.json").is_file() for d in (model, model.parent))
        path = default_recipe_path(on_testbed)
    recipe = load_audit_recipe(path, cfg.attack_steps)
    if cfg.seeds is not None:
        recipe.seeds = cfg.seeds
    if cfg.max_targets is not None:
        recipe.max_targets = cfg.max_targets
    return recipe, path


def resolve_inputs(cfg: AuditConfig, recipe: AuditRecipe, recipe_path: Path, accelerator=None) -> Inputs:
    """Every input checked before the model loads or anything is written."""
    from memtrain.evaluate import resolve_model_dir, testbed_root_of

    if cfg.output_dir is not None:
        report.check_output_dir(cfg.output_dir, cfg.overwrite)
    for path in (cfg.manifest, cfg.control_manifest, cfg.reference_manifest, cfg.utility_manifest):
        if path is not None:
            read_manifest(path)  # empty or malformed: fail before a testbed build or model load
    model_dir = resolve_model_dir(cfg.model, accelerator)
    root = testbed_root_of(model_dir) if Path(model_dir).exists() else None
    manifests = {
        "targets": _testbed_default(root, cfg.manifest, "memorized", "--manifest", True),
        "control": _testbed_default(root, cfg.control_manifest, "held_out", "--control_manifest", True),
        "reference": _testbed_default(root, cfg.reference_manifest, "unique", "--reference_manifest", False),
        "utility": _testbed_default(root, cfg.utility_manifest, "utility", "--utility_manifest", False),
    }
    targets = list(read_manifest(manifests["targets"], require_images=True))[: recipe.max_targets]
    n_control = recipe.control_targets or len(targets)
    control = list(read_manifest(manifests["control"], require_images=True))[:n_control]
    reference = [it.prompt for it in read_manifest(manifests["reference"])] if manifests["reference"] else []
    out = Path(cfg.output_dir) if cfg.output_dir else default_output_dir(model_dir)
    out = Path(dist.gather_list([str(out)], accelerator)[0])  # the main process's choice everywhere
    report.check_output_dir(out, cfg.overwrite)
    return Inputs(model_dir, root, recipe_path.absolute(), targets, control,
                  reference[: recipe.reference_prompts], manifests["utility"],
                  {k: str(Path(v).absolute()) if v else None for k, v in manifests.items()}, out)


def default_output_dir(model_dir: str) -> Path:
    name = Path(model_dir).name if Path(model_dir).name != "model" else Path(model_dir).parent.name
    return Path("audits") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


# ----------------------------------------------------------------------------- weights


def weights_checksum(bundle) -> str:
    """BLAKE2 over every parameter and buffer of U-Net, text encoder and VAE, bit for bit."""
    h = hashlib.blake2b(digest_size=16)
    for part in ("unet", "text_encoder", "vae"):
        for name, tensor in getattr(bundle, part).state_dict().items():
            h.update(f"{part}.{name}".encode())
            h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def verify_restored(bundle, expected: str, mitigation: str) -> str:
    """Fail loudly if undoing `mitigation` did not restore the weights exactly."""
    now = weights_checksum(bundle)
    if now != expected:
        raise RuntimeError(
            f"mitigation '{mitigation}' did not restore the model's weights after undo (checksum "
            f"{expected} before, {now} after): every later figure would be wrong, stopping"
        )
    return now


# ----------------------------------------------------------------------------- per-input work


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


@dataclass
class Context:
    bundle: Any
    descriptor: Any
    scorer: Any
    clip_reason: dict | None
    settings: SamplerSettings
    seeds: list[int]
    recipe: AuditRecipe
    attack: Any  # AttackConfig
    accelerator: Any = None
    progress: bool = False
    resolution: int = 0
    latents: dict = field(default_factory=dict)  # (stream, index) -> target latent (1, C, h, w)

    def log(self, message: str) -> None:
        if self.progress and dist.is_main(self.accelerator):
            logger.info(message)


def _latents(ctx: Context, stream: str, chunk, images) -> torch.Tensor:
    """The targets' latents, encoded once (no mitigation touches the autoencoder)."""
    from memtrain.train.data import to_pixels

    missing = [(i, im) for (i, _), im in zip(chunk, images) if (stream, i) not in ctx.latents]
    if missing:
        encoded = ctx.bundle.encode_images(to_pixels([im for _, im in missing], ctx.resolution)).float().cpu()
        for (i, _), latent in zip(missing, encoded):
            ctx.latents[(stream, i)] = latent[None]
    return torch.cat([ctx.latents[(stream, i)] for i, _ in chunk])


def score(ctx: Context, chunk, cond: torch.Tensor, images, reference: np.ndarray | None = None,
          mitigation=None, failed: dict[int, str] | None = None) -> list[tuple[int, ItemScores]]:
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
            uncond=None if mitigation is None else mitigation.unconditional(ctx.bundle),
            unet_forward=None if mitigation is None else mitigation.unet_forward(ctx.bundle),
        )
        cos = None
        if ctx.scorer is not None:
            texts = [chunk[k][1].prompt for k in live for _ in ctx.seeds]
            cos = ctx.scorer.score(m.images.flatten(0, 1), texts).reshape(len(live), len(ctx.seeds))
        for row, k in enumerate(live):
            index = chunk[k][0]
            best = int(np.argmax(m.sscd_orig[row]))
            thumb = (np.asarray(report.thumbnail(m.images[row, best], ctx.recipe.grid_cell))
                     if index < ctx.recipe.grid_items else None)
            out[k] = ItemScores(
                index=index, id=chunk[k][1].id, sscd_orig=m.sscd_orig[row], gen_embeddings=m.gen_embeddings[row],
                sscd_gen=None if m.sscd_gen is None else m.sscd_gen[row],
                a_clip=None if cos is None else cos[row], thumb=thumb,
            )
    return [(chunk[k][0], out[k]) for k in range(len(chunk))]


def _attack(ctx: Context, chunk, latents: torch.Tensor, mitigation, stream_offset: int = 0):
    from memtrain.attack import DoriAttack

    indices = [stream_offset + i for i, _ in chunk]  # global: results do not depend on world size
    return DoriAttack(ctx.bundle, latents, [it.prompt for _, it in chunk], ctx.attack,
                      mitigation=mitigation, indices=indices).run()


def _images(chunk) -> list:
    return [load_image(item) for _, item in chunk]


def unmitigated_chunk(ctx: Context, chunk) -> list[tuple[int, ItemScores]]:
    """(a): the plain model on the memorized prompts."""
    from memtrain.text import encode_prompts

    cond = encode_prompts(ctx.bundle, [it.prompt for _, it in chunk]).embeddings
    return score(ctx, chunk, cond, _images(chunk))


def target_chunk(ctx: Context, mitigation, chunk, reference: dict[int, np.ndarray]):
    """(b) and (c) for one chunk with `mitigation` in place: prompt rows, attack rows."""
    from memtrain.attack import attacked_condition

    images = _images(chunk)
    ref = np.stack([reference[i] for i, _ in chunk])
    cond = mitigation.encode(ctx.bundle, [it.prompt for _, it in chunk]).embeddings
    prompt_rows = score(ctx, chunk, cond, images, ref, mitigation)
    result = _attack(ctx, chunk, _latents(ctx, "target", chunk, images), mitigation)
    attack_rows = score(ctx, chunk, attacked_condition(result, mitigation), images, ref, mitigation,
                        failed=result.reasons)
    return prompt_rows, attack_rows


def control_chunk(ctx: Context, mitigation, chunk) -> list[tuple[int, ItemScores]]:
    """(d): the same attack on held-out images, scored against them."""
    from memtrain.attack import attacked_condition

    images = _images(chunk)
    result = _attack(ctx, chunk, _latents(ctx, "control", chunk, images), mitigation, CONTROL_STREAM)
    return score(ctx, chunk, attacked_condition(result, mitigation), images, None, mitigation,
                 failed=result.reasons)


# ----------------------------------------------------------------------------- figures


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


# ----------------------------------------------------------------------------- the run


@dataclass
class Baseline:
    items: list[ItemScores]
    figures: dict
    reference: dict[int, np.ndarray]  # target index -> (S, D) unmitigated generation embeddings
    fid: dict
    kid: dict
    notes: list[str]


def _sampler(ctx: Context, mitigation=None):
    """prompts, seeds -> SampleOutput with the (mitigated) sampler: evaluate.fid_kid's contract."""
    from memtrain.sampling import sample

    def run(prompts: list[str], seeds: list[int]):
        cond = prompts if mitigation is None else mitigation.encode(ctx.bundle, prompts)
        s = ctx.settings
        return sample(ctx.bundle, cond, seeds, guidance_scale=s.guidance_scale,
                      num_inference_steps=s.num_inference_steps, scheduler=s.scheduler, batch_size=s.batch_size,
                      uncond=None if mitigation is None else mitigation.unconditional(ctx.bundle),
                      unet_forward=None if mitigation is None else mitigation.unet_forward(ctx.bundle))

    return run


def utility(ctx: Context, inputs: Inputs, mitigation=None) -> tuple[dict, dict, list[str]]:
    """FID/KID of one generation per utility prompt (seed 0) vs the utility images (collective)."""
    from memtrain.evaluate import EvaluateConfig, fid_kid

    if inputs.utility_manifest is None:
        reason = not_computed("no --utility_manifest given (and the model is not a testbed)")
        return reason, reason, []
    cfg = EvaluateConfig(fid_manifest=inputs.utility_manifest, fid_prompts=ctx.recipe.utility_prompts,
                         chunk_items=ctx.recipe.chunk_targets, progress=False)
    return fid_kid(cfg, {"sample": _sampler(ctx, mitigation), "fid_seed": 0}, None, ctx.accelerator)


def _run_chunks(ctx: Context, chunks, fn) -> list:
    local = []
    for chunk in chunks:
        local += fn(chunk)
    return dist.gather_in_order(local, ctx.accelerator)


def run_baseline(ctx: Context, inputs: Inputs, target_chunks) -> Baseline:
    """(a), computed once: the figures, the SSCD_Gen reference and the utility of the plain model."""
    ctx.log("audit: the unmitigated model on the memorized prompts")
    items = _run_chunks(ctx, target_chunks, lambda c: unmitigated_chunk(ctx, c))
    reference = {r.index: r.gen_embeddings for r in items}
    return Baseline(items, stage_figures(items, ctx), reference, *utility(ctx, inputs))


def _uses_per_prompt(ctx: Context, mitigation, targets: list[ManifestItem]) -> bool:
    """Per-prompt pruning only means something for mitigations that select per prompt."""
    return bool(ctx.recipe.prune_per_prompt and targets
                and mitigation.for_prompts([targets[0].prompt]) is not mitigation)


def run_mitigation(ctx: Context, mitigation, inputs: Inputs, target_chunks, control_chunks,
                   baseline: Baseline, checksum: str) -> dict:
    """(b), (c), (d) and utility for one prepared mitigation; undone and verified afterwards."""
    from memtrain.mitigations import applied

    name = mitigation.name
    per_prompt = _uses_per_prompt(ctx, mitigation, inputs.targets)
    local_prompt, local_attack, local_control = [], [], []

    def targets_with(view, chunk) -> None:
        p, a = target_chunk(ctx, view, chunk, baseline.reference)
        local_prompt.extend(p)
        local_attack.extend(a)

    ctx.log(f"audit: {name}: prompts, attack, control")
    with applied(mitigation, ctx.bundle):  # for all prompts at once
        if not per_prompt:
            for chunk in target_chunks:
                targets_with(mitigation, chunk)
        for chunk in control_chunks:
            local_control += control_chunk(ctx, mitigation, chunk)
        fid, kid, notes = utility(ctx, inputs, mitigation)
    if per_prompt:  # each target under only its own prompt's pruning (singleton chunks)
        for chunk in target_chunks:
            for pair in chunk:
                view = mitigation.for_prompts([pair[1].prompt])
                with applied(view, ctx.bundle):
                    targets_with(view, [pair])
    restored = verify_restored(ctx.bundle, checksum, name)
    rows = {stage: dist.gather_in_order(local, ctx.accelerator)
            for stage, local in (("prompt", local_prompt), ("attack", local_attack), ("control", local_control))}
    result = assemble_result(ctx, mitigation, rows, baseline, fid, kid, notes, restored, per_prompt)
    check = ctx.recipe.search_space_check
    if check == "always" or (check == "ineffective" and result["verdict"] == "ineffective"):  # same on every rank
        from memtrain.mitigations import search_space_ablation

        ablation = search_space_ablation(mitigation, ctx.bundle.unet)
        if ablation is not None:
            result["search_space_ablation"] = run_search_space_ablation(ctx, ablation, target_chunks, baseline,
                                                                        checksum, name)
    return result


def run_search_space_ablation(ctx: Context, ablation, target_chunks, baseline: Baseline, checksum: str,
                              name: str) -> dict:
    """The memorized prompts with every weight the mitigation could prune set to zero: the most
    any selection of that method could hide on this model."""
    from memtrain.mitigations import applied

    ctx.log(f"audit: {name}: prompts with its whole search space zeroed")

    def chunk_scores(chunk):
        cond = ablation.encode(ctx.bundle, [it.prompt for _, it in chunk]).embeddings
        return score(ctx, chunk, cond, _images(chunk), None, ablation)

    with applied(ablation, ctx.bundle):
        items = _run_chunks(ctx, target_chunks, chunk_scores)
    verify_restored(ctx.bundle, checksum, name)
    fig = stage_figures(items, ctx)
    mr, rule = fig["mr"], ctx.recipe.verdict
    base = baseline.figures["mr"]
    hides = isinstance(mr, (int, float)) and (mr <= rule.concealed_mr or mr <= rule.clearly_below * base)
    fmt = report.format_value
    n_weights = ablation.num_weights(ctx.bundle.unet)
    if hides:
        reading = (f"zeroing all {n_weights} weights it may prune ({len(ablation.layers)} layers) brings the prompt "
                   f"MR to {fmt(mr)}: these layers can hide the images, but its selection did not find the weights that do")
    else:
        reading = (f"even with all {n_weights} weights it may prune zeroed ({len(ablation.layers)} layers) the prompts "
                   f"replicate at MR {fmt(mr)}: memorization on this model does not live in these layers, so no "
                   f"selection among them can hide the images")
    return {"layers": list(ablation.layers), "weights_zeroed": n_weights, "mr": mr,
            "sscd_orig_median": fig["sscd_orig_median"], "n": fig["n"], "reading": reading}


def assemble_result(ctx: Context, mitigation, rows: dict, baseline: Baseline, fid, kid, notes,
                    checksum: str, per_prompt: bool) -> dict:
    figures = {stage: stage_figures(items, ctx) for stage, items in rows.items()}
    result = {
        "mitigation": mitigation.name,
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
                   "sscd_orig_attack": _max(a), "attack_failed": a.failed is not None}
                  for u, p, a in zip(baseline.items, rows["prompt"], rows["attack"])],
        control_items=[{"id": c.id, "sscd_orig_attack": _max(c), "attack_failed": c.failed is not None}
                       for c in rows["control"]],
        failed_targets=failed,
    )
    result["_rows"] = rows  # grids only; dropped before writing
    return result


# ----------------------------------------------------------------------------- outputs


def _cell_mean_std(fig: dict, key: str = "sscd_orig") -> Any:
    mean, std = fig.get(f"{key}_mean"), fig.get(f"{key}_std")
    if report.is_not_computed(mean) or mean is None:
        return mean
    return f"{report.format_value(mean)} ± {report.format_value(std)}"


def _cell_figure(value: Any) -> Any:
    if isinstance(value, dict) and "value" in value and not report.is_not_computed(value):
        text = report.format_value(value["value"], 4 if abs(value["value"] or 0) < 0.01 else 3)
        return text + (f" ± {report.format_value(value['std'])}" if "std" in value else "")
    return value


def table_row(setting: str, fig: dict, fid: Any = None, kid: Any = None, sscd_gen: bool = True) -> dict:
    return {
        "setting": setting, "n": fig.get("n"), "MR": fig.get("mr"),
        "SSCD_Orig median": fig.get("sscd_orig_median"), "SSCD_Orig mean ± std": _cell_mean_std(fig),
        "SSCD_Gen": fig.get("sscd_gen_median", "N/A") if sscd_gen else "N/A", "D_SSCD": fig.get("d_sscd"),
        "A_CLIP": _cell_figure(fig.get("a_clip")), "FID": _cell_figure(fid), "KID": _cell_figure(kid),
    }


TABLE_COLUMNS = ["setting", "n", "MR", "SSCD_Orig median", "SSCD_Orig mean ± std", "SSCD_Gen", "D_SSCD",
                 "A_CLIP", "FID", "KID"]


def table_rows(results: Sequence[dict]) -> list[dict]:
    """Paper 004 Table 1's layout: no mitigation, then per mitigation its prompts, + attack and the
    control + attack rows (FID/KID belong to the model, so only the prompt rows carry them)."""
    if not results:
        return []
    base = results[0]
    rows = [table_row("no mitigation (prompts)", base["unmitigated"], base["utility"]["fid_unmitigated"],
                      base["utility"]["kid_unmitigated"], sscd_gen=False)]
    for r in results:
        name = r["mitigation"]
        rows += [table_row(f"{name} (prompts)", r["prompt"], r["utility"]["fid"], r["utility"]["kid"]),
                 table_row(f"{name} + attack", r["attack"]),
                 table_row(f"control: held-out + attack ({name})", r["control"], sscd_gen=False)]
    return rows


def findings(results: Sequence[dict], rule: VerdictRule) -> str:
    """A paragraph generated from the figures: what happened, mitigation by mitigation."""
    if not results:
        return ""
    base = results[0]["unmitigated"]
    fmt = report.format_value
    parts = [f"Without mitigation the model replicates at MR {fmt(base['mr'])} on its {base['n']} memorized "
             f"prompts (median SSCD_Orig {fmt(base.get('sscd_orig_median'))})."]
    for r in results:
        sentence = f"`{r['mitigation']}` ({r['verdict']}): {r['verdict_reason']}."
        if "search_space_ablation" in r:
            sentence += f" Search-space check: {r['search_space_ablation']['reading']}."
        fid, fid0 = r["utility"]["fid"], r["utility"]["fid_unmitigated"]
        if r["mitigation"] != "none" and not report.is_not_computed(fid) and not report.is_not_computed(fid0):
            sentence += f" FID {fmt(fid['value'])} vs {fmt(fid0['value'])} unmitigated (small set: compare only within this report)."
        if r["failed_targets"]:
            sentence += f" The attack stopped on {len(r['failed_targets'])} input(s) (non-finite loss), listed below."
        parts.append(sentence)
    controls = [r["mr_control"] for r in results if isinstance(r["mr_control"], (int, float))]
    if controls:
        parts.append(f"The false-positive control (the same attack on held-out images) reached MR {fmt(min(controls))}"
                     f"-{fmt(max(controls))}; a mitigation `removes` memorization only if the attack does no better "
                     f"on the memorized images than that, up to {rule.control_margin}.")
    return " ".join(parts)


def _describe_rows(description: dict, limit: int = 300) -> dict:
    """describe() as key/value cells; long entries (NeMo's per-prompt records) are cut, the full
    text is in report.json."""
    rows = {}
    for key, value in description.items():
        text = value if isinstance(value, str) else report.format_value(value) or "(none)"
        rows[key] = text if len(text) <= limit else text[:limit] + " ... (full text in report.json)"
    return rows


def write_grids(folder: Path, inputs: Inputs, baseline: Baseline, results: Sequence[dict], cell: int) -> dict:
    """Per mitigation: training image | no mitigation | mitigated prompt | mitigated + attack;
    and the control: held-out image | attack. Generations shown: the seed with max SSCD_Orig."""
    grids = {}
    base = {r.index: r.thumb for r in baseline.items}
    for r in results:
        rows = r["_rows"]
        shown = [(p, a) for p, a in zip(rows["prompt"], rows["attack"]) if p.index in base and base[p.index] is not None]
        if shown:
            cells = [[load_image(inputs.targets[p.index]), base[p.index], p.thumb, a.thumb] for p, a in shown]
            grids[r["mitigation"]] = report.save_grids(folder, cells, [p.id for p, _ in shown], cell=cell,
                                                       prefix=r["mitigation"])
        control = [c for c in rows["control"] if c.thumb is not None]
        if control:
            cells = [[load_image(inputs.control[c.index]), c.thumb] for c in control]
            grids[f"{r['mitigation']} control"] = report.save_grids(folder, cells, [c.id for c in control], cell=cell,
                                                                    prefix=f"{r['mitigation']}_control")
    return grids


def markdown(doc: dict, results: Sequence[dict], grids: dict, root: Path, rule: VerdictRule) -> report.MarkdownReport:
    md = report.MarkdownReport("Memorization audit")
    s = doc["settings"]
    if s["metric_is_standin"]:
        md.paragraph(f"**Warning: the copy descriptor is the stand-in `{doc['metric_backend']}`, not SSCD.** "
                     "Its similarities are not comparable with published SSCD figures.")
    md.heading("Setup").key_values({
        "model": doc["model"]["source"], "targets": f"{s['n_targets']} from {s['manifests']['targets']}",
        "control (held-out)": f"{s['n_control']} from {s['manifests']['control']}",
        "reference prompts": f"{s['n_reference_prompts']} from {s['manifests']['reference']}",
        "utility (FID/KID)": s["manifests"]["utility"] or "none", "seeds": s["seeds"], "sampler": s["sampler"],
        "attack": s["attack"], "copy descriptor": doc["metric_backend"], "MR threshold": s["threshold"],
        "processes": doc["num_processes"], "recipe": s["recipe_path"],
    })
    md.heading("Results (paper 004 Table 1 layout)")
    md.table(table_rows(results), TABLE_COLUMNS)
    md.paragraph("MR: fraction of inputs with SSCD_Orig > threshold in at least one seed. SSCD_Orig per input is "
                 "the max over its seeds; median and mean ± std are across inputs. SSCD_Gen: median over inputs of "
                 "the max similarity to the unmitigated model's generation for the same input and seed. D_SSCD: mean "
                 "pairwise similarity of an input's generations. A_CLIP: image-prompt cosine, mean ± std over inputs "
                 "(attack rows: against the target's prompt). FID/KID: one generation per utility prompt vs the "
                 "utility images.")
    md.heading("Verdicts")
    md.table([{k: r[k] for k in ("mitigation", "mr_unmitigated", "mr_prompt", "mr_attack", "mr_control", "verdict")}
              for r in results])
    md.paragraph(f"Rule (first match): `none` is the `baseline`; `inconclusive` if the unmitigated MR is not above "
                 f"the control MR + {rule.control_margin}; `removes` if MR under attack <= control MR + "
                 f"{rule.control_margin}; `conceals` if the prompt MR <= {rule.concealed_mr} or <= "
                 f"{rule.clearly_below} x the unmitigated MR while the attack beats the control; else `ineffective`.")
    md.heading("Findings").paragraph(findings(results, rule))
    notes = s["notes"] + [n for r in results for n in r["utility"]["notes"]]
    md.bullets(dict.fromkeys(notes))  # each note once, in order
    failed = [{"mitigation": r["mitigation"], **f} for r in results for f in r["failed_targets"]]
    if failed:
        md.heading("Failed targets").table(failed, ["mitigation", "id", "stage", "reason"])
    md.heading("Mitigations")
    for r in results:
        md.heading(f"{r['mitigation']}", level=3)
        check = r.get("search_space_ablation")
        md.key_values({**_describe_rows(r["description"]), "pruning scope": r["pruning"],
                       "weights restored after undo": r["weights_restored"],
                       **({"prompt MR with its whole search space zeroed": check["mr"]} if check else {})})
    if grids:
        md.heading("Grids")
        md.paragraph("Target rows: training image | no mitigation | mitigated prompt | mitigated + attack. Control rows: "
                     "held-out image | attack. Each generation shown is the seed with the highest SSCD_Orig.")
        for label, written in grids.items():
            for path, ids in written:
                md.paragraph(f"{label}: {', '.join(ids)}").image(path.relative_to(root).as_posix(), path.stem)
    return md


def tracker_figures(results: Sequence[dict]) -> dict:
    figures = {"unmitigated": results[0]["unmitigated"]} if results else {}
    for r in results:
        figures[r["mitigation"]] = {k: r[k] for k in ("prompt", "attack", "control")}
        figures[r["mitigation"]]["verdict_index"] = VERDICTS.index(r["verdict"])
    return figures


def write_outputs(folder: Path, doc: dict, inputs: Inputs, baseline: Baseline, results: list[dict],
                  recipe: AuditRecipe, accelerator) -> None:
    grids = write_grids(folder / "grids", inputs, baseline, results, recipe.grid_cell)
    clean = [{k: v for k, v in r.items() if k != "_rows"} for r in results]
    report.write_json(folder / "report.json", {**doc, "results": clean})
    markdown(doc, results, grids, folder, recipe.verdict).write(folder / "report.md")
    columns = ["mitigation", "mr_unmitigated", "mr_prompt", "mr_attack", "mr_control", "verdict"]
    from PIL import Image

    # one key per grid kind: a tracker shows a list of images only if they share a size
    images = {f"grids/{label.replace(' ', '_')}": [Image.open(p).convert("RGB") for p, _ in written]
              for label, written in grids.items()}
    report.log_to_trackers(accelerator, tracker_figures(clean), images=images or None,
                           table=(columns, [[r[c] for c in columns] for r in clean]), table_name="verdicts")


# ----------------------------------------------------------------------------- entry point


def make_accelerator(report_to: str | None):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    log_with = None if report_to in (None, "none") else report_to
    if log_with == "tensorboard":
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise MemtrainError("--report_to tensorboard needs the tensorboard package: pip install tensorboard")
    # the logging dir is replaced by the staged output folder before the trackers start
    return Accelerator(log_with=log_with, project_config=ProjectConfiguration(project_dir=".", logging_dir="."))


def prepare_mitigations(ctx: Context, mitigations: Sequence, inputs: Inputs) -> None:
    """Every process prepares the same (deterministic) mitigations on all memorized prompts, so
    a mitigation that does not fit the model fails here, before anything is written."""
    prompts = [it.prompt for it in inputs.targets]
    for m in mitigations:
        m.encode(ctx.bundle, prompts[:1])  # the text path fits (tokenizer, pad token, ...)
        ctx.log(f"audit: preparing {m.name}")
        m.prepare(ctx.bundle, prompts, inputs.reference_prompts, ctx.seeds)


def _check_images(items: Sequence[ManifestItem]) -> None:
    for item in items:
        load_image(item)  # a ManifestError naming the file


def _settings_doc(cfg: AuditConfig, recipe: AuditRecipe, inputs: Inputs, ctx: Context, notes: list[str],
                  seconds: float) -> dict:
    return {
        "mitigations": [m for m in cfg.mitigations], "manifests": inputs.manifests,
        "n_targets": len(inputs.targets), "n_control": len(inputs.control),
        "n_reference_prompts": len(inputs.reference_prompts), "seeds": ctx.seeds, "threshold": recipe.threshold,
        "sampler": ctx.settings.to_dict(), "attack": dataclasses.asdict(ctx.attack),
        "control_attack_streams": f"seed {ctx.attack.seed}, indices {CONTROL_STREAM} + held-out index",
        "verdict_rule": dataclasses.asdict(recipe.verdict), "recipe_path": str(inputs.recipe_path),
        "recipe": dataclasses.asdict(recipe), "metric_is_standin": ctx.descriptor.name.startswith("standin"),
        "device": str(ctx.bundle.device), "seconds": round(seconds, 1), "notes": notes,
        "output_dir": str(inputs.output_dir.absolute()),
    }


def audit(cfg: AuditConfig, accelerator=None) -> dict:
    """Run the audit; returns report.json's content (every process) and writes the outputs (main
    process). Bad input raises MemtrainError before anything is written."""
    from memtrain.evaluate import alignment_scorer, EvaluateConfig, versions
    from memtrain.metrics import get_descriptor
    from memtrain.models import fuse_lora_weights, load_bundle
    from memtrain.train.data import pixel_resolution

    start = time.time()
    _check_config(cfg)
    recipe, recipe_path = resolve_recipe(cfg)
    mitigations = build_mitigations(cfg.mitigations, recipe)  # unknown names fail here, listing the known
    attack_config = recipe.attack.to_config()
    owns = accelerator is None
    accelerator = accelerator or make_accelerator(cfg.report_to)
    inputs = resolve_inputs(cfg, recipe, recipe_path, accelerator)
    seeds = check_seeds(range(recipe.seeds))
    descriptor = get_descriptor(cfg.metric, allow_standin=cfg.allow_standin)
    scorer, clip_reason = alignment_scorer(EvaluateConfig(clip_model=cfg.clip_model), inputs.testbed_root)
    dist.run_checked(lambda: _check_images(inputs.targets + inputs.control), accelerator)
    bundle = load_bundle(inputs.model_dir, device=accelerator.device)
    if cfg.lora:
        fuse_lora_weights(bundle, cfg.lora)
    settings = _sampler_settings(bundle, recipe)
    ctx = Context(bundle, descriptor, scorer, clip_reason, settings, seeds, recipe, attack_config, accelerator,
                  cfg.progress, pixel_resolution(bundle))
    checksum = weights_checksum(bundle)
    dist.run_checked(lambda: prepare_mitigations(ctx, mitigations, inputs), accelerator)

    staged = report.StagedOutput(inputs.output_dir, cfg.overwrite) if dist.is_main(accelerator) else None

    def start_outputs() -> None:
        if staged is not None:
            staged.open()
        if staged is not None and owns:  # a caller's accelerator brings its own trackers
            accelerator.project_configuration.logging_dir = str(staged.tmp / "tensorboard")
            report.init_trackers(accelerator, cfg.project, {**dataclasses.asdict(cfg), "mitigations": ",".join(cfg.mitigations)},
                                 staged.tmp)

    try:
        dist.run_checked(start_outputs, accelerator)
        target_chunks = dist.shard_chunks(inputs.targets, recipe.chunk_targets, accelerator)
        control_chunks = dist.shard_chunks(inputs.control, recipe.chunk_targets, accelerator)
        baseline = run_baseline(ctx, inputs, target_chunks)
        results = [run_mitigation(ctx, m, inputs, target_chunks, control_chunks, baseline, checksum)
                   for m in mitigations]
        notes = list(baseline.notes)
        if descriptor.name.startswith("standin"):
            notes.insert(0, f"copy descriptor is the stand-in '{descriptor.name}', NOT SSCD")
        doc = {
            "metric_backend": descriptor.name,
            "model": {"source": cfg.model or "testbed (cached)", "path": inputs.model_dir, "lora": cfg.lora,
                      "testbed": inputs.testbed_root is not None},
            "settings": _settings_doc(cfg, recipe, inputs, ctx, notes, time.time() - start),
            "versions": versions(),
            "num_processes": dist.world(accelerator)[1],
        }
        if staged is not None:
            write_outputs(staged.tmp, doc, inputs, baseline, results, recipe, accelerator)
            if owns:
                report.finish_trackers(accelerator)
            staged.commit()
        dist.wait(accelerator)
    except BaseException:
        if staged is not None:
            if owns:
                report.finish_trackers(accelerator)
            staged.abort()
        raise
    if owns:
        accelerator.end_training()
    return {**doc, "results": [{k: v for k, v in r.items() if k != "_rows"} for r in results]}


def _sampler_settings(bundle, recipe: AuditRecipe) -> SamplerSettings:
    """The model's default sampler with the recipe's overrides."""
    overrides = {k: v for k, v in dataclasses.asdict(recipe.sampler).items() if v is not None}
    settings = dataclasses.replace(bundle.sampler_settings, **overrides)
    bundle.make_scheduler(settings.scheduler)  # an unknown name fails here, in one line
    return settings


def summary(doc: dict) -> str:
    """A few lines for the terminal."""
    fmt = report.format_value
    lines = [f"audited {doc['settings']['n_targets']} targets x {len(doc['settings']['seeds'])} seeds on "
             f"{doc['num_processes']} process(es) with {doc['metric_backend']}"]
    for r in doc["results"]:
        lines.append(f"  {r['mitigation']:<10} MR unmitigated={fmt(r['mr_unmitigated'])} prompt={fmt(r['mr_prompt'])} "
                     f"attack={fmt(r['mr_attack'])} control={fmt(r['mr_control'])} -> {r['verdict']}")
        if "search_space_ablation" in r:
            check = r["search_space_ablation"]
            lines.append(f"  {'':<10} its whole search space zeroed ({check['weights_zeroed']} weights): "
                         f"prompt MR={fmt(check['mr'])}")
    lines += [f"  note: {n}" for n in doc["settings"]["notes"]]
    lines.append(f"wrote {doc['settings']['output_dir']}")
    return "\n".join(lines)
