"""The audit's report: report.json as built by the pipeline, report.md (paper 004 Table 1's
layout, verdicts, findings written from the figures), grids, tracker logging, a terminal summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from memtrain.core import report
from memtrain.core.files import write_json
from memtrain.core.manifest import load_image
from memtrain.core.run import log_to_trackers
from memtrain.eval.audit.robustness import plot_robustness
from memtrain.eval.audit.verdict import VERDICTS, VerdictRule
from memtrain.eval.utility import devices_line


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
    """One row of the paper-004 table from a stage's figures."""
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
    if not results or not any("unmitigated" in r for r in results):
        return []
    base = next(r for r in results if "unmitigated" in r)
    rows = [table_row("no mitigation (prompts)", base["unmitigated"], base["utility"]["fid_unmitigated"],
                      base["utility"]["kid_unmitigated"], sscd_gen=False)]
    for r in results:
        name = r["label"]
        if r["verdict"] == "bypassed":
            rows.append(table_row(f"{name}: bypassed (sampled without it)", base["unmitigated"], sscd_gen=False))
            continue
        rows += [table_row(f"{name} (prompts)", r["prompt"], r["utility"]["fid"], r["utility"]["kid"]),
                 table_row(f"{name} + attack", r["attack"]),
                 table_row(f"control: held-out + attack ({name})", r["control"], sscd_gen=False)]
    return rows


def findings(results: Sequence[dict], rule: VerdictRule) -> str:
    """A paragraph generated from the figures: what happened, mitigation by mitigation."""
    computed = [r for r in results if "unmitigated" in r]
    if not computed:
        return " ".join(f"`{r['label']}` ({r['verdict']}): {r['verdict_reason']}." for r in results)
    base = computed[0]["unmitigated"]
    fmt = report.format_value
    parts = [f"Without mitigation the model replicates at MR {fmt(base['mr'])} on its {base['n']} memorized "
             f"prompts (median SSCD_Orig {fmt(base.get('sscd_orig_median'))})."]
    for r in results:
        sentence = f"`{r['label']}` ({r['verdict']}): {r['verdict_reason']}."
        if r["verdict"] == "bypassed":
            parts.append(sentence)
            continue
        if r.get("attack_space") == "prompt":
            sentence += f" Attack: {r.get('attack_name', 'pez')} hard prompts ({r['attack_variant']})."
        elif r.get("attack_variant", "").startswith("adaptive"):
            sentence += f" Attack: {r['attack_variant']}."
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


def variant_of(result: dict) -> str:
    """The result's mitigation variant for tables: "official (DCR)", ...; "-" when the registry
    name says it all or the report predates the `variant` key."""
    return result.get("variant") or "-"


def attack_text(result: dict) -> str:
    """A row's attack for the tables: its name (dori, pez, gcg) and the variant that ran."""
    name = result.get("attack_name")
    return f"{name}: {result['attack_variant']}" if name else result["attack_variant"]


def grid_prefix(result: dict) -> str:
    """File-name prefix of a result's grids: the mitigation, then its threat model unless `embedding`."""
    threat = result.get("threat_model", "embedding")
    return result["mitigation"] if threat == "embedding" else f"{result['mitigation']}_{threat}"


def write_grids(folder: Path, inputs, baseline_items: Sequence, runs: Sequence, cell: int) -> dict:
    """Per mitigation: training image | no mitigation | mitigated prompt | mitigated + attack;
    and the control: held-out image | attack. Generations shown: the seed with max SSCD_Orig."""
    grids = {}
    base = {r.index: r.thumb for r in baseline_items}
    for run in runs:
        r, rows = run.result, run.rows
        if not rows:  # bypassed: nothing was generated
            continue
        shown = [(p, a) for p, a in zip(rows["prompt"], rows["attack"]) if p.index in base and base[p.index] is not None]
        if shown:
            cells = [[load_image(inputs.targets[p.index]), base[p.index], p.thumb, a.thumb] for p, a in shown]
            grids[r["label"]] = report.save_grids(folder, cells, [p.id for p, _ in shown], cell=cell,
                                                  prefix=grid_prefix(r))
        control = [c for c in rows["control"] if c.thumb is not None]
        if control:
            cells = [[load_image(inputs.control[c.index]), c.thumb] for c in control]
            grids[f"{r['label']} control"] = report.save_grids(folder, cells, [c.id for c in control], cell=cell,
                                                               prefix=f"{grid_prefix(r)}_control")
    return grids


def markdown(doc: dict, grids: dict, root: Path, rule: VerdictRule) -> report.MarkdownReport:
    """report.md: setup, the paper-004 table, verdicts with the rule, findings, mitigations, grids."""
    results = doc["results"]
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
        "processes": doc["num_processes"], "recipe": s["recipe_path"],        "metrics ran on": devices_line(doc.get("metric_devices", {})),
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
    md.table([{"mitigation": r["mitigation"], "variant": variant_of(r), "threat model": r["threat_model"],
               "attack": attack_text(r),
               **{k: r[k] for k in ("mr_unmitigated", "mr_prompt", "mr_attack", "mr_control")},
               "verdict": r["verdict"] + (f" (after {r['verdict_budget']} steps)" if r.get("verdict_budget") else "")}
              for r in results])
    md.paragraph("Threat models: `weights` (the attacker has the released weights and runs their own sampler: an "
                 "inference-time mitigation is `bypassed`, a weight edit faces the embedding attack), `embedding` "
                 "(adversarial text embeddings fed through the deployed pipeline), `prompt` (hard prompts: token "
                 "strings that go through the whole pipeline, prompt rewrites included).")
    md.paragraph(f"Rule (first match): `none` is the `baseline`; `inconclusive` if the unmitigated MR is not above "
                 f"the control MR + {rule.control_margin}; `removes` if MR under attack <= control MR + "
                 f"{rule.control_margin}; `conceals` if the prompt MR <= {rule.concealed_mr} or <= "
                 f"{rule.clearly_below} x the unmitigated MR while the attack beats the control; else `ineffective`. "
                 "`removes` must hold at every budget of the robustness curve (an attacker keeps the best snapshot); "
                 "where a shorter attack beats the control, the verdict is taken there (`verdict_budget`).")
    curves = [r for r in results if "robustness" in r]
    if curves:
        md.heading("Robustness: MR against the attack budget")
        budgets = curves[0]["robustness"]["budgets"]
        md.table([{"result": r["label"], **{f"{b} steps": f"{report.format_value(a)} / {report.format_value(c)}"
                                             for b, a, c in zip(budgets, r["robustness"]["mr_attack"],
                                                                r["robustness"]["mr_control"])}}
                  for r in curves], ["result"] + [f"{b} steps" for b in budgets])
        md.paragraph("Cells: MR under attack / MR of the held-out control after that many attack steps (the "
                     "first b steps of the one full attack).")
        if (root / "robustness.png").is_file():
            md.image("robustness.png", "robustness")
    md.heading("Findings").paragraph(findings(results, rule))
    notes = s["notes"] + [n for r in results if "utility" in r for n in r["utility"]["notes"]]
    md.bullets(dict.fromkeys(notes))  # each note once, in order
    failed = [{"mitigation": r["mitigation"], **f} for r in results for f in r["failed_targets"]]
    if failed:
        md.heading("Failed targets").table(failed, ["mitigation", "id", "stage", "reason"])
    md.heading("Mitigations")
    for r in results:
        md.heading(f"{r['label']}", level=3)
        check = r.get("search_space_ablation")
        md.key_values({**_describe_rows(r["description"]), "variant": variant_of(r), "threat model": r["threat_model"],
                       "attack": attack_text(r), "pruning scope": r.get("pruning", "n/a"),
                       "weights restored after undo": r.get("weights_restored", "n/a (nothing applied)"),
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
    """The scalar figures logged to trackers, per mitigation and stage."""
    computed = [r for r in results if "unmitigated" in r]
    figures = {"unmitigated": computed[0]["unmitigated"]} if computed else {}
    for r in results:
        key = r["mitigation"] if r["threat_model"] == "embedding" else f"{r['mitigation']}/{r['threat_model']}"
        figures[key] = {k: r[k] for k in ("prompt", "attack", "control") if k in r}
        figures[key]["verdict_index"] = VERDICTS.index(r["verdict"])
    return figures


def write_attacks(folder: Path, runs: Sequence) -> None:
    """attacks/<mitigation>[_<threat>]_{attack,control}.safetensors: every attack's output (L, D)
    keyed by input id, so a user can re-run or share it; attacks/prompts.json: the hard prompts."""
    prompts: dict = {}
    for run in runs:
        for stage in ("attack", "control"):
            rows = [r for r in run.rows.get(stage, []) if r.adv_embedding is not None]
            if not rows:
                continue
            folder.mkdir(parents=True, exist_ok=True)
            r = run.result
            save_file({row.id: torch.from_numpy(np.ascontiguousarray(row.adv_embedding)) for row in rows},
                      str(folder / f"{grid_prefix(r)}_{stage}.safetensors"),
                      metadata={"mitigation": r["mitigation"], "threat_model": r["threat_model"],
                                "attack_space": str(r["attack_space"]), "stage": stage,
                                "what": "text-encoder states (L, D) the attack found, before the mitigation's text path"})
            found = {row.id: row.found_prompt for row in rows if row.found_prompt is not None}
            if found:
                prompts.setdefault(r["label"], {})[stage] = found
    if prompts:
        write_json(folder / "prompts.json", prompts)


def write_outputs(folder: Path, doc: dict, inputs, baseline_items: Sequence, runs: Sequence,
                  recipe, accelerator) -> None:
    """report.json, report.md, grids/, attacks/ into the (staged) folder; figures and grids to the trackers."""
    grids = write_grids(folder / "grids", inputs, baseline_items, runs, recipe.grid_cell)
    write_attacks(folder / "attacks", runs)
    curve = plot_robustness(doc["results"], folder / "robustness.png")
    clean = doc["results"]
    write_json(folder / "report.json", report.versioned(doc))
    markdown(doc, grids, folder, recipe.verdict).write(folder / "report.md")
    columns = ["mitigation", "threat_model", "mr_unmitigated", "mr_prompt", "mr_attack", "mr_control", "verdict"]
    # one key per grid kind: a tracker shows a list of images only if they share a size
    images = {f"grids/{label.replace(' ', '_')}": [Image.open(p).convert("RGB") for p, _ in written]
              for label, written in grids.items()}
    if curve is not None:
        images["robustness"] = [Image.open(curve).convert("RGB")]
    log_to_trackers(accelerator, tracker_figures(clean), images=images or None,
                    # one type per column: a tracker table refuses a number next to a "not computed" text
                    table=(columns, [[report.format_value(r[c]) if c.startswith("mr_") else r[c] for c in columns]
                                     for r in clean]), table_name="verdicts")


def write(result, folder: Path, accelerator=None) -> None:
    """The audit's writer: an AuditResult into `folder` (report.json, report.md, grids/, attacks/)."""
    inputs, baseline_items, runs, recipe = result.material
    write_outputs(folder, result.report, inputs, baseline_items, runs, recipe, accelerator)


def summary(doc: dict) -> str:
    """A few lines for the terminal."""
    fmt = report.format_value
    lines = [f"audited {doc['settings']['n_targets']} targets x {len(doc['settings']['seeds'])} seeds on "
             f"{doc['num_processes']} process(es) with {doc['metric_backend']}"]
    if "budget" in doc["settings"]:
        lines.append(f"  {doc['settings']['budget']}")
    for r in doc["results"]:
        lines.append(f"  {r['label']:<22} MR unmitigated={fmt(r['mr_unmitigated'])} prompt={fmt(r['mr_prompt'])} "
                     f"attack={fmt(r['mr_attack'])} control={fmt(r['mr_control'])} -> {r['verdict']}"
                     + (f" ({r['variant']})" if r.get("variant") else ""))
        if "search_space_ablation" in r:
            check = r["search_space_ablation"]
            lines.append(f"  {'':<10} its whole search space zeroed ({check['weights_zeroed']} weights): "
                         f"prompt MR={fmt(check['mr'])}")
    lines += [f"  note: {n}" for n in doc["settings"]["notes"]]
    lines.append(f"wrote {doc['settings']['output_dir']}")
    return "\n".join(lines)
