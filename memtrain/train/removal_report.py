"""The removal table's rows and its writer: OUT/removal.json and OUT/removal.md (paper 004's
Tables 3 and 5 measured by memtrain.train.removal_table; for the SD recipe the paper's figures
beside them). docs/removal.md says what each column means."""

from __future__ import annotations

from pathlib import Path

from memtrain.core.files import atomic_write_text, write_json
from memtrain.core.report import is_not_computed, markdown_table
from memtrain.metrics import not_computed

ORIGINAL = "none"  # the original model's row: the audit's `none` baseline
ROW_KEYS = ("method", "mr_prompt", "mr_attack", "mr_control", "sscd_orig_mean", "sscd_orig_std", "sscd_gen_mean",
            "a_clip", "fid", "kid", "seconds", "peak_memory_gb", "verdict", "skipped")
NOT_RUN = "not run"
# a method's verdict is its worst over its audits (an attack that restores the images wins)
SEVERITY = ("ineffective", "conceals", "inconclusive", "removes")

# Paper 004 on SD v1.4: Table 3 (Dori: SSCD_Orig, MR), Table 5 (prompts and Dori: SSCD_Orig,
# SSCD_Gen, A_CLIP, MR, FID; the original model's FID 14.44, Sec. 4.4), App. G.2 (ESD 1 h 7 min,
# Concept Ablation 17 h 45 min; 7 prompts without a paraphrase) and App. E.2 (SISS: 9 of 112
# images without an X/A split). The prompt MR and FID are the rows without the attack.
PAPER_004 = {
    ORIGINAL: {"fid": 14.44},
    "esd": {"mr_prompt": 0.11, "mr_attack": 0.98, "sscd_orig_mean": 0.90, "sscd_orig_std": 0.04,
            "sscd_gen_mean": 0.97, "a_clip": 0.33, "fid": 13.45, "seconds": 4020, "verdict": "conceals"},
    "concept_ablation": {"mr_prompt": 0.29, "mr_attack": 0.97, "sscd_orig_mean": 0.91, "sscd_orig_std": 0.04,
                         "sscd_gen_mean": 0.96, "a_clip": 0.32, "fid": 16.03, "seconds": 63900, "verdict": "conceals",
                         "skipped": "7 prompts (no valid paraphrase)"},
    "siss": {"mr_attack": 0.39, "sscd_orig_mean": 0.60, "sscd_orig_std": 0.22,
             "skipped": "9 of 112 images (no X/A split)"},
    "adv_finetune": {"mr_prompt": 0.00, "mr_attack": 0.02, "sscd_orig_mean": 0.36, "sscd_orig_std": 0.14,
                     "sscd_gen_mean": 0.54, "a_clip": 0.30, "fid": 13.61, "verdict": "removes"},
}
COLUMNS = {"method": "method", "mr_prompt": "MR prompt", "mr_attack": "MR Dori", "mr_control": "MR control",
           "sscd_orig": "SSCD_Orig (Dori)", "sscd_gen_mean": "SSCD_Gen (Dori)", "a_clip": "A_CLIP (Dori)",
           "fid": "FID", "kid": "KID", "seconds": "training s", "peak_memory_gb": "peak GB", "verdict": "verdict",
           "skipped": "skipped"}


def figure(value):
    """A figure block's number (`value`), or its not-computed record as it is."""
    return value.get("value") if isinstance(value, dict) and value.get("status") != "not computed" else value


def row_key(result: dict) -> str:
    """An audit row's name in the table's details: threat model and attack (`prompt-gcg`)."""
    return f"{result['threat_model']}-{result.get('attack_name') or 'none'}"


def method_row(method: str, mitigation: str, reports: dict, run=None) -> tuple[dict, dict]:
    """(the table row, its details) from a method's audits (`run`: its RemovalRun; None for the
    original model, audited as `none`): MR and SSCD under Dori (the `embedding`
    row: an attacker with the edited weights runs Dori on them), its control, FID/KID of the
    edited model, and the worst verdict over every attack (Dori, each prompt attack)."""
    results = [r for report in reports.values() for r in report["results"] if r["mitigation"] == mitigation]
    dori = next(r for r in reports["main"]["results"] if r["mitigation"] == mitigation and r["threat_model"] == "embedding")
    attack = dori["attack"]
    judged = [r for r in results if r["verdict"] != "bypassed"]
    decisive = min(judged, key=lambda r: SEVERITY.index(r["verdict"]) if r["verdict"] in SEVERITY else len(SEVERITY))
    untrained = not_computed("the original model: nothing trained")
    row = {"method": method, "mr_prompt": dori["mr_prompt"], "mr_attack": dori["mr_attack"],
           "mr_control": dori["mr_control"], "sscd_orig_mean": attack["sscd_orig_mean"],
           "sscd_orig_std": attack["sscd_orig_std"],
           "sscd_gen_mean": attack.get("sscd_gen_mean", not_computed("no SSCD_Gen reference")),
           "a_clip": figure(attack["a_clip"]), "fid": figure(dori["utility"]["fid"]), "kid": figure(dori["utility"]["kid"]),
           "seconds": run.seconds if run else untrained, "peak_memory_gb": run.peak_memory_gb if run else untrained,
           "verdict": "baseline" if mitigation == ORIGINAL else decisive["verdict"],
           "skipped": dict(run.skipped) if run else {}}
    details = {"verdict_reason": dori["verdict_reason"] if mitigation == ORIGINAL else decisive["verdict_reason"],
               **({} if mitigation == ORIGINAL else {"decided_by": row_key(decisive)}),
               "rows": {row_key(r): {"threat_model": r["threat_model"], "attack": r.get("attack_name"),
                                     "mr_prompt": r["mr_prompt"], "mr_attack": r["mr_attack"],
                                     "mr_control": r["mr_control"], "verdict": r["verdict"]} for r in results},
               "audits": {k: v["settings"]["output_dir"] for k, v in reports.items()}}
    if run is not None:
        details.update(model_dirs=run.model_dirs, training=run.summary)
    return row, details


def not_run_row(method: str, reason: str, items: list) -> tuple[dict, dict]:
    """The row of a method that could not run: nothing measured, every item skipped."""
    missing = not_computed(f"{method} did not run: {reason}")
    row = {key: missing for key in ROW_KEYS}
    row.update(method=method, verdict=NOT_RUN, skipped={it.id: reason for it in items})
    return row, {"verdict_reason": reason}


def _cells(row: dict) -> dict:
    """A row as its table cells, in COLUMNS' order (SSCD_Orig as mean +- std; skipped items
    counted; a figure not computed says so, its reason is in removal.json)."""
    mean, std = row.get("sscd_orig_mean"), row.get("sscd_orig_std")
    both = isinstance(mean, (int, float)) and isinstance(std, (int, float))
    skipped = row.get("skipped")
    values = {**row, "sscd_orig": f"{mean:.2f} ± {std:.2f}" if both else mean,
              "skipped": (len(skipped) if isinstance(skipped, dict) else skipped) or None}
    return {title: "not computed" if is_not_computed(values.get(key)) else values.get(key)
            for key, title in COLUMNS.items()}


def markdown(doc: dict, paper: str | None = None) -> str:
    """removal.md: the table (with paper 004's rows beside for `paper: sd14`), each method's
    attacks and verdict reason, the skipped items, how it ran."""
    settings = doc["settings"]
    rows = []
    for row in doc["rows"]:
        rows.append(_cells(row))
        if paper == "sd14" and row["method"] in PAPER_004:
            rows.append(_cells({"method": f"{row['method']}: paper 004 (SD v1.4)", **PAPER_004[row["method"]]}))
    lines = ["# Removal methods under the same attacker (paper 004, Tables 3 and 5)", "",
             f"Original model `{settings['model_dir']}`; {len(settings['items'])} memorized items removed and audited; "
             f"prompt attacks {', '.join(settings['prompt_attacks'])}; {settings['seconds']:.0f} s in all. Each method's "
             "model is audited against the original as a weight edit (`edited_weights`): MR on the prompts, under Dori "
             "(the embedding attack on the edited weights) with its held-out control, SSCD and A_CLIP under Dori, FID/KID "
             "of the edited model; the verdict is the worst over Dori and the prompt attacks. Columns: docs/removal.md.",
             "", markdown_table(rows, digits=2), ""]
    if paper == "sd14":
        lines += ["Paper 004's rows: Table 3 (under Dori) and Table 5 (prompt MR, SSCD_Gen, A_CLIP, FID without the "
                  "attack), App. G.2 (training time, skipped prompts) and App. E.2 (SISS); empty where the paper gives "
                  "no figure.", ""]
    lines += ["## Every attack", ""]
    attacks = [{"method": m, **{k: r[k] for k in ("threat_model", "attack", "mr_prompt", "mr_attack", "mr_control",
                                                  "verdict")}}
               for m, d in doc["methods"].items() for r in d.get("rows", {}).values()]
    lines += [markdown_table(attacks, digits=2), "", "## Verdicts", ""]
    lines += [f"- `{m}`: {d['verdict_reason']}" + (f" (decided by `{d['decided_by']}`)" if d.get("decided_by") else "")
              for m, d in doc["methods"].items()]
    skipped = [(row["method"], item, why) for row in doc["rows"] if isinstance(row["skipped"], dict)
               for item, why in row["skipped"].items()]
    if skipped:
        lines += ["", "## Skipped items (not removed)", ""]
        lines += [f"- `{m}`: `{item}`: {why}" for m, item, why in skipped]
    return "\n".join(lines) + "\n"


def write(table, folder: Path, paper: str | None = None) -> None:
    """removal.md and removal.json (the typed result's document, last: a table with it is complete)."""
    atomic_write_text(Path(folder) / "removal.md", markdown(table.report, paper))
    write_json(Path(folder) / "removal.json", table.report)
