"""`localization`: do NeMo and Wanda find memorization where it is known to be?

Needs a ground truth: a JSON file {"layers": {layer name: [output rows]}} naming the weights that
carry the memorization (the planted testbed's planted.json, found beside its model folder). Per
method, prepared on the memorized prompts with the recipe's settings:
- the selection against the planted rows inside the layers the method searches, in the method's
  own unit (NeMo: neurons, value-projection output rows; Wanda: single ff.net.2 weights, a planted
  row counting as all its weights): recall |sel & planted| / |planted|, precision
  |sel & planted| / |sel|, and the chance precision a random selection would score;
- the prompts' MR before and after pruning the selection (SSCD_Orig > threshold in any seed).
The audit's verdict under the attack is the audit's job: memtrain audit --model <planted>.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from memtrain.core.errors import MemtrainError
from memtrain.core.report import MarkdownReport
from memtrain.core.sampling import sample
from memtrain.eval.analyses.inputs import AnalysisInputs, pyplot, save_figure
from memtrain.mitigations import applied, get_mitigation

GROUND_TRUTH_FILE = "planted.json"


@dataclass
class LocalizationSettings:
    """recipe `localization:`."""

    ground_truth: str | None = None  # default: planted.json beside the model folder
    methods: list[str] = field(default_factory=lambda: ["nemo", "wanda"])
    nemo: dict = field(default_factory=dict)
    wanda: dict = field(default_factory=dict)
    reference_prompts: int = 64
    threshold: float = 0.7

    def __post_init__(self) -> None:
        for name in self.methods:
            if name not in ("nemo", "wanda"):
                raise MemtrainError(f"localization: methods are 'nemo' and/or 'wanda', got '{name}'")


def ground_truth_path(settings: LocalizationSettings, model_dir: str) -> Path:
    path = Path(settings.ground_truth) if settings.ground_truth else Path(model_dir).parent / GROUND_TRUTH_FILE
    if not path.is_file():
        raise MemtrainError(f"localization needs a ground truth ('{path}' does not exist): build the planted testbed "
                            "(memtrain build-testbed --variant planted) and pass it as --model, or set "
                            "localization.ground_truth")
    return path


def selections(method, bundle, planted: dict[str, set[int]]) -> tuple[set, set, int, str]:
    """(selected units, planted units, units searched, unit name) in the method's own unit:
    NeMo selects neurons (value-projection output rows); Wanda selects single weights (of
    ff.net.2), so a planted row counts as all of its weights there."""
    modules = dict(bundle.unet.named_modules())
    if method.name == "nemo":
        searched = method.search_space(bundle.unet)
        selected = {(layer, r) for layer, rows in method.neurons().items() for r in rows}
        truth = {(layer, r) for layer, rows in planted.items() if layer in searched for r in rows}
        return selected, truth, sum(m.weight.shape[0] for m in searched.values()), "neurons"
    searched = method.search_space(bundle.unet)
    selected = {(layer, int(i)) for layer, index in method.masks().items() for i in index.tolist()}
    truth = set()
    for layer, rows in planted.items():
        if layer in searched:
            width = modules[layer].weight.shape[1]
            truth |= {(layer, r * width + c) for r in rows for c in range(width)}
    return selected, truth, sum(m.weight.numel() for m in searched.values()), "weights"


def recall_precision(selected: set, truth: set, searched: int) -> dict:
    """Recall and precision of a selection against the planted units; chance precision is the
    planted share of everything the method searches (what a random selection would score)."""
    hit = len(selected & truth)
    return {"n_selected": len(selected), "n_planted_searched": len(truth), "n_hit": hit,
            "recall": hit / len(truth) if truth else None,
            "precision": hit / len(selected) if selected else None,
            "chance_precision": len(truth) / searched if searched else None}


def _mr(inputs: AnalysisInputs, threshold: float) -> tuple[float, list[float]]:
    images = sample(inputs.bundle, inputs.prompts("memorized"), inputs.seeds, inputs.settings).images
    best = inputs.sscd_orig("memorized", images).max(axis=1)
    return float(np.mean(best > threshold)), best.tolist()


def run(inputs: AnalysisInputs, settings: LocalizationSettings, out: Path) -> tuple[dict, MarkdownReport]:
    if inputs.descriptor is None or not inputs.has_images("memorized"):
        raise MemtrainError("localization needs the memorized images and a copy descriptor (SSCD)")
    bundle = inputs.bundle
    path = ground_truth_path(settings, str(bundle.path or bundle.source))
    truth = json.loads(path.read_text())
    planted = {layer: set(rows) for layer, rows in truth["layers"].items()}
    mr, sscd = _mr(inputs, settings.threshold)
    doc: dict = {"ground_truth": str(path.absolute()), "n_planted": sum(len(v) for v in planted.values()),
                 "unmitigated": {"mr": mr, "sscd_orig_max": sscd}, "methods": {}}
    reference = inputs.prompts("non_memorized")[: settings.reference_prompts]
    for name in settings.methods:
        method = get_mitigation(name, **getattr(settings, name))
        method.prepare(bundle, inputs.prompts("memorized"), reference, inputs.seeds)
        with applied(method, bundle):
            mr_after, sscd_after = _mr(inputs, settings.threshold)
        selected, units, searched, unit = selections(method, bundle, planted)
        doc["methods"][name] = {"unit": unit, **recall_precision(selected, units, searched),
                                "mr_after_pruning": mr_after, "sscd_orig_max_after": sscd_after,
                                "searches": method.changes}
    plot(inputs, doc, out / "localization.png")
    md = MarkdownReport("Localization against a planted ground truth")
    md.paragraph(f"Ground truth: {doc['n_planted']} planted rows ({path}). Unmitigated prompt MR {mr:.2f}. "
                 "Recall and precision in each method's unit (NeMo: neurons; Wanda: weights, a planted row "
                 "counting as all its weights), over the planted rows inside the layers the method searches; "
                 "chance precision: what a random selection of the same layers would score.")
    md.table([{"method": n, "unit": r["unit"], "planted (searched)": r["n_planted_searched"], "selected": r["n_selected"],
               "hit": r["n_hit"], "recall": r["recall"], "precision": r["precision"],
               "chance precision": r["chance_precision"], "prompt MR after pruning": r["mr_after_pruning"]}
              for n, r in doc["methods"].items()])
    md.image("localization.png", "localization")
    return doc, md


def plot(inputs: AnalysisInputs, doc: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    names = list(doc["methods"])
    x = np.arange(len(names))
    for offset, key, color in ((-0.27, "recall", "tab:green"), (0.0, "precision", "tab:purple"),
                               (0.27, "chance_precision", "tab:grey")):
        axes[0].bar(x + offset, [doc["methods"][n][key] or 0.0 for n in names], 0.27, color=color,
                    label=key.replace("_", " "))
    for i, n in enumerate(names):
        if not doc["methods"][n]["n_planted_searched"]:
            axes[0].text(i, 0.5, "no planted units\nin its layers", ha="center", fontsize=8)
    axes[0].set_xticks(x, [f"{n} ({doc['methods'][n]['unit']})" for n in names])
    axes[0].set(ylabel="fraction of planted / selected units", ylim=(0, 1.05),
                title=f"(a) recovery of {doc['n_planted']} planted neurons")
    axes[0].legend(fontsize=8)
    bars = ["unmitigated"] + [f"{n} pruned" for n in names]
    values = [doc["unmitigated"]["mr"]] + [doc["methods"][n]["mr_after_pruning"] for n in names]
    axes[1].bar(range(len(bars)), values, color=["grey"] + ["tab:red"] * len(names))
    for i, v in enumerate(values):
        axes[1].text(i, v + 0.02, f"{v:.2f}", ha="center", fontsize=8)
    axes[1].set_xticks(range(len(bars)), bars)
    axes[1].set(ylabel="prompt MR (SSCD_Orig > 0.7)", ylim=(0, 1.05), title="(b) memorized prompts replicating")
    fig.suptitle(inputs.title("Localization on planted memorization"), fontsize=9)
    save_figure(fig, path)
