"""Triage a release: which of its prompts does this model really reproduce?

Releases list more prompts than a given model memorizes (of Wen et al.'s 500 SD v1.4 prompts only
100-120 replicate at SSCD > 0.7), so an audit on the whole list measures mostly prompts that
were never memorized. `triage` runs `memtrain.eval.evaluate` on the release (max SSCD_Orig over
the seeds, resumable, any number of processes) and adds to its output folder:

- `replicating.jsonl` / `non_replicating.jsonl`: the release split at the MR threshold, as
  manifests an audit takes (`--manifest OUT/replicating.jsonl`), each line with its
  `sscd_orig_max` and, where it has one, its `duplicate_group`;
- `duplicates.json`: groups of near-duplicate training images (SSCD between two training
  images above the threshold: a generation copying one then counts as copying every other, so
  such groups inflate an MR and are worth knowing before an audit);
- `triage.json` and `triage.md`: counts and figures.

The release must have local images: a Webster / Wen / NeMo / MemBench file lists URLs, so fetch
it first (`memtrain fetch RELEASE --output_dir DIR`) and triage `DIR` (or its
`manifest.jsonl`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memtrain.core.cli import option
from memtrain.core.errors import MemtrainError
from memtrain.core.files import atomic_write_text, write_json
from memtrain.core.report import versioned
from memtrain.core.manifest import ManifestItem, load_image, read_manifest, write_manifest
from memtrain.data.releases import detect_format
from memtrain.eval.evaluate import EvaluateConfig, evaluate
from memtrain.metrics import get_descriptor
from memtrain.metrics.sscd import cosine_matrix


def release_manifest(release: str | Path) -> Path:
    """The manifest with local images behind `release` (a manifest, or a fetch_images folder)."""
    path = Path(release).expanduser()
    if path.is_dir():
        path = path / "manifest.jsonl"
    if not path.is_file():
        raise MemtrainError(f"release '{release}' not found: give a manifest with local images or the "
                            "--output_dir of memtrain fetch")
    fmt = detect_format(path)
    if fmt != "manifest" or not any(item.image for item in read_manifest(path)):
        raise MemtrainError(f"release '{release}' lists no local images: run memtrain fetch "
                            f"{release} --output_dir DIR first, then triage DIR")
    return path


def duplicate_groups(items: list[ManifestItem], embeddings: np.ndarray, threshold: float) -> list[dict]:
    """Connected groups of training images whose pairwise SSCD exceeds `threshold`."""
    sim = cosine_matrix(embeddings, embeddings)
    parent = list(range(len(items)))

    def root(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for i in range(len(items)):
        for j in range(i + 1, len(items)):
            if sim[i, j] > threshold:
                parent[root(i)] = root(j)
    members: dict[int, list[int]] = {}
    for k in range(len(items)):
        members.setdefault(root(k), []).append(k)
    groups = []
    for ks in (ks for ks in members.values() if len(ks) > 1):
        block = sim[np.ix_(ks, ks)]
        off = block[~np.eye(len(ks), dtype=bool)]
        groups.append({"ids": [items[k].id for k in ks], "max_sscd": round(float(off.max()), 4),
                       "min_sscd": round(float(off.min()), 4)})
    return sorted(groups, key=lambda g: -g["max_sscd"])


def triage_outputs(threshold: float, duplicate_threshold: float, descriptor):
    """The evaluate() hook that writes triage's files into the staged output folder."""

    def write(folder: Path, metrics: dict, items: list[ManifestItem]) -> None:
        rows = {row["id"]: row for row in metrics["items"]}
        if not items or "sscd_orig_max" not in rows[items[0].id]:
            raise MemtrainError("the release has no training images to compare with: triage needs them")
        embeddings = descriptor.embed([load_image(it) for it in items])
        groups = duplicate_groups(items, embeddings, duplicate_threshold)
        group_of = {item_id: k for k, g in enumerate(groups) for item_id in g["ids"]}
        split: dict[str, list[ManifestItem]] = {"replicating": [], "non_replicating": []}
        for item in items:
            extra = {**item.extra, "sscd_orig_max": round(rows[item.id]["sscd_orig_max"], 4)}
            if item.id in group_of:
                extra["duplicate_group"] = group_of[item.id]
            name = "replicating" if rows[item.id]["sscd_orig_max"] > threshold else "non_replicating"
            split[name].append(dataclasses.replace(item, extra=extra))
        for name, chosen in split.items():
            write_manifest(folder / f"{name}.jsonl", chosen)
        write_json(folder / "duplicates.json", versioned({"threshold": duplicate_threshold, "groups": groups}))
        maxima = np.array([rows[it.id]["sscd_orig_max"] for it in items])
        summary = {
            "n_items": metrics["manifest"]["n_items"], "n_evaluated": len(items),
            "n_skipped": len(metrics["manifest"]["skipped"]), "n_replicating": len(split["replicating"]),
            "n_non_replicating": len(split["non_replicating"]), "threshold": threshold,
            "seeds": len(metrics["seeds"]), "sscd_orig_max_quantiles": {
                q: round(float(np.quantile(maxima, float(q))), 4) for q in ("0.1", "0.5", "0.9")},
            "duplicate_threshold": duplicate_threshold, "n_duplicate_groups": len(groups),
            "n_items_in_duplicate_groups": len(group_of), "metric_backend": metrics["metric_backend"],
            "model": metrics["model"], "manifest": metrics["manifest"]["path"],
        }
        write_json(folder / "triage.json", versioned(summary))
        atomic_write_text(folder / "triage.md", summary_markdown(summary))

    return write


def summary_markdown(s: dict) -> str:
    """triage.md: the counts a user reads before choosing what to audit."""
    q = s["sscd_orig_max_quantiles"]
    return "\n".join([
        "# Triage", "",
        f"Release `{s['manifest']}` on model `{s['model']['path']}` ({s['seeds']} seeds, SSCD backend "
        f"`{s['metric_backend']}`).", "",
        "| items | evaluated | skipped (no image) | replicating | not replicating |",
        "| --- | --- | --- | --- | --- |",
        f"| {s['n_items']} | {s['n_evaluated']} | {s['n_skipped']} | {s['n_replicating']} | {s['n_non_replicating']} |",
        "",
        f"Replicating: max SSCD_Orig over the seeds > {s['threshold']}. Max SSCD_Orig quantiles 10/50/90%: "
        f"{q['0.1']:.3f} / {q['0.5']:.3f} / {q['0.9']:.3f}.",
        f"Near-duplicate training images (SSCD > {s['duplicate_threshold']}): {s['n_duplicate_groups']} group(s), "
        f"{s['n_items_in_duplicate_groups']} item(s); see duplicates.json.", "",
        "Audit the replicating ones: `memtrain audit --manifest replicating.jsonl ...`.", "",
    ])


@dataclass(kw_only=True)
class TriageConfig(EvaluateConfig):
    """The release to triage. `memtrain triage`'s config: evaluate's, with the release in place of the manifest."""

    release: str = option(dataclasses.MISSING, "a manifest with local images, or a `memtrain fetch` output folder")
    duplicate_threshold: float | None = option(None, "SSCD between two training images that flags them as "
                                                     "near-duplicates (default: --threshold)")
    project: str | None = option("memtrain-triage", "tracker project name")

    def check_files(self) -> None:
        """The release resolves to local images (a URL-only one fails now, before any model loads)."""
        super().check_files()
        release_manifest(self.release)


def triage(cfg: TriageConfig, defaults=None) -> dict:
    """Evaluate the release with `cfg` and write triage's files; returns triage.json's content
    (on every process)."""
    manifest = release_manifest(cfg.release)
    cfg = dataclasses.replace(cfg, manifest=str(manifest))
    dup = cfg.threshold if cfg.duplicate_threshold is None else cfg.duplicate_threshold
    descriptor = get_descriptor(cfg.metric, allow_standin=cfg.allow_standin)
    metrics = evaluate(cfg, defaults, extra_outputs=triage_outputs(cfg.threshold, dup, descriptor))
    if cfg.runtime.plan:
        return metrics
    maxima = {row["id"]: row.get("sscd_orig_max") for row in metrics["items"]}
    return {"n_replicating": sum(v is not None and v > cfg.threshold for v in maxima.values()),
            "n_evaluated": len(maxima), "output_dir": metrics["output_dir"]}
