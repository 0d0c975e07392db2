"""Time and peak memory of the removal trainings (ESD, Concept Ablation, SISS) per memorized image,
measured in one run on any model (the testbed, the SD v1.4-shaped fixture on the CPU, SD v1.4 on a
GPU): each method runs its preparation and a few optimizer steps at a removal table recipe's
settings (`removal_sd14.yaml` by default: paper 004's), and that recipe's whole budget is projected
from the measured step time and per-image preparation (both scale linearly in steps and images).

The memorized images are the model's own generations of each prompt with the random tokens SISS
tries first (seed + 1000): SISS needs a replica and a non-replica among its generations, which a
random-weight model gives only by construction. Concept Ablation's anchor prompt is "<prompt>, a
photo" with its copy filter off. Both only make the run possible on any weights; what is timed is
each method's own code at the recipe's settings.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from memtrain.core.bundle import load_bundle
from memtrain.core.command_line import merge
from memtrain.core.config import packaged_recipe, read_yaml
from memtrain.core.files import write_json
from memtrain.core.manifest import ManifestItem, read_manifest, write_manifest
from memtrain.core.report import to_pil, versioned
from memtrain.core.sampling import sample
from memtrain.train.removal import REMOVAL_METHODS, removal_recipe_from_dict, train_removal
from memtrain.train.removal.siss import variant_prompt
from memtrain.train.removal_table import peak_memory_gb, reset_peak_memory

BENCH_IMAGES = 4  # SISS's generations and Concept Ablation's anchor images per item in the bench run


def memorized_by_construction(model: str, manifest: str, items: int, seed: int, folder: Path,
                              device: torch.device) -> Path:
    """A manifest of the first `items` prompts whose images are the model's own generations of the
    prompt variant SISS tries first (its seed + 1000): one of SISS's generations replicates each."""
    bundle = load_bundle(model, device=device)
    chosen = read_manifest(manifest)[:items]
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for i, item in enumerate(chosen):
        prompt = variant_prompt(item.prompt, bundle.tokenizer, seed, i, 4)
        image = sample(bundle, [prompt], [seed + 1000], bundle.sampler_settings).images[0, 0]
        path = folder / f"{i}.png"
        to_pil(image).save(path)
        made.append(ManifestItem(id=item.id, prompt=item.prompt, image=str(path)))
    write_manifest(folder / "memorized.jsonl", made)
    return folder / "memorized.jsonl"


def method_data(table_recipe: str, method: str) -> dict:
    """The table recipe's `removal:` keys under the method's own `method_settings`."""
    data = read_yaml(table_recipe)
    return merge(copy.deepcopy(data.get("removal") or {}), copy.deepcopy((data.get("method_settings") or {}).get(method, {})))


def bench_one(method: str, base: dict, model: str, manifest: Path, out: Path, steps: int, seed: int,
              mixed_precision: str | None, descriptor: str) -> dict:
    """One method at the bench budget; its measured and projected figures."""
    full = removal_recipe_from_dict(merge(copy.deepcopy(base), {"method": method, "model": model, "output_dir": str(out),
                                                                "memorized_manifest": str(manifest)}))
    bench = merge(copy.deepcopy(base), {
        "method": method, "model": model, "output_dir": str(out), "memorized_manifest": str(manifest), "seed": seed,
        "descriptor": descriptor, "progress": False, "report_to": "none", "checkpointing": {"steps": 0},
        "train": {"steps": steps, **({"mixed_precision": mixed_precision} if mixed_precision else {})},
        "siss": {"generations": BENCH_IMAGES, "random_tokens": [4], "threshold": 0.9, "sampler": {}},
        "concept_ablation": {"anchors": "paraphrases", "anchor_file": str(manifest.parent / "anchors.json"),
                             "anchor_images": BENCH_IMAGES, "image_threshold": 2.0, "max_replica_rate": 1.0}})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reset_peak_memory(device)  # the method's own peak (Linux and CUDA; elsewhere the process's)
    run = train_removal(removal_recipe_from_dict(bench))
    s = run.summary
    jobs = s["jobs"]
    step_s = sum(j["step_seconds_this_run"] for j in jobs) / max(1, sum(j["steps_this_run"] for j in jobs))
    prepare_per_item = (s["prepare_seconds"] - s["setup_seconds"]) / s["items"]
    ca = full.concept_ablation
    anchors = (ca.surrogates.per_prompt, "surrogate anchor images") if ca.anchors == "surrogates" else \
        (ca.anchor_images, "anchor images")
    images = {"siss": (full.siss.generations, "generations"), "concept_ablation": anchors}.get(method)
    scale = images[0] / BENCH_IMAGES if images else 0.0
    t = full.resolved_train
    training = t.steps * step_s  # the bench's steps are the recipe's (batch, accumulation): only fewer
    per_item_model = REMOVAL_METHODS[method].per_item
    return {"method": method, "items": s["items"], "skipped": run.skipped, "steps": steps,
            "gradient_accumulation_steps": t.gradient_accumulation_steps, "seconds_per_step": round(step_s, 4),
            "preparation_seconds_per_item": round(prepare_per_item, 3), "peak_memory_gb": peak_memory_gb(device),
            "recipe": {"steps": t.steps, "images_per_item": images[0] if images else 0,
                       "image_kind": images[1] if images else None, "one_model_per_item": per_item_model},
            "projected_training_seconds": round(training, 1),
            "projected_preparation_seconds_per_item": round(prepare_per_item * scale, 1)}


def bench_removal(model: str, manifest: str, output_dir: str | Path, methods: list[str] | None = None, items: int = 1,
                  steps: int = 2, seed: int = 0, table_recipe: str | None = None, mixed_precision: str | None = None,
                  descriptor: str = "auto") -> dict:
    """Every method in turn (one process); OUT/removal_bench.json."""
    out = Path(output_dir)
    if mixed_precision is None and not torch.cuda.is_available():
        mixed_precision = "no"  # the SD recipe's fp16 autocast needs a GPU
    recipe = table_recipe or str(packaged_recipe("removal_sd14.yaml"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    made = memorized_by_construction(model, manifest, items, seed, out / "memorized", device)
    write_json(out / "memorized" / "anchors.json", {it.id: [f"{it.prompt}, a photo"] for it in read_manifest(made)})
    rows = [bench_one(m, method_data(recipe, m), model, made, out / m, steps, seed, mixed_precision, descriptor)
            for m in methods or REMOVAL_METHODS.names()]
    doc = {"model": model, "table_recipe": recipe, "items": items, "bench_steps": steps, "methods": rows}
    write_json(out / "removal_bench.json", versioned(doc))
    return doc


def format_removal_bench(doc: dict) -> str:
    """One line per method: measured, then the recipe's budget projected."""
    lines = [f"removal trainings on {doc['model']} ({doc['items']} item(s), {doc['bench_steps']} steps each; "
             f"projection: {Path(doc['table_recipe']).name}'s budget)"]
    for r in doc["methods"]:
        rec = r["recipe"]
        prep = (f", preparation {r['projected_preparation_seconds_per_item'] / 60:.1f} min per item "
                f"({rec['images_per_item']} {rec['image_kind']})" if rec["image_kind"] else "")
        model = "per image" if rec["one_model_per_item"] else "one model for all items"
        lines.append(f"{r['method']}: {r['seconds_per_step']:.2f} s/step, preparation {r['preparation_seconds_per_item']:.1f}"
                     f" s/item at {BENCH_IMAGES} images, peak memory {r['peak_memory_gb']:.2f} GB; at {rec['steps']} steps "
                     f"({model}): training {r['projected_training_seconds'] / 60:.1f} min{prep}")
    return "\n".join(lines)
