"""evaluate's outputs: metrics.json, report.md, grids, tracker logging, a terminal summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from memtrain.core import report
from memtrain.core.files import write_json
from memtrain.core.manifest import ManifestItem
from memtrain.core.run import log_to_trackers
from memtrain.eval.utility import devices_line

ITEM_COLUMNS = ["id", "label", "prompt", "sscd_orig_max", "sscd_orig_median", "d_sscd", "a_clip",
                "paper002_max_score", "memorized"]
FIGURE_KEYS = ["n", "mr", "median_sscd", "sscd_orig_median", "sscd_orig_mean", "sscd_orig_std", "d_sscd",
               "paper002", "a_clip", "clipscore", "lpips_diversity", "fid", "kid"]


def _brief(value: Any) -> Any:
    """A figure with metadata (value, std, backend, ...) as one short cell."""
    if not isinstance(value, dict) or "value" not in value or report.is_not_computed(value):
        return value
    text = report.format_value(value["value"])
    if "std" in value:
        text += f" ± {report.format_value(value['std'])}"
    details = [f"n={value['n_generated']}" if "n_generated" in value else "", value.get("backend", "")]
    details = [d for d in details if d]
    return text + (f" ({'; '.join(details)})" if details else "")


def markdown(metrics: dict, grids: Sequence[tuple[Path, list[str]]], root: Path) -> report.MarkdownReport:
    """report.md: setup, overall figures, notes, per-prompt table, skipped items, grids."""
    md = report.MarkdownReport("Memorization evaluation")
    if metrics["metric_is_standin"]:
        md.paragraph(f"**Warning: the copy descriptor is the stand-in `{metrics['metric_backend']}`, not SSCD.** "
                     "Its similarities are not comparable with published SSCD figures.")
    md.heading("Setup").key_values({
        "model": metrics["model"]["source"], "manifest": metrics["manifest"]["path"],
        "prompts evaluated": metrics["manifest"]["n_evaluated"], "prompts skipped": len(metrics["manifest"]["skipped"]),
        "seeds": f"{len(metrics['seeds'])} ({metrics['seeds'][0]}..{metrics['seeds'][-1]})",
        "sampler": metrics["sampler"], "copy descriptor": metrics["metric_backend"],
        "MR threshold": metrics["threshold"], "processes": metrics["num_processes"],        "metrics ran on": devices_line(metrics.get("metric_devices", {})),
    })
    md.heading("Overall").key_values({k: _brief(metrics[k]) for k in FIGURE_KEYS if k in metrics})
    md.paragraph("SSCD_Orig per prompt is the max over its seeds; sscd_orig_median/mean/std are across prompts; "
                 "median_sscd is the median across prompts of the per-prompt median over seeds (the testbed card's figure). "
                 f"MR: fraction of prompts with SSCD_Orig > {metrics['threshold']} in at least one seed. "
                 "D_SSCD: mean pairwise similarity of a prompt's generations (high = little diversity).")
    md.bullets(metrics["notes"])
    md.heading("Per prompt")
    rows = [{**r, "prompt": (r["prompt"][:60] + "...") if len(r["prompt"]) > 60 else r["prompt"]}
            for r in metrics["items"]]
    md.table(rows, [c for c in ITEM_COLUMNS if any(c in r for r in rows)])
    if metrics["manifest"]["skipped"]:
        md.heading("Skipped").table(metrics["manifest"]["skipped"], ["id", "reason"])
    if grids:
        md.heading("Grids").paragraph("Each row: training image | generations (seeds in order).")
        for path, ids in grids:
            md.paragraph(f"Rows: {', '.join(ids)}").image(path.relative_to(root).as_posix(), path.stem)
    return md


def write_outputs(folder: Path, metrics: dict, items: Sequence[ManifestItem], results: Sequence,
                  cell: int) -> list[tuple[Path, list[str]]]:
    """metrics.json, report.md and grids/ into the (staged) folder; returns the grids written."""
    rows = [(it.id, r.grid_row) for it, r in zip(items, results) if r.grid_row is not None]
    grids = report.save_grids(folder / "grids", [r for _, r in rows], [i for i, _ in rows], cell=cell) if rows else []
    write_json(folder / "metrics.json", report.versioned(metrics))
    markdown(metrics, grids, folder).write(folder / "report.md")
    return grids


def log_tracker(accelerator, metrics: dict, grids: Sequence[tuple[Path, list[str]]]) -> None:
    """Figures, grids and the per-prompt table to the trackers (main process)."""
    figures = {k: metrics[k] for k in FIGURE_KEYS if k in metrics}
    images = {"grids": [Image.open(p).convert("RGB") for p, _ in grids]} if grids else None
    columns = [c for c in ITEM_COLUMNS if any(c in r for r in metrics["items"])]
    table = (columns, [[r.get(c) for c in columns] for r in metrics["items"]])
    log_to_trackers(accelerator, figures, images=images, table=table)


def summary(metrics: dict) -> str:
    """A few lines for the terminal."""
    fig = {k: report.format_value(metrics.get(k)) for k in ("n", "mr", "median_sscd", "sscd_orig_median", "d_sscd")}
    lines = [f"evaluated {fig['n']} prompts x {len(metrics['seeds'])} seeds on {metrics['num_processes']} "
             f"process(es) with {metrics['metric_backend']}",
             f"  MR={fig['mr']}  median SSCD_Orig={fig['sscd_orig_median']}  median of medians={fig['median_sscd']}  "
             f"D_SSCD={fig['d_sscd']}",
             f"  A_CLIP={report.format_value(_brief(metrics['a_clip']))}",
             f"  FID={report.format_value(_brief(metrics['fid']))}  KID={report.format_value(_brief(metrics['kid']))}",
             *[f"  note: {n}" for n in metrics["notes"]],
             f"wrote {metrics['output_dir']}"]
    return "\n".join(lines)
