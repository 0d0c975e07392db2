"""Audit mitigations: does a mitigated model still hold its memorized images? (paper 004 Table 1)

For every mitigation named, on the memorized targets (prompt + training image):
(a) the unmitigated model on the memorized prompts (computed once; its generation embeddings
    are the SSCD_Gen reference of every later row);
(b) the mitigated model on the same prompts (`mitigation.encode`, `.unconditional`,
    `.unet_forward`; pruning mitigations prepared on memorized vs reference prompts, applied);
(c) the Dori attack through the mitigation, then sampling from the attacked condition with the
    mitigated sampler;
(d) the false-positive control: the same attack aimed at held-out images, scored against them.

Each row: MR, SSCD_Orig (median, mean +- std), SSCD_Gen, D_SSCD, A_CLIP; utility: FID/KID on a
small utility prompt set, or "not computed" with the reason. Every mitigation is undone
afterwards and the weights' checksum must equal the one taken before. The verdict per
mitigation follows `verdict.verdict()`; the report is written by `audit.report`.

Work is cut into fixed global chunks of targets before it is spread over processes, and the
attack's RNG streams are named by global target index, so 1 and N processes write the same
figures. Only the main process writes, through a staged folder (memtrain.core.run.OutputRun).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memtrain.core import report
from memtrain.core import run as dist
from memtrain.core.bundle import ModelDefaults, load_for_runtime, weights_checksum
from memtrain.core.files import check_output_dir
from memtrain.core.journal import (WorkJournal, check_fresh_start, decoder, encode_records, encode_stages,
                                   json_unit, stages_decoder)
from memtrain.core.manifest import ManifestItem, read_manifest
from memtrain.core.memory import plan_for_run
from memtrain.core.runtime import resolve_runtime
from memtrain.core.sampling import check_seeds, sample
from memtrain.core.errors import MemtrainError
from memtrain.eval.audit import report as audit_report
from memtrain.eval.audit.result import AuditResult
from memtrain.eval.audit.recipe import (AuditConfig, AuditRecipe, audit_plan, audit_stages, budget_text,
                                       build_mitigations, fingerprint, settings_doc)
from memtrain.eval.audit.stages import (Context, ItemScores, assemble_result, attack_config, attack_name,
                                        control_chunk, score, stage_figures, target_chunk, unmitigated_chunk, _images)
from memtrain.eval.audit.robustness import curve_budgets, robustness_curve
from memtrain.eval.audit.threats import bypassed_result, plan_threats, result_label
from memtrain.eval.audit.verdict import judge_over_budgets
from memtrain.eval.utility import check_images, fid_kid, metric_backends, metric_devices, versions
from memtrain.metrics import not_computed
from memtrain.mitigations import THREAT_MODELS, Mitigation, applied, search_space_ablation

logger = logging.getLogger("memtrain")
ROLES = {"targets": ("memorized", "--manifest", True), "control": ("held_out", "--control_manifest", True),
         "reference": ("unique", "--reference_manifest", False), "utility": ("utility", "--utility_manifest", False)}


@dataclass
class Inputs:
    """Everything resolved before the expensive part starts: model, manifests, items, output folder."""

    model_dir: str
    recipe_path: str | None  # the per-model settings file the config was built on (None: built in code)
    targets: list[ManifestItem]
    control: list[ManifestItem]
    reference_prompts: list[str]
    utility_manifest: str | None
    manifests: dict
    output_dir: Path


def resolve_inputs(cfg: AuditConfig, defaults: ModelDefaults, recipe: AuditRecipe, recipe_path: str | None,
                   accelerator=None) -> Inputs:
    """Every input checked before the model loads or anything is written; a manifest the command
    line leaves out comes from the model's defaults (the testbed's splits) or is an error."""
    if cfg.output_dir is not None:
        check_output_dir(cfg.output_dir, cfg.overwrite)
    given = {"targets": cfg.manifest, "control": cfg.control_manifest, "reference": cfg.reference_manifest,
             "utility": cfg.utility_manifest}
    manifests = {}
    for stage, (role, flag, required) in ROLES.items():
        manifests[stage] = given[stage] or defaults.manifest(role)
        if manifests[stage] is None and required:
            raise MemtrainError(f"no {flag} given and the model '{defaults.model_dir}' brings none: pass {flag}")
        if manifests[stage] is not None:
            read_manifest(manifests[stage])  # empty or malformed: fail before the model loads
    targets = list(read_manifest(manifests["targets"], require_images=True))[: recipe.max_targets]
    control = list(read_manifest(manifests["control"], require_images=True))[: recipe.control_targets or len(targets)]
    reference = [it.prompt for it in read_manifest(manifests["reference"])] if manifests["reference"] else []
    out = Path(cfg.output_dir) if cfg.output_dir else default_output_dir(defaults.model_dir)
    out = Path(dist.gather_list([str(out)], accelerator)[0])  # the main process's choice everywhere
    check_output_dir(out, cfg.overwrite)
    check_fresh_start(out, cfg.resume, cfg.overwrite)
    return Inputs(defaults.model_dir, str(Path(recipe_path).absolute()) if recipe_path else None, targets, control,
                  reference[: recipe.reference_prompts], manifests["utility"],
                  {k: str(Path(v).absolute()) if v else None for k, v in manifests.items()}, out)


def default_output_dir(model_dir: str) -> Path:
    """A fresh output folder name from the model's name (and the time)."""
    name = Path(model_dir).name if Path(model_dir).name != "model" else Path(model_dir).parent.name
    return Path("audits") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def verify_restored(bundle, expected: str, mitigation: str) -> str:
    """Fail loudly if undoing `mitigation` did not restore the weights exactly."""
    now = weights_checksum(bundle)
    if now != expected:
        raise RuntimeError(
            f"mitigation '{mitigation}' did not restore the model's weights after undo (checksum "
            f"{expected} before, {now} after): every later figure would be wrong, stopping"
        )
    return now


@dataclass
class Baseline:
    """The unmitigated model's rows, computed once: figures, SSCD_Gen reference, utility."""

    items: list[ItemScores]
    figures: dict
    reference: dict[int, np.ndarray]  # target index -> (S, D) unmitigated generation embeddings
    fid: dict
    kid: dict
    notes: list[str]


@dataclass
class MitigationRun:
    """One mitigation's report entry and the per-stage rows its grids show."""

    result: dict  # one entry of report.json's `results`
    rows: dict[str, list[ItemScores]]  # per stage (prompt, attack, control): what the grids show


def _sampler(ctx: Context, mitigation: Mitigation | None = None):
    """prompts, seeds -> SampleOutput with the (mitigated) sampler: fid_kid's contract."""
    def run(prompts: list[str], seeds: list[int]):
        cond = prompts if mitigation is None else mitigation.encode(ctx.bundle, prompts)
        return sample(ctx.bundle, cond, seeds, ctx.settings,
                      **({} if mitigation is None else mitigation.sampling_kwargs(ctx.bundle, ctx.settings)))

    return run


def utility(ctx: Context, inputs: Inputs, mitigation: Mitigation | None = None) -> tuple[dict, dict, list[str]]:
    """FID/KID of one generation per utility prompt (seed 0) vs the utility images (collective;
    one unit of work)."""
    if inputs.utility_manifest is None:
        reason = not_computed("no --utility_manifest given (and the model brings none)")
        return reason, reason, []

    def compute():
        return fid_kid(inputs.utility_manifest, _sampler(ctx, mitigation), max_prompts=ctx.recipe.utility_prompts,
                       seed=0, chunk_items=ctx.recipe.chunk_targets, accelerator=ctx.accelerator,
                       device=ctx.bundle.device, reference=ctx.reference_features)  # the images once a run

    key = f"{'unmitigated' if mitigation is None else mitigation.name}.utility"
    return tuple(ctx.journal.unit(key, compute, *json_unit(), collective=True))


def chunk_unit(ctx: Context, key: str, chunk, compute) -> list[tuple[int, ItemScores]]:
    """One chunk's scored rows as a unit of work: computed once, reused on --resume."""
    return ctx.journal.unit(f"{key}.{chunk[0][0]}", lambda: compute(chunk), encode_records, decoder(ItemScores))


def _run_chunks(ctx: Context, chunks, fn, key: str, stage: str) -> list:
    local = []
    with ctx.stage(stage, sum(len(c) for c in chunks)) as bar:
        for chunk in chunks:
            local += chunk_unit(ctx, key, chunk, fn)
            bar.advance(len(chunk))
    return dist.gather_in_order(local, ctx.accelerator)


def run_baseline(ctx: Context, inputs: Inputs, target_chunks) -> Baseline:
    """(a), computed once: the figures, the SSCD_Gen reference and the utility of the plain model."""
    items = _run_chunks(ctx, target_chunks, lambda c: unmitigated_chunk(ctx, c), "unmitigated",
                        "the unmitigated model on the memorized prompts")
    reference = {r.index: r.gen_embeddings for r in items}
    with ctx.stage("the unmitigated model's utility (FID/KID)", None, "sets"):
        fid_kid_notes = utility(ctx, inputs)
    return Baseline(items, stage_figures(items, ctx), reference, *fid_kid_notes)


def _uses_per_prompt(ctx: Context, mitigation, targets: list[ManifestItem]) -> bool:
    """Per-prompt pruning only means something for mitigations that select per prompt."""
    return bool(ctx.recipe.prune_per_prompt and targets
                and mitigation.for_prompts([targets[0].prompt]) is not mitigation)


def run_mitigation(ctx: Context, mitigation, inputs: Inputs, target_chunks, control_chunks,
                   baseline: Baseline, checksum: str, plan: dict[str, str]) -> list[MitigationRun]:
    """(b), (c), (d) and utility for one prepared mitigation under each threat model of `plan`;
    undone and verified afterwards. One run per threat model."""
    name = mitigation.name
    spaces = [s for s in ("embedding", "prompt") if s in plan.values()]
    if not spaces:
        return [MitigationRun(bypassed_result(mitigation, threat, baseline.figures["mr"]), {}) for threat in plan]
    per_prompt = _uses_per_prompt(ctx, mitigation, inputs.targets)
    stages = [f"{stage}.{s}" for s in spaces for stage in ("attack", "control")]
    # every key known up front: each process gathers the same stages, chunks or not
    local = {key: [] for key in ["prompt"] + stages + [f"curve.{st}.{b}" for st in stages for b in curve_budgets(ctx)]}
    tag = "" if spaces == ["embedding"] else "_" + "_".join(spaces)  # units of a plain audit keep their keys

    def targets_with(view_of, chunk, key: str) -> None:
        """(b) and (c) for one chunk as a unit of work; `view_of()` gives the mitigation to use."""
        rows = ctx.journal.unit(f"{name}.{key}{tag}.{chunk[0][0]}",
                                lambda: target_chunk(ctx, view_of(), chunk, baseline.reference, spaces),
                                encode_stages, stages_decoder(ItemScores))
        for stage, part in rows.items():
            local[stage].extend(part)

    def own_prompt(prompt: str):
        """The mitigation prepared for one prompt, applied (and undone) around that prompt's unit."""
        view = mitigation.for_prompts([prompt])
        stack.enter_context(applied(view, ctx.bundle))
        return view

    n_targets, n_control = sum(map(len, target_chunks)), sum(map(len, control_chunks))
    with applied(mitigation, ctx.bundle):  # for all prompts at once
        if not per_prompt:
            with ctx.stage(f"{name}: prompts and attack ({', '.join(spaces)})", n_targets) as bar:
                for chunk in target_chunks:
                    targets_with(lambda: mitigation, chunk, "targets")
                    bar.advance(len(chunk))
        for space in spaces:
            key = f"{name}.control" + ("" if space == "embedding" else f".{space}")
            with ctx.stage(f"{name}: held-out control ({space})", n_control, "images") as bar:
                for chunk in control_chunks:
                    rows = ctx.journal.unit(f"{key}.{chunk[0][0]}",
                                            lambda: control_chunk(ctx, mitigation, chunk, space),
                                            encode_stages, stages_decoder(ItemScores))
                    for stage, part in rows.items():
                        local[stage].extend(part)
                    bar.advance(len(chunk))
        with ctx.stage(f"{name}: utility (FID/KID)", None, "sets"):
            fid, kid, notes = utility(ctx, inputs, mitigation)
    if per_prompt:  # each target under only its own prompt's pruning (singleton chunks)
        with ctx.stage(f"{name}: per-prompt pruning, prompts and attack", n_targets) as bar:
            for chunk in target_chunks:
                for pair in chunk:
                    with contextlib.ExitStack() as stack:  # a finished unit is reused without pruning at all
                        targets_with(lambda: own_prompt(pair[1].prompt), [pair], "own_prompt")
                    bar.advance(1)
    restored = verify_restored(ctx.bundle, checksum, name)
    gathered = {stage: dist.gather_in_order(rows, ctx.accelerator) for stage, rows in local.items()}
    runs, checked = [], False
    for threat, space in plan.items():
        if space == "bypassed":
            runs.append(MitigationRun(bypassed_result(mitigation, threat, baseline.figures["mr"]), {}))
            continue
        rows = {"prompt": gathered["prompt"], "attack": gathered[f"attack.{space}"],
                "control": gathered[f"control.{space}"]}
        result = assemble_result(ctx, mitigation, rows, baseline, fid, kid, notes, restored, per_prompt)
        result.update(threat_model=threat, label=result_label(name, threat), attack_space=space,
                      attack_name=attack_name(ctx, space), attack_variant=attack_config(ctx, mitigation)[1])
        if curve_budgets(ctx):
            result["robustness"] = robustness_curve(ctx, gathered, space, result)
            judge_over_budgets(result, ctx.recipe.verdict)
        check = ctx.recipe.search_space_check
        if not checked and (check == "always" or (check == "ineffective" and result["verdict"] == "ineffective")):
            ablation = search_space_ablation(mitigation, ctx.bundle.unet)  # same on every rank
            checked = True
            if ablation is not None:
                result["search_space_ablation"] = run_search_space_ablation(ctx, ablation, target_chunks, baseline,
                                                                            checksum, name)
        runs.append(MitigationRun(result, rows))
    return runs


def run_search_space_ablation(ctx: Context, ablation, target_chunks, baseline: Baseline, checksum: str,
                              name: str) -> dict:
    """The memorized prompts with every weight the mitigation could prune set to zero: the most
    any selection of that method could hide on this model."""

    def chunk_scores(chunk):
        cond = ablation.encode(ctx.bundle, [it.prompt for _, it in chunk]).embeddings
        return score(ctx, chunk, cond, _images(chunk), None, ablation)

    with applied(ablation, ctx.bundle):
        items = _run_chunks(ctx, target_chunks, chunk_scores, f"{name}.search_space",
                            f"{name}: prompts with its whole search space zeroed")
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


def prepare_mitigations(ctx: Context, mitigations: list[Mitigation], inputs: Inputs) -> None:
    """Every process ends up with the same mitigations prepared on all memorized prompts (NeMo's
    per-prompt work spread over them); one that does not fit the model fails before any output."""
    prompts = [it.prompt for it in inputs.targets]
    for m in mitigations:
        m.encode(ctx.bundle, prompts[:1])  # the text path fits (tokenizer, pad token, ...)
        with ctx.stage(f"preparing {m.name}", None, "mitigations") as bar:
            m.spread_over(ctx.accelerator).prepare(ctx.bundle, prompts, inputs.reference_prompts, ctx.seeds)
            bar.advance()


def audit(cfg: AuditConfig, defaults: ModelDefaults | None = None, accelerator=None) -> AuditResult:
    """Run the audit; returns its typed result (report.json's content, on every process) and
    writes the outputs (main process). `defaults` are the model's (its manifests, CLIP, recipe: scripts get them from the
    testbed resolver); without them `cfg.model` must name a checkpoint and the manifests be given.
    Bad input raises MemtrainError before anything is written."""
    start = time.time()
    defaults = defaults or ModelDefaults.plain(cfg.model)
    if cfg.runtime.plan:
        return AuditResult({}, plan=audit_plan(cfg, defaults))
    recipe, recipe_path = cfg, cfg.recipe_path  # the config holds the per-model settings (audit_config)
    mitigations = build_mitigations(cfg.mitigations, recipe)  # unknown names fail here, listing the known
    plans = {m.name: plan_threats(m, cfg.threat_models) for m in mitigations}  # before any model loads
    owns = accelerator is None
    accelerator = accelerator or dist.make_accelerator(cfg.report_to, timeout_minutes=cfg.runtime.timeout_minutes)
    inputs = resolve_inputs(cfg, defaults, recipe, recipe_path, accelerator)
    seeds = check_seeds(range(recipe.seeds))
    if dist.is_main(accelerator):
        logger.info("audit: %s", budget_text(recipe, len(inputs.targets)))
    runtime = resolve_runtime(cfg.runtime, accelerator)  # the metrics run where the model does
    descriptor, scorer, clip_reason = metric_backends(cfg, cfg.clip_model or defaults.clip_model, runtime.device)
    dist.run_checked(lambda: check_images(inputs.targets + inputs.control), accelerator)
    bundle = load_for_runtime(inputs.model_dir, runtime, cfg.lora)
    settings = bundle.sampler_settings.with_overrides(recipe.sampler)
    bundle.make_scheduler(settings.scheduler)  # an unknown name fails here, in one line
    plan = plan_for_run(bundle, runtime, audit_stages(settings, recipe))
    settings = dataclasses.replace(settings, batch_size=plan.batch("generation"))
    attack = dataclasses.replace(recipe.attack, max_batch=plan.batch("attack"))
    runtime.record("attack", min(attack.max_batch, recipe.chunk_targets * attack.noise_samples))
    ctx = Context(bundle, descriptor, scorer, clip_reason, settings, seeds, recipe, attack, accelerator,
                  cfg.progress)
    checksum = weights_checksum(bundle)
    dist.run_checked(lambda: prepare_mitigations(ctx, mitigations, inputs), accelerator)
    tracker_config = {**dataclasses.asdict(cfg), "mitigations": ",".join(cfg.mitigations),
                      "threat_models": ",".join(cfg.threat_models or THREAT_MODELS)}
    with dist.OutputRun(accelerator, inputs.output_dir, cfg.overwrite, cfg.project, tracker_config,
                        trackers=owns) as out:  # a caller's accelerator brings its own trackers
        ctx.journal = WorkJournal(inputs.output_dir, fingerprint(cfg, recipe, inputs, checksum), cfg.resume,
                                  accelerator)
        target_chunks = dist.shard_chunks(inputs.targets, recipe.chunk_targets, accelerator)
        control_chunks = dist.shard_chunks(inputs.control, recipe.chunk_targets, accelerator)
        baseline = run_baseline(ctx, inputs, target_chunks)
        runs = [run for m in mitigations
                for run in run_mitigation(ctx, m, inputs, target_chunks, control_chunks, baseline, checksum, plans[m.name])]
        notes = list(baseline.notes)
        if descriptor.name.startswith("standin"):
            notes.insert(0, f"copy descriptor is the stand-in '{descriptor.name}', NOT SSCD")
        doc = {
            "metric_backend": descriptor.name,
            "metric_devices": metric_devices(descriptor, scorer, baseline.fid, runtime.device),
            "model": {"source": cfg.model or defaults.label or defaults.model_dir, "path": inputs.model_dir,
                      "lora": cfg.lora, "defaults": defaults.label},
            "settings": settings_doc(cfg, recipe, inputs, ctx, notes, time.time() - start),
            "versions": versions(),
            "num_processes": dist.world(accelerator)[1],
            "runtime": runtime.to_dict(),
            "results": [r.result for r in runs],
        }
        result = AuditResult(doc, inputs.output_dir.absolute(), material=(inputs, baseline.items, runs, recipe))
        if out.folder is not None:
            audit_report.write(result, out.folder, accelerator)
    ctx.journal.close()
    if owns:
        accelerator.end_training()
    return result
